"""Index benchmark: sharded build (ragseg.index.build, Ray tasks + on-disk merge) vs one plain faiss
build of the same factory string, on clustered synthetic unit vectors whose clusters mimic classes.

    .venv/bin/python bench/index.py --sizes 100000,1000000

Data: ``classes`` random unit centres; each vector = centre + variation in a class-specific
``latent``-dim subspace + small isotropic noise, L2-normalised (low intrinsic dimension, like real
CLIP features), generated in chunks with per-chunk seeds (float32 in memory, float16 in the DB like
build-db writes). Queries are held-out vectors from the same distribution (not in the DB); the exact
top-10 is computed by brute force, chunk by chunk, while the data is generated.

Per size, one JSON object per line on stdout and all of them in ``bench/results/index.json``:
build seconds, bytes per vector on disk, recall@1/@10 vs exact and queries/s at several nprobe, for
the sharded and the plain build, and the sharded/plain build-time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHUNK = 50_000


def centres(classes: int, dim: int, latent: int, seed: int):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((classes, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    bases = (rng.standard_normal((classes, latent, dim)) / np.sqrt(dim)).astype(np.float32)
    return c, bases


def chunk(model, n: int, seed: int, spread=0.6, noise=0.02):
    c, bases = model
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(c), n)
    z = rng.standard_normal((n, bases.shape[1])).astype(np.float32)
    x = c[y] + spread * np.einsum("nl,nld->nd", z, bases[y], optimize=True)
    x += noise * rng.standard_normal(x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32), y  # the DB stores float16


def chunks(model, n: int, seed: int):
    for i, start in enumerate(range(0, n, CHUNK)):
        x, y = chunk(model, min(CHUNK, n - start), seed * 100_003 + i)
        yield start, x, y


def make_db(db: str, model, n: int, shards: int, seed: int, queries: np.ndarray, k: int):
    """Write the feature DB; return the exact top-k ids of ``queries``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ragseg.schema import embeddings_to_arrow, feature_schema

    dim = queries.shape[1]
    os.makedirs(os.path.join(db, "features"), exist_ok=True)
    per = -(-n // shards)
    bounds = [(s * per, min(n, (s + 1) * per)) for s in range(shards)]
    writers = [pq.ParquetWriter(os.path.join(db, "features", f"s{s:05d}.parquet"), feature_schema(dim))
               for s in range(shards)]
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start, x, y in chunks(model, n, seed):
        sims = queries @ x.T
        s_all = np.concatenate([best_s, sims], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)), sims.shape)], axis=1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
        for s, (lo, hi) in enumerate(bounds):
            a, b = max(lo, start), min(hi, start + len(x))
            if a >= b:
                continue
            xs, ys = x[a - start:b - start], y[a - start:b - start]
            m = len(xs)
            tab = pa.table({
                "image_id": pa.array([f"img{i // 8}" for i in range(a, b)], pa.string()),
                "segment_id": pa.array(np.arange(a, b) % 8 + 1, pa.int64()),
                "label": pa.array([f"class{c}" for c in ys], pa.string()),
                "label_source": pa.array(["gt"] * m, pa.string()),
                "score": pa.array(np.ones(m, np.float32)),
                "box": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4 * m, np.float32)), 4),
                "area": pa.array(np.full(m, 100, np.int64)),
                "mask_rle": pa.array([""] * m, pa.string()),
                "embedding": embeddings_to_arrow(xs),
                "embed_model": pa.array(["bench"] * m, pa.string()),
                "embed_mode": pa.array(["pool"] * m, pa.string()),
            }).cast(feature_schema(dim))
            writers[s].write_table(tab)
    for w in writers:
        w.close()
    man = {"format": 1, "embed_model": "bench", "embed_mode": "pool", "dim": dim, "config_hash": "bench",
           "models": {}, "source": {}, "shards": [
               {"name": f"s{s:05d}", "path": f"features/s{s:05d}.parquet", "rows": hi - lo, "images": 0,
                "errors": 0, "input_key": str(s)} for s, (lo, hi) in enumerate(bounds)]}
    with open(os.path.join(db, "manifest.json"), "w") as f:
        json.dump(man, f)
    return best_i


def recall(found: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    r1 = float(np.mean(found[:, 0] == exact[:, 0]))
    r10 = float(np.mean([len(set(f[:10]) & set(e[:10])) / 10 for f, e in zip(found, exact)]))
    return r1, r10


def sweep(search, set_nprobe, queries, exact, nprobes, nlist):
    out = []
    for p in nprobes:
        if nlist and p > nlist:
            continue
        set_nprobe(p)
        search(queries[:10], 10)  # warm up
        t = time.perf_counter()
        reps = 0
        while True:
            _, ids = search(queries, 10)
            reps += 1
            if time.perf_counter() - t > 1.0:
                break
        dt = (time.perf_counter() - t) / reps
        r1, r10 = recall(ids, exact)
        out.append({"nprobe": p, "recall_at_1": round(r1, 4), "recall_at_10": round(r10, 4),
                    "qps": round(len(queries) / dt, 1)})
    return out


def run_size(n: int, args) -> list[dict]:
    import faiss

    from ragseg.config import JobConfig
    from ragseg.index import store as st
    from ragseg.index.build import build_index

    work = tempfile.mkdtemp(prefix=f"ragseg-bench-{n}-", dir=args.workdir)
    try:
        model = centres(args.classes, args.dim, args.latent, args.seed)
        queries, _ = chunk(model, args.queries, seed=999_999_937)
        t = time.time()
        exact = make_db(os.path.join(work, "db"), model, n, args.shards, args.seed, queries, 10)
        gen_s = time.time() - t
        icfg = {"out": os.path.join(work, "index"), "budget_bytes_per_vector": args.budget,
                "nlist_per_sqrt_n": args.nlist_per_sqrt_n, "train_per_list": args.train_per_list,
                "opq": args.opq, "nprobe": args.nprobe, "recall_queries": 200, "min_recall_at_10": 0.0,
                "use_gpu": "auto"}
        if args.factory:
            icfg["factory"] = args.factory
        cfg = JobConfig.model_validate({"index": icfg, "ray": {"num_cpus": args.num_cpus, "progress": False}})
        # sharded build (Ray tasks); Ray start-up is excluded by starting it first
        from ragseg.runtime import init_ray

        init_ray(cfg.ray)
        t = time.time()
        res = build_index(os.path.join(work, "db"), cfg)
        sharded_s = time.time() - t
        idx = st.Index.open(icfg["out"])
        vdir = os.path.join(icfg["out"], res["version"])
        version_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(vdir) for f in fs)

        def set_np(p, _idx=idx):
            _idx.nprobe = p

        sharded = {
            "bench": "index", "variant": "sharded", "n": n, "dim": args.dim, "shards": args.shards,
            "factory": res["factory"], "nlist": res["nlist"], "m": res["m"], "train_size": idx.meta["train_size"],
            "build_s": round(sharded_s, 2), "data_gen_s": round(gen_s, 2),
            "bytes_per_vector": round(res["bytes_per_vector"], 2),
            "bytes_per_vector_version_dir": round(version_bytes / n, 2),
            "build_recall_at_10": res["recall"]["at10"],
            "nprobe_sweep": sweep(idx.search_ids, set_np, queries, exact, args.nprobes, res["nlist"]),
        }
        print(json.dumps(sharded), flush=True)
        del idx

        # plain faiss: same factory, same training size, train + add everything in one process
        t = time.time()
        plain = faiss.index_factory(args.dim, res["factory"], faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(plain)
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False
        rng = np.random.default_rng(args.seed)
        take = np.sort(rng.choice(n, size=sharded["train_size"], replace=False))
        xs = []
        for start, x, _ in chunks(model, n, args.seed):
            sel = take[(take >= start) & (take < start + len(x))] - start
            xs.append(x[sel])
        plain.train(np.concatenate(xs))
        del xs
        for start, x, _ in chunks(model, n, args.seed):
            plain.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        plain_s = time.time() - t
        path = os.path.join(work, "plain.index")
        faiss.write_index(plain, path)

        def set_np2(p):
            faiss.ParameterSpace().set_index_parameter(plain, "nprobe", p)

        plain_row = {
            "bench": "index", "variant": "plain", "n": n, "dim": args.dim, "factory": res["factory"],
            "build_s": round(plain_s, 2), "bytes_per_vector": round(os.path.getsize(path) / n, 2),
            "nprobe_sweep": sweep(plain.search, set_np2, queries, exact, args.nprobes, res["nlist"]),
        }
        print(json.dumps(plain_row), flush=True)
        ratio = {"bench": "index", "variant": "ratio", "n": n,
                 "sharded_over_plain_build_time": round(sharded_s / plain_s, 3),
                 "note": "plain build does not generate/read Parquet (data regenerated in memory); the sharded "
                         "build includes Parquet reads, Ray tasks, serialisation, on-disk merge, recall check "
                         "and publish"}
        print(json.dumps(ratio), flush=True)
        return [sharded, plain_row, ratio]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--nlist-per-sqrt-n", type=float, default=8.0)
    ap.add_argument("--train-per-list", type=int, default=64)
    ap.add_argument("--opq", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--factory", default=None)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--nprobes", default="1,4,16,64")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "index.json"))
    args = ap.parse_args()
    args.nprobes = [int(p) for p in args.nprobes.split(",")]
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += run_size(n, args)
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
           "args": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}}
    prev = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            prev = json.load(f)
    results = {r_key: r for r_key, r in prev.get("results", {}).items()}
    for r in rows:
        results[f"{r['n']}/{r['variant']}"] = r
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "results": results}, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
