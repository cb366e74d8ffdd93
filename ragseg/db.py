"""The feature database layout (output of build-db, input of build-index / refresh).

```
<db>/manifest.json               header: format 2, embedding model/mode/dim, models, runs, segments
<db>/_manifest/seg-*.parquet     compacted commit records (ragseg.ledger.RECORD_SCHEMA)
<db>/_commits/<piece>.json       commit records not compacted yet
<db>/features/<piece>.parquet    one row per segment (ragseg.schema.feature_schema)
<db>/errors/<piece>.parquet      bad inputs of that piece (ragseg.errors.ERRORS_SCHEMA)
<db>/_lease.json                 the running writer's lease
```

Exactly-once (ragseg.ledger): a worker writes a piece's files, then its commit record; readers only
trust committed pieces. A rerun after a kill recomputes the images no committed piece covers.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ragseg import io, ledger
from ragseg.errors import UserError

KIND = "db"


def piece_paths(name: str) -> dict[str, str]:
    return {"features": f"features/{name}.parquet", "errors": f"errors/{name}.parquet"}


def open_db(db: str) -> ledger.Ledger | None:
    """Header and committed pieces of a DB; None for a DB that does not exist yet."""
    return ledger.load(db, KIND)


def new_header(embed_model: str, embed_mode: str, dim: int, models_hash: str, models: dict,
               **fields) -> dict:
    """A new DB header; ``fields`` adds e.g. ``embedder`` (ragseg.identity.record) and ``provenance``."""
    return ledger.new_header(KIND, embed_model=embed_model, embed_mode=embed_mode, dim=int(dim),
                             models_hash=models_hash, models=models, **fields)


def note_mask_model(h: dict, mask_model: str, db: str) -> str | None:
    """Record the model that made this run's masks in the header (``mask_model``: the first, and
    ``mask_models``: every one seen, in order). Returns a warning when the DB already holds masks of
    another model: mixing them is allowed (each feature row keeps its ``label_source``) but the DB's
    segments then differ in kind."""
    seen = h.setdefault("mask_models", [])
    h.setdefault("mask_model", mask_model)
    if mask_model in seen:
        return None
    seen.append(mask_model)
    if len(seen) == 1:
        return None
    return (f"DB {db} already holds segments whose masks came from {', '.join(seen[:-1])}; this run adds "
            f"masks from {mask_model}: one DB now mixes mask models (use a new --out to keep them apart)")


def check_compatible(h: dict, embed_model: str, embed_mode: str, dim: int, db: str) -> None:
    """A DB holds one embedding space: a different model, mode or dim is refused."""
    have = (h["embed_model"], h["embed_mode"], int(h["dim"]))
    want = (embed_model, embed_mode, int(dim))
    if have != want:
        raise UserError(
            f"DB {db} was built with embedding {have[0]} mode={have[1]} dim={have[2]}, but this run "
            f"uses {want[0]} mode={want[1]} dim={want[2]}; use a new --out DB (or the same models)"
        )


def commit_files(db: str, dim: int, pieces: list[dict], embed_model: str = "test", embed_mode: str = "pool") -> None:
    """Make ``db`` a DB whose committed pieces are exactly ``pieces`` (``{"name", "path", "rows"}``
    plus optional ``image_ids``), their feature files written already: for benchmarks and tests that
    feed realistic rows into the index without running models. Replaces any earlier ledger."""
    io.remove(io.join(db, ledger.SEGMENTS), recursive=True)
    io.remove(io.join(db, ledger.COMMITS), recursive=True)
    header = new_header(embed_model, embed_mode, dim, "", {})
    recs = [ledger.new_record(p["name"], p.get("image_ids") or [f"{p['name']}/*"], images=len(p.get("image_ids") or [1]),
                              segments=int(p["rows"]), errors=0, empty_images=0, data_path=p["path"],
                              errors_path=None, parts_path=None, stage_seconds={}) for p in pieces]
    comp = ledger.Compactor(db, header, every=max(1, len(recs)), seconds=float("inf"))
    if recs:
        comp._write(recs, [])
    else:
        ledger.write_header(db, header)


def write_db(db: str, dim: int, pieces: dict[str, pa.Table], embed_model: str = "test",
             embed_mode: str = "pool") -> None:
    """Write a complete DB from ready feature tables (one committed piece each), see :func:`commit_files`."""
    listed = []
    for name, table in pieces.items():
        path = piece_paths(name)["features"]
        io.write_parquet_atomic(io.join(db, path), table)
        ids = sorted({str(v) for v in table.column("image_id").to_pylist()})
        listed.append({"name": name, "path": path, "rows": table.num_rows, "image_ids": ids})
    commit_files(db, dim, listed, embed_model, embed_mode)


def migrate_v1(root: str, kind: str) -> dict[str, Any]:
    """Upgrade a format-1 folder (one ``manifest.json`` listing every shard, ``inputs/<shard>.json``)
    to format 2 in place: one segment with a record per listed shard, then the new header. The inputs
    files are read with one bulk (concurrent) read. Idempotent: a format-2 folder is left as is."""
    import json

    uri = ledger.manifest_uri(root)
    try:
        old = io.read_json(uri)
    except FileNotFoundError:
        raise UserError(f"{uri} not found: {root} is not a ragseg output folder") from None
    if old.get("format") == ledger.FORMAT:
        return {"migrated": False, "message": f"{root} is already format {ledger.FORMAT}"}
    if old.get("format") != 1 or not isinstance(old.get("shards"), list):
        raise UserError(f"{uri} is not a ragseg manifest of format 1 or {ledger.FORMAT}")
    shards = old["shards"]
    inputs = ledger._cat([io.join(root, s["inputs"]) for s in shards])
    records = []
    for s in shards:
        data = inputs[io.join(root, s["inputs"])]
        if isinstance(data, Exception):
            raise UserError(f"{root}: manifest lists shard {s['name']} but {s['inputs']} is unreadable ({data})")
        ids = json.loads(data)["image_ids"]
        if kind == KIND:
            data_path, parts = s["path"], None
            segs = int(s["rows"])
        else:
            data_path, parts = f"segments/{s['name']}.parquet", f"parts/{s['name']}.json"
            segs = int(s.get("segments", 0))
        errs = int(s.get("errors", 0))
        rec = ledger.new_record(s["name"], ids, images=int(s.get("images", len(ids))), segments=segs, errors=errs,
                                empty_images=int(s.get("empty_images", 0)), data_path=data_path,
                                errors_path=(s.get("errors_path") or f"errors/{s['name']}.parquet") if errs else None,
                                parts_path=parts, stage_seconds={})
        records.append(rec)
    fields = {k: v for k, v in old.items() if k not in ("format", "shards", "runs", "created")}
    header = ledger.new_header(kind, **fields)
    header["runs"] = old.get("runs", [])
    header["migrated_from"] = 1
    # the new header is written last: until then the folder still reads as format 1
    comp = ledger.Compactor(root, header, every=max(1, len(records)), seconds=float("inf"))
    comp.header = header
    if records:
        comp._write(records, [])
    else:
        ledger.write_header(root, header)
    return {"migrated": True, "pieces": len(records), "message": f"{root}: {len(records)} shards migrated to format 2"}
