"""The feature database layout (output of build-db, input of build-index / refresh).

```
<db>/manifest.json            shards done, rows, config hash, models, embedding model/mode/dim
<db>/inputs/<shard>.json      the image ids (and URIs) an input shard covers, written before its features
<db>/features/<shard>.parquet one row per segment (ragseg.schema.feature_schema)
<db>/errors/<shard>.parquet   bad inputs of that shard (ragseg.errors.ERRORS_SCHEMA)
```

Exactly-once: a shard's files are written atomically under names derived from its content and only
then recorded in the manifest (itself replaced atomically). A rerun after a kill recomputes the
pending images, which chunk into the same shards, and overwrites any unrecorded leftovers; readers
only trust what the manifest lists.
"""

from __future__ import annotations

import time
from typing import Any

from ragseg import io
from ragseg.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1


def manifest_uri(db: str) -> str:
    return io.join(db, MANIFEST)


def shard_paths(shard: str) -> dict[str, str]:
    return {
        "inputs": f"inputs/{shard}.json",
        "features": f"features/{shard}.parquet",
        "errors": f"errors/{shard}.parquet",
    }


def read_manifest(db: str) -> dict[str, Any] | None:
    uri = manifest_uri(db)
    if not io.exists(uri):
        return None
    try:
        m = io.read_json(uri)
    except ValueError as e:
        raise UserError(f"DB manifest {uri} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
        raise UserError(f"DB manifest {uri} is not a ragseg feature-DB manifest (format {FORMAT})")
    return m


def new_manifest(embed_model: str, embed_mode: str, dim: int, models_hash: str, models: dict) -> dict:
    return {
        "format": FORMAT,
        "embed_model": embed_model,
        "embed_mode": embed_mode,
        "dim": int(dim),
        "models_hash": models_hash,
        "models": models,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": [],
        "shards": [],
    }


def check_compatible(m: dict, embed_model: str, embed_mode: str, dim: int, db: str) -> None:
    """A DB holds one embedding space: a different model, mode or dim is refused."""
    have = (m["embed_model"], m["embed_mode"], int(m["dim"]))
    want = (embed_model, embed_mode, int(dim))
    if have != want:
        raise UserError(
            f"DB {db} was built with embedding {have[0]} mode={have[1]} dim={have[2]}, but this run "
            f"uses {want[0]} mode={want[1]} dim={want[2]}; use a new --out DB (or the same models)"
        )


def write_manifest(db: str, m: dict) -> None:
    io.write_json_atomic(manifest_uri(db), m)


def write_shard_inputs(root: str, shard: str, rows: list[dict]) -> str:
    """Record which images an input shard covers (before any of its outputs); returns the relative
    path to store in the manifest entry. Used by build-db and label alike."""
    rel = shard_paths(shard)["inputs"]
    io.write_json_atomic(io.join(root, rel), {"image_ids": [str(r["image_id"]) for r in rows],
                                              "uris": [str(r["uri"]) for r in rows]})
    return rel


def covered_image_ids(db: str, m: dict) -> set[str]:
    """Image ids of every shard the manifest lists (their input files say which)."""
    done: set[str] = set()
    for s in m["shards"]:
        uri = io.join(db, s["inputs"])
        try:
            done.update(io.read_json(uri)["image_ids"])
        except FileNotFoundError:
            raise UserError(f"DB {db}: manifest lists shard {s['name']} but {uri} is missing") from None
    return done
