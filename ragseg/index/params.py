"""Choose the faiss index parameters from N, dim and a memory budget. Pure functions, no faiss.

The rule (every step is documented in :func:`choose_params`):

* Metric: inner product on L2-normalised embeddings (cosine similarity).
* Coarse quantizer: ``nlist = round(nlist_per_sqrt_n * sqrt(N))`` clamped to
  ``[1, N // train_per_list]`` so that every list gets at least ``train_per_list`` training points
  (faiss k-means wants >= 39 points per centroid). Tiny sets therefore get a small IVF; below
  ``train_per_list`` vectors this is ``IVF1`` (exact search), so the store layout (trained index,
  shard indexes, on-disk merged lists) is the same for every N.
* Codes (B = budget_bytes_per_vector; it counts code bytes only, faiss adds 8 bytes of id per vector):
  - ``Flat`` (exact float32) if ``4 * dim <= B``, or if there are too few vectors to train a PQ
    (``N < PQ_MIN_TRAIN`` = 39 x 256, faiss's minimum for 8-bit sub-quantizers; such a DB is small
    enough that memory does not matter);
  - ``SQfp16`` if ``2 * dim <= B``; ``SQ8`` if ``dim <= B``: when the budget allows one byte per
    dimension, PQ would have one dimension per sub-quantizer, i.e. a (non-uniform) 8-bit scalar
    quantizer of the same size whose training costs ~0.5 s per dimension in faiss; SQ8 is the same
    size, trains in milliseconds and keeps recall high;
  - else ``PQm`` with 8 bits per sub-quantizer, ``m`` = the largest divisor of ``dim`` that is <= B
    (budget 64 -> PQ64 for dim 768). Polysemous training is switched off (we do not use it).
* OPQ (``opq="auto"``): a learned rotation ``OPQm_d`` (d = dim, no dimension reduction) is put in
  front when each sub-quantizer covers at least ``OPQ_MIN_DIMS_PER_SUBQ`` = 4 dimensions
  (``dim / m >= 4``): then the rotation balances variance across sub-vectors, which is where OPQ
  pays; with 1-3 dims per sub-quantizer PQ is almost a scalar quantizer and OPQ only costs training
  time. ``"on"`` / ``"off"`` force it (ignored for Flat codes).
* Training sample: ``train_per_list * nlist`` vectors, at least ``PQ_MIN_TRAIN`` when PQ is used, at
  most N.
* ``cfg.factory`` (explicit faiss factory string) overrides the rule; nlist / m are then parsed from
  it where present, and the training sample is ``train_per_list * nlist`` (or N) clamped to N.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ragseg.config import IndexConfig
from ragseg.errors import UserError

PQ_BITS = 8
PQ_MIN_TRAIN = 39 * (1 << PQ_BITS)  # 9984: faiss k-means minimum for 256 centroids
OPQ_MIN_DIMS_PER_SUBQ = 4
METRIC = "inner_product"


@dataclass(frozen=True)
class IndexParams:
    factory: str
    nlist: int  # 0 when the index is not an IVF
    m: int  # PQ sub-quantizers (bytes per code at 8 bits); 0 when codes are not PQ
    opq: bool
    train_size: int
    code_bytes: int  # bytes per vector in the inverted lists, ids excluded (0 if unknown)
    metric: str = METRIC
    explicit: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for m in range(min(n, limit), 0, -1):
        if n % m == 0:
            return m
    return 1


def nlist_for(n: int, cfg: IndexConfig) -> int:
    target = int(round(cfg.nlist_per_sqrt_n * math.sqrt(max(n, 1))))
    return max(1, min(target, n // cfg.train_per_list))


def choose_params(n: int, dim: int, cfg: IndexConfig) -> IndexParams:
    """Parameters for ``n`` vectors of dimension ``dim`` under ``cfg`` (see the module docstring)."""
    if n < 1:
        raise UserError("cannot build an index over an empty feature DB (0 vectors)")
    if dim < 1:
        raise UserError(f"invalid embedding dimension {dim}")
    if cfg.factory:
        return _explicit(cfg.factory, n, dim, cfg)
    nlist = nlist_for(n, cfg)
    budget = cfg.budget_bytes_per_vector
    train = min(n, cfg.train_per_list * nlist)
    if 4 * dim <= budget or n < PQ_MIN_TRAIN:
        return IndexParams(f"IVF{nlist},Flat", nlist, 0, False, train, 4 * dim)
    if 2 * dim <= budget:
        return IndexParams(f"IVF{nlist},SQfp16", nlist, 0, False, train, 2 * dim)
    if dim <= budget:
        return IndexParams(f"IVF{nlist},SQ8", nlist, 0, False, train, dim)
    m = _largest_divisor_at_most(dim, budget)
    if cfg.opq == "on":
        opq = True
    elif cfg.opq == "off":
        opq = False
    else:
        opq = dim / m >= OPQ_MIN_DIMS_PER_SUBQ
    prefix = f"OPQ{m}_{dim}," if opq else ""
    train = min(n, max(cfg.train_per_list * nlist, PQ_MIN_TRAIN))
    return IndexParams(
        factory=f"{prefix}IVF{nlist},PQ{m}", nlist=nlist, m=m, opq=opq, train_size=train, code_bytes=m,
    )


def _explicit(factory: str, n: int, dim: int, cfg: IndexConfig) -> IndexParams:
    ivf = re.search(r"IVF(\d+)", factory)
    nlist = int(ivf.group(1)) if ivf else 0
    pq = re.search(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", factory.split(",")[-1])
    m = int(pq.group(1)) if pq else 0
    bits = int(pq.group(2)) if pq and pq.group(2) else PQ_BITS
    code = factory.split(",")[-1].strip()
    if pq:
        code_bytes = (m * bits + 7) // 8
    elif code == "Flat":
        code_bytes = 4 * dim
    else:
        code_bytes = 0
    train = n if not nlist else min(n, max(cfg.train_per_list * nlist, PQ_MIN_TRAIN if m else 0))
    return IndexParams(
        factory=factory, nlist=nlist, m=m, opq=factory.startswith("OPQ"), train_size=max(1, train),
        code_bytes=code_bytes, explicit=True,
    )
