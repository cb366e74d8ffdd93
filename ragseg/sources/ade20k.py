"""ADE20k sources, ``cfg.uri`` = the ``ADEChallengeData2016`` folder; ``cfg.split`` is ``train`` /
``val`` (``training`` / ``validation`` are accepted too).

``ade20k`` (semantic, SceneParsing layout)::

    images/{training,validation}/<name>.jpg          (cfg.images_dir)
    annotations/{training,validation}/<name>.png     (cfg.masks_dir) class index 1..K, 0 = ignore
    objectInfo150.csv                                (cfg.class_list) Idx,Ratio,Train,Val,Name

The class name is the first ``;``-separated name of ``Name``. ``isthing`` comes from an ``isthing``
column when the class list has one, else from ``cfg.categories`` (COCO categories JSON) by name,
else False. Rows have ``gt_format = "semantic_index"`` and ``gt_segments`` listing every class of the
class list (``id`` = class index, ``mask_uri`` null); :func:`ragseg.sources.gt.load_gt_segments`
returns one segment per class present in the image. ``labels`` is empty: the classes present are
only known after decoding the PNG.

``ade20k_panoptic`` (the layout of Mask2Former's ``datasets/prepare_ade20k_pan_seg.py``)::

    images/{training,validation}/<name>.jpg
    ade20k_panoptic_{train,val}.json                 (cfg.annotations) COCO panoptic json
    ade20k_panoptic_{train,val}/<name>.png           (cfg.masks_dir)
"""

from __future__ import annotations

import csv
import io
import json

from ragseg.config import SourceConfig
from ragseg.errors import UserError
from ragseg.io import fs_and_path, join, read_json, read_text, unstrip
from ragseg.sources import (
    IMAGE_EXTENSIONS,
    add_error,
    list_names,
    make_row,
    require,
    select,
    stem,
)
from ragseg.sources.coco_panoptic import read_panoptic

LONG = {"train": "training", "val": "validation"}
SHORT = {v: k for k, v in LONG.items()}


def _splits(split: str) -> tuple[str, str]:
    """(short json split, long folder split)."""
    short = SHORT.get(split, split)
    return short, LONG.get(short, split)


def load_isthing(uri: str | None) -> dict[str, bool]:
    """Class name (lower case) -> isthing from a COCO categories JSON (list, or dict with categories)."""
    if not uri:
        return {}
    require(uri, "categories file")
    try:
        data = read_json(uri)
    except ValueError as e:
        raise UserError(f"categories file is not valid JSON: {uri} ({e})") from None
    cats = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(cats, list):
        raise UserError(f"categories file {uri}: expected a list of categories")
    return {str(c["name"]).lower(): bool(c.get("isthing", 0)) for c in cats if isinstance(c, dict) and "name" in c}


def read_class_list(uri: str, isthing_by_name: dict[str, bool],
                    errors: list[dict] | None = None) -> list[dict]:
    """objectInfo150-style CSV -> [{"id", "label", "isthing", "iscrowd", "mask_uri"}] sorted by id."""
    require(uri, "ADE20k class list")
    text = read_text(uri)
    reader = csv.DictReader(io.StringIO(text))
    fields = {f.lower(): f for f in (reader.fieldnames or [])}
    if "idx" not in fields or "name" not in fields:
        raise UserError(f"class list {uri} needs 'Idx' and 'Name' columns, has {reader.fieldnames}")
    out: dict[int, dict] = {}
    for n, rec in enumerate(reader, start=2):
        try:
            idx = int(rec[fields["idx"]])
            name = str(rec[fields["name"]]).split(";")[0].strip()
            if not name or idx <= 0 or idx > 65535:
                raise ValueError("empty name or index out of 1..65535")
            if idx in out:
                raise ValueError(f"duplicate Idx {idx}")
        except (TypeError, ValueError, AttributeError) as e:
            add_error(errors, f"{uri}:{n}", "", f"bad class list line {n}: {e}")
            continue
        thing = rec.get(fields["isthing"]) if "isthing" in fields else None
        isthing = (str(thing).strip().lower() in ("1", "true", "yes")) if thing not in (None, "") else \
            isthing_by_name.get(name.lower(), False)
        out[idx] = {"id": idx, "label": name, "isthing": isthing, "iscrowd": False, "mask_uri": None}
    if not out:
        raise UserError(f"class list {uri} has no classes")
    return [out[k] for k in sorted(out)]


def _list_images(images_dir: str) -> list[tuple[str, str]]:
    """[(relative path, full uri)] of the images under a folder."""
    fs, path = fs_and_path(images_dir)
    try:
        if not fs.isdir(path):
            raise UserError(f"image folder not found: {images_dir}")
        found = fs.find(path)
    except UserError:
        raise
    except (OSError, NotImplementedError) as e:
        raise UserError(f"cannot list images under {images_dir}: {e}") from None
    base = path.rstrip("/") + "/"
    out = []
    for p in sorted(str(x) for x in found):
        if p.lower().endswith(IMAGE_EXTENSIONS) and p.startswith(base):
            out.append((p[len(base):], unstrip(fs, p)))
    return out


def list_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    """Semantic ADEChallengeData2016 rows."""
    _, long = _splits(cfg.split)
    root = join(cfg.uri)
    images_dir = cfg.images_dir or join(root, "images", long)
    ann_dir = cfg.masks_dir or join(root, "annotations", long)
    classes = read_class_list(cfg.class_list or join(root, "objectInfo150.csv"), load_isthing(cfg.categories),
                              errors)
    segs_json = json.dumps(classes)  # one shared string for every row
    ann_names = list_names(ann_dir)
    rows = []
    for rel, uri in _list_images(images_dir):
        image_id = stem(rel)
        png_rel = image_id + ".png"
        if ann_names is not None and png_rel not in ann_names:
            add_error(errors, uri, image_id, f"annotation PNG not found: {join(ann_dir, png_rel)}")
            continue
        row = make_row(image_id, uri, "ade20k", [], "semantic_index", join(ann_dir, png_rel))
        row["gt_segments"] = segs_json
        rows.append(row)
    return select(rows, cfg)


def list_panoptic_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    """Mask2Former ADE20k panoptic rows."""
    short, long = _splits(cfg.split)
    root = join(cfg.uri)
    ann = cfg.annotations or join(root, f"ade20k_panoptic_{short}.json")
    png_dir = cfg.masks_dir or join(root, f"ade20k_panoptic_{short}")
    images_dir = cfg.images_dir or join(root, "images", long)
    return select(read_panoptic(ann, png_dir, images_dir, "ade20k_panoptic", errors), cfg)
