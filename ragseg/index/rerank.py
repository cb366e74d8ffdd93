"""The re-rank store of an index version: writer (build) and reader (search) together.

Format: ``rerank.npy`` in the version dir holds the exact database vectors, row i = id i, as a NumPy
``.npy`` file (format 1.0, dtype ``<f2`` = float16, C order, shape (count, dim)); ``meta["rerank"]``
names it (``{"k", "file", "dtype"}``; ``k`` 0 = no re-ranking). Absent when ``index.rerank`` is off or
in versions built before it.

Search (:meth:`ragseg.index.store.Index.search`): with a re-rank store (``meta["rerank"]["k"] > 0``)
the IVF-PQ index returns a shortlist of ``k' = max(rerank k, k)`` candidates, whose exact float16
vectors are read from the memory-mapped ``rerank.npy`` and scored exactly (inner product in float32);
the top ``k`` of those are returned with their exact similarities (:func:`rerank`). Without it the
index's own (approximate) similarities are returned. The store is on disk and paged in on demand: the
in-memory part of the index stays the PQ codes and the coarse quantizer.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from ragseg.errors import UserError
from ragseg.index.versions import RERANK

if TYPE_CHECKING:
    from ragseg.config import JobConfig

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


def open_rerank_writer(staging: str, cfg: JobConfig, total: int, dim: int):
    """The re-rank store being written in the staging dir (None when ``index.rerank`` is off)."""
    if not cfg.index.rerank:
        return None
    return write_rerank_store(os.path.join(staging, RERANK), total, dim)


def write_rerank_rows(store, start: int, vectors) -> None:
    """Rows ``start..start+len(vectors)`` of the store being written (no-op without one)."""
    if store is not None and vectors is not None and len(vectors):
        store[start:start + len(vectors)] = vectors


def close_rerank_writer(store) -> dict:
    """Flush the store; the ``meta["rerank"]`` entry (k 0 = no re-ranking)."""
    if store is None:
        return {"k": 0}
    store.flush()
    return {"k": 0, "file": RERANK, "dtype": "float16"}
