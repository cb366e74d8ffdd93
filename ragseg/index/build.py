"""Build and refresh index versions from a feature DB (see store.py for the version layout).

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
     id order into the re-rank store ``rerank.npy`` of the staging dir (store.py);
  7. quality (:func:`evaluate_index`, metrics in ragseg.index.quality): the merged index is opened
     from the staging dir as a reader will open it (re-ranking included; 4-bit codes converted to
     fast-scan, whose in-memory size is measured on this loaded index). The quality queries are
     database vectors (self-matches excluded); the even-numbered half tunes nprobe (``index.nprobe:
     auto``: the smallest power of two up to ``index.max_nprobe`` whose 10-recall@10 and kNN-vote
     agreement reach ``index.target_recall_at_10`` / ``index.target_vote_agreement``; else the
     smallest within 0.01 of the best value seen of both, where more probes stop paying), the
     other half measures 1-recall@1, 1-recall@10, 10-recall@10 and the vote
     agreement at the chosen nprobe (and, for comparison, without re-ranking);
  8. the publish gate (:func:`quality_gate`): below ``index.min_recall_at_10`` (10-recall@10) or
     ``index.min_vote_agreement`` the build stops with one line and CURRENT stays where it was;
     else write ``meta.json`` (last: a version dir is complete when it has meta.json), move the
     staging dir into place (local: one rename; remote: upload, meta.json last), replace CURRENT
     atomically, then prune old versions.
  Anything failing before step 8's publish leaves CURRENT where it was.

refresh_index: adds the shards that the DB manifest lists and the live version's meta lacks (matched
by shard name; a shard of the live version that disappeared from the DB, or whose row count
changed, is a UserError: rebuild). Without retraining it copies ``trained.index`` and the old shard
indexes (hard links on local stores), adds only the new shards (ids continue after the live count)
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
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ragseg import io as rio
from ragseg import provenance
from ragseg.config import JobConfig
from ragseg.errors import UserError
from ragseg.index import quality as iq
from ragseg.index import store as st
from ragseg.index.params import METRIC, IndexParams, choose_params, params_fixed_bytes
from ragseg.schema import arrow_to_embeddings

log = logging.getLogger(__name__)

GROWTH_RETRAIN = 4.0
DRIFT_SAMPLE = 5000
ERROR_SAMPLE = 10000  # training vectors used to measure the reference coarse error
RECALL_K = iq.RECALL_K
ID_BYTES = 8  # faiss stores one int64 id per vector in the inverted lists
SATURATION_TOL = 0.01  # nprobe tuning: a metric within this of its best is "saturated"


# ----------------------------------------------------------------------------------------------
# Feature DB
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DbShard:
    name: str
    uri: str
    rows: int
    input_key: str = ""


@dataclass(frozen=True)
class FeatureDb:
    uri: str
    dim: int
    embed_model: str
    embed_mode: str
    config_hash: str
    shards: tuple[DbShard, ...]
    embedder: dict | None = None  # ragseg.identity: the keys' embedder identity + models.clip section
    provenance: dict | None = None  # ragseg.provenance: the DB's (its manifest's)

    @property
    def total(self) -> int:
        return sum(s.rows for s in self.shards)


def load_db(db_uri: str, check_files: bool = True) -> FeatureDb:
    """The committed pieces of a feature DB (ragseg.ledger: header + segments + commit records, read
    in bulk). ``check_files``: one listing of ``features/`` confirms every piece's file is there;
    row counts and dims are checked by the per-shard tasks that read them."""
    from ragseg import db as dblib

    led = dblib.open_db(db_uri)
    if led is None:
        raise UserError(f"feature DB manifest not found: {rio.join(db_uri, 'manifest.json')} (run build-db first)")
    h = led.header
    t = led.records.select(["name", "data_path", "segments"]).to_pydict()
    shards = tuple(DbShard(n, rio.join(db_uri, p), int(r)) for n, p, r in zip(t["name"], t["data_path"], t["segments"]))
    from ragseg import identity

    embedder = {**identity.header_identity(h), "clip": identity.header_clip(h)}
    db = FeatureDb(db_uri, int(h["dim"]), str(h.get("embed_model", "")), str(h.get("embed_mode", "")),
                   str(h.get("models_hash", "")), shards, embedder, h.get("provenance"))
    if check_files and shards:
        present = set(rio.list_dir(rio.join(db_uri, "features")))
        for s in shards:
            if s.uri not in present:
                raise UserError(f"feature shard {s.uri} is committed in the DB but missing")
    return db


def check_shard_file(s: DbShard, dim: int) -> None:
    fs, path = rio.fs_and_path(s.uri)
    if not fs.exists(path):
        raise UserError(f"feature shard {s.uri} is listed in the DB manifest but missing")
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            nrows = pf.metadata.num_rows
            schema = pf.schema_arrow
    except Exception as e:
        raise UserError(f"feature shard {s.uri} is corrupt or not Parquet ({type(e).__name__}: {e})") from None
    if nrows != s.rows:
        raise UserError(f"feature shard {s.uri} has {nrows} rows but the DB manifest says {s.rows}")
    if "embedding" not in schema.names:
        raise UserError(f"feature shard {s.uri} has no 'embedding' column")
    t = schema.field("embedding").type
    size = getattr(t, "list_size", None)
    if size != dim:
        raise UserError(f"feature shard {s.uri}: embedding dim {size} != manifest dim {dim}")


def _read_embeddings(uri: str, expected_rows: int) -> np.ndarray:
    try:
        tab = rio.read_parquet(uri, columns=["embedding"])
    except Exception as e:
        raise UserError(f"feature shard {uri} is corrupt or unreadable ({type(e).__name__}: {e})") from None
    if tab.num_rows != expected_rows:
        raise UserError(f"feature shard {uri} has {tab.num_rows} rows but the DB manifest says {expected_rows}")
    if tab.num_rows == 0:
        return np.zeros((0, tab.schema.field("embedding").type.list_size), np.float32)
    x = np.ascontiguousarray(arrow_to_embeddings(tab.column("embedding")), dtype=np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"feature shard {uri} contains non-finite embeddings")
    return x


# ----------------------------------------------------------------------------------------------
# Ray tasks
# ----------------------------------------------------------------------------------------------
def _exact_topk(x: np.ndarray, start: int, queries: np.ndarray | None, k: int):
    """Exact inner-product top-k of ``queries`` among the rows of ``x`` (global ids from start)."""
    if queries is None or len(queries) == 0:
        return None
    nq = len(queries)
    if len(x) == 0:
        return np.full((nq, 0), -np.inf, np.float32), np.zeros((nq, 0), np.int64)
    sims = queries @ x.T  # (nq, rows)
    kk = min(k, x.shape[0])
    part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    ps = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(ps, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64) + start


@ray.remote(num_cpus=1)
def _read_rows_task(uri: str, rows: int, local_rows: np.ndarray) -> np.ndarray:
    return _read_embeddings(uri, rows)[local_rows]


@ray.remote(num_cpus=1)
def _shard_task(trained: bytes | None, uri: str, rows: int, start: int, queries: np.ndarray | None, k: int,
                want_vectors: bool = False):
    """Read one shard; add it (ids start..start+rows) to a copy of the trained index when given;
    return (serialised shard index | None, labels dict | None, exact top-k | None, float16 vectors
    for the re-rank store | None)."""
    import faiss

    x = _read_embeddings(uri, rows)
    blob = labels = None
    if trained is not None:
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        if len(x):
            index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        blob = faiss.serialize_index(index).tobytes()
        tab = rio.read_parquet(uri, columns=["label", "image_id", "segment_id"])
        labels = {
            "label": [str(v) if v is not None else "" for v in tab.column("label").cast(pa.string()).to_pylist()],
            "image_id": tab.column("image_id").to_pylist(),
            "segment_id": tab.column("segment_id").to_numpy(zero_copy_only=False).astype(np.int64),
        }
    return blob, labels, _exact_topk(x, start, queries, k), (x.astype(np.float16) if want_vectors else None)


def _ray_get(refs):
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise


# ----------------------------------------------------------------------------------------------
# faiss helpers
# ----------------------------------------------------------------------------------------------
def _transform(index, x: np.ndarray) -> np.ndarray:
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def coarse_error(index, x: np.ndarray) -> float:
    """Mean squared L2 distance of ``x`` (after the index's pre-transform) to its nearest IVF
    centroid (assignment by the quantizer, inner product here)."""
    import faiss

    if len(x) == 0:
        return 0.0
    ivf = faiss.extract_index_ivf(index)
    xt = _transform(index, x)
    _, assign = ivf.quantizer.search(xt, 1)
    cents = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    diff = xt - cents[assign[:, 0]]
    return float(np.mean(np.sum(diff * diff, axis=1)))


def _train(params: IndexParams, dim: int, x: np.ndarray, use_gpu: bool):
    import faiss

    try:
        index = faiss.index_factory(dim, params.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"invalid faiss factory string {params.factory!r}: {str(e).splitlines()[0]}") from None
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        raise UserError(f"factory {params.factory!r} is not an IVF index: the sharded build merges "
                        "inverted lists, so index.factory must contain IVF<n>") from None
    if hasattr(ivf, "do_polysemous_training"):
        faiss.downcast_index(ivf).do_polysemous_training = False  # slow, and we never search with it
    if params.m and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        ivf.by_residual = bool(params.by_residual)
    gpu = False
    if use_gpu:
        try:  # coarse k-means on the GPU(s); the rest of training is cheap on the CPU
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
            gpu = True
        except Exception as e:
            log.warning("GPU training unavailable (%s); training on CPU", e)
    index.train(x)
    if gpu:
        ivf.clustering_index = None
    return index, gpu


def _merge_topk(parts: list, k: int):
    sims = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


# ----------------------------------------------------------------------------------------------
# Quality: re-rank store, evaluation, nprobe tuning, publish gate
# ----------------------------------------------------------------------------------------------
def exact_k(cfg: JobConfig) -> int:
    """Exact neighbours computed per quality query: enough for recall@10 and the label job's vote,
    plus the query itself."""
    return max(RECALL_K, cfg.label.ensemble.k) + 1


def open_rerank_writer(staging: str, cfg: JobConfig, total: int, dim: int):
    """The re-rank store being written in the staging dir (None when ``index.rerank`` is off)."""
    if not cfg.index.rerank:
        return None
    return st.write_rerank_store(os.path.join(staging, st.RERANK), total, dim)


def write_rerank_rows(store, start: int, vectors) -> None:
    if store is not None and vectors is not None and len(vectors):
        store[start:start + len(vectors)] = vectors


def close_rerank_writer(store) -> dict:
    """Flush the store; the ``meta["rerank"]`` entry (k 0 = no re-ranking)."""
    if store is None:
        return {"k": 0}
    store.flush()
    return {"k": 0, "file": st.RERANK, "dtype": "float16"}


class _LabelsById:
    """Labels by database id without a Python string per row: dictionary codes + names."""

    def __init__(self, column: pa.ChunkedArray):
        enc = column.cast(pa.string()).fill_null("").dictionary_encode().combine_chunks()
        self.codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.names = np.asarray(enc.dictionary.to_pylist(), dtype=object)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, ids):
        return self.names[self.codes[ids]]


def _split_queries(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the tuning half (even) and the evaluation half (odd) of ``n`` queries."""
    pos = np.arange(n)
    if n < 2:
        return pos, pos
    return pos[0::2], pos[1::2]


def evaluate_index(staging: str, meta: dict, queries: np.ndarray, qids: np.ndarray, exact: tuple,
                   labels, cfg: JobConfig) -> tuple[dict, int, dict, int | None]:
    """Tune nprobe on one half of the quality queries and measure the other half (module doc, step
    7). ``exact`` = (sims, ids) exact top-k of every query (self included), ``labels[ids]`` the
    labels. Returns (quality dict, chosen nprobe, tuning record, bytes the reader holds in memory
    when it loaded the lists (fast-scan), else None)."""
    icfg, ens = cfg.index, cfg.label.ensemble
    vote_k, temp = ens.k, ens.retrieval_temperature
    kk = max(RECALL_K, vote_k) + 1
    vocab = iq.label_vocab(getattr(labels, "names", labels))
    reader = st.Index.from_dir(staging, meta, use_gpu=icfg.use_gpu)
    rerank_k = reader.rerank_k
    nlist = int(meta.get("nlist", 0))
    tune, ev = _split_queries(len(qids))
    e_sims, e_ids = exact

    def measure(pos: np.ndarray) -> dict:
        found = reader.search_ids(queries[pos], kk)
        return iq.evaluate(found, (e_sims[pos], e_ids[pos]), qids[pos], labels, vote_k, temp, vocab)

    target = {"ten_recall_at_10": icfg.target_recall_at_10, "vote_agreement": icfg.target_vote_agreement}
    tried = []
    met = None
    if icfg.nprobe == "auto":
        limit = max(1, min(icfg.max_nprobe, nlist or 1))
        cands = sorted({min(2 ** i, limit) for i in range(0, 32) if 2 ** i <= 2 * limit})
        for p in cands:
            reader.nprobe = p
            m = measure(tune)
            tried.append({"nprobe": reader.nprobe, **{k: m[k] for k in ("ten_recall_at_10", "vote_agreement")}})
            if all(m[k] >= v for k, v in target.items()):
                met = reader.nprobe
                break
        nprobe = met if met is not None else _saturated(tried, list(target))
    else:
        nprobe = int(icfg.nprobe)
    reader.nprobe = nprobe
    quality = measure(ev)
    if rerank_k:
        reader.rerank_k = 0
        plain = measure(ev)
        quality["without_rerank"] = {k: plain[k] for k in
                                     ("one_recall_at_1", "one_recall_at_10", "ten_recall_at_10", "vote_agreement")}
    quality.update({"at1": quality["one_recall_at_1"], "at10": quality["ten_recall_at_10"],  # format-1 keys
                    "nprobe": nprobe, "rerank_k": rerank_k, "tuning_queries": int(len(tune))})
    tuning = {"mode": "auto" if icfg.nprobe == "auto" else "fixed", "target": target, "tried": tried,
              "met": met is not None if icfg.nprobe == "auto" else None, "chosen": nprobe,
              "queries": int(len(tune))}
    return quality, nprobe, tuning, _loaded_bytes(reader.index, staging, meta)


def _loaded_bytes(index, staging: str, meta: dict) -> int | None:
    """Serialised size of a reader's index whose inverted lists live in memory (fast-scan): the
    index as a reader holds it, measured, not derived from the parameters."""
    import faiss

    if not (meta.get("params") or {}).get("fast_scan"):
        return None
    path = os.path.join(staging, "_loaded.index")
    try:
        faiss.write_index(index, path)
        return os.path.getsize(path)
    finally:
        if os.path.exists(path):
            os.remove(path)


def _saturated(tried: list[dict], keys: list[str], tol: float = SATURATION_TOL) -> int:
    """When no nprobe reached the targets: the smallest one within ``tol`` of the best value seen of
    every metric (more probes past that point cost time and gain nothing measurable)."""
    best = {k: max(t[k] for t in tried) for k in keys}
    for t in tried:
        if all(t[k] >= best[k] - tol for k in keys):
            return int(t["nprobe"])
    return int(tried[-1]["nprobe"])


def quality_gate(quality: dict, cfg: JobConfig, factory: str, live: str | None) -> None:
    """Refuse to publish (one-line UserError, CURRENT untouched) below either minimum."""
    icfg = cfg.index
    fails = []
    if quality["ten_recall_at_10"] < icfg.min_recall_at_10:
        fails.append(f"10-recall@10 {quality['ten_recall_at_10']:.3f} < index.min_recall_at_10 = "
                     f"{icfg.min_recall_at_10}")
    if quality["vote_agreement"] < icfg.min_vote_agreement:
        fails.append(f"kNN-vote agreement {quality['vote_agreement']:.3f} < index.min_vote_agreement = "
                     f"{icfg.min_vote_agreement}")
    if fails:
        raise UserError(
            f"new index not published, CURRENT stays at {live}: {'; '.join(fails)} (factory {factory}, "
            f"nprobe {quality['nprobe']}, re-rank k' {quality['rerank_k']}); raise index.max_nprobe, "
            "index.rerank_k or index.budget_bytes_per_vector")


def size_report(staging: str, params: IndexParams, dim: int, total: int, loaded: int | None = None) -> dict:
    """Bytes of the version's files and per vector: the index proper (quantizer, codes, ids: what a
    reader keeps in memory or mmapped; ``loaded`` = the measured size of a fast-scan reader's
    in-memory index, which replaces the files' size) and, separately, the on-disk re-rank store."""
    sizes = {name: os.path.getsize(os.path.join(staging, name))
             for name in (st.POPULATED, st.IVFDATA, st.RERANK) if os.path.exists(os.path.join(staging, name))}
    index_bytes = sizes.get(st.POPULATED, 0) + sizes.get(st.IVFDATA, 0)
    if loaded is not None:
        sizes["loaded_index"] = loaded
        index_bytes = loaded
    per_vector = index_bytes / total
    return {**sizes, "per_vector": per_vector, "ids_per_vector": ID_BYTES,
            "per_vector_excl_ids": per_vector - ID_BYTES, "code_bytes": params.code_bytes,
            "fixed": params_fixed_bytes(params, dim) if params.m else None,
            "measured": "loaded_index" if loaded is not None else "files",
            "rerank_store_per_vector": sizes.get(st.RERANK, 0) / total}


# ----------------------------------------------------------------------------------------------
# Staging and publishing
# ----------------------------------------------------------------------------------------------
def _new_staging(store_uri: str) -> str:
    if st.is_local(store_uri):
        d = os.path.join(st.local_path(store_uri), st.STAGING, f"{uuid.uuid4().hex[:12]}")
        os.makedirs(d)
        return d
    return tempfile.mkdtemp(prefix="ragseg-index-")


def _fetch(store_uri: str, version: str, rel: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if st.is_local(store_uri):
        src = os.path.join(st.local_path(store_uri), version, rel)
        if not os.path.exists(src):
            raise UserError(f"live index version is missing {src}; rebuild with build-index")
        try:
            os.link(src, dest)  # versions are immutable: share the bytes
        except OSError:
            shutil.copy2(src, dest)
    else:
        fs, base = rio.fs_and_path(rio.join(store_uri, version, rel))
        if not fs.exists(base):
            raise UserError(f"live index version is missing {rio.join(store_uri, version, rel)}")
        fs.get(base, dest)


def _finalize(store_uri: str, staging: str) -> str:
    """Move/upload the complete staging dir to the next free version name; returns the name."""
    if st.is_local(store_uri):
        root = st.local_path(store_uri)
        for _ in range(100):
            v = st.next_version(store_uri)
            try:
                os.rename(staging, os.path.join(root, v))
                return v
            except OSError:  # taken by a concurrent build: try the next number
                if not os.path.exists(os.path.join(root, v)):
                    raise
        raise UserError(f"could not allocate a version name under {store_uri}")
    v = st.next_version(store_uri)
    fs, base = rio.fs_and_path(rio.join(store_uri, v))
    files = []
    for dp, _, fns in os.walk(staging):
        for fn in fns:
            files.append(os.path.relpath(os.path.join(dp, fn), staging))
    files.sort(key=lambda r: (r == st.META, r))  # meta.json last: it marks the version complete
    for rel in files:
        fs.put(os.path.join(staging, rel), f"{base}/{rel}")
    return v


def _checkpoint(stage: str) -> None:
    """Hook between build steps (tests inject failures here)."""


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def build_index(db_uri: str, cfg: JobConfig) -> dict:
    """Build a new index version from every shard of the DB and publish it (see module doc)."""
    return _run(db_uri, cfg, refresh=False, force_retrain=False)


def refresh_index(db_uri: str, cfg: JobConfig, force_retrain: bool = False) -> dict:
    """Add the DB's new shards to a new version (retrain when forced, on growth or drift)."""
    return _run(db_uri, cfg, refresh=True, force_retrain=force_retrain)


def _layout(shards: list[DbShard], start: int = 0) -> list[tuple[DbShard, int]]:
    out = []
    for s in shards:
        out.append((s, start))
        start += s.rows
    return out


def _gather(layout: list[tuple[DbShard, int]], gids: np.ndarray) -> np.ndarray:
    """Vectors of the given global ids (any order), one Ray task per shard touched."""
    order = np.argsort(gids, kind="stable")
    sorted_ids = gids[order]
    refs, spans = [], []
    for s, start in layout:
        lo, hi = np.searchsorted(sorted_ids, [start, start + s.rows])
        if hi > lo:
            refs.append(_read_rows_task.remote(s.uri, s.rows, sorted_ids[lo:hi] - start))
            spans.append((lo, hi))
    parts = _ray_get(refs)
    dim = parts[0].shape[1] if parts else 0
    out_sorted = np.zeros((len(gids), dim), np.float32)
    for (lo, hi), p in zip(spans, parts):
        out_sorted[lo:hi] = p
    out = np.empty_like(out_sorted)
    out[order] = out_sorted
    return out


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


def _run(db_uri: str, cfg: JobConfig, refresh: bool, force_retrain: bool) -> dict:
    import faiss

    t0 = time.time()
    icfg = cfg.index
    store_uri = icfg.out
    db = load_db(db_uri)
    if db.total == 0:
        raise UserError(f"feature DB {db_uri} has no rows to index")
    rio.makedirs(store_uri)
    live = st.current_version(store_uri)
    live_meta = st.read_meta(store_uri, live) if live else None
    from ragseg.runtime import init_ray

    init_ray(cfg.ray)

    retrain_reason = "initial build" if not refresh else None
    drift = None
    new_shards: list[DbShard] = list(db.shards)
    if refresh:
        if live_meta is None:
            retrain_reason = "no live version"
        else:
            _check_compatible(db, live_meta)
            known = {s["name"] for s in live_meta["shards"]}
            new_shards = [s for s in db.shards if s.name not in known]
            if not new_shards and not force_retrain:
                return {"published": False, "version": live, "count": live_meta["count"], "added_shards": [],
                        "message": f"nothing new: all {len(known)} DB shards are already in {live}; nothing published"}
            if force_retrain:
                retrain_reason = "forced"
            elif db.total > GROWTH_RETRAIN * live_meta["trained_count"]:
                retrain_reason = (f"growth: {db.total} vectors > {GROWTH_RETRAIN:g} x {live_meta['trained_count']} "
                                  "trained on")
            else:
                trained = _read_trained(store_uri, live)
                new_layout = _layout(new_shards)
                rng = np.random.default_rng(icfg.seed + 2)
                n_new = sum(s.rows for s in new_shards)
                pick = np.sort(rng.choice(n_new, size=min(DRIFT_SAMPLE, n_new), replace=False))
                err = coarse_error(trained, _gather(new_layout, pick))
                ref = max(float(live_meta.get("train_coarse_error", 0.0)), 1e-12)
                drift = {"new_error": err, "train_error": ref, "ratio": err / ref, "threshold": icfg.drift_ratio}
                if err / ref > icfg.drift_ratio:
                    retrain_reason = f"drift: coarse error ratio {err / ref:.2f} > {icfg.drift_ratio}"
    incremental = refresh and live_meta is not None and retrain_reason is None

    staging = _new_staging(store_uri)
    try:
        if incremental:
            assert live_meta is not None and live is not None
            by_name = {s.name: s for s in db.shards}
            layout_old = [(by_name[s["name"]], int(s["start_id"])) for s in live_meta["shards"]]
            layout_new = _layout(new_shards, int(live_meta["count"]))
            layout = layout_old + layout_new
            params = IndexParams(**live_meta["params"])
            trained_from = live_meta["trained_from"]
            trained_count = live_meta["trained_count"]
            train_err = live_meta["train_coarse_error"]
            gpu_train = live_meta.get("gpu_train", False)
            # the live version's merged lists hold every old shard: two files, not one per old shard
            for rel in (st.TRAINED, f"{LIVE_DIR}/{st.POPULATED}", f"{LIVE_DIR}/{st.IVFDATA}"):
                _fetch(store_uri, live, rel.removeprefix(LIVE_DIR + "/"), os.path.join(staging, rel))
            total = db.total
            rng = np.random.default_rng(icfg.seed + 1)
            nq = min(icfg.recall_queries, total)
            qids = np.sort(rng.choice(total, size=nq, replace=False))
            queries = _gather(layout, qids)
            add_names = {s.name for s in new_shards}
        else:
            layout = _layout(list(db.shards))
            total = db.total
            params = choose_params(total, db.dim, icfg)
            rng = np.random.default_rng(icfg.seed)
            train_ids = np.sort(rng.choice(total, size=params.train_size, replace=False))
            nq = min(icfg.recall_queries, total)
            qids = np.sort(np.random.default_rng(icfg.seed + 1).choice(total, size=nq, replace=False))
            both = _gather(layout, np.concatenate([train_ids, qids]))
            xtrain, queries = both[: len(train_ids)], both[len(train_ids):]
            with st.quiet_stdout():
                index, gpu_train = _train(params, db.dim, xtrain, st.use_gpu_for(icfg.use_gpu))
            esample = xtrain[np.random.default_rng(icfg.seed + 3).permutation(len(xtrain))[:ERROR_SAMPLE]]
            train_err = coarse_error(index, esample)
            del xtrain, both
            faiss.write_index(index, os.path.join(staging, st.TRAINED))
            del index
            trained_from = None  # this version
            trained_count = total
            add_names = {s.name for s in db.shards}
        _checkpoint("trained")

        # one task per shard: add (new shards) and exact top-k (all shards)
        with open(os.path.join(staging, st.TRAINED), "rb") as f:
            trained_ref = ray.put(f.read())
        q_ref = ray.put(queries)
        kk = exact_k(cfg)
        refs = [_shard_task.remote(trained_ref if s.name in add_names else None, s.uri, s.rows, start, q_ref, kk,
                                   icfg.rerank)
                for s, start in layout]
        os.makedirs(os.path.join(staging, st.SHARDS_DIR), exist_ok=True)
        exact_parts, new_labels = [], []
        rerank_store = open_rerank_writer(staging, cfg, total, db.dim)
        for (s, start), ref in zip(layout, refs):
            blob, labels, exact, vectors = _ray_get(ref)
            write_rerank_rows(rerank_store, start, vectors)
            del vectors
            if blob is not None:
                with open(os.path.join(staging, st.SHARDS_DIR, f"{s.name}.index"), "wb") as f:
                    f.write(blob)
                n = len(labels["label"])
                new_labels.append(pa.table({
                    "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
                    "label": pa.array(labels["label"], pa.string()),
                    "image_id": pa.array([str(v) for v in labels["image_id"]], pa.string()),
                    "segment_id": pa.array(labels["segment_id"], pa.int64()),
                    "shard": pa.array([s.name] * n, pa.string()),
                }))
            exact_parts.append(exact)
            del blob
        del trained_ref
        rerank_meta = close_rerank_writer(rerank_store)
        del rerank_store
        _checkpoint("shards")

        # labels: old (incremental) + new, ordered by id
        tables = []
        if incremental:
            old_lab = os.path.join(staging, "_old_labels.parquet")
            _fetch(store_uri, live, st.LABELS, old_lab)
            tables.append(pq.read_table(old_lab).select(["id", "label", "image_id", "segment_id", "shard"]))
            os.remove(old_lab)
        tables += new_labels
        labels_tab = pa.concat_tables([t.cast(tables[0].schema) for t in tables]).sort_by("id")
        if not np.array_equal(labels_tab.column("id").to_numpy(), np.arange(total)):
            raise RuntimeError("internal error: label ids are not 0..N-1")
        prov = provenance.job_provenance(cfg, "refresh" if refresh else "build-index", index={"uri": store_uri},
                                         db={"uri": db.uri, "provenance": db.provenance})
        pq.write_table(provenance.attach(labels_tab, prov), os.path.join(staging, st.LABELS), compression="zstd")
        labels_by_id = _LabelsById(labels_tab.column("label"))
        vocab = len(set(labels_by_id.names.tolist()) - {""})
        del labels_tab, tables

        # merge the shards' inverted lists on disk
        from faiss.contrib.ondisk import merge_ondisk

        shard_files = [os.path.join(staging, st.SHARDS_DIR, f"{s.name}.index") for s, _ in layout
                       if s.name in add_names]
        with st.quiet_stdout():
            merged = faiss.read_index(os.path.join(staging, st.TRAINED))
            if incremental:
                _merge_with_live(merged, os.path.join(staging, LIVE_DIR, st.POPULATED), shard_files,
                                 os.path.abspath(os.path.join(staging, st.IVFDATA)))
                shutil.rmtree(os.path.join(staging, LIVE_DIR), ignore_errors=True)
            else:
                merge_ondisk(merged, shard_files, os.path.abspath(os.path.join(staging, st.IVFDATA)))
            faiss.write_index(merged, os.path.join(staging, st.POPULATED))
        del merged
        _checkpoint("merged")

        # quality of the merged index as a reader will search it; nprobe tuned to the targets
        if rerank_meta.get("file"):
            rerank_meta["k"] = icfg.rerank_k
        base = {"count": total, "dim": db.dim, "nlist": params.nlist, "rerank": rerank_meta,
                "params": params.to_dict()}
        recall, nprobe, tuning, loaded = evaluate_index(staging, base, queries, qids,
                                                        _merge_topk(exact_parts, kk), labels_by_id, cfg)
        del labels_by_id
        sizes = size_report(staging, params, db.dim, total, loaded)
        shards_meta = [{"name": s.name, "rows": s.rows, "start_id": start, "input_key": s.input_key}
                       for s, start in layout]
        meta = {
            "format": 1,
            "factory": params.factory, "metric": METRIC, "dim": db.dim, "count": total,
            "nlist": params.nlist, "m": params.m, "opq": params.opq, "code_bytes": params.code_bytes,
            "bits": params.bits, "fast_scan": params.fast_scan,
            "train_size": params.train_size, "params": params.to_dict(), "nprobe": nprobe,
            "trained_count": trained_count, "train_coarse_error": train_err, "gpu_train": bool(gpu_train),
            "embed_model": db.embed_model, "embed_mode": db.embed_mode, "embedder": db.embedder, "db_uri": db.uri,
            "db_config_hash": db.config_hash, "shards": shards_meta, "labels_count": vocab,
            "recall": recall, "mode": "refresh" if refresh else "build", "retrain_reason": retrain_reason,
            "drift": drift, "added_shards": [s.name for s in (new_shards if incremental else db.shards)],
            "bytes": sizes, "rerank": rerank_meta, "nprobe_tuning": tuning,
            "previous_version": live, "provenance": prov,
        }
        quality_gate(recall, cfg, params.factory, live)
        _checkpoint("before_finalize")
        meta["created"] = time.time()
        meta["build_seconds"] = round(meta["created"] - t0, 3)
        version = _finalize_with_meta(store_uri, staging, meta, trained_from)
        _checkpoint("before_publish")
        st.publish(store_uri, version)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    deleted = st.prune(store_uri, icfg.keep_versions, icfg.prune_grace_s)
    return {
        "published": True, "version": version, "previous_version": live, "count": total,
        "factory": params.factory, "nlist": params.nlist, "m": params.m, "nprobe": nprobe,
        "recall": recall, "mode": meta["mode"], "retrain_reason": retrain_reason, "drift": drift,
        "added_shards": meta["added_shards"], "pruned": deleted, "build_seconds": meta["build_seconds"],
        "bytes_per_vector": meta["bytes"]["per_vector"], "rerank_k": rerank_meta["k"],
        "nprobe_tuning": tuning,
    }


LIVE_DIR = "_live"  # staging copy of the live version's merged lists during an incremental refresh


def _merge_with_live(trained, live_populated: str, shard_files: list[str], ivfdata: str) -> None:
    """``faiss.contrib.ondisk.merge_ondisk`` with the live version's merged on-disk lists as one more
    source (read next to their index file: IO_FLAG_ONDISK_SAME_DIR), so a refresh needs only the live
    version's two files, not its shard indexes. Ids are global already: no shift."""
    import faiss

    keep = []
    ivfs = faiss.InvertedListsPtrVector()
    for path, flag in [(live_populated, faiss.IO_FLAG_ONDISK_SAME_DIR)] + [(f, faiss.IO_FLAG_MMAP) for f in shard_files]:
        index = faiss.read_index(os.path.abspath(path), flag)
        ivf = faiss.extract_index_ivf(index)
        ivf.own_invlists = False
        keep.append(index)
        ivfs.push_back(ivf.invlists)
    out_ivf = faiss.extract_index_ivf(trained)
    if trained.ntotal != 0:
        raise RuntimeError("internal error: merging into a non-empty index")
    invlists = faiss.OnDiskInvertedLists(out_ivf.nlist, out_ivf.code_size, ivfdata)
    ntotal = invlists.merge_from_multiple(ivfs.data(), ivfs.size(), False)
    trained.ntotal = out_ivf.ntotal = ntotal
    out_ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    del keep


def _read_trained(store_uri: str, version: str):
    import faiss

    d = tempfile.mkdtemp(prefix="ragseg-trained-")
    try:
        p = os.path.join(d, st.TRAINED)
        _fetch(store_uri, version, st.TRAINED, p)
        return faiss.read_index(p)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _finalize_with_meta(store_uri: str, staging: str, meta: dict, trained_from: str | None) -> str:
    """Write meta.json with the version name it will get, then move/upload the dir. Local stores
    rename the whole dir (atomic); if the name was taken meanwhile, meta is rewritten and retried."""
    for _ in range(100):
        v = st.next_version(store_uri)
        meta["version"] = v
        meta["trained_from"] = trained_from or v
        rio.write_json_atomic(os.path.join(staging, st.META), meta)
        if st.is_local(store_uri):
            target = os.path.join(st.local_path(store_uri), v)
            try:
                os.rename(staging, target)
                return v
            except OSError:
                if not os.path.exists(target):
                    raise
                continue
        got = _finalize(store_uri, staging)
        if got != v:  # a concurrent writer took v between our two calls: fix the name in meta
            meta["version"] = got
            meta["trained_from"] = trained_from or got
            rio.write_json_atomic(rio.join(store_uri, got, st.META), meta)
        return got
    raise UserError(f"could not allocate a version name under {store_uri}")

