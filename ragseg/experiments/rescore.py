"""Re-scoring from the feature cache: the label job's classification, merge and PQ without any model.

Per image, exactly the calls the label job makes (so a re-scored PQ equals ``ragseg label`` +
``ragseg eval`` at the same settings; ``tests/test_experiments.py`` checks it):

1. neighbours: the cached ``k_max`` list cut to ``label.ensemble.k`` (a k-NN search returns the same
   first k either way); with a fallback database whose classes the primary lacks,
   :func:`ragseg.scoring.merge_retrieval`, as ``Classify._search``;
2. ``s_ret, support = scoring.retrieval_scores(...)``, ``s_clip = scoring.clip_scores(query, text,
   T_clip)``, ``s_iv = scoring.iv_scores_over_vocab(...)`` when the cache holds in-vocabulary logits;
3. ``stages.classify.final_scores`` (the ensemble) and ``stages.classify.choose_classes``;
4. ``stages.merge.merge_proposals`` (the panoptic merge) and ``eval.pq.pq_stats_image`` against the
   ground-truth PNG, summed with ``eval.pq.PQStat`` as ``ragseg eval`` does (predicted classes go to
   the ground truth's category ids by name, as ``ragseg eval`` maps a vocabulary numbered otherwise).

Steps 1-2 are memoised per (database layers, k, temperature), so a sweep point redoes only steps 3-4;
step 4 is memoised per image on the decision that decides the merge (the classes, the score order
and which scores pass ``merge.score_threshold``), so two sweep points that label an image alike
share its merge and PQ. Decoded masks and ground-truth maps are kept up to ``experiment.mask_cache_mb``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragseg import io
from ragseg.config import EnsembleConfig, MergeConfig
from ragseg.errors import UserError
from ragseg.eval.pq import PQStat, pq_stats_image, read_id_png
from ragseg.experiments.cache import FeatureSet, Neighbours
from ragseg.masks import decode_rle
from ragseg.scoring import (
    clip_scores,
    iv_scores_over_vocab,
    merge_retrieval,
    missing_classes_mask,
    retrieval_scores,
)
from ragseg.stages.classify import choose_classes, final_scores
from ragseg.stages.merge import merge_proposals

log = logging.getLogger(__name__)


def _norm(name: Any) -> str:
    return " ".join(str(name).lower().split())


@dataclass
class GroundTruth:
    """A COCO panoptic ground truth (JSON + PNG folder) paired with a feature cache's images."""

    categories: dict[int, dict]
    annotations: list[Mapping | None]  # per cached image: its gt annotation (None: no gt)
    png_uris: list[str | None]
    unmatched_gt: list[str]  # gt images the cache does not hold

    @classmethod
    def load(cls, gt_json: str, gt_dir: str, fs: FeatureSet) -> GroundTruth:
        gt = io.read_json(gt_json)
        cats = {int(c["id"]): dict(c) for c in gt.get("categories") or []}
        if not cats:
            raise UserError(f"ground-truth JSON {gt_json} has no categories")
        by_id = {str(a["image_id"]): a for a in gt.get("annotations", [])}
        by_png = {str(a.get("file_name", "")).rsplit("/", 1)[-1].rsplit(".", 1)[0]: a for a in by_id.values()}
        anns, pngs, used = [], [], set()
        for image_id, coco_id in zip(fs.images.column("image_id").to_pylist(), fs.images.column("coco_id").to_pylist()):
            key = str(json.loads(coco_id)) if coco_id else str(image_id)
            a = by_id.get(key) or by_png.get(io.safe_name(str(image_id)))
            anns.append(a)
            pngs.append(io.join(gt_dir, a["file_name"]) if a is not None else None)
            if a is not None:
                used.add(str(a["image_id"]))
        return cls(cats, anns, pngs, sorted(k for k in by_id if k not in used))


@dataclass(frozen=True)
class Retrieval:
    """The database layers one configuration retrieves from."""

    primary: Neighbours | None
    fallback: Neighbours | None = None

    @property
    def key(self) -> tuple:
        return (self.primary.key if self.primary else None, self.fallback.key if self.fallback else None)


class _Lru:
    def __init__(self, budget_bytes: int):
        self.budget, self.used, self.d = budget_bytes, 0, OrderedDict()

    def get(self, key, make):
        v = self.d.get(key)
        if v is not None:
            self.d.move_to_end(key)
            return v
        v = make()
        nb = int(getattr(v, "nbytes", 0))
        if nb <= self.budget:
            self.d[key] = v
            self.used += nb
            while self.used > self.budget and self.d:
                _, old = self.d.popitem(last=False)
                self.used -= int(getattr(old, "nbytes", 0))
        return v


class Rescorer:
    """Re-scores one cached evaluation set (see the module docstring)."""

    def __init__(self, fs: FeatureSet, gt: GroundTruth, vocab, text_emb: np.ndarray | None,
                 in_train: np.ndarray | None = None, trained_classes: list[str] | None = None,
                 mask_cache_mb: int = 1024):
        self.fs, self.gt, self.vocab = fs, gt, vocab
        self.text_emb = None if text_emb is None else np.asarray(text_emb, np.float32)
        self.C = len(vocab)
        self.in_train = np.zeros(self.C, bool) if in_train is None else np.asarray(in_train, bool)
        self.trained_classes = list(trained_classes or [])
        self.errors = fs.images.column("error").to_pylist()
        self.hw = list(zip(fs.images.column("height").to_pylist(), fs.images.column("width").to_pylist()))
        by_name = {_norm(c.get("name", "")): cid for cid, c in gt.categories.items()}
        self.cat_of_class = np.array([by_name.get(_norm(n), -1) for n in vocab.names], np.int64)
        self._clip: dict[tuple, list[np.ndarray]] = {}
        self._ret: dict[tuple, tuple[list, list]] = {}
        self._pq: dict[tuple, dict[int, PQStat]] = {}
        self._cache = _Lru(int(mask_cache_mb) * 1024 * 1024)
        self.merges = 0  # merges actually computed (the rest came from the memo)

    # ------------------------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return self.fs.n_images

    def _rows(self, i: int) -> slice:
        return self.fs.rows(i)

    def clip(self, temperature: float, queries: str = "masked") -> list[np.ndarray]:
        """Per image (n_i, C) ``s_clip`` (zeros without text embeddings)."""
        key = (float(temperature), queries)
        if key not in self._clip:
            q_all = self.fs.queries if queries == "masked" else self.fs.full
            if q_all is None:
                raise UserError("the feature cache has no box-crop features")
            out = []
            for i in range(self.n_images):
                q = np.asarray(q_all[self._rows(i)], np.float32)
                if self.text_emb is None or q.shape[0] == 0:
                    out.append(np.zeros((q.shape[0], self.C), np.float32))
                else:
                    out.append(clip_scores(q, self.text_emb, temperature))
            self._clip[key] = out
        return self._clip[key]

    def retrieval(self, ret: Retrieval, k: int, temperature: float) -> tuple[list, list]:
        """Per image ``(s_ret (n_i, C), support (n_i,))`` from the cached neighbours."""
        key = (ret.key, int(k), float(temperature))
        if key in self._ret:
            return self._ret[key]
        s_out, sup_out = [], []
        fallback = ret.fallback
        if ret.primary is not None and fallback is not None:
            if not missing_classes_mask(self.vocab, ret.primary.labels_vocab).any():
                fallback = None  # Classify opens the fallback only when the primary lacks a class
        for i in range(self.n_images):
            r = self._rows(i)
            n = r.stop - r.start
            if ret.primary is None or n == 0:
                s_out.append(np.zeros((n, self.C), np.float32))
                sup_out.append(np.zeros(n, bool))
                continue
            self._check_k(ret.primary, k)
            sims, labels = ret.primary.sims[r, :k], ret.primary.labels[r, :k]
            if fallback is not None:
                self._check_k(fallback, k)
                sims, labels = merge_retrieval((sims, labels), (fallback.sims[r, :k], fallback.labels[r, :k]),
                                               self.vocab, set(ret.primary.labels_vocab))
            s, sup = retrieval_scores(np.asarray(sims, np.float32), np.asarray(labels, dtype=object), self.vocab,
                                      temperature)
            s_out.append(s)
            sup_out.append(sup)
        self._ret[key] = (s_out, sup_out)
        return self._ret[key]

    @staticmethod
    def _check_k(nb: Neighbours, k: int) -> None:
        if nb.sims.shape[1] < k:
            raise UserError(f"the neighbour cache holds {nb.sims.shape[1]} neighbours per query, k={k} asked "
                            "(raise experiment.k_max)")

    def iv(self, i: int) -> np.ndarray | None:
        if self.fs.iv_logits is None:
            return None
        r = self._rows(i)
        rows = self.fs.iv_logits[r]
        if r.stop == r.start or any(v is None for v in rows):
            return None
        return iv_scores_over_vocab(np.asarray(rows, np.float32), self.vocab, self.trained_classes)

    # ------------------------------------------------------------------------------------------
    def decide(self, ens: EnsembleConfig, ret: Retrieval, queries: str = "masked") -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image ``(seg_class, seg_score)`` as the label job's Classify stage gives them."""
        use_ret = ens.scores != "clip" and ret.primary is not None
        if ens.scores != "clip" and ret.primary is None:
            raise UserError("retrieval scores need a database (label.index)")
        s_ret, sup = self.retrieval(ret, ens.k, ens.retrieval_temperature) if use_ret else (None, None)
        s_clip = self.clip(ens.clip_temperature, queries) if ens.scores != "retrieval" else None
        out = []
        for i in range(self.n_images):
            r = self._rows(i)
            n = r.stop - r.start
            if n == 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.float32)))
                continue
            sr = s_ret[i] if s_ret is not None else np.zeros((n, self.C), np.float32)
            sp = sup[i] if sup is not None else np.zeros(n, bool)
            sc = s_clip[i] if s_clip is not None else np.zeros((n, self.C), np.float32)
            s_iv = self.iv(i) if ens.scores == "ensemble" else None
            cls, score, _ = choose_classes(final_scores(sr, sp, sc, s_iv, self.in_train, ens))
            out.append((cls, score))
        return out

    # ------------------------------------------------------------------------------------------
    def _masks(self, i: int) -> np.ndarray:
        r = self._rows(i)
        h, w = self.hw[i]

        def make():
            out = np.zeros((r.stop - r.start, h, w), bool)
            for j, rle in enumerate(self.fs.rles[r]):
                out[j] = decode_rle(rle)
            return out

        return self._cache.get(("m", i), make)

    def _gt_ids(self, i: int) -> np.ndarray:
        def make():
            ids = read_id_png(self.gt.png_uris[i])
            return ids.astype(np.uint16) if ids.max(initial=0) < 65536 else ids

        return self._cache.get(("g", i), make)

    def image_stat(self, i: int, cls: np.ndarray, score: np.ndarray, merge: MergeConfig) -> PQStat:
        ann = self.gt.annotations[i]
        if ann is None:
            return PQStat()
        mkey = (merge.score_threshold, merge.overlap_threshold, merge.min_area)
        memo = self._pq.setdefault(mkey, {})
        key = (i, cls.tobytes(), np.argsort(-score.astype(np.float64), kind="stable").tobytes(),
               (score < merge.score_threshold).tobytes())
        hit = memo.get(key)
        if hit is not None:
            return hit
        gt_ids = self._gt_ids(i)
        if self.errors[i] or len(cls) == 0:
            id_map, segments = np.zeros(gt_ids.shape, np.int32), []
        else:
            id_map, segments = merge_proposals(self._masks(i), cls, score, self.vocab.isthing, merge,
                                               tuple(self.hw[i]))
        pred = []
        for s in segments:
            cid = int(self.cat_of_class[s["class_idx"]])
            if cid < 0:
                raise UserError(f"class {self.vocab.names[s['class_idx']]!r} of the vocabulary is not a "
                                "ground-truth category (ragseg eval refuses it too)")
            pred.append({"id": s["id"], "category_id": cid})
        stat = pq_stats_image(gt_ids, ann["segments_info"], id_map, pred, self.gt.categories,
                              image_id=ann["image_id"])
        self.merges += 1
        memo[key] = stat
        return stat

    def pq(self, decisions: list[tuple[np.ndarray, np.ndarray]], merge: MergeConfig) -> dict:
        """PQ / SQ / RQ (All, Things, Stuff, per class) as ``ragseg.eval.pq.evaluate`` reports them."""
        total = PQStat()
        for i, (cls, score) in enumerate(decisions):
            total += self.image_stat(i, cls, score, merge)
        return pq_result(total, self.gt.categories)

    def evaluate(self, ens: EnsembleConfig, ret: Retrieval, merge: MergeConfig, queries: str = "masked") -> dict:
        return self.pq(self.decide(ens, ret, queries), merge)


def pq_result(total: PQStat, categories: dict[int, dict]) -> dict:
    per_class = []
    for cid in sorted(categories):
        info = categories[cid]
        per_class.append({"id": cid, "name": str(info.get("name", cid)), "isthing": bool(info.get("isthing", 0)),
                          **total.class_metrics(cid)})
    return {"All": total.average(categories, None), "Things": total.average(categories, True),
            "Stuff": total.average(categories, False), "per_class": per_class}


def class_subset_pq(result: dict, names: set[str]) -> dict:
    """Mean PQ / SQ / RQ over the classes of ``names`` that occur (``n``: how many)."""
    rows = [c for c in result["per_class"] if _norm(c["name"]) in {_norm(n) for n in names} and c["present"]]
    if not rows:
        return {"pq": None, "sq": None, "rq": None, "n": 0}
    return {k: float(np.mean([c[k] for c in rows])) for k in ("pq", "sq", "rq")} | {"n": len(rows)}
