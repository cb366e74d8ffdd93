"""ADE20k sources. ``cfg.uri`` is the ``ADEChallengeData2016`` folder or the folder that holds it;
``cfg.split`` is ``train`` / ``val`` (``training`` / ``validation`` are accepted too).

``ade20k`` (semantic, SceneParsing layout of ADEChallengeData2016.zip)::

    images/{training,validation}/<name>.jpg          (cfg.images_dir)
    annotations/{training,validation}/<name>.png     (cfg.masks_dir) class index 1..K, 0 = ignore
    objectInfo150.txt                                (cfg.class_list) Idx Ratio Train Val Name

The class list is the tab-separated ``objectInfo150.txt`` that ships with the data set (names are
comma-separated synonyms: ``building, edifice``); when it is absent, ``objectInfo150.csv`` is read.
Any class list may be tab- or comma-separated (the CSAIL segmentation repository's
``object150_info.csv`` is comma-separated with ``;`` between synonyms): the delimiter is taken from the
header line, the synonym separator is ``;`` when a name contains one, else ``,``.

One name per ADE class across readers: a class that is one of the 150 ADE20k classes (same index and
a name that agrees, see :func:`ade150_class`) is labelled with the name of the packaged table
``ragseg/data/ade20k_150_categories.json`` (the first synonym of the ADE20k panoptic metadata's
name, e.g. ``road``, ``window``), which keeps all synonyms of both files; any other class is
labelled with its first synonym, stripped. ``isthing``: an ``isthing`` column of the class list, then
``cfg.categories`` (COCO categories JSON) by name or synonym, then the packaged thing/stuff split of the
ADE20k panoptic metadata, then a ``Stuff`` column (CSAIL CSV, 1 = stuff), else stuff. Rows have
``gt_format = "semantic_index"`` and ``gt_segments`` listing every class of the class list (``id`` =
class index, ``mask_uri`` null); :func:`ragseg.sources.gt.load_gt_segments` returns one segment per
class present in the image. ``labels`` is empty: the classes present are only known after decoding.

``ade20k_panoptic`` (the layout of Mask2Former's ``datasets/prepare_ade20k_pan_seg.py``)::

    images/{training,validation}/<name>.jpg
    ade20k_panoptic_{train,val}.json                 (cfg.annotations) COCO panoptic json
    ade20k_panoptic_{train,val}/<name>.png           (cfg.masks_dir)

Its categories (ids 0..149 = class index - 1, names such as ``road, route`` or ``window ``) get the
same labels as the semantic reader's.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from importlib import resources

from ragseg.config import SourceConfig
from ragseg.errors import UserError
from ragseg.io import fs_and_path, join, read_json, read_text, unstrip
from ragseg.sources import (
    IMAGE_EXTENSIONS,
    add_error,
    first_existing,
    list_names,
    make_row,
    missing_split,
    select,
    stem,
)
from ragseg.sources.coco_panoptic import read_panoptic

LONG = {"train": "training", "val": "validation"}
SHORT = {v: k for k, v in LONG.items()}
DATASET_DIR = "ADEChallengeData2016"
CLASS_LISTS = ("objectInfo150.txt", "objectInfo150.csv")
ADE150_FILE = "ade20k_150_categories.json"


def _splits(split: str) -> tuple[str, str]:
    """(short json split, long folder split)."""
    short = SHORT.get(split, split)
    return short, LONG.get(short, split)


def dataset_root(uri: str) -> str:
    """``uri`` itself, or ``uri/ADEChallengeData2016`` when ``uri`` is the folder that holds it."""
    root = join(uri)
    if root.rstrip("/").rsplit("/", 1)[-1] != DATASET_DIR:
        nested = join(root, DATASET_DIR)
        if first_existing([nested]) is not None:
            return nested
    return root


# ----------------------------------------------------------------------------------------------
# the 150 ADE20k classes (package data)
# ----------------------------------------------------------------------------------------------
@functools.cache
def ade150() -> dict[int, dict]:
    """Class index (1..150) -> ``{"id", "name", "isthing", "synonyms", "object_info_name",
    "panoptic_name"}`` from ``ragseg/data/ade20k_150_categories.json``: ``object_info_name`` is the
    Name of ADEChallengeData2016's objectInfo150.txt, ``panoptic_name`` the name (and ``isthing`` the
    flag) of the ADE20k panoptic metadata (Mask2Former's ``ADE20K_150_CATEGORIES``, whose category id
    is the index - 1); ``name`` is the first synonym of ``panoptic_name`` (also a synonym in
    objectInfo150.txt) and ``synonyms`` all other synonyms of both."""
    data = json.loads(resources.files("ragseg.data").joinpath(ADE150_FILE).read_text(encoding="utf-8"))
    return {int(c["id"]): c for c in data}


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t for t in re.split(r"[\s,;]+", str(text).lower()) if t)


def split_synonyms(name: str, sep: str | None = None) -> list[str]:
    """``"building, edifice"`` -> ["building", "edifice"]; ``sep`` None: ``;`` if present, else ``,``."""
    if sep is None:
        sep = ";" if ";" in name else ","
    return [s.strip() for s in str(name).split(sep) if s.strip()]


def ade150_class(index: int, name: str) -> dict | None:
    """The packaged ADE class with this index (1..150) when ``name`` agrees with it: its first synonym
    is one of the class's names, or its words are those of the class's objectInfo150 / panoptic name
    (the CSAIL CSV writes ``chest;of;drawers;chest;bureau;dresser``)."""
    c = ade150().get(int(index))
    if c is None:
        return None
    syns = split_synonyms(name)
    known = {_norm(c["name"])} | {_norm(s) for s in c["synonyms"]}
    if syns and _norm(syns[0]) in known:
        return c
    if _tokens(name) in (_tokens(c["object_info_name"]), _tokens(c["panoptic_name"])):
        return c
    return None


def class_label(index: int, name: str, sep: str | None = None) -> tuple[str, dict | None]:
    """(DB label, packaged ADE class or None) of class ``index`` named ``name`` in a class list or a
    panoptic JSON: the packaged name for one of the 150 ADE classes, else the first synonym."""
    c = ade150_class(index, name)
    if c is not None:
        return c["name"], c
    syns = split_synonyms(name, sep)
    return (syns[0] if syns else str(name).strip()), None


def ade_panoptic_label(cat_id: int, name: str) -> str:
    """DB label of a category of an ADE20k panoptic JSON (Mask2Former: id = class index - 1; a JSON
    numbered 1..150 is recognised too)."""
    for index in (int(cat_id) + 1, int(cat_id)):
        c = ade150_class(index, name)
        if c is not None:
            return c["name"]
    syns = split_synonyms(name)
    return syns[0] if syns else str(name).strip()


# ----------------------------------------------------------------------------------------------
# class lists
# ----------------------------------------------------------------------------------------------
def load_isthing(uri: str | None) -> dict[str, bool]:
    """Class name or synonym (normalised) -> isthing from a COCO categories JSON (list, or dict with
    categories); a name given as comma-separated synonyms counts for each of them."""
    if not uri:
        return {}
    from ragseg.sources import require

    require(uri, "categories file")
    try:
        data = read_json(uri)
    except ValueError as e:
        raise UserError(f"categories file is not valid JSON: {uri} ({e})") from None
    cats = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(cats, list):
        raise UserError(f"categories file {uri}: expected a list of categories")
    out: dict[str, bool] = {}
    for c in cats:
        if isinstance(c, dict) and "name" in c:
            thing = bool(c.get("isthing", 0))
            out.setdefault(_norm(c["name"]), thing)
            for s in split_synonyms(str(c["name"]), ","):
                out.setdefault(_norm(s), thing)
    return out


def _truthy(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "thing")


def read_class_list(uri: str, isthing_by_name: dict[str, bool],
                    errors: list[dict] | None = None) -> list[dict]:
    """objectInfo150-style class list (tab- or comma-separated) -> [{"id", "label", "isthing",
    "iscrowd", "mask_uri"}] sorted by id."""
    from ragseg.sources import require

    require(uri, "ADE20k class list")
    text = read_text(uri).lstrip("\ufeff")
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip() for h in next(reader, [])]
    cols = {h.lower(): k for k, h in enumerate(header)}
    if "idx" not in cols or "name" not in cols:
        raise UserError(f"class list {uri} needs 'Idx' and 'Name' columns (tab- or comma-separated), "
                        f"has {header}")
    records = [(n, cells) for n, cells in enumerate(reader, start=2) if any(c.strip() for c in cells)]
    names = [cells[cols["name"]] for _, cells in records if len(cells) > cols["name"]]
    sep = ";" if any(";" in nm for nm in names) else ","
    out: dict[int, dict] = {}
    for n, cells in records:
        try:
            if len(cells) != len(header):
                raise ValueError(f"{len(cells)} cells, expected {len(header)}")
            idx = int(cells[cols["idx"]].strip())
            raw = cells[cols["name"]]
            if not split_synonyms(raw, sep) or idx <= 0 or idx > 65535:
                raise ValueError("empty name or index out of 1..65535")
            if idx in out:
                raise ValueError(f"duplicate Idx {idx}")
        except (TypeError, ValueError) as e:
            add_error(errors, f"{uri}:{n}", "", f"bad class list line {n}: {e}")
            continue
        label, ade = class_label(idx, raw, sep)
        names_of = [label] + split_synonyms(raw, sep) + (ade["synonyms"] if ade else [])
        if "isthing" in cols and cells[cols["isthing"]].strip():
            isthing = _truthy(cells[cols["isthing"]])
        elif any(_norm(x) in isthing_by_name for x in names_of):
            isthing = next(isthing_by_name[_norm(x)] for x in names_of if _norm(x) in isthing_by_name)
        elif ade is not None:
            isthing = bool(ade["isthing"])
        elif "stuff" in cols and cells[cols["stuff"]].strip():
            isthing = not _truthy(cells[cols["stuff"]])
        else:
            isthing = False
        out[idx] = {"id": idx, "label": label, "isthing": isthing, "iscrowd": False, "mask_uri": None}
    if not out:
        raise UserError(f"class list {uri} has no classes")
    return [out[k] for k in sorted(out)]


def _class_list_uri(cfg: SourceConfig, root: str) -> str:
    if cfg.class_list:
        return cfg.class_list
    candidates = [join(root, n) for n in CLASS_LISTS]
    found = first_existing(candidates)
    if found is None:
        raise UserError(f"ADE20k class list not found: {candidates[0]} (nor {CLASS_LISTS[1]}; set source.class_list)")
    return found


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
    root = dataset_root(cfg.uri)
    images_dir = cfg.images_dir or join(root, "images", long)
    missing_split(cfg, images_dir, join(root, "images"), r"(.+)")
    ann_dir = cfg.masks_dir or join(root, "annotations", long)
    classes = read_class_list(_class_list_uri(cfg, root), load_isthing(cfg.categories), errors)
    segs_json = json.dumps(classes)  # one shared string for every row
    ann_names = list_names(ann_dir)
    rows = []
    for rel, uri in _list_images(images_dir):
        image_id = stem(rel)
        png_rel = image_id + ".png"
        if ann_names is not None and png_rel not in ann_names:
            add_error(errors, uri, image_id, f"annotation PNG not found: {join(ann_dir, png_rel)}")
            continue
        row = make_row(image_id, uri, "ade20k", [], "semantic_index", join(ann_dir, png_rel), file_name=rel)
        row["gt_segments"] = segs_json
        rows.append(row)
    return select(rows, cfg)


def list_panoptic_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    """Mask2Former ADE20k panoptic rows (category names as :func:`ade_panoptic_label` gives them)."""
    short, long = _splits(cfg.split)
    root = dataset_root(cfg.uri)
    ann = cfg.annotations or join(root, f"ade20k_panoptic_{short}.json")
    missing_split(cfg, ann, root, r"ade20k_panoptic_(.+)\.json")
    png_dir = cfg.masks_dir or join(root, f"ade20k_panoptic_{short}")
    images_dir = cfg.images_dir or join(root, "images", long)
    return select(read_panoptic(ann, png_dir, images_dir, "ade20k_panoptic", errors, label_of=ade_panoptic_label),
                  cfg)
