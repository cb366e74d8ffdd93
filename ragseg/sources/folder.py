"""``folder`` source: every jpg/jpeg/png/webp under ``cfg.uri`` (any fsspec store that can list) that
matches the glob ``cfg.pattern`` (default ``**/*``). ``cfg.uri`` may itself be a glob (e.g.
``s3://bucket/imgs/*.jpg``). The image id is the path relative to the folder without its extension;
no ground truth. Two files with the same id (``a.jpg`` and ``a.png``) keep the first in sorted order
and report the other as an error."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator

from ragseg.config import SourceConfig
from ragseg.errors import UserError
from ragseg.io import fs_and_path, protocol_of_fs, unstrip
from ragseg.sources import IMAGE_EXTENSIONS, add_error, parse_shard

GLOB_CHARS = "*?["


def _split_glob(uri: str, pattern: str) -> tuple[str, str]:
    """(base folder URI, glob relative to it)."""
    if any(ch in uri for ch in GLOB_CHARS):
        head = uri
        cut = min(head.index(ch) for ch in GLOB_CHARS if ch in head)
        base = head[:cut].rsplit("/", 1)[0]
        return base, head[len(base):].lstrip("/")
    return uri.rstrip("/"), pattern


# names per listing page of a local folder (S3 pages are the store's: 1000 keys)
LOCAL_PAGE = 10_000


def _pages(fs, base_path: str) -> Iterator[list[str]]:
    """Full paths of the files below ``base_path``, one page at a time, so that no per-file info dict
    of the whole folder ever exists at once (fsspec's glob/find build one per file: ~1 KB each, GBs
    for a 10M-image bucket): ``os.scandir`` locally, ListObjectsV2 pages on S3, else ``fs.find``."""
    proto = protocol_of_fs(fs)
    if proto == "file":
        stack, page = [base_path], []
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir():
                        stack.append(e.path)
                    else:
                        page.append(e.path)
                        if len(page) >= LOCAL_PAGE:
                            yield page
                            page = []
        if page:
            yield page
    elif proto in ("s3", "s3a"):
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(base_path)
        pages = fs._list_pages("list_objects_v2", Bucket=bucket, Prefix=f"{key}/" if key else "", **fs.req_kw)
        while True:
            try:
                page = sync(fs.loop, pages.__anext__)
            except StopAsyncIteration:
                return
            yield [f"{bucket}/{c['Key']}" for c in page.get("Contents", [])]
    else:
        yield [str(p) for p in fs.find(base_path)]


def _listing(cfg: SourceConfig):
    """(fs, base path, Arrow array of the image paths below it relative to it), unsorted; built page
    by page (:func:`_pages`), filtered by extension and by the glob ``cfg.pattern``."""
    import re

    import pyarrow as pa
    from fsspec.utils import glob_translate

    base, pattern = _split_glob(cfg.uri, cfg.pattern)
    fs, base_path = fs_and_path(base)
    base_path = base_path.rstrip("/")
    prefix = base_path + "/"
    match = re.compile(glob_translate(prefix + (pattern or "**"))).match
    chunks = []
    try:
        if not any(ch in cfg.uri for ch in GLOB_CHARS) and not fs.isdir(base_path):
            if fs.isfile(base_path) and base_path.lower().endswith(IMAGE_EXTENSIONS):
                # a single image file
                return fs, posixpath.dirname(base_path), pa.array([posixpath.basename(base_path)], pa.string())
            raise UserError(f"image folder not found: {cfg.uri}")
        for page in _pages(fs, base_path):
            chunks.append(pa.array([p[len(prefix):] for p in page if p.lower().endswith(IMAGE_EXTENSIONS)
                                    and p.startswith(prefix) and match(p)], pa.string()))
    except UserError:
        raise
    except NotImplementedError:
        raise UserError(f"cannot list images under {cfg.uri}: this store does not support listing "
                        "(use a source with an annotation file or image list)") from None
    except OSError as e:
        raise UserError(f"cannot list images under {cfg.uri}: {e}") from None
    return fs, base_path, pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


# posixpath.splitext on Arrow strings: the extension starts at the basename's last dot, unless
# everything before that dot is dots (".jpg", "..jpg" have none)
_EXT = r"^(.*/)?(\.*[^./][^/]*)\.([^./]*)$"


def strip_extension(paths):
    """``posixpath.splitext(p)[0]`` of each path of an Arrow string array, vectorised."""
    import pyarrow.compute as pc

    return pc.replace_substring_regex(paths, pattern=_EXT, replacement=r"\1\2")


def list_table(cfg: SourceConfig, errors: list[dict] | None = None):
    """The folder's image rows as an Arrow table (ragseg.sources.row_schema), built column-wise: the
    id is the path below the folder without its extension; a second file with the same id is an
    error row, not a second image."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from ragseg.sources import row_schema

    fs, base_path, rel_arr = _listing(cfg)
    if len(rel_arr) == 0:
        return row_schema().empty_table()
    # by id, then by path: of two files with one id the first path wins
    t = pa.table({"id": strip_extension(rel_arr), "rel": rel_arr}).sort_by([("id", "ascending"), ("rel", "ascending")])
    ids, rel_arr = t.column("id").combine_chunks(), t.column("rel").combine_chunks()
    del t
    n = len(ids)
    if n > 1:
        a = ids.to_numpy(zero_copy_only=False)
        dup = np.zeros(n, bool)
        dup[1:] = a[1:] == a[:-1]
        if dup.any():
            for k in np.flatnonzero(dup):
                add_error(errors, unstrip(fs, base_path + "/" + rel_arr[k].as_py()), a[k],
                          f"duplicate image id {a[k]!r} (also {unstrip(fs, base_path + '/' + rel_arr[k - 1].as_py())})")
            keep = pa.array(~dup)
            ids, rel_arr = ids.filter(keep), rel_arr.filter(keep)
    if cfg.limit is not None:
        ids, rel_arr = ids[: cfg.limit], rel_arr[: cfg.limit]
    i, k = parse_shard(cfg.shard)
    if k > 1:
        take = pa.array(np.arange(i, len(ids), k))
        ids, rel_arr = ids.take(take), rel_arr.take(take)
    n = len(ids)
    root = unstrip(fs, base_path).rstrip("/") + "/"
    uris = pc.binary_join_element_wise(pa.scalar(root, pa.string()), rel_arr, "") if n else pa.array([], pa.string())
    const = {"source": "folder", "gt_format": "", "gt_png_uri": "", "gt_segments": "[]", "coco_id": ""}
    cols = {"image_id": ids, "uri": uris, "file_name": rel_arr,
            "labels": pa.repeat(pa.scalar([], pa.list_(pa.string())), n)}
    cols.update({c: pa.repeat(pa.scalar(v, pa.string()), n) for c, v in const.items()})
    schema = row_schema()
    return pa.table([cols[f.name] for f in schema], schema=schema)


def list_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    return list_table(cfg, errors).to_pylist()
