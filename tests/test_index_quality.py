"""Index quality metrics (ragseg.index.quality), the re-rank path (rerank.rerank), and a reader of a
version written in the format before the re-rank store (versions.py module doc, format 1 meta)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ragseg.errors import UserError
from ragseg.index import quality as iq
from ragseg.index import rerank as rr
from ragseg.index import store as st

LABELS = np.array(["a", "a", "b", "b", "b", "a", "b", "b", "a", "c"], dtype=object)


def _case():
    """Two queries (ids 0 and 1); exact and approximate lists include the query itself."""
    qids = np.array([0, 1])
    e_ids = np.array([[0, 5, 6, 7], [1, 2, 3, 4]])
    e_sims = np.array([[1.0, 0.9, 0.8, 0.7], [1.0, 0.9, 0.85, 0.8]], np.float32)
    a_ids = np.array([[5, 0, 7, 9], [3, 2, -1, 1]])
    a_sims = np.array([[0.9, 1.0, 0.7, 0.6], [0.85, 0.9, -np.inf, 1.0]], np.float32)
    return qids, (e_sims, e_ids), (a_sims, a_ids)


def test_drop_self_and_recall_by_hand():
    qids, (e_sims, e_ids), (a_sims, a_ids) = _case()
    s, i = iq.drop_self(a_sims, a_ids, qids, 3)
    np.testing.assert_array_equal(i, [[5, 7, 9], [3, 2, -1]])
    assert s[1, 2] == -np.inf and s[0, 0] == np.float32(0.9)
    _, ex = iq.drop_self(e_sims, e_ids, qids, 3)
    np.testing.assert_array_equal(ex, [[5, 6, 7], [2, 3, 4]])
    # padded beyond the available columns
    _, wide = iq.drop_self(e_sims, e_ids, qids, 5)
    np.testing.assert_array_equal(wide[:, 3:], -1)
    r = iq.recall_metrics(i, ex, k=3)
    # row 0: top hit 5 = exact nearest 5; |{5,7,9} & {5,6,7}| = 2.  row 1: top hit 3 != 2; 2 in list; |{3,2} & {2,3,4}| = 2
    assert r["one_recall_at_1"] == pytest.approx(0.5)
    assert r["one_recall_at_10"] == pytest.approx(1.0)
    assert r["ten_recall_at_10"] == pytest.approx(2 / 3)
    assert r["queries"] == 2
    # an exact list with no neighbour is skipped; nothing at all -> 1.0
    assert iq.recall_metrics(np.full((1, 3), -1), np.full((1, 3), -1), 3)["ten_recall_at_10"] == 1.0


def test_vote_agreement_by_hand():
    qids, exact, approx = _case()
    vocab = iq.label_vocab(LABELS)
    assert vocab.names == ["a", "b", "c"]
    a = iq.drop_self(*approx, qids, 3)
    e = iq.drop_self(*exact, qids, 3)
    # T = 1: row 0 exact votes a:1 vs b:e^-0.1+e^-0.2 -> b; approx a:1, b:e^-0.2, c:e^-0.3 -> a (disagree);
    # row 1: all b on both sides (agree)
    assert iq.vote_agreement(a, e, LABELS, vocab, temperature=1.0) == pytest.approx(0.5)
    # T = 0.01: the nearest neighbour decides: row 0 a / a, row 1 b / b
    assert iq.vote_agreement(a, e, LABELS, vocab, temperature=0.01) == pytest.approx(1.0)
    # rows without usable neighbours agree with each other, not with a supported row
    none = (np.full((2, 3), -np.inf, np.float32), np.full((2, 3), -1))
    assert iq.vote_agreement(none, none, LABELS, vocab, 1.0) == 1.0
    assert iq.vote_agreement(none, e, LABELS, vocab, 1.0) == 0.0
    # evaluate() = both, at recall k 10 (short lists are padded) and the vote's k
    out = iq.evaluate(approx, exact, qids, LABELS, vote_k=3, temperature=1.0)
    assert out["ten_recall_at_10"] == pytest.approx(2 / 3) and out["vote_agreement"] == pytest.approx(0.5)
    assert out["one_recall_at_1"] == pytest.approx(0.5) and out["one_recall_at_10"] == pytest.approx(1.0)
    assert out["vote_k"] == 3 and out["vote_temperature"] == 1.0 and out["exclude_self"]
    # labels that normalise alike are one class; empty labels none
    v = iq.label_vocab(np.array(["Car", "car", "", "tree"], dtype=object))
    assert len(v) == 2
    assert iq.label_vocab(np.array(["", ""], dtype=object)) is None


def test_rerank_exact_order():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    store = x.astype(np.float16)
    q = rng.standard_normal((300, 16)).astype(np.float32)  # > RERANK_CHUNK rows: two chunks
    cand = np.stack([rng.permutation(200)[:40] for _ in range(300)])
    cand[:, -5:] = -1
    cand[0, :] = -1
    cand[0, :3] = [7, 8, 9]
    sims, ids = rr.rerank(q, cand, store, 10)
    xf = store.astype(np.float32)
    for r in range(1, 300):
        c = cand[r][cand[r] >= 0]
        s = xf[c] @ q[r]
        top = c[np.argsort(-s, kind="stable")[:10]]
        np.testing.assert_array_equal(ids[r], top)
        np.testing.assert_allclose(sims[r], np.sort(s)[::-1][:10], rtol=1e-5, atol=1e-6)
    # fewer candidates than k: padded with -1 / -inf
    assert set(ids[0, :3]) == {7, 8, 9} and (ids[0, 3:] == -1).all() and np.isneginf(sims[0, 3:]).all()
    # a memmapped store gives the same answer
    assert rr.rerank(q[:2], cand[:2], store, 10)[1].tolist() == ids[:2].tolist()


def test_rerank_store_file(tmp_path):
    p = str(tmp_path / rr.RERANK)
    w = rr.write_rerank_store(p, 5, 4)
    w[:] = np.arange(20, dtype=np.float16).reshape(5, 4)
    w.flush()
    del w
    r = rr.open_rerank_store(p, 5, 4)
    assert r.dtype == np.float16 and r.shape == (5, 4) and r[4, 3] == 19
    with pytest.raises(UserError, match="expected float16"):
        rr.open_rerank_store(p, 6, 4)
    np.save(str(tmp_path / "f32.npy"), np.zeros((5, 4), np.float32))
    with pytest.raises(UserError, match="expected float16"):
        rr.open_rerank_store(str(tmp_path / "f32.npy"), 5, 4)


def _write_format1_version(root: str, x: np.ndarray, labels: list[str]) -> None:
    """A version as builds before the re-rank store wrote it (versions.py layout, meta format 1 keys,
    no rerank.npy): trained.index, shards/<name>.index, populated.index + merged.ivfdata
    (OnDiskInvertedLists via faiss.contrib.ondisk.merge_ondisk), labels.parquet, meta.json, CURRENT."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    v = os.path.join(root, "v0001")
    os.makedirs(os.path.join(v, "shards"))
    n, d = x.shape
    trained = faiss.index_factory(d, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(x)
    faiss.write_index(trained, os.path.join(v, "trained.index"))
    shard = faiss.read_index(os.path.join(v, "trained.index"))
    shard.add_with_ids(x, np.arange(n, dtype=np.int64))
    faiss.write_index(shard, os.path.join(v, "shards", "s0.index"))
    merged = faiss.read_index(os.path.join(v, "trained.index"))
    merge_ondisk(merged, [os.path.join(v, "shards", "s0.index")], os.path.join(v, "merged.ivfdata"))
    faiss.write_index(merged, os.path.join(v, "populated.index"))
    pq.write_table(pa.table({
        "id": pa.array(np.arange(n, dtype=np.int64)), "label": pa.array(labels, pa.string()),
        "image_id": pa.array([f"im{i}" for i in range(n)], pa.string()),
        "segment_id": pa.array(np.ones(n, np.int64)), "shard": pa.array(["s0"] * n, pa.string()),
    }), os.path.join(v, "labels.parquet"))
    params = {"factory": "IVF4,Flat", "nlist": 4, "m": 0, "opq": False, "train_size": n, "code_bytes": 4 * d,
              "metric": "inner_product", "explicit": True}
    meta = {"format": 1, "factory": "IVF4,Flat", "metric": "inner_product", "dim": d, "count": n, "nlist": 4,
            "m": 0, "opq": False, "code_bytes": 4 * d, "train_size": n, "params": params, "nprobe": 2,
            "trained_count": n, "train_coarse_error": 0.1, "gpu_train": False, "embed_model": "m",
            "embed_mode": "pool", "db_uri": "db", "db_config_hash": "x",
            "shards": [{"name": "s0", "rows": n, "start_id": 0, "input_key": "s0"}], "labels_count": 2,
            "recall": {"at1": 1.0, "at10": 0.97, "queries": 20, "k": 10, "exclude_self": True, "nprobe": 2},
            "mode": "build", "retrain_reason": "initial build", "drift": None, "added_shards": ["s0"],
            "bytes": {"populated.index": 1, "merged.ivfdata": 1, "per_vector": 1.0}, "previous_version": None,
            "created": 1.0, "build_seconds": 1.0, "version": "v0001", "trained_from": "v0001"}
    with open(os.path.join(v, "meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, "CURRENT"), "w") as f:
        f.write("v0001\n")


def test_reader_of_format1_version(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = ["cat" if i % 2 else "dog" for i in range(300)]
    root = str(tmp_path / "old")
    _write_format1_version(root, x, labels)
    idx = st.Index.open(root)
    assert idx.rerank_k == 0 and idx.vectors is None and idx.nprobe == 2
    sims, labs, img, seg = idx.search(x[:5], 3)
    assert sims.shape == (5, 3) and labs[0, 0] == "dog" and img[0, 0] == "im0"
    idx.nprobe = 4  # all lists: exact
    _, ids = idx.search_ids(x[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="no re-rank store"):
        idx.rerank_k = 10
    info = st.index_info(root)
    assert info["rerank_k"] == 0 and info["recall"]["at10"] == 0.97 and info["quality"] == {}
