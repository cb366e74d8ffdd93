"""Index benchmark: quality and search cost of the default index on synthetic data of varying
difficulty, built with ragseg.index.build (Ray tasks + on-disk merge, nprobe tuned at build).

    .venv/bin/python bench/index.py                       # make bench: the settings below at N = 100k
    .venv/bin/python bench/index.py --n 1000000 --settings hard

Data (per setting: ``classes`` and ``spread``): class centres c = normalise(mu + g_c) around one
shared direction mu (g_c ~ N(0, I/d): centres at cosine ~0.5, like CLIP features that share a
cone); each class has ``modes`` mode centres (scenes / instances) c + spread * (z B + z' B_c), and
each vector = a mode centre + spread / 2 * (z B + z' B_c) + small noise, L2-normalised, with B a
latent basis shared by all classes and B_c one per class (``latent`` dims each). The shared part
makes classes overlap as the spread grows, so near neighbours are of mixed classes and a kNN vote
has small margins; the exact kNN vote's accuracy against the true class is reported as
the setting's difficulty. Vectors are stored float16 (like build-db). Queries are held-out vectors
(not in the DB); their exact top-k is computed by brute force while the data is generated.

Per setting, one JSON object per line on stdout and all of them in ``bench/results/index.json``:
build seconds, the chosen factory / nprobe, bytes per vector (index files, ids, re-rank store) and
the extrapolation to 1M and 30M from the parameter rule, the build's own quality figures, and on the
held-out queries 1-recall@1, 1-recall@10, 10-recall@10 and kNN-vote agreement (label job's k and
temperature) per nprobe with and without re-ranking; for the main setting the search cost (and with
``--variants`` the same build with other index settings: OPQ, 8-bit PQ, residual codes): queries/s at the chosen settings with and without re-ranking for 1
and 2 threads, next to the label job's images/s and segments/image from bench/results/stages.json.
``--compare-single`` (main setting) adds the sharded-vs-single build: the same index built in one
process without Ray (same parameters, same training rows, read from the same Parquet DB), its build
time and peak RSS next to the sharded build's (phase times, driver + Ray workers' RSS) and the
held-out quality of both at the chosen nprobe; the ratio's limit is 1.2.
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

CHUNK = 50_000
# index config changes measured next to the default on the main setting (--variants)
VARIANTS = {
    "opq_on": {"opq": "on"},  # OPQ rotation in front (slow to train at 768-d on a few CPUs)
    "pq8": {"pq_bits": 8},  # 8-bit PQ, plain IVF-PQ (no fast-scan)
    "residual": {"pq_by_residual": True},  # codes of residuals to the list centroid (faiss's IVFPQ default)
    "pq8_residual": {"pq_bits": 8, "pq_by_residual": True},  # the default before fast-scan
}
TARGET_N = (1_000_000, 30_000_000)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def make_model(classes: int, dim: int, latent: int, seed: int, spread: float, modes: int):
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal(dim).astype(np.float32)
    mu /= np.linalg.norm(mu)
    c = mu + rng.standard_normal((classes, dim)).astype(np.float32) / np.sqrt(dim)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    shared = (rng.standard_normal((latent, dim)) / np.sqrt(dim)).astype(np.float32)
    own = (rng.standard_normal((classes, latent, dim)) / np.sqrt(dim)).astype(np.float32)
    zs = rng.standard_normal((classes, modes, latent)).astype(np.float32) / np.sqrt(latent)
    zo = rng.standard_normal((classes, modes, latent)).astype(np.float32) / np.sqrt(latent)
    centres = c[:, None] + spread * (zs @ shared) + spread * np.einsum("cml,cld->cmd", zo, own, optimize=True)
    return centres, shared, own, spread


def chunk(model, n: int, seed: int, noise: float = 0.1):
    centres, shared, own, spread = model
    classes, modes, dim = centres.shape
    rng = np.random.default_rng(seed)
    latent = shared.shape[0]
    y = rng.integers(0, classes, n)
    j = rng.integers(0, modes, n)
    zs = rng.standard_normal((n, latent)).astype(np.float32) / np.sqrt(latent)
    zo = rng.standard_normal((n, latent)).astype(np.float32) / np.sqrt(latent)
    jitter = spread / 2
    x = centres[y, j] + jitter * (zs @ shared) + jitter * np.einsum("nl,nld->nd", zo, own[y], optimize=True)
    x += noise * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32), y  # the DB stores float16


def chunks(model, n: int, seed: int):
    for i, start in enumerate(range(0, n, CHUNK)):
        x, y = chunk(model, min(CHUNK, n - start), seed * 100_003 + i)
        yield start, x, y


def make_db(db: str, model, n: int, shards: int, seed: int, queries: np.ndarray, k: int):
    """Write the feature DB; return (exact top-k sims, ids) of ``queries`` and the labels by id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ragseg.schema import MASK_TYPE, embeddings_to_arrow, feature_schema

    dim = queries.shape[1]
    os.makedirs(os.path.join(db, "features"), exist_ok=True)
    per = -(-n // shards)
    bounds = [(s * per, min(n, (s + 1) * per)) for s in range(shards)]
    writers = [pq.ParquetWriter(os.path.join(db, "features", f"s{s:05d}.parquet"), feature_schema(dim))
               for s in range(shards)]
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    labels = np.empty(n, dtype=object)
    for start, x, y in chunks(model, n, seed):
        labels[start:start + len(x)] = [f"class{c}" for c in y]
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
                "mask_rle": pa.nulls(m, MASK_TYPE),
                "embedding": embeddings_to_arrow(xs),
                "embed_model": pa.array(["bench"] * m, pa.string()),
                "embed_mode": pa.array(["pool"] * m, pa.string()),
            }).cast(feature_schema(dim))
            writers[s].write_table(tab)
    for w in writers:
        w.close()
    from ragseg.db import commit_files

    commit_files(db, dim, [{"name": f"s{s:05d}", "path": f"features/s{s:05d}.parquet", "rows": hi - lo}
                           for s, (lo, hi) in enumerate(bounds)], embed_model="bench")
    return (best_s, best_i), labels


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def quality(idx, queries, exact, labels, vote_k, temperature, vocab) -> dict:
    from ragseg.index import quality as iq

    kk = max(iq.RECALL_K, vote_k)
    found = idx.search_ids(queries, kk)
    no_self = np.full(len(queries), -1)  # held-out queries: nothing to remove
    m = iq.evaluate(found, exact, no_self, labels, vote_k, temperature, vocab)
    return {k: round(m[k], 4) for k in ("one_recall_at_1", "one_recall_at_10", "ten_recall_at_10", "vote_agreement")}


class Lists:
    """The inverted lists of an opened index: list sizes, the list of every id, each query's lists
    in probe order."""

    def __init__(self, idx, queries):
        import faiss

        from ragseg.index.faiss_util import transform as _transform

        ivf = faiss.extract_index_ivf(idx.index)
        self.sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.int64)
        self.list_of = np.full(idx.ntotal, -1, np.int64)
        for i in range(ivf.nlist):
            n = int(self.sizes[i])
            if n:
                ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(i), n).copy()
                self.list_of[ids] = i
        _, self.order = ivf.quantizer.search(_transform(idx.index, queries), ivf.nlist)

    def scan_fraction(self, nprobe: int) -> float:
        """Mean share of the database's codes that a query scans at ``nprobe``."""
        return round(float(self.sizes[self.order[:, :nprobe]].sum(axis=1).mean() / max(self.sizes.sum(), 1)), 4)

    def ivf_only_recall(self, exact_ids: np.ndarray, nprobe: int, k: int = 10) -> float:
        """10-recall@10 with perfect codes: the share of each query's exact top-k that lies in its
        ``nprobe`` probed lists (an upper bound for any code and re-rank at this nprobe)."""
        rank = np.empty_like(self.order)
        np.put_along_axis(rank, self.order, np.arange(self.order.shape[1])[None].repeat(len(rank), 0), axis=1)
        nb = exact_ids[:, :k]
        lists = self.list_of[np.where(nb < 0, 0, nb)]
        hit = (np.take_along_axis(rank, lists, axis=1) < nprobe) & (nb >= 0)
        return round(float(hit.sum() / max((nb >= 0).sum(), 1)), 4)


def sweep(idx, queries, exact, labels, ens, vocab, nprobes, rerank_ks, lists: Lists) -> list[dict]:
    """Held-out quality per nprobe, without re-ranking and re-ranked with each k' of ``rerank_ks``
    (the build's k' first; key ``rerank`` = the build's k', ``rerank_<k'>`` the others)."""
    out = []
    nlist = int(idx.meta.get("nlist", 0))
    rerank_k = idx.rerank_k
    for p in nprobes:
        if nlist and p > nlist:
            continue
        idx.nprobe = p
        row = {"nprobe": p, "scan_fraction": lists.scan_fraction(p),
               "ivf_only_ten_recall_at_10": lists.ivf_only_recall(exact[1], p)}
        for rk in [0] + ([rerank_k] + [k for k in rerank_ks if k != rerank_k] if rerank_k else []):
            idx.rerank_k = rk
            key = "no_rerank" if not rk else ("rerank" if rk == rerank_k else f"rerank_{rk}")
            row[key] = quality(idx, queries, exact, labels, ens.k, ens.retrieval_temperature, vocab)
        out.append(row)
    idx.rerank_k = rerank_k
    return out


def neighbour_structure(exact, n: int, classes: int, modes: int) -> dict:
    """What makes 10-recall@10 hard on this data: members per mode, and the exact similarities at
    ranks 1, 5, 10, 11, 16 (medians over the held-out queries) with the rank-10 / rank-11 gap."""
    sims = exact[0]
    med = {f"sim_rank_{r}": round(float(np.median(sims[:, r - 1])), 4) for r in (1, 5, 10, 11, 16)}
    gap = sims[:, 9] - sims[:, 10]
    return {"members_per_mode": round(n / (classes * modes), 1), **med,
            "gap_10_11_median": round(float(np.median(gap)), 5),
            "gap_10_11_p10": round(float(np.percentile(gap, 10)), 5)}


def qps(idx, queries, k: int, batch: int, seconds: float) -> float:
    """Queries/s searching ``batch`` queries per call (a label batch = one image's proposals)."""
    idx.search_ids(queries[:batch], k)  # warm up (page in lists and re-rank rows)
    done, t = 0, time.perf_counter()
    while True:
        for lo in range(0, len(queries), batch):
            idx.search_ids(queries[lo:lo + batch], k)
        done += len(queries)
        if time.perf_counter() - t > seconds:
            break
    return done / (time.perf_counter() - t)


def label_job_rate() -> dict:
    """The label job's images/s bound from bench/results/stages.json: the slowest stage's best
    images/s (embed-pool on the committed CPU run), and segments per image of that run."""
    path = os.path.join(ROOT, "bench", "results", "stages.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        st = json.load(f)
    best: dict[str, dict] = {}
    for r in st.get("results", []):
        if r.get("bench") != "stage" or not r.get("images_per_s"):
            continue
        if r["stage"] not in best or r["images_per_s"] > best[r["stage"]]["images_per_s"]:
            best[r["stage"]] = r
    if not best:
        return {}
    pipeline_stages = [s for s in best if s != "embed-crop"] or list(best)
    slow = min(pipeline_stages, key=lambda s: best[s]["images_per_s"])
    r = best[slow]
    seg_per_img = r["segments"] / max(r["images"], 1)
    return {"source": "bench/results/stages.json", "device": st.get("device"), "config": st.get("config"),
            "bottleneck_stage": slow, "images_per_s": r["images_per_s"], "segments_per_image": seg_per_img,
            "queries_per_s_needed": round(r["images_per_s"] * seg_per_img, 1)}


def search_cost(idx, queries, vote_k: int, batch: int, seconds: float) -> dict:
    import faiss

    out = {"batch": batch, "k": vote_k, "nprobe": idx.nprobe, "rerank_k": idx.rerank_k}
    rk = idx.rerank_k
    saved = faiss.omp_get_max_threads()
    try:
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            for label, r in (("rerank", rk), ("no_rerank", 0)):
                if label == "rerank" and not rk:
                    continue
                idx.rerank_k = r
                out[f"qps_{label}_{threads}t"] = round(qps(idx, queries, vote_k, batch, seconds), 1)
    finally:
        faiss.omp_set_num_threads(saved)
        idx.rerank_k = rk
    job = label_job_rate()
    if job:
        out["label_job"] = job
        best = max(v for k, v in out.items() if k.startswith("qps_rerank") or (not rk and k.startswith("qps_")))
        out["retrieval_share_of_label_time"] = round(job["queries_per_s_needed"] / best, 4)
    return out


def extrapolate(meta: dict, cfg) -> dict:
    """Bytes/vector of the index (ids excluded / included) at this N (measured: the index as a reader
    holds it, see ``meta["bytes"]["measured"]``) and at 1M / 30M (the parameter rule's factory there:
    code bytes + amortised fixed parts (fast-scan: with the expected list padding) + the overhead
    per vector measured here beyond those)."""
    from ragseg.index.params import IndexParams, choose_params, params_fixed_bytes

    b = meta["bytes"]
    n, dim = meta["count"], meta["dim"]
    measured_fixed = params_fixed_bytes(IndexParams(**meta["params"]), dim)
    overhead = b["per_vector"] - b["ids_per_vector"] - meta["code_bytes"] - measured_fixed / n
    out = {"measured": {"n": n, "factory": meta["factory"], "what": b.get("measured", "files"),
                        "per_vector": round(b["per_vector"], 2),
                        "per_vector_excl_ids": round(b["per_vector_excl_ids"], 2),
                        "fixed_per_vector": round(measured_fixed / n, 2),
                        "rerank_store_per_vector_on_disk": round(b["rerank_store_per_vector"], 1),
                        "other_overhead_per_vector": round(overhead, 3)}}
    for tn in TARGET_N:
        if tn == n:
            continue
        p = choose_params(tn, dim, cfg.index)
        fixed = params_fixed_bytes(p, dim) / tn
        excl = p.code_bytes + fixed + max(overhead, 0.0)
        out[f"n_{tn}"] = {"factory": p.factory, "code_bytes": p.code_bytes, "fixed_per_vector": round(fixed, 2),
                          "per_vector_excl_ids": round(excl, 2), "per_vector": round(excl + 8, 2),
                          "index_gib": round((excl + 8) * tn / 2**30, 2),
                          "rerank_store_gib_on_disk": round(2 * dim * tn / 2**30, 1)}
    return out


# ----------------------------------------------------------------------------------------------
# One setting
# ----------------------------------------------------------------------------------------------
def build(db: str, out: str, args, **index) -> tuple[dict, float, object]:
    from ragseg.config import JobConfig
    from ragseg.index.build import build_index

    icfg = {"out": out, "budget_bytes_per_vector": args.budget, "recall_queries": args.build_queries,
            "min_recall_at_10": 0.0, "min_vote_agreement": 0.0, "use_gpu": "auto"}
    if args.nlist_per_sqrt_n:
        icfg["nlist_per_sqrt_n"] = args.nlist_per_sqrt_n
    icfg.update(index)
    cfg = JobConfig.model_validate({"index": icfg, "ray": {"num_cpus": args.num_cpus, "progress": False}})
    t = time.time()
    res = build_index(db, cfg)
    return res, time.time() - t, cfg


def exact_vote_accuracy(exact, labels, true_labels, vote_k: int, temperature: float, vocab) -> float:
    from ragseg.scoring import retrieval_scores

    sims, ids = exact
    s, _ = retrieval_scores(sims[:, :vote_k], labels[ids[:, :vote_k]], vocab, temperature)
    return float(np.mean(np.asarray(vocab.names, dtype=object)[s.argmax(axis=1)] == true_labels))


def _cached_db(cache: str | None, key: dict):
    """(db, exact, labels) of a DB generated earlier with the same arguments (``--db-cache``)."""
    if not cache or not os.path.exists(os.path.join(cache, "key.json")):
        return None
    with open(os.path.join(cache, "key.json")) as f:
        if json.load(f) != key:
            return None
    z = np.load(os.path.join(cache, "exact.npz"), allow_pickle=True)
    return os.path.join(cache, "db"), (z["sims"], z["ids"]), z["labels"]


def _save_db_cache(cache: str, key: dict, exact, labels) -> None:
    np.savez(os.path.join(cache, "exact.npz"), sims=exact[0], ids=exact[1], labels=labels)
    with open(os.path.join(cache, "key.json"), "w") as f:
        json.dump(key, f)


def run_setting(name: str, classes: int, spread: float, n: int, main: bool, args) -> list[dict]:
    from ragseg.config import JobConfig
    from ragseg.index import quality as iq
    from ragseg.index import store as st
    ens = JobConfig().label.ensemble
    work = tempfile.mkdtemp(prefix=f"ragseg-bench-{name}-", dir=args.workdir)
    rows = []
    try:
        model = make_model(classes, args.dim, args.latent, args.seed, spread, args.modes)
        queries, qy = chunk(model, args.queries, 999_999_937)
        t = time.time()
        db = os.path.join(work, "db")
        key = {"setting": name, "classes": classes, "spread": spread, "n": n, "shards": args.shards, "seed": args.seed,
               "dim": args.dim, "latent": args.latent, "modes": args.modes, "queries": args.queries}
        cached = _cached_db(args.db_cache, key)
        if cached is not None:
            db, exact, labels = cached
        else:
            if args.db_cache:
                db = os.path.join(args.db_cache, "db")
                shutil.rmtree(args.db_cache, ignore_errors=True)
            exact, labels = make_db(db, model, n, args.shards, args.seed, queries, max(iq.RECALL_K, ens.k))
            if args.db_cache:
                _save_db_cache(args.db_cache, key, exact, labels)
        gen_s = time.time() - t
        vocab = iq.label_vocab(np.unique(labels))
        true = np.array([f"class{c}" for c in qy], dtype=object)
        difficulty = exact_vote_accuracy(exact, labels, true, ens.k, ens.retrieval_temperature, vocab)
        variants = [("default", {})] + ([(v, VARIANTS[v]) for v in args.variants] if main else [])
        for variant, extra in variants:
            import ray

            if not ray.is_initialized():  # a private local Ray (never another process's), start-up not timed
                ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
            out = os.path.join(work, f"index-{variant}")
            phases = rss = None
            if args.compare_single and main and variant == "default":
                res, build_s, cfg, phases, rss = build_phases(db, out, args)
            else:
                res, build_s, cfg = build(db, out, args, **extra)
            idx = st.Index.open(out)
            meta = idx.meta
            lists = Lists(idx, queries)
            row = {
                "bench": "index", "setting": name, "variant": variant, "n": n, "dim": args.dim,
                "classes": classes, "spread": spread, "shards": args.shards,
                "exact_knn_vote_accuracy": round(difficulty, 4), "data_gen_s": round(gen_s, 1),
                "modes": args.modes, "structure": neighbour_structure(exact, n, classes, args.modes),
                "build_s": round(build_s, 1), "factory": meta["factory"], "nlist": meta["nlist"],
                "nprobe": meta["nprobe"], "rerank_k": idx.rerank_k,
                "nprobe_tuning": meta["nprobe_tuning"], "build_quality": meta["recall"],
                "bytes": extrapolate(meta, cfg),
                "heldout_queries": len(queries),
                "heldout_at_chosen": quality(idx, queries, exact, labels, ens.k, ens.retrieval_temperature, vocab),
                "scan_fraction_at_chosen": lists.scan_fraction(meta["nprobe"]),
                "sweep": sweep(idx, queries, exact, labels, ens, vocab, args.nprobes, args.rerank_ks, lists),
            }
            if phases is not None:
                row["phases"], row["rss"] = phases, rss
            idx.nprobe = meta["nprobe"]
            if main and args.search_cost == "on":
                row["search_cost"] = search_cost(idx, queries, ens.k, args.batch, args.qps_seconds)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if variant == "default":
                cfg_default = cfg
            del idx
        if args.compare_single and main:
            rows.append(single_build(db, work, rows[0], cfg_default, queries, exact, labels, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


class _TreeRss:
    """Peak RSS of this process and, apart, of its Ray's worker processes (``ray::...`` below this
    process; summed, and the largest one), and the CPU seconds of both, sampled every ``every`` s while the block runs; also the same less each process's
    shared pages (``rss - shared``: the object store's mapping and mmapped files count in every
    process that touches them, so a sum of plain RSS counts them many times)."""

    def __init__(self, every: float = 0.25):
        import threading

        self.every, self.driver, self.workers, self.worker_max = every, 0, 0, 0
        self.driver_private = self.workers_private = 0
        self.cpu0: dict[int, float] = {}  # Ray workers' CPU seconds: first and last seen, per pid
        self.cpu1: dict[int, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        m = psutil.Process().memory_info()
        self.driver = max(self.driver, m.rss)
        self.driver_private = max(self.driver_private, m.rss - getattr(m, "shared", 0))
        tot = tot_private = 0
        for p in psutil.Process().children(recursive=True):  # this driver's Ray only: not other jobs'
            try:
                p.info = {"name": p.name(), "memory_info": p.memory_info(), "cpu_times": p.cpu_times()}
            except psutil.Error:
                continue
            mi = p.info.get("memory_info")
            if str(p.info.get("name") or "").startswith("ray::") and mi:
                ct = p.info.get("cpu_times")
                if ct is not None:
                    self.cpu0.setdefault(p.pid, ct.user + ct.system if self.cpu1 or not self._started else 0.0)
                    self.cpu1[p.pid] = ct.user + ct.system
                tot += mi.rss
                tot_private += mi.rss - getattr(mi, "shared", 0)
                self.worker_max = max(self.worker_max, mi.rss)
        self.workers = max(self.workers, tot)
        self.workers_private = max(self.workers_private, tot_private)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    _started = False

    def __enter__(self):
        import psutil

        t = psutil.Process().cpu_times()
        self._cpu_start = t.user + t.system
        self._sample()  # the workers alive now: their CPU so far is not the build's
        self._started = True
        self._t.start()
        return self

    def __exit__(self, *exc):
        import psutil

        self._stop.set()
        self._t.join()
        self._sample()
        t = psutil.Process().cpu_times()
        self.driver_cpu = t.user + t.system - self._cpu_start
        self.workers_cpu = sum(self.cpu1[p] - self.cpu0.get(p, 0.0) for p in self.cpu1)

    def report(self) -> dict:
        mb = 2 ** 20
        return {"driver_cpu_s": round(self.driver_cpu, 1), "workers_cpu_s": round(self.workers_cpu, 1),
                "cpu_s": round(self.driver_cpu + self.workers_cpu, 1),
                "driver_peak_rss_mb": round(self.driver / mb, 1), "workers_peak_rss_sum_mb": round(self.workers / mb, 1),
                "worker_peak_rss_max_mb": round(self.worker_max / mb, 1),
                "peak_rss_total_mb": round((self.driver + self.workers) / mb, 1),
                "driver_peak_private_mb": round(self.driver_private / mb, 1),
                "workers_peak_private_sum_mb": round(self.workers_private / mb, 1),
                "peak_private_total_mb": round((self.driver_private + self.workers_private) / mb, 1)}


def build_phases(db: str, out: str, args) -> tuple[dict, float, object, dict, dict]:
    """:func:`build` with the sharded build's phase times (ragseg.index.build reaches the fault
    points ``index.<stage>`` between its steps, ragseg.faults) and the peak RSS of the driver and the Ray workers."""
    from ragseg import faults
    from ragseg.index import faiss_util as fu
    from ragseg.index import shards as sh

    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        if name.startswith("index."):
            marks[name[len("index."):]] = time.time()

    spent = {"sample_gather_s": 0.0, "train_only_s": 0.0}
    saved_gather, saved_train = sh.gather, fu.train

    def timed(fn, key):
        def w(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.time() - t
        return w

    sh.gather, fu.train = timed(saved_gather, "sample_gather_s"), timed(saved_train, "train_only_s")
    try:
        with _TreeRss() as rss, faults.hooked(mark):
            t0 = time.time()
            res, build_s, cfg = build(db, out, args)
    finally:
        sh.gather, fu.train = saved_gather, saved_train
    rel = {k: round(v - t0, 1) for k, v in marks.items()}
    phases = {"train_s": rel.get("trained"), "add_s": round(rel["shards"] - rel["trained"], 1),
              "merge_s": round(rel["merged"] - rel["shards"], 1),
              "train_add_merge_s": rel.get("merged"),
              "quality_and_publish_s": round(build_s - rel["merged"], 1),
              **{k: round(v, 1) for k, v in spent.items()}}
    return res, build_s, cfg, phases, rss.report()


def single_child(db: str, icfg_json: str, work: str) -> dict:
    """The single-process build (``--_single``): what the sharded build makes, in one process without
    Ray: the same parameters, the same training rows and quality queries (the build's own draws) and
    ragseg's own ``_train``; then every shard read once, added, its exact top-k for the quality
    queries computed and its float16 vectors written to the re-rank store, one shard after the other;
    the index written. No per-shard index, no merge, no nprobe tuning / publish (the sharded build's
    ``quality_and_publish_s`` is reported apart). Peak RSS = this process's VmHWM (``ru_maxrss``
    would carry the parent's peak over the exec)."""
    import faiss

    from ragseg.config import IndexConfig, JobConfig
    from ragseg.index import faiss_util as fu
    from ragseg.index import shards as sh
    from ragseg.index.evaluate import exact_k
    from ragseg.index.params import choose_params
    from ragseg.index.rerank import write_rerank_store

    icfg = IndexConfig.model_validate(json.loads(icfg_json))
    t0 = time.time()
    fdb = sh.load_db(db)
    layout = sh.layout(list(fdb.shards))
    total = fdb.total
    params = choose_params(total, fdb.dim, icfg)
    train_ids = np.sort(np.random.default_rng(icfg.seed).choice(total, size=params.train_size, replace=False))
    nq = min(icfg.recall_queries, total)
    qids = np.sort(np.random.default_rng(icfg.seed + 1).choice(total, size=nq, replace=False))
    parts, qparts = [], []
    for s, start in layout:
        x = sh.read_embeddings(s.uri, s.rows)
        parts.append(x[train_ids[(train_ids >= start) & (train_ids < start + s.rows)] - start])
        qparts.append(x[qids[(qids >= start) & (qids < start + s.rows)] - start])
        del x
    xtrain, queries = np.concatenate(parts), np.concatenate(qparts)
    del parts, qparts
    t_read = time.time()
    with st_quiet():
        index, _ = fu.train(params, fdb.dim, xtrain, False)
    del xtrain
    t_train = time.time()
    kk = exact_k(JobConfig.model_validate({"index": icfg.model_dump()}))
    rerank = write_rerank_store(os.path.join(work, "single-rerank.npy"), total, fdb.dim) if icfg.rerank else None
    exact = []
    for s, start in layout:
        x = sh.read_embeddings(s.uri, s.rows)
        index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        exact.append(sh.exact_topk(x, start, queries, kk))
        if rerank is not None:
            rerank[start:start + len(x)] = x.astype(np.float16)
        del x
    sh.merge_topk(exact, kk)
    if rerank is not None:
        rerank.flush()
        del rerank
    t_add = time.time()
    path = os.path.join(work, "single.index")
    faiss.write_index(index, path)
    t_end = time.time()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "factory": params.factory, "nlist": params.nlist,
            "train_size": params.train_size, "sample_read_s": round(t_read - t0, 1),
            "train_s": round(t_train - t0, 1), "add_exact_rerank_s": round(t_add - t_train, 1),
            "write_s": round(t_end - t_add, 1), "build_s": round(t_end - t0, 1), "index_file": path,
            "peak_rss_mb": round(_vm_hwm_kb() / 1024, 1)}


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def st_quiet():
    from ragseg.index.faiss_util import quiet_stdout

    return quiet_stdout()


def single_build(db: str, work: str, sharded: dict, cfg, queries, exact, labels, args) -> dict:
    """The same index built in one process (:func:`single_child`, a fresh interpreter), its held-out
    quality without re-ranking at the sharded build's nprobe (the sharded one's ``no_rerank`` figure
    at that nprobe is the same measurement), and the sharded / single ratios of build time and peak
    RSS."""
    import subprocess

    import faiss

    from ragseg.config import JobConfig
    from ragseg.index import quality as iq

    icfg = cfg.index.model_dump(mode="json")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_single", db, json.dumps(icfg), work],
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode != 0:
        raise SystemExit(f"single build failed ({proc.returncode})")
    one = json.loads(proc.stdout.strip().splitlines()[-1])
    index = faiss.read_index(one.pop("index_file"))
    if sharded.get("bytes", {}).get("measured", {}).get("what") == "loaded_index":  # searched as a reader does
        from ragseg.index.faiss_util import to_fast_scan

        index = to_fast_scan(index)
    nprobe = sharded["nprobe"]
    faiss.extract_index_ivf(index).nprobe = nprobe
    ens = JobConfig().label.ensemble
    kk = max(iq.RECALL_K, ens.k)
    found = index.search(queries, kk)
    m = iq.evaluate(found, exact, np.full(len(queries), -1), labels, ens.k, ens.retrieval_temperature,
                    iq.label_vocab(np.unique(labels)))
    single_q = {k: round(m[k], 4) for k in ("one_recall_at_1", "one_recall_at_10", "ten_recall_at_10", "vote_agreement")}
    at = next((r for r in sharded["sweep"] if r["nprobe"] == nprobe), {})
    sharded_q = at.get("no_rerank")
    ph, rss = sharded["phases"], sharded["rss"]
    row = {"bench": "index", "setting": sharded["setting"], "variant": "single", "n": sharded["n"],
           "factory": one["factory"], "nlist": one["nlist"], **{k: v for k, v in one.items() if k not in ("factory", "nlist")},
           "heldout_no_rerank_at_nprobe": {"nprobe": nprobe, "single": single_q, "sharded": sharded_q},
           "same_recall": bool(sharded_q is not None and all(abs(single_q[k] - sharded_q[k]) <= 0.01 for k in single_q)),
           "sharded": {"build_s": sharded["build_s"], **ph, **rss},
           "ratio_build_time": round(ph["train_add_merge_s"] / one["build_s"], 3),
           "ratio_build_time_with_quality": round(sharded["build_s"] / one["build_s"], 3),
           "ratio_cpu": round(rss["cpu_s"] / one["cpu_s"], 3) if rss.get("cpu_s") and one.get("cpu_s") else None,
           "ratio_peak_rss_total": round(rss["peak_rss_total_mb"] / one["peak_rss_mb"], 3),
           "ratio_peak_private_total": (round(rss["peak_private_total_mb"] / one["peak_rss_mb"], 3)
                                        if "peak_private_total_mb" in rss else None),
           "ratio_peak_rss_driver": round(rss["driver_peak_rss_mb"] / one["peak_rss_mb"], 3),
           "limit_ratio_build_time": 1.2,
           "note": "ratio_build_time = the sharded build's train + per-shard add tasks + on-disk merge (its phase "
                   "times) over the single build's sample read + train + add + write, both from the same Parquet "
                   "DB and both with the exact top-k of the quality queries and the re-rank store; the sharded "
                   "build then also tunes nprobe, measures quality and publishes (ratio_build_time_with_quality). Peak RSS: the sharded build's driver plus its Ray workers "
                   "(sum of their peaks, sampled) vs the single process's VmHWM. Shared 2-CPU machine: "
                   "other jobs ran meanwhile (loadavg)",
           "loadavg": [round(x, 2) for x in os.getloadavg()]}
    row["ok"] = bool(row["ratio_build_time"] <= row["limit_ratio_build_time"] and row["same_recall"])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="DB size of the main (first) setting")
    ap.add_argument("--n-other", type=int, default=None, help="DB size of the other settings (default: --n)")
    ap.add_argument("--settings", default="medium:1000:1.0,hard:1000:1.5,easy:200:0.8",
                    help="name:classes:spread,...; the first is the main setting")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--modes", type=int, default=20, help="modes (scenes / instances) per class")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=500, help="held-out queries")
    ap.add_argument("--build-queries", type=int, default=1000, help="index.recall_queries of the build")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--nlist-per-sqrt-n", type=float, default=None, help="default: the config default")
    ap.add_argument("--nprobes", default="1,2,4,8,16,32,64,128,256,512,1024")
    ap.add_argument("--rerank-ks", default="256,1024", help="shortlist sizes k' of the sweep")
    ap.add_argument("--batch", type=int, default=32, help="queries per search call in the search-cost runs")
    ap.add_argument("--qps-seconds", type=float, default=2.0)
    ap.add_argument("--variants", default="", help="comma list of index config variants built next to the "
                    f"default on the main setting: {', '.join(VARIANTS)}")
    ap.add_argument("--compare-single", action="store_true",
                    help="main setting: also build the same index in one process and compare build time and RSS")
    ap.add_argument("--search-cost", default="on", choices=["on", "off"], help="off: skip the queries/s runs")
    ap.add_argument("--_single", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--db-cache", default=None,
                    help="keep the generated DB (and its exact neighbours) in this folder and reuse it when the "
                         "data arguments match (the 1M generation takes most of a run's time)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "index.json"))
    args = ap.parse_args()
    if args._single:
        print(json.dumps(single_child(*args._single)))
        return
    args.nprobes = [int(p) for p in args.nprobes.split(",")]
    args.rerank_ks = [int(k) for k in args.rerank_ks.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown --variants {unknown}; known: {list(VARIANTS)}")
    rows = []
    t0 = time.time()
    for i, spec in enumerate(args.settings.split(",")):
        name, classes, spread = spec.split(":")
        n = args.n if i == 0 else (args.n_other or args.n)
        rows += run_setting(name, int(classes), float(spread), n, i == 0, args)
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
           "loadavg_1m_end": os.getloadavg()[0], "total_s": round(time.time() - t0, 1),
           "args": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}}
    prev = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            prev = json.load(f)
    results = {k: r for k, r in prev.get("results", {}).items() if "setting" in r}  # drop the old layout
    for r in rows:  # the file gathers runs of several sizes: each row keeps the run it came from
        results[f"{r['setting']}/{r['n']}/{r['variant']}"] = {**r, "run_env": env}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "results": results}, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
