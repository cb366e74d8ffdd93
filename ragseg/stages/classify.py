"""Classify stage: retrieval + CLIP (+ optional in-vocabulary) scores of each mask proposal.

The math is in :mod:`ragseg.scoring`; this class only loads the index and the text embeddings once per
worker and maps a Ray Data batch. Per image it reads ``embeddings`` ((n, d) float16), and optionally
``seg_iv_logits`` ((n, C) over the vocabulary or (n, len(ensemble.trained_classes))), and writes:

- ``seg_class`` (n,) int64: vocabulary index of the best class (-1 when no class has a positive
  score, e.g. ``scores="retrieval"`` on a proposal without usable neighbours),
- ``seg_score`` (n,) float32: its final score,
- ``s_ret``, ``s_clip``, ``s_iv`` (n,) float32: each source's score of the chosen class (NaN when that
  source was not computed / is absent; ``s_ret`` is 0 on a proposal without retrieval support).

Fallback (METHOD.md stage 6): when ``fallback_index_uri`` is given and some vocabulary classes have no
entry in the primary index, the fallback index is searched too and its neighbours for those classes
only are pooled with the primary neighbours (:func:`ragseg.scoring.merge_retrieval`).
"""

from __future__ import annotations

import logging

import numpy as np

from ragseg.config import EnsembleConfig, JobConfig
from ragseg.errors import UserError
from ragseg.scoring import (
    clip_scores,
    ensemble,
    in_train_mask,
    iv_scores_over_vocab,
    merge_retrieval,
    missing_classes_mask,
    retrieval_scores,
)
from ragseg.vocab import Vocab

log = logging.getLogger(__name__)

STAGE = "classify"
OUT_COLUMNS = ("seg_class", "seg_score", "s_ret", "s_clip", "s_iv")


def final_scores(s_ret: np.ndarray, support: np.ndarray, s_clip: np.ndarray, s_iv: np.ndarray | None,
                 in_train: np.ndarray, ens: EnsembleConfig) -> np.ndarray:
    """The (n, C) final class scores of one image's proposals with the ``label.ensemble`` settings
    (:func:`ragseg.scoring.ensemble`); non-finite entries become 0. Pure: the label job and the
    experiments' re-scoring (ragseg.experiments) both call it."""
    final = ensemble(s_ret, s_clip, s_iv, in_train, ens.alpha, ens.beta, ens.gamma, ens.form,
                     support=support, scores=ens.scores)
    return np.where(np.isfinite(final), final, 0.0)


def choose_classes(final: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, C) final scores -> ``(seg_class (n,) int64, seg_score (n,) float32, best (n,))``: the argmax
    class, -1 where its score is not positive (then the score is 0). Pure, shared with ragseg.experiments."""
    n = final.shape[0]
    best = final.argmax(axis=1) if n else np.zeros(0, np.int64)
    score = final[np.arange(n), best].astype(np.float32)
    cls = np.where(score > 0, best, -1).astype(np.int64)
    return cls, np.where(cls >= 0, score, 0.0).astype(np.float32), best


def _empty_outputs() -> dict[str, np.ndarray]:
    return {"seg_class": np.zeros(0, np.int64), **{k: np.zeros(0, np.float32) for k in OUT_COLUMNS[1:]}}


class Retriever:
    """The primary index (and the fallback index for the classes the primary one lacks) of a label run,
    loaded once per worker: :meth:`search` gives the k nearest neighbours' (sims, labels) and
    :meth:`scores` the retrieval distribution over the vocabulary (:func:`ragseg.scoring.retrieval_scores`).
    ``index`` / ``fallback_index`` can be injected: any object with ``search(q, k)``, ``labels_vocab`` and
    ``meta`` works."""

    def __init__(self, cfg: JobConfig, vocab: Vocab, index_uri: str | None = None,
                 fallback_index_uri: str | None = None, *, index=None, fallback_index=None):
        self.vocab = vocab
        self.k = cfg.label.ensemble.k
        self.temperature = cfg.label.ensemble.retrieval_temperature
        self.index = index
        if self.index is None:
            if not index_uri:
                raise UserError("retrieval needs an index (label.index) unless label.ensemble.scores=clip")
            from ragseg.index.store import Index

            self.index = Index.open(index_uri)
        self.fallback = None
        self.missing = missing_classes_mask(vocab, set(self.index.labels_vocab)).astype(bool)
        if self.missing.any():
            names = [vocab.names[i] for i in np.flatnonzero(self.missing)]
            if fallback_index is not None or fallback_index_uri:
                self.fallback = fallback_index
                if self.fallback is None:
                    from ragseg.index.store import Index

                    self.fallback = Index.open(fallback_index_uri)
                log.info("classify: %d classes not in the primary index use the fallback: %s",
                         len(names), names[:20])
            else:
                log.warning("classify: %d vocabulary classes have no entry in the index and no fallback "
                            "index is set; retrieval cannot vote for them: %s", len(names), names[:20])

    def dims(self) -> set[int]:
        return {int(i.meta["dim"]) for i in (self.index, self.fallback)
                if i is not None and i.meta.get("dim") is not None}

    def search(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) float32 queries -> (sims (n, k'), labels (n, k')), fallback neighbours pooled in."""
        sims, labels, *_ = self.index.search(q, self.k)
        if self.fallback is not None:
            f_sims, f_labels, *_ = self.fallback.search(q, self.k)
            sims, labels = merge_retrieval((sims, labels), (f_sims, f_labels), self.vocab,
                                           set(self.index.labels_vocab))
        return np.asarray(sims, np.float32), np.asarray(labels, dtype=object)

    def scores(self, q: np.ndarray, hits: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(s_ret (n, C) float32, support (n,) bool) of (n, d) queries (``hits``: already searched)."""
        sims, labels = hits if hits is not None else self.search(np.asarray(q, np.float32))
        return retrieval_scores(sims, labels, self.vocab, self.temperature)


class Classify:
    """Ray Data callable; see the module docstring. ``index`` / ``fallback_index`` / ``text_emb`` can be
    injected (tests, or a caller that already holds them), see :class:`Retriever`."""

    def __init__(self, cfg: JobConfig, vocab: Vocab, index_uri: str | None = None,
                 fallback_index_uri: str | None = None, *, index=None, fallback_index=None,
                 text_emb: np.ndarray | None = None):
        self.cfg = cfg
        self.ens = cfg.label.ensemble
        self.vocab = vocab
        need_ret = self.ens.scores != "clip"
        need_clip = self.ens.scores != "retrieval"

        self.retriever = None
        if need_ret or index is not None:
            self.retriever = Retriever(cfg, vocab, index_uri, fallback_index_uri, index=index,
                                       fallback_index=fallback_index)
        self.text_emb = None
        if need_clip:
            if text_emb is None:
                from ragseg.models.clip import TextEmbedder

                text_emb = TextEmbedder(cfg.models).encode(list(vocab.names))
            self.text_emb = np.asarray(text_emb, dtype=np.float32)
            if self.text_emb.shape[0] != len(vocab):
                raise UserError(f"text embeddings have {self.text_emb.shape[0]} rows for {len(vocab)} classes")
        self.dim = self._expected_dim()
        self.in_train = in_train_mask(vocab, self.ens.trained_classes)
        unknown = [c for c in self.ens.trained_classes if vocab.index_of(c) is None]
        if unknown:
            log.info("classify: trained classes not in the vocabulary (ignored): %s", unknown[:20])

    def _expected_dim(self) -> int | None:
        dims = self.retriever.dims() if self.retriever is not None else set()
        if self.text_emb is not None:
            dims.add(int(self.text_emb.shape[1]))
        if len(dims) > 1:
            raise UserError(f"classify: index and text embedding dimensions differ: {sorted(dims)}")
        return dims.pop() if dims else None

    # ------------------------------------------------------------------------------------------
    def score(self, q: np.ndarray, iv_logits: np.ndarray | None = None,
              hits: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """All scores of one image's (n, d) queries -> the per-proposal output columns. ``hits``:
        the queries' neighbours (sims, labels) when already searched (a batch searches once)."""
        n = q.shape[0]
        C = len(self.vocab)
        if n == 0:
            return _empty_outputs()
        if self.retriever is not None:
            s_ret, support = self.retriever.scores(q, hits)
        else:
            s_ret, support = np.zeros((n, C), np.float32), np.zeros(n, bool)
        if self.text_emb is not None:
            s_clip = clip_scores(q, self.text_emb, self.ens.clip_temperature)
        else:
            s_clip = np.zeros((n, C), np.float32)
        s_iv = None
        if iv_logits is not None and self.ens.scores == "ensemble":
            s_iv = iv_scores_over_vocab(iv_logits, self.vocab, self.ens.trained_classes)
            if s_iv.shape[0] != n:
                raise ValueError(f"seg_iv_logits has {s_iv.shape[0]} rows for {n} proposals")
        final = final_scores(s_ret, support, s_clip, s_iv, self.in_train, self.ens)
        cls, seg_score, best = choose_classes(final)
        rows = np.arange(n)

        def pick(s: np.ndarray | None, computed: bool) -> np.ndarray:
            if s is None or not computed:
                return np.full(n, np.nan, np.float32)
            return np.where(cls >= 0, s[rows, best], np.nan).astype(np.float32)

        return {"seg_class": cls, "seg_score": seg_score,
                "s_ret": pick(s_ret, self.retriever is not None),
                "s_clip": pick(s_clip, self.text_emb is not None),
                "s_iv": pick(s_iv, s_iv is not None)}

    def _query(self, batch: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Row ``i``'s checked (n, d) queries and optional in-vocabulary logits."""
        q = np.asarray(batch["embeddings"][i], dtype=np.float32)
        if q.ndim == 1 and q.size == 0:
            q = q.reshape(0, self.dim or 0)
        if q.ndim != 2:
            raise ValueError(f"embeddings must be (n, d), got shape {q.shape}")
        if q.shape[0] and self.dim is not None and q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index/text dim is {self.dim}")
        if "seg_masks_rle" in batch and len(batch["seg_masks_rle"][i]) != q.shape[0]:
            raise ValueError(f"{len(batch['seg_masks_rle'][i])} masks but {q.shape[0]} embeddings")
        iv_col = batch.get("seg_iv_logits")
        iv = None
        if iv_col is not None and iv_col[i] is not None and np.size(iv_col[i]) > 0:
            iv = np.asarray(iv_col[i], dtype=np.float32)
        return q, iv

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ragseg.stages.batch import map_rows, object_column

        outs, errors = map_rows(batch, STAGE, lambda i: self._query(batch, i), self.score_rows, _empty_outputs, log)
        result = dict(batch)
        result.update({k: object_column([o[k] for o in outs]) for k in OUT_COLUMNS})
        result["error"] = np.array(errors, dtype=object)
        return result

    def score_rows(self, queries: list[tuple[np.ndarray, np.ndarray | None]]) -> list[dict[str, np.ndarray]]:
        """Each row's (queries, in-vocabulary logits) -> its output columns; one index search for every
        query of the rows, then split per image."""
        hits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        rows = [r for r, (q, _) in enumerate(queries) if q.shape[0]]
        if self.retriever is not None and rows:
            sims, labels = self.retriever.search(np.concatenate([queries[r][0] for r in rows]))
            start = 0
            for r in rows:
                stop = start + queries[r][0].shape[0]
                hits[r] = (sims[start:stop], labels[start:stop])
                start = stop
        return [self.score(q, iv, hits=hits.get(r)) for r, (q, iv) in enumerate(queries)]
