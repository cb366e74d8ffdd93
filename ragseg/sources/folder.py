"""``folder`` source: every jpg/jpeg/png/webp under ``cfg.uri`` (any fsspec store that can list) that
matches the glob ``cfg.pattern`` (default ``**/*``). ``cfg.uri`` may itself be a glob (e.g.
``s3://bucket/imgs/*.jpg``). The image id is the path relative to the folder without its extension;
no ground truth. Two files with the same id (``a.jpg`` and ``a.png``) keep the first in sorted order
and report the other as an error."""

from __future__ import annotations

import posixpath

from ragseg.config import SourceConfig
from ragseg.errors import UserError
from ragseg.io import fs_and_path, unstrip
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


def _listing(cfg: SourceConfig):
    """(fs, base path, sorted file paths) of the folder's images, names only (no per-file metadata)."""
    base, pattern = _split_glob(cfg.uri, cfg.pattern)
    fs, base_path = fs_and_path(base)
    base_path = base_path.rstrip("/")
    try:
        if not any(ch in cfg.uri for ch in GLOB_CHARS) and not fs.isdir(base_path):
            if fs.isfile(base_path) and base_path.lower().endswith(IMAGE_EXTENSIONS):
                # a single image file
                return fs, posixpath.dirname(base_path), [base_path]
            raise UserError(f"image folder not found: {cfg.uri}")
        found = fs.glob(base_path + "/" + (pattern or "**"))
    except UserError:
        raise
    except NotImplementedError:
        raise UserError(f"cannot list images under {cfg.uri}: this store does not support listing "
                        "(use a source with an annotation file or image list)") from None
    except OSError as e:
        raise UserError(f"cannot list images under {cfg.uri}: {e}") from None
    prefix = base_path + "/"
    return fs, base_path, sorted(p for p in map(str, found) if p.lower().endswith(IMAGE_EXTENSIONS) and p.startswith(prefix))


def list_table(cfg: SourceConfig, errors: list[dict] | None = None):
    """The folder's image rows as an Arrow table (ragseg.sources.row_schema), built column-wise: the
    id is the path below the folder without its extension; a second file with the same id is an
    error row, not a second image."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from ragseg.sources import row_schema

    fs, base_path, paths = _listing(cfg)
    rels = [p[len(base_path) + 1:] for p in paths]
    del paths
    ids = pa.array([posixpath.splitext(r)[0] for r in rels], pa.string())
    rel_arr = pa.array(rels, pa.string())
    del rels
    order = pc.sort_indices(ids)  # stable: of two files with one id the first path wins
    ids, rel_arr = ids.take(order), rel_arr.take(order)
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
    uris = pc.binary_join_element_wise(pa.array([root] * n, pa.string()), rel_arr, "") if n else pa.array([], pa.string())
    const = {"source": "folder", "gt_format": "", "gt_png_uri": "", "gt_segments": "[]", "coco_id": ""}
    cols = {"image_id": ids, "uri": uris, "file_name": rel_arr,
            "labels": pa.array([[]] * n, pa.list_(pa.string()))}
    cols.update({c: pa.array([v] * n, pa.string()) for c, v in const.items()})
    schema = row_schema()
    return pa.table([cols[f.name] for f in schema], schema=schema)


def list_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    return list_table(cfg, errors).to_pylist()
