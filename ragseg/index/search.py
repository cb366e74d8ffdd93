"""``ragseg search``: embed one region of an image and list its nearest labelled DB segments."""

from __future__ import annotations

import io

import numpy as np

from ragseg import io as rio
from ragseg.config import JobConfig
from ragseg.errors import UserError


def parse_box(box: str, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """``"x0,y0,x1,y1"`` (pixels, x1/y1 exclusive) -> ints clipped to the image; UserError if empty."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box.split(","))
    except ValueError:
        raise UserError(f"--box must be x0,y0,x1,y1 (numbers), got {box!r}") from None
    h, w = hw
    x0, x1 = int(max(0, min(w, np.floor(x0)))), int(max(0, min(w, np.ceil(x1))))
    y0, y1 = int(max(0, min(h, np.floor(y0)))), int(max(0, min(h, np.ceil(y1))))
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"--box {box!r} is empty inside the {w}x{h} image")
    return x0, y0, x1, y1


def region_mask(hw: tuple[int, int], box: str | None = None, mask_png: np.ndarray | None = None) -> np.ndarray:
    """HxW bool mask from a box string or a mask image (non-zero = inside); both -> intersection."""
    h, w = hw
    m = np.ones((h, w), bool)
    if box is None and mask_png is None:
        raise UserError("give --box x0,y0,x1,y1 or --mask MASK.png")
    if box is not None:
        x0, y0, x1, y1 = parse_box(box, hw)
        b = np.zeros((h, w), bool)
        b[y0:y1, x0:x1] = True
        m &= b
    if mask_png is not None:
        mk = np.asarray(mask_png)
        if mk.ndim == 3:
            mk = mk.any(axis=-1)
        if mk.shape != (h, w):
            raise UserError(f"mask is {mk.shape[1]}x{mk.shape[0]} but the image is {w}x{h}")
        m &= mk != 0
    if not m.any():
        raise UserError("the query region is empty")
    return m


def _read_image(uri: str, mode: str | None = "RGB") -> np.ndarray:
    from PIL import Image

    try:
        data = rio.read_bytes(uri)
    except FileNotFoundError:
        raise UserError(f"image not found: {uri}") from None
    try:
        im = Image.open(io.BytesIO(data))
        return np.asarray(im.convert(mode) if mode else im)
    except Exception as e:
        raise UserError(f"cannot decode image {uri}: {e}") from None


def _make_embed(cfg: JobConfig):
    from ragseg.models.masked_clip import MaskedClipEmbedder

    return MaskedClipEmbedder(cfg)


def check_embedder(meta: dict, model_id: str, mode: str) -> None:
    if meta.get("embed_model") != model_id or meta.get("embed_mode") != mode:
        raise UserError(
            f"the index was built from {meta.get('embed_model')!r} features in {meta.get('embed_mode')!r} "
            f"mode but the config embeds with {model_id!r} in {mode!r} mode; set models.clip.* (and "
            "models.clip.mode) to match the index")


def query_config(index_uri: str, meta: dict, cfg: JobConfig | None) -> JobConfig:
    """The config a query of this index embeds with: ``cfg`` (or the defaults) with the identity fields
    of ``models.clip`` it leaves out taken from the index (ragseg.identity), checked against the index
    and, for the CLIP weights, against this machine's cache (one line when they cannot be loaded)."""
    from ragseg import identity
    from ragseg.preflight import preflight

    cfg = identity.adopt_clip(cfg or JobConfig(), identity.index_clip(meta),
                              identity.index_identity(meta).get("fcclip_input"))
    identity.check(identity.index_identity(meta), identity.embed_identity(cfg), f"index {index_uri}")
    preflight(cfg, "search")
    return cfg


def search_region(index_uri: str, image_uri: str, box: str | None = None, mask: str | None = None,
                  k: int = 10, nprobe: int | None = None, cfg: JobConfig | None = None,
                  embed=None) -> list[dict]:
    """Embed the region (box and/or mask PNG) of ``image_uri`` with
    :class:`~ragseg.models.masked_clip.MaskedClipEmbedder` (or ``embed``, with its ``embed_rows``) and
    return its ``k`` nearest DB segments as dicts ``rank, sim, label, image_id, segment_id``. The
    embedder comes from the index (:func:`query_config`): no config is needed."""
    from ragseg.index.store import Index
    from ragseg.index.versions import read_meta

    if embed is None:
        cfg = query_config(index_uri, read_meta(index_uri), cfg)
    cfg = cfg or JobConfig()
    image = _read_image(image_uri)
    hw = image.shape[:2]
    mask_img = _read_image(mask, mode=None) if mask else None
    region = region_mask(hw, box, mask_img)
    index = Index.open(index_uri, nprobe=nprobe, use_gpu=cfg.index.use_gpu)
    emb = embed or _make_embed(cfg)
    check_embedder(index.meta, emb.model_id, emb.mode)
    try:
        q = np.asarray(emb.embed_rows([(image, region[None])])[0], dtype=np.float32).reshape(-1, index.meta["dim"])
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the region's one line
        raise UserError(f"embedding the region failed: {type(e).__name__}: {e}") from None
    if q.shape[0] != 1:
        raise UserError("the embedder returned no feature for the region")
    q /= max(float(np.linalg.norm(q)), 1e-12)
    sims, labels, image_ids, seg_ids = index.search(q, k)
    res = []
    for r in range(sims.shape[1]):
        if not np.isfinite(sims[0, r]):
            break
        res.append({"rank": r + 1, "sim": float(sims[0, r]), "label": str(labels[0, r]),
                    "image_id": str(image_ids[0, r]), "segment_id": int(seg_ids[0, r])})
    return res
