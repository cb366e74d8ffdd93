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

Mirror (``WeightsConfig.mirror``, a bucket or folder URI): ``ragseg weights sync`` (:func:`sync`) copies
every checkpoint a config names into ``<mirror>/<entry>/`` with a ``SHA256SUMS`` file written last; the
entry's name derives from the configured reference alone (:attr:`Checkpoint.entry`), so every node finds
it without a listing. With a mirror set, every resolution tries the node's cache, then the mirror
(checked against SHA256SUMS), then the origin; offline mode forbids only the origin. Multi-file
checkpoints (open_clip tags, hub ids, saved-model folders) resolve through :func:`resolve_open_clip`
and :func:`resolve_model_dir`. :func:`locate` tells where a checkpoint would load from without
downloading it (``ragseg weights check``, the jobs' up-front checks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field
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


def _key(*parts: Any) -> str:
    """A short stable hash of ``parts`` (cache folder names, tiny model ids)."""
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Files a saved Grounding DINO directory may hold (used where a directory cannot be listed: http).
_MODEL_DIR_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def model_dir_cache(uri: str, weights_cfg: WeightsConfig | None = None) -> str:
    """Where the remote saved-model folder ``uri`` is copied on this node."""
    return os.path.join(str(cache_root(weights_cfg)), "gdino", _key(uri))


def fetch_model_dir(uri: str, weights_cfg: WeightsConfig | None = None) -> str:
    """Copy a remote saved-model directory (bucket or URL) into the cache once; return the local dir."""
    import shutil

    from fsspec.core import url_to_fs

    from ragseg import io as rio

    dest = model_dir_cache(uri, weights_cfg)
    if rio.cached_dir_complete(dest):
        return dest
    if weights_cfg is not None and weights_cfg.offline:
        raise UserError(f"Grounding DINO model {uri} is not in the cache ({dest}) and weights.offline is set")
    fs, root = url_to_fs(uri)
    try:
        names = [posixpath.relpath(p, root.rstrip("/")) for p in fs.find(root)
                 if not posixpath.basename(p).startswith(".")]
    except Exception:  # noqa: BLE001 - http servers cannot list; try the known file names
        names = []
    got = rio.download_dir(uri, names or list(_MODEL_DIR_FILES), dest)
    if "config.json" not in got:
        shutil.rmtree(dest, ignore_errors=True)
        raise UserError(f"Grounding DINO model dir {uri} has no config.json ({len(got)} files found)")
    return dest


def sam2_checkpoint(s) -> str | None:
    """The SAM 2.1 checkpoint to load (``s``: ``models.sam.sam2``): the configured one, else the official
    URL of ``arch`` (none for ``custom``: random weights)."""
    from ragseg.config import SAM2_CHECKPOINTS

    if s.random_weights:
        return None
    if s.checkpoint:
        return s.checkpoint
    return None if s.arch == "custom" else SAM2_CHECKPOINTS[s.arch]



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


def _missing_message(what: str, ref: str, target: Path | str, reason: str, mirror: str | None = None) -> str:
    where = f"the weights mirror {mirror} and " if mirror else ""
    return (
        f"{what} {ref} is not available ({reason}); looked in {where}the cache at {target}. "
        f"Put the file at that path, run `ragseg weights sync` into a mirror, or set the config field to a "
        f"local path of the checkpoint"
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
        if not path.is_file() and cfg.mirror:  # a node without the file: the mirror's copy
            target = cache_path(ref, cfg)
            if target.is_file() or _try_mirror_file(ref, cfg, target, sha256, what):
                _check_sha(target, sha256, what, ref)
                return str(target)
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
            if cfg.offline and not cfg.mirror:
                raise
    if _try_mirror_file(ref, cfg, target, sha256, what):
        return str(target)
    if cfg.offline:
        raise UserError(_missing_message(what, ref, target, "offline mode and not cached", cfg.mirror))
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


# ----------------------------------------------------------------------------------------------
# Mirror: every checkpoint a config names, copied with its sha256 into a bucket or a folder
# ----------------------------------------------------------------------------------------------
SUMS = "SHA256SUMS"  # per mirror entry: "<sha256>  <file name>" lines (sha256sum format), written last
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """One checkpoint a config names: ``kind`` is ``file`` (one file: path, URL, bucket URI),
    ``open_clip`` (an open_clip pretrained tag of ``model``), ``hf`` (a Hugging Face hub model id at
    ``revision``) or ``dir`` (a saved-model folder: path, URL or bucket URI)."""

    field: str
    kind: str
    ref: str
    sha256: str | None = None
    model: str | None = None
    revision: str | None = None
    what: str = "checkpoint"

    @property
    def entry(self) -> str:
        """This checkpoint's folder in a mirror, derived from the reference alone (so every node
        finds it without a list): ``files/<hash>-<name>``, ``dirs/<hash>-<name>``,
        ``open_clip/<model>/<tag>`` or ``hf/<org>--<name>/<revision>``."""
        if self.kind == "open_clip":
            return f"open_clip/{_SAFE.sub('_', str(self.model))}/{_SAFE.sub('_', self.ref)}"
        if self.kind == "hf":
            return f"hf/{self.ref.replace('/', '--')}/{_SAFE.sub('_', self.revision or 'main')}"
        return f"{'files' if self.kind == 'file' else 'dirs'}/{cache_path(self.ref).name}"

    @property
    def file_name(self) -> str:
        """The file name of a ``file`` checkpoint inside its mirror entry."""
        return cache_path(self.ref).name.split("-", 1)[1]


def is_hub_id(ref: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(ref)) and not os.path.exists(ref)


def checkpoints(models, include: set[str] | None = None) -> list[Checkpoint]:
    """Every checkpoint ``models`` (a :class:`ragseg.config.ModelsConfig`) names, for the model
    sections in ``include`` (default: clip, sam, gdino); random-weight sections name none."""
    include = {"clip", "sam", "gdino"} if include is None else include
    out: list[Checkpoint] = []
    c = models.clip
    if "clip" in include and c.pretrained:
        if open_clip_tag_cfg(c.model, c.pretrained):
            out.append(Checkpoint("models.clip.pretrained", "open_clip", c.pretrained, model=c.model,
                                  what=f"CLIP weights open_clip:{c.model}/{c.pretrained}"))
        else:
            out.append(Checkpoint("models.clip.pretrained", "file", c.pretrained, c.sha256,
                                  what=f"CLIP checkpoint for {c.model}"))
    s = models.sam
    if "sam" in include and getattr(s, "family", "sam") == "sam2":
        ref = sam2_checkpoint(s.sam2)
        if ref:
            out.append(Checkpoint("models.sam.sam2.checkpoint", "file", ref, s.sam2.sha256,
                                  what="SAM 2.1 checkpoint"))
    elif "sam" in include and s.checkpoint:
        out.append(Checkpoint("models.sam.checkpoint", "file", s.checkpoint, s.sha256, what="SAM checkpoint"))
    f = getattr(models, "fcclip", None)
    if "fcclip" in include and f is not None and f.checkpoint:
        out.append(Checkpoint("models.fcclip.checkpoint", "file", f.checkpoint, f.sha256,
                              what="FC-CLIP head checkpoint (.safetensors)"))
    g = models.gdino
    if "gdino" in include and g.model_id:
        kind = "dir" if (is_remote(g.model_id) or not is_hub_id(g.model_id)) else "hf"
        out.append(Checkpoint("models.gdino.model_id", kind, g.model_id, revision=g.revision,
                              what="Grounding DINO model"))
    return out


def open_clip_tag_cfg(model: str, tag: str) -> dict:
    """open_clip's pretrained config of ``model``/``tag`` ({} when ``tag`` is not a known tag)."""
    if is_remote(tag) or os.path.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
        return {}
    import open_clip

    return dict(open_clip.get_pretrained_cfg(model, tag) or {})


def mirror_uri(mirror: str, ck: Checkpoint) -> str:
    return mirror.rstrip("/") + "/" + ck.entry


def read_sums(entry_uri: str) -> dict[str, str] | None:
    """``{file name: sha256}`` of a complete mirror entry, None when it has none (not mirrored, or
    the mirror cannot be reached: the caller falls back to the origin and says so)."""
    import fsspec

    try:
        with fsspec.open(entry_uri.rstrip("/") + "/" + SUMS, "rt") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - unreachable mirror: one warning, then the origin
        from ragseg.errors import describe

        log.warning("weights mirror %s unreachable (%s)", entry_uri, describe(e, 200))
        return None
    sums = {}
    for line in text.splitlines():
        if line.strip():
            sha, _, name = line.strip().partition("  ")
            sums[name.strip()] = sha.strip().lower()
    return sums or None


def _copy_hashing(src_path: str, dst_uri: str) -> str:
    import fsspec

    h = hashlib.sha256()
    with open(src_path, "rb") as src, fsspec.open(dst_uri, "wb") as dst:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


def write_entry(entry_uri: str, files: dict[str, str]) -> dict[str, str]:
    """Copy ``{name: local path}`` into a mirror entry and write its SHA256SUMS last (an entry
    without it is incomplete and ignored). An entry already holding the same sha256s is left as is."""
    from ragseg import io as rio

    local = {name: file_sha256(path) for name, path in files.items()}
    if read_sums(entry_uri) == local:
        return local
    for name, path in sorted(files.items()):
        got = _copy_hashing(path, entry_uri.rstrip("/") + "/" + name)
        if got != local[name]:
            raise UserError(f"{path} changed while it was copied to {entry_uri}; run weights sync again")
    rio.write_text_atomic(entry_uri.rstrip("/") + "/" + SUMS,
                          "".join(f"{sha}  {name}\n" for name, sha in sorted(local.items())))
    return local


def fetch_entry(entry_uri: str, dest: str, what: str) -> str | None:
    """Copy a complete mirror entry into the local folder ``dest`` (whole or not at all) and check
    every file against SHA256SUMS; None when the mirror does not hold it."""
    import shutil

    from ragseg import io as rio

    if rio.cached_dir_complete(dest):
        return dest
    sums = read_sums(entry_uri)
    if sums is None:
        return None
    log.info("fetching %s from the weights mirror %s -> %s", what, entry_uri, dest)
    try:
        got = rio.download_dir(entry_uri, sorted(sums), dest)
    except Exception as e:  # noqa: BLE001 - a mirror that fails mid-way: the origin, with a warning
        from ragseg.errors import describe

        log.warning("%s: copy from the weights mirror %s failed (%s); using its origin", what, entry_uri,
                    describe(e, 200))
        shutil.rmtree(dest, ignore_errors=True)
        return None
    bad = [n for n in sums if n not in got or file_sha256(os.path.join(dest, n)) != sums[n]]
    if bad:
        shutil.rmtree(dest, ignore_errors=True)
        raise ChecksumError(f"{what}: mirror entry {entry_uri} fails its sha256 check for {', '.join(bad)}; "
                            f"run `ragseg weights sync` again")
    return dest


def _try_mirror_file(ref: str, cfg: WeightsConfig, target: Path, sha256: str | None, what: str) -> bool:
    """Fetch a ``file`` checkpoint from the mirror into ``target``; False when the mirror lacks it."""
    if not cfg.mirror:
        return False
    ck = Checkpoint("", "file", ref)
    uri = mirror_uri(cfg.mirror, ck)
    sums = read_sums(uri)
    if sums is None or ck.file_name not in sums:
        log.warning("%s %s is not in the weights mirror %s; using its origin", what, ref, cfg.mirror)
        return False
    expected = sums[ck.file_name]
    if sha256 and sha256.lower() != expected:
        raise ChecksumError(f"{what} {ref}: the mirror's sha256 {expected} differs from the configured "
                            f"{sha256.lower()}; run `ragseg weights sync` again or fix the config")
    log.info("downloading %s %s from the weights mirror", what, ref)
    try:
        _download(uri + "/" + ck.file_name, target, expected, what)
    except ChecksumError:
        raise
    except Exception as e:  # noqa: BLE001 - a mirror that fails mid-way: the origin, with a warning
        from ragseg.errors import describe

        log.warning("%s %s: copy from the weights mirror failed (%s); using its origin", what, ref, describe(e, 200))
        return False
    return True


# ----------------------------------------------------------------------------------------------
# open_clip tags and model folders (hub ids, saved-model dirs), mirror first
# ----------------------------------------------------------------------------------------------
def _mirror_cache(ck: Checkpoint, cfg: WeightsConfig) -> str:
    """Where a multi-file mirror entry is copied on this node."""
    return str(cache_root(cfg) / "mirror" / ck.entry)


def _entry_files(d: str) -> dict[str, str]:
    """``{relative name: path}`` of the files of a local folder (hidden files and markers left out)."""
    out = {}
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                path = os.path.join(root, name)
                out[os.path.relpath(path, d).replace(os.sep, "/")] = path
    return out


def _weights_file(d: str) -> str | None:
    files = [p for n, p in _entry_files(d).items() if n != SUMS]
    return files[0] if len(files) == 1 else None


def _open_clip_hub_file(tag_cfg: dict, hub_dir: Path) -> tuple[str, str | None]:
    """(what open_clip downloads for ``tag_cfg``, its cached path or None); never touches the network."""
    if tag_cfg.get("file"):
        return tag_cfg["file"], tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, filename = os.path.split(hub.rstrip("/") if hub.endswith(".bin") else hub)
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            got = try_to_load_from_cache(repo, name, cache_dir=str(hub_dir))
            if isinstance(got, str) and os.path.isfile(got):
                return f"hf:{repo}/{name}", got
        return f"hf:{repo}/{filename}", None
    url = tag_cfg.get("url", "")
    path = hub_dir / posixpath.basename(url)
    return url, str(path) if url and path.is_file() else None


def resolve_open_clip(model: str, tag: str, cfg: WeightsConfig | None = None) -> str:
    """The local weights file of the open_clip pretrained tag ``model``/``tag``: open_clip's own
    cache (``<cache>/open_clip``, Hugging Face layout), else the mirror, else open_clip's download."""
    cfg = cfg or WeightsConfig()
    tag_cfg = open_clip_tag_cfg(model, tag)
    if not tag_cfg:
        raise UserError(f"models.clip.pretrained {tag!r} is not an open_clip tag of {model}")
    what = f"CLIP weights open_clip:{model}/{tag}"
    ck = Checkpoint("models.clip.pretrained", "open_clip", tag, model=model, what=what)
    hub_dir = cache_root(cfg) / "open_clip"
    origin, cached = _open_clip_hub_file(tag_cfg, hub_dir)
    if cached:
        return cached
    mdest = _mirror_cache(ck, cfg)
    if cfg.mirror and fetch_entry(mirror_uri(cfg.mirror, ck), mdest, what) and _weights_file(mdest):
        return str(_weights_file(mdest))
    if cfg.offline:
        raise UserError(_missing_message(what, f"({origin})", hub_dir, "offline mode and not cached", cfg.mirror)
                        .replace("Put the file at that path", "Put the hub files there (Hugging Face cache "
                                 "layout)"))
    import open_clip

    try:
        return str(open_clip.pretrained.download_pretrained(tag_cfg, cache_dir=str(hub_dir)))
    except Exception as e:  # noqa: BLE001 - no network, hub error: one clear line
        from ragseg.errors import describe

        raise UserError(_missing_message(what, f"({origin})", hub_dir, f"download failed: {describe(e, 200)}",
                                         cfg.mirror).replace("Put the file at that path", "Put the hub files "
                                                             "there (Hugging Face cache layout)")) from e


_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]


def _hub_cached(ref: str, revision: str | None, hf_dir: Path) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        d = snapshot_download(ref, revision=revision, cache_dir=str(hf_dir), local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache (LocalEntryNotFoundError and kin)
        return None
    return d if os.path.isfile(os.path.join(d, "config.json")) else None


def resolve_model_dir(ref: str, revision: str | None = None, cfg: WeightsConfig | None = None,
                      what: str = "Grounding DINO model") -> str:
    """A local saved-model folder for ``ref``: a local folder (used in place), a folder URI on a bucket
    or web server (copied into the cache once), or a Hugging Face hub id (its snapshot in
    ``<cache>/hf``); the mirror is tried before any download."""
    cfg = cfg or WeightsConfig()
    kind = "dir" if (is_remote(ref) or not is_hub_id(ref)) else "hf"
    ck = Checkpoint("models.gdino.model_id", kind, ref, revision=revision, what=what)
    mdest = _mirror_cache(ck, cfg)
    if kind == "dir" and not is_remote(ref):
        local = os.path.expanduser(ref.removeprefix("file://"))
        if os.path.isdir(local):
            return local
        if cfg.mirror and fetch_entry(mirror_uri(cfg.mirror, ck), mdest, what):
            return mdest
        raise UserError(f"{what} {ref}: local folder not found; set the config field to a saved-model folder, "
                        f"a folder URI or a hub id")
    if kind == "dir":
        from ragseg import io as rio

        dest = model_dir_cache(ref, cfg)
        if rio.cached_dir_complete(dest):
            return dest
        if cfg.mirror and fetch_entry(mirror_uri(cfg.mirror, ck), dest, what):
            return dest
        if cfg.offline:
            raise UserError(_missing_message(what, ref, dest, "offline mode and not cached", cfg.mirror)
                            .replace("Put the file at that path", "Put the saved-model folder's files there"))
        return fetch_model_dir(ref, cfg)
    hf_dir = cache_root(cfg) / "hf"
    cached = _hub_cached(ref, revision, hf_dir)
    if cached:
        return cached
    if rio_complete(mdest):
        return mdest
    if cfg.mirror and fetch_entry(mirror_uri(cfg.mirror, ck), mdest, what):
        return mdest
    if cfg.offline:
        raise UserError(_missing_message(what, ref, hf_dir, "offline mode and not cached", cfg.mirror)
                        .replace("Put the file at that path", "Put the hub snapshot there (Hugging Face cache "
                                 "layout)"))
    from huggingface_hub import snapshot_download

    try:
        d = snapshot_download(ref, revision=revision, cache_dir=str(hf_dir), allow_patterns=_HUB_PATTERNS)
        if not any(n.endswith(".safetensors") for n in os.listdir(d)):
            d = snapshot_download(ref, revision=revision, cache_dir=str(hf_dir),
                                  allow_patterns=_HUB_PATTERNS + ["*.bin"])
    except Exception as e:  # noqa: BLE001
        from ragseg.errors import describe

        raise UserError(_missing_message(what, ref, hf_dir, f"download failed: {describe(e, 200)}", cfg.mirror)
                        .replace("Put the file at that path", "Put the hub snapshot there (Hugging Face cache "
                                 "layout)")) from e
    return d


def rio_complete(d: str) -> bool:
    from ragseg import io as rio

    return rio.cached_dir_complete(d)


# ----------------------------------------------------------------------------------------------
# check and sync
# ----------------------------------------------------------------------------------------------
@dataclass
class Status:
    """Where one checkpoint would load from on this machine, without downloading it."""

    field: str
    kind: str
    ref: str
    source: str  # local | cache | mirror | origin | missing
    cached: bool
    path: str | None = None  # the local file / folder (or where it would go)
    size: int | None = None  # bytes (local copy, else the mirror's when known)
    sha256: dict[str, str] = field(default_factory=dict)  # expected, per file
    verified: bool | None = None  # None: not checked (no sha256 known, or verify off)
    problem: str | None = None

    def row(self) -> dict:
        return {"field": self.field, "kind": self.kind, "ref": self.ref, "source": self.source,
                "cached": self.cached, "path": self.path, "size": self.size, "sha256": self.sha256,
                "verified": self.verified, "problem": self.problem}


def _local_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(p) for p in _entry_files(path).values())
    return os.path.getsize(path)


def _mirror_size(entry_uri: str, names: list[str]) -> int | None:
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(entry_uri)
        return int(sum(fs.size(root.rstrip("/") + "/" + n) for n in names))
    except Exception:  # noqa: BLE001 - size is informative only
        return None


def _verify(st: Status, verify: bool) -> None:
    if not (verify and st.cached and st.sha256 and st.path):
        return
    if os.path.isdir(st.path):
        files = _entry_files(st.path)
        st.verified = all(n in files and file_sha256(files[n]) == s for n, s in st.sha256.items())
    else:
        st.verified = file_sha256(st.path) == next(iter(st.sha256.values()))
    if not st.verified:
        st.problem = f"{st.field} {st.ref}: the local copy {st.path} fails its sha256 check"


def locate(ck: Checkpoint, cfg: WeightsConfig | None = None, verify: bool = False) -> Status:
    """Where ``ck`` would be loaded from (local file, cache, mirror, origin) and whether it can be:
    ``problem`` is set when it cannot (offline and not cached, local file missing, bad sha256)."""
    cfg = cfg or WeightsConfig()
    st = Status(ck.field, ck.kind, ck.ref, "missing", False)
    sums = read_sums(mirror_uri(cfg.mirror, ck)) if cfg.mirror else None
    if ck.kind == "file":
        name = ck.file_name
        if ck.sha256:
            st.sha256 = {name: ck.sha256.lower()}
        elif sums and name in sums:
            st.sha256 = {name: sums[name]}
        local = None if is_remote(ck.ref) else Path(ck.ref.removeprefix("file://")).expanduser()
        target = cache_path(ck.ref, cfg)
        if local is not None and local.is_file():
            st.source, st.cached, st.path = "local", True, str(local)
        elif target.is_file():
            st.source, st.cached, st.path = "cache", True, str(target)
        else:
            st.path = str(target)
            if sums and name in sums:
                st.source, st.size = "mirror", _mirror_size(mirror_uri(cfg.mirror, ck), [name])
            elif local is not None:
                st.problem = f"{ck.what} {ck.ref}: local file not found" + (
                    f" (and not in the weights mirror {cfg.mirror})" if cfg.mirror else "")
            elif cfg.offline:
                st.problem = _missing_message(ck.what, ck.ref, target, "offline mode and not cached", cfg.mirror)
            else:
                st.source = "origin"
    else:
        ref, hint = ck.ref, "Put the saved-model folder's files there"
        if ck.kind == "open_clip":
            origin, cached = _open_clip_hub_file(open_clip_tag_cfg(ck.model or "", ck.ref),
                                                 cache_root(cfg) / "open_clip")
            cached = cached or (_weights_file(_mirror_cache(ck, cfg)) if rio_complete(_mirror_cache(ck, cfg))
                                else None)
            where = str(cache_root(cfg) / "open_clip")
            ref, hint = f"({origin})", "Put the hub files there (Hugging Face cache layout)"
        elif ck.kind == "hf":
            cached = _hub_cached(ck.ref, ck.revision, cache_root(cfg) / "hf") or (
                _mirror_cache(ck, cfg) if rio_complete(_mirror_cache(ck, cfg)) else None)
            where = str(cache_root(cfg) / "hf")
            hint = "Put the hub snapshot there (Hugging Face cache layout)"
        elif not is_remote(ck.ref):
            local = os.path.expanduser(ck.ref.removeprefix("file://"))
            cached = local if os.path.isdir(local) else (
                _mirror_cache(ck, cfg) if rio_complete(_mirror_cache(ck, cfg)) else None)
            where = local
        else:
            where = model_dir_cache(ck.ref, cfg)
            cached = where if rio_complete(where) else None
        if sums:
            st.sha256 = dict(sums)
        if cached:
            st.cached, st.path = True, str(cached)
            st.source = "local" if (ck.kind == "dir" and not is_remote(ck.ref) and cached == where) else "cache"
            if ck.kind == "open_clip" and st.sha256:  # the mirror lists the one weights file
                st.sha256 = {os.path.basename(str(cached)): next(iter(st.sha256.values()))} \
                    if len(st.sha256) == 1 else st.sha256
        elif sums:
            st.source, st.path = "mirror", where
            st.size = _mirror_size(mirror_uri(cfg.mirror, ck), sorted(sums))
        elif ck.kind == "dir" and not is_remote(ck.ref):
            st.path = where
            st.problem = f"{ck.what} {ck.ref}: local folder not found"
        elif cfg.offline:
            st.path = where
            st.problem = _missing_message(ck.what, ref, where, "offline mode and not cached", cfg.mirror) \
                .replace("Put the file at that path", hint)
        else:
            st.source, st.path = "origin", where
    if st.cached and st.path:
        st.size = _local_size(st.path)
    _verify(st, verify)
    return st


def local_files(ck: Checkpoint, cfg: WeightsConfig) -> dict[str, str]:
    """Resolve ``ck`` (downloading it when needed) -> ``{name in the mirror entry: local path}``."""
    if ck.kind == "file":
        return {ck.file_name: resolve(ck.ref, ck.sha256, cfg, what=ck.what)}
    if ck.kind == "open_clip":
        path = resolve_open_clip(ck.model or "", ck.ref, cfg)
        return {os.path.basename(path): path}
    d = resolve_model_dir(ck.ref, ck.revision, cfg, what=ck.what)
    return {n: p for n, p in _entry_files(d).items() if n != SUMS}


def sync(models, to: str, include: set[str] | None = None) -> list[dict]:
    """Copy every checkpoint ``models`` names into the mirror ``to`` (bucket or folder URI), each entry
    with its SHA256SUMS; -> one record per checkpoint (field, ref, entry URI, sha256 per file, bytes)."""
    out = []
    for ck in checkpoints(models, include):
        files = local_files(ck, models.weights)
        uri = mirror_uri(to, ck)
        sums = write_entry(uri, files)
        out.append({"field": ck.field, "kind": ck.kind, "ref": ck.ref, "entry": uri, "sha256": sums,
                    "bytes": sum(os.path.getsize(p) for p in files.values())})
        log.info("mirrored %s %s -> %s", ck.field, ck.ref, uri)
    return out


def sync_overrides(models, records: list[dict], to: str) -> list[str]:
    """The ``--set`` overrides that make jobs load from the mirror ``to``: the mirror itself, and the
    sha256 of every single-file checkpoint (the config fields keep their values, so the model ids
    recorded in DBs and label outputs do not change)."""
    over = [f"models.weights.mirror={to}"]
    for r in records:
        if r["kind"] == "file":
            section = r["field"].rsplit(".", 1)[0]  # models.sam, models.sam.sam2, ...
            over.append(f"{section}.sha256={next(iter(r['sha256'].values()))}")
    return over
