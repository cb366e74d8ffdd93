"""Quality of a staged index version as a reader will search it: nprobe tuning and held-out metrics
(:func:`evaluate_index`; the metrics themselves in ragseg.index.quality), the publish gate
(:func:`quality_gate`) and the size report (:func:`size_report`)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from ragseg.config import JobConfig
from ragseg.errors import UserError
from ragseg.index import quality as iq
from ragseg.index import store as st
from ragseg.index import versions as vs
from ragseg.index.params import IndexParams, params_fixed_bytes

RECALL_K = iq.RECALL_K
ID_BYTES = 8  # faiss stores one int64 id per vector in the inverted lists
SATURATION_TOL = 0.01  # nprobe tuning: a metric within this of its best is "saturated"


def exact_k(cfg: JobConfig) -> int:
    """Exact neighbours computed per quality query: enough for recall@10 and the label job's vote,
    plus the query itself."""
    return max(RECALL_K, cfg.label.ensemble.k) + 1


class LabelsById:
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
    """Tune nprobe on one half of the quality queries and measure the other half (ragseg.index.build
    module doc, step 7). ``exact`` = (sims, ids) exact top-k of every query (self included), ``labels[ids]`` the
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
             for name in (vs.POPULATED, vs.IVFDATA, vs.RERANK) if os.path.exists(os.path.join(staging, name))}
    index_bytes = sizes.get(vs.POPULATED, 0) + sizes.get(vs.IVFDATA, 0)
    if loaded is not None:
        sizes["loaded_index"] = loaded
        index_bytes = loaded
    per_vector = index_bytes / total
    return {**sizes, "per_vector": per_vector, "ids_per_vector": ID_BYTES,
            "per_vector_excl_ids": per_vector - ID_BYTES, "code_bytes": params.code_bytes,
            "fixed": params_fixed_bytes(params, dim) if params.m else None,
            "measured": "loaded_index" if loaded is not None else "files",
            "rerank_store_per_vector": sizes.get(vs.RERANK, 0) / total}
