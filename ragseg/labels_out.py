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
OUT/panoptic.json              all parts as one COCO panoptic JSON (optional, label.panoptic_json)
```

:func:`iter_images` walks the committed parts a bulk read at a time, so a reader (``ragseg eval``, a
user's script) never needs the merged JSON. :func:`write_panoptic_json` streams the parts into one
JSON file with memory bounded by one bulk read of parts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

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
    first = pc.list_element(t.column("image_ids"), 0)
    order = pc.sort_indices(first)
    parts = t.column("parts_path").take(order).to_pylist()
    return [p for p in parts if p]


def iter_images(out: str) -> Iterator[dict[str, Any]]:
    """Every labelled image of ``out`` as ``{"image_id", "id", "file_name", "png_name", "uri", "height",
    "width", "segments_info"}``, :data:`PARTS_PER_READ` parts at a time (one bulk read each). Parts written before
    ids were kept (format-1 folders) are read as if ``id`` were ``image_id``."""
    led = open_labels(out)
    if led is None:
        raise FileNotFoundError(f"{out} is not a ragseg label output (no {ledger.MANIFEST})")
    parts = [io.join(out, rel) for rel in _ordered_parts(led)]
    for i in range(0, len(parts), PARTS_PER_READ):
        got = ledger._cat(parts[i : i + PARTS_PER_READ])  # one bulk read, not a serial GET per part
        for uri in parts[i : i + PARTS_PER_READ]:
            data = got[uri]
            if isinstance(data, Exception):
                raise FileNotFoundError(f"committed part {uri} is unreadable ({type(data).__name__}: {data})")
            for a in sorted(_parse_part(uri, data), key=lambda a: str(a["image_id"])):
                if "png_name" not in a:  # format-1 part: file_name was the PNG
                    a = {**a, "id": a["image_id"], "png_name": a["file_name"],
                         "file_name": a["uri"].rsplit("/", 1)[-1]}
                yield a


def prediction(out: str) -> dict[str, Any]:
    """A COCO panoptic prediction dict (``annotations``, ``categories``) read from the parts, for
    evaluation; ``file_name`` of each annotation is its PNG under ``out/panoptic``."""
    led = open_labels(out)
    if led is None:
        raise FileNotFoundError(f"{out} is not a ragseg label output")
    anns = [{"image_id": a["id"], "file_name": a["png_name"], "segments_info": a["segments_info"]}
            for a in iter_images(out)]
    return {"annotations": anns, "categories": led.header.get("vocab", [])}


def write_panoptic_json(out: str, categories: list[dict], info: dict[str, Any] | None = None) -> str:
    """Stream every committed part into ``out/panoptic.json`` (COCO panoptic: ``images``,
    ``annotations``, ``categories``). Images go to the output file as they are read and annotations
    to a spill file that is appended after them, so memory holds one bulk read of parts. The file is
    written locally and moved/uploaded into place whole. ``info`` is merged into the COCO ``info``
    (ragseg's label runs put their ``provenance`` there)."""
    tmpdir = tempfile.mkdtemp(prefix="ragseg-panoptic-")
    try:
        main_p, spill_p = os.path.join(tmpdir, "panoptic.json"), os.path.join(tmpdir, "annotations.json")
        with open(main_p, "w") as f, open(spill_p, "w") as spill:
            head = {"description": "ragseg pseudo-labels", **(info or {})}
            f.write('{"info": ' + json.dumps(head, sort_keys=True, default=str) + ', "images": [')
            first = True
            for a in iter_images(out):
                img = {"id": a["id"], "file_name": a["file_name"], "uri": a["uri"],
                       "height": a["height"], "width": a["width"]}
                ann = {"image_id": a["id"], "file_name": a["png_name"], "segments_info": a["segments_info"]}
                sep = "" if first else ", "
                f.write(sep + json.dumps(img, sort_keys=True))
                spill.write(sep + json.dumps(ann, sort_keys=True))
                first = False
            f.write('], "annotations": [')
        with open(main_p, "a") as f, open(spill_p) as spill:
            shutil.copyfileobj(spill, f, 1 << 20)
            f.write('], "categories": ' + json.dumps(categories, sort_keys=True) + "}\n")
        uri = io.join(out, PANOPTIC_JSON)
        io.put_file_atomic(main_p, uri)
        return uri
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def maybe_write_panoptic_json(out: str, header: dict[str, Any], categories: list[dict], mode: str,
                              max_images: int, changed: bool, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``panoptic.json`` per ``label.panoptic_json`` (always | never | auto: when the output
    holds at most ``max_images`` images), unless it is already current (nothing new committed since
    it was written). Returns what was done, for the run summary."""
    images = int(header.get("totals", {}).get("images", 0))
    pieces = int(header.get("totals", {}).get("pieces", 0))
    if mode == "never" or (mode == "auto" and images > max_images):
        return {"written": False, "reason": f"label.panoptic_json={mode}, {images} images "
                f"(max {max_images}); read the parts with ragseg.labels_out.iter_images"}
    done = header.get("panoptic_json") or {}
    if not changed and done.get("pieces") == pieces and io.exists(io.join(out, PANOPTIC_JSON)):
        return {"written": False, "reason": "up to date"}
    uri = write_panoptic_json(out, categories, info)
    header["panoptic_json"] = {"pieces": pieces, "images": images}
    return {"written": True, "uri": uri, "images": images}
