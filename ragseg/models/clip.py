"""open_clip models: loading, text embeddings, and the two masked-segment feature paths.

Loading (:func:`load_clip`): ``models.clip.pretrained`` is

- an open_clip pretrained tag (e.g. ``laion2b_s29b_b131k_ft_soup`` for ``convnext_large_d_320``, FC-CLIP's
  backbone): its weights file is found by :func:`ragseg.models.weights.resolve_open_clip` (open_clip's
  Hugging Face cache under ``<cache>/open_clip``, else ``models.weights.mirror``, else open_clip's own
  download) and loaded by ``open_clip.create_model`` with the tag's preprocessing;
- a local path, ``http(s)://`` URL or bucket URI of a checkpoint: resolved by
  :func:`ragseg.models.weights.resolve` (cache, sha256) and loaded as a state dict (weights_only);
- null: the architecture with random weights, seeded with ``models.clip.seed``.

``models.clip.model_cfg`` registers a custom architecture (open_clip's JSON model config) under the
``models.clip.model`` name, used for the tiny test models.

Masked-segment features (pure functions, used by :class:`ragseg.stages.embed.Embed`):

- ``crop`` (:func:`crop_batch`): per mask, its box padded by ``context_pad`` x box size (clipped to the
  image); pixels outside the mask are set to the model's mean pixel (0 after normalisation), the crop is
  resized to the model's input size keeping its aspect (the rest padded with the mean pixel), then run
  through ``encode_image``.
- ``pool`` (FC-CLIP style, CLIP ConvNeXt = open_clip ``TimmModel`` with a timm ConvNeXt trunk): the dense
  map ``trunk.forward_features`` is computed once per image (:func:`dense_features`) on the *whole* image
  resized (no center crop) so that its longer side is ``pool_image_size`` (default: the model's input
  size) and both sides are multiples of the trunk stride (32) - see :func:`pool_input_shape`. Each mask
  is area-downsampled to the map's resolution (:func:`mask_cell_weights`: the fraction of each cell
  inside the mask) and the dense features are averaged with those weights (:func:`mask_pool`, the
  "pre-head" pooled feature). The model's own head then maps the pooled vector to the embedding
  (:func:`pooled_to_embedding`): ``trunk.forward_head`` (timm's global pool - the identity on the 1x1
  input -, LayerNorm, flatten) followed by open_clip's projection ``visual.head`` (the ``timm_proj`` MLP).
  open_clip builds ``convnext_large_d_320`` with ``timm_pool=""``, which keeps timm's default average
  pool, i.e. the model's own pipeline is ``head(norm(mean_hw(dense)))``; a mask covering the whole image
  therefore gives exactly the embedding of ``encode_image`` on the same resized input (the test checks
  it). A partial mask uses the same head on a masked mean; that is FC-CLIP's out-of-vocabulary path.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ragseg.config import ClipConfig, JobConfig, ModelsConfig
from ragseg.errors import UserError

log = logging.getLogger(__name__)

_REGISTERED: dict[str, str] = {}  # custom architecture name -> json of its config (this process)
_REG_DIR: Path | None = None
_LOADED: dict[tuple, ClipBundle] = {}  # process-level cache: one copy of a model per worker


def _models_cfg(cfg: JobConfig | ModelsConfig) -> ModelsConfig:
    return cfg.models if isinstance(cfg, JobConfig) else cfg


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass
class ClipBundle:
    """A loaded open_clip model (eval mode, on ``device``) and what is needed to feed it."""

    model: Any
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]  # (h, w) of the model's input
    interpolation: str  # "bicubic" | "bilinear"
    model_id: str  # "open_clip:<model>/<pretrained or 'random'>"
    device: str
    dim: int  # embedding dimension
    cfg: ModelsConfig = field(repr=False)

    def __iter__(self):
        """``model, preprocess_info = load_clip(...)`` (docs/interfaces.md): the bundle is the info."""
        yield self.model
        yield self

    @property
    def visual(self):
        return self.model.visual


def register_model_cfg(name: str, model_cfg: dict[str, Any]) -> None:
    """Make ``name`` an open_clip architecture with ``model_cfg`` (open_clip's JSON model config:
    ``embed_dim``, ``vision_cfg``, ``text_cfg``) through ``open_clip.add_model_config``."""
    import open_clip

    global _REG_DIR
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"models.clip.model {name!r}: a custom architecture name may only use "
                        f"letters, digits, '.', '_' and '-'")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise UserError(f"models.clip.model_cfg for {name!r} misses {', '.join(missing)}")
    text = json.dumps(model_cfg, sort_keys=True)
    if _REGISTERED.get(name) == text:
        return
    if _REG_DIR is None:
        _REG_DIR = Path(tempfile.mkdtemp(prefix="ragseg-open_clip-configs-"))
    path = _REG_DIR / f"{name}.json"
    path.write_text(text)
    open_clip.add_model_config(path)
    _REGISTERED[name] = text


def _embed_dim(name: str) -> int:
    import open_clip

    mc = open_clip.get_model_config(name)
    if not mc:
        raise UserError(f"models.clip.model {name!r} is not an open_clip architecture "
                        f"(known: {', '.join(open_clip.list_models()[:8])}, ...); or give models.clip.model_cfg")
    return int(mc["embed_dim"])


def _build(clip: ClipConfig, mcfg: ModelsConfig):
    import open_clip
    import torch

    from ragseg.models import weights

    name, ref = clip.model, clip.pretrained
    tag_cfg = weights.open_clip_tag_cfg(name, ref) if ref else {}
    if tag_cfg:
        # the tag's weights file: open_clip's hub cache, else the mirror, else open_clip's download;
        # the tag's preprocessing (mean, std, interpolation) is applied as create_model(tag) would
        path = weights.resolve_open_clip(name, ref, mcfg.weights)
        try:
            return open_clip.create_model(name, pretrained=path, force_preprocess_cfg=tag_cfg)
        except RuntimeError as e:
            raise UserError(f"CLIP weights open_clip:{name}/{ref} ({path}) do not load: "
                            f"{' '.join(str(e).split())[:300]}") from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(clip.seed)
        model = open_clip.create_model(name, pretrained=None)
    if ref:
        path = weights.resolve(ref, clip.sha256, mcfg.weights, what=f"CLIP checkpoint for {name}")
        sd = weights.load_state_dict(path)
        if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
            sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"CLIP checkpoint {ref} does not match architecture {name}: "
                            f"{' '.join(str(e).split())[:300]}") from e
    return model


def load_clip(cfg: JobConfig | ModelsConfig, device: str | None = None, cache: bool = True) -> ClipBundle:
    """Load the configured open_clip model once per process (eval mode, on the selected device)."""
    import open_clip

    from ragseg.runtime import select_device

    mcfg = _models_cfg(cfg)
    clip = mcfg.clip
    device = device or select_device(mcfg.device)
    if clip.model_cfg:
        register_model_cfg(clip.model, clip.model_cfg)
    key = (clip.model, clip.pretrained, clip.sha256, json.dumps(clip.model_cfg, sort_keys=True),
           clip.seed, mcfg.weights.model_dump_json(), device)
    if cache and key in _LOADED:
        return _LOADED[key]
    dim = _embed_dim(clip.model)
    model = _build(clip, mcfg)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", model.visual.image_size)
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    interp = pp.get("interpolation", "bicubic")
    bundle = ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(clip.model),
        mean=tuple(float(v) for v in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in pp.get("std", open_clip.OPENAI_DATASET_STD)),
        image_size=size,
        interpolation=interp if interp in ("bicubic", "bilinear") else "bicubic",
        model_id=f"open_clip:{clip.model}/{clip.pretrained or 'random'}",
        device=device,
        dim=dim,
        cfg=mcfg,
    )
    log.info("loaded %s on %s (dim %d, input %s)", bundle.model_id, device, dim, size)
    if cache:
        _LOADED[key] = bundle
    return bundle


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------
class TextEmbedder:
    """Class-name text embeddings with a prompt-template ensemble: per class, the mean of the
    L2-normalised embeddings of every template, renormalised. Cached per vocabulary."""

    def __init__(self, cfg: JobConfig | ModelsConfig, bundle: ClipBundle | None = None,
                 batch_size: int = 256):
        self.cfg = _models_cfg(cfg)
        self.bundle = bundle or load_clip(self.cfg)
        self.templates = list(self.cfg.clip.templates) or ["{}"]
        for t in self.templates:
            if "{}" not in t:
                raise UserError(f"models.clip.templates: {t!r} has no '{{}}' for the class name")
        self.batch_size = batch_size
        self.dim = self.bundle.dim
        self.model_id = self.bundle.model_id
        self._cache: dict[tuple[str, ...], np.ndarray] = {}

    def encode(self, class_names) -> np.ndarray:
        """``(len(class_names), dim)`` float32, L2-normalised rows."""
        import torch

        from ragseg.runtime import autocast

        names = tuple(str(n) for n in class_names)
        if names in self._cache:
            return self._cache[names].copy()
        if not names:
            return np.zeros((0, self.dim), np.float32)
        texts = [t.format(n) for n in names for t in self.templates]
        b = self.bundle
        outs = []
        with torch.inference_mode(), autocast(b.device, self.cfg.device):
            for i in range(0, len(texts), self.batch_size):
                tok = b.tokenizer(texts[i:i + self.batch_size]).to(b.device)
                outs.append(b.model.encode_text(tok).float())
        feats = torch.nn.functional.normalize(torch.cat(outs), dim=-1)
        feats = feats.reshape(len(names), len(self.templates), -1).mean(1)
        feats = torch.nn.functional.normalize(feats, dim=-1).cpu().numpy().astype(np.float32)
        self._cache[names] = feats
        return feats.copy()


# ----------------------------------------------------------------------------------------------
# Image-side pure helpers
# ----------------------------------------------------------------------------------------------
def image_tensor(image: np.ndarray, bundle: ClipBundle):
    """HxW(x3|4) uint8 -> normalised float32 tensor (3, H, W) on the bundle's device."""
    import torch

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"image must be HxWx3, got shape {img.shape}")
    rgb = img[:, :, :3]
    if not (rgb.flags.writeable and rgb.flags.c_contiguous):  # Ray hands out read-only views
        rgb = np.array(rgb, order="C")
    x = torch.from_numpy(rgb).to(bundle.device)
    x = x.permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(bundle.mean, device=bundle.device).view(3, 1, 1)
    std = torch.tensor(bundle.std, device=bundle.device).view(3, 1, 1)
    return (x - mean) / std


def resize(x, size: tuple[int, int], interpolation: str):
    """(B, C, H, W) float -> (B, C, h, w), antialiased."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(n, H, W) bool -> (n, 4) int tight boxes x0, y0, x1, y1 (exclusive); raises on an empty mask."""
    n = masks.shape[0]
    boxes = np.zeros((n, 4), np.int64)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for i in range(n):
        ys = np.flatnonzero(rows[i])
        xs = np.flatnonzero(cols[i])
        if len(xs) == 0:
            raise ValueError(f"mask {i} of {n} is empty")
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def padded_box(box, context_pad: float, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Box padded by ``context_pad`` x its width/height on each side, clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    px, py = context_pad * (x1 - x0), context_pad * (y1 - y0)
    h, w = hw
    return (max(0, int(np.floor(x0 - px))), max(0, int(np.floor(y0 - py))),
            min(w, int(np.ceil(x1 + px))), min(h, int(np.ceil(y1 + py))))


def crop_batch(x, masks, boxes: np.ndarray, context_pad: float, size: tuple[int, int],
               interpolation: str):
    """Masked crops for ``crop`` mode.

    ``x``: normalised image (3, H, W); ``masks``: (n, H, W) bool tensor on the same device; ``boxes``:
    (n, 4) tight mask boxes. Returns (n, 3, h, w) model inputs: the padded box, pixels outside the mask
    at the mean pixel (0 after normalisation), resized to fit ``size`` with its aspect kept and the
    remainder padded with the mean pixel (centred).
    """
    import torch

    H, W = x.shape[-2:]
    th, tw = size
    out = x.new_zeros((len(boxes), 3, th, tw))
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = padded_box(box, context_pad, (H, W))
        crop = x[:, y0:y1, x0:x1] * masks[i, y0:y1, x0:x1].to(x.dtype)
        ch, cw = crop.shape[-2:]
        scale = min(th / ch, tw / cw)
        nh, nw = max(1, min(th, round(ch * scale))), max(1, min(tw, round(cw * scale)))
        crop = resize(crop[None], (nh, nw), interpolation)[0]
        oy, ox = (th - nh) // 2, (tw - nw) // 2
        out[i, :, oy:oy + nh, ox:ox + nw] = crop
    return out if len(boxes) else torch.zeros((0, 3, th, tw), device=x.device)


def has_dense_trunk(visual) -> bool:
    """True for an open_clip ``TimmModel`` whose timm trunk gives a 2-D feature map (ConvNeXt, ResNet)
    and no attention pooling in the open_clip head: what ``pool`` mode needs."""
    try:
        from open_clip.timm_model import TimmModel
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(visual, TimmModel):
        return False
    trunk = visual.trunk
    if not (hasattr(trunk, "forward_features") and hasattr(trunk, "forward_head")):
        return False
    if "pool" in dict(visual.head.named_children()):
        return False
    return bool(getattr(trunk, "default_cfg", {}).get("pool_size"))


def trunk_stride(visual) -> int:
    info = getattr(visual.trunk, "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, IndexError, KeyError):
        return 32


def pool_input_shape(hw: tuple[int, int], side: int, stride: int = 32) -> tuple[int, int]:
    """Input size of the dense encoder for an image of size ``hw``: the longer side becomes ``side``
    (rounded to a multiple of ``stride``), the shorter one keeps the aspect, rounded to a multiple of
    ``stride`` (at least one stride). The whole image is used: no crop."""
    h, w = hw
    long_side = max(stride, int(round(side / stride)) * stride)
    if h >= w:
        return long_side, max(stride, int(round(long_side * w / h / stride)) * stride)
    return max(stride, int(round(long_side * h / w / stride)) * stride), long_side


def dense_features(visual, x):
    """(B, 3, h, w) normalised -> (B, C, h/stride, w/stride): the trunk's dense map before its head."""
    return visual.trunk.forward_features(x)


def mask_cell_weights(masks, grid: tuple[int, int]):
    """(n, H, W) bool/float masks -> (n, gh, gw) float32: the fraction of each feature cell inside the
    mask (area interpolation). A mask so small that every fraction underflows to 0 gets weight 1 at
    the cell holding its centroid. Empty masks must be filtered out before (they have no position)."""
    import torch
    import torch.nn.functional as F

    m = masks.float()
    wts = F.adaptive_avg_pool2d(m[:, None], grid)[:, 0]
    tiny = wts.flatten(1).sum(1) <= 0
    if bool(tiny.any()):
        H, W = m.shape[-2:]
        for i in torch.nonzero(tiny).flatten().tolist():
            ys, xs = torch.nonzero(m[i] > 0, as_tuple=True)
            if len(ys) == 0:
                raise ValueError(f"mask {i} is empty")
            cy = min(grid[0] - 1, int(ys.float().mean().item() * grid[0] / H))
            cx = min(grid[1] - 1, int(xs.float().mean().item() * grid[1] / W))
            wts[i, cy, cx] = 1.0
    return wts


def mask_pool(dense, weights):
    """Masked average of one image's dense map: ``dense`` (C, gh, gw), ``weights`` (n, gh, gw) ->
    (n, C) float32 = sum_cells(w * f) / sum_cells(w). This is the pre-head pooled feature."""
    import torch

    with torch.autocast(device_type=dense.device.type, enabled=False):  # fp32 even under bf16 autocast
        f = dense.float().flatten(1)  # (C, gh*gw)
        w = weights.float().flatten(1)  # (n, gh*gw)
        return (w @ f.T) / w.sum(1, keepdim=True).clamp_min(1e-12)


def pooled_to_embedding(visual, pooled):
    """(n, C) pooled trunk features -> (n, embed_dim) through the model's own head: timm's
    ``forward_head`` on a 1x1 map (global pool is then the identity; LayerNorm; flatten) and open_clip's
    projection ``visual.head``. Not normalised."""
    x = pooled[:, :, None, None].to(next(visual.parameters()).dtype)
    return visual.head(visual.trunk.forward_head(x))
