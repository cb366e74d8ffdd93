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
from ragseg.sources import IMAGE_EXTENSIONS, add_error, make_row, select

GLOB_CHARS = "*?["


def _split_glob(uri: str, pattern: str) -> tuple[str, str]:
    """(base folder URI, glob relative to it)."""
    if any(ch in uri for ch in GLOB_CHARS):
        head = uri
        cut = min(head.index(ch) for ch in GLOB_CHARS if ch in head)
        base = head[:cut].rsplit("/", 1)[0]
        return base, head[len(base):].lstrip("/")
    return uri.rstrip("/"), pattern


def list_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    base, pattern = _split_glob(cfg.uri, cfg.pattern)
    fs, base_path = fs_and_path(base)
    base_path = base_path.rstrip("/")
    try:
        if not any(ch in cfg.uri for ch in GLOB_CHARS) and not fs.isdir(base_path):
            if fs.isfile(base_path) and base_path.lower().endswith(IMAGE_EXTENSIONS):
                # a single image file
                found = {base_path: {"type": "file"}}
                base_path = posixpath.dirname(base_path)
            else:
                raise UserError(f"image folder not found: {cfg.uri}")
        else:
            found = fs.glob(base_path + "/" + (pattern or "**"), detail=True)
    except UserError:
        raise
    except NotImplementedError:
        raise UserError(f"cannot list images under {cfg.uri}: this store does not support listing "
                        "(use a source with an annotation file or image list)") from None
    except OSError as e:
        raise UserError(f"cannot list images under {cfg.uri}: {e}") from None
    rows: dict[str, dict] = {}
    for p in sorted(str(x) for x, info in found.items() if info.get("type", "file") != "directory"):
        if not p.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if not p.startswith(base_path + "/"):
            continue
        rel = p[len(base_path) + 1:]
        image_id = posixpath.splitext(rel)[0]
        uri = unstrip(fs, p)
        if image_id in rows:
            add_error(errors, uri, image_id, f"duplicate image id {image_id!r} (also {rows[image_id]['uri']})")
            continue
        rows[image_id] = make_row(image_id, uri, "folder", file_name=rel)
    return select(list(rows.values()), cfg)
