"""The label output folder: layout, a streaming reader, and the merged ``panoptic.json``.

```
OUT/manifest.json              header (format 2, kind "labels"): config hash, index version, vocabulary
OUT/_manifest/, OUT/_commits/  commit records (ragseg.ledger)
OUT/panoptic/<image>.png       COCO panoptic PNG per image
OUT/parts/<piece>.jsonl        one JSON line per image: image_id (ragseg's string id), id (the source's
                               own image id with its JSON type, e.g. COCO's int; else image_id),
                               file_name (the image's), png_name (its PNG), uri, height, width,
                               segments_info (COCO panoptic)
OUT/segments/<piece>.parquet   one row per kept segment, with s_ret / s_clip / s_iv and the score
OUT/errors/<piece>.parquet     bad images
OUT/panoptic.json              all parts as one COCO panoptic JSON (label.panoptic_json: always, or
                               auto up to panoptic_json_max_images images)
OUT/panoptic_json/             past that (auto): panoptic-<n>.json, COCO panoptic JSONs of at most
                               panoptic_json_max_images images each, and index.json listing them
```

:func:`iter_images` walks the committed parts a bulk read at a time, so a reader (``ragseg eval``, a
user's script) never needs the merged JSON. :func:`write_panoptic_json` streams the parts into one
JSON file with memory bounded by one bulk read of parts; :func:`write_panoptic_json_parts` writes
the split JSON of a large output, only what is new since the last run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ragseg import io, ledger
from ragseg.masks import decode_mask  # noqa: F401 - documented here: a segments/ row's mask

KIND = "labels"
PANOPTIC_JSON = "panoptic.json"


def piece_paths(name: str) -> dict[str, str]:
    return {"segments": f"segments/{name}.parquet", "parts": f"parts/{name}.jsonl",
            "errors": f"errors/{name}.parquet"}


def open_labels(out: str) -> ledger.Ledger | None:
    return ledger.load(out, KIND)


def is_label_output(uri: str) -> bool:
    """True when ``uri`` is a folder written by ``ragseg label`` (it has a labels manifest)."""
    try:
        h = io.read_json(ledger.manifest_uri(uri))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
        return False
    return isinstance(h, dict) and h.get("kind") == KIND


# parts fetched per bulk read: concurrent requests on object stores, memory bounded by this many parts
PARTS_PER_READ = 32
# panoptic JSON of a large output (label.panoptic_json auto, past panoptic_json_max_images): files of
# at most that many images, OUT/panoptic_json/panoptic-<n>.json, listed by OUT/panoptic_json/index.json
PANOPTIC_PARTS_DIR = "panoptic_json"
PANOPTIC_INDEX = "index.json"
DEFAULT_INFO = {"description": "ragseg pseudo-labels"}


def _parse_part(uri: str, data: bytes) -> list[dict[str, Any]]:
    text = data.decode("utf-8")
    if uri.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)["annotations"]  # format-1 part (migrated folders)


def _ordered_parts(led: ledger.Ledger) -> list[str]:
    """Part paths of the committed pieces, ordered by each piece's smallest image id (a piece's
    image ids are stored sorted), so the merged file comes out in (roughly) image order."""
    t = led.records
    if t.num_rows == 0:
        return []
    first = (t.column(ledger.FIRST_IMAGE_ID) if ledger.FIRST_IMAGE_ID in t.column_names
             else pc.list_element(t.column("image_ids"), 0))
    order = pc.sort_indices(first)
    parts = t.column("parts_path").take(order).to_pylist()
    return [p for p in parts if p]


def _images_of_parts(out: str, parts: list[str]) -> Iterator[dict[str, Any]]:
    """The images of the given parts (paths relative to ``out``), in that order, each part's sorted
    by image id; :data:`PARTS_PER_READ` parts per bulk read, parsed one part at a time."""
    for i in range(0, len(parts), PARTS_PER_READ):
        uris = [io.join(out, rel) for rel in parts[i : i + PARTS_PER_READ]]
        got = ledger._cat(uris)  # one bulk read, not a serial GET per part
        for uri in uris:
            data = got.pop(uri)
            if isinstance(data, Exception):
                raise FileNotFoundError(f"committed part {uri} is unreadable ({type(data).__name__}: {data})")
            anns = _parse_part(uri, data)
            del data
            for a in sorted(anns, key=lambda a: str(a["image_id"])):
                if "png_name" not in a:  # format-1 part: file_name was the PNG
                    a = {**a, "id": a["image_id"], "png_name": a["file_name"],
                         "file_name": a["uri"].rsplit("/", 1)[-1]}
                yield a


def iter_images(out: str) -> Iterator[dict[str, Any]]:
    """Every labelled image of ``out`` as ``{"image_id", "id", "file_name", "png_name", "uri", "height",
    "width", "segments_info"}``, :data:`PARTS_PER_READ` parts at a time (one bulk read each). Parts written before
    ids were kept (format-1 folders) are read as if ``id`` were ``image_id``."""
    led = ledger.load(out, KIND, columns=[ledger.FIRST_IMAGE_ID, "parts_path"])
    if led is None:
        raise FileNotFoundError(f"{out} is not a ragseg label output (no {ledger.MANIFEST})")
    parts = _ordered_parts(led)
    del led
    yield from _images_of_parts(out, parts)


def prediction(out: str) -> dict[str, Any]:
    """A COCO panoptic prediction dict (``annotations``, ``categories``) read from the parts, for
    evaluation; ``file_name`` of each annotation is its PNG under ``out/panoptic``."""
    led = open_labels(out)
    if led is None:
        raise FileNotFoundError(f"{out} is not a ragseg label output")
    anns = [{"image_id": a["id"], "file_name": a["png_name"], "segments_info": a["segments_info"]}
            for a in iter_images(out)]
    return {"annotations": anns, "categories": led.header.get("vocab", [])}


class PanopticJsonWriter:
    """Streams one COCO panoptic JSON (``info``, ``images``, ``annotations``, ``categories``): each
    image entry goes to the output file as it comes and its annotation to a spill file appended after
    the images, so memory holds one image's entry. :meth:`finish` moves/uploads the file into place
    whole (readers see the old file or the new one)."""

    def __init__(self, categories: list[dict], info: dict | None = None):
        self.tmpdir = tempfile.mkdtemp(prefix="ragseg-panoptic-")
        self.categories = categories
        self._main_p = os.path.join(self.tmpdir, "panoptic.json")
        self._spill_p = os.path.join(self.tmpdir, "annotations.json")
        self._main = open(self._main_p, "w")
        self._spill = open(self._spill_p, "w")
        self._main.write('{"info": ' + json.dumps({**DEFAULT_INFO, **(info or {})}, sort_keys=True, default=str) + ', "images": [')
        self.images = 0

    def add(self, a: dict[str, Any]) -> None:
        """One image as :func:`iter_images` yields it."""
        img = {"id": a["id"], "file_name": a["file_name"], "uri": a["uri"], "height": a["height"],
               "width": a["width"]}
        ann = {"image_id": a["id"], "file_name": a["png_name"], "segments_info": a["segments_info"]}
        sep = ", " if self.images else ""
        self._main.write(sep + json.dumps(img, sort_keys=True))
        self._spill.write(sep + json.dumps(ann, sort_keys=True))
        self.images += 1

    def finish(self, uri: str) -> str:
        try:
            self._spill.close()
            self._main.write('], "annotations": [')
            with open(self._spill_p) as spill:
                shutil.copyfileobj(spill, self._main, 1 << 20)
            self._main.write('], "categories": ' + json.dumps(self.categories, sort_keys=True) + "}\n")
            self._main.close()
            io.put_file_atomic(self._main_p, uri)
            return uri
        finally:
            self.close()

    def close(self) -> None:
        for f in (self._main, self._spill):
            if not f.closed:
                f.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def write_panoptic_json(out: str, categories: list[dict] | None = None, info: dict | None = None,
                        dest: str | None = None) -> str:
    """Stream every committed part into one COCO panoptic JSON, ``dest`` (default
    ``out/panoptic.json``), in image order (:func:`iter_images`), with memory bounded by one bulk
    read of parts (:class:`PanopticJsonWriter`); ``categories`` default to the output's vocabulary.
    Also the way to get one file from an output whose JSON is split in parts:
    ``write_panoptic_json(OUT, dest=...)``."""
    if categories is None:
        header = ledger.read_header(out, KIND)
        if header is None:
            raise FileNotFoundError(f"{out} is not a ragseg label output (no {ledger.MANIFEST})")
        categories = header.get("vocab", [])
    w = PanopticJsonWriter(categories, info)
    try:
        for a in iter_images(out):
            w.add(a)
    except BaseException:
        w.close()
        raise
    return w.finish(dest or io.join(out, PANOPTIC_JSON))


def _parts_index_uri(out: str) -> str:
    return io.join(out, PANOPTIC_PARTS_DIR, PANOPTIC_INDEX)


def read_parts_index(out: str) -> dict[str, Any] | None:
    """``OUT/panoptic_json/index.json``: ``files`` (each ``{"file", "images", "pieces": [piece names]}``),
    ``images``, ``pieces``, ``categories``, ``info``; None when absent."""
    try:
        return io.read_json(_parts_index_uri(out))
    except FileNotFoundError:
        return None


def write_panoptic_json_parts(out: str, categories: list[dict], max_images: int, info: dict | None = None) -> dict:
    """The panoptic JSON of a large output in files of at most ``max_images`` images
    (``OUT/panoptic_json/panoptic-<n>.json``, each a complete COCO panoptic JSON) plus
    ``OUT/panoptic_json/index.json``, written incrementally: pieces go to files in commit order
    (``created``, then name), the index lists each file's pieces, and a run writes only new files for
    the pieces no file holds yet, and the last file again when the first of them fits in it (so a
    resumed job does not rewrite the JSON of earlier runs). Files first, the index last: a kill in between leaves files
    the next run rewrites under the same names. Memory: one bulk read of parts, plus the pieces'
    names (never an image id)."""
    cap = max(1, int(max_images))
    files = list((read_parts_index(out) or {}).get("files", []))
    led = ledger.load(out, KIND, columns=["images", "parts_path", "created"])
    if led is None:
        raise FileNotFoundError(f"{out} is not a ragseg label output")
    t = led.records
    del led
    covered = pa.array([n for f in files for n in f["pieces"]], pa.string())
    rest = t.filter(pc.invert(pc.is_in(t.column("name"), value_set=covered))) if len(covered) else t
    rest = rest.sort_by([("created", "ascending"), ("name", "ascending")])
    todo = list(zip(rest.column("name").to_pylist(), rest.column("images").to_pylist(),
                    rest.column("parts_path").to_pylist()))
    del rest, covered
    groups: list[dict[str, Any]] = []
    if todo and files and int(files[-1]["record_images"]) + int(todo[0][1]) <= cap:
        last = files.pop()  # the next piece fits in the last file: that file is written again
        old = t.filter(pc.is_in(t.column("name"), value_set=pa.array(last["pieces"], pa.string())))
        part_of = dict(zip(old.column("name").to_pylist(), old.column("parts_path").to_pylist()))
        groups.append({"file": last["file"], "record_images": int(last["record_images"]),
                       "pieces": list(last["pieces"]), "parts": [part_of.get(n) for n in last["pieces"]]})
    del t
    for name, images, part in todo:
        g = groups[-1] if groups else None
        if g is None or (g["record_images"] + int(images) > cap and g["pieces"]):
            g = {"file": f"panoptic-{len(files) + len(groups):06d}.json", "record_images": 0, "pieces": [],
                 "parts": []}
            groups.append(g)
        g["pieces"].append(name)
        g["parts"].append(part)
        g["record_images"] += int(images)
    del todo
    for g in groups:
        w = PanopticJsonWriter(categories, info)
        try:
            for a in _images_of_parts(out, [p for p in g.pop("parts") if p]):
                w.add(a)
        except BaseException:
            w.close()
            raise
        w.finish(io.join(out, PANOPTIC_PARTS_DIR, g["file"]))
        files.append({**g, "images": w.images})
    index = {"format": 1, "files": files, "images": sum(int(f["images"]) for f in files),
             "pieces": sum(len(f["pieces"]) for f in files), "max_images_per_file": cap,
             "categories": categories, "info": {**DEFAULT_INFO, **(info or {})}}
    if groups or not io.exists(_parts_index_uri(out)):
        io.write_json_atomic(_parts_index_uri(out), index)
    return {"files": len(files), "written": len(groups), "images": index["images"]}


def maybe_write_panoptic_json(out: str, header: dict[str, Any], categories: list[dict], mode: str,
                              max_images: int, changed: bool, info: dict | None = None) -> dict[str, Any]:
    """The output's panoptic JSON per ``label.panoptic_json``: ``always``: one ``OUT/panoptic.json``;
    ``auto``: that file while the output holds at most ``max_images`` images, past that files of
    ``max_images`` images in ``OUT/panoptic_json/`` with an index (:func:`write_panoptic_json_parts`);
    ``never``: none. Nothing is written when it is already current (nothing new committed since).
    The layout not written is removed (it would be stale). Returns what was done, for the run
    summary."""
    images = int(header.get("totals", {}).get("images", 0))
    pieces = int(header.get("totals", {}).get("pieces", 0))
    if mode == "never":
        return {"written": False, "reason": "label.panoptic_json=never; read the parts with "
                "ragseg.labels_out.iter_images"}
    layout = "file" if (mode == "always" or images <= max_images) else "parts"
    done = header.get("panoptic_json") or {}
    target = io.join(out, PANOPTIC_JSON) if layout == "file" else _parts_index_uri(out)
    if (not changed and done.get("pieces") == pieces and done.get("layout", "file") == layout
            and io.exists(target)):
        return {"written": False, "reason": "up to date", "layout": layout}
    if layout == "file":
        uri = write_panoptic_json(out, categories, info)
        io.remove(io.join(out, PANOPTIC_PARTS_DIR), recursive=True)
        res = {"written": True, "layout": "file", "uri": uri, "images": images}
    else:
        got = write_panoptic_json_parts(out, categories, max_images, info)
        io.remove(io.join(out, PANOPTIC_JSON))
        res = {"written": True, "layout": "parts", "uri": target, **got}
    header["panoptic_json"] = {"pieces": pieces, "images": images, "layout": layout}
    return res
