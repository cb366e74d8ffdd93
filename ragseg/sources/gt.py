"""Ground truth of an image row -> per-segment boolean masks.

Three formats (``row["gt_format"]``):

- ``panoptic_rgb``: ``gt_png_uri`` is a COCO panoptic PNG (``id = R + 256 G + 256^2 B``); each
  ``gt_segments`` entry's mask is ``ids == id``.
- ``semantic_index``: ``gt_png_uri`` is a class-index PNG; each entry's ``id`` is a class index and
  only classes present in the image give a segment (one per class).
- ``instance_masks``: each entry has its own ``mask_uri`` (non-zero = inside), resized with nearest
  neighbour to the image size when the sizes differ (Open Images masks are stored at another
  resolution than the images).

A missing or unreadable PNG, a label map whose size differs from the image, or a ``panoptic_rgb``
segment listed in ``gt_segments`` (the ground-truth JSON) whose id has no pixel in the PNG raises
ValueError naming the image, the file and the segment ids: the ``gt`` stage turns it into an error row
instead of dropping the segment silently.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ragseg.io import read_bytes
from ragseg.masks import rgb_to_id

GT_FORMATS = ("", "panoptic_rgb", "semantic_index", "instance_masks")


@dataclass
class GtSegment:
    segment_id: int
    label: str
    isthing: bool
    iscrowd: bool
    mask: np.ndarray  # HxW bool


def _open_png(uri: str) -> Image.Image:
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise ValueError(f"ground-truth PNG not found: {uri}") from None
    except OSError as e:
        raise ValueError(f"cannot read ground-truth PNG {uri}: {e}") from None
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises several types for corrupt files
        raise ValueError(f"corrupt ground-truth PNG {uri}: {type(e).__name__}: {e}") from None
    return im


def _check_size(arr: np.ndarray, image_hw: tuple[int, int] | None, uri: str) -> None:
    if image_hw is not None and tuple(arr.shape[:2]) != tuple(int(v) for v in image_hw):
        raise ValueError(f"ground-truth PNG {uri} is {arr.shape[1]}x{arr.shape[0]} (WxH) but the image is "
                         f"{int(image_hw[1])}x{int(image_hw[0])}")


def _value(row: Any, key: str, default: Any = "") -> Any:
    try:
        v = row[key]
    except (KeyError, IndexError):
        return default
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    return default if v is None else v


def parse_segments(row: Any) -> list[dict]:
    raw = _value(row, "gt_segments", "[]") or "[]"
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        segs = json.loads(raw) if isinstance(raw, str) else list(raw)
    except ValueError as e:
        raise ValueError(f"gt_segments of image {_value(row, 'image_id')!r} is not valid JSON: {e}") from None
    if not isinstance(segs, list):
        raise ValueError(f"gt_segments of image {_value(row, 'image_id')!r} is not a list")
    return segs


def _check_listed_segments(ids: np.ndarray, segs: list[dict], uri: str, image_id: Any) -> None:
    present = set(np.unique(ids).tolist())
    absent = [s for s in segs if int(s["id"]) not in present]
    if absent:
        listed = ", ".join(f"{int(s['id'])} ({s.get('label', '')})" for s in absent[:10])
        more = f" and {len(absent) - 10} more" if len(absent) > 10 else ""
        raise ValueError(f"image {image_id!s}: segment id{'s' if len(absent) > 1 else ''} {listed}{more} listed "
                         f"in the ground-truth JSON but absent from its PNG {uri}")


def load_gt_segments(row: Any, image_hw: tuple[int, int] | None) -> list[GtSegment]:
    """The row's ground-truth segments with masks of size ``image_hw`` (H, W); None = the label map's
    own size."""
    fmt = str(_value(row, "gt_format", ""))
    if fmt == "":
        return []
    if fmt not in GT_FORMATS:
        raise ValueError(f"unknown gt_format {fmt!r}")
    segs = parse_segments(row)
    out: list[GtSegment] = []
    if fmt in ("panoptic_rgb", "semantic_index"):
        uri = str(_value(row, "gt_png_uri", ""))
        if not uri:
            raise ValueError(f"image {_value(row, 'image_id')!r}: gt_format {fmt} without gt_png_uri")
        im = _open_png(uri)
        if fmt == "panoptic_rgb":
            if im.mode not in ("RGB", "RGBA"):
                raise ValueError(f"panoptic PNG {uri} has mode {im.mode}, expected RGB")
            ids = rgb_to_id(np.asarray(im.convert("RGB")))
        else:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "1"):
                raise ValueError(f"semantic PNG {uri} has mode {im.mode}, expected a single-channel index map")
            ids = np.asarray(im).astype(np.int64)
        _check_size(ids, image_hw, uri)
        if fmt == "panoptic_rgb":
            _check_listed_segments(ids, segs, uri, _value(row, "image_id"))
        for s in segs:
            mask = ids == int(s["id"])
            if fmt == "semantic_index" and not mask.any():
                continue
            out.append(GtSegment(int(s["id"]), str(s["label"]), bool(s["isthing"]), bool(s.get("iscrowd", False)),
                                 mask))
        return out
    # instance_masks
    for s in segs:
        uri = s.get("mask_uri")
        if not uri:
            raise ValueError(f"image {_value(row, 'image_id')!r}: segment {s.get('id')} has no mask_uri")
        im = _open_png(str(uri))
        if image_hw is not None and (im.height, im.width) != (int(image_hw[0]), int(image_hw[1])):
            im = im.convert("L").resize((int(image_hw[1]), int(image_hw[0])), Image.NEAREST)
        arr = np.asarray(im.convert("L")) > 0
        if image_hw is None and out and arr.shape != out[0].mask.shape:
            raise ValueError(f"mask {uri} is {arr.shape} but earlier masks are {out[0].mask.shape}")
        out.append(GtSegment(int(s["id"]), str(s["label"]), bool(s.get("isthing", True)),
                             bool(s.get("iscrowd", False)), arr))
    return out
