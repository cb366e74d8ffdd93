"""The index store: immutable versions ``<index>/v000N/`` and a ``CURRENT`` pointer.

Layout of a version (all paths relative to the version dir)::

    trained.index      the trained, empty index (quantizer, PQ, OPQ) used by every shard
    shards/<name>.index  one populated index per feature shard (kept so that a refresh can re-merge)
    populated.index    the trained index whose inverted lists are OnDiskInvertedLists ...
    merged.ivfdata     ... stored here (merged with faiss.contrib.ondisk.merge_ondisk)
    labels.parquet     faiss id -> label, image_id, segment_id, shard (row i has id i)
    rerank.npy         optional re-rank store: the exact database vectors, row i = id i, as a
                       NumPy ``.npy`` file (format 1.0, dtype ``<f2`` = float16, C order, shape
                       (count, dim)); absent when ``index.rerank`` is off or in versions built before it
    meta.json          factory, metric, dim, count, parameters, nprobe, re-rank settings, quality
                       metrics (``recall``), nprobe tuning, shards, provenance

Fast-scan: a version whose ``meta["params"]["fast_scan"]`` is true holds 4-bit IVF-PQ codes
(``IVF<n>,PQ<m>x4``) in the same on-disk layout as 8-bit ones (so shards merge on disk and a refresh
re-merges as for any IVF-PQ); a CPU reader converts them at open into faiss's fast-scan layout in
memory (:func:`to_fast_scan`), which scans lists several times faster (SIMD look-up tables). The
GPU path searches the plain index where faiss GPU supports it and falls back to this.

Search (:meth:`Index.search`): with a re-rank store (``meta["rerank"]["k"] > 0``) the IVF-PQ index
returns a shortlist of ``k' = max(rerank k, k)`` candidates, whose exact float16 vectors are read
from the memory-mapped ``rerank.npy`` and scored exactly (inner product in float32); the top ``k``
of those are returned with their exact similarities (:func:`rerank`). Without it the index's own
(approximate) similarities are returned. The store is on disk and paged in on demand: the
in-memory part of the index stays the PQ codes and the coarse quantizer.

Publishing: a version is built in a staging dir, moved (local) or uploaded (remote) to
``v000N/`` and only then, after its recall check passed, ``CURRENT`` is replaced atomically
(``ragseg.io.write_text_atomic``). A killed build therefore leaves CURRENT on the old version.

Readers: :meth:`Index.open` resolves CURRENT once, when it starts, and from then on only uses that
version's files. ``populated.index`` and ``labels.parquet`` are read into memory; the inverted lists
stay mmapped from ``merged.ivfdata`` (fast-scan versions: read into memory once, see above; the
absolute path faiss stores inside the index is ignored: we read with ``IO_FLAG_ONDISK_SAME_DIR`` so
the lists are found next to the index file, wherever the version dir is). Remote stores (s3://,
gs://, ...) are first downloaded to a local cache dir (``RAGSEG_CACHE`` or ``~/.cache/ragseg``, under
``index/<hash of uri>/<version>``).

Pruning (:func:`prune`) keeps the newest ``keep_versions`` complete versions, never deletes the live
one, and never deletes a version that stopped being live less than ``grace_s`` seconds ago (the time
its successor was created), so that readers that resolved CURRENT just before a publish still find
their files. A reader that already opened a version is not disturbed by a later deletion on POSIX
file systems: the mmapped ``merged.ivfdata`` stays valid after unlink until it is unmapped, and the
other files were read into memory at open. (On Windows, or NFS without "silly rename", deletion of a
mapped file can fail or break the reader; keep the grace period longer than any reader's lifetime
there.) Remote readers use their local copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any

import numpy as np

from ragseg import io as rio
from ragseg.errors import UserError

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
VERSION_RE = re.compile(r"^v(\d{4,})$")
META = "meta.json"
LABELS = "labels.parquet"
POPULATED = "populated.index"
IVFDATA = "merged.ivfdata"
TRAINED = "trained.index"
RERANK = "rerank.npy"
SHARDS_DIR = "shards"
STAGING = "_staging"
READ_FILES = (META, LABELS, POPULATED, IVFDATA, RERANK)  # what a reader needs
OPTIONAL_FILES = (IVFDATA, RERANK)  # IVFDATA: absent for flat codes; RERANK: optional


def version_name(i: int) -> str:
    return f"v{i:04d}"


def is_local(uri: str) -> bool:
    return rio.protocol(uri) == "file"


def local_path(uri: str) -> str:
    return rio.fs_and_path(uri)[1] if "://" in uri else os.path.abspath(uri)


# ----------------------------------------------------------------------------------------------
# Versions and the CURRENT pointer
# ----------------------------------------------------------------------------------------------
def current_version(uri: str) -> str | None:
    """The version CURRENT names, or None when nothing was published yet."""
    cur = rio.join(uri, CURRENT)
    if not rio.exists(cur):
        return None
    name = rio.read_text(cur).strip()
    if not VERSION_RE.match(name):
        raise UserError(f"{cur} is corrupt: {name!r} is not a version name")
    return name


def _version_dirs(uri: str) -> list[str]:
    fs, path = rio.fs_and_path(uri)
    if not fs.exists(path):
        return []
    names = []
    for p in fs.ls(path, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if VERSION_RE.match(base):
            names.append(base)
    return sorted(names, key=lambda n: int(n[1:]))


def list_versions(uri: str) -> list[str]:
    """Complete versions (meta.json present), oldest first. Incomplete dirs (killed uploads) are
    skipped."""
    return [v for v in _version_dirs(uri) if rio.exists(rio.join(uri, v, META))]


def next_version(uri: str) -> str:
    """The next unused version name (after every version dir, complete or not)."""
    names = _version_dirs(uri)
    last = int(names[-1][1:]) if names else 0
    return version_name(last + 1)


def read_meta(uri: str, version: str | None = None) -> dict:
    version = version or current_version(uri)
    if version is None:
        raise UserError(f"no index version published under {uri} (CURRENT missing)")
    p = rio.join(uri, version, META)
    if not rio.exists(p):
        raise UserError(f"index version {version} under {uri} is missing or incomplete ({p})")
    return rio.read_json(p)


def publish(uri: str, version: str) -> None:
    """Point CURRENT at ``version`` (atomic replace). The caller has verified the version."""
    if not rio.exists(rio.join(uri, version, META)):
        raise UserError(f"refusing to publish incomplete version {version} under {uri}")
    rio.write_text_atomic(rio.join(uri, CURRENT), version + "\n")


def prune(uri: str, keep: int, grace_s: float = 600.0, now: float | None = None) -> list[str]:
    """Delete old complete versions beyond the newest ``keep`` (see module docstring). Returns the
    deleted names. Also removes staging dirs older than ``grace_s`` left by killed builds, and the
    staging folder itself once empty."""
    now = time.time() if now is None else now
    live = current_version(uri)
    versions = list_versions(uri)
    deleted: list[str] = []
    keep_set = set(versions[-keep:]) | ({live} if live else set())
    created = {}
    for v in versions:
        try:
            created[v] = float(read_meta(uri, v).get("created", 0.0))
        except Exception:  # unreadable meta: treat as just created (keep)
            created[v] = now
    for i, v in enumerate(versions):
        if v in keep_set:
            continue
        later = versions[i + 1:]
        superseded_at = created[later[0]] if later else now
        if now - superseded_at < grace_s:
            continue
        rio.remove(rio.join(uri, v), recursive=True)
        deleted.append(v)
    if is_local(uri):
        st = os.path.join(local_path(uri), STAGING)
        if os.path.isdir(st):
            for d in os.listdir(st):
                p = os.path.join(st, d)
                with contextlib.suppress(OSError):
                    if now - os.path.getmtime(p) > grace_s:
                        shutil.rmtree(p, ignore_errors=True)
            with contextlib.suppress(OSError):  # only when empty: a build in progress keeps it
                os.rmdir(st)
    return deleted


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def cache_root() -> str:
    from ragseg.models.weights import cache_root as weights_cache_root

    return str(weights_cache_root())


def local_version_dir(uri: str, version: str) -> str:
    """A local directory holding the reader files of ``version`` (downloaded for remote stores)."""
    if is_local(uri):
        return os.path.join(local_path(uri), version)
    key = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    dest = os.path.join(cache_root(), "index", key, version)
    if not rio.cached_dir_complete(dest):
        got = rio.download_dir(rio.join(uri, version), READ_FILES, dest)
        missing = [n for n in READ_FILES if n not in got and n not in OPTIONAL_FILES]
        if missing:
            raise UserError(f"index version {rio.join(uri, version)} lacks {missing}")
    return dest


@contextlib.contextmanager
def quiet_stdout():
    """faiss prints some notices with C printf on stdout; send them to stderr so that JSON printed
    by the CLI stays parseable."""
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def read_faiss_index(path: str):
    """Read an index file; on-disk inverted lists are looked up next to it (IO_FLAG_ONDISK_SAME_DIR).

    IO_FLAG_MMAP is not combined with it: faiss 1.15.1 crashes when searching an OPQ+IVF-PQ index
    read with both flags, and OnDiskInvertedLists mmap their data file anyway.
    """
    import faiss

    with quiet_stdout():
        return faiss.read_index(os.path.abspath(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


def use_gpu_for(flag: str) -> bool:
    if flag == "off":
        return False
    try:
        import faiss

        n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except Exception:
        n = 0
    if flag == "on" and n == 0:
        log.warning("index.use_gpu=on but faiss sees no GPU; using CPU")
    return n > 0


def to_fast_scan(index: Any) -> Any:
    """The same IVF-PQ index with 4-bit codes in faiss's fast-scan layout (``IndexIVFPQFastScan``:
    inverted lists packed in blocks of 32 codes, in memory, scanned with SIMD look-up tables), with
    any pre-transform (OPQ) kept in front. The on-disk lists are read once; the result shares the
    coarse quantizer and the transforms with ``index`` (kept alive through it). Indexes that are
    not 4-bit IVF-PQ come back unchanged."""
    import faiss

    pre = index if isinstance(index, faiss.IndexPreTransform) else None
    inner = faiss.downcast_index(pre.index) if pre is not None else faiss.downcast_index(index)
    if not isinstance(inner, faiss.IndexIVFPQ) or inner.pq.nbits != 4:
        return index
    with quiet_stdout():
        fs = faiss.IndexIVFPQFastScan(inner)
    fs.referenced_objects = [index]  # owns the shared quantizer (and the OPQ chain)
    if pre is None:
        return fs
    out = faiss.IndexPreTransform(fs)
    for i in reversed(range(pre.chain.size())):
        out.prepend_transform(pre.chain.at(i))
    out.referenced_objects = [fs, index]
    return out


def set_nprobe(index: Any, nprobe: int, nlist: int) -> int:
    import faiss

    nprobe = max(1, min(int(nprobe), int(nlist) if nlist else int(nprobe)))
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    except RuntimeError:
        try:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        except Exception:
            log.warning("could not set nprobe on %s", type(index).__name__)
    return nprobe


RERANK_CHUNK = 256  # queries re-ranked per step (bounds the gathered float32 block to 256 x k' x dim)


def write_rerank_store(path: str, count: int, dim: int) -> np.memmap:
    """Create the re-rank store file (module doc) and return it as a writable memmap."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(int(count), int(dim)))


def open_rerank_store(path: str, count: int, dim: int) -> np.ndarray:
    """Memory-map a re-rank store read-only and check its dtype and shape against the meta."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the re-rank store {path}: {e}") from None
    if arr.dtype != np.float16 or arr.shape != (int(count), int(dim)):
        raise UserError(f"re-rank store {path} is {arr.dtype} {arr.shape}, expected float16 ({count}, {dim})")
    return arr


def rerank(queries: np.ndarray, cand: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of ``queries`` (n, d) with their candidate ids ``cand`` (n, k'; -1 =
    none) over ``vectors`` (N, d, any float dtype, e.g. a float16 memmap) -> the top ``k`` as
    ``(sims float32 (n, k), ids int64 (n, k))``, ordered by similarity (ties: by candidate order);
    missing entries are sim -inf, id -1. Rows are read in increasing id order (one pass over the
    memmap per chunk of queries)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    cand = np.asarray(cand, dtype=np.int64)
    n, kp = cand.shape
    k = int(k)
    out_s = np.full((n, k), -np.inf, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    if n == 0 or kp == 0 or k <= 0:
        return out_s, out_i
    for lo in range(0, n, RERANK_CHUNK):
        hi = min(n, lo + RERANK_CHUNK)
        c = cand[lo:hi]
        valid = c >= 0
        uniq, inv = np.unique(np.where(valid, c, 0), return_inverse=True)
        vecs = np.asarray(vectors[uniq], dtype=np.float32)  # sorted ids: sequential-ish reads
        sims = np.einsum("nkd,nd->nk", vecs[inv.reshape(c.shape)], q[lo:hi], optimize=True)
        sims = np.where(valid, sims, -np.inf).astype(np.float32)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        s = np.take_along_axis(sims, order, axis=1)
        i = np.where(np.isfinite(s), np.take_along_axis(c, order, axis=1), -1)
        out_s[lo:hi, : s.shape[1]] = s
        out_i[lo:hi, : i.shape[1]] = i
    return out_s, out_i


class Index:
    """A read-only handle on one version of an index store.

    ``nprobe`` (lists probed) and ``rerank_k`` (shortlist size re-ranked with the exact vectors;
    0 = off) default to the values the build tuned and recorded in ``meta.json``; both can be
    changed on an open handle. Versions built before the re-rank store existed open with
    ``rerank_k = 0`` (no ``rerank.npy``, no ``meta["rerank"]``).
    """

    def __init__(self, uri: str, version: str, local_dir: str, index: Any, meta: dict,
                 labels: np.ndarray, image_ids: np.ndarray, segment_ids: np.ndarray, nprobe: int,
                 vectors: np.ndarray | None = None):
        self.uri = uri
        self.version = version
        self.local_dir = local_dir
        self.index = index
        self.meta = meta
        self._labels = labels
        self._image_ids = image_ids
        self._segment_ids = segment_ids
        self._nprobe = nprobe
        self.vectors = vectors  # the re-rank store (memmap) or None
        self._rerank_k = 0
        self.labels_vocab: set[str] = set(np.unique(labels).tolist()) - {""}

    @classmethod
    def open(cls, uri: str, version: str | None = None, nprobe: int | None = None,
             use_gpu: str = "auto", rerank_k: int | None = None) -> "Index":
        """Open ``version`` (default: the one CURRENT names now) of the store at ``uri``."""
        version = version or current_version(uri)
        if version is None:
            raise UserError(f"no index published under {uri} (no {CURRENT} file); run build-index")
        if not rio.exists(rio.join(uri, version, META)):
            raise UserError(f"index version {version} under {uri} is missing or incomplete")
        d = local_version_dir(uri, version)
        with open(os.path.join(d, META)) as f:
            meta = json.load(f)
        return cls.from_dir(d, meta, uri=uri, version=version, nprobe=nprobe, use_gpu=use_gpu, rerank_k=rerank_k)

    @classmethod
    def from_dir(cls, d: str, meta: dict, uri: str | None = None, version: str | None = None,
                 nprobe: int | None = None, use_gpu: str = "auto", rerank_k: int | None = None) -> "Index":
        """Open the version files in the local directory ``d`` described by ``meta`` (the build uses
        this on its staging dir to measure the index exactly as readers will search it)."""
        version = version or str(meta.get("version", os.path.basename(d)))
        uri = uri or os.path.dirname(d)
        for name in (POPULATED, LABELS):
            if not os.path.exists(os.path.join(d, name)):
                raise UserError(f"index version {version} is missing {name} ({d})")
        try:
            index = read_faiss_index(os.path.join(d, POPULATED))
        except RuntimeError as e:
            raise UserError(f"cannot read {os.path.join(d, POPULATED)}: {str(e).splitlines()[0]}") from None
        if index.ntotal != meta["count"]:
            raise UserError(f"{os.path.join(d, POPULATED)} holds {index.ntotal} vectors, meta says {meta['count']}")
        tab = rio.read_parquet(os.path.join(d, LABELS), columns=["id", "label", "image_id", "segment_id"])
        ids = tab.column("id").to_numpy()
        if len(ids) != meta["count"] or (len(ids) and not np.array_equal(ids, np.arange(len(ids)))):
            raise UserError(f"{os.path.join(d, LABELS)} does not map ids 0..{meta['count'] - 1}")
        labels = np.asarray(tab.column("label").cast("string").to_pylist() + [""], dtype=object)
        image_ids = np.asarray(tab.column("image_id").to_pylist() + [""], dtype=object)
        segment_ids = np.append(tab.column("segment_id").to_numpy().astype(np.int64), -1)
        rr = meta.get("rerank") or {}
        vectors = None
        if int(rr.get("k", 0)) > 0:
            p = os.path.join(d, str(rr.get("file", RERANK)))
            if not os.path.exists(p):
                raise UserError(f"index version {version} is missing its re-rank store {p}")
            vectors = open_rerank_store(p, meta["count"], meta["dim"])
        on_gpu = False
        if use_gpu_for(use_gpu):
            try:
                import faiss

                index = faiss.index_cpu_to_all_gpus(index)
                on_gpu = True
            except Exception as e:  # e.g. a factory the GPU code does not support (4-bit PQ)
                log.warning("GPU search unavailable for %s (%s); using CPU", meta.get("factory"), e)
        if not on_gpu and (meta.get("params") or {}).get("fast_scan"):
            index = to_fast_scan(index)
        self = cls(uri, version, d, index, meta, labels, image_ids, segment_ids, 0, vectors)
        self.nprobe = nprobe if nprobe is not None else int(meta.get("nprobe", 16))
        self.rerank_k = rerank_k if rerank_k is not None else int(rr.get("k", 0))
        return self

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = set_nprobe(self.index, value, int(self.meta.get("nlist", 0)))

    @property
    def rerank_k(self) -> int:
        """Shortlist size re-ranked with the exact vectors (0: no re-ranking)."""
        return self._rerank_k

    @rerank_k.setter
    def rerank_k(self, value: int) -> None:
        value = max(0, int(value))
        if value and self.vectors is None:
            raise UserError(f"index version {self.version} has no re-rank store; rerank_k must be 0")
        self._rerank_k = value

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int):
        """``queries`` (n, d) float32 L2-normalised -> (sims, labels, image_ids, segment_ids), each
        (n, k); where fewer than k neighbours exist: sim -inf, label "", image_id "", segment_id -1."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.meta["dim"]:
            raise UserError(f"query dim {q.shape[1]} != index dim {self.meta['dim']}")
        k = int(k)
        if q.shape[0] == 0 or k <= 0:
            z = np.zeros((q.shape[0], max(k, 0)))
            return (z.astype(np.float32), z.astype(object), z.astype(object), z.astype(np.int64))
        sims, ids = self.search_ids(q, k)
        missing = ids < 0
        ids = np.where(missing, len(self._labels) - 1, ids)  # last slot is the "missing" entry
        sims = np.where(missing, -np.inf, sims).astype(np.float32)
        return sims, self._labels[ids], self._image_ids[ids], self._segment_ids[ids]

    def search_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the ``k`` nearest database vectors; re-ranked when ``rerank_k > 0``."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = int(k)
        if self._rerank_k <= 0 or self.vectors is None or k <= 0:
            return self.index.search(q, k)
        _, cand = self.index.search(q, max(self._rerank_k, k))
        return rerank(q, cand, self.vectors, k)


def index_info(uri: str) -> dict:
    """Version, counts, parameters, search settings, quality metrics and the versions list of a
    store (reads meta only). ``quality`` holds 1-recall@1, 1-recall@10, 10-recall@10 and the kNN-vote
    agreement measured at build (ragseg.index.quality); versions built before those metrics existed
    show what their meta has (``recall``: at1 / at10)."""
    live = current_version(uri)
    versions = list_versions(uri)
    out: dict[str, Any] = {"uri": uri, "version": live, "versions": versions}
    if live is None:
        out["status"] = "no version published"
        return out
    meta = read_meta(uri, live)
    for key in ("count", "dim", "factory", "metric", "nlist", "m", "opq", "bits", "fast_scan", "nprobe", "train_size",
                "embed_model", "embed_mode", "trained_from", "created", "build_seconds"):
        out[key] = meta.get(key)
    rr = meta.get("rerank") or {}
    out["rerank_k"] = int(rr.get("k", 0))
    rec = dict(meta.get("recall") or {})
    out["quality"] = {key: rec.get(key) for key in
                      ("one_recall_at_1", "one_recall_at_10", "ten_recall_at_10", "vote_agreement", "vote_k",
                       "vote_temperature", "queries", "without_rerank") if key in rec} if "vote_agreement" in rec else {}
    out["recall"] = rec
    tuning = meta.get("nprobe_tuning")
    if tuning:
        out["nprobe_tuning"] = {key: tuning.get(key) for key in ("target", "met", "chosen")}
    b = meta.get("bytes") or {}
    if b:
        out["bytes_per_vector"] = {key: b.get(key) for key in ("per_vector", "per_vector_excl_ids", "code_bytes",
                                                               "rerank_store_per_vector") if key in b}
    out["shards"] = len(meta.get("shards", []))
    out["labels"] = meta.get("labels_count")
    from ragseg import identity

    out["embedder"] = identity.index_identity(meta)
    out["provenance"] = meta.get("provenance")
    return out
