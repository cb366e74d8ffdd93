"""Binary masks <-> COCO RLE (pycocotools), and small mask math. Pure functions, no Ray."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

# The per-image segment columns every mask-making stage outputs (lists, one entry per segment):
# RLE json, label, id, isthing, score, area (pixels) and tight xyxy box, the last two computed
# from the mask where it is made (encode_rle_stats).
SEG_COLUMNS = ("seg_masks_rle", "seg_labels", "seg_ids", "seg_isthing", "seg_scores", "seg_areas", "seg_boxes")


def encode_rle(mask: np.ndarray) -> str:
    """HxW bool/uint8 mask -> compact COCO RLE as a JSON string ``{"size": [h, w], "counts": str}``."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    rle = mask_utils.encode(m)
    return json.dumps({"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")})


def encode_rle_stats(mask: np.ndarray) -> tuple[str, int, list[float]]:
    """Encode a mask once and read its area and tight xyxy box from the same RLE, where the mask is
    made: no later step needs to decode it again for them."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    rle = mask_utils.encode(m)
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    text = json.dumps({"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")})
    return text, int(mask_utils.area(rle)), [x, y, x + w, y + h]


def as_rle(rle: str | bytes | dict) -> dict:
    """A COCO RLE in any form ragseg writes or reads (JSON string, dict with str / bytes / list
    counts) -> the dict pycocotools takes: ``{"size": [h, w], "counts": bytes}``."""
    d = json.loads(rle) if isinstance(rle, (str, bytes)) else dict(rle)
    counts = d["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        d = mask_utils.frPyObjects(d, d["size"][0], d["size"][1])
    elif isinstance(counts, str):
        d = {"size": list(d["size"]), "counts": counts.encode("ascii")}
    else:
        d = {"size": list(d["size"]), "counts": bytes(counts)}
    return d


_as_rle = as_rle


def decode_mask(row) -> np.ndarray:
    """HxW bool mask of a ``mask_rle`` value from any ragseg Parquet file (features/, segments/), or of a
    row dict holding one. Files of ragseg >= 0.3 store a struct pycocotools decodes as is
    (``pycocotools.mask.decode(row["mask_rle"])``); older files a JSON string, read here too."""
    if isinstance(row, dict) and "mask_rle" in row:
        row = row["mask_rle"]
    return mask_utils.decode(as_rle(row)).astype(bool)


def decode_rle(rle: str | dict) -> np.ndarray:
    """COCO RLE (JSON string or dict) -> HxW bool mask."""
    return mask_utils.decode(_as_rle(rle)).astype(bool)


def rle_area(rle: str | dict) -> int:
    return int(mask_utils.area(_as_rle(rle)))


def rle_bbox_xyxy(rle: str | dict) -> list[float]:
    x, y, w, h = mask_utils.toBbox(_as_rle(rle)).tolist()
    return [x, y, x + w, y + h]


def mask_bbox_xyxy(mask: np.ndarray) -> list[float]:
    """Tight box of a mask in pixel coordinates (x0, y0, x1, y1), x1/y1 exclusive; zeros if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def rgb_to_id(png: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (HxWx3 uint8) -> segment ids ``R + 256 G + 256^2 B``."""
    png = png.astype(np.uint32)
    return png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.uint32)
    return np.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], axis=-1).astype(np.uint8)
