"""Index quality metrics: what an approximate search loses against exact search. Pure numpy.

The queries are database vectors; each query's own id is removed from both neighbour lists first
(self-match excluded), as are missing neighbours (id -1). With ``a`` the approximate list and ``e``
the exact list after that, per query:

* ``one_recall_at_1``  = [a[0] == e[0]]            (the true nearest neighbour is the top hit)
* ``one_recall_at_10`` = [e[0] in a[:10]]          (FAISS's "R@10" as quoted for SIFT1M: easier)
* ``ten_recall_at_10`` = |a[:10] & e[:10]| / |e[:10]|  (overlap of the two top-10 lists)
* ``vote_agreement``   = [argmax_c s_ret(a[:k]) == argmax_c s_ret(e[:k])] where ``s_ret`` is
  :func:`ragseg.scoring.retrieval_scores` with the label job's ``k`` and retrieval temperature, the
  approximate list scored with the similarities the index returns and the exact one with the exact
  similarities; the classes are the distinct labels of the database (:func:`label_vocab`). Two
  rows without any usable neighbour agree; one with and one without disagree.

Each metric is the mean over the queries that have at least one exact neighbour.
"""

from __future__ import annotations

import numpy as np

from ragseg.scoring import retrieval_scores
from ragseg.vocab import Vocab, normalize_label

RECALL_K = 10


def drop_self(sims: np.ndarray, ids: np.ndarray, qids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own id (``qids``) and missing entries (id < 0), keep the first ``k``
    (order preserved); rows with fewer left are padded with id -1 and similarity -inf."""
    sims = np.asarray(sims, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    keep = (ids >= 0) & (ids != np.asarray(qids, dtype=np.int64)[:, None])
    # stable move of kept entries to the front: sort by "not kept", then by position
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)
    out_ids = np.where(kept, np.take_along_axis(ids, order, axis=1), -1)
    out_sims = np.where(kept, np.take_along_axis(sims, order, axis=1), -np.inf).astype(np.float32)
    if out_ids.shape[1] < k:
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_sims = np.pad(out_sims, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_sims, out_ids


def recall_metrics(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = RECALL_K) -> dict:
    """1-recall@1, 1-recall@k and k-recall@k of self-free, -1-padded neighbour lists (module doc)."""
    r11, r1k, rkk = [], [], []
    for a, e in zip(np.asarray(approx_ids), np.asarray(exact_ids)):
        a = [int(i) for i in a[:k] if i >= 0]
        e = [int(i) for i in e[:k] if i >= 0]
        if not e:
            continue
        r11.append(float(bool(a) and a[0] == e[0]))
        r1k.append(float(e[0] in a))
        rkk.append(len(set(a) & set(e)) / len(e))

    def mean(v):
        return float(np.mean(v)) if v else 1.0

    return {"one_recall_at_1": mean(r11), "one_recall_at_10": mean(r1k), "ten_recall_at_10": mean(rkk),
            "queries": len(rkk), "k": k}


def label_vocab(labels: np.ndarray) -> Vocab | None:
    """One class per distinct (normalised) non-empty database label; None when there is none."""
    names: dict[str, str] = {}
    for lab in np.unique(np.asarray(labels, dtype=object).astype(str)):
        key = normalize_label(lab)
        if key and key not in names:
            names[key] = lab
    if not names:
        return None
    n = len(names)
    return Vocab(list(names.values()), np.zeros(n, bool), list(range(1, n + 1)), source="<index labels>")


def vote_agreement(approx: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray],
                   labels: np.ndarray, vocab: Vocab | None, temperature: float) -> float:
    """Share of rows whose retrieval-score argmax over ``approx`` = (sims, ids) equals that over
    ``exact`` (both self-free, -1-padded, already cut to the vote's k). ``labels[ids]`` (any object
    supporting integer-array indexing) gives the labels of database ids ``ids``."""
    a_sims, a_ids = approx
    e_sims, e_ids = exact
    n = len(a_ids)
    if n == 0:
        return 1.0
    if vocab is None:  # no labels at all: every vote is empty on both sides
        return 1.0
    def argmax(sims, ids):
        lab = np.where(ids < 0, "", np.asarray(labels[np.where(ids < 0, 0, ids)], dtype=object))
        s, support = retrieval_scores(np.where(ids < 0, -np.inf, sims), lab, vocab, temperature)
        return np.where(support, np.argmax(s, axis=1), -1)

    return float(np.mean(argmax(a_sims, a_ids) == argmax(e_sims, e_ids)))


def evaluate(approx: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray], qids: np.ndarray,
             labels: np.ndarray, vote_k: int, temperature: float, vocab: Vocab | None = None) -> dict:
    """All metrics of the module doc. ``approx`` / ``exact`` = (sims, ids) as searched (self
    included, at least ``max(10, vote_k) + 1`` columns for exact), ``qids`` the queries' own ids."""
    kk = max(RECALL_K, vote_k)
    a_sims, a_ids = drop_self(*approx, qids, kk)
    e_sims, e_ids = drop_self(*exact, qids, kk)
    out = recall_metrics(a_ids, e_ids, RECALL_K)
    if vocab is None:
        vocab = label_vocab(labels)
    out["vote_agreement"] = vote_agreement((a_sims[:, :vote_k], a_ids[:, :vote_k]),
                                           (e_sims[:, :vote_k], e_ids[:, :vote_k]), labels, vocab, temperature)
    out["vote_k"] = int(vote_k)
    out["vote_temperature"] = float(temperature)
    out["exclude_self"] = True
    return out
