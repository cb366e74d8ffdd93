"""Choose the faiss index parameters from N, dim and a memory budget. Pure functions, no faiss.

The rule (every step is documented in :func:`choose_params`):

* Metric: inner product on L2-normalised embeddings (cosine similarity).
* Coarse quantizer: ``nlist = round(nlist_per_sqrt_n * sqrt(N))`` (default 4: nprobe is tuned at
  build time, so a coarser IVF only costs a few more probes and keeps the centroids small) clamped to
  ``[1, N // train_per_list]`` so that every list gets at least ``train_per_list`` training points
  (faiss k-means wants >= 39 points per centroid). Tiny sets therefore get a small IVF; below
  ``train_per_list`` vectors this is ``IVF1`` (exact search), so the store layout (trained index,
  shard indexes, on-disk merged lists) is the same for every N.
* Codes (B = budget_bytes_per_vector; it counts what the index holds per vector except the 8 bytes
  of id faiss adds: the code bytes plus the fixed parts amortised over N, see below):
  - ``Flat`` (exact float32) if ``4 * dim <= B``, or if there are too few vectors to train a PQ
    (``N < PQ_MIN_TRAIN`` = 39 x 256, faiss's minimum for 8-bit sub-quantizers; such a DB is small
    enough that memory does not matter);
  - ``SQfp16`` if ``2 * dim <= B``; ``SQ8`` if ``dim <= B``: when the budget allows one byte per
    dimension, PQ would have one dimension per sub-quantizer, i.e. a (non-uniform) 8-bit scalar
    quantizer of the same size whose training costs ~0.5 s per dimension in faiss; SQ8 is the same
    size, trains in milliseconds and keeps recall high;
  - else PQ with ``index.pq_bits`` bits per sub-quantizer. Default 4: ``PQmx4``, two
    sub-quantizers per byte, stored as a plain IVF-PQ (so shards merge on disk like any IVF-PQ)
    and converted by readers into faiss's fast-scan layout (``IndexIVFPQFastScan``, SIMD look-up
    tables, lists padded to blocks of 32 codes, in memory). For the same bytes it has twice the
    sub-quantizers (768-d: 96 of 8 dims instead of 48 of 16), ranks the shortlist better and scans
    ~4x faster than 8-bit PQ, so far more lists can be probed (bench/results/index.json). 8:
    ``PQm``, the plain IVF-PQ searched from the mmapped lists. The fixed parts, ``F = 4 * (nlist *
    dim + dim * dim [OPQ] + 2^bits * dim) [+ nlist * 16 * code_bytes, fast-scan padding: half a
    block per list on average]`` bytes (coarse centroids, OPQ rotation, PQ codebooks, padding), are
    charged to the budget per vector, at most a quarter of it: the code bytes must fit ``b = B -
    min(F / N, B / 4)`` (above B / 4 the DB is small, its whole index a few MB, and the codes keep
    3/4 of B). ``m`` is the largest count whose code bytes fit: without OPQ a divisor of ``dim``
    (even for 4 bits); with OPQ any (even) count, the rotation mapping to ``m * floor(dim / m)``
    dimensions (``OPQm_dout``, no reduction when m divides dim), so the whole code budget is used.
    Polysemous training is switched off (unused). PQ codes encode the vector itself, not its
    residual to the list centroid (``index.pq_by_residual``, default false: on the index benchmark's
    data the residual codes, faiss's IVFPQ default, rank the re-rank shortlist markedly worse). B = 64, dim 768, nlist 4 sqrt(N), re-rank on (no
    OPQ), 4 bits: N = 1M -> F/N = 12.3 + 0.05 + 3.1 = 15.4, ``IVF4000,PQ96x4``, 63.4
    bytes/vector besides ids; N = 30M -> F/N = 2.8, ``IVF21909,PQ96x4``, 50.8. 8 bits: 1M ->
    ``IVF4000,PQ48`` (61.1), 30M -> ``IVF21909,PQ48`` (50.3); re-rank off (OPQ), 8 bits: 1M ->
    ``OPQ48_768,IVF4000,PQ48`` (63.5); 30M -> ``OPQ61_732,IVF21909,PQ61`` (63.3).
* OPQ (``opq="auto"``): a learned rotation is put in front when the codes rank the final results
  (``index.rerank`` off) and each sub-quantizer covers at least ``OPQ_MIN_DIMS_PER_SUBQ`` = 4
  dimensions (``dim / m >= 4``): then the rotation balances variance across sub-vectors, which is
  where OPQ pays; with 1-3 dims per sub-quantizer PQ is almost a scalar quantizer. With the re-rank
  store (the default) the codes only pick the shortlist and the exact vectors order it: measured
  (README, Benchmarks) OPQ then gains nothing while its training is the most expensive step of a
  768-d CPU build, so auto leaves it off. ``"on"`` / ``"off"`` force it (ignored for Flat / SQ).
* Training sample: ``train_per_list * nlist`` vectors, at least 39 x 2^bits (faiss's k-means
  minimum per codebook) when PQ is used, at most N.
* ``cfg.factory`` (explicit faiss factory string) overrides the rule; nlist / m / bits are then parsed
  from it where present (``PQmx4`` is searched with fast-scan; a fast-scan factory ``...fs`` is
  refused: its block-packed lists cannot be merged on disk), and the training sample is
  ``train_per_list * nlist`` (or N) clamped to N.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from ragseg.config import IndexConfig
from ragseg.errors import UserError

FASTSCAN_BITS = 4  # bits per sub-quantizer of fast-scan codes
FASTSCAN_BBS = 32  # faiss fast-scan packs each inverted list in blocks of 32 codes
OPQ_MIN_DIMS_PER_SUBQ = 4
METRIC = "inner_product"


def pq_min_train(bits: int) -> int:
    """faiss k-means minimum training points for 2**bits centroids per sub-quantizer (39 each)."""
    return 39 * (1 << bits)


PQ_MIN_TRAIN = pq_min_train(8)  # 9984: the largest (8-bit codes); below it codes are Flat


@dataclass(frozen=True)
class IndexParams:
    factory: str
    nlist: int  # 0 when the index is not an IVF
    m: int  # PQ sub-quantizers (0 when codes are not PQ)
    opq: bool
    train_size: int
    code_bytes: int  # bytes per vector in the inverted lists, ids excluded (0 if unknown)
    metric: str = METRIC
    explicit: bool = False
    bits: int = 8  # bits per PQ sub-quantizer (versions before fast-scan: 8)
    fast_scan: bool = False  # readers convert the 4-bit IVF-PQ to faiss's fast-scan layout in memory
    by_residual: bool = True  # PQ codes of residuals to the list centroid (faiss's IVFPQ default)

    def to_dict(self) -> dict:
        return asdict(self)


def _largest_divisor_at_most(n: int, limit: int, step: int = 1) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` and a multiple of ``step`` (at least step)."""
    for m in range(min(n, limit), 0, -1):
        if n % m == 0 and m % step == 0:
            return m
    return step


def nlist_for(n: int, cfg: IndexConfig) -> int:
    target = int(round(cfg.nlist_per_sqrt_n * math.sqrt(max(n, 1))))
    return max(1, min(target, n // cfg.train_per_list))


def fixed_bytes(nlist: int, dim: int, opq: bool, ksub: int = 1 << 8, pad_code_bytes: int = 0) -> int:
    """Bytes of the parts of an IVF-PQ index that do not grow with N: coarse centroids (float32),
    the OPQ rotation (float32, dim x dim at most), the PQ codebooks (ksub x dim float32) and, for
    fast-scan codes of ``pad_code_bytes`` bytes, the expected padding of each inverted list to a
    whole block (half a block of codes per list on average)."""
    pad = nlist * (FASTSCAN_BBS // 2) * pad_code_bytes
    return 4 * (nlist * dim + (dim * dim if opq else 0) + ksub * dim) + pad


def code_budget(n: int, fixed: int, budget: int) -> float:
    """Code bytes per vector left after charging the amortised fixed parts (at most budget / 4)."""
    return budget - min(fixed / max(n, 1), budget / 4)


def params_fixed_bytes(p: IndexParams, dim: int) -> int:
    """:func:`fixed_bytes` of chosen parameters (0 when the codes are not PQ)."""
    if not p.m:
        return 0
    return fixed_bytes(p.nlist, dim, p.opq, 1 << p.bits, p.code_bytes if p.fast_scan else 0)


def _pq_codes(n: int, dim: int, nlist: int, budget: int, opq: bool, bits: int) -> tuple[int, int]:
    """(sub-quantizers m, code bytes) of the largest PQ code whose bytes plus its amortised fixed
    parts (at most budget / 4) fit ``budget``. Without OPQ m divides dim; 4-bit codes need an even
    m (two sub-quantizers per byte)."""
    fast = bits == FASTSCAN_BITS
    step = 2 if fast else 1
    for m in range(dim, step - 1, -1):
        if m % step or (not opq and dim % m):
            continue
        code = (m * bits + 7) // 8
        fixed = fixed_bytes(nlist, dim, opq, 1 << bits, code if fast else 0)
        if code <= code_budget(n, fixed, budget):
            return m, code
    return step, (step * bits + 7) // 8


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
    bits = int(cfg.pq_bits)
    fast = bits == FASTSCAN_BITS
    suffix = f"x{bits}" if bits != 8 else ""
    train = min(n, max(cfg.train_per_list * nlist, pq_min_train(bits)))
    # OPQ candidate first (its rotation is a fixed part too); keep it only where it pays
    if cfg.opq == "on" or (cfg.opq == "auto" and not cfg.rerank):
        m, code = _pq_codes(n, dim, nlist, budget, True, bits)
        if cfg.opq == "on" or dim / m >= OPQ_MIN_DIMS_PER_SUBQ:
            d_out = m * (dim // m)
            return IndexParams(factory=f"OPQ{m}_{d_out},IVF{nlist},PQ{m}{suffix}", nlist=nlist, m=m, opq=True,
                               train_size=train, code_bytes=code, bits=bits, fast_scan=fast,
                               by_residual=cfg.pq_by_residual)
    m, code = _pq_codes(n, dim, nlist, budget, False, bits)
    return IndexParams(factory=f"IVF{nlist},PQ{m}{suffix}", nlist=nlist, m=m, opq=False, train_size=train,
                       code_bytes=code, bits=bits, fast_scan=fast, by_residual=cfg.pq_by_residual)


def _explicit(factory: str, n: int, dim: int, cfg: IndexConfig) -> IndexParams:
    ivf = re.search(r"IVF(\d+)", factory)
    nlist = int(ivf.group(1)) if ivf else 0
    pq = re.search(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?", factory.split(",")[-1])
    m = int(pq.group(1)) if pq else 0
    bits = int(pq.group(2)) if pq and pq.group(2) else 8
    code = factory.split(",")[-1].strip()
    if pq and re.search(r"fsr?$", code):
        raise UserError(
            f"index.factory {factory!r}: fast-scan inverted lists cannot be merged on disk; give "
            f"{re.sub(r'fsr?$', '', code)!r} as the codes instead (4-bit PQ codes are stored plainly and "
            "searched with fast-scan once a reader loads them)")
    if pq:
        code_bytes = (m * bits + 7) // 8
    elif code == "Flat":
        code_bytes = 4 * dim
    else:
        code_bytes = 0
    train = n if not nlist else min(n, max(cfg.train_per_list * nlist, pq_min_train(bits) if m else 0))
    fast = bool(pq) and bits == FASTSCAN_BITS and nlist > 0
    return IndexParams(
        factory=factory, nlist=nlist, m=m, opq=factory.startswith("OPQ"), train_size=max(1, train),
        code_bytes=code_bytes, explicit=True, bits=bits if pq else 8, fast_scan=fast,
        by_residual=cfg.pq_by_residual if pq else True,
    )
