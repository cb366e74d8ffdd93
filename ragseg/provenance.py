"""What made an output: recorded in every file ragseg writes, printed by ``ragseg info``.

:func:`job_provenance` is one JSON-able dict per job run: ``ragseg_version``, ``job``, ``created``, the
whole config as YAML (``config_yaml``), the models the job loads with their ids and checksums
(``models``), the embedder identity (``embedder``, ragseg.identity), and per job:

- build-db: ``source``, ``masks``;
- label: ``index`` / ``fallback_index`` (URI and published version), ``vocabulary`` (COCO categories),
  ``proposals``, ``ensemble`` (alpha, beta, gamma, form, k, temperatures, scores);
- build-index / refresh: ``db`` (URI and the DB's own provenance), ``index`` (URI).

Where it goes: the Parquet schema metadata of every data file (key :data:`KEY`, the JSON bytes;
``features/``, ``segments/``, ``errors/``, an index version's ``labels.parquet``), the output folder's
``manifest.json`` (``provenance``), an index version's ``meta.json`` (``provenance``), and the ``info``
of ``panoptic.json``. :func:`read_parquet` reads it back from a file.
"""

from __future__ import annotations

import json
import time
from typing import Any

KEY = b"ragseg.provenance"


def ragseg_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ragseg")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "unknown"


def _checkpoint_sha(ck, models) -> str | None:
    from ragseg.identity import file_sha256_cached
    from ragseg.models import weights

    if ck.sha256:
        return ck.sha256.lower()
    try:
        st = weights.locate(ck, models.weights)
    except Exception:  # noqa: BLE001 - a checksum is a best-effort record
        return None
    if len(st.sha256) == 1:
        return next(iter(st.sha256.values())).lower()
    if ck.kind == "file" and st.cached and st.path:
        try:
            return file_sha256_cached(st.path, weights.cache_root(models.weights))
        except OSError:
            return None
    return None


def model_records(cfg, sections: set[str]) -> list[dict[str, Any]]:
    """Per model section a job loads: its id (``open_clip:model/tag``, SAM arch + checkpoint, the
    Grounding DINO model id, the FC-CLIP checkpoint; ``random(seed=N)`` for random weights) and the
    sha256 of its weights file when known (configured, the mirror's, or hashed once from the cache)."""
    from ragseg.identity import embed_identity
    from ragseg.models import weights

    m = cfg.models
    cks = {ck.field.split(".")[1]: ck for ck in weights.checkpoints(m, set(sections))}
    out = []
    for sec in ("clip", "sam", "gdino", "fcclip"):
        if sec not in sections:
            continue
        ck = cks.get(sec)
        if sec == "clip":
            ident = embed_identity(m)
            out.append({"section": "clip", "id": ident["model"], "weights": ident["weights"],
                        "sha256": ident["weights_sha256"]})
            continue
        c = getattr(m, sec)
        if sec == "sam":
            mid = f"segment_anything:{c.arch}"
        elif sec == "gdino":
            mid = f"transformers:{c.model_id or 'grounding-dino-tiny-random'}" + (f"@{c.revision}" if c.revision else "")
        else:
            mid = "fcclip"
        ref = ck.ref if ck is not None else f"random(seed={c.seed})"
        out.append({"section": sec, "id": mid, "weights": ref,
                    "sha256": _checkpoint_sha(ck, m) if ck is not None else None})
    return out


def job_provenance(cfg, job: str, **fields: Any) -> dict[str, Any]:
    """The record of one run of ``job`` with config ``cfg`` (module docstring); ``fields`` adds the
    job's own entries (index, vocabulary, db...)."""
    import yaml

    from ragseg.preflight import models_needed

    prov: dict[str, Any] = {
        "ragseg_version": ragseg_version(), "job": job,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_yaml": yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
    }
    if job in ("build-db", "label"):
        from ragseg.identity import embed_identity

        prov["models"] = model_records(cfg, models_needed(cfg, job))
        prov["embedder"] = embed_identity(cfg, mode="fcclip" if job == "label" and cfg.label.proposals == "fcclip"
                                          else None)
    if job == "build-db":
        prov["source"] = cfg.source.model_dump(mode="json") if cfg.source is not None else None
        prov["masks"] = cfg.build_db.masks
    if job == "label":
        lc = cfg.label
        prov["proposals"] = lc.proposals
        prov["ensemble"] = lc.ensemble.model_dump(mode="json")
    prov.update(fields)
    return prov


def to_bytes(prov: dict[str, Any] | None) -> bytes | None:
    return None if prov is None else json.dumps(prov, sort_keys=True, default=str).encode()


def attach(table, prov: bytes | dict | None):
    """``table`` with the provenance in its schema metadata (key :data:`KEY`); unchanged for None."""
    if prov is None:
        return table
    data = prov if isinstance(prov, bytes) else to_bytes(prov)
    return table.replace_schema_metadata({**(table.schema.metadata or {}), KEY: data})


def read_parquet(uri: str) -> dict[str, Any] | None:
    """The provenance of a Parquet file ragseg wrote (None when it has none: an older file)."""
    import pyarrow.parquet as pq

    from ragseg import io

    fs, path = io.fs_and_path(uri)
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    raw = meta.get(KEY)
    return json.loads(raw) if raw else None
