"""A fixed set of string ids (Arrow) that answers membership for many small batches: the images a
job's committed pieces cover, asked about one listing page at a time.

``pyarrow.compute.is_in`` builds a hash table of its value set at every call, which is fine once
over a whole listing but costs seconds per call against millions of ids, so a page-at-a-time filter
cannot use it. :class:`IdSet` hashes the ids once (a 64-bit polynomial hash computed over Arrow's
string buffers with NumPy, no Python object per id), keeps the hashes sorted and the ids in that
order, and answers a batch with one ``searchsorted``; every hash hit is confirmed by comparing the
strings, so the answer is exact (a hash collision can never drop an image).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_P = np.uint64(0x100000001B3)  # odd multiplier of the polynomial hash (FNV's prime)
_CHUNK = 1 << 16  # strings hashed per NumPy pass (bounds the temporary arrays: ~100 MB at 1M)
_powers = np.ones(1, np.uint64)


def _pow_table(n: int) -> np.ndarray:
    global _powers
    if len(_powers) < n:
        p = np.empty(max(n, 2 * len(_powers)), np.uint64)
        p[0] = 1
        with np.errstate(over="ignore"):
            for i in range(1, len(p)):  # once per process, up to the longest id seen
                p[i] = p[i - 1] * _P
        _powers = p
    return _powers


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the polynomial hash's bits."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _strings(arr) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type not in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary()):
        arr = arr.cast(pa.string())
    return arr


def hash64(arr) -> np.ndarray:
    """A 64-bit hash of each string of an Arrow string array (uint64), from its UTF-8 bytes."""
    arr = _strings(arr)
    n = len(arr)
    out = np.zeros(n, np.uint64)
    if n == 0:
        return out
    large = arr.type in (pa.large_string(), pa.large_binary())
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], np.int64 if large else np.int32)[arr.offset: arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lens = np.diff(offs)
    pw = _pow_table(int(lens.max()) + 1 if n else 1)
    for a in range(0, n, _CHUNK):
        b = min(n, a + _CHUNK)
        lo, hi = offs[a], offs[b]
        if hi > lo:
            seg = lens[a:b]
            starts = offs[a:b] - lo
            pos = np.arange(hi - lo, dtype=np.int64) - np.repeat(starts, seg)
            with np.errstate(over="ignore"):
                terms = (data[lo:hi].astype(np.uint64) + np.uint64(1)) * pw[pos]
            nz = seg > 0
            h = np.zeros(b - a, np.uint64)
            h[nz] = np.add.reduceat(terms, starts[nz])
            out[a:b] = h
    with np.errstate(over="ignore"):
        out ^= lens.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return _mix(out)


class IdSet:
    """Exact membership in a fixed set of string ids (module docstring). Memory: the ids once (Arrow)
    and 8 bytes per id."""

    def __init__(self, ids):
        ids = _strings(ids)
        h = hash64(ids)
        order = np.argsort(h)
        self.hashes = h[order]
        self.ids = ids.take(pa.array(order)) if len(ids) else ids
        self._more = len(self.hashes) > 1 and bool((self.hashes[1:] == self.hashes[:-1]).any())

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, values) -> np.ndarray:
        """A bool per value of an Arrow string array: is it one of the set's ids?"""
        values = _strings(values)
        n = len(values)
        if n == 0 or len(self.hashes) == 0:
            return np.zeros(n, bool)
        qh = hash64(values)
        order = np.argsort(qh)  # sorted needles: searchsorted walks the set's hashes in order (2x faster)
        pos = np.empty(n, np.int64)
        pos[order] = np.searchsorted(self.hashes, qh[order])
        np.minimum(pos, len(self.hashes) - 1, out=pos)
        hit = self.hashes[pos] == qh
        out = np.zeros(n, bool)
        cand = np.flatnonzero(hit)
        if len(cand) == 0:
            return out
        same = pc.equal(values.take(pa.array(cand)), self.ids.take(pa.array(pos[cand])))
        out[cand] = same.to_numpy(zero_copy_only=False)
        if self._more:  # ids of the set that share a hash: the first one compared may not be the one
            for i in cand[~out[cand]]:
                j = int(pos[i]) + 1
                while j < len(self.hashes) and self.hashes[j] == qh[i]:
                    if self.ids[j].as_py() == values[int(i)].as_py():
                        out[i] = True
                        break
                    j += 1
        return out
