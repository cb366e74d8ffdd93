"""Panoptic merge of classified mask proposals (METHOD.md, stage 5). Pure numpy, no Ray.

:func:`panoptic_merge` rules, in order:

1. Drop proposals with ``score < score_threshold``, a negative class (unclassified) or an empty mask.
2. Rank the rest by score, highest first (ties: earlier proposal first).
3. For each proposal: ``visible = mask & ~painted``. Drop it when
   ``|visible| / |mask| < overlap_threshold`` or ``|visible| < min_area`` (or ``|visible| = 0``).
4. A kept *thing* proposal becomes a new segment. A kept *stuff* proposal whose class already has a
   segment is painted into that segment (one segment per stuff class); otherwise it starts one.
   The merged segment's score is the **max** of its pieces' scores, i.e. the score of its first
   (highest-ranked) piece; its area is the sum of the pieces' visible areas.
5. Paint ``visible`` with the segment's id. Ids are 1..m in creation order (contiguous); 0 = void.

Each segment dict: ``id``, ``class_idx``, ``score``, ``area`` (pixels), ``bbox`` ([x, y, w, h] of the
painted pixels), ``isthing``, ``proposals`` (indices of the input proposals painted into it, the
first one being the highest-scored).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ragseg.masks import id_to_rgb


def _bbox_xywh(ys: np.ndarray, xs: np.ndarray) -> list[int]:
    if len(xs) == 0:
        return [0, 0, 0, 0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]


def panoptic_merge(
    masks: Sequence[np.ndarray] | np.ndarray,
    scores: np.ndarray,
    class_idx: np.ndarray,
    isthing: np.ndarray,
    score_threshold: float = 0.0,
    overlap_threshold: float = 0.8,
    min_area: int = 0,
    image_hw: tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Paint ranked proposals into an (H, W) int32 id map; returns ``(id_map, segments)``.

    ``masks``: n boolean (H, W) masks (list or (n, H, W) array); ``scores`` (n,); ``class_idx`` (n,)
    vocabulary indices (< 0: unclassified, dropped); ``isthing`` (C,) bool. ``image_hw`` gives the
    size when there are no masks. Rules in the module docstring.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    class_idx = np.asarray(class_idx, dtype=np.int64).reshape(-1)
    isthing = np.asarray(isthing, dtype=bool).reshape(-1)
    n = len(masks)
    if len(scores) != n or len(class_idx) != n:
        raise ValueError(f"{n} masks but {len(scores)} scores and {len(class_idx)} classes")
    if n == 0:
        if image_hw is None:
            raise ValueError("no masks and no image_hw: cannot size the id map")
        return np.zeros(image_hw, dtype=np.int32), []
    hw = tuple(np.asarray(masks[0]).shape)
    if image_hw is not None and tuple(image_hw) != hw:
        raise ValueError(f"mask size {hw} differs from image size {tuple(image_hw)}")
    if np.any(class_idx >= len(isthing)):
        raise ValueError(f"class index out of range (vocabulary has {len(isthing)} classes)")

    id_map = np.zeros(hw, dtype=np.int32)
    painted = np.zeros(hw, dtype=bool)
    segments: list[dict] = []
    stuff_seg: dict[int, dict] = {}
    order = np.argsort(-scores, kind="stable")
    for p in order:
        c = int(class_idx[p])
        if c < 0 or not np.isfinite(scores[p]) or scores[p] < score_threshold:
            continue
        m = np.asarray(masks[p], dtype=bool)
        if m.shape != hw:
            raise ValueError(f"mask {p} has size {m.shape}, expected {hw}")
        area = int(m.sum())
        if area == 0:
            continue
        visible = m & ~painted
        vis = int(visible.sum())
        if vis == 0 or vis / area < overlap_threshold or vis < min_area:
            continue
        thing = bool(isthing[c])
        seg = None if thing else stuff_seg.get(c)
        if seg is None:
            seg = {"id": len(segments) + 1, "class_idx": c, "score": float(scores[p]), "area": 0,
                   "bbox": [0, 0, 0, 0], "isthing": thing, "proposals": []}
            segments.append(seg)
            if not thing:
                stuff_seg[c] = seg
        seg["area"] += vis
        seg["score"] = max(seg["score"], float(scores[p]))
        seg["proposals"].append(int(p))
        id_map[visible] = seg["id"]
        painted |= visible
    stats = segment_stats(id_map)
    for seg in segments:
        seg["bbox"] = stats[seg["id"]][1]
    return id_map, segments


def segment_stats(id_map: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """``{segment id: (area in pixels, [x, y, w, h] box)}`` of every non-zero id of an (H, W) id map."""
    ys, xs = np.nonzero(id_map)
    ids = id_map[ys, xs]
    out = {}
    for sid in np.unique(ids):
        sel = ids == sid
        out[int(sid)] = (int(sel.sum()), _bbox_xywh(ys[sel], xs[sel]))
    return out


def to_png_rgb(id_map: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> COCO panoptic PNG pixels (H, W, 3) uint8, ``id = R + 256 G + 256^2 B``."""
    return id_to_rgb(id_map)
