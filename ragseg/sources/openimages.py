"""Open Images V7 source. ``cfg.uri`` is the folder holding the CSVs; each file has a config field
that overrides its default location (the first existing of the names below, ``<split>`` =
``cfg.split``)::

    class_descriptions  oidv7-class-descriptions.csv | oidv7-class-descriptions-boxable.csv |
                        class-descriptions-boxable.csv            LabelName,DisplayName (header optional)
    image_labels        oidv7-<split>-annotations-human-imagelabels.csv |
                        <split>-annotations-human-imagelabels(-boxable).csv
                                                                  ImageID,Source,LabelName,Confidence
    boxes               oidv7-<split>-annotations-bbox.csv | oidv6-<split>-annotations-bbox.csv |
                        <split>-annotations-bbox.csv              ImageID,Source,LabelName,Confidence,XMin,...
    segmentations       <split>-annotations-object-segmentation.csv |
                        oidv7-<split>-annotations-object-segmentation.csv
                                                                  MaskPath,ImageID,LabelName,BoxID,...
    masks_dir           masks/<split>/ | <split>-masks/           mask PNGs, found by MaskPath (also in
                                                                  sub-folders such as train-masks-0/)
    image_list          none by default                           ImageID [+ a path/URL column], or
                                                                  one ImageID a line without a header

Images: with ``cfg.image_list``, its rows are the images (and only those: the way to restrict a job to
the images of a partial download) and the URI is taken from its first ``path``/``uri``/``url``/
``OriginalURL`` column (relative values are resolved against the CSV's folder); without such a column,
or without an image list (then the images are those named in the annotation CSVs), an image lives at
``<images folder>/<ImageID>.jpg``. The images folder is ``cfg.images_dir`` when set (any fsspec URI, e.g.
the public bucket ``s3://open-images-dataset/<split>/`` with ``storage_options: {anon: true}``), trusted
as it is: an image missing there becomes a ``decode`` error row. Else it is the first of
``<uri>/images/<split>/`` and ``<uri>/<split>/`` (the official downloader's layout) whose contents
(:func:`count_present`: one scan of a local folder, one listing page of an object store) include an
annotated image; when none does, listing stops with a :class:`~ragseg.errors.UserError` naming the
folders before any pipeline starts. When fewer than half of the expected images are in the folder (full
split CSVs, some images downloaded: the usual case), one warning says so up front, with the counts.

``labels`` = display names of the human-verified positive image-level labels (Confidence 1) and of the
boxes' labels. Ground truth is ``instance_masks``: one segment per segmentation row (``isthing``
true: Open Images masks are thing-centric), ``mask_uri`` the mask PNG (resized to the image when the
sizes differ, see :mod:`ragseg.sources.gt`). A malformed CSV line, an unknown MID or a missing mask
PNG is reported in ``errors`` and only that line is skipped.
"""

from __future__ import annotations

import bisect
import csv
import logging
import os
import posixpath
from collections.abc import Iterator

import fsspec

from ragseg.config import SourceConfig
from ragseg.errors import UserError
from ragseg.io import exists, fs_and_path, join, protocol_of_fs, storage_options
from ragseg.sources import add_error, first_existing, list_names, make_row, require, select

log = logging.getLogger(__name__)

URI_COLUMNS = ("path", "uri", "url", "imagepath", "filepath", "file_name", "originalurl")
LONG = {"val": "validation"}
LISTING_PAGE = 1000  # keys of the one object-store listing page that the images folder is judged by
IMAGE_EXT = ".jpg"


def _split_names(split: str) -> list[str]:
    names = [split]
    if split in LONG:
        names.append(LONG[split])
    if split == "validation":
        names.append("val")
    return names


def _rows(uri: str, errors: list[dict] | None, required: tuple[str, ...],
          header_optional: bool = False) -> Iterator[tuple[int, dict[str, str]]]:
    """Stream a CSV as dicts; lines with the wrong number of cells are reported and skipped."""
    try:
        f = fsspec.open(uri, "rt", encoding="utf-8", newline="", **storage_options(uri)).open()
    except FileNotFoundError:
        raise UserError(f"Open Images file not found: {uri}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        if header_optional and header and required[0] not in header:
            # headerless file (e.g. class-descriptions-boxable.csv, a list of ImageIDs): the first
            # line is data
            yield 1, dict(zip(required, header))
            header = list(required)
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(f"{uri}: missing columns {missing} (has {header})")
        id_col = header.index("ImageID") if "ImageID" in header else None
        for n, cells in enumerate(reader, start=2):
            if not cells:
                continue
            if len(cells) != len(header):
                image_id = cells[id_col] if id_col is not None and id_col < len(cells) else ""
                add_error(errors, f"{uri}:{n}", image_id,
                          f"bad CSV line {n} of {uri}: {len(cells)} cells, expected {len(header)}")
                continue
            yield n, dict(zip(header, cells))


def _bad_id(image_id: str) -> bool:
    return not image_id or "/" in image_id or "\\" in image_id or ".." in image_id


def _pick(root: str, explicit: str | None, names: list[str], what: str, required: bool = False) -> str | None:
    """The configured file (which must exist), else the first of ``names`` under ``root`` that exists."""
    if explicit:
        return require(explicit, what)
    found = first_existing([join(root, n) for n in names])
    if found is None and required:
        raise UserError(f"{what} not found under {root} (tried {names})")
    return found


def _csv_locations(cfg: SourceConfig, root: str, splits: list[str]) -> tuple[str, str | None, str | None, str | None]:
    """The class descriptions, image labels, boxes and segmentations CSVs (the last three may be None)."""
    desc_uri = _pick(root, cfg.class_descriptions, [
        "oidv7-class-descriptions.csv", "oidv7-class-descriptions-boxable.csv",
        "class-descriptions-boxable.csv", "class-descriptions.csv"],
        "Open Images class descriptions", required=True)
    labels_uri = _pick(root, cfg.image_labels, [n for s in splits for n in (
        f"oidv7-{s}-annotations-human-imagelabels.csv", f"{s}-annotations-human-imagelabels-boxable.csv",
        f"{s}-annotations-human-imagelabels.csv")], "Open Images image labels")
    boxes_uri = _pick(root, cfg.boxes, [n for s in splits for n in (
        f"oidv7-{s}-annotations-bbox.csv", f"oidv6-{s}-annotations-bbox.csv", f"{s}-annotations-bbox.csv")],
        "Open Images boxes")
    segs_uri = _pick(root, cfg.segmentations, [n for s in splits for n in (
        f"{s}-annotations-object-segmentation.csv", f"oidv7-{s}-annotations-object-segmentation.csv")],
        "Open Images segmentations")
    if cfg.image_list:
        require(cfg.image_list, "Open Images image list")
    if not (labels_uri or boxes_uri or segs_uri or cfg.image_list):
        raise UserError(f"no Open Images annotation CSV for split {cfg.split!r} under {root}")
    assert desc_uri is not None
    return desc_uri, labels_uri, boxes_uri, segs_uri


def _class_names(desc_uri: str, errors: list[dict] | None) -> dict[str, str]:
    """MID -> display name from the class descriptions CSV."""
    names: dict[str, str] = {}
    for n, rec in _rows(desc_uri, errors, ("LabelName", "DisplayName"), header_optional=True):
        if not rec["LabelName"].strip() or not rec["DisplayName"].strip():
            add_error(errors, f"{desc_uri}:{n}", "", f"bad CSV line {n} of {desc_uri}: empty MID or name")
            continue
        names[rec["LabelName"].strip()] = rec["DisplayName"].strip()
    return names


def _checked_id(uri: str, n: int, rec: dict[str, str], names: dict[str, str], errors: list[dict] | None) -> str | None:
    """The annotation line's ImageID, or None (reported) when the id is unusable or the MID unknown."""
    image_id = rec["ImageID"].strip()
    if _bad_id(image_id):
        add_error(errors, f"{uri}:{n}", image_id, f"bad CSV line {n} of {uri}: unusable ImageID {image_id!r}")
        return None
    if rec["LabelName"].strip() not in names:
        add_error(errors, f"{uri}:{n}", image_id, f"bad CSV line {n} of {uri}: unknown MID {rec['LabelName']!r}")
        return None
    return image_id


def _image_labels(labels_uri: str | None, boxes_uri: str | None, names: dict[str, str],
                  errors: list[dict] | None) -> tuple[dict[str, set[str]], set[str]]:
    """Positive label names per image from the image-label and box CSVs, and every image they mention."""
    labels: dict[str, set[str]] = {}
    mentioned: set[str] = set()
    for uri, cols in ((labels_uri, ("ImageID", "LabelName", "Confidence")),
                      (boxes_uri, ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax"))):
        if not uri:
            continue
        for n, rec in _rows(uri, errors, cols):
            image_id = _checked_id(uri, n, rec, names, errors)
            if image_id is None:
                continue
            try:
                conf = float(rec.get("Confidence", "1") or "1")
                if uri == boxes_uri:
                    [float(rec[k]) for k in ("XMin", "XMax", "YMin", "YMax")]
            except ValueError as e:
                add_error(errors, f"{uri}:{n}", image_id, f"bad CSV line {n} of {uri}: {e}")
                continue
            mentioned.add(image_id)
            if conf >= 1.0:
                labels.setdefault(image_id, set()).add(names[rec["LabelName"].strip()])
    return labels, mentioned


def _segments(cfg: SourceConfig, root: str, splits: list[str], segs_uri: str, names: dict[str, str],
              errors: list[dict] | None) -> tuple[dict[str, list[dict]], set[str]]:
    """Ground-truth segments per image from the segmentations CSV (mask PNGs checked against the masks
    folder's listing), and every image it mentions."""
    segs: dict[str, list[dict]] = {}
    mentioned: set[str] = set()
    masks_dir = cfg.masks_dir or first_existing([join(root, "masks", s) for s in splits]
                                                + [join(root, f"{s}-masks") for s in splits]) \
        or join(root, "masks", cfg.split)
    listed = list_names(masks_dir)
    by_base = None if listed is None else {posixpath.basename(p): p for p in listed}
    for n, rec in _rows(segs_uri, errors, ("MaskPath", "ImageID", "LabelName")):
        image_id = _checked_id(segs_uri, n, rec, names, errors)
        if image_id is None:
            continue
        mentioned.add(image_id)
        mask_rel = rec["MaskPath"].strip()
        if not mask_rel or mask_rel.startswith("/") or ".." in mask_rel.split("/"):
            add_error(errors, f"{segs_uri}:{n}", image_id, f"bad CSV line {n} of {segs_uri}: MaskPath {mask_rel!r}")
            continue
        if by_base is not None:
            if mask_rel not in listed and posixpath.basename(mask_rel) not in by_base:
                add_error(errors, join(masks_dir, mask_rel), image_id,
                          f"mask PNG not found: {join(masks_dir, mask_rel)} ({segs_uri} line {n})")
                continue
            mask_rel = mask_rel if mask_rel in listed else by_base[posixpath.basename(mask_rel)]
        lst = segs.setdefault(image_id, [])
        lst.append({"id": len(lst) + 1, "label": names[rec["LabelName"].strip()], "isthing": True,
                    "iscrowd": False, "mask_uri": join(masks_dir, mask_rel)})
    return segs, mentioned


def _image_list(image_list: str, errors: list[dict] | None) -> tuple[dict[str, str], list[str]]:
    """The image list's images: ImageID -> URI for those with a path column value, and the ids without one."""
    uris: dict[str, str] = {}
    in_folder: list[str] = []
    list_dir = image_list.rsplit("/", 1)[0] if "/" in image_list else "."
    col = None
    for n, rec in _rows(image_list, errors, ("ImageID",), header_optional=True):
        if col is None:
            lower = {k.lower(): k for k in rec}
            col = next((lower[c] for c in URI_COLUMNS if c in lower), "")
        image_id = rec["ImageID"].strip()
        if _bad_id(image_id):
            add_error(errors, f"{image_list}:{n}", image_id, f"bad CSV line {n}: unusable ImageID {image_id!r}")
            continue
        value = rec.get(col, "").strip() if col else ""
        if not value:
            in_folder.append(image_id)
        elif "://" in value or value.startswith("/"):
            uris[image_id] = value
        else:
            uris[image_id] = join(list_dir, value)
    return uris, in_folder


def _image_uris(cfg: SourceConfig, root: str, splits: list[str], mentioned: set[str],
                errors: list[dict] | None) -> dict[str, str]:
    """ImageID -> image URI: the image list's images, else every annotated image, in the images folder
    unless the list gives a path."""
    uris: dict[str, str] = {}
    in_folder: list[str] = []  # ids whose image is <images folder>/<ImageID>.jpg
    if cfg.image_list:
        uris, in_folder = _image_list(cfg.image_list, errors)
    else:
        in_folder = sorted(mentioned)
    if in_folder:
        images_dir = images_folder(cfg, root, splits, sorted(in_folder))
        uris.update({i: join(images_dir, i + IMAGE_EXT) for i in in_folder})
    return uris


def list_rows(cfg: SourceConfig, errors: list[dict] | None = None) -> list[dict]:
    root = join(cfg.uri)
    splits = _split_names(cfg.split)
    desc_uri, labels_uri, boxes_uri, segs_uri = _csv_locations(cfg, root, splits)
    names = _class_names(desc_uri, errors)
    labels, mentioned = _image_labels(labels_uri, boxes_uri, names, errors)
    segs: dict[str, list[dict]] = {}
    if segs_uri:
        segs, seg_mentioned = _segments(cfg, root, splits, segs_uri, names, errors)
        mentioned |= seg_mentioned
    uris = _image_uris(cfg, root, splits, mentioned, errors)
    rows = []
    for image_id, uri in uris.items():
        s = segs.get(image_id, [])
        rows.append(make_row(image_id, uri, "openimages", sorted(labels.get(image_id, ())),
                             "instance_masks" if s else "", "", s, file_name=uri.rsplit("/", 1)[-1]))
    return select(rows, cfg)


def count_present(folder: str, ids: list[str]) -> tuple[int, bool]:
    """How many of ``ids`` (sorted ImageIDs) have their ``<ImageID>.jpg`` directly in ``folder``, judged by
    what the folder contains; returns (count, exact).

    A local folder is scanned once (exact). An S3 folder is judged by one listing page
    (:data:`LISTING_PAGE` keys, in key order): exact when the folder holds no more; otherwise the
    fraction present among the ids that sort up to the page's last key, times all ids (ImageIDs are
    random hex, so a page is a uniform sample of them). Other stores: one listing (exact). A folder that
    does not exist holds nothing."""
    fs, path = fs_and_path(folder)
    path = path.rstrip("/")
    proto = protocol_of_fs(fs)

    def stems(names) -> list[str]:
        return [n[: -len(IMAGE_EXT)] for n in names if n.endswith(IMAGE_EXT)]

    if proto == "file":
        if not os.path.isdir(path):
            return 0, True
        ids_set = set(ids)
        with os.scandir(path) as it:
            return sum(1 for e in it if e.name.endswith(IMAGE_EXT) and e.name[: -len(IMAGE_EXT)] in ids_set), True
    if proto in ("s3", "s3a"):
        bucket, key, _ = fs.split_path(path)
        prefix = f"{key}/" if key else ""
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=LISTING_PAGE,
                          **fs.req_kw)
        names = [c["Key"][len(prefix):] for c in page.get("Contents", [])]
        found = stems(names)
        wanted = set(ids)
        hits = sum(1 for f in found if f in wanted)
        if not page.get("IsTruncated") or not names:
            return hits, True
        last = names[-1][: -len(IMAGE_EXT)] if names[-1].endswith(IMAGE_EXT) else names[-1]
        upto = bisect.bisect_right(ids, last)  # ids that sort up to the page's last key
        return (round(hits / upto * len(ids)) if upto else hits), False
    try:
        names = [posixpath.basename(str(p).rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return 0, True
    wanted = set(ids)
    return sum(1 for f in stems(names) if f in wanted), True


def _human(n: int) -> str:
    for div, unit in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= div:
            return f"{n / div:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _warn_if_mostly_missing(cfg: SourceConfig, folder: str, present: int, exact: bool, total: int) -> None:
    """One warning up front when fewer than half of the expected images are in the folder: their rows
    would all become decode error rows."""
    if present * 2 >= total:
        return
    how = "" if exact else "about "
    est = "" if exact else f" (estimated from one listing page of {LISTING_PAGE} keys)"
    hint = ("restrict source.image_list to the images you have" if cfg.image_list else
            "use `source.image_list` (a file of ImageIDs) to restrict the job to the images you have")
    log.warning("Open Images: %s%s of %s annotated images present in %s%s; rows for the others go to the errors "
                "table; %s", how, _human(present), _human(total), folder, est, hint)


def images_folder(cfg: SourceConfig, root: str, splits: list[str], ids: list[str]) -> str:
    """The folder holding ``<ImageID>.jpg`` for the sorted ImageIDs ``ids``: ``cfg.images_dir`` as it is,
    else the first of ``<root>/images/<split>`` and ``<root>/<split>`` whose contents include one of
    ``ids`` (:func:`count_present`); UserError naming the folders when none does. Warns once when most
    of ``ids`` are missing from the folder."""

    def unreadable(folder: str, e: Exception) -> UserError:
        return UserError(f"Open Images image folder {folder} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})")

    if cfg.images_dir:
        folder = cfg.images_dir
        try:
            present, exact = count_present(folder, ids)
        except Exception as e:  # noqa: BLE001 - a store that cannot list: can it read at all?
            try:
                exists(join(folder, ids[0] + IMAGE_EXT))
            except Exception:  # noqa: BLE001 - unreachable store, denied access: say so once
                raise unreadable(folder, e) from None
            log.warning("Open Images: cannot list %s (%s); the images there are not counted", folder,
                        type(e).__name__)
            return folder
        _warn_if_mostly_missing(cfg, folder, present, exact, len(ids))
        return folder
    candidates = [join(root, "images", s) for s in splits] + [join(root, s) for s in splits]
    for folder in candidates:
        try:
            present, exact = count_present(folder, ids)
        except Exception as e:  # noqa: BLE001
            raise unreadable(folder, e) from None
        if present:
            _warn_if_mostly_missing(cfg, folder, present, exact, len(ids))
            return folder
    shown = ", ".join(i + IMAGE_EXT for i in ids[:3])
    raise UserError(f"no Open Images image found in {' or '.join(candidates)} (none of the {_human(len(ids))} "
                    f"annotated ImageIDs of split {cfg.split!r} is there as <ImageID>.jpg, e.g. {shown}); "
                    "set source.images_dir to the folder that holds <ImageID>.jpg")
