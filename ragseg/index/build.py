"""Build and refresh index versions from a feature DB (see versions.py for the version layout).

``_run`` calls one function per step below, each taking and returning its state explicitly
(``_Plan``: what to build; ``_Trained``: training record, id layout, quality queries; ``_Added``: the
shard tasks' results; ``_Quality``); the staging dir carries the files from one step to the next.
Steps -> functions: 1 ``_plan``; 2-4 ``_sample_and_train`` (a refresh without retraining:
``_reuse_live``); 5 and 6b ``_add_shards``; 6 ``_write_labels``, ``_merge``; 7 ``_quality``;
8 ``_meta``, ``_publish``. Between steps the fault point ``index.<stage>`` is reached
(:mod:`ragseg.faults`: "trained", "shards", "merged", "before_finalize", "before_publish"; tests
inject failures there, the index benchmark times the phases).

build_index:
  1. read the DB's committed pieces (ragseg.ledger, bulk reads) and check with one listing that
     every piece's file exists (row counts and dims are checked where each file is read)
     -> UserError naming the file otherwise;
  2. choose parameters (params.choose_params) from N, dim and the budget;
  3. draw the training sample and the recall queries: row positions chosen uniformly over all rows
     with ``numpy.random.default_rng(cfg.index.seed)``, read by one Ray task per shard;
  4. train the empty index once (the coarse k-means on faiss GPU when ``faiss.get_num_gpus() > 0``
     and ``index.use_gpu`` allows; CPU otherwise) and serialise it to ``trained.index``;
  5. one Ray task per shard: read the shard, add it to a copy of the trained index with global ids
     (contiguous ranges per shard, in manifest order: ``add_with_ids``), return the serialised shard
     index, the shard's labels and the shard's exact top-k for the recall queries (IndexFlatIP
     semantics: brute-force inner product), so the exact ground truth costs no extra pass;
  6. merge the shards' inverted lists on disk (faiss.contrib.ondisk.merge_ondisk) into
     ``merged.ivfdata`` + ``populated.index``; write ``labels.parquet``;
  6b. with ``index.rerank`` (default) every shard task also returns its float16 vectors, written in
     id order into the re-rank store ``rerank.npy`` of the staging dir (rerank.py);
  7. quality (evaluate.py :func:`evaluate_index`, metrics in ragseg.index.quality): the merged index is opened
     from the staging dir as a reader will open it (re-ranking included; 4-bit codes converted to
     fast-scan, whose in-memory size is measured on this loaded index). The quality queries are
     database vectors (self-matches excluded); the even-numbered half tunes nprobe (``index.nprobe:
     auto``: the smallest power of two up to ``index.max_nprobe`` whose 10-recall@10 and kNN-vote
     agreement reach ``index.target_recall_at_10`` / ``index.target_vote_agreement``; else the
     smallest within 0.01 of the best value seen of both, where more probes stop paying), the
     other half measures 1-recall@1, 1-recall@10, 10-recall@10 and the vote
     agreement at the chosen nprobe (and, for comparison, without re-ranking);
  8. the publish gate (evaluate.py :func:`quality_gate`): below ``index.min_recall_at_10`` (10-recall@10) or
     ``index.min_vote_agreement`` the build stops with one line and CURRENT stays where it was;
     else write ``meta.json`` (last: a version dir is complete when it has meta.json), move the
     staging dir into place (local: one rename; remote: upload, meta.json last), replace CURRENT
     atomically, then prune old versions.
  Anything failing before step 8's publish leaves CURRENT where it was.

refresh_index (``_plan``, ``_retrain_reason``): adds the shards that the DB manifest lists and the
live version's meta lacks (matched by shard name; a shard of the live version that disappeared from
the DB, or whose row count changed, is a UserError: rebuild). Without retraining it copies
``trained.index`` and the live version's merged lists (``populated.index`` + ``merged.ivfdata``; hard
links on local stores), adds only the new shards (ids continue after the live count)
and re-merges. Nothing new -> nothing is published and the result says so. Retrain rule (a full
build with a new training sample, new parameters and new ids):
  * ``force_retrain``; or
  * growth: the total count exceeds ``GROWTH_RETRAIN`` (4) x the count the quantizer was trained on
    (the parameter rule would pick a markedly larger nlist); or
  * drift: the mean coarse quantisation error (squared L2 distance from a vector, after the OPQ
    rotation if any, to its nearest IVF centroid) of up to ``DRIFT_SAMPLE`` new vectors exceeds
    ``index.drift_ratio`` x the same error measured on the training sample at training time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ragseg import faults, provenance
from ragseg import io as rio
from ragseg.config import JobConfig
from ragseg.errors import UserError
from ragseg.index import faiss_util as fu
from ragseg.index import rerank as rr
from ragseg.index import shards as sh
from ragseg.index import versions as vs
from ragseg.index.evaluate import LabelsById, evaluate_index, exact_k, quality_gate, size_report
from ragseg.index.params import METRIC, IndexParams, choose_params
from ragseg.index.shards import DbShard, FeatureDb, load_db

log = logging.getLogger(__name__)

GROWTH_RETRAIN = 4.0
DRIFT_SAMPLE = 5000
ERROR_SAMPLE = 10000  # training vectors used to measure the reference coarse error
LIVE_DIR = "_live"  # staging copy of the live version's merged lists during an incremental refresh


def _checkpoint(stage: str) -> None:
    """The fault point ``index.<stage>`` between build steps (:mod:`ragseg.faults`)."""
    faults.point(f"index.{stage}")


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def build_index(db_uri: str, cfg: JobConfig) -> dict:
    """Build a new index version from every shard of the DB and publish it (see module doc)."""
    return _run(db_uri, cfg, refresh=False, force_retrain=False)


def refresh_index(db_uri: str, cfg: JobConfig, force_retrain: bool = False) -> dict:
    """Add the DB's new shards to a new version (retrain when forced, on growth or drift)."""
    return _run(db_uri, cfg, refresh=True, force_retrain=force_retrain)


def _run(db_uri: str, cfg: JobConfig, refresh: bool, force_retrain: bool) -> dict:
    """The steps of the module doc; the staging dir is removed whatever happens."""
    t0 = time.time()
    plan = _plan(db_uri, cfg, refresh, force_retrain)
    if plan.nothing_new:
        return _nothing_new(plan)
    staging = vs.new_staging(plan.store_uri)
    try:
        trained = _reuse_live(plan, staging) if plan.incremental else _sample_and_train(plan, staging)
        _checkpoint("trained")
        added = _add_shards(plan, trained, staging)
        _checkpoint("shards")
        labels_by_id, vocab, prov = _write_labels(plan, added.new_labels, staging)
        del added.new_labels[:]  # in labels.parquet now
        _merge(plan, trained, staging)
        _checkpoint("merged")
        quality = _quality(plan, trained, added, labels_by_id, staging)
        del labels_by_id
        meta = _meta(plan, trained, quality, vocab, prov)
        version = _publish(plan, staging, meta, trained.trained_from, t0)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    deleted = vs.prune(plan.store_uri, cfg.index.keep_versions, cfg.index.prune_grace_s)
    return _result(meta, version, deleted)


# ----------------------------------------------------------------------------------------------
# Step state
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What a run builds, decided before the staging dir exists (step 1 and the refresh rule)."""

    cfg: JobConfig
    refresh: bool
    db: FeatureDb
    live: str | None
    live_meta: dict | None
    new_shards: list[DbShard]
    retrain_reason: str | None
    drift: dict | None
    nothing_new: bool = False  # a refresh with no new shard (and no forced retrain): publish nothing

    @property
    def store_uri(self) -> str:
        return self.cfg.index.out

    @property
    def incremental(self) -> bool:
        """A refresh that keeps the live version's training (and ids): add the new shards only."""
        return self.refresh and self.live_meta is not None and self.retrain_reason is None


@dataclass(frozen=True)
class _Trained:
    """Steps 2-4 (the trained index itself is ``trained.index`` in the staging dir): the global id
    layout, the shards to add, the quality queries and the training record for meta.json."""

    layout: list[tuple[DbShard, int]]
    params: IndexParams
    queries: np.ndarray
    qids: np.ndarray
    add_names: set[str]
    trained_from: str | None  # None: this version
    trained_count: int
    train_err: float
    gpu_train: bool


@dataclass(frozen=True)
class _Added:
    """Step 5 (the shard indexes are ``shards/<name>.index`` in the staging dir, the vectors its
    re-rank store): the exact top-k of the quality queries, the new rows' labels, meta["rerank"]."""

    exact: tuple[np.ndarray, np.ndarray]
    new_labels: list[pa.Table]
    rerank_meta: dict


@dataclass(frozen=True)
class _Quality:
    """Step 7: quality metrics, chosen nprobe, tuning record, size report, meta["rerank"]."""

    recall: dict
    nprobe: int
    tuning: dict
    sizes: dict
    rerank_meta: dict


# ----------------------------------------------------------------------------------------------
# Step 1: what to build
# ----------------------------------------------------------------------------------------------
def _plan(db_uri: str, cfg: JobConfig, refresh: bool, force_retrain: bool) -> _Plan:
    """Read the DB and the live version, start Ray; for a refresh: the new shards and the retrain
    rule (module doc)."""
    store_uri = cfg.index.out
    db = load_db(db_uri)
    if db.total == 0:
        raise UserError(f"feature DB {db_uri} has no rows to index")
    rio.makedirs(store_uri)
    live = vs.current_version(store_uri)
    live_meta = vs.read_meta(store_uri, live) if live else None
    from ragseg.runtime import init_ray

    init_ray(cfg.ray)
    if not refresh:
        return _Plan(cfg, False, db, live, live_meta, list(db.shards), "initial build", None)
    if live_meta is None:
        return _Plan(cfg, True, db, live, None, list(db.shards), "no live version", None)
    _check_compatible(db, live_meta)
    known = {s["name"] for s in live_meta["shards"]}
    new_shards = [s for s in db.shards if s.name not in known]
    if not new_shards and not force_retrain:
        return _Plan(cfg, True, db, live, live_meta, [], None, None, nothing_new=True)
    reason, drift = _retrain_reason(db, live, live_meta, new_shards, cfg, force_retrain)
    return _Plan(cfg, True, db, live, live_meta, new_shards, reason, drift)


def _nothing_new(plan: _Plan) -> dict:
    assert plan.live_meta is not None
    known = {s["name"] for s in plan.live_meta["shards"]}
    return {"published": False, "version": plan.live, "count": plan.live_meta["count"], "added_shards": [],
            "message": f"nothing new: all {len(known)} DB shards are already in {plan.live}; nothing published"}


def _retrain_reason(db: FeatureDb, live: str, live_meta: dict, new_shards: list[DbShard], cfg: JobConfig,
                    force_retrain: bool) -> tuple[str | None, dict | None]:
    """(why a refresh retrains, or None; the drift measurement when it was made)."""
    icfg = cfg.index
    if force_retrain:
        return "forced", None
    if db.total > GROWTH_RETRAIN * live_meta["trained_count"]:
        return (f"growth: {db.total} vectors > {GROWTH_RETRAIN:g} x {live_meta['trained_count']} "
                "trained on"), None
    trained = _read_trained(icfg.out, live)
    new_layout = sh.layout(new_shards)
    rng = np.random.default_rng(icfg.seed + 2)
    n_new = sum(s.rows for s in new_shards)
    pick = np.sort(rng.choice(n_new, size=min(DRIFT_SAMPLE, n_new), replace=False))
    err = fu.coarse_error(trained, sh.gather(new_layout, pick))
    ref = max(float(live_meta.get("train_coarse_error", 0.0)), 1e-12)
    drift = {"new_error": err, "train_error": ref, "ratio": err / ref, "threshold": icfg.drift_ratio}
    if err / ref > icfg.drift_ratio:
        return f"drift: coarse error ratio {err / ref:.2f} > {icfg.drift_ratio}", drift
    return None, drift


def _check_compatible(db: FeatureDb, meta: dict) -> None:
    for key, have in (("dim", db.dim), ("embed_model", db.embed_model), ("embed_mode", db.embed_mode)):
        if meta.get(key) != have:
            raise UserError(f"DB {db.uri} has {key}={have!r} but the live index has {meta.get(key)!r}; "
                            "run build-index to rebuild")
    if db.embedder and isinstance(meta.get("embedder"), dict):
        from ragseg import identity

        diff, _ = identity.compare(identity.index_identity(meta), identity.header_identity({"embedder": db.embedder}))
        if diff:
            raise UserError(f"DB {db.uri} and the live index differ in the embedder's {', '.join(diff)}; "
                            "run build-index to rebuild")
    by_name = {s.name: s for s in db.shards}
    for s in meta["shards"]:
        cur = by_name.get(s["name"])
        if cur is None:
            raise UserError(f"shard {s['name']} of the live index is no longer in the DB manifest "
                            f"{rio.join(db.uri, 'manifest.json')}; run build-index to rebuild")
        if cur.rows != s["rows"]:
            raise UserError(f"shard {s['name']} changed ({s['rows']} -> {cur.rows} rows) since it was indexed; "
                            "run build-index to rebuild")


def _read_trained(store_uri: str, version: str):
    import faiss

    d = tempfile.mkdtemp(prefix="ragseg-trained-")
    try:
        p = os.path.join(d, vs.TRAINED)
        vs.fetch_file(store_uri, version, vs.TRAINED, p)
        return faiss.read_index(p)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Steps 2-4: parameters, sample, training (or the live version's training, refresh)
# ----------------------------------------------------------------------------------------------
def _query_ids(cfg: JobConfig, total: int) -> np.ndarray:
    """Global ids of the quality queries (uniform, ``index.seed + 1``)."""
    nq = min(cfg.index.recall_queries, total)
    return np.sort(np.random.default_rng(cfg.index.seed + 1).choice(total, size=nq, replace=False))


def _sample_and_train(plan: _Plan, staging: str) -> _Trained:
    """Choose parameters, read the training sample and the quality queries, train and write
    ``trained.index`` into the staging dir."""
    import faiss

    icfg, db = plan.cfg.index, plan.db
    layout = sh.layout(list(db.shards))
    total = db.total
    params = choose_params(total, db.dim, icfg)
    rng = np.random.default_rng(icfg.seed)
    train_ids = np.sort(rng.choice(total, size=params.train_size, replace=False))
    qids = _query_ids(plan.cfg, total)
    both = sh.gather(layout, np.concatenate([train_ids, qids]))
    xtrain, queries = both[: len(train_ids)], both[len(train_ids):]
    with fu.quiet_stdout():
        index, gpu_train = fu.train(params, db.dim, xtrain, fu.use_gpu_for(icfg.use_gpu))
    esample = xtrain[np.random.default_rng(icfg.seed + 3).permutation(len(xtrain))[:ERROR_SAMPLE]]
    train_err = fu.coarse_error(index, esample)
    del xtrain, both, esample
    faiss.write_index(index, os.path.join(staging, vs.TRAINED))
    return _Trained(layout, params, queries, qids, {s.name for s in db.shards}, None, total, train_err, gpu_train)


def _reuse_live(plan: _Plan, staging: str) -> _Trained:
    """Incremental refresh: the live version's parameters and training; its ``trained.index`` and
    merged lists (two files, not one per old shard) copied into the staging dir."""
    icfg, db, live_meta, live = plan.cfg.index, plan.db, plan.live_meta, plan.live
    assert live_meta is not None and live is not None
    by_name = {s.name: s for s in db.shards}
    layout_old = [(by_name[s["name"]], int(s["start_id"])) for s in live_meta["shards"]]
    layout = layout_old + sh.layout(plan.new_shards, int(live_meta["count"]))
    for rel in (vs.TRAINED, f"{LIVE_DIR}/{vs.POPULATED}", f"{LIVE_DIR}/{vs.IVFDATA}"):
        vs.fetch_file(icfg.out, live, rel.removeprefix(LIVE_DIR + "/"), os.path.join(staging, rel))
    qids = _query_ids(plan.cfg, db.total)
    queries = sh.gather(layout, qids)
    return _Trained(layout, IndexParams(**live_meta["params"]), queries, qids, {s.name for s in plan.new_shards},
                    live_meta["trained_from"], live_meta["trained_count"], live_meta["train_coarse_error"],
                    live_meta.get("gpu_train", False))


# ----------------------------------------------------------------------------------------------
# Steps 5, 6b: one task per shard (add, exact top-k, re-rank vectors)
# ----------------------------------------------------------------------------------------------
def _add_shards(plan: _Plan, trained: _Trained, staging: str) -> _Added:
    """One task per shard: add (new shards) and exact top-k (all shards); shard indexes and the
    re-rank store written into the staging dir."""
    cfg, db = plan.cfg, plan.db
    with open(os.path.join(staging, vs.TRAINED), "rb") as f:
        trained_ref = ray.put(f.read())
    q_ref = ray.put(trained.queries)
    kk = exact_k(cfg)
    refs = [sh.shard_task.remote(trained_ref if s.name in trained.add_names else None, s.uri, s.rows, start, q_ref,
                                 kk, cfg.index.rerank)
            for s, start in trained.layout]
    os.makedirs(os.path.join(staging, vs.SHARDS_DIR), exist_ok=True)
    exact_parts, new_labels = [], []
    rerank_store = rr.open_rerank_writer(staging, cfg, db.total, db.dim)
    for (s, start), ref in zip(trained.layout, refs):
        blob, labels, exact, vectors = sh.ray_get(ref)
        rr.write_rerank_rows(rerank_store, start, vectors)
        del vectors
        if blob is not None:
            with open(os.path.join(staging, vs.SHARDS_DIR, f"{s.name}.index"), "wb") as f:
                f.write(blob)
            new_labels.append(_labels_table(s, start, labels))
        exact_parts.append(exact)
        del blob
    del trained_ref
    rerank_meta = rr.close_rerank_writer(rerank_store)
    del rerank_store
    return _Added(sh.merge_topk(exact_parts, kk), new_labels, rerank_meta)


def _labels_table(s: DbShard, start: int, labels: dict) -> pa.Table:
    n = len(labels["label"])
    return pa.table({
        "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "label": pa.array(labels["label"], pa.string()),
        "image_id": pa.array([str(v) for v in labels["image_id"]], pa.string()),
        "segment_id": pa.array(labels["segment_id"], pa.int64()),
        "shard": pa.array([s.name] * n, pa.string()),
    })


# ----------------------------------------------------------------------------------------------
# Step 6: labels.parquet, merged inverted lists
# ----------------------------------------------------------------------------------------------
def _write_labels(plan: _Plan, new_labels: list[pa.Table], staging: str) -> tuple[LabelsById, int, dict]:
    """``labels.parquet``: old (incremental) + new rows, ordered by id -> (labels by id, number of
    distinct labels, the run's provenance)."""
    cfg, db = plan.cfg, plan.db
    tables = []
    if plan.incremental:
        old_lab = os.path.join(staging, "_old_labels.parquet")
        vs.fetch_file(plan.store_uri, plan.live, vs.LABELS, old_lab)
        tables.append(pq.read_table(old_lab).select(["id", "label", "image_id", "segment_id", "shard"]))
        os.remove(old_lab)
    tables += new_labels
    labels_tab = pa.concat_tables([t.cast(tables[0].schema) for t in tables]).sort_by("id")
    if not np.array_equal(labels_tab.column("id").to_numpy(), np.arange(db.total)):
        raise RuntimeError("internal error: label ids are not 0..N-1")
    prov = provenance.job_provenance(cfg, "refresh" if plan.refresh else "build-index",
                                     index={"uri": plan.store_uri}, db={"uri": db.uri, "provenance": db.provenance})
    pq.write_table(provenance.attach(labels_tab, prov), os.path.join(staging, vs.LABELS), compression="zstd")
    labels_by_id = LabelsById(labels_tab.column("label"))
    vocab = len(set(labels_by_id.names.tolist()) - {""})
    return labels_by_id, vocab, prov


def _merge(plan: _Plan, trained: _Trained, staging: str) -> None:
    """Merge the new shards' inverted lists (and, incremental, the live version's) on disk into
    ``merged.ivfdata`` + ``populated.index``."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    shard_files = [os.path.join(staging, vs.SHARDS_DIR, f"{s.name}.index") for s, _ in trained.layout
                   if s.name in trained.add_names]
    with fu.quiet_stdout():
        merged = faiss.read_index(os.path.join(staging, vs.TRAINED))
        if plan.incremental:
            fu.merge_with_live(merged, os.path.join(staging, LIVE_DIR, vs.POPULATED), shard_files,
                               os.path.abspath(os.path.join(staging, vs.IVFDATA)))
            shutil.rmtree(os.path.join(staging, LIVE_DIR), ignore_errors=True)
        else:
            merge_ondisk(merged, shard_files, os.path.abspath(os.path.join(staging, vs.IVFDATA)))
        faiss.write_index(merged, os.path.join(staging, vs.POPULATED))


# ----------------------------------------------------------------------------------------------
# Step 7: quality of the merged index as a reader will search it; nprobe tuned to the targets
# ----------------------------------------------------------------------------------------------
def _quality(plan: _Plan, trained: _Trained, added: _Added, labels_by_id: LabelsById, staging: str) -> _Quality:
    icfg, db, params = plan.cfg.index, plan.db, trained.params
    rerank_meta = dict(added.rerank_meta)
    if rerank_meta.get("file"):
        rerank_meta["k"] = icfg.rerank_k
    base = {"count": db.total, "dim": db.dim, "nlist": params.nlist, "rerank": rerank_meta,
            "params": params.to_dict()}
    recall, nprobe, tuning, loaded = evaluate_index(staging, base, trained.queries, trained.qids, added.exact,
                                                    labels_by_id, plan.cfg)
    sizes = size_report(staging, params, db.dim, db.total, loaded)
    return _Quality(recall, nprobe, tuning, sizes, rerank_meta)


# ----------------------------------------------------------------------------------------------
# Step 8: meta.json, publish gate, finalize, CURRENT
# ----------------------------------------------------------------------------------------------
def _meta(plan: _Plan, trained: _Trained, q: _Quality, vocab: int, prov: dict) -> dict:
    """meta.json (``created``, ``build_seconds``, ``version`` and ``trained_from`` added at publish)."""
    db, params = plan.db, trained.params
    shards_meta = [{"name": s.name, "rows": s.rows, "start_id": start, "input_key": s.input_key}
                   for s, start in trained.layout]
    return {
        "format": 1,
        "factory": params.factory, "metric": METRIC, "dim": db.dim, "count": db.total,
        "nlist": params.nlist, "m": params.m, "opq": params.opq, "code_bytes": params.code_bytes,
        "bits": params.bits, "fast_scan": params.fast_scan,
        "train_size": params.train_size, "params": params.to_dict(), "nprobe": q.nprobe,
        "trained_count": trained.trained_count, "train_coarse_error": trained.train_err,
        "gpu_train": bool(trained.gpu_train),
        "embed_model": db.embed_model, "embed_mode": db.embed_mode, "embedder": db.embedder, "db_uri": db.uri,
        "db_config_hash": db.config_hash, "shards": shards_meta, "labels_count": vocab,
        "recall": q.recall, "mode": "refresh" if plan.refresh else "build", "retrain_reason": plan.retrain_reason,
        "drift": plan.drift, "added_shards": [s.name for s in (plan.new_shards if plan.incremental else db.shards)],
        "bytes": q.sizes, "rerank": q.rerank_meta, "nprobe_tuning": q.tuning,
        "previous_version": plan.live, "provenance": prov,
    }


def _publish(plan: _Plan, staging: str, meta: dict, trained_from: str | None, t0: float) -> str:
    """The publish gate, then meta.json + move/upload of the staging dir, then CURRENT."""
    quality_gate(meta["recall"], plan.cfg, meta["factory"], plan.live)
    _checkpoint("before_finalize")
    meta["created"] = time.time()
    meta["build_seconds"] = round(meta["created"] - t0, 3)
    version = vs.finalize_with_meta(plan.store_uri, staging, meta, trained_from)
    _checkpoint("before_publish")
    vs.publish(plan.store_uri, version)
    return version


def _result(meta: dict, version: str, deleted: list[str]) -> dict:
    return {
        "published": True, "version": version, "previous_version": meta["previous_version"], "count": meta["count"],
        "factory": meta["factory"], "nlist": meta["nlist"], "m": meta["m"], "nprobe": meta["nprobe"],
        "recall": meta["recall"], "mode": meta["mode"], "retrain_reason": meta["retrain_reason"],
        "drift": meta["drift"], "added_shards": meta["added_shards"], "pruned": deleted,
        "build_seconds": meta["build_seconds"], "bytes_per_vector": meta["bytes"]["per_vector"],
        "rerank_k": meta["rerank"]["k"], "nprobe_tuning": meta["nprobe_tuning"],
    }
