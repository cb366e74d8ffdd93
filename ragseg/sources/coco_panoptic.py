"""COCO panoptic sources (``coco_panoptic``, and ``synthetic`` which reads a synthetic set's COCO layout).

Defaults follow the COCO 2017 layout, all overridable in :class:`~ragseg.config.SourceConfig`::

    <uri>/annotations/panoptic_<split>.json     (cfg.annotations)
    <uri>/annotations/panoptic_<split>/*.png    (cfg.masks_dir)
    <uri>/<split>/*.jpg                         (cfg.images_dir)

For ``synthetic`` the defaults are under ``<uri>/coco``. The image id is the image's ``file_name``
without its extension; ``coco_id`` keeps the JSON's image id with its type (COCO numbers its
images) and ``file_name`` the JSON's file name. Rows carry ``gt_format = "panoptic_rgb"``, the PNG's URI and one
``gt_segments`` entry per ``segments_info`` item; labels are the image's category names (sorted).
An annotation or image entry that is malformed, names an unknown category, has a file name that
escapes its folder, or whose PNG is missing is reported in ``errors`` and skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ragseg.config import SourceConfig
from ragseg.errors import UserError
from ragseg.io import join
from ragseg.sources import (
    add_error,
    list_names,
    make_row,
    missing_split,
    read_json_required,
    select,
    stem,
    unsafe_relpath,
)


def parse_categories(data: Any, uri: str,
                     label_of: Callable[[int, str], str] | None = None) -> dict[int, tuple[str, bool]]:
    """``categories`` of a COCO panoptic JSON -> {id: (label, isthing)}; raises UserError if unusable.
    The label is ``label_of(id, name)`` when given, else the name stripped."""
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise UserError(f"{uri}: no 'categories' list")
    out: dict[int, tuple[str, bool]] = {}
    for c in cats:
        try:
            cid, name = int(c["id"]), str(c["name"])
            out[cid] = ((label_of(cid, name) if label_of else name).strip(), bool(c.get("isthing", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{uri}: malformed category entry {c!r} ({type(e).__name__}: {e})") from None
    return out


def _segments(ann: dict, cats: dict[int, tuple[str, bool]]) -> list[dict]:
    infos = ann.get("segments_info")
    if not isinstance(infos, list):
        raise ValueError("segments_info is not a list")
    segs, seen = [], set()
    for s in infos:
        if not isinstance(s, dict):
            raise ValueError(f"segment entry {s!r} is not an object")
        try:
            sid, cid = int(s["id"]), int(s["category_id"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"segment entry {s!r} lacks an integer id / category_id") from None
        if sid <= 0 or sid >= 256 ** 3:
            raise ValueError(f"segment id {sid} out of range")
        if sid in seen:
            raise ValueError(f"duplicate segment id {sid}")
        if cid not in cats:
            raise ValueError(f"segment {sid}: unknown category_id {cid}")
        seen.add(sid)
        name, isthing = cats[cid]
        segs.append({"id": sid, "label": name, "isthing": isthing, "iscrowd": bool(s.get("iscrowd", 0)),
                     "mask_uri": None})
    return segs


def read_panoptic(json_uri: str, png_dir: str, images_dir: str, source: str,
                  errors: list[dict] | None, label_of: Callable[[int, str], str] | None = None) -> list[dict]:
    """Rows of one COCO-style panoptic JSON (unsorted, no limit/shard); ``coco_id`` keeps each image's
    JSON id with its type, ``file_name`` its JSON file name."""
    data = read_json_required(json_uri, "panoptic annotation file")
    cats = parse_categories(data, json_uri, label_of)
    images = data.get("images")
    anns = data.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise UserError(f"{json_uri}: needs 'images' and 'annotations' lists")
    by_id: dict[str, dict] = {}
    for im in images:
        if not isinstance(im, dict) or "file_name" not in im or "id" not in im:
            add_error(errors, json_uri, str(im.get("id", "") if isinstance(im, dict) else ""),
                      f"malformed image entry in {json_uri}: {str(im)[:200]}")
            continue
        by_id[str(im["id"])] = im
    png_names = list_names(png_dir)
    rows, annotated = [], set()
    for ann in anns:
        key = str(ann.get("image_id", "")) if isinstance(ann, dict) else ""
        if not isinstance(ann, dict) or key not in by_id:
            add_error(errors, json_uri, key, f"annotation without a matching image entry in {json_uri}: "
                                              f"{str(ann)[:200]}")
            continue
        annotated.add(key)
        im = by_id[key]
        rel = str(im["file_name"])
        image_id = stem(rel)
        png_rel = str(ann.get("file_name") or image_id + ".png")
        if unsafe_relpath(rel) or unsafe_relpath(png_rel):
            add_error(errors, json_uri, image_id, f"file name escapes its folder: {rel!r} / {png_rel!r}")
            continue
        uri = join(images_dir, rel)
        png_uri = join(png_dir, png_rel)
        try:
            segs = _segments(ann, cats)
        except ValueError as e:
            add_error(errors, uri, image_id, f"malformed annotation in {json_uri}: {e}")
            continue
        if png_names is not None and png_rel not in png_names:
            add_error(errors, uri, image_id, f"panoptic PNG not found: {png_uri}")
            continue
        labels = sorted({s["label"] for s in segs})
        rows.append(make_row(image_id, uri, source, labels, "panoptic_rgb", png_uri, segs,
                             coco_id=im["id"], file_name=rel))
    for key, im in by_id.items():
        if key not in annotated:
            add_error(errors, join(images_dir, str(im["file_name"])), stem(str(im["file_name"])),
                      f"image has no annotation in {json_uri}")
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["image_id"] in seen:
            add_error(errors, r["uri"], r["image_id"], f"duplicate image id in {json_uri}")
            continue
        seen.add(r["image_id"])
        unique.append(r)
    return unique


def list_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    base = join(cfg.uri, "coco") if cfg.kind == "synthetic" else join(cfg.uri)
    ann = cfg.annotations or join(base, "annotations", f"panoptic_{cfg.split}.json")
    missing_split(cfg, ann, join(base, "annotations"), r"panoptic_(.+)\.json")
    png_dir = cfg.masks_dir or join(base, "annotations", f"panoptic_{cfg.split}")
    images_dir = cfg.images_dir or join(base, cfg.split)
    return select(read_panoptic(ann, png_dir, images_dir, cfg.kind, errors), cfg)
