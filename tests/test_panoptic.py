"""Panoptic merge rules, the PanopticMerge stage and the Classify stage's composition."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragseg.config import JobConfig
from ragseg.masks import decode_rle, encode_rle, rgb_to_id
from ragseg.panoptic import panoptic_merge, to_png_rgb
from ragseg.vocab import Vocab

H, W = 6, 8
ISTHING = np.array([True, True, False])  # 0 cat, 1 dog, 2 sky


def box(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_paint_order_and_overlap_drop():
    a = box(0, 4, 0, 4)       # 16 px, score 0.6
    b = box(0, 4, 2, 6)       # 16 px, score 0.9, painted first; a keeps 8/16 visible
    ids, segs = panoptic_merge([a, b], [0.6, 0.9], [0, 1], ISTHING, overlap_threshold=0.5)
    assert [s["class_idx"] for s in segs] == [1, 0]        # highest score gets id 1
    assert segs[0]["area"] == 16 and segs[1]["area"] == 8
    assert (ids[b] == 1).all() and (ids[a & ~b] == 2).all() and ids.dtype == np.int32
    assert segs[0]["bbox"] == [2, 0, 4, 4] and segs[1]["bbox"] == [0, 0, 2, 4]
    # stricter overlap threshold: a (8/16 = 0.5 visible) is dropped
    ids, segs = panoptic_merge([a, b], [0.6, 0.9], [0, 1], ISTHING, overlap_threshold=0.51)
    assert len(segs) == 1 and set(np.unique(ids)) == {0, 1}


def test_score_threshold_min_area_and_contiguous_ids():
    masks = [box(0, 1, 0, 1), box(0, 2, 2, 4), box(3, 6, 0, 3), box(3, 6, 4, 8), box(0, 1, 6, 8)]
    scores = [0.95, 0.2, 0.8, 0.7, 0.9]
    classes = [0, 0, 1, 0, -1]   # the last is unclassified
    ids, segs = panoptic_merge(masks, scores, classes, ISTHING, score_threshold=0.3, min_area=2)
    # dropped: 0 (area 1 < min_area), 1 (score 0.2 < 0.3), 4 (class -1)
    assert [s["id"] for s in segs] == [1, 2]
    assert [s["proposals"] for s in segs] == [[2], [3]]
    assert [s["area"] for s in segs] == [9, 12]
    assert sorted(np.unique(ids).tolist()) == [0, 1, 2]
    assert (ids[masks[0]] == 0).all()


def test_stuff_of_same_class_merges_things_do_not():
    sky1, sky2 = box(0, 2, 0, 4), box(0, 2, 4, 8)
    cat1, cat2 = box(3, 5, 0, 2), box(3, 5, 4, 6)
    ids, segs = panoptic_merge([sky1, cat1, sky2, cat2], [0.5, 0.9, 0.7, 0.8], [2, 0, 2, 0], ISTHING)
    # order: cat1 (0.9) -> id 1, cat2 (0.8) -> id 2, sky2 (0.7) -> id 3, sky1 (0.5) -> joins id 3
    assert len(segs) == 3
    sky = segs[2]
    assert sky["class_idx"] == 2 and not sky["isthing"]
    assert sky["area"] == 16 and sky["score"] == pytest.approx(0.7)   # max of the pieces
    assert sky["proposals"] == [2, 0] and sky["bbox"] == [0, 0, 8, 2]
    assert (ids[sky1 | sky2] == 3).all()
    assert [s["class_idx"] for s in segs[:2]] == [0, 0] and [s["id"] for s in segs[:2]] == [1, 2]


def test_ties_keep_input_order_and_empty_inputs():
    a, b = box(0, 2, 0, 2), box(0, 2, 0, 2)
    ids, segs = panoptic_merge(np.stack([a, b]), [0.5, 0.5], [0, 1], ISTHING)
    assert len(segs) == 1 and segs[0]["proposals"] == [0]
    ids, segs = panoptic_merge([], [], [], ISTHING, image_hw=(3, 4))
    assert ids.shape == (3, 4) and not ids.any() and segs == []
    ids, segs = panoptic_merge([np.zeros((H, W), bool)], [0.9], [0], ISTHING)
    assert segs == [] and not ids.any()


def test_to_png_rgb_roundtrip():
    ids = np.array([[0, 1], [300, 70000]], dtype=np.int32)
    png = to_png_rgb(ids)
    assert png.dtype == np.uint8 and png.shape == (2, 2, 3)
    assert png[1, 0].tolist() == [300 % 256, 1, 0]
    np.testing.assert_array_equal(rgb_to_id(png), ids)


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def vocab():
    return Vocab(["cat", "dog", "sky"], ISTHING, [7, 9, 30], {"cat": ["kitty"]})


def _obj(*items):
    a = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        a[i] = x
    return a


def test_panoptic_merge_stage(vocab):
    from ragseg.stages.merge import PanopticMerge

    cfg = JobConfig.model_validate({"label": {"merge": {"overlap_threshold": 0.5}}})
    stage = PanopticMerge(cfg, vocab)
    a, b, sky = box(0, 4, 0, 4), box(0, 4, 2, 6), box(4, 6, 0, 8)
    batch = {
        "image": _obj(np.zeros((H, W, 3), np.uint8), None),
        "seg_masks_rle": _obj([encode_rle(m) for m in (a, b, sky)], []),
        "seg_class": _obj(np.array([0, 1, 2]), np.zeros(0, np.int64)),
        "seg_score": _obj(np.array([0.6, 0.9, 0.5], np.float32), np.zeros(0, np.float32)),
        "s_ret": _obj(np.array([0.5, 0.8, 0.1], np.float32), np.zeros(0)),
        "s_clip": _obj(np.array([0.7, 0.6, 0.9], np.float32), np.zeros(0)),
        "s_iv": _obj(np.full(3, np.nan, np.float32), np.zeros(0)),
        "error": np.array(["", "decode: OSError: broken"], dtype=object),
    }
    out = stage(batch)
    assert out["error"].tolist() == ["", "decode: OSError: broken"]
    png = out["panoptic_png"][0]
    assert png.shape == (H, W, 3) and png.dtype == np.uint8
    ids = rgb_to_id(png)
    infos = json.loads(out["segments_info"][0])
    assert [s["id"] for s in infos] == [1, 2, 3]
    assert [s["category_id"] for s in infos] == [9, 7, 30]
    assert [s["area"] for s in infos] == [16, 8, 16]
    assert infos[1]["bbox"] == [0, 0, 2, 4] and infos[0]["iscrowd"] == 0
    assert infos[0]["score"] == pytest.approx(0.9) and infos[0]["s_ret"] == pytest.approx(0.8)
    assert infos[1]["s_clip"] == pytest.approx(0.7) and infos[1]["s_iv"] is None
    for s in infos:
        np.testing.assert_array_equal(decode_rle(s["mask_rle"]), ids == s["id"])
    # errored row: empty outputs
    assert out["panoptic_png"][1].shape == (0, 0, 3) and out["segments_info"][1] == "[]"


def test_panoptic_merge_stage_bad_row_sets_error(vocab):
    from ragseg.stages.merge import PanopticMerge

    stage = PanopticMerge(JobConfig(), vocab)
    batch = {
        "image": _obj(np.zeros((H, W, 3), np.uint8)),
        "seg_masks_rle": _obj([encode_rle(np.ones((3, 3), bool))]),  # wrong size
        "seg_class": _obj(np.array([0])),
        "seg_score": _obj(np.array([0.9])),
        "error": np.array([""], dtype=object),
    }
    out = stage(batch)
    assert out["error"][0].startswith("merge: ValueError")
    assert out["segments_info"][0] == "[]"


class _BruteForceIndex:
    """The documented Index protocol (search/labels_vocab/meta) over a small numpy key matrix."""

    def __init__(self, keys, labels):
        self.keys = np.asarray(keys, np.float32)
        self.labels = np.asarray(labels, dtype=object)
        self.labels_vocab = set(labels)
        self.meta = {"dim": self.keys.shape[1], "embed_mode": "pool"}

    def search(self, q, k):
        s = np.asarray(q, np.float32) @ self.keys.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        sims = np.take_along_axis(s, order, axis=1)
        labels = self.labels[order]
        if k > len(self.keys):
            pad = k - len(self.keys)
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
            labels = np.pad(labels, ((0, 0), (0, pad)), constant_values="")
        ids = np.zeros(sims.shape, dtype=object)
        return sims, labels, ids, np.zeros(sims.shape, np.int64)


def test_classify_stage_with_injected_index_and_text(vocab):
    from ragseg.stages.classify import Classify

    cfg = JobConfig.model_validate({"label": {"ensemble": {"k": 2, "gamma": 0.5, "retrieval_temperature": 0.1,
                                                           "clip_temperature": 1.0}}})
    index = _BruteForceIndex([[1, 0, 0], [0, 1, 0]], ["kitties", "dog"])   # no "sky" in the DB
    fallback = _BruteForceIndex([[0, 0, 1], [1, 0, 0]], ["sky", "cat"])
    text = np.eye(3, dtype=np.float32)
    stage = Classify(cfg, vocab, None, None, index=index, fallback_index=fallback, text_emb=text)
    assert stage.retriever.missing.tolist() == [False, False, True]
    q = np.array([[1, 0, 0], [0, 0, 1]], np.float16)
    batch = {
        "embeddings": _obj(q, np.zeros((0, 3), np.float16), np.ones((1, 5), np.float16)),
        "seg_masks_rle": _obj(["m1", "m2"], [], ["m"]),
        "error": np.array(["", "", ""], dtype=object),
    }
    out = stage(batch)
    assert out["error"][0] == "" and out["error"][1] == ""
    assert out["error"][2].startswith("classify: ValueError") and "dim 5" in out["error"][2]
    assert out["seg_class"][0].tolist() == [0, 2]
    # row 0: neighbours cat (1.0), dog (0.0) + fallback sky (0.0; fallback cat ignored)
    w = np.array([1.0, np.exp(-10), np.exp(-10)])
    s_ret0 = w[0] / w.sum()
    s_clip0 = np.e / (np.e + 2)
    assert out["s_ret"][0][0] == pytest.approx(s_ret0, rel=1e-5)
    assert out["s_clip"][0][0] == pytest.approx(s_clip0, rel=1e-5)
    assert out["seg_score"][0][0] == pytest.approx(0.5 * s_ret0 + 0.5 * s_clip0, rel=1e-5)
    assert np.isnan(out["s_iv"][0]).all()
    # the sky query is won through the fallback neighbour
    assert out["s_ret"][0][1] > 0.99
    assert out["seg_class"][1].shape == (0,) and out["seg_class"][2].shape == (0,)


def test_classify_iv_logits_and_retrieval_only_without_support(vocab):
    from ragseg.stages.classify import Classify

    cfg = JobConfig.model_validate({"label": {"ensemble": {"k": 1, "trained_classes": ["cat", "dog"],
                                                           "alpha": 0.0, "beta": 1.0}}})
    index = _BruteForceIndex([[1, 0, 0]], ["cat"])
    stage = Classify(cfg, vocab, None, index=index, text_emb=np.eye(3, dtype=np.float32))
    logits = np.array([[0.0, 10.0]], np.float32)  # in-vocabulary classifier says dog
    out = stage({"embeddings": _obj(np.array([[1, 0, 0]], np.float16)), "seg_iv_logits": _obj(logits),
                 "error": np.array([""], dtype=object)})
    assert out["seg_class"][0].tolist() == [1]   # alpha = 0: trained classes trust s_iv only
    assert out["s_iv"][0][0] == pytest.approx(1 / (1 + np.exp(-10)), rel=1e-5)

    cfg = JobConfig.model_validate({"label": {"ensemble": {"k": 1, "scores": "retrieval"}}})
    stage = Classify(cfg, vocab, None, index=_BruteForceIndex([[1, 0, 0]], ["horse"]))
    out = stage({"embeddings": _obj(np.array([[1, 0, 0]], np.float16)), "error": np.array([""], dtype=object)})
    assert out["seg_class"][0].tolist() == [-1] and out["seg_score"][0].tolist() == [0.0]
    assert np.isnan(out["s_clip"][0]).all()


def _tiny_store(root, keys, labels) -> str:
    """A one-version index store in the documented layout (CURRENT, meta.json, labels.parquet and a
    flat inner-product faiss index), read back through the real ``Index.open``."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = root / "v0001"
    d.mkdir(parents=True)
    flat = faiss.IndexFlatIP(keys.shape[1])
    flat.add(np.ascontiguousarray(keys, np.float32))
    faiss.write_index(flat, str(d / "populated.index"))
    pq.write_table(pa.table({"id": np.arange(len(labels)), "label": labels,
                             "image_id": [f"img{i}" for i in range(len(labels))],
                             "segment_id": np.arange(1, len(labels) + 1)}), str(d / "labels.parquet"))
    (d / "meta.json").write_text(json.dumps({"count": len(labels), "dim": int(keys.shape[1]), "nlist": 0,
                                             "nprobe": 1, "factory": "Flat", "metric": "ip"}))
    (root / "CURRENT").write_text("v0001")
    return str(root)


def test_classify_on_real_index_and_tiny_clip(tmp_path, tiny_cfg, vocab):
    pytest.importorskip("ragseg.index.store")
    pytest.importorskip("ragseg.models.clip")
    from ragseg.models.clip import TextEmbedder
    from ragseg.scoring import clip_scores, retrieval_scores
    from ragseg.stages.classify import Classify

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(5, 64)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    labels = ["cat", "cats", "dog", "sky", "horse"]
    uri = _tiny_store(tmp_path / "index", keys, labels)
    ens = tiny_cfg.label.ensemble
    ens.k, ens.gamma, ens.retrieval_temperature = 3, 0.5, 0.05
    stage = Classify(tiny_cfg, vocab, uri)
    q = keys[[2, 0, 3]].astype(np.float16)
    out = stage({"embeddings": _obj(q), "error": np.array([""], dtype=object)})
    assert out["error"][0] == ""

    # the same numbers by hand: brute-force neighbours, votes, text softmax, arithmetic ensemble
    qf = q.astype(np.float32)
    sims = qf @ keys.T
    order = np.argsort(-sims, axis=1)[:, :3]
    s_ret, _ = retrieval_scores(np.take_along_axis(sims, order, 1), np.array(labels, object)[order], vocab, 0.05)
    s_clip = clip_scores(qf, TextEmbedder(tiny_cfg.models).encode(vocab.names), ens.clip_temperature)
    final = 0.5 * s_ret + 0.5 * s_clip
    np.testing.assert_array_equal(out["seg_class"][0], final.argmax(1))
    np.testing.assert_allclose(out["seg_score"][0], final.max(1), rtol=1e-4)
    best = final.argmax(1)
    np.testing.assert_allclose(out["s_ret"][0], s_ret[np.arange(3), best], rtol=1e-4)
    np.testing.assert_allclose(out["s_clip"][0], s_clip[np.arange(3), best], rtol=1e-4)
    # retrieval alone finds the query's own key's class
    ens.scores = "retrieval"
    out = Classify(tiny_cfg, vocab, uri)({"embeddings": _obj(q), "error": np.array([""], dtype=object)})
    assert out["seg_class"][0].tolist() == [1, 0, 2]
