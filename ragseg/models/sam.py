"""segment_anything model loading.

``load_sam(models_cfg) -> Sam`` (eval mode, CPU). ``arch`` vit_h / vit_l / vit_b builds the official
architecture (1024 px input, patch 16, 256-d prompts) and loads ``checkpoint`` (a local path, an
http(s) URL or a bucket URI, resolved into the cache by :func:`ragseg.models.weights.resolve` and read
with ``weights_only=True``; segment_anything's own builder uses a plain ``torch.load``, so it is not
given the checkpoint). ``arch: custom`` builds the same classes at the sizes of the config, with random
weights from ``sam.seed`` (tiny test models), and loads ``checkpoint`` when one is given.
"""

from __future__ import annotations

from functools import partial

from ragseg.config import ModelsConfig, SamConfig
from ragseg.errors import UserError

# official SAM sizes: (embed dim, depth, heads, global attention blocks)
OFFICIAL = {
    "vit_h": (1280, 32, 16, [7, 15, 23, 31]),
    "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
    "vit_b": (768, 12, 12, [2, 5, 8, 11]),
}
PATCH_SIZE = 16


def build_sam_arch(
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: list[int],
    image_size: int = 1024,
    prompt_embed_dim: int = 256,
):
    """The segment_anything ``Sam`` module (as ``build_sam._build_sam`` makes it), random weights.

    With the official sizes (1024 / 256) this is exactly the published architecture; smaller sizes
    scale the mask decoder's MLP (8 x prompt dim, 2048 at 256) and IoU head with the prompt dim."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    bad = size_problems(encoder_embed_dim, encoder_depth, encoder_num_heads, encoder_global_attn_indexes,
                        image_size, prompt_embed_dim)
    if bad:
        raise UserError(bad[0])
    grid = image_size // PATCH_SIZE
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(encoder_global_attn_indexes),
            window_size=min(14, grid),
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=prompt_embed_dim,
                mlp_dim=8 * prompt_embed_dim,
                num_heads=8,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=prompt_embed_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def size_problems(encoder_embed_dim: int, encoder_depth: int, encoder_num_heads: int,
                  encoder_global_attn_indexes: list[int], image_size: int = 1024,
                  prompt_embed_dim: int = 256) -> list[str]:
    """Why these sizes cannot build a SAM (empty when they can)."""
    out = []
    if image_size % PATCH_SIZE:
        out.append(f"models.sam.image_size must be a multiple of {PATCH_SIZE}, got {image_size}")
    if prompt_embed_dim % 16:
        out.append(f"models.sam.prompt_embed_dim must be a multiple of 16, got {prompt_embed_dim}")
    if encoder_num_heads < 1 or encoder_embed_dim % encoder_num_heads:
        out.append("models.sam.encoder_embed_dim must be divisible by encoder_num_heads")
    if any(not 0 <= i < encoder_depth for i in encoder_global_attn_indexes):
        out.append("models.sam.encoder_global_attn_indexes must be block indices < encoder_depth")
    return out


def config_problems(cfg: SamConfig) -> list[str]:
    """Why ``models.sam`` cannot build (arch/checkpoint pair, custom sizes), without building it."""
    if cfg.arch != "custom" and not cfg.checkpoint:
        return [f"models.sam.checkpoint is required for arch {cfg.arch} (null only with arch: custom)"]
    return size_problems(**arch_sizes(cfg))


def arch_sizes(cfg: SamConfig) -> dict:
    if cfg.arch == "custom":
        return {
            "encoder_embed_dim": cfg.encoder_embed_dim,
            "encoder_depth": cfg.encoder_depth,
            "encoder_num_heads": cfg.encoder_num_heads,
            "encoder_global_attn_indexes": list(cfg.encoder_global_attn_indexes),
            "image_size": cfg.image_size,
            "prompt_embed_dim": cfg.prompt_embed_dim,
        }
    dim, depth, heads, glob = OFFICIAL[cfg.arch]
    return {
        "encoder_embed_dim": dim,
        "encoder_depth": depth,
        "encoder_num_heads": heads,
        "encoder_global_attn_indexes": glob,
        "image_size": 1024,
        "prompt_embed_dim": 256,
    }


def model_id(cfg: SamConfig) -> str:
    return f"sam:{cfg.arch}:{cfg.checkpoint or f'random-seed{cfg.seed}'}"


def load_sam(models_cfg: ModelsConfig):
    """-> a segment_anything ``Sam`` in eval mode on the CPU."""
    import torch

    cfg = models_cfg.sam
    if cfg.arch != "custom" and not cfg.checkpoint:
        raise UserError(config_problems(cfg)[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sam = build_sam_arch(**arch_sizes(cfg))
    if cfg.checkpoint:
        from ragseg.models import weights

        path = weights.resolve(cfg.checkpoint, sha256=cfg.sha256, cfg=models_cfg.weights, what="SAM checkpoint")
        state = weights.load_state_dict(path)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"SAM checkpoint {cfg.checkpoint} does not match arch {cfg.arch}: "
                            f"{str(e).splitlines()[0]}") from None
    sam.eval()
    return sam
