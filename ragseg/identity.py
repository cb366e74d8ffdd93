"""The embedder identity: what decides the embedding space of a feature DB's keys, recorded at build
time and compared, field by field, with the queries of every job that searches them.

A DB key and a label (or ``search``) query are comparable only when the same CLIP image tower with the
same weights pooled the same way made them. :func:`embed_identity` is that record, a flat dict:

- ``model``: ``open_clip:<model>/<pretrained or 'random'>`` (= ``Embed.model_id``); ``arch``: a short
  hash of the architecture (the custom ``model_cfg``, else open_clip's config of ``model``);
- ``weights``: the ``pretrained`` reference, or ``random(seed=N)``; ``weights_sha256``: the weights
  file's sha256 when known (configured, the mirror's SHA256SUMS, or hashed once from the local copy);
- ``mode`` (pool | crop | fcclip), ``pool_image_size`` (pool mode: the trunk's longer input side),
  ``fcclip_input`` (fcclip mode: ``models.fcclip`` [min_size_test, max_size_test, size_divisibility], FC-CLIP's
  test input rule), ``context_pad`` (crop mode), ``dim``.

build-db writes it to the DB's ``manifest.json`` (``embedder``: the fields plus ``clip``, the whole
``models.clip`` section) and build-index / refresh copy it into the index's ``meta.json``, so
``ragseg search`` and ``ragseg label`` can rebuild the embedder from the index alone
(:func:`adopt_clip`). :func:`check` compares a recorded identity with this run's and stops with one
line naming every differing field; weights compare by checksum when both sides know it, else by
reference (and seed for random weights).

Records made before this existed lack fields. They are read as far as they go (:func:`index_identity`:
the index meta's ``embed_model`` / ``embed_mode`` / ``dim``, and the DB manifest's ``models.clip`` when
the DB is readable); a field that stays unknown is not compared and one warning says which, unless it
is in :data:`REQUIRED`, which refuses with a line saying to rebuild. Nothing is required today: every
index built by ragseg 0.2 records model, mode and dim, and refusing them all would strand working
indexes. A field whose meaning changes (e.g. a new pooling rule) belongs in :data:`REQUIRED`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from ragseg.config import ClipConfig, JobConfig, ModelsConfig
from ragseg.errors import UserError

log = logging.getLogger(__name__)

# compared in this order; "weights" covers weights_sha256 (see _weights_differ)
FIELDS = ("model", "arch", "weights", "mode", "pool_image_size", "fcclip_input", "context_pad", "dim")
# fields a recorded identity must have (else: rebuild); see the module docstring. fcclip_input: the input
# rule of FC-CLIP's pooling, recorded by every fcclip-mode DB since that mode exists
REQUIRED: frozenset[str] = frozenset({"fcclip_input"})
# the models.fcclip fields of fcclip_input, in its order
FCCLIP_INPUT_KEYS = ("min_size_test", "max_size_test", "size_divisibility")
# the models.clip fields that make up the identity: ``adopt_clip`` takes them from the index
CLIP_IDENTITY_KEYS = ("model", "pretrained", "sha256", "model_cfg", "mode", "pool_image_size", "seed",
                      "context_pad")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _arch(c: ClipConfig) -> dict:
    import open_clip

    arch = c.model_cfg or open_clip.get_model_config(c.model)
    if arch is None:
        raise UserError(f"unknown open_clip model {c.model!r} (set models.clip.model or models.clip.model_cfg)")
    return arch


def embed_identity(cfg: JobConfig | ModelsConfig, *, mode: str | None = None, checksum: bool = True) -> dict[str, Any]:
    """The identity of the configured CLIP embedder (no weights are loaded). ``mode`` overrides the
    config's (FC-CLIP queries always pool the fcclip way); ``checksum`` False skips looking for the
    weights' sha256."""
    models = cfg.models if isinstance(cfg, JobConfig) else cfg
    c = models.clip
    arch = _arch(c)
    mode = mode or c.mode
    side = c.pool_image_size or int((arch.get("vision_cfg") or {}).get("image_size") or 0) or None
    return {
        "model": f"open_clip:{c.model}/{c.pretrained or 'random'}",
        "arch": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16],
        "weights": c.pretrained or f"random(seed={c.seed})",
        "weights_sha256": weights_sha256(models) if (checksum and c.pretrained) else None,
        "mode": mode,
        "pool_image_size": side if mode == "pool" else None,
        "fcclip_input": [int(getattr(models.fcclip, k)) for k in FCCLIP_INPUT_KEYS] if mode == "fcclip" else None,
        "context_pad": float(c.context_pad) if mode == "crop" else None,
        "dim": int(arch["embed_dim"]),
    }


def record(cfg: JobConfig) -> dict[str, Any]:
    """What build-db writes to the manifest (``embedder``): the identity plus the ``models.clip``
    section that rebuilds the embedder."""
    return {**embed_identity(cfg), "clip": cfg.models.clip.model_dump(mode="json")}


def weights_sha256(models: ModelsConfig) -> str | None:
    """sha256 of the CLIP weights file when it can be known without a download: the configured one,
    the mirror's SHA256SUMS, the Hugging Face cache's blob name, or a hash of the local copy (cached
    per file, size and mtime under ``<cache>/sha256/``, so a 1.7 GB file is hashed once)."""
    from ragseg.models import weights

    cks = weights.checkpoints(models, {"clip"})
    if not cks:
        return None
    try:
        st = weights.locate(cks[0], models.weights)
    except Exception as e:  # noqa: BLE001 - the checksum is a best-effort record
        log.debug("no sha256 for the CLIP weights: %s", e)
        return None
    if len(st.sha256) == 1:
        return next(iter(st.sha256.values())).lower()
    if not (st.cached and st.path):
        return None
    import os

    path = st.path
    if os.path.isdir(path):
        path = weights._weights_file(path) or ""
        if not path:
            return None
    blob = os.path.basename(os.path.realpath(path))
    if _HEX64.match(blob):  # the Hugging Face cache names LFS blobs by their sha256
        return blob
    return file_sha256_cached(path, weights.cache_root(models.weights))


def file_sha256_cached(path: str, cache_root) -> str:
    import os

    from ragseg.models.weights import file_sha256

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    side = os.path.join(str(cache_root), "sha256", key)
    try:
        with open(side) as f:
            got = f.read().strip()
        if _HEX64.match(got):
            return got
    except OSError:
        pass
    got = file_sha256(path)
    try:
        os.makedirs(os.path.dirname(side), exist_ok=True)
        tmp = f"{side}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(got)
        os.replace(tmp, side)
    except OSError:
        pass
    return got


# ----------------------------------------------------------------------------------------------
# Reading a recorded identity
# ----------------------------------------------------------------------------------------------
def from_clip_section(clip: dict, base: dict | None = None) -> dict[str, Any]:
    """An identity from a recorded ``models.clip`` dict (an old DB manifest's ``models.clip``); only
    the fields that dict determines, over ``base``. No weights checksum (it was not recorded)."""
    out = dict(base or {})
    try:
        c = ClipConfig.model_validate(clip)
    except Exception:  # noqa: BLE001 - a partial or foreign section: use what it says directly
        if "pool_image_size" in clip and clip["pool_image_size"] is not None:
            out.setdefault("pool_image_size", clip["pool_image_size"])
        return out
    given = set(clip)
    try:
        full = embed_identity(ModelsConfig(clip=c), checksum=False)
    except UserError:
        return out
    fields = {"pool_image_size": {"pool_image_size", "model", "model_cfg"},
              "context_pad": {"context_pad"}, "arch": {"model", "model_cfg"},
              "weights": {"pretrained", "seed"}, "model": {"model", "pretrained"}, "mode": {"mode"},
              "dim": {"model", "model_cfg"}}
    for k, needs in fields.items():
        if k not in out and needs & given:
            if k == "pool_image_size" and out.get("mode", full["mode"]) != "pool":
                continue
            out[k] = full[k]
    return out


def header_identity(header: dict) -> dict[str, Any]:
    """The identity a DB manifest records (``embedder``), or what an older one implies."""
    if isinstance(header.get("embedder"), dict):
        return {k: v for k, v in header["embedder"].items() if k != "clip"}
    base = {k: v for k, v in (("model", header.get("embed_model")), ("mode", header.get("embed_mode")),
                              ("dim", header.get("dim"))) if v is not None}
    if base.get("dim") is not None:
        base["dim"] = int(base["dim"])
    clip = (header.get("models") or {}).get("clip")
    return from_clip_section(clip, base) if isinstance(clip, dict) else base


def header_clip(header: dict) -> dict | None:
    """The ``models.clip`` section a DB manifest (or index meta) records, for rebuilding the embedder."""
    emb = header.get("embedder")
    if isinstance(emb, dict) and isinstance(emb.get("clip"), dict):
        return emb["clip"]
    clip = (header.get("models") or {}).get("clip")
    return clip if isinstance(clip, dict) else None


def _db_header(meta: dict) -> dict | None:
    from ragseg import ledger

    if not meta.get("db_uri"):
        return None
    try:
        return ledger.read_header(str(meta["db_uri"]), "db")
    except Exception as e:  # noqa: BLE001 - the DB may live elsewhere; the index meta is what counts
        log.debug("cannot read the index's DB manifest %s: %s", meta.get("db_uri"), e)
        return None


def index_identity(meta: dict) -> dict[str, Any]:
    """The identity an index's ``meta.json`` records (``embedder``, copied from its DB at build); for an
    index built before that, its ``embed_model`` / ``embed_mode`` / ``dim`` plus what its DB's manifest
    says (when readable)."""
    if isinstance(meta.get("embedder"), dict):
        return {k: v for k, v in meta["embedder"].items() if k != "clip"}
    base = {k: v for k, v in (("model", meta.get("embed_model")), ("mode", meta.get("embed_mode")),
                              ("dim", meta.get("dim"))) if v is not None}
    if base.get("dim") is not None:
        base["dim"] = int(base["dim"])
    h = _db_header(meta)
    if h is not None:
        return {**header_identity(h), **base}
    return base


def index_clip(meta: dict) -> dict | None:
    """The ``models.clip`` section that made an index's keys (its meta, else its DB's manifest)."""
    got = header_clip(meta)
    if got is None:
        h = _db_header(meta)
        got = header_clip(h) if h is not None else None
    return got


# ----------------------------------------------------------------------------------------------
# Comparing
# ----------------------------------------------------------------------------------------------
def _weights_differ(have: dict, want: dict) -> bool:
    a, b = have.get("weights_sha256"), want.get("weights_sha256")
    if a and b:
        return str(a).lower() != str(b).lower()
    return have.get("weights") != want.get("weights")


def _show(ident: dict, key: str) -> str:
    v = ident.get(key)
    if key == "weights" and ident.get("weights_sha256"):
        return f"{v} (sha256 {str(ident['weights_sha256'])[:12]})"
    return str(v)


def compare(have: dict, want: dict) -> tuple[list[str], list[str]]:
    """(differing fields, fields ``have`` does not record) of a recorded identity vs this run's."""
    diff, unknown = [], []
    keys = list(FIELDS) + [k for k in want if k not in FIELDS and k not in ("weights_sha256", "clip")]
    for k in keys:
        if k not in want:
            continue
        if k not in have:
            if want[k] is not None:  # e.g. context_pad of a pool-mode run means nothing
                unknown.append(k)
            continue
        if k == "weights":
            if _weights_differ(have, want):
                diff.append(k)
        elif have[k] != want[k]:
            diff.append(k)
    if "mode" in diff:  # each mode has its own knob: another mode says it all
        diff = [k for k in diff if k not in ("pool_image_size", "fcclip_input", "context_pad")]
        unknown = [k for k in unknown if k not in ("pool_image_size", "fcclip_input", "context_pad")]
    return diff, unknown


def check(have: dict, want: dict, what: str, context: str = "", fix: str | None = None) -> None:
    """Stop with one line when ``have`` (recorded by ``what``, e.g. "index s3://b/idx") disagrees with
    ``want`` (this run) in any field; warn about fields ``have`` does not record (refuse for
    :data:`REQUIRED` ones)."""
    diff, unknown = compare(have, want)
    if diff:
        parts = ", ".join(f"{k} {_show(have, k)} there vs {_show(want, k)} here" for k in diff)
        fix = fix or ("set models.clip to match it, or leave the identity fields of models.clip out of the "
                      "config to take them from the index")
        raise UserError(f"{what} holds embeddings of another embedder than this run's{context}: {parts}; "
                        f"queries and keys must come from the same CLIP model, weights and pooling: {fix}")
    missing = [k for k in unknown if k in REQUIRED]
    if missing:
        raise UserError(f"{what} does not record the embedder's {', '.join(missing)} (made by an older ragseg): "
                        f"rebuild it (build-db, then build-index) so that queries can be checked against it")
    if unknown:
        log.warning("%s does not record the embedder's %s (made by an older ragseg): not checked; rebuild it "
                    "to check them", what, ", ".join(unknown))


def adopt_clip(cfg: JobConfig, clip: dict | None, fcclip_input: list | None = None) -> JobConfig:
    """``cfg`` with the identity fields of ``models.clip`` that the config does not set itself taken
    from ``clip`` (a recorded section), and FC-CLIP's test input rule (``models.fcclip`` sizes) from
    ``fcclip_input`` (a recorded identity's) where the config does not set it: ``search`` and ``label``
    then embed exactly like the index's keys without a ``--config``. Fields the config sets are kept
    (and :func:`check` compares them)."""
    models = cfg.models
    if clip:
        have = cfg.models.clip
        given = have.model_fields_set if "clip" in cfg.models.model_fields_set else set()
        update = {k: clip[k] for k in CLIP_IDENTITY_KEYS if k in clip and k not in given}
        if update:
            values = have.model_dump()
            # only the user's fields and the adopted ones count as set (the rest are defaults either way)
            new_clip = ClipConfig.model_validate({**{k: values[k] for k in given}, **update})
            models = models.model_copy(update={"clip": new_clip})
    if fcclip_input and len(fcclip_input) == len(FCCLIP_INPUT_KEYS):
        fc = models.fcclip
        given = fc.model_fields_set if "fcclip" in cfg.models.model_fields_set else set()
        update = {k: int(v) for k, v in zip(FCCLIP_INPUT_KEYS, fcclip_input) if k not in given}
        if update:
            models = models.model_copy(update={"fcclip": fc.model_copy(update=update)})
    return cfg if models is cfg.models else cfg.model_copy(update={"models": models})
