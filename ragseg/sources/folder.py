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


def _sorted_files(d: str) -> Iterator[str]:
    """Paths of the files below ``d`` in the order of their full path (the order S3 lists keys
    in): a directory's entries sorted by name, a subdirectory as ``name/``, entered in place."""
    with os.scandir(d) as it:
        ents = sorted((e.name + "/" if e.is_dir() else e.name, e.path) for e in it)
    for key, path in ents:
        if key.endswith("/"):
            yield from _sorted_files(path)
        else:
            yield path


def _pages(fs, base_path: str) -> Iterator[list[str]]:
    """Full paths of the files below ``base_path``, one page at a time and in key order (sorted
    by full path), so that no per-file info dict of the whole folder ever exists at once (fsspec's
    glob/find build one per file: ~1 KB each, GBs for a 10M-image bucket): a sorted walk of
    ``os.scandir`` locally (one directory's names at a time), ListObjectsV2 pages on S3
    (ragseg.sources.s3list: about a millisecond of CPU a page), else ``fs.find`` sorted."""
    proto = protocol_of_fs(fs)
    if proto == "file":
        page = []
        for p in _sorted_files(base_path):
            page.append(p)
            if len(page) >= LOCAL_PAGE:
                yield page
                page = []
        if page:
            yield page
    elif proto in ("s3", "s3a"):
        from ragseg.sources.s3list import iter_key_pages

        bucket, key, _ = fs.split_path(base_path)
        for page in iter_key_pages(fs, bucket, f"{key}/" if key else ""):
            yield [f"{bucket}/{k}" for k in page]
    else:
        yield sorted(str(p) for p in fs.find(base_path))


def _rel_pages(cfg: SourceConfig):
    """(fs, base path, iterator of Arrow arrays of the image paths relative to the base, in key
    order, filtered by extension and by the glob ``cfg.pattern``); a single image file is one page.
    Store errors while listing are one-line UserErrors."""
    import re

    import pyarrow as pa
    from fsspec.utils import glob_translate

    base, pattern = _split_glob(cfg.uri, cfg.pattern)
    fs, base_path = fs_and_path(base)
    base_path = base_path.rstrip("/")
    prefix = base_path + "/"
    match = re.compile(glob_translate(prefix + (pattern or "**"))).match

    every = pattern in (None, "", "**", "**/*")  # the default glob matches every file below the folder

    def pages():
        import pyarrow.compute as pc

        try:
            for page in _pages(fs, base_path):
                # ~0.3 us a key (a big bucket has 10M): the glob only when it is not the default
                keep = [p for p in page if p.lower().endswith(IMAGE_EXTENSIONS) and p.startswith(prefix)
                        and (every or match(p))]
                yield pc.utf8_slice_codeunits(pa.array(keep, pa.string()), len(prefix))
        except NotImplementedError:
            raise UserError(f"cannot list images under {cfg.uri}: this store does not support listing "
                            "(use a source with an annotation file or image list)") from None
        except OSError as e:
            raise UserError(f"cannot list images under {cfg.uri}: {e}") from None

    try:
        if not any(ch in cfg.uri for ch in GLOB_CHARS) and not fs.isdir(base_path):
            if fs.isfile(base_path) and base_path.lower().endswith(IMAGE_EXTENSIONS):
                # a single image file
                one = pa.array([posixpath.basename(base_path)], pa.string())
                return fs, posixpath.dirname(base_path), iter([one])
            raise UserError(f"image folder not found: {cfg.uri}")
    except NotImplementedError:
        raise UserError(f"cannot list images under {cfg.uri}: this store does not support listing "
                        "(use a source with an annotation file or image list)") from None
    except OSError as e:
        raise UserError(f"cannot list images under {cfg.uri}: {e}") from None
    return fs, base_path, pages()


def _listing(cfg: SourceConfig):
    """(fs, base path, Arrow array of the image paths below it relative to it), page by page
    (:func:`_rel_pages`)."""
    import pyarrow as pa

    fs, base_path, pages = _rel_pages(cfg)
    chunks = [c for c in pages if len(c)]
    return fs, base_path, pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


# posixpath.splitext on Arrow strings: the extension starts at the basename's last dot, unless
# everything before that dot is dots (".jpg", "..jpg" have none)
_EXT = r"^(.*/)?(\.*[^./][^/]*)\.([^./]*)$"


def strip_extension(paths):
    """``posixpath.splitext(p)[0]`` of each path of an Arrow string array, vectorised."""
    import pyarrow.compute as pc

    return pc.replace_substring_regex(paths, pattern=_EXT, replacement=r"\1\2")


def _dedup(fs, base_path: str, rel_arr, errors: list[dict] | None, ids=None):
    """(ids, rels) of ``rel_arr`` sorted by id, then path, with a second file of an id reported as an
    error row (the first path wins). ``ids``: ``strip_extension(rel_arr)`` when the caller has it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = strip_extension(rel_arr) if ids is None else ids
    n = len(ids)
    if n > 1 and not pc.all(pc.less(ids.slice(0, n - 1), ids.slice(1))).as_py():
        # not already in id order without repeats (a listing in key order nearly always is)
        t = pa.table({"id": ids, "rel": rel_arr}).sort_by([("id", "ascending"), ("rel", "ascending")])
        ids, rel_arr = t.column("id").combine_chunks(), t.column("rel").combine_chunks()
        del t
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
    return ids, rel_arr


def _rows(fs, base_path: str, ids, rel_arr):
    """The image rows (ragseg.sources.row_schema) of ids and their paths below ``base_path``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ragseg.sources import row_schema

    n = len(ids)
    if n == 0:
        return row_schema().empty_table()
    root = unstrip(fs, base_path).rstrip("/") + "/"
    uris = pc.binary_join_element_wise(pa.scalar(root, pa.string()), rel_arr, "")
    const = {"source": "folder", "gt_format": "", "gt_png_uri": "", "gt_segments": "[]", "coco_id": ""}
    cols = {"image_id": ids, "uri": uris, "file_name": rel_arr,
            "labels": pa.repeat(pa.scalar([], pa.list_(pa.string())), n)}
    cols.update({c: pa.repeat(pa.scalar(v, pa.string()), n) for c, v in const.items()})
    schema = row_schema()
    return pa.table([cols[f.name] for f in schema], schema=schema)


def list_table(cfg: SourceConfig, errors: list[dict] | None = None):
    """The folder's image rows as an Arrow table (ragseg.sources.row_schema), built column-wise: the
    id is the path below the folder without its extension; a second file with the same id is an
    error row, not a second image."""
    import numpy as np
    import pyarrow as pa

    fs, base_path, rel_arr = _listing(cfg)
    # by id, then by path: of two files with one id the first path wins
    ids, rel_arr = _dedup(fs, base_path, rel_arr, errors)
    if cfg.limit is not None:
        ids, rel_arr = ids[: cfg.limit], rel_arr[: cfg.limit]
    i, k = parse_shard(cfg.shard)
    if k > 1:
        take = pa.array(np.arange(i, len(ids), k))
        ids, rel_arr = ids.take(take), rel_arr.take(take)
    return _rows(fs, base_path, ids, rel_arr)


def streamable(cfg: SourceConfig) -> bool:
    """True when :func:`iter_tables` gives the same images as :func:`list_table`: no ``limit`` and
    no ``shard`` (both pick rows by their rank in the whole sorted listing)."""
    return cfg.limit is None and parse_shard(cfg.shard)[1] <= 1


# listed paths gathered before a batch is deduplicated and handed on (a few pages)
BATCH_ROWS = 16_384


def iter_tables(cfg: SourceConfig, errors: list[dict] | None = None, batch_rows: int = BATCH_ROWS):
    """The folder's image rows (ragseg.sources.row_schema) a batch of listing pages at a time, in key
    order (each batch sorted by id), never the whole listing at once; the same images and the same
    duplicate-id errors as :func:`list_table` (when :func:`streamable`). Exact across batches: two
    files of one id ``X`` have keys ``X.<ext>``, and every key listed between them starts with
    ``X.``; so the rows whose id ``X`` makes ``X.`` a prefix of the batch's last path are held back
    to the next batch, where a later file of that id would be."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fs, base_path, pages = _rel_pages(cfg)
    carry = pa.array([], pa.string())
    buf, nbuf = [], 0

    def batch(rels, final: bool):
        nonlocal carry
        ids = strip_extension(rels)  # once a batch (the regex is most of a batch's CPU)
        if not final and len(rels):
            last = rels[-1].as_py()
            cands = sorted({last[:i] for i, ch in enumerate(last) if ch == "."})
            held = pc.is_in(ids, value_set=pa.array(cands, pa.string())) if cands else None
            if held is not None and pc.any(held).as_py():
                carry = rels.filter(held)
                keep = pc.invert(held)
                rels, ids = rels.filter(keep), ids.filter(keep)
            else:
                carry = pa.array([], pa.string())
        ids, rel_arr = _dedup(fs, base_path, rels, errors, ids)
        return _rows(fs, base_path, ids, rel_arr)

    for page in pages:
        if len(page):
            buf.append(page)
            nbuf += len(page)
        if nbuf >= batch_rows:
            t = batch(pa.concat_arrays([carry, *buf]), final=False)
            buf, nbuf = [], 0
            if t.num_rows:
                yield t
    t = batch(pa.concat_arrays([carry, *buf]), final=True)
    if t.num_rows:
        yield t


def list_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    return list_table(cfg, errors).to_pylist()
