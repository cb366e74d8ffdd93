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
