"""Generic faiss helpers: stdout hygiene, reading on-disk indexes, GPU choice, nprobe, fast-scan
conversion, IVF training, the coarse quantisation error and on-disk merging with a live source.

Fast-scan: a version whose ``meta["params"]["fast_scan"]`` is true holds 4-bit IVF-PQ codes
(``IVF<n>,PQ<m>x4``) in the same on-disk layout as 8-bit ones (so shards merge on disk and a refresh
re-merges as for any IVF-PQ); a CPU reader converts them at open into faiss's fast-scan layout in
memory (:func:`to_fast_scan`), which scans lists several times faster (SIMD look-up tables). The
GPU path searches the plain index where faiss GPU supports it and falls back to this.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import numpy as np

from ragseg.errors import UserError
from ragseg.index.params import IndexParams

log = logging.getLogger(__name__)


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


def transform(index, x: np.ndarray) -> np.ndarray:
    """``x`` through the index's pre-transform chain (OPQ rotation), if any."""
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
    xt = transform(index, x)
    _, assign = ivf.quantizer.search(xt, 1)
    cents = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    diff = xt - cents[assign[:, 0]]
    return float(np.mean(np.sum(diff * diff, axis=1)))


def train(params: IndexParams, dim: int, x: np.ndarray, use_gpu: bool):
    """The empty index of ``params.factory`` trained on ``x`` (coarse k-means on the GPU(s) when
    ``use_gpu``) -> (index, trained on GPU)."""
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


def merge_with_live(trained, live_populated: str, shard_files: list[str], ivfdata: str) -> None:
    """Into the empty ``trained`` index: ``faiss.contrib.ondisk.merge_ondisk`` with the live
    version's merged on-disk lists as one more source (read next to their index file:
    IO_FLAG_ONDISK_SAME_DIR), so a refresh needs only the live version's two files, not its shard
    indexes. Ids are global already: no shift."""
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
