"""Databases derived from a feature DB, each indexed through the project's own index path.

:func:`write_subset_db` copies the rows a predicate keeps, shard by shard (one shard in memory at a
time), into a new feature DB (``ragseg.db.write_db``: Parquet pieces + ledger, the source DB's
embedding identity kept, so ``build-db`` can add to it later). :func:`derived_index` does that under
``<experiment.cache>/derived/<key>/`` and builds its index with ``ragseg.index.build.build_index``,
the code path of ``ragseg build-index``: the index's own recall is part of every result. The key
hashes the source DB's identity (its header and committed pieces), the selection and the index
settings, so a rerun reuses a finished build (``done.json`` is written last). Experiments measure the
index instead of gating it: the publish gate (``index.min_recall_at_10``, ``min_vote_agreement``) is
off for derived builds, and the recall at build time is recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ragseg import io
from ragseg.config import JobConfig, deep_merge
from ragseg.errors import UserError

# keep(global row offset of the shard, the shard's table) -> bool mask over its rows
Keep = Callable[[int, pa.Table], np.ndarray]


def db_identity(db_uri: str) -> dict:
    """What makes a feature DB's content: its header's identity and its committed pieces."""
    from ragseg import db as dblib

    led = dblib.open_db(db_uri)
    if led is None:
        raise UserError(f"feature DB manifest not found: {io.join(db_uri, 'manifest.json')} (run build-db first)")
    names = led.records.column("name").to_pylist()
    h = led.header
    return {"uri": db_uri, "embed_model": h.get("embed_model"), "embed_mode": h.get("embed_mode"),
            "dim": h.get("dim"), "totals": h.get("totals"),
            "pieces": hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]}


def db_labels(db_uri: str) -> np.ndarray:
    """The label of every DB row in :func:`ragseg.index.shards.load_db` order (one column read per shard)."""
    from ragseg.index.shards import load_db

    out = []
    for s in load_db(db_uri).shards:
        out.append(np.asarray(io.read_parquet(s.uri, columns=["label"]).column("label").cast(pa.string())
                              .to_pylist(), dtype=object))
    return np.concatenate(out) if out else np.zeros(0, object)


def write_subset_db(db_uri: str, out_db: str, keep: Keep) -> dict:
    """Copy the kept rows of ``db_uri`` into a new feature DB at ``out_db``; returns counts and labels."""
    from ragseg.db import write_db
    from ragseg.index.shards import load_db

    db = load_db(db_uri)
    if io.exists(out_db):
        io.remove(out_db, recursive=True)
    pieces, start, rows, labels = {}, 0, 0, set()
    for s in db.shards:
        t = io.read_parquet(s.uri)
        mask = np.asarray(keep(start, t), bool)
        start += t.num_rows
        if mask.any():
            sub = t.filter(pa.array(mask))
            pieces[s.name] = sub
            rows += sub.num_rows
            labels.update(sub.column("label").cast(pa.string()).to_pylist())
    if rows == 0:
        raise UserError(f"the selection keeps no row of {db_uri}")
    write_db(out_db, db.dim, pieces, db.embed_model, db.embed_mode)
    return {"db": out_db, "rows": rows, "labels": sorted(labels), "source_rows": start}


def index_cfg(cfg: JobConfig, out: str) -> JobConfig:
    """``cfg`` building into ``out`` with the publish gate off (the experiment records the recall)."""
    return JobConfig.model_validate(deep_merge(cfg.model_dump(mode="json"), {
        "index": {"out": out, "min_recall_at_10": 0.0, "min_vote_agreement": 0.0}}))


def derived_index(cfg: JobConfig, db_uri: str, spec: dict, keep: Keep) -> dict:
    """The index of the DB that ``keep`` selects from ``db_uri`` (``spec`` names the selection in the
    key), built once under the cache. Returns ``done.json``: db, index, version, count, recall, ..."""
    from ragseg.index.build import build_index

    icfg = {k: v for k, v in cfg.index.model_dump(mode="json").items() if k != "out"}
    key = hashlib.sha256(json.dumps({"db": db_identity(db_uri), "spec": spec, "index": icfg},
                                    sort_keys=True).encode()).hexdigest()[:16]
    root = io.join(cfg.experiment.cache, "derived", key)
    done = io.join(root, "done.json")
    if io.exists(done):
        return io.read_json(done)
    sub = write_subset_db(db_uri, io.join(root, "db"), keep)
    index = io.join(root, "index")
    if io.exists(index):
        io.remove(index, recursive=True)
    res = build_index(sub["db"], index_cfg(cfg, index))
    info = {"key": key, "spec": spec, "source_db": db_uri, "db": sub["db"], "index": index,
            "version": res["version"], "count": res["count"], "labels": sub["labels"],
            "recall": res.get("recall"), "factory": res.get("factory"), "nprobe": res.get("nprobe"),
            "build_seconds": res.get("build_seconds")}
    io.write_json_atomic(done, info)
    return info


def all_rows(_start: int, t: pa.Table) -> np.ndarray:
    return np.ones(t.num_rows, bool)


def rows_in(positions: np.ndarray) -> Keep:
    """Keep the rows whose global position (load_db order) is in ``positions``."""
    pos = np.sort(np.asarray(positions, np.int64))

    def keep(start: int, t: pa.Table) -> np.ndarray:
        idx = np.arange(start, start + t.num_rows)
        return np.isin(idx, pos, assume_unique=True)

    return keep


def labels_in(vocab, classes: set[int]) -> Keep:
    """Keep the rows whose label maps (Vocab.index_of) to one of the vocabulary classes ``classes``."""

    def keep(_start: int, t: pa.Table) -> np.ndarray:
        cls = vocab.indices_of(np.asarray(t.column("label").cast(pa.string()).to_pylist(), dtype=object))
        return np.isin(cls, list(classes))

    return keep
