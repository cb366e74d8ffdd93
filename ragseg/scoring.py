"""Classification scores of mask proposals (METHOD.md, stages 4 and 6). Pure numpy, no Ray, no models.

Notation: n proposals, C vocabulary classes, k neighbours per proposal.

Retrieval score (:func:`retrieval_scores`), for proposal q with neighbours j = 1..k, similarity
``sim_j`` (inner product of L2-normalised masked-CLIP features) and label ``y_j``::

    usable_j = (y_j maps to a vocabulary class c_j) and (sim_j is finite)
    w_j      = exp((sim_j - max_{usable} sim) / T)               (T = retrieval temperature)
    s_ret[c] = sum_{usable j: c_j = c} w_j  /  sum_{usable j} w_j

Subtracting the row maximum only avoids overflow: it cancels in the ratio. A row with no usable
neighbour gets ``s_ret = 0`` for every class and ``support = False``.

CLIP score (:func:`clip_scores`): ``s_clip = softmax_c(cos(query, text_c) / T_clip)``.

Ensemble (:func:`ensemble`), with ``in_train[c]`` = class c is one the in-vocabulary classifier was
trained on::

    s_oov = gamma * s_ret + (1 - gamma) * s_clip      on rows with retrieval support
    s_oov = s_clip                                    on rows without (no usable neighbour)
    a_c   = alpha if in_train[c] else beta
    arithmetic (paper):  s = a_c * s_oov + (1 - a_c) * s_iv
    geometric (FC-CLIP): s = s_iv ** (1 - a_c) * s_oov ** a_c
    no s_iv (None), or s_iv NaN for an entry (classifier does not cover that class):  s = s_oov

Fallback retrieval (:func:`merge_retrieval`): neighbours from the primary DB and from the fallback DB
are pooled into one neighbour list; a fallback neighbour counts only when its label maps to a class
that has no entry at all in the primary DB, so the fallback never outvotes the primary DB on the
classes the primary DB covers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from ragseg.vocab import Vocab


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (float64 inside, float32 out)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.astype(np.float32)
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(np.float32)


def retrieval_scores(
    sims: np.ndarray,
    neighbour_labels: np.ndarray,
    vocab: Vocab,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted class votes of the k neighbours, normalised over the vocabulary.

    ``sims`` (n, k) float, ``neighbour_labels`` (n, k) str (``""`` for a missing neighbour).
    Returns ``(s_ret (n, C) float32, support (n,) bool)``; see the module docstring for the formula.
    """
    if temperature <= 0:
        raise ValueError(f"retrieval temperature must be > 0, got {temperature}")
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(neighbour_labels, dtype=object)
    if sims.ndim != 2 or labels.shape != sims.shape:
        raise ValueError(f"sims {sims.shape} and labels {labels.shape} must both be (n, k)")
    n, _ = sims.shape
    C = len(vocab)
    cls = vocab.indices_of(labels) if labels.size else np.full(sims.shape, -1, np.int64)
    usable = (cls >= 0) & np.isfinite(sims)
    support = usable.any(axis=1)
    out = np.zeros((n, C), dtype=np.float64)
    if not support.any():
        return out.astype(np.float32), support
    masked = np.where(usable, sims, -np.inf)
    row_max = np.where(support, masked.max(axis=1), 0.0)
    w = np.where(usable, np.exp((np.where(usable, sims, 0.0) - row_max[:, None]) / temperature), 0.0)
    rows = np.repeat(np.arange(n), sims.shape[1]).reshape(sims.shape)
    np.add.at(out, (rows[usable], cls[usable]), w[usable])
    total = out.sum(axis=1, keepdims=True)
    out = np.divide(out, total, out=np.zeros_like(out), where=total > 0)
    return out.astype(np.float32), support


def clip_scores(query_emb: np.ndarray, text_emb: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax_c(cos(query_i, text_c) / T)``: (n, d) x (C, d) -> (n, C). Inputs need not be normalised."""
    if temperature <= 0:
        raise ValueError(f"clip temperature must be > 0, got {temperature}")
    q = np.asarray(query_emb, dtype=np.float32)
    t = np.asarray(text_emb, dtype=np.float32)
    if q.ndim != 2 or t.ndim != 2 or q.shape[1] != t.shape[1]:
        raise ValueError(f"query {q.shape} and text {t.shape} embeddings must be (n, d) and (C, d)")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    return softmax((q @ t.T) / temperature, axis=1)


def ensemble(
    s_ret: np.ndarray,
    s_clip: np.ndarray,
    s_iv: np.ndarray | None = None,
    in_train: np.ndarray | None = None,
    alpha: float = 0.4,
    beta: float = 0.7,
    gamma: float = 0.3,
    form: Literal["arithmetic", "geometric"] = "arithmetic",
    support: np.ndarray | None = None,
    scores: Literal["ensemble", "retrieval", "clip"] = "ensemble",
) -> np.ndarray:
    """Final (n, C) class scores; formula in the module docstring.

    ``support`` (n,) marks rows whose ``s_ret`` came from at least one usable neighbour (default:
    rows where ``s_ret`` sums to > 0). ``in_train`` (C,) bool (default: all False, i.e. every class
    uses ``beta``). ``scores="retrieval"`` returns ``s_ret`` and ``scores="clip"`` returns ``s_clip``
    unchanged (ablations: no s_iv, no fallback); the paper's "no retrieval" baseline is ``gamma=0``.
    """
    s_ret = np.asarray(s_ret, dtype=np.float64)
    s_clip = np.asarray(s_clip, dtype=np.float64)
    if s_ret.shape != s_clip.shape or s_ret.ndim != 2:
        raise ValueError(f"s_ret {s_ret.shape} and s_clip {s_clip.shape} must be the same (n, C)")
    if scores == "retrieval":
        return s_ret.astype(np.float32)
    if scores == "clip":
        return s_clip.astype(np.float32)
    if scores != "ensemble":
        raise ValueError(f"unknown scores mode {scores!r}")
    if form not in ("arithmetic", "geometric"):
        raise ValueError(f"unknown ensemble form {form!r}")
    n, C = s_ret.shape
    if support is None:
        support = s_ret.sum(axis=1) > 0
    support = np.asarray(support, dtype=bool).reshape(n)
    s_oov = np.where(support[:, None], gamma * s_ret + (1.0 - gamma) * s_clip, s_clip)
    if s_iv is None:
        return s_oov.astype(np.float32)
    s_iv = np.asarray(s_iv, dtype=np.float64)
    if s_iv.shape != (n, C):
        raise ValueError(f"s_iv {s_iv.shape} must be (n, C) = {(n, C)}")
    in_train = np.zeros(C, bool) if in_train is None else np.asarray(in_train, dtype=bool).reshape(C)
    a = np.where(in_train, alpha, beta)[None, :]
    covered = np.isfinite(s_iv)
    iv = np.where(covered, s_iv, 0.0)
    if form == "arithmetic":
        s = a * s_oov + (1.0 - a) * iv
    else:
        s = np.power(np.clip(iv, 0.0, None), 1.0 - a) * np.power(np.clip(s_oov, 0.0, None), a)
    return np.where(covered, s, s_oov).astype(np.float32)


def merge_retrieval(
    primary: tuple[np.ndarray, np.ndarray],
    fallback: tuple[np.ndarray, np.ndarray] | None,
    vocab: Vocab,
    primary_classes: set[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Pool primary and fallback neighbours: ``(sims, labels)`` of shape (n, k1 + k2).

    ``primary_classes`` is the set of labels present in the primary DB (``Index.labels_vocab``).
    A fallback neighbour is kept only when its label maps to a vocabulary class that no primary
    label maps to; the others become missing (label ``""``, sim ``-inf``). Fed to
    :func:`retrieval_scores`, the votes of kept fallback neighbours then compete with the primary
    neighbours' votes in one similarity-weighted distribution.
    """
    p_sims, p_labels = (np.asarray(primary[0], dtype=np.float32), np.asarray(primary[1], dtype=object))
    if fallback is None:
        return p_sims, p_labels
    f_sims, f_labels = (np.asarray(fallback[0], dtype=np.float32), np.asarray(fallback[1], dtype=object))
    if f_sims.shape[0] != p_sims.shape[0]:
        raise ValueError(f"primary ({p_sims.shape[0]}) and fallback ({f_sims.shape[0]}) row counts differ")
    missing = missing_classes_mask(vocab, primary_classes).astype(bool)
    cls = vocab.indices_of(f_labels)
    keep = (cls >= 0) & missing[np.clip(cls, 0, None)]
    f_sims = np.where(keep, f_sims, -np.inf).astype(np.float32)
    f_labels = np.where(keep, f_labels, "").astype(object)
    return np.concatenate([p_sims, f_sims], axis=1), np.concatenate([p_labels, f_labels], axis=1)


def missing_classes_mask(vocab: Vocab, present_labels: set[str]) -> np.ndarray:
    """(C,) uint8: 1 for vocabulary classes that none of ``present_labels`` maps to."""
    out = np.ones(len(vocab), dtype=np.uint8)
    for lab in present_labels:
        j = vocab.index_of(lab)
        if j is not None:
            out[j] = 0
    return out


def iv_scores_over_vocab(
    logits: np.ndarray, vocab: Vocab, trained_classes: list[str]
) -> np.ndarray:
    """In-vocabulary classifier logits -> (n, C) s_iv over the vocabulary.

    Width C: the logits are over the vocabulary already; ``s_iv = softmax(logits)``. Width
    ``len(trained_classes)``: softmax over the trained classes, then each column goes to the vocabulary
    class its name maps to; vocabulary classes no trained class maps to get NaN (not covered, so
    :func:`ensemble` uses s_oov there), and trained classes outside the vocabulary are dropped.
    """
    logits = np.asarray(logits, dtype=np.float64)
    C = len(vocab)
    if logits.ndim != 2:
        raise ValueError(f"iv logits must be (n, width), got {logits.shape}")
    n, width = logits.shape
    if width == C:
        return softmax(logits, axis=1)
    if trained_classes and width == len(trained_classes):
        p = softmax(logits, axis=1)
        out = np.zeros((n, C), dtype=np.float32)
        covered = np.zeros(C, dtype=bool)
        for col, name in enumerate(trained_classes):
            j = vocab.index_of(name)
            if j is not None:  # two trained names mapping to one class add up
                out[:, j] += p[:, col]
                covered[j] = True
        out[:, ~covered] = np.nan
        return out
    raise ValueError(
        f"iv logits have {width} columns: expected the vocabulary size {C} or "
        f"len(ensemble.trained_classes) = {len(trained_classes)}"
    )


def in_train_mask(vocab: Vocab, trained_classes: list[str]) -> np.ndarray:
    """(C,) bool: vocabulary classes named (through :meth:`Vocab.index_of`) in ``trained_classes``."""
    out = np.zeros(len(vocab), dtype=bool)
    for name in trained_classes:
        j = vocab.index_of(name)
        if j is not None:
            out[j] = True
    return out
