"""PanopticMerge stage: classified proposals -> COCO panoptic PNG pixels + ``segments_info`` JSON.

In per image: ``image`` (for H, W; ``height``/``width`` columns are used when ``image`` is absent),
``seg_masks_rle``, ``seg_class``, ``seg_score`` and optionally ``s_ret``, ``s_clip``, ``s_iv``.
Out: ``panoptic_png`` (H x W x 3 uint8, object column; ``id = R + 256 G + 256^2 B``) and
``segments_info`` (JSON string: list of ``{"id", "category_id", "area", "bbox" [x, y, w, h],
"iscrowd": 0, "score", "s_ret", "s_clip", "s_iv", "mask_rle"}``; ``category_id`` is
``vocab.ids[class]``, ``mask_rle`` is the COCO RLE of the segment's visible pixels, per-source scores
are those of the segment's highest-scored proposal and ``null`` when absent). Rules of the merge:
:func:`ragseg.panoptic.panoptic_merge` with ``label.merge`` settings. Errored rows pass through with
an empty PNG (0 x 0 x 3) and ``"[]"``.
"""

from __future__ import annotations

import json
import math

import numpy as np

from ragseg.config import JobConfig, MergeConfig
from ragseg.masks import decode_rle, encode_rle
from ragseg.panoptic import panoptic_merge, segment_stats, to_png_rgb
from ragseg.vocab import Vocab

STAGE = "merge"


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def merge_proposals(masks, classes, scores, isthing: np.ndarray, mc: MergeConfig,
                    hw: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
    """Decoded (n, H, W) masks with their classes and scores -> ``(id_map, segments)`` of
    :func:`ragseg.panoptic.panoptic_merge` with the ``label.merge`` settings. Pure: the label job and
    the experiments' re-scoring (ragseg.experiments) both call it."""
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(masks) != len(classes) or len(scores) != len(classes):
        raise ValueError(f"{len(masks)} masks, {len(classes)} classes, {len(scores)} scores")
    return panoptic_merge(masks, scores, classes, isthing, mc.score_threshold, mc.overlap_threshold,
                          mc.min_area, image_hw=hw)


def segment_infos(id_map: np.ndarray, segments: list[dict], category_ids, sources) -> list[dict]:
    """The ``segments_info`` entries of a merged image: per segment (``id``, ``class_idx``, ``score``) its
    ``category_id`` (``category_ids[class_idx]``), area and box from ``id_map``, the per-source scores
    ``sources(segment)`` gives (``s_ret``, ``s_clip``, ``s_iv``) and the RLE of its pixels."""
    stats = segment_stats(id_map)
    infos = []
    for seg in segments:
        area, bbox = stats.get(int(seg["id"]), (0, [0, 0, 0, 0]))
        info = {"id": int(seg["id"]), "category_id": int(category_ids[seg["class_idx"]]), "area": area,
                "bbox": [int(v) for v in bbox], "iscrowd": 0, "score": _num(seg["score"])}
        info.update(sources(seg))
        info["mask_rle"] = encode_rle(id_map == seg["id"])
        infos.append(info)
    return infos


class PanopticMerge:
    def __init__(self, cfg: JobConfig, vocab: Vocab):
        self.mc = cfg.label.merge
        self.vocab = vocab

    def _image_hw(self, batch: dict, i: int) -> tuple[int, int]:
        if "image" in batch and batch["image"][i] is not None and np.size(batch["image"][i]) > 0:
            shape = np.shape(batch["image"][i])
            return int(shape[0]), int(shape[1])
        if "height" in batch and "width" in batch:
            return int(batch["height"][i]), int(batch["width"][i])
        raise ValueError("no image or height/width to size the panoptic map")

    def merge_one(self, hw: tuple[int, int], rles, classes, scores, extras: dict) -> tuple[np.ndarray, str]:
        masks = [decode_rle(r) for r in rles]
        id_map, segments = merge_proposals(masks, classes, scores, self.vocab.isthing, self.mc, hw)

        def sources(seg: dict) -> dict:
            top = seg["proposals"][0]
            return {k: _num(col[top]) if (col := extras.get(k)) is not None and len(col) > top else None
                    for k in ("s_ret", "s_clip", "s_iv")}

        return to_png_rgb(id_map), json.dumps(segment_infos(id_map, segments, self.vocab.ids, sources))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ragseg.stages.batch import map_rows, object_column

        def merge(i: int):
            extras = {k: np.asarray(batch[k][i]).reshape(-1) for k in ("s_ret", "s_clip", "s_iv")
                      if k in batch and batch[k][i] is not None}
            return self.merge_one(self._image_hw(batch, i), list(batch["seg_masks_rle"][i]),
                                  batch["seg_class"][i], batch["seg_score"][i], extras)

        res, errors = map_rows(batch, STAGE, merge, empty=lambda: (np.zeros((0, 0, 3), np.uint8), "[]"))
        out = dict(batch)
        out["panoptic_png"] = object_column([r[0] for r in res])
        out["segments_info"] = object_column([r[1] for r in res])
        out["error"] = np.array(errors, dtype=object)
        return out
