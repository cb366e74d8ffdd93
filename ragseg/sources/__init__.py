"""Image sources: readers that turn a data set on any fsspec URI into image rows.

``list_rows(cfg)`` runs on the driver (no pixel decode) and returns rows in a stable order with
``limit`` and ``shard`` applied; ``read_source(cfg)`` wraps them in a Ray Dataset. Row columns
(docs/interfaces.md): ``image_id``, ``uri``, ``source``, ``labels``, ``gt_format``, ``gt_png_uri``,
``gt_segments`` (JSON list of ``{"id", "label", "isthing", "iscrowd", "mask_uri"}``), ``coco_id``
(the image's id in the source's ground-truth JSON, JSON-encoded so that its type survives: ``139`` or
``"ADE_val_00000001"``; "" when the source has no such JSON) and ``file_name`` (the image's file name
relative to its image folder, as the ground-truth JSON gives it).

Kinds (``SourceConfig.kind``):

- ``folder``: every jpg/jpeg/png/webp under ``uri`` matching ``pattern``; no ground truth.
- ``coco_panoptic``: ``<uri>/annotations/panoptic_<split>.json``, PNGs in
  ``<uri>/annotations/panoptic_<split>/``, images in ``<uri>/<split>/`` (COCO 2017 layout).
- ``ade20k``: the ADEChallengeData2016 semantic layout (class-index PNGs + objectInfo150.txt).
- ``ade20k_panoptic``: the layout written by Mask2Former's ``prepare_ade20k_pan_seg.py``.
- ``openimages``: Open Images V7 CSVs (class descriptions, human image-level labels, boxes,
  segmentations with mask PNGs, optional image list).
- ``synthetic``: the COCO layout of a set made by :func:`ragseg.sources.synthetic.make_synthetic`.

Bad items (a malformed CSV line or JSON entry, a segment whose PNG is missing) are appended to
``errors`` as ``{"uri", "image_id", "stage": "source", "error"}`` and skipped; the rest is intact. A
missing required file raises :class:`ragseg.errors.UserError` naming it.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import TYPE_CHECKING, Any

from ragseg.config import RayConfig, SourceConfig
from ragseg.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
ROW_COLUMNS = ["image_id", "uri", "source", "labels", "gt_format", "gt_png_uri", "gt_segments", "coco_id",
               "file_name"]


# ----------------------------------------------------------------------------------------------
# helpers shared by the readers
# ----------------------------------------------------------------------------------------------
def make_row(image_id: str, uri: str, source: str, labels: list[str] | None = None, gt_format: str = "",
             gt_png_uri: str = "", gt_segments: list[dict] | None = None, coco_id: Any = None,
             file_name: str = "") -> dict[str, Any]:
    """One image row (columns :data:`ROW_COLUMNS`); ``coco_id`` is the ground-truth JSON's own image id
    (any JSON value, stored JSON-encoded), None when the source has none."""
    segs = [
        {"id": int(s["id"]), "label": str(s["label"]), "isthing": bool(s["isthing"]),
         "iscrowd": bool(s.get("iscrowd", False)), "mask_uri": s.get("mask_uri")}
        for s in (gt_segments or [])
    ]
    return {
        "image_id": str(image_id),
        "uri": uri,
        "source": source,
        "labels": [str(x) for x in (labels or [])],
        "gt_format": gt_format,
        "gt_png_uri": gt_png_uri,
        "gt_segments": json.dumps(segs),
        "coco_id": "" if coco_id is None else json.dumps(coco_id),
        "file_name": str(file_name or posixpath.basename(uri)),
    }


def source_locations(cfg: SourceConfig) -> list[str]:
    """Every location a source config names (uri, image/mask folders, annotation files, CSVs)."""
    fields = ("uri", "images_dir", "masks_dir", "annotations", "class_list", "categories", "class_descriptions",
              "image_labels", "boxes", "segmentations", "image_list")
    return [str(getattr(cfg, f)) for f in fields if getattr(cfg, f, None)]


def register_storage_options(cfg: SourceConfig | None) -> None:
    """Make ``cfg.storage_options`` apply to every remote location of the source, in this process
    (the driver lists with them; each stage that reads source files calls this in its ``__init__``)."""
    from ragseg.io import protocol, set_storage_options

    if cfg is None or not cfg.storage_options:
        return
    for loc in source_locations(cfg):
        if "://" in loc and protocol(loc) != "file":
            set_storage_options(loc, cfg.storage_options)


def register_job_storage_options(cfg: Any) -> None:
    """:func:`register_storage_options` for both sources of a job config (``source`` and
    ``label.images``)."""
    if cfg is None:
        return
    register_storage_options(getattr(cfg, "source", None))
    label = getattr(cfg, "label", None)
    register_storage_options(getattr(label, "images", None))


def add_error(errors: list[dict] | None, uri: str, image_id: str, message: str) -> None:
    if errors is not None:
        errors.append({"uri": str(uri), "image_id": str(image_id), "stage": "source", "error": message})


def unsafe_relpath(rel: str) -> bool:
    """True when a relative file name from an annotation file could escape its directory."""
    rel = str(rel).replace("\\", "/")
    if not rel or rel.startswith("/") or "://" in rel:
        return True
    return any(p == ".." for p in rel.split("/"))


def stem(rel: str) -> str:
    """File name relative path without its extension: the image id of a file."""
    root, _ = posixpath.splitext(str(rel).replace("\\", "/"))
    return root


def parse_shard(shard: str | None) -> tuple[int, int]:
    if not shard:
        return 0, 1
    i, n = (int(p) for p in shard.split("/"))
    return i, n


def select(rows: list[dict], cfg: SourceConfig) -> list[dict]:
    """Sort by image id, then keep the first ``limit`` rows, then every n-th row of shard ``i/n``.

    ``limit`` is applied before ``shard``, so the shards of one limited source partition it.
    """
    rows = sorted(rows, key=lambda r: r["image_id"])
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    i, n = parse_shard(cfg.shard)
    if n > 1:
        rows = [r for k, r in enumerate(rows) if k % n == i]
    return rows


def require(uri: str, what: str) -> str:
    """Raise UserError when a required file is missing."""
    from ragseg.io import exists

    try:
        ok = exists(uri)
    except Exception as e:  # noqa: BLE001 - an unreachable store is a user problem too
        raise UserError(f"{what} cannot be read: {uri} ({type(e).__name__}: {e})") from None
    if not ok:
        raise UserError(f"{what} not found: {uri}")
    return uri


def first_existing(candidates: list[str]) -> str | None:
    from ragseg.io import exists

    for c in candidates:
        try:
            if exists(c):
                return c
        except Exception:  # noqa: BLE001
            continue
    return None


def list_names(dir_uri: str) -> set[str] | None:
    """Relative paths of every file under a directory, or None when the store cannot list it (then
    existence is not checked here and a missing file shows up as an error row later)."""
    from ragseg.io import fs_and_path

    try:
        fs, path = fs_and_path(dir_uri)
        found = fs.find(path)
    except Exception:  # noqa: BLE001
        return None
    if not found:
        return None
    base = path.rstrip("/") + "/"
    out = set()
    for p in found:
        p = str(p)
        if p.startswith(base):
            out.add(p[len(base):])
        else:  # e.g. http returns full URLs
            out.add(p.rsplit("/", 1)[-1])
    return out


def read_json_required(uri: str, what: str) -> Any:
    from ragseg.io import read_json

    require(uri, what)
    try:
        return read_json(uri)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} is not valid JSON: {uri} ({e})") from None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def list_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    """Image rows of a source (driver side, no pixel decode), stable order, limit/shard applied."""
    register_storage_options(cfg)
    kind = cfg.kind
    if kind == "folder":
        from ragseg.sources.folder import list_rows as f
    elif kind in ("coco_panoptic", "synthetic"):
        from ragseg.sources.coco_panoptic import list_rows as f
    elif kind == "ade20k":
        from ragseg.sources.ade20k import list_rows as f
    elif kind == "ade20k_panoptic":
        from ragseg.sources.ade20k import list_panoptic_rows as f
    elif kind == "openimages":
        from ragseg.sources.openimages import list_rows as f
    else:  # pragma: no cover - the config's Literal rejects this earlier
        raise UserError(f"unknown source kind {kind!r}")
    return f(cfg, errors)


def row_schema():
    """Arrow schema of the image rows (:data:`ROW_COLUMNS`)."""
    import pyarrow as pa

    return pa.schema([(c, pa.list_(pa.string()) if c == "labels" else pa.string()) for c in ROW_COLUMNS])


def list_table(cfg: SourceConfig, errors: list[dict] | None = None):
    """The image rows as an Arrow table (:func:`row_schema`): what the jobs keep on the driver, about
    100 bytes a row instead of a Python dict's kilobyte. A folder (the unlabeled corpora of label jobs,
    10M+ images) is listed straight into columns; other kinds convert their rows."""
    import pyarrow as pa

    register_storage_options(cfg)
    if cfg.kind == "folder":
        from ragseg.sources.folder import list_table as f

        table = f(cfg, errors)
    else:
        table = pa.Table.from_pylist(list_rows(cfg, errors), schema=row_schema())
    if table.num_rows == 0:
        raise UserError(no_images_message(cfg, errors))
    return table


def no_images_message(cfg: SourceConfig, errors: list[dict] | None = None) -> str:
    """One line for a source that lists no image (nothing for a job to do is a mistake to report)."""
    what = (f"image folder {cfg.uri} has no {'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} file"
            + (f" matching {cfg.pattern!r}" if cfg.pattern not in ("**/*", "**", "*") else "")
            if cfg.kind == "folder" else f"source {cfg.kind} at {cfg.uri} (split {cfg.split!r}) lists no image")
    sel = [f"limit {cfg.limit}"] * bool(cfg.limit) + [f"shard {cfg.shard}"] * bool(cfg.shard)
    bad = f"; {len(errors)} entries were rejected (first: {errors[0]['error']})" if errors else ""
    return f"no images to process: {what}" + (f" after {' and '.join(sel)}" if sel else "") + bad


def missing_split(cfg: SourceConfig, wanted: str, folder: str, pattern: str) -> None:
    """Raise one line when the split's file or folder ``wanted`` is missing, listing the splits the
    layout has: ``pattern`` is a regex whose group 1 is a split name among the names in ``folder``."""
    import re

    from ragseg.io import fs_and_path

    if cfg.annotations or cfg.images_dir or first_existing([wanted]) is not None:
        return
    try:
        fs, path = fs_and_path(folder)
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)] if fs.exists(path) else []
    except Exception:  # noqa: BLE001 - listing is a courtesy; the missing file is still reported
        names = []
    found = sorted({m.group(1) for n in names if (m := re.fullmatch(pattern, n))})
    have = f"splits there: {', '.join(found)}" if found else f"{folder} holds no split of this layout"
    raise UserError(f"source.split {cfg.split!r}: {wanted} not found ({have})")


def read_source(cfg: SourceConfig, errors: list[dict] | None = None,
                images_per_block: int | None = None) -> "ray.data.Dataset":
    """A Ray Dataset over the source's rows (plus ``error`` = ""), about ``images_per_block`` rows per
    block (default: ``RayConfig.images_per_block``) so that decode and later stages spread evenly."""
    import ray.data

    rows = list_rows(cfg, errors)
    per_block = images_per_block or RayConfig().images_per_block
    items = [{**r, "error": ""} for r in rows]
    if not items:
        raise UserError(f"source {cfg.kind} at {cfg.uri} (split {cfg.split!r}) yielded no images")
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_block)))
