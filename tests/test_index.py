"""Index parameters, sharded build + on-disk merge, versions/CURRENT, refresh, readers, CLI info."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from ragseg.config import IndexConfig, JobConfig
from ragseg.errors import UserError
from ragseg.index.params import PQ_MIN_TRAIN, choose_params, fixed_bytes, params_fixed_bytes
from ragseg.schema import MASK_TYPE, embeddings_to_arrow, feature_schema

DIM = 64
CLASSES = 20


# ----------------------------------------------------------------------------------------------
# Synthetic feature DB
# ----------------------------------------------------------------------------------------------
def clustered(n: int, dim: int = DIM, classes: int = CLASSES, seed: int = 0, centers_seed: int = 123,
              latent: int = 8, spread: float = 0.35, noise: float = 0.05):
    """Unit vectors in ``classes`` clusters; within a cluster, variation lives in a low-dim subspace
    (like real embeddings) plus a little isotropic noise. Returns (x float32 (n, dim), labels int)."""
    crng = np.random.default_rng(centers_seed)
    centers = crng.standard_normal((classes, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bases = crng.standard_normal((classes, latent, dim)).astype(np.float32) / np.sqrt(dim)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    z = rng.standard_normal((n, latent)).astype(np.float32)
    x = centers[y] + spread * np.einsum("nl,nld->nd", z, bases[y]) + noise * rng.standard_normal((n, dim)).astype(
        np.float32) / np.sqrt(dim) * np.sqrt(dim) / 8
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y


def write_shard(db: str, name: str, x: np.ndarray, y: np.ndarray, image_prefix: str) -> dict:
    import pyarrow.parquet as pq

    n = len(x)
    tab = pa.table({
        "image_id": pa.array([f"{image_prefix}-{i // 4}" for i in range(n)], pa.string()),
        "segment_id": pa.array(np.arange(n) % 4 + 1, pa.int64()),
        "label": pa.array([f"class{c}" for c in y], pa.string()).dictionary_encode(),
        "label_source": pa.array(["gt"] * n, pa.string()).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
        "score": pa.array(np.ones(n, np.float32)),
        "box": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4 * n, np.float32)), 4),
        "area": pa.array(np.full(n, 10, np.int64)),
        "mask_rle": pa.nulls(n, MASK_TYPE),
        "embedding": embeddings_to_arrow(x),
        "embed_model": pa.array(["test:model"] * n, pa.string()).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
        "embed_mode": pa.array(["pool"] * n, pa.string()).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
    })
    tab = tab.cast(feature_schema(x.shape[1]))
    os.makedirs(os.path.join(db, "features"), exist_ok=True)
    pq.write_table(tab, os.path.join(db, "features", f"{name}.parquet"))
    return {"name": name, "path": f"features/{name}.parquet", "rows": n, "images": (n + 3) // 4, "errors": 0,
            "input_key": name}


def write_manifest(db: str, shards: list[dict], dim: int = DIM) -> None:
    """Commit exactly these shards (feature files already written) in the DB's ledger."""
    from ragseg.db import commit_files

    commit_files(db, dim, shards, embed_model="test:model")


def make_db(db: str, sizes: list[int], seed: int = 0, **kw) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    xs, ys, shards = [], [], []
    for i, n in enumerate(sizes):
        x, y = clustered(n, seed=seed * 100 + i, **kw)
        # the DB stores float16: use the rounded vectors as ground truth
        x = x.astype(np.float16).astype(np.float32)
        shards.append(write_shard(db, f"s{i:05d}-k{seed}", x, y, f"img{seed}_{i}"))
        xs.append(x)
        ys.append(y)
    write_manifest(db, shards)
    return np.concatenate(xs), np.concatenate(ys), shards


def cfg_for(out: str, **index) -> JobConfig:
    base = {"out": out, "recall_queries": 100, "prune_grace_s": 0}
    base.update(index)
    return JobConfig.model_validate({"index": base, "ray": {"num_cpus": 2, "progress": False}})


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """20k vectors, dim 64, 4 shards, default parameters."""
    from ragseg.index.build import build_index

    root = tmp_path_factory.mktemp("idx")
    db = str(root / "db")
    x, y, shards = make_db(db, [5000, 5000, 5000, 5000])
    out = str(root / "index")
    res = build_index(db, cfg_for(out))
    return {"db": db, "out": out, "x": x, "y": y, "shards": shards, "res": res}


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
def test_params_rule():
    cfg = IndexConfig()
    p = choose_params(1_000_000, 768, cfg)
    # default: 4-bit codes (fast-scan when read), re-rank on, no OPQ. Fixed parts 4 x (4000 x 768 +
    # 16 x 768) + the fast-scan padding 4000 x 16 x 48 = 15.4 B/vector -> 96 sub-quantizers, 48 bytes
    assert p.factory == "IVF4000,PQ96x4" and p.nlist == 4000 and p.m == 96 and p.code_bytes == 48
    assert p.bits == 4 and p.fast_scan and not p.opq and not p.by_residual
    assert choose_params(1_000_000, 768, IndexConfig(pq_by_residual=True)).by_residual
    assert p.train_size == 64 * 4000 and p.metric == "inner_product"
    assert params_fixed_bytes(p, 768) == 4 * (4000 * 768 + 16 * 768) + 4000 * 16 * 48
    assert p.code_bytes + params_fixed_bytes(p, 768) / 1_000_000 <= 64
    assert choose_params(30_000_000, 768, cfg).factory == "IVF21909,PQ96x4"
    assert choose_params(100_000, 768, cfg).factory == "IVF1265,PQ96x4"
    # 8-bit codes (the plain IVF-PQ): 4000 x 768 + 256 x 768 floats = 13.1 B -> PQ48
    p8 = IndexConfig(pq_bits=8)
    p = choose_params(1_000_000, 768, p8)
    assert p.factory == "IVF4000,PQ48" and p.m == 48 and p.bits == 8 and not p.fast_scan
    assert p.code_bytes + fixed_bytes(p.nlist, 768, False) / 1_000_000 <= 64
    # re-rank off: OPQ; + 768^2 rotation -> 15.5 B -> 48 code bytes
    nr = IndexConfig(rerank=False, pq_bits=8)
    p = choose_params(1_000_000, 768, nr)
    assert p.factory == "OPQ48_768,IVF4000,PQ48" and p.opq
    assert p.code_bytes + fixed_bytes(p.nlist, 768, True) / 1_000_000 <= 64
    # 30M: fixed parts 2.3 bytes/vector -> 61 codes; OPQ maps 768 -> 61 x 12 = 732 dims
    p = choose_params(30_000_000, 768, nr)
    assert p.factory == "OPQ61_732,IVF21909,PQ61"
    assert p.code_bytes + fixed_bytes(p.nlist, 768, True) / 30_000_000 <= 64
    assert choose_params(30_000_000, 768, p8).factory == "IVF21909,PQ48"
    # 4-bit with OPQ: any even m, 2 sub-quantizers per byte (30M: 120 x 4 bits = 60 bytes + 3.0 fixed)
    p = choose_params(30_000_000, 768, IndexConfig(rerank=False))
    assert p.factory == "OPQ120_720,IVF21909,PQ120x4" and p.code_bytes == 60 and p.fast_scan
    # 8 x sqrt(N) = 2530 lists would get < 64 training points each: clamped to N // 64
    p = choose_params(100_000, 768, IndexConfig(nlist_per_sqrt_n=8, rerank=False, pq_bits=8))
    assert p.nlist == 100_000 // 64 and p.train_size == 64 * p.nlist
    # small N: the fixed parts are charged at most B / 4 -> 48 code bytes
    assert p.m == 48 and p.factory == "OPQ48_768,IVF1562,PQ48"
    # dim 64 budget 64: one byte per dim -> SQ8 (same size as PQ64, no k-means training)
    p = choose_params(20_000, 64, IndexConfig(nlist_per_sqrt_n=8))
    assert p.factory == "IVF312,SQ8" and not p.opq and p.nlist == 20_000 // 64
    assert choose_params(20_000, 32, cfg).factory.endswith(",SQfp16")
    assert p.train_size == 64 * 312
    # m divides dim and is clamped to dim
    assert choose_params(50_000, 100, IndexConfig(budget_bytes_per_vector=48, pq_bits=8)).m == 25
    p = choose_params(50_000, 100, IndexConfig(budget_bytes_per_vector=48))
    assert p.m == 50 and p.code_bytes == 25  # 4-bit: an even divisor, two per byte
    # flat codes when the raw vector fits the budget, or too few vectors to train PQ
    assert choose_params(50_000, 16, cfg).factory.endswith(",Flat")
    assert choose_params(PQ_MIN_TRAIN - 1, 768, cfg).factory.endswith(",Flat")
    # tiny N: IVF1 = exact, same layout
    p = choose_params(50, 768, cfg)
    assert p.factory == "IVF1,Flat" and p.train_size == 50
    # explicit factory and opq switches
    p = choose_params(10_000, 64, IndexConfig(factory="IVF10,PQ16"))
    assert p.explicit and p.nlist == 10 and p.m == 16 and p.factory == "IVF10,PQ16"
    p = choose_params(100_000, 768, IndexConfig(opq="off", pq_bits=8))
    assert p.opq is False and p.factory == "IVF1265,PQ48"  # largest divisor of 768 <= 64 - min(F/N, 16)
    # 128 dims, ~56 code bytes: OPQ55 would give 2 dims per sub-quantizer -> no OPQ, PQ32 divides 128
    assert choose_params(100_000, 128, nr).factory == "IVF1265,PQ32"
    assert choose_params(100_000, 128, IndexConfig(opq="on", pq_bits=8)).factory.startswith("OPQ55_110,")
    # explicit 4-bit codes are fast-scan when read; an explicit fast-scan factory cannot merge on disk
    p = choose_params(10_000, 64, IndexConfig(factory="IVF10,PQ32x4"))
    assert p.fast_scan and p.bits == 4 and p.code_bytes == 16 and p.m == 32
    with pytest.raises(UserError, match="fast-scan inverted lists cannot be merged on disk; give 'PQ32x4'"):
        choose_params(10_000, 64, IndexConfig(factory="IVF10,PQ32x4fs"))
    with pytest.raises(UserError):
        choose_params(0, 64, cfg)


# ----------------------------------------------------------------------------------------------
# Build, merge, recall
# ----------------------------------------------------------------------------------------------
def exact_knn(x: np.ndarray, q: np.ndarray, k: int):
    sims = q @ x.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


def test_build_layout_and_meta(built):
    from ragseg.index import versions as vs

    out, res = built["out"], built["res"]
    assert res["published"] and res["version"] == "v0001"
    assert vs.current_version(out) == "v0001"
    vdir = os.path.join(out, "v0001")
    for name in ("trained.index", "populated.index", "merged.ivfdata", "labels.parquet", "meta.json", "rerank.npy"):
        assert os.path.exists(os.path.join(vdir, name)), name
    assert sorted(os.listdir(os.path.join(vdir, "shards"))) == [f"{s['name']}.index" for s in built["shards"]]
    meta = json.load(open(os.path.join(vdir, "meta.json")))
    assert meta["count"] == 20_000 and meta["dim"] == DIM and meta["metric"] == "inner_product"
    assert meta["embed_model"] == "test:model" and meta["embed_mode"] == "pool"
    assert [s["name"] for s in meta["shards"]] == [s["name"] for s in built["shards"]]
    assert [s["start_id"] for s in meta["shards"]] == [0, 5000, 10000, 15000]
    assert meta["trained_from"] == "v0001" and meta["recall"]["at10"] >= 0.9
    # quality metrics (evaluation half of the queries), nprobe tuning and the re-rank store
    rec = meta["recall"]
    for key in ("one_recall_at_1", "one_recall_at_10", "ten_recall_at_10", "vote_agreement"):
        assert 0.0 <= rec[key] <= 1.0, key
    assert rec["vote_k"] == 16 and rec["vote_temperature"] == 0.05 and rec["queries"] == 50
    assert rec["at10"] == rec["ten_recall_at_10"] and rec["at1"] == rec["one_recall_at_1"]
    assert rec["ten_recall_at_10"] >= 0.9 and rec["vote_agreement"] >= 0.9
    assert set(rec["without_rerank"]) == {"one_recall_at_1", "one_recall_at_10", "ten_recall_at_10", "vote_agreement"}
    tun = meta["nprobe_tuning"]
    assert tun["mode"] == "auto" and tun["chosen"] == meta["nprobe"] == rec["nprobe"] and tun["queries"] == 50
    assert meta["nprobe"] in [t["nprobe"] for t in tun["tried"]] and [t["nprobe"] for t in tun["tried"]][:2] == [1, 2]
    assert tun["met"] == all(tun["tried"][-1][k] >= v for k, v in tun["target"].items())
    if tun["met"]:
        assert tun["tried"][-1]["nprobe"] == meta["nprobe"]
    assert meta["rerank"] == {"k": 256, "file": "rerank.npy", "dtype": "float16"}
    store = np.load(os.path.join(vdir, "rerank.npy"), mmap_mode="r")
    assert store.dtype == np.float16 and store.shape == (20_000, DIM)
    np.testing.assert_array_equal(store[:], built["x"].astype(np.float16))
    b = meta["bytes"]
    assert b["rerank.npy"] >= 20_000 * DIM * 2 and b["ids_per_vector"] == 8 and b["code_bytes"] == DIM


def test_merged_equals_single_index(built):
    """The on-disk merged sharded index answers exactly like one index with the same trained
    quantizer holding all vectors."""
    import faiss

    from ragseg.index.store import Index

    idx = Index.open(built["out"], rerank_k=0)  # the index proper, no re-ranking
    single = faiss.read_index(os.path.join(built["out"], "v0001", "trained.index"))
    single.add_with_ids(built["x"], np.arange(len(built["x"]), dtype=np.int64))
    faiss.ParameterSpace().set_index_parameter(single, "nprobe", idx.nprobe)
    q = built["x"][::97][:150]
    d1, i1 = idx.search_ids(q, 10)
    d2, i2 = single.search(q, 10)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
    same = (i1 == i2).mean()
    assert same > 0.99  # differences only where distances tie


def test_recall_and_vote(built):
    from ragseg.index.store import Index

    x, y = built["x"], built["y"]
    idx = Index.open(built["out"])
    rng = np.random.default_rng(5)
    qi = rng.choice(len(x), 200, replace=False)
    q = x[qi]
    _, ex = exact_knn(x, q, 11)
    _, found = idx.search_ids(q, 11)
    rec = []
    for f, e, s in zip(found, ex, qi):
        f = [i for i in f if i != s][:10]
        e = [i for i in e if i != s][:10]
        rec.append(len(set(f) & set(e)) / 10)
    assert np.mean(rec) >= 0.9
    # kNN label vote with the index vs exact
    sims, labels, image_ids, seg_ids = idx.search(q, 10)
    assert sims.shape == labels.shape == image_ids.shape == seg_ids.shape == (200, 10)
    vote_idx = [max(set(r), key=list(r).count) for r in labels]
    vote_ex = [max(set(r), key=list(r).count) for r in (np.array([f"class{c}" for c in y])[ex[:, :10]])]
    agree = np.mean([a == b for a, b in zip(vote_idx, vote_ex)])
    assert agree >= 0.98
    assert idx.labels_vocab == {f"class{c}" for c in range(CLASSES)}
    # fewer than k: -inf / ""
    s2, l2, _, g2 = idx.search(q[:2], 30_000)
    assert np.isneginf(s2[:, -1]).all() and (l2[:, -1] == "").all() and (g2[:, -1] == -1).all()
    # nprobe settable
    idx.nprobe = 1
    assert idx.nprobe == 1
    idx2 = Index.open(built["out"], nprobe=4)
    assert idx2.nprobe == 4
    # re-ranked with every list probed: exactly the exact top-10 with the exact similarities
    idx2.nprobe = idx2.meta["nlist"]
    assert idx2.rerank_k == 256
    s_rr, i_rr = idx2.search_ids(q, 10)
    s_ex, i_ex = exact_knn(x, q, 10)
    assert (i_rr == i_ex).mean() > 0.995  # float16 ties aside
    np.testing.assert_allclose(s_rr, s_ex, rtol=1e-5, atol=1e-5)


def test_cli_info(built):
    from typer.testing import CliRunner

    from ragseg.jobs.cli import app

    r = CliRunner().invoke(app, ["info", built["out"]])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["version"] == "v0001" and info["count"] == 20_000 and info["versions"] == ["v0001"]
    assert info["recall"]["at10"] >= 0.9
    assert set(info["quality"]) >= {"one_recall_at_1", "one_recall_at_10", "ten_recall_at_10", "vote_agreement"}
    assert info["rerank_k"] == 256 and info["nprobe_tuning"]["chosen"] == info["nprobe"]
    assert info["bytes_per_vector"]["per_vector"] > 0 and info["bytes_per_vector"]["rerank_store_per_vector"] >= 2 * DIM


# ----------------------------------------------------------------------------------------------
# Refresh, readers, failures
# ----------------------------------------------------------------------------------------------
def test_refresh_reader_and_failures(tmp_path, ray_local, monkeypatch):
    from ragseg.index import build as b
    from ragseg.index import evaluate as ev
    from ragseg.index import versions as vs
    from ragseg.index.store import Index

    db = str(tmp_path / "db")
    out = str(tmp_path / "index")
    x, y, shards = make_db(db, [1500, 1500, 1500])
    cfg = cfg_for(out, keep_versions=1)
    r1 = b.build_index(db, cfg)
    assert r1["version"] == "v0001" and r1["count"] == 4500

    # a reader holding v0001 open
    reader = Index.open(out)
    q = x[::50][:100]
    before = reader.search(q, 10)

    # nothing new -> nothing published
    r = b.refresh_index(db, cfg)
    assert r["published"] is False and "nothing new" in r["message"] and vs.current_version(out) == "v0001"

    # a new shard from the same distribution
    x4, y4 = clustered(1000, seed=77)
    x4 = x4.astype(np.float16).astype(np.float32)
    shards.append(write_shard(db, "s00003-new", x4, y4, "newimg"))
    write_manifest(db, shards)

    # failure injected after the merge: CURRENT stays, no version dir appears
    def boom(name):
        if name == "index.merged":
            raise RuntimeError("injected")

    from ragseg import faults

    with faults.hooked(boom), pytest.raises(RuntimeError, match="injected"):
        b.refresh_index(db, cfg)
    assert vs.current_version(out) == "v0001" and vs.list_versions(out) == ["v0001"]

    r2 = b.refresh_index(db, cfg)
    assert r2["published"] and r2["version"] == "v0002" and r2["retrain_reason"] is None
    assert r2["added_shards"] == ["s00003-new"] and r2["count"] == 5500
    assert r2["pruned"] == ["v0001"] and not os.path.exists(os.path.join(out, "v0001"))
    meta = vs.read_meta(out)
    assert [s["name"] for s in meta["shards"]] == [s["name"] for s in shards]
    assert meta["trained_from"] == "v0001" and meta["shards"][-1]["start_id"] == 4500

    # the old reader still answers the same (its files were unlinked, mmap stays valid)
    after = reader.search(q, 10)
    for a, bb in zip(before, after):
        np.testing.assert_array_equal(a, bb)
    assert reader.version == "v0001"

    # the new version finds the new vectors (each new vector's top hit is itself)
    new = Index.open(out)
    _, ids = new.search_ids(x4[:50], 1)
    assert (ids[:, 0] == 4500 + np.arange(50)).mean() >= 0.9
    _, _, img, _ = new.search(x4[:5], 1)
    assert all(str(i).startswith("newimg") for i in img[:, 0])

    # idempotent
    r3 = b.refresh_index(db, cfg)
    assert r3["published"] is False and vs.current_version(out) == "v0002"

    # a shard of far-away data triggers the drift rule -> retrain
    x5, y5 = clustered(800, seed=5, centers_seed=999)
    shards.append(write_shard(db, "s00004-drift", x5.astype(np.float16).astype(np.float32), y5, "drift"))
    write_manifest(db, shards)
    r4 = b.refresh_index(db, cfg)
    assert r4["retrain_reason"].startswith("drift") and r4["drift"]["ratio"] > 1.5
    m4 = vs.read_meta(out)
    assert m4["trained_from"] == r4["version"] == "v0003" and m4["count"] == 6300

    # quality check fails -> refuse to publish (one line), CURRENT unchanged, no version dir left
    bad = cfg_for(out, factory="IVF32,PQ2", nprobe=1, rerank=False, min_recall_at_10=0.99)
    with pytest.raises(UserError, match="not published, CURRENT stays at v0003: 10-recall@10") as ei:
        b.build_index(db, bad)
    assert "\n" not in str(ei.value)
    assert vs.current_version(out) == "v0003" and vs.list_versions(out)[-1] == "v0003"
    # the vote gate (these clusters are too well separated for a real build to miss it)
    q = {"ten_recall_at_10": 0.95, "vote_agreement": 0.97, "nprobe": 8, "rerank_k": 64}
    with pytest.raises(UserError, match="CURRENT stays at v0003: kNN-vote agreement 0.970 < index.min_vote_agreement"):
        ev.quality_gate(q, cfg_for(out, min_vote_agreement=0.98), "F", "v0003")
    ev.quality_gate(q, cfg_for(out, min_vote_agreement=0.97, min_recall_at_10=0.95), "F", "v0003")
    # targets out of reach: the smallest nprobe within 0.01 of the best of both metrics
    tried = [{"nprobe": 8, "ten_recall_at_10": 0.60, "vote_agreement": 0.95},
             {"nprobe": 16, "ten_recall_at_10": 0.70, "vote_agreement": 0.992},
             {"nprobe": 32, "ten_recall_at_10": 0.745, "vote_agreement": 0.994},
             {"nprobe": 64, "ten_recall_at_10": 0.75, "vote_agreement": 0.994}]
    assert ev._saturated(tried, ["ten_recall_at_10", "vote_agreement"]) == 32

    # forced retrain publishes a new version
    r5 = b.refresh_index(db, cfg, force_retrain=True)
    assert r5["retrain_reason"] == "forced" and vs.current_version(out) == r5["version"]


def test_db_errors(tmp_path, ray_local):
    from ragseg.index.build import build_index

    db = str(tmp_path / "db")
    out = str(tmp_path / "index")
    cfg = cfg_for(out)
    with pytest.raises(UserError, match="manifest not found"):
        build_index(db, cfg)
    x, y, shards = make_db(db, [300, 300])
    # row count mismatch
    shards[1]["rows"] = 299
    write_manifest(db, shards)
    with pytest.raises(UserError, match="s00001-k0.parquet has 300 rows"):
        build_index(db, cfg)
    shards[1]["rows"] = 300
    # missing shard
    shards.append({"name": "gone", "path": "features/gone.parquet", "rows": 3})
    write_manifest(db, shards)
    with pytest.raises(UserError, match="gone.parquet"):
        build_index(db, cfg)
    shards.pop()
    # corrupt shard
    with open(os.path.join(db, "features", "s00000-k0.parquet"), "r+b") as f:
        f.seek(100)
        f.write(b"garbage" * 50)
        f.seek(-30, 2)
        f.write(b"\0" * 30)
    write_manifest(db, shards)
    with pytest.raises(UserError, match="s00000-k0.parquet"):
        build_index(db, cfg)
    from ragseg.index.store import current_version

    assert current_version(out) is None


def test_tiny_db_flat(tmp_path, ray_local):
    """Tiny N falls back to IVF1,Flat (exact) with the same layout."""
    from ragseg.index.build import build_index
    from ragseg.index.store import Index, index_info

    db = str(tmp_path / "db")
    out = str(tmp_path / "index")
    x, y, _ = make_db(db, [40, 25])
    res = build_index(db, cfg_for(out))
    assert res["factory"] == "IVF1,Flat" and res["recall"]["at10"] == 1.0
    idx = Index.open(out)
    _, ids = idx.search_ids(x[:10], 5)
    _, ex = exact_knn(x, x[:10], 5)
    assert (ids[:, 0] == ex[:, 0]).all()
    assert index_info(out)["count"] == 65


def test_search_region_with_stub_embed(built, tmp_path):
    """search_region builds the mask, checks the embedder against the index meta and returns the
    neighbours (the real Embed stage is tested elsewhere; a stub with its interface stands in)."""
    from PIL import Image

    from ragseg.index.search import region_mask, search_region

    img = str(tmp_path / "q.png")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(img)
    target = built["x"][123]

    class StubEmbed:
        model_id, mode, dim = "test:model", "pool", DIM

        def __init__(self):
            self.masks = []

        def embed_rows(self, rows):  # MaskedClipEmbedder's interface: (image, (n, H, W) masks) per row
            self.masks.append(rows[0][1][0])
            return [target[None].astype(np.float16)]

    stub = StubEmbed()
    res = search_region(built["out"], img, box="2,3,10,8", k=5, embed=stub)
    assert len(res) == 5 and res[0]["rank"] == 1 and res[0]["sim"] > 0.99
    assert res[0]["label"] == f"class{built['y'][123]}"
    assert stub.masks[0].sum() == 8 * 5 and stub.masks[0][3:8, 2:10].all()
    m = region_mask((20, 30), mask_png=(np.arange(600).reshape(20, 30) % 2).astype(np.uint8))
    assert m.sum() == 300
    stub.model_id = "other"
    with pytest.raises(UserError, match="the index was built from"):
        search_region(built["out"], img, box="0,0,5,5", embed=stub)
    with pytest.raises(UserError, match="empty"):
        search_region(built["out"], img, box="5,5,5,9", embed=stub)


def test_fast_scan_build_refresh(tmp_path, ray_local):
    """4-bit codes (``IVF<n>,PQ<m>x4``): shards merge on disk as for 8-bit PQ, readers search the
    fast-scan layout in memory, answers equal one fast-scan index holding all vectors, and a refresh
    re-merges the live lists with a new shard."""
    import faiss

    from ragseg.index import build as b
    from ragseg.index import faiss_util as fu
    from ragseg.index import versions as vs
    from ragseg.index.store import Index

    db = str(tmp_path / "db")
    out = str(tmp_path / "index")
    x, y, shards = make_db(db, [4000, 4000, 4000])
    cfg = cfg_for(out, budget_bytes_per_vector=32)  # dim 64: 32 x 4-bit sub-quantizers = 16 bytes
    r = b.build_index(db, cfg)
    assert r["factory"] == "IVF187,PQ32x4" and r["published"]
    meta = vs.read_meta(out)
    assert meta["fast_scan"] and meta["bits"] == 4 and meta["params"]["fast_scan"]
    assert meta["bytes"]["measured"] == "loaded_index" and meta["bytes"]["loaded_index"] > 12_000 * 16
    assert meta["recall"]["ten_recall_at_10"] >= 0.9 and meta["recall"]["vote_agreement"] >= 0.99
    idx = Index.open(out, rerank_k=0)
    assert isinstance(faiss.downcast_index(idx.index), faiss.IndexIVFPQFastScan)
    assert not faiss.extract_index_ivf(idx.index).by_residual  # index.pq_by_residual false (default)
    single = faiss.read_index(os.path.join(out, "v0001", "trained.index"))
    single.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    single = fu.to_fast_scan(single)
    faiss.ParameterSpace().set_index_parameter(single, "nprobe", idx.nprobe)
    q = x[::61][:150]
    d1, i1 = idx.search_ids(q, 10)
    d2, i2 = single.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6, atol=1e-6)
    # re-ranked, every list probed: the exact top-10
    idx.rerank_k, idx.nprobe = 256, meta["nlist"]
    s_rr, i_rr = idx.search_ids(q, 10)
    s_ex, i_ex = exact_knn(x, q, 10)
    assert (i_rr == i_ex).mean() > 0.995
    # refresh: the live version's merged lists + the new shard
    x4, y4 = clustered(1000, seed=78)
    x4 = x4.astype(np.float16).astype(np.float32)
    shards.append(write_shard(db, "s00003-new", x4, y4, "newimg"))
    write_manifest(db, shards)
    r2 = b.refresh_index(db, cfg)
    assert r2["published"] and r2["retrain_reason"] is None and r2["count"] == 13_000
    new = Index.open(out)
    assert isinstance(faiss.downcast_index(new.index), faiss.IndexIVFPQFastScan)
    _, ids = new.search_ids(x4[:50], 1)
    assert (ids[:, 0] == 12_000 + np.arange(50)).mean() >= 0.9
    new.nprobe = meta["nlist"]
    _, ids_all = new.search_ids(q, 10)
    _, ex_all = exact_knn(np.concatenate([x, x4]), q, 10)
    assert (ids_all == ex_all).mean() > 0.995
