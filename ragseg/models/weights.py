"""Resolve model checkpoints to local files: local path, http(s) URL or any fsspec URI (s3://, gs://...).

Remote files are downloaded once into the cache directory (``RAGSEG_CACHE`` env var, else
``WeightsConfig.cache_dir``, else ``~/.cache/ragseg``) under ``<cache>/weights/<name>`` where the name
is derived from the URI (a short hash of the URI + its base name), so two URIs never share a file. The
download is written to a temporary file in the same directory, checked against ``sha256`` when one is
given, and renamed into place only when complete and correct: a killed or corrupt download never
becomes the cached copy. A cache hit does no network I/O.

Offline (``WeightsConfig.offline``) or when the fetch fails, a checkpoint that is not cached raises
:class:`ragseg.errors.UserError` naming the checkpoint, the cache path that was looked at and how to
provide the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import uuid
from pathlib import Path
from typing import Any

from ragseg.config import WeightsConfig
from ragseg.errors import UserError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ChecksumError(UserError):
    """A checkpoint's sha256 differs from the configured one."""


def cache_root(cfg: WeightsConfig | None = None) -> Path:
    """The ragseg cache directory: ``RAGSEG_CACHE``, else ``cfg.cache_dir``, else ``~/.cache/ragseg``."""
    env = os.environ.get("RAGSEG_CACHE")
    if env:
        return Path(env).expanduser()
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path("~/.cache/ragseg").expanduser()


def is_remote(ref: str) -> bool:
    """True for a URI with a scheme other than ``file://`` (http, https, s3, gs, memory, ...)."""
    return "://" in ref and not ref.startswith("file://")


def cache_path(ref: str, cfg: WeightsConfig | None = None) -> Path:
    """Where a remote ``ref`` is (or will be) cached."""
    base = posixpath.basename(ref.split("?", 1)[0].rstrip("/")) or "checkpoint"
    base = _SAFE.sub("_", base).strip("._") or "checkpoint"
    digest = hashlib.sha256(ref.encode("utf-8")).hexdigest()[:16]
    return cache_root(cfg) / "weights" / f"{digest}-{base}"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha(path: str | os.PathLike, sha256: str | None, what: str, ref: str) -> None:
    if not sha256:
        return
    got = file_sha256(path)
    if got.lower() != sha256.lower():
        raise ChecksumError(
            f"{what} {ref}: sha256 mismatch (expected {sha256.lower()}, got {got}); the file is corrupt "
            f"or the configured sha256 is wrong"
        )


def _missing_message(what: str, ref: str, target: Path, reason: str) -> str:
    return (
        f"{what} {ref} is not available ({reason}); looked in the cache at {target}. "
        f"Put the file at that path, or set the config field to a local path of the checkpoint"
    )


def _download(ref: str, target: Path, sha256: str | None, what: str) -> None:
    import fsspec

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex[:12]}-{target.name}"
    h = hashlib.sha256()
    try:
        with fsspec.open(ref, "rb") as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if sha256 and h.hexdigest().lower() != sha256.lower():
            raise ChecksumError(
                f"{what} {ref}: sha256 mismatch after download (expected {sha256.lower()}, got "
                f"{h.hexdigest()}); the downloaded file was discarded"
            )
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve(ref: str, sha256: str | None = None, cfg: WeightsConfig | None = None,
            what: str = "checkpoint") -> str:
    """A local file path for ``ref`` (local path, ``file://``, ``http(s)://``, ``s3://``, ``gs://``, ...).

    Local paths are used in place (they must exist). Remote files are fetched into the cache once.
    ``sha256`` (when given) is checked for local files, fresh downloads and cache hits; a cached copy
    that fails the check is removed and fetched again (unless offline).
    """
    cfg = cfg or WeightsConfig()
    if not ref:
        raise UserError(f"{what}: empty checkpoint reference")
    if not is_remote(ref):
        path = Path(ref.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise UserError(f"{what} {ref}: local file not found; set the config field to an existing "
                            f"checkpoint path, URL or bucket URI")
        _check_sha(path, sha256, what, ref)
        return str(path)

    target = cache_path(ref, cfg)
    if target.is_file():
        try:
            _check_sha(target, sha256, what, ref)
            log.debug("%s %s: cache hit %s", what, ref, target)
            return str(target)
        except ChecksumError:
            log.warning("%s %s: cached copy %s fails its sha256 check; removing it", what, ref, target)
            target.unlink(missing_ok=True)
            if cfg.offline:
                raise
    if cfg.offline:
        raise UserError(_missing_message(what, ref, target, "offline mode and not cached"))
    log.info("downloading %s %s -> %s", what, ref, target)
    try:
        _download(ref, target, sha256, what)
    except ChecksumError:
        raise
    except Exception as e:  # network, permission, missing object: one clear message
        from ragseg.errors import describe

        raise UserError(_missing_message(what, ref, target, f"download failed: {describe(e, 200)}")) from e
    return str(target)


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (no pickle code runs), unwrapping
    ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints and a DataParallel ``module.`` prefix."""
    import torch

    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path}: expected a state dict, got {type(obj).__name__}")
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj
