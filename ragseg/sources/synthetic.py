"""A generated panoptic data set, written in every layout the readers understand.

``make_synthetic(out, images=40, seed=0, size=128, val_fraction=0.25)`` draws ``images`` square RGB
scenes of ``size`` pixels: 1-3 "stuff" regions (horizontal bands with wavy borders) overlaid by 2-6
"thing" instances (circles, rectangles, triangles, ellipses). Every class has its own colours and
texture (stripes of an orientation/period, checkerboard, dots, block noise, bricks, waves) with a
small per-instance jitter, so that even a randomly initialised CNN separates the classes. Later
shapes occlude earlier ones; a segment's mask is its visible part, and instances whose visible part
is tiny are removed (the scene is redrawn without them). A 2-pixel border of every label map is void
(0). The first ``images - round(images * val_fraction)`` images form the ``train`` split, the rest
``val``. Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: the same arguments give
byte-identical files.

Layout under ``out`` (``<id>`` = ``syn_000000`` ...; ``<split>`` = ``train`` | ``val``)::

    categories.json                                   COCO categories: id, name, isthing, supercategory, color
    coco/<split>/<id>.jpg                             images (JPEG, quality 95)
    coco/annotations/panoptic_<split>.json            COCO panoptic: images, annotations, categories
    coco/annotations/panoptic_<split>/<id>.png        panoptic PNGs, id = R + 256 G + 256^2 B, 0 = void
    ADEChallengeData2016/images/{training,validation}/<id>.jpg
    ADEChallengeData2016/annotations/{training,validation}/<id>.png   semantic: class index 1..K, 0 = ignore
    ADEChallengeData2016/objectInfo150.txt            tab-separated Idx Ratio Train Val Name, names as
                                                      comma-separated synonyms (as ADEChallengeData2016.zip)
    ADEChallengeData2016/ade20k_panoptic_{train,val}.json   Mask2Former prepare_ade20k_pan_seg.py layout
                                                      (string image ids, names with synonyms: "road, route")
    ADEChallengeData2016/ade20k_panoptic_{train,val}/<id>.png
    openimages/oidv7-class-descriptions.csv           LabelName,DisplayName (MIDs /m/0syn01 ...)
    openimages/oidv7-<split>-annotations-human-imagelabels.csv   ImageID,Source,LabelName,Confidence
    openimages/oidv7-<split>-annotations-bbox.csv     ImageID,Source,LabelName,Confidence,XMin,XMax,...
    openimages/<split>-annotations-object-segmentation.csv   MaskPath,ImageID,LabelName,BoxID,...
    openimages/<split>-images-with-rotation.csv       ImageID,Subset,OriginalURL,Rotation (URL relative)
    openimages/images/<split>/<id>.jpg
    openimages/masks/<split>/<MaskPath>               binary mask PNGs (0/255) at image size

Open Images is thing-centric: only things get boxes and segmentation masks; stuff classes appear
only as image-level labels. Image-level labels also carry a few negative (Confidence 0) labels.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ragseg.io import join, write_bytes_atomic, write_json_atomic, write_text_atomic
from ragseg.masks import id_to_rgb, mask_bbox_xyxy

BORDER = 2  # void border of every label map (pixels)
JPEG_QUALITY = 95


@dataclass(frozen=True)
class ClassSpec:
    id: int
    name: str
    isthing: bool
    supercategory: str
    colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    texture: str  # stripes | checker | dots | noise | smooth | bricks | waves
    period: float = 6.0
    angle: float = 0.0  # stripes orientation (degrees)
    shape: str = ""  # things: circle | rectangle | triangle | ellipse
    extra: dict = field(default_factory=dict)


THINGS = [
    ClassSpec(1, "ball", True, "toy", ((220, 30, 30), (250, 220, 40)), "stripes", 6, 0, "circle"),
    ClassSpec(2, "crate", True, "object", ((140, 90, 40), (230, 190, 120)), "checker", 5, 0, "rectangle"),
    ClassSpec(3, "kite", True, "toy", ((210, 40, 200), (250, 250, 250)), "stripes", 5, 45, "triangle"),
    ClassSpec(4, "egg", True, "food", ((245, 235, 200), (90, 60, 30)), "dots", 7, 0, "ellipse"),
    ClassSpec(5, "clock", True, "object", ((30, 60, 220), (240, 240, 255)), "stripes", 4, 90, "circle"),
    ClassSpec(6, "book", True, "object", ((20, 150, 60), (10, 10, 10)), "stripes", 8, 135, "rectangle"),
    ClassSpec(7, "sign", True, "object", ((250, 140, 0), (120, 40, 0)), "noise", 3, 0, "triangle"),
    ClassSpec(8, "plate", True, "food", ((40, 220, 230), (0, 40, 120)), "checker", 3, 0, "ellipse"),
]
STUFF = [
    ClassSpec(9, "sky", False, "sky", ((120, 180, 245), (200, 225, 255)), "smooth", 0, 0),
    ClassSpec(10, "grass", False, "plant", ((40, 140, 30), (90, 190, 60)), "stripes", 2.5, 80),
    ClassSpec(11, "water", False, "water", ((20, 70, 160), (60, 130, 210)), "waves", 9, 0),
    ClassSpec(12, "road", False, "ground", ((90, 90, 90), (150, 150, 150)), "noise", 2, 0),
    ClassSpec(13, "wall", False, "structure", ((170, 70, 50), (215, 205, 190)), "bricks", 8, 0),
]
CLASSES = THINGS + STUFF
ADE_SPLIT = {"train": "training", "val": "validation"}
# synonyms the ADE20k files give after a class's name ("road, route"), as the real class lists do
ADE_SYNONYMS = {"road": ["route"], "sign": ["signboard", "sign board"]}


def ade_name(c: ClassSpec) -> str:
    """A class's name in the ADE20k files: the name, then its synonyms, comma-separated."""
    return ", ".join([c.name, *ADE_SYNONYMS.get(c.name, [])])


def categories() -> list[dict]:
    """COCO panoptic categories of the synthetic classes (things first)."""
    return [
        {"id": c.id, "name": c.name, "isthing": int(c.isthing), "supercategory": c.supercategory,
         "color": list(c.colors[0])}
        for c in CLASSES
    ]


def mid(c: ClassSpec) -> str:
    """A made-up Open Images machine id (MID) for a class."""
    return f"/m/0syn{c.id:02d}"


# ----------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------
def _texture(c: ClassSpec, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """HxWx3 float texture of class ``c`` with a small per-instance jitter (phase, period, colour)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0 = np.array(c.colors[0], np.float32) + rng.uniform(-12, 12, 3)
    c1 = np.array(c.colors[1], np.float32) + rng.uniform(-12, 12, 3)
    period = max(2.0, c.period * rng.uniform(0.9, 1.1)) if c.period else 1.0
    phase = rng.uniform(0, period)
    if c.texture == "stripes":
        a = np.deg2rad(c.angle + rng.uniform(-5, 5))
        t = (np.sin(2 * np.pi * ((xx * np.cos(a) + yy * np.sin(a)) + phase) / period) > 0).astype(np.float32)
    elif c.texture == "checker":
        t = (((xx + phase) // period + (yy + phase) // period) % 2).astype(np.float32)
    elif c.texture == "dots":
        dx = (xx + phase) % period - period / 2
        dy = (yy + phase) % period - period / 2
        t = (dx * dx + dy * dy < (period * 0.3) ** 2).astype(np.float32)
    elif c.texture == "noise":
        p = int(round(period))
        small = rng.random(((h + p - 1) // p, (w + p - 1) // p)).astype(np.float32)
        t = np.kron(small, np.ones((p, p), np.float32))[:h, :w]
    elif c.texture == "waves":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + 2.0 * np.sin(2 * np.pi * xx / 23.0) + phase) / period)
    elif c.texture == "bricks":
        p = int(round(period))
        row = (yy // p).astype(np.int64)
        shift = (row % 2) * p
        mortar = ((yy % p) < 1) | (((xx + shift) % (2 * p)) < 1)
        t = mortar.astype(np.float32)
    else:  # smooth vertical gradient
        t = np.clip(yy / max(h - 1, 1) + rng.uniform(-0.1, 0.1), 0, 1)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _shape_mask(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = min(h, w)
    cx, cy = rng.uniform(0.12 * w, 0.88 * w), rng.uniform(0.12 * h, 0.88 * h)
    r = rng.uniform(0.10, 0.22) * s
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "rectangle":
        hw, hh = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        return (np.abs(xx - cx) <= hw) & (np.abs(yy - cy) <= hh)
    if shape == "ellipse":
        a, b = r * rng.uniform(1.1, 1.5), r * rng.uniform(0.5, 0.8)
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    # triangle: three vertices around the centre
    th0 = rng.uniform(0, 2 * np.pi)
    pts = [(cx + 1.3 * r * np.cos(th0 + k * 2 * np.pi / 3), cy + 1.3 * r * np.sin(th0 + k * 2 * np.pi / 3))
           for k in range(3)]
    inside = np.ones((h, w), bool)
    sign = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        e = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        sign = np.sign((x1 - x0) * (pts[2][1] - y0) - (y1 - y0) * (pts[2][0] - x0)) if sign is None else sign
        inside &= (e * sign) >= 0
    return inside


@dataclass
class Scene:
    image: np.ndarray  # HxWx3 uint8
    ids: np.ndarray  # HxW uint32 panoptic segment ids, 0 = void
    segments: list[dict]  # {"id", "category_id", "isthing", "mask", "full_area"}


def draw_scene(rng: np.random.Generator, size: int) -> Scene:
    """One scene: stuff bands, then occluding things; tiny visible things are removed."""
    h = w = size
    min_visible = max(12, int(0.006 * h * w))
    # stuff: 1-3 distinct classes in horizontal bands with wavy borders
    n_stuff = int(rng.integers(1, 4))
    stuff = [STUFF[k] for k in rng.choice(len(STUFF), n_stuff, replace=False)]
    cuts = np.sort(rng.uniform(0.25, 0.75, n_stuff - 1)) * h if n_stuff > 1 else np.array([])
    xx = np.arange(w, dtype=np.float32)
    owner_stuff = np.zeros((h, w), np.int64)
    yy = np.arange(h, dtype=np.float32)[:, None]
    for k, cut in enumerate(cuts):
        border = cut + rng.uniform(2, 0.08 * h) * np.sin(2 * np.pi * xx / rng.uniform(0.4, 1.0) / w
                                                          + rng.uniform(0, 2 * np.pi))
        owner_stuff[yy >= border[None, :]] = k + 1
    stuff_tex = [_texture(c, h, w, rng) for c in stuff]
    # things: 2-6 instances, classes drawn with replacement
    n_things = int(rng.integers(2, 7))
    things = []
    for _ in range(n_things):
        c = THINGS[int(rng.integers(len(THINGS)))]
        things.append((c, _shape_mask(c.shape, h, w, rng), _texture(c, h, w, rng)))
    things = [t for t in things if t[1].sum() > 0]
    # paint; drop things whose visible part is tiny and repaint until stable
    while True:
        owner = owner_stuff.copy()  # 0..n_stuff-1 stuff, n_stuff + j thing j
        for j, (_, m, _) in enumerate(things):
            owner[m] = n_stuff + j
        vis = [(owner == n_stuff + j).sum() for j in range(len(things))]
        keep = [v >= min_visible for v in vis]
        if all(keep):
            break
        things = [t for t, k in zip(things, keep) if k]
    img = np.zeros((h, w, 3), np.float32)
    for k, tex in enumerate(stuff_tex):
        sel = owner == k
        img[sel] = tex[sel]
    for j, (_, _, tex) in enumerate(things):
        sel = owner == n_stuff + j
        img[sel] = tex[sel]
    inner = np.zeros((h, w), bool)
    inner[BORDER:h - BORDER, BORDER:w - BORDER] = True
    ids = np.zeros((h, w), np.uint32)
    segments = []
    counter = 0
    for k, c in enumerate(stuff):
        m = (owner == k) & inner
        if m.sum() < min_visible:  # a stuff band hidden by things: its few pixels are void
            continue
        counter += 1
        sid = c.id * 1000 + counter
        ids[m] = sid
        segments.append({"id": sid, "category_id": c.id, "isthing": False, "mask": m, "full_area": int(m.sum())})
    for j, (c, full, _) in enumerate(things):
        m = (owner == n_stuff + j) & inner
        if m.sum() < min_visible:
            continue
        counter += 1
        sid = c.id * 1000 + counter
        ids[m] = sid
        segments.append({"id": sid, "category_id": c.id, "isthing": True, "mask": m,
                         "full_area": int(full.sum())})
    return Scene(np.clip(np.rint(img), 0, 255).astype(np.uint8), ids, segments)


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(header)
    wr.writerows(rows)
    return buf.getvalue()


def _bbox_xywh(mask: np.ndarray) -> list[int]:
    x0, y0, x1, y1 = mask_bbox_xyxy(mask)
    return [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]


def _split_of(images: int, val_fraction: float) -> list[str]:
    """The split of each image: the first ones ``train``, the last ``round(images * val_fraction)``
    (at least 1 when asked for and possible, never all) ``val``."""
    n_val = int(round(images * val_fraction))
    if val_fraction > 0 and images >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, images - 1)
    return ["train"] * (images - n_val) + ["val"] * n_val


def _write_coco_image(coco: str, split: str, i: int, name: str, size: int, jpg: bytes,
                      sc: Scene) -> tuple[dict, dict]:
    """Write one image and its panoptic PNG in the COCO layout; returns its image and annotation entries."""
    write_bytes_atomic(join(coco, split, name + ".jpg"), jpg)
    write_bytes_atomic(join(coco, "annotations", f"panoptic_{split}", name + ".png"), _png(id_to_rgb(sc.ids)))
    seg_info = [
        {"id": s["id"], "category_id": s["category_id"], "area": int(s["mask"].sum()),
         "bbox": _bbox_xywh(s["mask"]), "iscrowd": 0}
        for s in sc.segments
    ]
    image = {"id": i, "file_name": name + ".jpg", "height": size, "width": size}
    ann = {"image_id": i, "file_name": name + ".png", "segments_info": seg_info}
    return image, ann


def _write_ade_image(ade: str, split: str, name: str, size: int, jpg: bytes, sc: Scene,
                     by_id: dict[int, ClassSpec]) -> np.ndarray:
    """Write one image, its semantic index map (index = position in CLASSES + 1) and its panoptic PNG in
    the ADE20k layout; returns the pixel count of each index."""
    ade_split = ADE_SPLIT[split]
    write_bytes_atomic(join(ade, "images", ade_split, name + ".jpg"), jpg)
    sem = np.zeros((size, size), np.uint8)
    for s in sc.segments:
        sem[s["mask"]] = CLASSES.index(by_id[s["category_id"]]) + 1
    write_bytes_atomic(join(ade, "annotations", ade_split, name + ".png"), _png(sem))
    write_bytes_atomic(join(ade, f"ade20k_panoptic_{split}", name + ".png"), _png(id_to_rgb(sc.ids)))
    return np.bincount(sem.ravel(), minlength=len(CLASSES) + 1)


def _write_oi_image(oi: str, split: str, name: str, size: int, jpg: bytes, sc: Scene,
                    by_id: dict[int, ClassSpec], rng: np.random.Generator, d: dict) -> None:
    """Write one image and its things' mask PNGs in the Open Images layout, appending its image-list,
    image-label (positives and up to 2 negatives drawn from ``rng``), box and segmentation rows to ``d``."""
    write_bytes_atomic(join(oi, "images", split, name + ".jpg"), jpg)
    d["list"].append([name, split, f"images/{split}/{name}.jpg", 0])
    present_ids = sorted({s["category_id"] for s in sc.segments})
    for cid in present_ids:
        d["labels"].append([name, "verification", mid(by_id[cid]), 1])
    absent = [c for c in CLASSES if c.id not in present_ids]
    for k in rng.choice(len(absent), min(2, len(absent)), replace=False):
        d["labels"].append([name, "verification", mid(absent[int(k)]), 0])
    for s in sc.segments:
        if not s["isthing"]:
            continue
        c = by_id[s["category_id"]]
        x0, y0, x1, y1 = mask_bbox_xyxy(s["mask"])
        box = [round(x0 / size, 6), round(x1 / size, 6), round(y0 / size, 6), round(y1 / size, 6)]
        box_id = f"{s['id']:08x}"
        occluded = int(s["mask"].sum() < s["full_area"])
        truncated = int(x0 <= BORDER or y0 <= BORDER or x1 >= size - BORDER or y1 >= size - BORDER)
        d["boxes"].append([name, "xclick", mid(c), 1, *box, occluded, truncated, 0, 0, 0])
        mask_path = f"{name}_{mid(c).replace('/m/', 'm')}_{box_id}.png"
        write_bytes_atomic(join(oi, "masks", split, mask_path), _png(s["mask"].astype(np.uint8) * 255))
        d["segs"].append([mask_path, name, mid(c), box_id, *box, 0.95, ""])


def _write_split_tables(split: str, d: dict, coco: str, ade: str, oi: str, cats: list[dict],
                        by_id: dict[int, ClassSpec], seed: int) -> dict:
    """Write one split's COCO and ADE20k panoptic JSONs and Open Images CSVs; returns its paths."""
    coco_json = join(coco, "annotations", f"panoptic_{split}.json")
    write_json_atomic(coco_json, {"info": {"description": "ragseg synthetic", "seed": seed},
                                  "licenses": [], "images": d["images"], "annotations": d["anns"],
                                  "categories": cats})
    # Mask2Former's ADE20k panoptic json: string image ids (the file stem)
    ade_images = [{**im, "id": im["file_name"][:-4]} for im in d["images"]]
    ade_anns = [{**a, "image_id": a["file_name"][:-4]} for a in d["anns"]]
    ade_json = join(ade, f"ade20k_panoptic_{split}.json")
    ade_cats = [{**c, "name": ade_name(by_id[c["id"]])} for c in cats]
    write_json_atomic(ade_json, {"images": ade_images, "annotations": ade_anns, "categories": ade_cats})
    labels_csv = join(oi, f"oidv7-{split}-annotations-human-imagelabels.csv")
    write_text_atomic(labels_csv, _csv(["ImageID", "Source", "LabelName", "Confidence"], d["labels"]))
    boxes_csv = join(oi, f"oidv7-{split}-annotations-bbox.csv")
    write_text_atomic(boxes_csv, _csv(
        ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
         "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"], d["boxes"]))
    segs_csv = join(oi, f"{split}-annotations-object-segmentation.csv")
    write_text_atomic(segs_csv, _csv(
        ["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
         "PredictedIoU", "Clicks"], d["segs"]))
    list_csv = join(oi, f"{split}-images-with-rotation.csv")
    write_text_atomic(list_csv, _csv(["ImageID", "Subset", "OriginalURL", "Rotation"], d["list"]))
    ade_split = ADE_SPLIT[split]
    return {
        "count": len(d["images"]),
        "images": join(coco, split),
        "coco_json": coco_json,
        "coco_dir": join(coco, "annotations", f"panoptic_{split}"),
        "image_ids": [im["file_name"][:-4] for im in d["images"]],
        "ade_images": join(ade, "images", ade_split),
        "ade_semantic_dir": join(ade, "annotations", ade_split),
        "ade_panoptic_json": ade_json,
        "ade_panoptic_dir": join(ade, f"ade20k_panoptic_{split}"),
        "oi_images": join(oi, "images", split),
        "oi_image_labels": labels_csv,
        "oi_boxes": boxes_csv,
        "oi_segmentations": segs_csv,
        "oi_masks": join(oi, "masks", split),
        "oi_image_list": list_csv,
    }


def _write_object_info(ade: str, pixel_count: np.ndarray, img_count: dict[str, np.ndarray]) -> None:
    """Write the class list as ADEChallengeData2016 ships it: objectInfo150.txt, tab-separated."""
    total = max(int(pixel_count.sum()), 1)
    rows = [[k + 1, f"{pixel_count[k + 1] / total:.4f}", int(img_count['train'][k + 1]),
             int(img_count['val'][k + 1]), ade_name(c)] for k, c in enumerate(CLASSES)]
    lines = ["\t".join(["Idx", "Ratio", "Train", "Val", "Name"])] + ["\t".join(str(v) for v in r) for r in rows]
    write_text_atomic(join(ade, "objectInfo150.txt"), "\n".join(lines) + "\n")


def make_synthetic(out: str, images: int = 40, seed: int = 0, size: int = 128,
                   val_fraction: float = 0.25) -> dict:
    """Draw and write the synthetic set (see the module docstring); returns every path written."""
    if images < 1:
        raise ValueError("images must be >= 1")
    if size < 32:
        raise ValueError("size must be >= 32")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    split_of = _split_of(images, val_fraction)
    cats = categories()
    by_id = {c.id: c for c in CLASSES}
    root = join(out)
    coco, ade, oi = join(root, "coco"), join(root, "ADEChallengeData2016"), join(root, "openimages")

    write_json_atomic(join(root, "categories.json"), cats)
    oi_classes = [[mid(c), c.name] for c in CLASSES]
    write_text_atomic(join(oi, "oidv7-class-descriptions.csv"), _csv(["LabelName", "DisplayName"], oi_classes))

    per_split: dict[str, dict] = {s: {"images": [], "anns": [], "labels": [], "boxes": [], "segs": [], "list": []}
                                  for s in ("train", "val")}
    pixel_count = np.zeros(len(CLASSES) + 1, np.int64)
    img_count = {s: np.zeros(len(CLASSES) + 1, np.int64) for s in ("train", "val")}
    for i in range(images):
        split = split_of[i]
        name = f"syn_{i:06d}"
        rng = np.random.default_rng([seed, i])
        sc = draw_scene(rng, size)
        jpg = _jpeg(sc.image)
        d = per_split[split]
        image, ann = _write_coco_image(coco, split, i, name, size, jpg, sc)
        d["images"].append(image)
        d["anns"].append(ann)
        present = _write_ade_image(ade, split, name, size, jpg, sc, by_id)
        pixel_count += present
        img_count[split] += present > 0
        _write_oi_image(oi, split, name, size, jpg, sc, by_id, rng, d)

    result: dict = {"root": root, "categories": join(root, "categories.json"),
                    "classes": [c.name for c in CLASSES], "things": [c.name for c in THINGS],
                    "stuff": [c.name for c in STUFF], "images": images, "seed": seed, "size": size,
                    "splits": {},
                    "ade20k": {"root": ade, "class_list": join(ade, "objectInfo150.txt")},
                    "openimages": {"root": oi, "class_descriptions": join(oi, "oidv7-class-descriptions.csv")}}
    for split, d in per_split.items():
        if d["images"]:
            result["splits"][split] = _write_split_tables(split, d, coco, ade, oi, cats, by_id, seed)
    _write_object_info(ade, pixel_count, img_count)
    return result
