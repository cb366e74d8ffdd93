"""Realistic stage results without models, for the commit path alone (bench/scale.py and the
kill-at-every-write tests): what build-db's Embed or label's merge would hand the piece writer.

Each image's results are a pure function of its id (seeded), so a rerun regenerates exactly the same
rows: masks are random blobs of the given size encoded as COCO RLE (area and box computed where the
mask is made, as the real stages do), embeddings L2-normalised float16 of the given dim. An image whose
id ends with ``fail_suffix`` comes back as a decode error, so the errors tables are exercised too.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ragseg.masks import encode_rle_stats
from ragseg.stages.batch import object_column


def _rng(image_id: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(image_id.encode()).hexdigest()[:12], 16)])


def _blob_masks(rng: np.random.Generator, n: int, hw: tuple[int, int]) -> list[np.ndarray]:
    """n masks that look like segments (an ellipse each, clipped to the image), cheap to make."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 16, h / 3), rng.uniform(w / 16, w / 3)
        out.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
    return out


class DbResults:
    """``rows -> batch`` with the columns :class:`ragseg.pipelines.build_db.WriteDbPiece` reads."""

    def __init__(self, dim: int = 768, segments_per_image: int = 20, hw: tuple[int, int] = (480, 640),
                 labels: tuple[str, ...] = ("wall", "floor", "person", "car", "tree"), seed: int = 0,
                 fail_suffix: str | None = None, mask_pool: int = 0):
        self.dim, self.segs, self.hw, self.labels, self.seed = dim, segments_per_image, hw, labels, seed
        self.fail_suffix = fail_suffix
        # mask_pool > 0: draw each segment's (RLE, area, box) from that many masks made once, so that
        # making results costs next to nothing (a stand-in for GPUs far faster than this machine)
        self.pool = ([encode_rle_stats(m) for m in _blob_masks(np.random.default_rng(seed), mask_pool, hw)]
                     if mask_pool else None)

    def __call__(self, rows: list[dict]) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {k: [] for k in ("image_id", "uri", "error", "seg_masks_rle", "seg_labels", "seg_ids",
                                                 "seg_scores", "seg_areas", "seg_boxes", "embeddings")}
        for r in rows:
            iid = str(r["image_id"])
            cols["image_id"].append(iid)
            cols["uri"].append(str(r["uri"]))
            failed = bool(self.fail_suffix) and iid.endswith(self.fail_suffix)
            cols["error"].append("decode: ValueError: generated failure" if failed else "")
            n = 0 if failed else self.segs
            rng = _rng(iid, self.seed)
            if self.pool:
                stats = [self.pool[j] for j in rng.integers(0, len(self.pool), n)]
            else:
                stats = [encode_rle_stats(m) for m in _blob_masks(rng, n, self.hw)]
            emb = rng.standard_normal((n, self.dim)).astype(np.float32)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            cols["seg_masks_rle"].append([s[0] for s in stats])
            cols["seg_areas"].append([s[1] for s in stats])
            cols["seg_boxes"].append([s[2] for s in stats])
            cols["seg_labels"].append([self.labels[j % len(self.labels)] for j in range(n)])
            cols["seg_ids"].append(list(range(1, n + 1)))
            cols["seg_scores"].append(rng.uniform(0.5, 1.0, n).round(4).tolist())
            cols["embeddings"].append(emb.astype(np.float16))
        return {k: object_column(v) for k, v in cols.items()}


class LabelResults:
    """``rows -> batch`` as label's graph hands it to the piece writer: the panoptic merge's output for
    each image (an id map with ``segments_per_image`` segments over vocabulary ``category_ids``),
    its PNG written by the real :class:`ragseg.pipelines.label.WritePanoptic`."""

    def __init__(self, out: str, category_ids: list[int], segments_per_image: int = 20,
                 hw: tuple[int, int] = (480, 640), seed: int = 0, fail_suffix: str | None = None):
        from ragseg.pipelines.label import WritePanoptic

        self.write_png = WritePanoptic(out)
        self.cats, self.segs, self.hw, self.seed, self.fail_suffix = category_ids, segments_per_image, hw, seed, fail_suffix

    def __call__(self, rows: list[dict]) -> dict[str, np.ndarray]:
        from ragseg.masks import encode_rle
        from ragseg.panoptic import to_png_rgb

        cols: dict[str, list] = {k: [] for k in ("image_id", "uri", "error", "height", "width", "panoptic_png",
                                                 "segments_info")}
        for r in rows:
            iid = str(r["image_id"])
            failed = bool(self.fail_suffix) and iid.endswith(self.fail_suffix)
            rng = _rng(iid, self.seed)
            id_map = np.zeros(self.hw, np.int32)
            infos = []
            if not failed:
                for j, m in enumerate(_blob_masks(rng, self.segs, self.hw)):
                    id_map[m] = j + 1  # later blobs cover earlier ones, as painting does
                for sid in np.unique(id_map[id_map > 0]):
                    m = id_map == sid
                    ys, xs = np.nonzero(m)
                    infos.append({"id": int(sid), "category_id": int(self.cats[int(sid) % len(self.cats)]),
                                  "area": int(m.sum()), "iscrowd": 0, "score": round(float(rng.uniform(0.3, 1)), 4),
                                  "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                           int(ys.max() - ys.min() + 1)],
                                  "s_ret": 0.5, "s_clip": 0.25, "s_iv": None, "mask_rle": encode_rle(m)})
            cols["image_id"].append(iid)
            cols["uri"].append(str(r["uri"]))
            cols["error"].append("decode: ValueError: generated failure" if failed else "")
            cols["height"].append(self.hw[0])
            cols["width"].append(self.hw[1])
            cols["panoptic_png"].append(to_png_rgb(id_map) if not failed else np.zeros((0, 0, 3), np.uint8))
            cols["segments_info"].append(json.dumps(infos))
        batch = {k: object_column(v) for k, v in cols.items()}
        batch["height"] = np.asarray(cols["height"], np.int64)
        batch["width"] = np.asarray(cols["width"], np.int64)
        return self.write_png(batch)


# ----------------------------------------------------------------------------------------------
# Stand-ins for the model stages of the real Ray Data graphs (bench/scale.py): same constructor
# arguments and output columns as ragseg.stages' Detect / Segment / LoadGroundTruth / Embed /
# Classify, results generated (seeded by image id) at a set pace instead of computed by a model, so
# that build_graph's own graph (decode, the CPU stages, merge, PNG writes, the piece writer) runs as
# in production with the GPUs' work taken out.
# ----------------------------------------------------------------------------------------------
class StandInSpec:
    """What the stand-ins emit: ``segments`` per image, masks drawn from ``mask_pool`` blobs per image
    size (made once per worker), embeddings of ``dim``, and ``images_per_s`` per actor (None: as fast
    as the CPU allows; else each batch takes at least ``len / images_per_s`` seconds, a GPU's pace)."""

    def __init__(self, segments: int = 20, mask_pool: int = 64, dim: int = 768, images_per_s: float | None = None,
                 seed: int = 0):
        self.segments, self.mask_pool, self.dim, self.images_per_s, self.seed = (
            segments, mask_pool, dim, images_per_s, seed)


class _StandIn:
    def __init__(self, spec: StandInSpec, cfg=None, *args, **kwargs):
        self.spec = spec
        self._pools: dict[tuple[int, int], list] = {}

    def _pace(self, t0: float, n: int) -> None:
        import time

        if self.spec.images_per_s:
            left = n / self.spec.images_per_s - (time.perf_counter() - t0)
            if left > 0:
                time.sleep(left)

    def _pool(self, hw: tuple[int, int]) -> list:
        if hw not in self._pools:
            rng = np.random.default_rng(self.spec.seed)
            self._pools[hw] = [encode_rle_stats(m) for m in _blob_masks(rng, self.spec.mask_pool, hw)]
        return self._pools[hw]

    @staticmethod
    def _hw(batch: dict, i: int) -> tuple[int, int]:
        if "height" in batch and int(batch["height"][i]) > 0:
            return int(batch["height"][i]), int(batch["width"][i])
        return tuple(np.asarray(batch["image"][i]).shape[:2])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        t0 = time.perf_counter()
        n = len(batch["error"])
        out = dict(batch)
        self.fill(batch, out, n, [str(e) if e else "" for e in batch["error"]])
        self._pace(t0, n)
        return out


class StandInDetect(_StandIn):
    """As ``Detect(cfg, vocab)``: ``boxes`` (n, 4), ``box_labels``, ``box_scores``."""

    def __init__(self, spec: StandInSpec, cfg=None, vocab: list[str] | None = None):
        super().__init__(spec)
        self.labels = list(vocab or ["wall", "floor", "person", "car", "tree"])

    def fill(self, batch, out, n, errors):
        boxes, labels, scores = [], [], []
        for i in range(n):
            k = 0 if errors[i] else self.spec.segments
            h, w = self._hw(batch, i)
            rng = _rng(str(batch["image_id"][i]), self.spec.seed)
            xy = np.sort(rng.uniform(0, 1, (k, 2, 2)), axis=1) * np.array([w, h], np.float32)
            boxes.append(xy.reshape(k, 4).astype(np.float32))
            labels.append([self.labels[j % len(self.labels)] for j in range(k)])
            scores.append(np.sort(rng.uniform(0.3, 1.0, k).astype(np.float32))[::-1].copy())
        out["boxes"], out["box_labels"], out["box_scores"] = (object_column(boxes), object_column(labels),
                                                              object_column(scores))


class StandInSegment(_StandIn):
    """As ``Segment(cfg)`` / ``SamGrid(cfg)`` / ``LoadGroundTruth(cfg)``: the ``seg_*`` columns
    (ragseg.masks.SEG_COLUMNS), one mask per box when the row has boxes, else ``segments`` masks."""

    def fill(self, batch, out, n, errors):
        from ragseg.stages.segment import SAM_INPUT

        out.pop(SAM_INPUT, None)  # as the mask model's stage: the resized copy goes no further
        cols: dict[str, list] = {k: [] for k in ("seg_masks_rle", "seg_labels", "seg_ids", "seg_isthing",
                                                 "seg_scores", "seg_areas", "seg_boxes")}
        for i in range(n):
            labels = list(batch["box_labels"][i]) if "box_labels" in batch else None
            k = 0 if errors[i] else (len(labels) if labels is not None else self.spec.segments)
            pool = self._pool(self._hw(batch, i)) if k else []
            rng = _rng(str(batch["image_id"][i]), self.spec.seed + 1)
            stats = [pool[j] for j in rng.integers(0, len(pool), k)] if k else []
            cols["seg_masks_rle"].append([s[0] for s in stats])
            cols["seg_areas"].append([s[1] for s in stats])
            cols["seg_boxes"].append([s[2] for s in stats])
            cols["seg_labels"].append(labels if labels is not None else ["thing"] * k)
            cols["seg_ids"].append(list(range(1, k + 1)))
            cols["seg_isthing"].append([bool(j % 2) for j in range(k)])
            cols["seg_scores"].append(rng.uniform(0.5, 1.0, k).round(4).tolist())
        out.update({c: object_column(v) for c, v in cols.items()})


class StandInEmbed(_StandIn):
    """As ``Embed(cfg)``: ``embeddings`` (n, dim) float16, L2-normalised, one per segment."""

    def fill(self, batch, out, n, errors):
        embs = []
        for i in range(n):
            k = 0 if errors[i] else len(batch["seg_masks_rle"][i])
            e = _rng(str(batch["image_id"][i]), self.spec.seed + 2).standard_normal((k, self.spec.dim)).astype(np.float32)
            e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            embs.append(e.astype(np.float16))
        out["embeddings"] = object_column(embs)


class StandInClassify(_StandIn):
    """As ``Classify(cfg, vocab, index, fallback)``: ``seg_class``, ``seg_score``, ``s_ret``, ``s_clip``,
    ``s_iv`` per segment (classes of the vocabulary, scores in [0.3, 1])."""

    def __init__(self, spec: StandInSpec, cfg=None, vocab=None, *args, **kwargs):
        super().__init__(spec)
        self.n_classes = len(vocab) if vocab is not None else 3

    def fill(self, batch, out, n, errors):
        cols: dict[str, list] = {k: [] for k in ("seg_class", "seg_score", "s_ret", "s_clip", "s_iv")}
        for i in range(n):
            k = 0 if errors[i] else len(batch["seg_masks_rle"][i])
            rng = _rng(str(batch["image_id"][i]), self.spec.seed + 3)
            cols["seg_class"].append(rng.integers(0, self.n_classes, k).astype(np.int64))
            cols["seg_score"].append(rng.uniform(0.3, 1.0, k).astype(np.float32))
            cols["s_ret"].append(rng.uniform(0, 1, k).astype(np.float32))
            cols["s_clip"].append(rng.uniform(0, 1, k).astype(np.float32))
            cols["s_iv"].append(np.full(k, np.nan, np.float32))
        out.update({c: object_column(v) for c, v in cols.items()})
