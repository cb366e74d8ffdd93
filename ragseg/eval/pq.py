"""Panoptic quality (PQ = SQ x RQ) with the semantics of the COCO panoptic reference evaluation
(``panopticapi.evaluation.pq_compute``).

Per image (:func:`pq_stats_image`, pure numpy, no files):

- a gt segment and a pred segment *match* when they have the same category and IoU > 0.5 (0.5 exactly
  is not a match), where ``union = pred_area + gt_area - intersection - pred∩void``: the void pixels
  (id 0) of the ground truth are taken out of the predicted segment. Crowd gt segments never match.
- an unmatched, non-crowd gt segment is a false negative; unmatched crowd gt segments are ignored.
- an unmatched pred segment is a false positive unless more than half of its pixels lie on gt void or
  on crowd gt segments of its own category.
- a pred segment id present in the PNG but not in ``segments_info`` (or the reverse), or a pred
  category id that is not among the categories, is an error (:class:`PanopticFormatError`).

Over the data set (:func:`evaluate`): per class ``PQ = sum IoU / (TP + FP/2 + FN/2)``,
``SQ = sum IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``; All / Things / Stuff are unweighted means over
the classes that occur (``TP + FP + FN > 0``) — classes absent on both sides are left out of the means.
Values are percentages (0..100).

Differences from the reference, all on inputs it would crash on or where it is ambiguous:

- a gt image without a prediction is an error naming the images (the reference stops on the first);
  with ``allow_missing`` its non-crowd gt segments all count as false negatives and its id is listed
  in ``missing_predictions``;
- a gt segment without an ``area`` in the JSON uses its PNG pixel count (the reference would fail);
- image ids are compared as strings (``139`` and ``"139"`` are the same image).

As the reference: predicted areas are the PNG's pixel counts, gt areas the JSON's ``area`` (a gt
``area`` that disagrees with its PNG is reported in ``warnings``), and for the FP rule an image keeps one
crowd segment per category, the last one listed.

Category ids are authoritative, as in the reference: a prediction's segments are scored with their
``category_id`` as it is, and the prediction's own ``categories`` list (if any) is not consulted, except
that a name it gives to a ground-truth id that disagrees with the ground truth's name for that id is
reported in ``warnings`` (one line). A ``category_id`` that is not a ground-truth id is an error, as in
the reference. ``match_categories_by_name=True`` (``ragseg eval --match-categories-by-name``) instead maps
the prediction's category ids onto the ground truth's by class name (case-insensitive): the fix for a
prediction numbered its own way (a vocabulary CSV without ids); a predicted class name unknown to the gt
is then an error.

``warnings`` holds one line per kind of finding (names that disagree, category re-mapping, gt areas that
disagree with the PNGs); ``ragseg eval`` prints them.
"""

from __future__ import annotations

import io as _io
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from ragseg import io as rio
from ragseg.errors import UserError
from ragseg.masks import rgb_to_id

OFFSET = 256 * 256 * 256
VOID = 0


class PanopticFormatError(UserError):
    """A prediction (or ground truth) that breaks the COCO panoptic format."""


@dataclass
class PQStatCat:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQStatCat) -> Self:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


@dataclass
class PQStat:
    """Per-category accumulators; add the stats of several images with ``+=``."""

    per_cat: dict[int, PQStatCat] = field(default_factory=lambda: defaultdict(PQStatCat))

    def __getitem__(self, cat_id: int) -> PQStatCat:
        return self.per_cat[int(cat_id)]

    def __iadd__(self, other: PQStat) -> Self:
        for cat, st in other.per_cat.items():
            self.per_cat[cat] += st
        return self

    def __add__(self, other: PQStat) -> PQStat:
        out = PQStat()
        out += self
        out += other
        return out

    def class_metrics(self, cat_id: int) -> dict[str, Any]:
        """PQ/SQ/RQ (0..100) and counts of one class; ``present`` is False when TP+FP+FN == 0."""
        st = self.per_cat.get(int(cat_id), PQStatCat())
        denom = st.tp + 0.5 * st.fp + 0.5 * st.fn
        present = (st.tp + st.fp + st.fn) > 0
        pq = st.iou / denom if present else 0.0
        sq = st.iou / st.tp if st.tp else 0.0
        rq = st.tp / denom if present else 0.0
        return {"pq": 100.0 * pq, "sq": 100.0 * sq, "rq": 100.0 * rq,
                "tp": st.tp, "fp": st.fp, "fn": st.fn, "present": present}

    def average(self, categories: Mapping[int, Mapping], isthing: bool | None = None) -> dict[str, Any]:
        """Unweighted mean over the classes that occur; ``isthing`` None = all, True = things,
        False = stuff. ``n`` = number of classes in the mean (0 -> all metrics 0)."""
        pq = sq = rq = 0.0
        n = 0
        for cat_id, info in categories.items():
            if isthing is not None and bool(info.get("isthing", 0)) != isthing:
                continue
            m = self.class_metrics(cat_id)
            if not m["present"]:
                continue
            n += 1
            pq += m["pq"]
            sq += m["sq"]
            rq += m["rq"]
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}


def _cat_ids(categories: Any) -> set[int]:
    if isinstance(categories, Mapping):
        return {int(k) for k in categories}
    out = set()
    for c in categories:
        out.add(int(c["id"]) if isinstance(c, Mapping) else int(c))
    return out


def pq_stats_image(
    gt_ids: np.ndarray,
    gt_segs: Iterable[Mapping],
    pred_ids: np.ndarray,
    pred_segs: Iterable[Mapping],
    categories: Any,
    image_id: Any = "",
) -> PQStat:
    """PQ accumulators of one image.

    ``gt_ids`` / ``pred_ids``: HxW integer segment-id maps (0 = void). ``gt_segs`` / ``pred_segs``:
    COCO ``segments_info`` lists (``id``, ``category_id``, gt also ``iscrowd``). ``categories``: the
    valid category ids (a dict keyed by id, a list of category dicts, or a list of ids).
    """
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise PanopticFormatError(
            f"image {image_id}: prediction is {pred_ids.shape[:2]} but ground truth is {gt_ids.shape[:2]}")
    gt_segms = {int(s["id"]): s for s in gt_segs}
    pred_segms = {int(s["id"]): s for s in pred_segs}
    pred_area = _pred_areas(pred_ids, pred_segms, _cat_ids(categories), image_id)
    gt_pred, gt_area = _intersections(gt_ids, pred_ids, gt_segms)
    stat = PQStat()
    gt_matched, pred_matched = _count_matches(stat, gt_pred, gt_segms, pred_segms, gt_area, pred_area)
    _count_unmatched(stat, gt_pred, gt_segms, pred_segms, pred_area, gt_matched, pred_matched)
    return stat


def _pred_areas(pred_ids: np.ndarray, pred_segms: dict[int, Mapping], valid, image_id) -> dict[int, int]:
    """Predicted segment areas (PNG pixel counts), with the reference's sanity checks: every PNG id is in
    ``segments_info`` with a valid category, and every ``segments_info`` id is drawn."""
    pred_area: dict[int, int] = {}
    labels, counts = np.unique(pred_ids, return_counts=True)
    for lab, cnt in zip(labels.tolist(), counts.tolist()):
        if lab == VOID:
            continue
        if lab not in pred_segms:
            raise PanopticFormatError(
                f"image {image_id}: segment id {lab} is in the prediction PNG but not in its segments_info")
        cat = int(pred_segms[lab]["category_id"])
        if cat not in valid:
            raise PanopticFormatError(f"image {image_id}: segment id {lab} has unknown category_id {cat}")
        pred_area[lab] = int(cnt)
    not_drawn = sorted(set(pred_segms) - set(pred_area))
    if not_drawn:
        raise PanopticFormatError(
            f"image {image_id}: segment ids {not_drawn} are in segments_info but not in the prediction PNG")
    return pred_area


def _intersections(gt_ids: np.ndarray, pred_ids: np.ndarray, gt_segms: dict[int, Mapping]
                   ) -> tuple[dict[tuple[int, int], int], dict[int, int]]:
    """(pixels of every (gt id, pred id) pair, gt areas): the JSON's ``area`` where given (as the
    reference), else the PNG's pixel count."""
    combo = gt_ids.astype(np.uint64) * np.uint64(OFFSET) + pred_ids.astype(np.uint64)
    labels, counts = np.unique(combo, return_counts=True)
    gt_pred: dict[tuple[int, int], int] = {}
    gt_area: dict[int, int] = defaultdict(int)
    for lab, cnt in zip(labels.tolist(), counts.tolist()):
        g, p = divmod(int(lab), OFFSET)
        gt_pred[(g, p)] = int(cnt)
        gt_area[g] += int(cnt)
    for g, gs in gt_segms.items():  # the reference's union uses the JSON's gt area
        if gs.get("area") is not None:
            gt_area[g] = int(gs["area"])
    return gt_pred, gt_area


def _count_matches(stat: PQStat, gt_pred: dict, gt_segms: dict, pred_segms: dict, gt_area: dict,
                   pred_area: dict) -> tuple[set[int], set[int]]:
    """True positives: same category, not crowd, IoU > 0.5 with the gt void taken out of the union."""
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (g, p), inter in gt_pred.items():
        if g not in gt_segms or p not in pred_segms:
            continue
        gs, ps = gt_segms[g], pred_segms[p]
        if int(gs.get("iscrowd", 0)) == 1:
            continue
        if int(gs["category_id"]) != int(ps["category_id"]):
            continue
        union = pred_area[p] + gt_area[g] - inter - gt_pred.get((VOID, p), 0)
        iou = inter / union
        if iou > 0.5:
            st = stat[int(gs["category_id"])]
            st.tp += 1
            st.iou += iou
            gt_matched.add(g)
            pred_matched.add(p)
    return gt_matched, pred_matched


def _count_unmatched(stat: PQStat, gt_pred: dict, gt_segms: dict, pred_segms: dict, pred_area: dict,
                     gt_matched: set[int], pred_matched: set[int]) -> None:
    """False negatives (unmatched non-crowd gt) and false positives (unmatched pred not mostly on gt
    void or on the crowd segment its category keeps: the last one listed, as the reference)."""
    crowd_by_cat: dict[int, int] = {}
    for g, gs in gt_segms.items():
        if g in gt_matched:
            continue
        if int(gs.get("iscrowd", 0)) == 1:
            crowd_by_cat[int(gs["category_id"])] = g
            continue
        stat[int(gs["category_id"])].fn += 1
    for p, ps in pred_segms.items():
        if p in pred_matched:
            continue
        cat = int(ps["category_id"])
        ignored = gt_pred.get((VOID, p), 0)
        if cat in crowd_by_cat:
            ignored += gt_pred.get((crowd_by_cat[cat], p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        stat[cat].fp += 1


def _fn_only(gt_segs: Iterable[Mapping]) -> PQStat:
    stat = PQStat()
    for s in gt_segs:
        if int(s.get("iscrowd", 0)) != 1:
            stat[int(s["category_id"])].fn += 1
    return stat


def read_id_png(uri: str) -> np.ndarray:
    """A COCO panoptic PNG (any fsspec URI) -> HxW uint32 segment ids."""
    from PIL import Image

    with Image.open(_io.BytesIO(rio.read_bytes(uri))) as img:
        if img.mode in ("P", "PA", "L", "LA", "1"):
            img = img.convert("RGB")
        arr = np.array(img)
    if arr.ndim == 3:
        return rgb_to_id(arr[..., :3])
    return arr.astype(np.uint32)  # 16/32-bit single-channel id maps


def _norm_name(name: Any) -> str:
    return " ".join(str(name).lower().split())


def _category_remap(gt_cats: Mapping[int, Mapping], pred_cats: list[Mapping] | None) -> dict[int, int]:
    """pred category id -> gt category id by class name; {} when the numbering already agrees."""
    if not pred_cats:
        return {}
    by_name = {_norm_name(c.get("name", "")): cid for cid, c in gt_cats.items()}
    remap: dict[int, int] = {}
    unknown = []
    for c in pred_cats:
        pid = int(c["id"])
        gid = by_name.get(_norm_name(c.get("name", "")))
        if gid is None:
            unknown.append(pid)
            remap[pid] = -1 - pid  # never a valid id: an error if a segment uses it
        else:
            remap[pid] = gid
    if all(k == v for k, v in remap.items()) and not unknown:
        return {}
    return remap


def _name_disagreements(gt_cats: Mapping[int, Mapping], pred_cats: list[Mapping] | None) -> list[tuple[int, str, str]]:
    """(id, prediction's name, ground truth's name) for each ground-truth id the prediction's
    ``categories`` name differently (case and spacing ignored)."""
    out = []
    for c in pred_cats or []:
        cid = int(c["id"])
        if cid in gt_cats and "name" in c:
            pred_name, gt_name = str(c.get("name", "")), str(gt_cats[cid].get("name", ""))
            if _norm_name(pred_name) != _norm_name(gt_name):
                out.append((cid, pred_name, gt_name))
    return sorted(out)


def _names_warning(diff: list[tuple[int, str, str]]) -> str:
    shown = ", ".join(f"id {i} is {p!r} in the prediction but {g!r} in the ground truth" for i, p, g in diff[:5])
    more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
    return (f"the prediction's categories name {len(diff)} ground-truth id(s) differently ({shown}{more}); "
            "ids are used as they are (COCO panoptic semantics), not re-mapped; if the prediction numbers its "
            "categories its own way, rerun with --match-categories-by-name")


def _load_categories(gt: Mapping) -> dict[int, dict]:
    cats = gt.get("categories")
    if not cats:
        raise PanopticFormatError("ground-truth JSON has no categories")
    return {int(c["id"]): dict(c) for c in cats}


def _png_stem(ann: Mapping) -> str:
    return str(ann.get("file_name", "")).rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _by_image(annotations: Iterable[Mapping], what: str) -> dict[str, Mapping]:
    out: dict[str, Mapping] = {}
    for ann in annotations:
        key = str(ann["image_id"])
        if key in out:
            raise PanopticFormatError(f"{what} JSON has two annotations for image {key}")
        out[key] = ann
    return out


def _remap_warning(remap: dict[int, int], pred_names: Mapping[int, str], gt_cats: Mapping[int, Mapping]) -> str:
    changed = sorted((p, g) for p, g in remap.items() if g >= 0 and p != g)
    if not changed:
        return ""
    shown = ", ".join(f"{p}->{g} {gt_cats[g].get('name', '')!r}" for p, g in changed[:5])
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    return (f"prediction category ids differ from the ground truth's: {len(changed)} mapped by class name "
            f"({shown}{more})")


def _area_warning(mismatches: list[tuple[str, int, int, int]]) -> str:
    key, sid, js, px = mismatches[0]
    return (f"{len(mismatches)} ground-truth segment area(s) in the JSON disagree with the PNG "
            f"(first: image {key} segment {sid}: JSON {js}, PNG {px}); PQ uses the JSON areas, as panopticapi")


def _gt_area_mismatches(key: str, gt_ids: np.ndarray, gt_segs: Iterable[Mapping]) -> list[tuple[str, int, int, int]]:
    ids, counts = np.unique(gt_ids, return_counts=True)
    area = dict(zip(ids.tolist(), counts.tolist()))
    out = []
    for s in gt_segs:
        if "area" in s and s["area"] is not None and int(s["area"]) != area.get(int(s["id"]), 0):
            out.append((key, int(s["id"]), int(s["area"]), int(area.get(int(s["id"]), 0))))
    return out


def _load_prediction(pred_json: str, pred_dir: str | None) -> tuple[Mapping, str]:
    """The prediction JSON (or a ``ragseg label`` output folder's parts) and its PNG folder."""
    from ragseg import labels_out

    if labels_out.is_label_output(pred_json):
        pred = labels_out.prediction(pred_json)
        pred_dir = pred_dir or rio.join(pred_json, "panoptic")
    else:
        pred = rio.read_json(pred_json)
    if pred_dir is None:
        raise PanopticFormatError("pred_dir (the predicted PNG folder) is needed with a prediction JSON")
    return pred, pred_dir


def _pred_finder(gt_anns: Mapping[str, Mapping],
                 pred_anns: Mapping[str, Mapping]) -> Callable[[str], Mapping | None]:
    """A function gt image key -> its prediction annotation (by image id, else by PNG stem) or None."""
    # a prediction made from the image files (ragseg label: id = file stem) is paired with a gt
    # that numbers its images (COCO: int ids) through the PNG file name, which both derive from it
    pred_by_png = {_png_stem(a): a for a in pred_anns.values() if a.get("file_name")}

    def find_pred(key: str) -> Mapping | None:
        p = pred_anns.get(key)
        return p if p is not None else pred_by_png.get(_png_stem(gt_anns[key]))

    return find_pred


def _check_missing(missing: list[str], n_gt: int, pred_json: str, allow_missing: bool) -> None:
    """Raise naming the gt images without a prediction, unless ``allow_missing``."""
    if missing and not allow_missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise PanopticFormatError(
            f"the prediction {pred_json} has no annotation for {len(missing)} of the {n_gt} ground-truth "
            f"images: {shown} (--allow-missing scores them as empty predictions)")


def _pred_segments(key: str, p: Mapping, remap: Mapping[int, int], categories: Mapping[int, Mapping],
                   pred_names: Mapping[int, str]) -> list[dict]:
    """One prediction's segments_info with category ids re-mapped (if ``remap``) and checked against the gt's."""
    pred_segs = []
    for s in p.get("segments_info", []):
        s = dict(s)
        if remap:
            cid = int(s["category_id"])
            s["category_id"] = remap.get(cid, cid)
            if s["category_id"] < 0:
                raise PanopticFormatError(
                    f"image {key}: segment {s.get('id')} has category {cid} "
                    f"({pred_names.get(cid, '?')!r}), which is not a ground-truth category")
        elif int(s["category_id"]) not in categories:
            cid = int(s["category_id"])
            named = f" ({pred_names[cid]!r} in the prediction's categories)" if cid in pred_names else ""
            raise PanopticFormatError(
                f"image {key}: segment {s.get('id')} has unknown category_id {cid}{named}, not a ground-truth "
                "category id; if the prediction numbers its categories its own way, rerun with "
                "--match-categories-by-name")
        pred_segs.append(s)
    return pred_segs


def _map_ordered(fn: Callable[[str], Any], keys: list[str], workers: int) -> list:
    """``fn`` over ``keys`` in order, on a thread pool when ``workers`` > 1 (ordered: deterministic float sums)."""
    if workers and workers > 1 and len(keys) > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            return list(ex.map(fn, keys))
    return [fn(k) for k in keys]


def _eval_warnings(renamed: list[tuple[int, str, str]], remap: dict[int, int], pred_names: Mapping[int, str],
                   categories: Mapping[int, Mapping], area_mismatches: list[tuple[str, int, int, int]]) -> list[str]:
    """One warning line per kind of finding: names that disagree, category re-mapping, gt areas."""
    warnings = []
    if renamed:
        warnings.append(_names_warning(renamed))
    if remap and _remap_warning(remap, pred_names, categories):
        warnings.append(_remap_warning(remap, pred_names, categories))
    if area_mismatches:
        warnings.append(_area_warning(area_mismatches))
    return warnings


def _per_class(total: PQStat, categories: Mapping[int, Mapping]) -> list[dict]:
    """One metrics row per gt category, in id order."""
    per_class = []
    for cid in sorted(categories):
        info = categories[cid]
        m = total.class_metrics(cid)
        per_class.append({"id": cid, "name": str(info.get("name", cid)),
                          "isthing": bool(info.get("isthing", 0)), **m})
    return per_class


def evaluate(gt_json: str, gt_dir: str, pred_json: str, pred_dir: str | None = None, workers: int = 4,
             allow_missing: bool = False, match_categories_by_name: bool = False) -> dict:
    """PQ / SQ / RQ of a COCO panoptic prediction against COCO panoptic ground truth.

    ``pred_json`` is a COCO panoptic JSON, or the output folder of ``ragseg label``: then its per-piece
    parts are read directly (no merged panoptic.json needed) and ``pred_dir`` defaults to its PNGs.

    Images are matched by ``image_id``, else by the annotation's PNG file name stem; each annotation's ``file_name`` names its PNG in ``gt_dir`` /
    ``pred_dir`` (a prediction without ``file_name`` uses the gt's). Returns::

        {"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"},
         "per_class": [{"id", "name", "isthing", "pq", "sq", "rq", "tp", "fp", "fn", "present"}, ...],
         "images": int, "evaluated": int, "missing_predictions": [image ids], "extra_predictions": [...],
         "category_remap": {pred id: gt id}, "warnings": [one line each]}

    A gt image without a prediction raises :class:`PanopticFormatError` naming the images unless
    ``allow_missing`` (then it is scored as an empty prediction). Category ids are used as they are
    unless ``match_categories_by_name`` (module docstring).
    """
    gt = rio.read_json(gt_json)
    pred, pred_dir = _load_prediction(pred_json, pred_dir)
    categories = _load_categories(gt)
    pred_cats = pred.get("categories") or []
    remap = _category_remap(categories, pred_cats) if match_categories_by_name else {}
    renamed = [] if match_categories_by_name else _name_disagreements(categories, pred_cats)
    pred_names = {int(c["id"]): str(c.get("name", "")) for c in pred_cats}
    gt_anns = _by_image(gt.get("annotations", []), "ground-truth")
    pred_anns = _by_image(pred.get("annotations", []), "prediction")
    find_pred = _pred_finder(gt_anns, pred_anns)
    missing = sorted(k for k in gt_anns if find_pred(k) is None)
    _check_missing(missing, len(gt_anns), pred_json, allow_missing)

    def one(key: str) -> tuple[PQStat, list]:
        g = gt_anns[key]
        p = find_pred(key)
        if p is None:
            return _fn_only(g["segments_info"]), []
        pred_segs = _pred_segments(key, p, remap, categories, pred_names)
        gt_ids = read_id_png(rio.join(gt_dir, g["file_name"]))
        pred_ids = read_id_png(rio.join(pred_dir, p.get("file_name") or g["file_name"]))
        stat = pq_stats_image(gt_ids, g["segments_info"], pred_ids, pred_segs, categories, image_id=key)
        return stat, _gt_area_mismatches(key, gt_ids, g["segments_info"])

    total = PQStat()
    area_mismatches: list[tuple[str, int, int, int]] = []
    for st, mism in _map_ordered(one, list(gt_anns), workers):
        total += st
        area_mismatches.extend(mism)
    gt_stems = {_png_stem(a) for a in gt_anns.values()}
    return {
        "All": total.average(categories, None),
        "Things": total.average(categories, True),
        "Stuff": total.average(categories, False),
        "per_class": _per_class(total, categories),
        "images": len(gt_anns),
        "evaluated": len(gt_anns) - len(missing),
        "missing_predictions": missing,
        "extra_predictions": sorted(k for k, a in pred_anns.items()
                                    if k not in gt_anns and _png_stem(a) not in gt_stems),
        "category_remap": {str(k): v for k, v in remap.items() if v >= 0},
        "warnings": _eval_warnings(renamed, remap, pred_names, categories, area_mismatches),
    }


def format_table(result: Mapping) -> str:
    """A plain-text table: All / Things / Stuff, then one row per class (absent classes show '-')."""
    lines = [f"{'':<24} | {'PQ':>6} {'SQ':>6} {'RQ':>6} | {'N':>4}", "-" * 52]
    for name in ("All", "Things", "Stuff"):
        r = result[name]
        lines.append(f"{name:<24} | {r['pq']:6.1f} {r['sq']:6.1f} {r['rq']:6.1f} | {r['n']:>4}")
    lines.append("")
    lines.append(f"{'class':<24} {'T/S':>3} | {'PQ':>6} {'SQ':>6} {'RQ':>6} | {'TP':>5} {'FP':>5} {'FN':>5}")
    lines.append("-" * 72)
    for c in result.get("per_class", []):
        name = str(c["name"])
        name = name if len(name) <= 24 else name[:23] + "~"
        kind = "T" if c["isthing"] else "S"
        if c.get("present", True):
            vals = f"{c['pq']:6.1f} {c['sq']:6.1f} {c['rq']:6.1f}"
        else:
            vals = f"{'-':>6} {'-':>6} {'-':>6}"
        lines.append(f"{name:<24} {kind:>3} | {vals} | {c['tp']:>5} {c['fp']:>5} {c['fn']:>5}")
    missing = result.get("missing_predictions") or []
    lines.append("")
    lines.append(f"images: {result.get('images', 0)}, evaluated: {result.get('evaluated', 0)}, "
                 f"missing predictions: {len(missing)}")
    if missing:
        shown = ", ".join(str(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
        lines.append(f"  missing: {shown}")
    return "\n".join(lines)
