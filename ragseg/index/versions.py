"""Index versions: the immutable version dirs ``<index>/v000N/``, the ``CURRENT`` pointer, publishing,
pruning, and the staging dir a version is built in.

Layout of a version (all paths relative to the version dir)::

    trained.index      the trained, empty index (quantizer, PQ, OPQ) used by every shard
    shards/<name>.index  one populated index per feature shard (kept so that a refresh can re-merge)
    populated.index    the trained index whose inverted lists are OnDiskInvertedLists ...
    merged.ivfdata     ... stored here (merged with faiss.contrib.ondisk.merge_ondisk)
    labels.parquet     faiss id -> label, image_id, segment_id, shard (row i has id i)
    rerank.npy         optional re-rank store (format in ragseg.index.rerank); absent when
                       ``index.rerank`` is off or in versions built before it
    meta.json          factory, metric, dim, count, parameters, nprobe, re-rank settings, quality
                       metrics (``recall``), nprobe tuning, shards, provenance

Publishing: a version is built in a staging dir (:func:`new_staging`), moved (local) or uploaded
(remote) to ``v000N/`` (:func:`finalize_with_meta`; meta.json last: a version dir is complete when it
has meta.json) and only then, after its recall check passed, ``CURRENT`` is replaced atomically
(:func:`publish`, ``ragseg.io.write_text_atomic``). A killed build therefore leaves CURRENT on the
old version.

Pruning (:func:`prune`) keeps the newest ``keep_versions`` complete versions, never deletes the live
one, and never deletes a version that stopped being live less than ``grace_s`` seconds ago (the time
its successor was created), so that readers that resolved CURRENT just before a publish still find
their files. A reader that already opened a version is not disturbed by a later deletion on POSIX
file systems: the mmapped ``merged.ivfdata`` stays valid after unlink until it is unmapped, and the
other files were read into memory at open. (On Windows, or NFS without "silly rename", deletion of a
mapped file can fail or break the reader; keep the grace period longer than any reader's lifetime
there.) Remote readers use their local copy.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid

from ragseg import io as rio
from ragseg.errors import UserError

CURRENT = "CURRENT"
VERSION_RE = re.compile(r"^v(\d{4,})$")
META = "meta.json"
LABELS = "labels.parquet"
POPULATED = "populated.index"
IVFDATA = "merged.ivfdata"
TRAINED = "trained.index"
RERANK = "rerank.npy"
SHARDS_DIR = "shards"
STAGING = "_staging"


def version_name(i: int) -> str:
    return f"v{i:04d}"


def is_local(uri: str) -> bool:
    return rio.protocol(uri) == "file"


def local_path(uri: str) -> str:
    return rio.fs_and_path(uri)[1] if "://" in uri else os.path.abspath(uri)


# ----------------------------------------------------------------------------------------------
# Versions and the CURRENT pointer
# ----------------------------------------------------------------------------------------------
def current_version(uri: str) -> str | None:
    """The version CURRENT names, or None when nothing was published yet."""
    cur = rio.join(uri, CURRENT)
    if not rio.exists(cur):
        return None
    name = rio.read_text(cur).strip()
    if not VERSION_RE.match(name):
        raise UserError(f"{cur} is corrupt: {name!r} is not a version name")
    return name


def _version_dirs(uri: str) -> list[str]:
    fs, path = rio.fs_and_path(uri)
    if not fs.exists(path):
        return []
    names = []
    for p in fs.ls(path, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if VERSION_RE.match(base):
            names.append(base)
    return sorted(names, key=lambda n: int(n[1:]))


def list_versions(uri: str) -> list[str]:
    """Complete versions (meta.json present), oldest first. Incomplete dirs (killed uploads) are
    skipped."""
    return [v for v in _version_dirs(uri) if rio.exists(rio.join(uri, v, META))]


def next_version(uri: str) -> str:
    """The next unused version name (after every version dir, complete or not)."""
    names = _version_dirs(uri)
    last = int(names[-1][1:]) if names else 0
    return version_name(last + 1)


def read_meta(uri: str, version: str | None = None) -> dict:
    version = version or current_version(uri)
    if version is None:
        raise UserError(f"no index version published under {uri} (CURRENT missing)")
    p = rio.join(uri, version, META)
    if not rio.exists(p):
        raise UserError(f"index version {version} under {uri} is missing or incomplete ({p})")
    return rio.read_json(p)


def publish(uri: str, version: str) -> None:
    """Point CURRENT at ``version`` (atomic replace). The caller has verified the version."""
    if not rio.exists(rio.join(uri, version, META)):
        raise UserError(f"refusing to publish incomplete version {version} under {uri}")
    rio.write_text_atomic(rio.join(uri, CURRENT), version + "\n")


def prune(uri: str, keep: int, grace_s: float = 600.0, now: float | None = None) -> list[str]:
    """Delete old complete versions beyond the newest ``keep`` (see module docstring). Returns the
    deleted names. Also removes staging dirs older than ``grace_s`` left by killed builds, and the
    staging folder itself once empty."""
    now = time.time() if now is None else now
    live = current_version(uri)
    versions = list_versions(uri)
    deleted: list[str] = []
    keep_set = set(versions[-keep:]) | ({live} if live else set())
    created = {}
    for v in versions:
        try:
            created[v] = float(read_meta(uri, v).get("created", 0.0))
        except Exception:  # unreadable meta: treat as just created (keep)
            created[v] = now
    for i, v in enumerate(versions):
        if v in keep_set:
            continue
        later = versions[i + 1:]
        superseded_at = created[later[0]] if later else now
        if now - superseded_at < grace_s:
            continue
        rio.remove(rio.join(uri, v), recursive=True)
        deleted.append(v)
    if is_local(uri):
        st = os.path.join(local_path(uri), STAGING)
        if os.path.isdir(st):
            for d in os.listdir(st):
                p = os.path.join(st, d)
                with contextlib.suppress(OSError):
                    if now - os.path.getmtime(p) > grace_s:
                        shutil.rmtree(p, ignore_errors=True)
            with contextlib.suppress(OSError):  # only when empty: a build in progress keeps it
                os.rmdir(st)
    return deleted



# ----------------------------------------------------------------------------------------------
# Staging dir, finalize
# ----------------------------------------------------------------------------------------------
def new_staging(store_uri: str) -> str:
    """A fresh staging dir: under ``<index>/_staging/`` for local stores, a temp dir otherwise."""
    if is_local(store_uri):
        d = os.path.join(local_path(store_uri), STAGING, f"{uuid.uuid4().hex[:12]}")
        os.makedirs(d)
        return d
    return tempfile.mkdtemp(prefix="ragseg-index-")


def fetch_file(store_uri: str, version: str, rel: str, dest: str) -> None:
    """Copy ``rel`` of a published version to the local path ``dest`` (a hard link on local stores)."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if is_local(store_uri):
        src = os.path.join(local_path(store_uri), version, rel)
        if not os.path.exists(src):
            raise UserError(f"live index version is missing {src}; rebuild with build-index")
        try:
            os.link(src, dest)  # versions are immutable: share the bytes
        except OSError:
            shutil.copy2(src, dest)
    else:
        fs, base = rio.fs_and_path(rio.join(store_uri, version, rel))
        if not fs.exists(base):
            raise UserError(f"live index version is missing {rio.join(store_uri, version, rel)}")
        fs.get(base, dest)


def finalize(store_uri: str, staging: str) -> str:
    """Move/upload the complete staging dir to the next free version name; returns the name."""
    if is_local(store_uri):
        root = local_path(store_uri)
        for _ in range(100):
            v = next_version(store_uri)
            try:
                os.rename(staging, os.path.join(root, v))
                return v
            except OSError:  # taken by a concurrent build: try the next number
                if not os.path.exists(os.path.join(root, v)):
                    raise
        raise UserError(f"could not allocate a version name under {store_uri}")
    v = next_version(store_uri)
    fs, base = rio.fs_and_path(rio.join(store_uri, v))
    files = []
    for dp, _, fns in os.walk(staging):
        for fn in fns:
            files.append(os.path.relpath(os.path.join(dp, fn), staging))
    files.sort(key=lambda r: (r == META, r))  # meta.json last: it marks the version complete
    for rel in files:
        fs.put(os.path.join(staging, rel), f"{base}/{rel}")
    return v


def finalize_with_meta(store_uri: str, staging: str, meta: dict, trained_from: str | None) -> str:
    """Write meta.json with the version name it will get, then move/upload the dir. Local stores
    rename the whole dir (atomic); if the name was taken meanwhile, meta is rewritten and retried."""
    for _ in range(100):
        v = next_version(store_uri)
        meta["version"] = v
        meta["trained_from"] = trained_from or v
        rio.write_json_atomic(os.path.join(staging, META), meta)
        if is_local(store_uri):
            target = os.path.join(local_path(store_uri), v)
            try:
                os.rename(staging, target)
                return v
            except OSError:
                if not os.path.exists(target):
                    raise
                continue
        got = finalize(store_uri, staging)
        if got != v:  # a concurrent writer took v between our two calls: fix the name in meta
            meta["version"] = got
            meta["trained_from"] = trained_from or got
            rio.write_json_atomic(rio.join(store_uri, got, META), meta)
        return got
    raise UserError(f"could not allocate a version name under {store_uri}")

