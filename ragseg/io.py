"""Every path in ragseg goes through fsspec: local paths, s3://, gs://, http(s)://, memory://.

Writers are atomic: data goes to a temporary name in the same directory and is renamed (moved) into
place only when complete, so a reader never sees a half-written file and a killed job leaves only
``*.tmp-*`` litter that the next run ignores.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from ragseg import faults

TMP_MARK = ".tmp-"


def _fault_tick() -> None:
    """The ``io.write`` fault point after each write or delete (:mod:`ragseg.faults`)."""
    faults.point("io.write")


# URI prefix -> fsspec storage options (e.g. {"anon": True} for a public bucket), registered by
# the sources that name them (SourceConfig.storage_options) in every process that reads their files
_STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}


def set_storage_options(prefix: str, options: dict[str, Any] | None) -> None:
    """Use ``options`` for every URI under ``prefix`` (longest registered prefix wins); None or {}
    forgets the prefix."""
    key = prefix.rstrip("/")
    if options:
        _STORAGE_OPTIONS[key] = dict(options)
    else:
        _STORAGE_OPTIONS.pop(key, None)


def storage_options(uri: str) -> dict[str, Any]:
    """The storage options registered for ``uri`` (see :func:`set_storage_options`), else {}."""
    best = ""
    for prefix in _STORAGE_OPTIONS:
        if len(prefix) > len(best) and (uri == prefix or uri.startswith(prefix + "/")):
            best = prefix
    return dict(_STORAGE_OPTIONS[best]) if best else {}


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(uri, **storage_options(uri))
    return fs, path


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme; local paths are made absolute."""
    if "://" not in base:
        base = os.path.abspath(base)
    out = base.rstrip("/")
    for p in parts:
        if p:
            out = out + "/" + p.strip("/")
    return out


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn an fs-internal path back into a full URI."""
    return fs.unstrip_protocol(path) if protocol_of_fs(fs) != "file" else path


def protocol_of_fs(fs: fsspec.AbstractFileSystem) -> str:
    p = fs.protocol
    p = p[0] if isinstance(p, (tuple, list)) else p
    return "file" if p in ("file", "local") else p


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = fs_and_path(uri)
    if protocol_of_fs(fs) == "file":
        fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb", **storage_options(uri)) as f:
        return f.read()


def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file (one ranged GET on an object store)."""
    fs, path = fs_and_path(uri)
    return fs.cat_file(path, start=start, end=end)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def glob(uri_pattern: str) -> list[str]:
    """Sorted full URIs matching a glob (``**`` recursive)."""
    fs, path = fs_and_path(uri_pattern)
    return sorted(unstrip(fs, p) for p in fs.glob(path))


def list_dir(uri: str) -> list[str]:
    """Sorted full URIs of the files directly under a directory (empty if it does not exist)."""
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)  # one paginated listing, types included
    except FileNotFoundError:
        return []
    return sorted(unstrip(fs, e["name"]) for e in entries if e.get("type") != "directory")


def _tmp_name(uri: str) -> str:
    d, name = posixpath.split(uri)
    return posixpath.join(d, f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{name}")


def is_tmp(uri: str) -> bool:
    return posixpath.basename(uri).startswith(TMP_MARK)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that readers see either the old file or the complete new one.

    Local files: write tmp + fsync + os.replace (atomic on POSIX). Object stores: a single PUT is
    already atomic (the object appears complete or not at all), so we write directly.
    """
    fs, path = fs_and_path(uri)
    if protocol_of_fs(fs) == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _tmp_name(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
    _fault_tick()


def put_file_atomic(local_path: str, uri: str) -> None:
    """Copy a finished local file to ``uri`` so that readers see the old or the whole new file
    (local: copy to a temporary sibling + rename; object stores: one upload, which appears whole)."""
    import shutil

    fs, path = fs_and_path(uri)
    if protocol_of_fs(fs) == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _tmp_name(path)
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, path)
    else:
        fs.put_file(local_path, path)
    _fault_tick()


def remove_tmp_litter(root: str) -> int:
    """Delete the ``.tmp-*`` files a killed writer left directly under a local folder (object-store
    writes leave none); returns how many. Only called under the folder's lease."""
    fs, path = fs_and_path(root)
    if protocol_of_fs(fs) != "file" or not os.path.isdir(path):
        return 0
    n = 0
    for name in os.listdir(path):
        if name.startswith(TMP_MARK) and os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
            n += 1
    return n


def write_text_atomic(uri: str, text: str) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"))


def write_json_atomic(uri: str, obj: Any) -> None:
    write_text_atomic(uri, json.dumps(obj, indent=2, sort_keys=True))


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` with ``data`` only if it does not exist yet; False when it already did.

    Local files: ``O_CREAT | O_EXCL``. S3: a conditional PUT (``If-None-Match: *``, fsspec's
    ``mode="create"``). Stores without a conditional write fall back to check-then-write."""
    fs, path = fs_and_path(uri)
    if protocol_of_fs(fs) == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fault_tick()
        return True
    try:
        fs.pipe_file(path, data, mode="create")
        _fault_tick()
        return True
    except FileExistsError:
        return False
    except TypeError:  # a filesystem without mode=
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True
    except OSError as e:
        if "PreconditionFailed" in str(e) or "412" in str(e):
            return False
        raise


class PreconditionFailed(Exception):
    """A conditional write found the object other than the writer last read it (or present when it
    was to be created, or gone)."""


def _content_version(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def _s3_like(fs) -> bool:
    return protocol_of_fs(fs) in ("s3", "s3a")


def read_versioned(uri: str) -> tuple[bytes, str]:
    """The bytes of ``uri`` and a version token for :func:`write_if`: the object's ETag on S3 (the
    bytes are read with ``If-Match`` on it, so they are that version's), else the sha256 of the
    content. FileNotFoundError when missing."""
    fs, path = fs_and_path(uri)
    if _s3_like(fs):
        for _ in range(3):
            fs.invalidate_cache(path)
            try:
                with fs.open(path, "rb") as f:
                    data = f.read()
                    return data, str(f.details["ETag"])
            except OSError as e:
                if isinstance(e, FileNotFoundError) or not _is_precondition(e):
                    raise
                # replaced between the HEAD and the GET: read again
        raise OSError(f"{uri} keeps changing while it is read")
    data = read_bytes(uri)
    return data, _content_version(data)


def _is_precondition(e: BaseException) -> bool:
    text = str(e)
    return "PreconditionFailed" in text or "412" in text or "pre-conditions" in text


def write_if(uri: str, data: bytes, expect: str | None) -> str:
    """Write ``data`` to ``uri`` only if the object is still at version ``expect`` (a token from
    :func:`read_versioned` or an earlier ``write_if``), or, with ``expect=None``, does not exist yet;
    returns the new version. Raises :class:`PreconditionFailed` otherwise, writing nothing.

    S3: one conditional PUT (``If-Match: <ETag>`` / ``If-None-Match: *``), atomic on the store. Local
    files: compare-then-write (temporary file + rename) under an exclusive ``flock`` of the folder, so two
    writers on one host never interleave. Other stores: compare-then-write (not atomic between hosts;
    the folder's lease keeps writers apart)."""
    fs, path = fs_and_path(uri)
    if _s3_like(fs):
        try:
            out = fs.pipe_file(path, data, mode="create") if expect is None else fs.pipe_file(path, data, IfMatch=expect)
        except FileExistsError:
            raise PreconditionFailed(f"{uri} exists already") from None
        except FileNotFoundError:  # If-Match on an object that is gone
            raise PreconditionFailed(f"{uri} is gone") from None
        except OSError as e:
            if _is_precondition(e):
                raise PreconditionFailed(f"{uri} changed since it was read") from None
            raise
        _fault_tick()
        etag = out.get("ETag") if isinstance(out, dict) else None
        return str(etag) if etag else read_versioned(uri)[1]
    if protocol_of_fs(fs) == "file":
        import fcntl

        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = _tmp_name(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:  # the lock covers only compare + rename (microseconds)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _check_version(uri, expect)
            os.replace(tmp, path)
        finally:
            os.close(fd)  # releases the lock
            if os.path.exists(tmp):
                os.remove(tmp)
        _fault_tick()
        return _content_version(data)
    _check_version(uri, expect)
    write_bytes_atomic(uri, data)
    return _content_version(data)


def _check_version(uri: str, expect: str | None) -> None:
    try:
        cur = _content_version(read_bytes(uri))
    except FileNotFoundError:
        cur = None
    if cur != expect:
        raise PreconditionFailed(f"{uri} {'exists already' if expect is None else 'changed since it was read'}")


# Parquet encodings: zstd, dictionaries and statistics for everything but columns of dense floats that
# none of them helps (float16 embeddings: zstd saves <1%, dictionaries and min/max stats are pure
# cost; together they made writing a feature shard 4x slower), which are stored plain.
PLAIN_COLUMNS = frozenset({"embedding"})


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    rest = [n for n in table.column_names if n not in PLAIN_COLUMNS]
    codecs = {name: ("none" if name in PLAIN_COLUMNS else "zstd") for name in table.column_names}
    pq.write_table(table, buf, compression=codecs, use_dictionary=rest, write_statistics=rest)
    return buf.getvalue()


def write_parquet_atomic(uri: str, table: pa.Table) -> None:
    write_bytes_atomic(uri, parquet_bytes(table))


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = fs_and_path(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = fs_and_path(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
        _fault_tick()


def remove_many(uris: list[str]) -> None:
    """Delete many objects of one store in bulk (s3fs: DeleteObjects, 1000 keys a request); ones
    already gone are fine."""
    if not uris:
        return
    fs, _ = fs_and_path(uris[0])
    paths = [fs_and_path(u)[1] for u in uris]
    try:
        fs.rm(paths)
    except FileNotFoundError:
        for p in paths:
            try:
                fs.rm_file(p)
            except FileNotFoundError:
                pass
    _fault_tick()


COMPLETE_MARK = ".complete"


def cached_dir_complete(dest: str) -> bool:
    """True when ``dest`` was filled completely by :func:`download_dir`."""
    return os.path.exists(os.path.join(dest, COMPLETE_MARK))


def download_dir(uri: str, names: list[str] | tuple[str, ...], dest: str) -> list[str]:
    """Copy the files ``names`` (relative paths) of the folder ``uri`` (any fsspec URI) into the local
    folder ``dest``, whole or not at all: into a temporary sibling first, marked complete, then renamed
    into place. A name the source lacks is skipped; returns the names copied."""
    import shutil

    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = f"{dest}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    got: list[str] = []
    try:
        for name in names:
            out = os.path.join(tmp, *name.split("/"))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            try:
                with fsspec.open(uri.rstrip("/") + "/" + name, "rb") as f, open(out, "wb") as g:
                    shutil.copyfileobj(f, g, 1 << 22)
                got.append(name)
            except FileNotFoundError:
                if os.path.exists(out):
                    os.remove(out)
        open(os.path.join(tmp, COMPLETE_MARK), "w").close()
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return got


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(image_id: str, max_len: int = 180) -> str:
    """A file-name-safe form of an image id: no path separators, no '..', no leading dot.

    Different ids that sanitise to the same text get distinct names through a short hash suffix
    whenever anything had to be replaced.
    """
    import hashlib

    s = str(image_id)
    cleaned = _SAFE.sub("_", s.replace("/", "__")).strip("._") or "img"
    cleaned = cleaned.replace("..", "_")
    if cleaned != s or len(cleaned) > max_len:
        cleaned = cleaned[:max_len] + "-" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return cleaned
