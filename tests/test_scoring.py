"""Retrieval votes, CLIP softmax, the ensemble (both forms) and fallback pooling, on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ragseg.scoring import (
    clip_scores,
    ensemble,
    in_train_mask,
    iv_scores_over_vocab,
    merge_retrieval,
    retrieval_scores,
)
from ragseg.vocab import Vocab

E1, E2 = math.exp(-1), math.exp(-2)


@pytest.fixture
def vocab():
    return Vocab.from_names(["cat", "dog", "tree"], isthing=[True, True, False], synonyms={"cat": ["kitty"]})


def test_retrieval_weights_and_normalisation(vocab):
    sims = np.array([[0.9, 0.8, 0.7]])
    labels = np.array([["cat", "dog", "cat"]], dtype=object)
    s, support = retrieval_scores(sims, labels, vocab, temperature=0.1)
    # w = exp((sim - 0.9) / 0.1) = 1, e^-1, e^-2
    z = 1 + E1 + E2
    np.testing.assert_allclose(s[0], [(1 + E2) / z, E1 / z, 0.0], rtol=1e-6)
    assert support.tolist() == [True]
    assert s.dtype == np.float32 and s.shape == (1, 3)


def test_retrieval_ignores_unknown_and_missing_and_maps_synonyms_plurals(vocab):
    sims = np.array([
        [0.99, 0.9, 0.8, -np.inf],          # zebra is no class; last neighbour missing
        [0.5, 0.5, 0.4, 0.3],               # synonyms and plurals
        [0.9, -np.inf, 0.1, 0.2],           # no usable neighbour
    ])
    labels = np.array([
        ["zebra", "Cats", "dog", ""],
        ["kitty", "Trees", "dogs", "zebras"],
        ["zebra", "", "giraffe", "lion"],
    ], dtype=object)
    s, support = retrieval_scores(sims, labels, vocab, temperature=0.1)
    z0 = 1 + E1  # weights relative to the best usable neighbour (0.9), zebra at 0.99 ignored
    np.testing.assert_allclose(s[0], [1 / z0, E1 / z0, 0], rtol=1e-6)
    z1 = 1 + 1 + E1
    np.testing.assert_allclose(s[1], [1 / z1, E1 / z1, 1 / z1], rtol=1e-6)
    np.testing.assert_array_equal(s[2], [0, 0, 0])
    assert support.tolist() == [True, True, False]


def test_retrieval_temperature_effect(vocab):
    sims = np.array([[0.9, 0.8]])
    labels = np.array([["cat", "dog"]], dtype=object)
    sharp, _ = retrieval_scores(sims, labels, vocab, temperature=0.01)
    soft, _ = retrieval_scores(sims, labels, vocab, temperature=10.0)
    assert sharp[0, 0] > 0.9999
    np.testing.assert_allclose(soft[0, :2], [1 / (1 + math.exp(-0.01)), math.exp(-0.01) / (1 + math.exp(-0.01))],
                               rtol=1e-6)
    # large similarities do not overflow
    big, _ = retrieval_scores(np.array([[1.0, 0.99]]), labels, vocab, temperature=1e-4)
    assert np.isfinite(big).all() and big[0, 0] == pytest.approx(1.0)


def test_clip_scores_softmax():
    text = np.array([[1.0, 0.0], [0.0, 1.0]])
    s = clip_scores(np.array([[2.0, 0.0]]), text, temperature=1.0)  # query is normalised first
    np.testing.assert_allclose(s[0], [math.e / (math.e + 1), 1 / (math.e + 1)], rtol=1e-6)
    s = clip_scores(np.array([[1.0, 0.0], [0.6, 0.8]]), text, temperature=0.5)
    np.testing.assert_allclose(s[0], [1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))], rtol=1e-6)
    # row 2: cosines 0.6, 0.8 -> logits 1.2, 1.6
    np.testing.assert_allclose(s[1], [1 / (1 + math.exp(0.4)), 1 / (1 + math.exp(-0.4))], rtol=1e-6)
    np.testing.assert_allclose(s.sum(axis=1), 1.0, rtol=1e-6)


S_RET = np.array([[0.6, 0.4, 0.0]])
S_CLIP = np.array([[0.2, 0.3, 0.5]])
S_IV = np.array([[0.7, 0.2, 0.1]])
IN_TRAIN = np.array([True, False, False])


def test_ensemble_arithmetic_seen_unseen():
    s = ensemble(S_RET, S_CLIP, S_IV, IN_TRAIN, alpha=0.4, beta=0.7, gamma=0.5)
    # s_oov = 0.5 * s_ret + 0.5 * s_clip = [0.4, 0.35, 0.25]
    # class 0 (trained): 0.4 * 0.4 + 0.6 * 0.7;  classes 1, 2 (unseen): 0.7 * s_oov + 0.3 * s_iv
    np.testing.assert_allclose(s[0], [0.58, 0.305, 0.205], rtol=1e-6)


def test_ensemble_geometric():
    s = ensemble(S_RET, S_CLIP, S_IV, IN_TRAIN, alpha=0.4, beta=0.7, gamma=0.5, form="geometric")
    expect = [0.7 ** 0.6 * 0.4 ** 0.4, 0.2 ** 0.3 * 0.35 ** 0.7, 0.1 ** 0.3 * 0.25 ** 0.7]
    np.testing.assert_allclose(s[0], expect, rtol=1e-6)


def test_ensemble_without_iv_and_without_support():
    s_ret = np.array([[0.6, 0.4, 0.0], [0.0, 0.0, 0.0]])
    s_clip = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    s = ensemble(s_ret, s_clip, None, IN_TRAIN, alpha=0.4, beta=0.7, gamma=0.3)
    np.testing.assert_allclose(s[0], 0.3 * s_ret[0] + 0.7 * s_clip[0], rtol=1e-6)
    np.testing.assert_allclose(s[1], s_clip[1], rtol=1e-6)  # no retrieval support: s_oov = s_clip
    # an explicit support mask overrides the sum rule
    s = ensemble(s_ret, s_clip, gamma=0.3, support=np.array([False, False]))
    np.testing.assert_allclose(s, s_clip, rtol=1e-6)
    # the same rule in both forms when s_iv is present
    iv = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
    for form in ("arithmetic", "geometric"):
        s = ensemble(s_ret, s_clip, iv, np.zeros(3, bool), beta=1.0, gamma=0.3, form=form)
        np.testing.assert_allclose(s[1], s_clip[1], rtol=1e-6)  # beta = 1: s = s_oov = s_clip


def test_ensemble_uncovered_iv_entries_use_oov():
    iv = np.array([[0.9, np.nan, np.nan]])
    s = ensemble(S_RET, S_CLIP, iv, IN_TRAIN, alpha=0.4, beta=0.7, gamma=0.5)
    np.testing.assert_allclose(s[0], [0.4 * 0.4 + 0.6 * 0.9, 0.35, 0.25], rtol=1e-6)


def test_ensemble_ablation_modes():
    np.testing.assert_allclose(ensemble(S_RET, S_CLIP, S_IV, IN_TRAIN, scores="retrieval"), S_RET)
    np.testing.assert_allclose(ensemble(S_RET, S_CLIP, S_IV, IN_TRAIN, scores="clip"), S_CLIP)
    with pytest.raises(ValueError):
        ensemble(S_RET, S_CLIP, form="harmonic")


def test_merge_retrieval_fallback_only_for_missing_classes():
    vocab = Vocab.from_names(["cat", "dog", "zebra"])
    primary = (np.array([[0.9, 0.5]]), np.array([["cat", "dog"]], dtype=object))
    fallback = (np.array([[0.95, 0.8]]), np.array([["cat", "zebras"]], dtype=object))
    sims, labels = merge_retrieval(primary, fallback, vocab, {"cat", "dog", "horse"})
    assert sims.shape == (1, 4)
    assert labels.tolist() == [["cat", "dog", "", "zebras"]]
    assert np.isneginf(sims[0, 2]) and sims[0, 3] == pytest.approx(0.8)
    s, _ = retrieval_scores(sims, labels, vocab, temperature=0.1)
    w = np.array([1.0, math.exp(-4), math.exp(-1)])
    np.testing.assert_allclose(s[0], w / w.sum(), rtol=1e-5)
    # no fallback: primary unchanged
    sims2, labels2 = merge_retrieval(primary, None, vocab, {"cat"})
    assert sims2.shape == (1, 2) and labels2.tolist() == [["cat", "dog"]]


def test_iv_scores_over_vocab_and_in_train():
    vocab = Vocab.from_names(["cat", "dog", "zebra"])
    logits = np.array([[0.0, math.log(3.0)]])
    s = iv_scores_over_vocab(logits, vocab, ["dogs", "cat"])
    np.testing.assert_allclose(s[0, :2], [0.75, 0.25])
    assert np.isnan(s[0, 2])
    full = iv_scores_over_vocab(np.zeros((2, 3)), vocab, [])
    np.testing.assert_allclose(full, 1 / 3)
    with pytest.raises(ValueError):
        iv_scores_over_vocab(np.zeros((1, 5)), vocab, ["cat"])
    assert in_train_mask(vocab, ["Cats", "horse"]).tolist() == [True, False, False]
