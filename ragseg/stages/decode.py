"""Decode stages: image bytes -> pixels, and a row's ground truth -> RLE segments.

Both are Ray Data callables over numpy batches (docs/interfaces.md): rows whose ``error`` is already
set pass through untouched with empty outputs; a failing row gets ``error = "<stage>: Type: msg"``
and empty outputs; the stage never raises for one bad row.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ragseg.config import JobConfig, SourceConfig
from ragseg.errors import error_text
from ragseg.io import read_bytes
from ragseg.masks import SEG_COLUMNS, encode_rle_stats
from ragseg.sources import register_job_storage_options, register_storage_options
from ragseg.sources.gt import load_gt_segments
from ragseg.stages.batch import as_list, batch_len, errors_of, map_rows, object_column

EMPTY_IMAGE_SHAPE = (0, 0, 3)


def _tidy_labels(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Numpy batches give ``labels`` cells as arrays of strings; hand them back as lists so that Arrow
    stores a list<string> column instead of pickled objects."""
    if "labels" in out:
        out["labels"] = object_column([[str(x) for x in as_list(v)] for v in out["labels"]])
    return out


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> HxWx3 uint8 RGB with EXIF orientation applied. Forces a full decode, so
    a truncated file raises (PIL's LOAD_TRUNCATED_IMAGES is left False)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would pass silently")
    if not data:
        raise UnidentifiedImageError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's message names a BytesIO object: say what the bytes are
        raise UnidentifiedImageError(f"not an image format PIL reads ({len(data)} bytes, starting "
                                     f"{bytes(data[:8])!r})") from None
    im.load()
    im = ImageOps.exif_transpose(im)
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"decoded image has shape {arr.shape}")
    return np.ascontiguousarray(arr)


class DecodeImages:
    """Adds ``image`` (HxWx3 uint8, object column), ``height`` and ``width`` (int) from ``uri``."""

    stage = "decode"

    def __init__(self, cfg: JobConfig | None = None):
        self.cfg = cfg
        register_job_storage_options(cfg)  # e.g. anonymous access to a public bucket, on this worker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = batch_len(batch)
        errors = errors_of(batch, n)
        images, hs, ws = [], [], []
        for i in range(n):
            img = np.zeros(EMPTY_IMAGE_SHAPE, np.uint8)
            if not errors[i]:
                uri = str(batch["uri"][i])
                try:
                    img = decode_image(read_bytes(uri))
                except Exception as e:  # noqa: BLE001 - one bad image never stops the batch
                    errors[i] = error_text(self.stage, e if str(e) else f"{type(e).__name__} reading {uri}")
                    if uri not in errors[i]:
                        errors[i] = f"{errors[i]} ({uri})"
                    img = np.zeros(EMPTY_IMAGE_SHAPE, np.uint8)
            images.append(img)
            hs.append(img.shape[0])
            ws.append(img.shape[1])
        out = dict(batch)
        out["image"] = object_column(images)
        out["height"] = np.asarray(hs, dtype=np.int64)
        out["width"] = np.asarray(ws, dtype=np.int64)
        out["error"] = np.asarray(errors, dtype=object)
        return _tidy_labels(out)


class LoadGroundTruth:
    """Adds ``seg_masks_rle``, ``seg_labels``, ``seg_ids``, ``seg_isthing``, ``seg_scores`` (1.0),
    ``seg_areas`` and ``seg_boxes`` (xyxy) from
    the row's ground truth (see :mod:`ragseg.sources.gt`). Crowd segments are skipped unless
    ``source.include_crowd``; segments smaller than ``build_db.min_segment_area`` (or empty) are
    dropped. Rows without ground truth get empty lists."""

    stage = "gt"

    def __init__(self, cfg: JobConfig, source: SourceConfig | None = None):
        self.cfg = cfg
        register_job_storage_options(cfg)
        register_storage_options(source)
        src = source if source is not None else cfg.source
        self.include_crowd = bool(src.include_crowd) if src is not None else False
        self.min_area = int(cfg.build_db.min_segment_area)

    def _hw(self, batch: dict[str, np.ndarray], i: int) -> tuple[int, int] | None:
        if "height" in batch and "width" in batch and int(batch["height"][i]) > 0:
            return int(batch["height"][i]), int(batch["width"][i])
        if "image" in batch and getattr(batch["image"][i], "ndim", 0) == 3 and batch["image"][i].shape[0] > 0:
            return int(batch["image"][i].shape[0]), int(batch["image"][i].shape[1])
        return None

    def segments(self, row: dict[str, Any], hw: tuple[int, int] | None) -> dict[str, list]:
        cols: dict[str, list] = {k: [] for k in SEG_COLUMNS}
        for s in load_gt_segments(row, hw):
            if s.iscrowd and not self.include_crowd:
                continue
            rle, area, box = encode_rle_stats(s.mask)
            if area == 0 or area < self.min_area:
                continue
            for k, v in zip(SEG_COLUMNS, (rle, s.label, int(s.segment_id), bool(s.isthing), 1.0, area, box)):
                cols[k].append(v)
        return cols

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = ("image_id", "uri", "gt_format", "gt_png_uri", "gt_segments")
        res, errors = map_rows(batch, self.stage,
                               lambda i: self.segments({k: batch[k][i] for k in keys if k in batch}, self._hw(batch, i)),
                               empty=lambda: {k: [] for k in SEG_COLUMNS})
        cols = {k: [r[k] for r in res] for k in SEG_COLUMNS}
        out = dict(batch)
        for k, v in cols.items():
            out[k] = object_column(v)
        out["error"] = np.asarray(errors, dtype=object)
        return _tidy_labels(out)
