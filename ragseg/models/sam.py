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

import numpy as np

from ragseg.config import ModelsConfig, Sam2Config, SamConfig
from ragseg.errors import UserError
from ragseg.models.weights import sam2_checkpoint  # noqa: F401 - the SAM 2.1 checkpoint rule, used here

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
    if cfg.family == "sam2":
        return sam2_problems(cfg.sam2)
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


# ----------------------------------------------------------------------------------------------
# Identity (recorded in DB manifests) and the SAM 2.1 family
# ----------------------------------------------------------------------------------------------
def mask_model_id(cfg: SamConfig) -> str:
    """The mask model's identity, family included: ``sam:vit_h:<checkpoint>`` or
    ``sam2.1:hiera_l:<checkpoint>`` (``random-seed<N>`` for random weights)."""
    if cfg.family == "sam2":
        s = cfg.sam2
        return f"sam2.1:{s.arch}:{sam2_checkpoint(s) or f'random-seed{s.seed}'}"
    return model_id(cfg)


SAM2_CONFIG_FILES = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "custom": "configs/sam2.1/sam2.1_hiera_t.yaml",
}


def sam2_overrides(s: Sam2Config) -> list[str]:
    """Hydra overrides of the package config: ``sam2.build_sam.build_sam2`` adds its own (dynamic
    multimask fallback); ``custom`` shrinks the trunk, neck and (unused by images) memory modules."""
    if s.arch != "custom":
        return []
    d, t = s.d_model, "++model.image_encoder.trunk"
    dims = [s.embed_dim * 2 ** i for i in range(len(s.stages))]
    mem = max(16, d // 4)
    grid = s.image_size // 16
    return [
        f"++model.image_size={s.image_size}",
        f"{t}.embed_dim={s.embed_dim}", f"{t}.num_heads={s.num_heads}", f"{t}.stages={list(s.stages)}",
        f"{t}.global_att_blocks={list(s.global_att_blocks)}", f"{t}.window_spec={list(s.window_spec)}",
        f"++model.image_encoder.neck.d_model={d}",
        f"++model.image_encoder.neck.backbone_channel_list={dims[::-1]}",
        f"++model.image_encoder.neck.position_encoding.num_pos_feats={d}",
        f"++model.memory_attention.d_model={d}", f"++model.memory_attention.layer.d_model={d}",
        f"++model.memory_attention.layer.self_attention.embedding_dim={d}",
        f"++model.memory_attention.layer.cross_attention.embedding_dim={d}",
        f"++model.memory_attention.layer.cross_attention.kv_in_dim={mem}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.dim_feedforward={2 * d}", "++model.memory_attention.num_layers=1",
        f"++model.memory_encoder.out_dim={mem}", f"++model.memory_encoder.position_encoding.num_pos_feats={mem}",
        f"++model.memory_encoder.fuser.layer.dim={d}",
    ]


def sam2_problems(s: Sam2Config) -> list[str]:
    """Why ``models.sam.sam2`` cannot build (without importing sam2)."""
    import importlib.util

    out = []
    if importlib.util.find_spec("sam2") is None:
        out.append("models.sam.family sam2 needs the sam2 package (sam2==1.1.0; `make setup` installs it)")
    if s.arch == "custom":
        n = sum(s.stages)
        if len(s.stages) != 4 or len(s.window_spec) != 4:
            out.append("models.sam.sam2.stages and window_spec need 4 entries (Hiera's four stages)")
        if s.image_size % 32:
            out.append(f"models.sam.sam2.image_size must be a multiple of 32, got {s.image_size}")
        # a q-pooling block (the first of stages 2..4) cannot attend globally (Hiera divides by its window)
        qpool = {sum(s.stages[:i]) for i in range(1, len(s.stages))}
        if any(not 0 <= b < n or b in qpool for b in s.global_att_blocks):
            out.append("models.sam.sam2.global_att_blocks must be block indices < sum(stages) that do not "
                       "start a stage")
    return out


def load_sam2(models_cfg: ModelsConfig):
    """-> a ``sam2`` ``SAM2Base`` in eval mode on the CPU: the package's SAM 2.1 config for ``arch``
    (hydra, as ``sam2.build_sam.build_sam2`` builds it), random weights from ``seed``, then the
    checkpoint (resolved like every ragseg checkpoint, loaded strictly with ``weights_only=True``)."""
    import torch

    s = models_cfg.sam.sam2
    bad = sam2_problems(s)
    if bad:
        raise UserError(bad[0])
    from sam2.build_sam import build_sam2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = build_sam2(SAM2_CONFIG_FILES[s.arch], None, device="cpu", mode="eval",
                           hydra_overrides_extra=sam2_overrides(s))
    ck = sam2_checkpoint(s)
    if ck:
        from ragseg.models import weights

        path = weights.resolve(ck, sha256=s.sha256, cfg=models_cfg.weights, what="SAM 2.1 checkpoint")
        try:
            model.load_state_dict(weights.load_state_dict(path), strict=True)
        except RuntimeError as e:
            raise UserError(f"SAM 2.1 checkpoint {ck} does not match arch {s.arch}: "
                            f"{str(e).splitlines()[0]}") from None
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# Batched image encoding (both families): images in, one embedding state per image out
# ----------------------------------------------------------------------------------------------
def resize_longest(image: np.ndarray, size: int) -> np.ndarray:
    """segment_anything's input resize (``ResizeLongestSide(size).apply_image``: PIL, uint8): the
    longer side becomes ``size``. A CPU task does this before the model stage (``SamPrep``)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(size).apply_image(np.ascontiguousarray(image))


def sam_input_shape(hw: tuple[int, int], size: int) -> tuple[int, int]:
    from segment_anything.utils.transforms import ResizeLongestSide

    return tuple(ResizeLongestSide.get_preprocess_shape(int(hw[0]), int(hw[1]), size))


class SdpaAttention:  # a mixin: ``use_sdpa`` makes each block's Attention an instance of a subclass
    """segment_anything's image-encoder ``Attention`` with ``torch.nn.functional.scaled_dot_product_attention``.

    The eager forward computes ``softmax(q k^T * scale + rel_h + rel_w) v`` where ``rel_h`` / ``rel_w``
    are the decomposed relative positions of ``add_decomposed_rel_pos`` (computed from the *unscaled*
    q). The same sum, built once as an additive ``attn_mask`` of shape (B*heads, HW, HW), goes to SDPA
    with the same scale (``head_dim ** -0.5``), so the result is equal up to float rounding
    (tests/test_sam_batch.py checks 1e-5 in fp32 over windowed and global blocks)."""

    def forward(self, x):
        import torch.nn.functional as F
        from segment_anything.modeling.image_encoder import get_rel_pos

        B, H, W, _ = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, nh, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * nh, H * W, -1).unbind(0)
        bias = None
        if self.use_rel_pos:
            import torch

            Rh = get_rel_pos(H, H, self.rel_pos_h)
            Rw = get_rel_pos(W, W, self.rel_pos_w)
            r_q = q.reshape(B * nh, H, W, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(B * nh, H * W, H * W)
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.view(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(out)


_SDPA_CLASSES: dict[type, type] = {}


def use_sdpa(encoder) -> int:
    """Switch every ``Attention`` of a segment_anything ``ImageEncoderViT`` to :class:`SdpaAttention`
    (same parameters, same state dict); returns how many were switched."""
    from segment_anything.modeling.image_encoder import Attention

    n = 0
    for m in encoder.modules():
        if isinstance(m, Attention) and not isinstance(m, SdpaAttention):
            cls = type(m)
            sub = _SDPA_CLASSES.get(cls)
            if sub is None:
                sub = _SDPA_CLASSES[cls] = type(f"Sdpa{cls.__name__}", (SdpaAttention, cls), {})
            m.__class__ = sub
            n += 1
    return n


def use_eager(encoder) -> int:
    """Undo :func:`use_sdpa`."""
    n = 0
    for m in encoder.modules():
        if isinstance(m, SdpaAttention):
            m.__class__ = m.__class__.__mro__[2]
            n += 1
    return n


def attention_kind(cfg: SamConfig, device: str) -> str:
    if cfg.attention == "auto":
        return "sdpa" if device == "cuda" else "eager"
    return cfg.attention


def wrap_encoder(encoder, device: str, device_cfg, compile_: bool = False) -> None:
    """Run ``encoder`` (nearly all of the mask model's compute) under the configured autocast (bf16 on
    CUDA) and hand its outputs on as float32, so the prompt encoder and mask decoder stay fp32; with
    ``compile_`` the original forward goes through ``torch.compile`` first. ``device_cfg`` is read at
    call time (the GPU smoke test flips its precision)."""
    import torch

    from ragseg.runtime import autocast

    inner = encoder.forward
    if compile_:
        inner = torch.compile(inner, dynamic=False)

    def as_float(out):
        if isinstance(out, torch.Tensor):
            return out.float()
        if isinstance(out, dict):
            return {k: as_float(v) for k, v in out.items()}
        if isinstance(out, (list, tuple)):
            return type(out)(as_float(v) for v in out)
        return out

    def forward(x):
        with autocast(device, device_cfg):
            return as_float(inner(x))

    encoder.forward = forward



def stack_box_masks(masks_out: list, ious_out: list, multimask: bool, hw: tuple[int, int],
                    return_logits: bool) -> tuple[np.ndarray, np.ndarray]:
    """One image's box prompts, answered a chunk at a time, as (n, k, H, W) masks (logits or bool) and
    (n, k) IoU predictions (k = 3 with ``multimask``); empty arrays of those shapes for no box."""
    if not masks_out:
        k = 3 if multimask else 1
        return np.zeros((0, k, *hw), np.float32 if return_logits else bool), np.zeros((0, k), np.float32)
    return np.concatenate(masks_out), np.concatenate(ious_out)


def chunks(n: int, size: int):
    """(start, end) of consecutive slices of ``size`` over ``n`` items."""
    for s in range(0, n, size):
        yield s, min(n, s + size)
