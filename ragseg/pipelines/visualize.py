"""Overlays of ``ragseg label`` output and an ``index.html`` contact sheet (``ragseg visualize``).

Input: the label output layout of docs/interfaces.md — ``PRED/panoptic.json`` (``images``,
``annotations`` with ``segments_info``, ``categories``) and ``PRED/panoptic/<file_name>`` PNGs
(``id = R + 256 G + 256^2 B``, 0 = void).

Finding the original image of an annotation (first hit wins):

1. the ``images[]`` entry with the annotation's ``image_id``: its ``uri`` (``ragseg label`` records
   the source image's URI there) when that file exists;
2. the same entry's ``file_name``, as a URI of its own when absolute (``s3://...``, ``/data/...``),
   else relative to ``images_uri``;
3. a recursive listing of the image files under ``images_uri`` (a folder, or a glob pattern), matched
   on the relative path with extension, the relative path without extension (the folder source's
   image id), or ``safe_name`` of the latter.

An image that cannot be found or decoded is listed as an error (in the result and in index.html) and
does not stop the run.

Output under ``out_uri``: ``overlays/<safe_name(image_id)>.png`` (original | overlay, side by side),
``thumbs/<same>.jpg`` (contact-sheet thumbnails) and ``index.html``.
"""

from __future__ import annotations

import colorsys
import html
import io as _io
import logging
import math
import posixpath
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ragseg import io as rio
from ragseg.errors import UserError, describe
from ragseg.masks import rgb_to_id

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
ALPHA = 0.5
THUMB_W = 360
_GLOB_CHARS = re.compile(r"[*?\[]")
_GOLDEN = 0.618033988749895


# ---------- colours ----------

def segment_color(category_id: int, instance: int = 0) -> tuple[int, int, int]:
    """Deterministic colour: the hue is fixed by the class, instances of a class vary in value and
    saturation so that touching things of one class stay distinguishable."""
    hue = (int(category_id) * _GOLDEN) % 1.0
    sat = (0.85, 0.55, 0.95, 0.7)[instance % 4]
    val = (0.95, 0.75, 0.6, 0.85)[(instance // 4 + instance) % 4]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(r * 255), int(g * 255), int(b * 255)


# ---------- drawing ----------

def _font(height: int):
    size = max(10, min(32, height // 40))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the bitmap default font has one size
        return ImageFont.load_default()


def _label_point(ids: np.ndarray, seg_id: int) -> tuple[int, int] | None:
    ys, xs = np.nonzero(ids == seg_id)
    if len(xs) == 0:
        return None
    cx, cy = float(xs.mean()), float(ys.mean())
    ix, iy = min(round(cx), ids.shape[1] - 1), min(round(cy), ids.shape[0] - 1)
    if ids[iy, ix] == seg_id:
        return ix, iy
    i = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))  # non-convex mask: nearest pixel inside it
    return int(xs[i]), int(ys[i])


def render_overlay(image: np.ndarray, ids: np.ndarray, segments: list[dict], names: dict[int, str],
                   alpha: float = ALPHA) -> Image.Image:
    """Original and overlay side by side: segments alpha-blended in their colours, white contours
    between segments, ``class score`` at each segment's centroid."""
    h, w = ids.shape
    img = np.asarray(image, dtype=np.uint8)[..., :3]
    color_map = np.zeros((h, w, 3), np.float32)
    painted = np.zeros((h, w), bool)
    per_cat: Counter = Counter()
    for s in segments:
        cat = int(s.get("category_id", 0))
        m = ids == int(s["id"])
        color_map[m] = segment_color(cat, per_cat[cat])
        painted |= m
        per_cat[cat] += 1
    unknown = (ids != 0) & ~painted  # ids in the PNG without segments_info: grey
    color_map[unknown] = (128, 128, 128)
    painted |= unknown
    out = img.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * color_map[painted]
    edge = np.zeros((h, w), bool)
    dy = ids[1:, :] != ids[:-1, :]
    dx = ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    out[edge] = 255
    overlay = Image.fromarray(out.clip(0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(overlay)
    font = _font(h)
    for s in segments:
        pt = _label_point(ids, int(s["id"]))
        if pt is None:
            continue
        text = names.get(int(s.get("category_id", -1)), str(s.get("category_id", "?")))
        if s.get("score") is not None:
            text = f"{text} {float(s['score']):.2f}"
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        tw, th = x1 - x0, y1 - y0
        x = min(max(0, pt[0] - tw // 2), max(0, w - tw - 2))
        y = min(max(0, pt[1] - th // 2), max(0, h - th - 2))
        draw.rectangle((x - 1, y - 1, x + tw + 1, y + th + 1), fill=(0, 0, 0))
        draw.text((x - x0, y - y0), text, fill=(255, 255, 255), font=font)

    canvas = Image.new("RGB", (2 * w, h), (255, 255, 255))
    canvas.paste(Image.fromarray(np.ascontiguousarray(img)), (0, 0))
    canvas.paste(overlay, (w, 0))
    return canvas


# ---------- finding images ----------

class _ImageFinder:
    def __init__(self, images_uri: str, images_meta: dict[str, dict]):
        self.images_uri = images_uri
        self.meta = images_meta
        self._index: dict[str, str] | None = None

    def _listing(self) -> dict[str, str]:
        """relative path (with and without extension, and its safe_name) -> URI of each image file."""
        if self._index is not None:
            return self._index
        m = _GLOB_CHARS.search(self.images_uri)
        if m:
            base = self.images_uri[: m.start()].rsplit("/", 1)[0] or "."
            pattern = self.images_uri
        else:
            base = self.images_uri
            pattern = rio.join(self.images_uri, "**")
        fs, bpath = rio.fs_and_path(rio.join(base))
        _, ppath = rio.fs_and_path(rio.join(pattern))
        bpath = bpath.rstrip("/")
        index: dict[str, str] = {}
        for p in sorted(fs.glob(ppath)):
            if not p.lower().endswith(IMAGE_EXTS) or rio.is_tmp(p):
                continue
            rel = p[len(bpath) + 1:] if p.startswith(bpath + "/") else posixpath.basename(p)
            stem = posixpath.splitext(rel)[0]
            for key in (rel, stem, rio.safe_name(stem)):
                index.setdefault(key, rio.unstrip(fs, p))
        self._index = index
        return index

    def find(self, image_id: str) -> str | None:
        meta = self.meta.get(image_id) or {}
        if meta.get("uri") and rio.exists(str(meta["uri"])):
            return str(meta["uri"])
        fn = meta.get("file_name")
        if fn:
            if "://" in fn or fn.startswith("/"):
                cand = fn
            elif not _GLOB_CHARS.search(self.images_uri):
                cand = rio.join(self.images_uri, fn)
            else:
                cand = None
            if cand and rio.exists(cand):
                return cand
        index = self._listing()
        for key in (image_id, posixpath.splitext(image_id)[0], rio.safe_name(image_id)):
            if key in index:
                return index[key]
        if fn:
            stem = posixpath.splitext(fn)[0]
            for key in (fn, stem):
                if key in index:
                    return index[key]
        return None


# ---------- the command ----------

def _read_rgb(uri: str) -> np.ndarray:
    with Image.open(_io.BytesIO(rio.read_bytes(uri))) as im:
        return np.asarray(im.convert("RGB"))


def _read_ids(uri: str) -> np.ndarray:
    with Image.open(_io.BytesIO(rio.read_bytes(uri))) as im:
        arr = np.asarray(im.convert("RGB"))
    return rgb_to_id(arr)


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = _io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=85)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _read_label_parts(pred_uri: str, limit: int | None) -> tuple[list, dict | None, int, dict[str, dict], list[dict]]:
    """(categories, provenance, total images, image id -> image entry, annotations up to ``limit``) of a
    label output read from its parts: no merged panoptic.json needed."""
    import itertools

    from ragseg import labels_out

    led = labels_out.open_labels(pred_uri)
    cats = led.header.get("vocab", [])
    prov = led.header.get("provenance")
    total = int(led.header.get("totals", {}).get("images", 0)) - int(led.header.get("totals", {}).get("errors", 0))
    entries = list(itertools.islice(labels_out.iter_images(pred_uri), limit if limit and limit > 0 else None))
    images_meta = {str(a["id"]): {"id": a["id"], "uri": a["uri"], "file_name": a["file_name"]} for a in entries}
    anns = [{"image_id": a["id"], "file_name": a["png_name"], "segments_info": a["segments_info"]} for a in entries]
    return cats, prov, total, images_meta, anns


def _read_panoptic_json(pred_uri: str, limit: int | None) -> tuple[list, dict | None, int, dict[str, dict], list[dict]]:
    """The same as :func:`_read_label_parts`, from the output's merged ``panoptic.json``."""
    pj = rio.join(pred_uri, "panoptic.json")
    if not rio.exists(pj):
        raise UserError(f"{pj} not found: is {pred_uri} the --out of a finished `ragseg label` run?")
    data = rio.read_json(pj)
    cats = data.get("categories", [])
    prov = (data.get("info") or {}).get("provenance")
    images_meta = {str(im["id"]): im for im in data.get("images", []) if "id" in im}
    anns = list(data.get("annotations", []))
    total = len(anns)
    if limit is not None and limit > 0:
        anns = anns[:limit]
    return cats, prov, total, images_meta, anns


def _ids_at_size(ids: np.ndarray, h: int, w: int, image_id: str) -> np.ndarray:
    """The panoptic id map resized (nearest) to the image's size when it differs, with a warning."""
    if ids.shape != (h, w):
        log.warning("%s: panoptic PNG is %s, image is %s; resizing the ids (nearest)",
                    image_id, ids.shape, (h, w))
        ids = np.asarray(Image.fromarray(ids.astype(np.int32)).resize((w, h), Image.NEAREST))
        ids = ids.astype(np.uint32)
    return ids


def _write_overlay(out_uri: str, name: str, canvas: Image.Image) -> None:
    """Write the overlay PNG and its contact-sheet JPEG thumbnail."""
    rio.write_bytes_atomic(rio.join(out_uri, "overlays", f"{name}.png"), _png_bytes(canvas))
    tw = min(THUMB_W, canvas.width)
    th = max(1, round(canvas.height * tw / canvas.width))
    thumb = canvas.resize((tw, th), Image.BILINEAR)
    rio.write_bytes_atomic(rio.join(out_uri, "thumbs", f"{name}.jpg"), _png_bytes(thumb, "JPEG"))


def _class_summary(segs: list[dict], names: dict[int, str]) -> list[tuple[str, int, float]]:
    """(class name, segment count, best score) per class of an image's segments, by name."""
    cls: dict[str, list[float]] = {}
    for s in segs:
        n = names.get(int(s.get("category_id", -1)), str(s.get("category_id", "?")))
        cls.setdefault(n, []).append(float(s["score"]) if s.get("score") is not None else float("nan"))
    return sorted(((n, len(v), max(v)) for n, v in cls.items()), key=lambda t: t[0])


def _visualize_one(ann: dict, finder: _ImageFinder, images_uri: str, pred_uri: str, out_uri: str,
                   names: dict[int, str]) -> dict:
    """Render and write one annotation's overlay; its contact-sheet entry (``error`` set on failure)."""
    image_id = str(ann["image_id"])
    name = rio.safe_name(image_id)
    entry = {"image_id": image_id, "name": name, "error": "", "classes": []}
    try:
        segs = list(ann.get("segments_info", []))
        src = finder.find(image_id)
        if src is None:
            raise FileNotFoundError(f"no image for id {image_id!r} under {images_uri}")
        image = _read_rgb(src)
        png = ann.get("file_name") or f"{name}.png"
        ids = _read_ids(rio.join(pred_uri, "panoptic", png))
        h, w = image.shape[:2]
        ids = _ids_at_size(ids, h, w, image_id)
        canvas = render_overlay(image, ids, segs, names)
        _write_overlay(out_uri, name, canvas)
        entry["classes"] = _class_summary(segs, names)
        entry["source"] = src
    except Exception as e:  # noqa: BLE001 - one bad image never stops the sheet
        entry["error"] = describe(e)
        log.warning("visualize %s: %s", image_id, entry["error"])
    return entry


def visualize(images_uri: str, pred_uri: str, out_uri: str, limit: int | None = 100, workers: int = 4) -> dict:
    """Write overlay PNGs and ``index.html`` for (at most ``limit``) images of a label output.

    Returns ``{"images": written, "errors": failed, "total": annotations in the output, "skipped":
    left out by the limit, "index_html": URI, "overlays": URI of the folder, "failed": [{"image_id",
    "error"}]}``.
    """
    from ragseg import labels_out

    if labels_out.is_label_output(pred_uri):
        cats, prov, total, images_meta, anns = _read_label_parts(pred_uri, limit)
    else:
        cats, prov, total, images_meta, anns = _read_panoptic_json(pred_uri, limit)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    finder = _ImageFinder(images_uri, images_meta)
    rio.makedirs(out_uri)

    def one(ann: dict) -> dict:
        return _visualize_one(ann, finder, images_uri, pred_uri, out_uri, names)

    if workers and workers > 1 and len(anns) > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            entries = list(ex.map(one, anns))
    else:
        entries = [one(a) for a in anns]

    index_uri = rio.join(out_uri, "index.html")
    shown = {n for e in entries for n, _, _ in e["classes"]}
    legend = [(int(c["id"]), str(c.get("name", c["id"])), bool(c.get("isthing", 1))) for c in cats
              if str(c.get("name", c["id"])) in shown]
    rio.write_text_atomic(index_uri, _index_html(entries, pred_uri, total, legend, prov))
    failed = [{"image_id": e["image_id"], "error": e["error"]} for e in entries if e["error"]]
    return {
        "images": len(entries) - len(failed),
        "errors": len(failed),
        "total": total,
        "skipped": total - len(anns),
        "index_html": index_uri,
        "overlays": rio.join(out_uri, "overlays"),
        "failed": failed[:50],
    }


def _fmt_score(x: float) -> str:
    return "" if math.isnan(x) else f" {x:.2f}"


def _swatch(category_id: int) -> str:
    r, g, b = segment_color(category_id, 0)
    return f'<span class=sw style="background:#{r:02x}{g:02x}{b:02x}"></span>'


def _legend_html(legend: list[tuple[int, str, bool]]) -> str:
    """Each class shown: its colour (the hue; instances of a thing class vary in shade), name, thing/stuff."""
    esc = html.escape
    if not legend:
        return ""
    items = "".join(f"<li>{_swatch(cid)}{esc(name)} <span class=s>{'thing' if thing else 'stuff'}</span></li>"
                    for cid, name, thing in sorted(legend, key=lambda t: t[1]))
    return (f"<h2>Legend</h2><p class=s>colour = class (instances of a thing class vary in shade)</p>"
            f"<ul class=legend>{items}</ul>")


def _provenance_html(prov: dict | None) -> str:
    """What made these labels (ragseg.provenance): version, job time, proposals, index, ensemble, models
    with their checksums, vocabulary size, and the whole config."""
    esc = html.escape
    if not prov:
        return "<h2>Provenance</h2><p class=s>not recorded (labels made by an older ragseg)</p>"
    rows = [("ragseg", prov.get("ragseg_version")), ("job", f"{prov.get('job')} at {prov.get('created')}"),
            ("proposals", prov.get("proposals"))]
    idx = prov.get("index") or {}
    if idx:
        rows.append(("index", f"{idx.get('uri')} (version {idx.get('version')})"))
    if prov.get("fallback_index"):
        rows.append(("fallback index", (prov["fallback_index"] or {}).get("uri")))
    ens = prov.get("ensemble") or {}
    if ens:
        rows.append(("ensemble", ", ".join(f"{k} {ens[k]}" for k in ("scores", "form", "alpha", "beta", "gamma", "k")
                                           if k in ens)))
    for m in prov.get("models") or []:
        sha = f" sha256 {str(m['sha256'])[:12]}" if m.get("sha256") else ""
        rows.append((f"model {m.get('section')}", f"{m.get('id')} weights {m.get('weights')}{sha}"))
    if prov.get("vocabulary"):
        rows.append(("vocabulary", f"{len(prov['vocabulary'])} classes"))
    body = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in rows if v is not None)
    cfg = prov.get("config_yaml")
    cfg_block = f"<details><summary>config</summary><pre>{esc(cfg)}</pre></details>" if cfg else ""
    return f"<h2>Provenance</h2><table class=prov>{body}</table>{cfg_block}"


def _index_html(entries: list[dict], pred_uri: str, total: int, legend: list[tuple[int, str, bool]] | None = None,
                prov: dict | None = None) -> str:
    esc = html.escape
    ok = [e for e in entries if not e["error"]]
    bad = [e for e in entries if e["error"]]
    color_of = {name: cid for cid, name, _ in legend or []}
    cards = []
    for e in ok:
        href = "overlays/" + quote(e["name"] + ".png")
        src = "thumbs/" + quote(e["name"] + ".jpg")
        items = "".join(
            f"<li>{_swatch(color_of[n]) if n in color_of else ''}{esc(n)}{' x' + str(c) if c > 1 else ''}"
            f"<span class=s>{esc(_fmt_score(s))}</span></li>"
            for n, c, s in e["classes"]) or "<li><i>no segments</i></li>"
        cards.append(
            f'<div class=card><a href="{esc(href)}"><img src="{esc(src)}" loading=lazy '
            f'alt="{esc(e["image_id"])}"></a><div class=id>{esc(e["image_id"])}</div><ul>{items}</ul></div>')
    errs = "".join(f"<li><b>{esc(e['image_id'])}</b>: {esc(e['error'])}</li>" for e in bad)
    err_block = f"<h2>Errors ({len(bad)})</h2><ul class=errors>{errs}</ul>" if bad else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ragseg labels: {esc(pred_uri)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ width: {THUMB_W}px; border: 1px solid #ccc; padding: 6px; }}
.card img {{ width: 100%; }}
.id {{ font-weight: bold; word-break: break-all; }}
.card ul {{ margin: 4px 0; padding-left: 18px; font-size: 13px; }}
.s {{ color: #777; }}
.errors {{ color: #a00; }}
.sw {{ display: inline-block; width: 11px; height: 11px; margin-right: 5px; border: 1px solid #555; }}
.legend {{ columns: 4; list-style: none; padding: 0; }}
.prov th {{ text-align: left; padding-right: 12px; vertical-align: top; }}
</style></head><body>
<h1>ragseg labels</h1>
<p>{esc(pred_uri)}: {len(ok)} shown, {len(bad)} failed, {total} in the output.</p>
{_legend_html(legend or [])}
<div class=grid>
{chr(10).join(cards)}
</div>
{err_block}
{_provenance_html(prov)}
</body></html>
"""
