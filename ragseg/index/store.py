"""The index reader: :class:`Index` opens one published version (layout, CURRENT and publishing in
ragseg.index.versions; the re-rank store in ragseg.index.rerank; faiss helpers, fast-scan
conversion included, in ragseg.index.faiss_util) and :func:`index_info` describes a store.

Readers: :meth:`Index.open` resolves CURRENT once, when it starts, and from then on only uses that
version's files. ``populated.index`` and ``labels.parquet`` are read into memory; the inverted lists
stay mmapped from ``merged.ivfdata`` (fast-scan versions: read into memory once at open, see
ragseg.index.faiss_util; the absolute path faiss stores inside the index is ignored: we read with
``IO_FLAG_ONDISK_SAME_DIR`` so the lists are found next to the index file, wherever the version dir
is). Remote stores (s3://, gs://, ...) are first downloaded to a local cache dir (``RAGSEG_CACHE`` or
``~/.cache/ragseg``, under ``index/<hash of uri>/<version>``). A reader that already opened a version
is not disturbed when a later prune deletes it (ragseg.index.versions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from ragseg import io as rio
from ragseg.errors import UserError
from ragseg.index.faiss_util import read_faiss_index, set_nprobe, to_fast_scan, use_gpu_for
from ragseg.index.rerank import open_rerank_store, rerank
from ragseg.index.versions import (
    CURRENT,
    IVFDATA,
    LABELS,
    META,
    POPULATED,
    RERANK,
    current_version,
    is_local,
    list_versions,
    local_path,
    read_meta,
)

log = logging.getLogger(__name__)

READ_FILES = (META, LABELS, POPULATED, IVFDATA, RERANK)  # what a reader needs
OPTIONAL_FILES = (IVFDATA, RERANK)  # IVFDATA: absent for flat codes; RERANK: optional


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
