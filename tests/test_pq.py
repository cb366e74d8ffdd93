"""PQ with COCO panoptic semantics: hand-computed cases for each rule, file-level evaluate and the CLI."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from ragseg.eval.pq import PanopticFormatError, PQStat, evaluate, format_table, pq_stats_image
from ragseg.masks import id_to_rgb

A, B, C = 1, 2, 3
CATS = {A: {"id": A, "name": "person", "isthing": 1},
        B: {"id": B, "name": "sky", "isthing": 0},
        C: {"id": C, "name": "car", "isthing": 1}}


def row(*runs: tuple[int, int]) -> np.ndarray:
    """A 1xN id map from (id, length) runs."""
    return np.concatenate([np.full(n, i, dtype=np.uint32) for i, n in runs])[None, :]


def seg(i: int, cat: int, crowd: int = 0) -> dict:
    return {"id": i, "category_id": cat, "iscrowd": crowd}


def metrics(stat: PQStat, cat: int) -> dict:
    return stat.class_metrics(cat)


def test_perfect_match_is_100():
    gt = row((1, 4), (2, 4), (0, 2))
    segs = [seg(1, A), seg(2, B)]
    st = pq_stats_image(gt, segs, gt.copy(), [seg(1, A), seg(2, B)], CATS)
    for cat in (A, B):
        m = metrics(st, cat)
        assert (m["pq"], m["sq"], m["rq"], m["tp"], m["fp"], m["fn"]) == (100.0, 100.0, 100.0, 1, 0, 0)
    assert st.average(CATS)["pq"] == 100.0
    assert st.average(CATS)["n"] == 2  # C absent on both sides


def test_iou_exactly_half_is_not_a_match():
    gt = row((1, 4), (2, 4))  # gt seg 1 (A): 4 px
    pred = row((7, 2), (8, 6))  # pred 7 (A) covers 2 of them: inter 2, union 4 -> IoU 0.5
    st = pq_stats_image(gt, [seg(1, A), seg(2, B)], pred, [seg(7, A), seg(8, B)], CATS)
    m = metrics(st, A)
    assert (m["tp"], m["fp"], m["fn"], m["pq"]) == (0, 1, 1, 0.0)
    # pred 8 (B): 6 px, 4 on gt B: IoU 4 / (6 + 4 - 4) = 2/3 -> match
    mb = metrics(st, B)
    assert (mb["tp"], mb["fp"], mb["fn"]) == (1, 0, 0)
    assert mb["sq"] == pytest.approx(100 * 2 / 3)


def test_iou_just_above_half_matches_and_formulas():
    gt = row((1, 4), (0, 4))
    pred = row((5, 3), (0, 3), (6, 2))  # 5 (A): IoU 3/4; 6 (A) lies wholly on gt void -> ignored
    st = pq_stats_image(gt, [seg(1, A)], pred, [seg(5, A), seg(6, A)], CATS)
    m = metrics(st, A)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)
    assert m["sq"] == pytest.approx(75.0) and m["pq"] == pytest.approx(75.0) and m["rq"] == 100.0

    # one true positive at IoU 0.75 plus one real false positive: PQ = .75/1.5, SQ = .75, RQ = 1/1.5
    gt2 = row((1, 4), (2, 4))
    pred2 = row((5, 3), (0, 1), (6, 4))  # 6 (A) lies on gt B -> FP for A; gt B unmatched -> FN for B
    st2 = pq_stats_image(gt2, [seg(1, A), seg(2, B)], pred2, [seg(5, A), seg(6, A)], CATS)
    m2 = metrics(st2, A)
    assert (m2["tp"], m2["fp"], m2["fn"]) == (1, 1, 0)
    assert m2["pq"] == pytest.approx(50.0)
    assert m2["sq"] == pytest.approx(75.0)
    assert m2["rq"] == pytest.approx(100 / 1.5)
    assert metrics(st2, B)["fn"] == 1


def test_void_pixels_of_gt_are_removed_from_the_union():
    gt = row((1, 4), (0, 4))
    pred = row((9, 6), (0, 2))  # 6 px: 4 on gt 1, 2 on void -> union 6 + 4 - 4 - 2 = 4 -> IoU 1
    st = pq_stats_image(gt, [seg(1, A)], pred, [seg(9, A)], CATS)
    m = metrics(st, A)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)
    assert m["pq"] == pytest.approx(100.0)


def test_pred_mostly_void_is_not_fp_but_half_void_is():
    # gt: 1 (A) 0..3, 2 (B) 4..5, void 6..9
    gt = row((1, 4), (2, 2), (0, 4))
    # pred 1 (A) exact; pred 3 (C) on 4..7: 2 px on gt B, 2 px void -> ratio 0.5 -> FP;
    # pred 4 (C) on 8..9: all void -> ignored
    pred = row((1, 4), (3, 4), (4, 2))
    st = pq_stats_image(gt, [seg(1, A), seg(2, B)], pred, [seg(1, A), seg(3, C), seg(4, C)], CATS)
    assert (metrics(st, C)["fp"], metrics(st, C)["tp"]) == (1, 0)
    assert metrics(st, B)["fn"] == 1
    assert metrics(st, A)["pq"] == 100.0

    pred_b = row((1, 4), (0, 3), (4, 3))  # pred 4 (C): 1 px on gt B, 2 void -> 2/3 void -> ignored
    st_b = pq_stats_image(gt, [seg(1, A), seg(2, B)], pred_b, [seg(1, A), seg(4, C)], CATS)
    assert metrics(st_b, C)["fp"] == 0


def test_crowd_regions():
    # gt: crowd A 0..5, A 6..9, B 10..15
    gt = row((1, 6), (2, 4), (3, 6))
    gsegs = [seg(1, A, crowd=1), seg(2, A), seg(3, B)]
    # pred on the crowd region with the crowd's class: never a TP, not a FP; the crowd is never a FN
    pred = row((11, 6), (12, 4), (13, 6))
    st = pq_stats_image(gt, gsegs, pred, [seg(11, A), seg(12, A), seg(13, B)], CATS)
    assert (metrics(st, A)["tp"], metrics(st, A)["fp"], metrics(st, A)["fn"]) == (1, 0, 0)
    assert metrics(st, A)["pq"] == 100.0
    # same region predicted as another class: the crowd does not excuse it -> FP
    st2 = pq_stats_image(gt, gsegs, pred, [seg(11, B), seg(12, A), seg(13, B)], CATS)
    mb = metrics(st2, B)
    assert (mb["tp"], mb["fp"], mb["fn"]) == (1, 1, 0)
    assert mb["rq"] == pytest.approx(100 / 1.5)
    # a pred covering the crowd exactly would have IoU 1 with it, yet crowds never match
    st3 = pq_stats_image(gt, gsegs, row((11, 6), (0, 10)), [seg(11, A)], CATS)
    ma = metrics(st3, A)
    assert (ma["tp"], ma["fp"], ma["fn"]) == (0, 0, 1)  # only the non-crowd A is a FN
    # only the crowd of the pred's own class counts: 3 of 6 px on crowd A (rest crowd B) is not > half
    gt4 = row((1, 3), (4, 3))
    st4 = pq_stats_image(gt4, [seg(1, A, 1), seg(4, B, 1)], row((20, 6)), [seg(20, A)], CATS)
    assert metrics(st4, A)["fp"] == 1


def test_class_absent_on_both_sides_left_out_of_mean_and_things_stuff_split():
    gt = row((1, 4), (2, 4))
    pred = row((1, 4), (0, 4))  # A perfect, B (stuff) missed
    st = pq_stats_image(gt, [seg(1, A), seg(2, B)], pred, [seg(1, A)], CATS)
    assert st.average(CATS, True) == {"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 1}  # C absent
    assert st.average(CATS, False) == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}
    allm = st.average(CATS, None)
    assert allm["n"] == 2 and allm["pq"] == pytest.approx(50.0)
    assert metrics(st, C)["present"] is False


def test_accumulation_over_images():
    gt = row((1, 4))
    s1 = pq_stats_image(gt, [seg(1, A)], gt, [seg(1, A)], CATS)
    s2 = pq_stats_image(gt, [seg(1, A)], row((0, 4)), [], CATS)
    tot = PQStat()
    tot += s1
    tot += s2
    m = tot.class_metrics(A)
    assert (m["tp"], m["fn"]) == (1, 1)
    assert m["pq"] == pytest.approx(100 / 1.5)
    assert (s1 + s2).class_metrics(A) == m


def test_prediction_format_errors():
    gt = row((1, 4))
    with pytest.raises(PanopticFormatError, match="unknown category_id"):
        pq_stats_image(gt, [seg(1, A)], gt, [seg(1, 99)], CATS)
    with pytest.raises(PanopticFormatError, match="not in its segments_info"):
        pq_stats_image(gt, [seg(1, A)], gt, [], CATS)
    with pytest.raises(PanopticFormatError, match="not in the prediction PNG"):
        pq_stats_image(gt, [seg(1, A)], gt, [seg(1, A), seg(5, A)], CATS)
    with pytest.raises(PanopticFormatError):
        pq_stats_image(gt, [seg(1, A)], row((1, 5)), [seg(1, A)], CATS)


# ---------- files + CLI ----------

def _write_png(path, ids: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(ids)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _make_set(root, with_second_pred: bool = True):
    """Two 8x8 images; gt and pred share the same PNGs except where noted."""
    gdir = root / "gt"
    pdir = root / "pred"
    gdir.mkdir(exist_ok=True)
    pdir.mkdir(exist_ok=True)
    im1 = np.zeros((8, 8), np.uint32)
    im1[:, :4] = 1 + 256  # id 257 (exercises the G channel): person
    im1[:, 4:] = 2  # sky
    im2 = np.zeros((8, 8), np.uint32)
    im2[:4] = 5  # car
    im2[4:, :4] = 6  # crowd person
    for name, ids in (("a.png", im1), ("b.png", im2)):
        _write_png(gdir / name, ids)
        _write_png(pdir / name, ids)
    cats = [{"id": A, "name": "person", "isthing": 1, "supercategory": "x"},
            {"id": B, "name": "sky", "isthing": 0, "supercategory": "x"},
            {"id": C, "name": "car", "isthing": 1, "supercategory": "x"}]
    gt = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
          "annotations": [
              {"image_id": 1, "file_name": "a.png",
               "segments_info": [{"id": 257, "category_id": A, "iscrowd": 0}, {"id": 2, "category_id": B, "iscrowd": 0}]},
              {"image_id": 2, "file_name": "b.png",
               "segments_info": [{"id": 5, "category_id": C, "iscrowd": 0}, {"id": 6, "category_id": A, "iscrowd": 1}]}],
          "categories": cats}
    (root / "gt.json").write_text(json.dumps(gt))
    pred = json.loads(json.dumps(gt))
    if not with_second_pred:
        pred["annotations"] = pred["annotations"][:1]
    for ann in pred["annotations"]:  # predictions carry string image ids, like `ragseg label`
        ann["image_id"] = str(ann["image_id"])
        ann["segments_info"] = [{k: v for k, v in s.items() if k != "iscrowd"} | {"score": 0.9}
                                for s in ann["segments_info"]]
    (root / "pred.json").write_text(json.dumps(pred))
    return gdir, pdir


def test_evaluate_files_and_missing_prediction(tmp_path):
    gdir, pdir = _make_set(tmp_path, with_second_pred=False)
    with pytest.raises(PanopticFormatError, match=r"no annotation for 1 of the 2 ground-truth images: 2 "):
        evaluate(str(tmp_path / "gt.json"), str(gdir), str(tmp_path / "pred.json"), str(pdir))
    res = evaluate(str(tmp_path / "gt.json"), str(gdir), str(tmp_path / "pred.json"), str(pdir), allow_missing=True)
    assert res["missing_predictions"] == ["2"] and res["warnings"] == []
    assert res["images"] == 2 and res["evaluated"] == 1
    per = {c["name"]: c for c in res["per_class"]}
    assert (per["car"]["tp"], per["car"]["fn"], per["car"]["pq"]) == (0, 1, 0.0)  # image 2's car: FN
    assert (per["person"]["tp"], per["person"]["fn"]) == (1, 0)  # image 2's crowd person: not a FN
    assert per["sky"]["pq"] == 100.0
    assert res["Things"]["n"] == 2 and res["Things"]["pq"] == pytest.approx(50.0)
    assert res["Stuff"]["pq"] == 100.0
    assert res["All"]["pq"] == pytest.approx(200 / 3)
    table = format_table(res)
    assert "missing predictions: 1" in table and "person" in table


def test_evaluate_maps_categories_by_name_only_when_asked(tmp_path):
    """A prediction numbered its own way: its ids are not ground-truth ids, an error naming the fix
    (ids are authoritative, as in panopticapi); with match_categories_by_name it is mapped by name."""
    gdir, pdir = _make_set(tmp_path)
    pred = json.loads((tmp_path / "pred.json").read_text())
    shift = {A: 10, B: 11, C: 12}
    pred["categories"] = [dict(c, id=shift[c["id"]]) for c in pred["categories"]]
    for ann in pred["annotations"]:
        for s in ann["segments_info"]:
            s["category_id"] = shift[s["category_id"]]
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    with pytest.raises(PanopticFormatError, match=r"unknown category_id 1[012] \('.*' in the prediction's categories\)"
                       r".*--match-categories-by-name"):
        evaluate(str(tmp_path / "gt.json"), str(gdir), str(tmp_path / "pred.json"), str(pdir))
    res = evaluate(str(tmp_path / "gt.json"), str(gdir), str(tmp_path / "pred.json"), str(pdir),
                   match_categories_by_name=True)
    assert res["All"]["pq"] == 100.0
    assert res["category_remap"] == {"10": A, "11": B, "12": C}
    assert len(res["warnings"]) == 1 and "3 mapped by class name" in res["warnings"][0]
    assert "10->1 'person'" in res["warnings"][0]

    pred["categories"].append({"id": 50, "name": "unicorn", "isthing": 1})
    pred["annotations"][0]["segments_info"][0]["category_id"] = 50
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    with pytest.raises(PanopticFormatError, match="unicorn"):
        evaluate(str(tmp_path / "gt.json"), str(gdir), str(tmp_path / "pred.json"), str(pdir),
                 match_categories_by_name=True)


def test_cli_eval_gt_against_itself(tmp_path):
    from typer.testing import CliRunner

    from ragseg.jobs.cli import app

    gdir, _ = _make_set(tmp_path)
    out = tmp_path / "metrics" / "pq.json"
    g = str(tmp_path / "gt.json")
    r = CliRunner().invoke(app, ["eval", "--gt-json", g, "--gt-dir", str(gdir), "--pred-json", g,
                                 "--pred-dir", str(gdir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "100.0" in r.output and "All" in r.output
    res = json.loads(out.read_text())
    assert res["All"]["pq"] == 100.0 and res["Things"]["pq"] == 100.0 and res["Stuff"]["pq"] == 100.0
    assert res["missing_predictions"] == []


def test_cli_bad_prediction_exits_2(tmp_path, monkeypatch, capsys):
    from ragseg.jobs.cli import main

    gdir, pdir = _make_set(tmp_path)
    pred = json.loads((tmp_path / "pred.json").read_text())
    pred["annotations"][0]["segments_info"][0]["category_id"] = 77
    pred.pop("categories")
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    monkeypatch.setattr(sys, "argv", ["ragseg", "eval", "--gt-json", str(tmp_path / "gt.json"),
                                      "--gt-dir", str(gdir), "--pred-json", str(tmp_path / "pred.json"),
                                      "--pred-dir", str(pdir)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert "unknown category_id 77" in capsys.readouterr().err


def _eval_cli(tmp_path, *extra):
    from typer.testing import CliRunner

    from ragseg.jobs.cli import app

    g, p = str(tmp_path / "gt.json"), str(tmp_path / "pred.json")
    return CliRunner().invoke(app, ["eval", "--gt-json", g, "--gt-dir", str(tmp_path / "gt"), "--pred-json", p,
                                    "--pred-dir", str(tmp_path / "pred"), *extra])


def test_cli_eval_says_what_it_changed(tmp_path):
    """Missing images are an error naming them (or empty with --allow-missing); a category re-mapping by
    name and gt areas that disagree with the PNGs each print one warning line."""
    _make_set(tmp_path, with_second_pred=False)
    r = _eval_cli(tmp_path)
    assert r.exit_code != 0 and isinstance(r.exception, PanopticFormatError)
    assert "images: 2" in str(r.exception)
    r = _eval_cli(tmp_path, "--allow-missing")
    assert r.exit_code == 0, r.output
    assert "missing predictions: 1" in r.output and "warning:" not in r.output

    _make_set(tmp_path)
    gt = json.loads((tmp_path / "gt.json").read_text())
    gt["annotations"][0]["segments_info"][0]["area"] = 999  # the PNG has 32 pixels of segment 257
    gt["annotations"][1]["segments_info"][0]["area"] = 32  # agrees with the PNG: no warning
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    pred = json.loads((tmp_path / "pred.json").read_text())
    pred["categories"] = [dict(c, id=c["id"] + 100) for c in gt["categories"]]
    for ann in pred["annotations"]:
        for s in ann["segments_info"]:
            s["category_id"] += 100
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    r = _eval_cli(tmp_path)
    assert r.exit_code != 0 and "--match-categories-by-name" in str(r.exception)
    r = _eval_cli(tmp_path, "--match-categories-by-name")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, r.output
    assert "mapped by class name" in warnings[0] and "101->1 'person'" in warnings[0]
    assert "1 ground-truth segment area(s)" in warnings[1] and "image 1 segment 257: JSON 999, PNG 32" in warnings[1]


def _renamed_set(root, pred_segments: str):
    """One 10x10 image in COCO panoptic files (panopticapi's format: PNG ids = R + 256 G + 256^2 B,
    ``segments_info`` with ``id``, ``category_id``, ``iscrowd``). Ground truth: rows 0-4 segment 1
    (category 1 'crate', thing), rows 5-7 segment 2 (category 2 'ball', stuff), row 8 void, row 9
    segment 3 (category 1, crowd). The prediction's ``categories`` swap the two names; its segments use
    the ground truth's ids: ``pred_segments`` "perfect" (the gt itself) or "shifted" (segment 11: rows
    0-3 + the void row 8, category 1; segment 12: rows 4-7, category 2; segment 13: the crowd row 9,
    category 1)."""
    gdir, pdir = root / "gt", root / "pred"
    gdir.mkdir(exist_ok=True)
    pdir.mkdir(exist_ok=True)
    gt_ids = np.zeros((10, 10), np.uint32)
    gt_ids[0:5], gt_ids[5:8], gt_ids[9] = 1, 2, 3
    gt_segs = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 50},
               {"id": 2, "category_id": 2, "iscrowd": 0, "area": 30},
               {"id": 3, "category_id": 1, "iscrowd": 1, "area": 10}]
    if pred_segments == "perfect":
        pred_ids, pred_segs = gt_ids, [{"id": s["id"], "category_id": s["category_id"]} for s in gt_segs]
    else:
        pred_ids = np.zeros((10, 10), np.uint32)
        pred_ids[0:4], pred_ids[8], pred_ids[4:8], pred_ids[9] = 11, 11, 12, 13
        pred_segs = [{"id": 11, "category_id": 1}, {"id": 12, "category_id": 2}, {"id": 13, "category_id": 1}]
    _write_png(gdir / "im.png", gt_ids)
    _write_png(pdir / "im.png", pred_ids)
    cats = [{"id": 1, "name": "crate", "isthing": 1}, {"id": 2, "name": "ball", "isthing": 0}]
    (root / "gt.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "im.jpg", "height": 10, "width": 10}],
        "annotations": [{"image_id": 7, "file_name": "im.png", "segments_info": gt_segs}], "categories": cats}))
    (root / "pred.json").write_text(json.dumps({
        "annotations": [{"image_id": 7, "file_name": "im.png", "segments_info": pred_segs}],
        "categories": [{"id": 1, "name": "ball", "isthing": 0}, {"id": 2, "name": "crate", "isthing": 1}]}))
    return str(root / "gt.json"), str(gdir), str(root / "pred.json"), str(pdir)


def test_category_ids_are_authoritative_names_only_warn(tmp_path):
    """The issue's case: ids 1 and 2 named the other way round in the prediction's categories. As in
    panopticapi the ids are used as they are (a perfect prediction scores 100) and one warning names the
    disagreement; --match-categories-by-name re-maps by name instead.

    Expected numbers from panopticapi's rules (pq_compute_single_core): match = same category and
    IoU > 0.5 with union = pred area + gt area - intersection - (pred ∩ gt void); crowd gt never matches
    and is no FN; an unmatched pred is no FP when more than half of it lies on gt void or on a crowd
    segment of its own category; per class PQ = sum IoU / (TP + FP/2 + FN/2), means over present classes.
    "shifted", ids as they are: 11 vs gt 1: inter 40, union 50 + 50 - 40 - 10 (void row) = 50, IoU 0.8;
    12 vs gt 2: inter 30, union 40 + 30 - 30 = 40, IoU 0.75; 13 lies on the crowd of its category: no
    FP. crate PQ 80, ball PQ 75, All 77.5. By name (1 <-> 2): 11 is 'ball' (no same-class overlap:
    FP, 10/50 void), 12 'crate' vs gt 1: IoU 10 / (40 + 50 - 10) = 0.125 (FP), 13 'ball' on a 'crate'
    crowd (FP); both gt segments FN: every PQ 0."""
    paths = _renamed_set(tmp_path, "perfect")
    res = evaluate(*paths)
    assert res["All"]["pq"] == 100.0 and res["category_remap"] == {}
    assert len(res["warnings"]) == 1
    w = res["warnings"][0]
    assert "name 2 ground-truth id(s) differently" in w and "id 1 is 'ball' in the prediction but 'crate'" in w
    assert "--match-categories-by-name" in w

    paths = _renamed_set(tmp_path, "shifted")
    res = evaluate(*paths)
    per = {c["id"]: c for c in res["per_class"]}
    assert (per[1]["tp"], per[1]["fp"], per[1]["fn"]) == (1, 0, 0) and per[1]["pq"] == pytest.approx(80.0)
    assert (per[2]["tp"], per[2]["fp"], per[2]["fn"]) == (1, 0, 0) and per[2]["pq"] == pytest.approx(75.0)
    assert res["All"]["pq"] == pytest.approx(77.5) and res["Things"]["pq"] == pytest.approx(80.0)
    assert res["Stuff"]["pq"] == pytest.approx(75.0) and len(res["warnings"]) == 1

    res = evaluate(*paths, match_categories_by_name=True)
    per = {c["id"]: c for c in res["per_class"]}
    assert (per[1]["tp"], per[1]["fp"], per[1]["fn"]) == (0, 1, 1)
    assert (per[2]["tp"], per[2]["fp"], per[2]["fn"]) == (0, 2, 1)
    assert res["All"]["pq"] == 0.0 and res["category_remap"] == {"1": 2, "2": 1}
    assert len(res["warnings"]) == 1 and "2 mapped by class name" in res["warnings"][0]


def test_cli_eval_warns_once_about_renamed_categories(tmp_path):
    gt, gdir, pred, pdir = _renamed_set(tmp_path, "perfect")
    from typer.testing import CliRunner

    from ragseg.jobs.cli import app

    args = ["eval", "--gt-json", gt, "--gt-dir", gdir, "--pred-json", pred, "--pred-dir", pdir]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "differently" in warnings[0]
    assert "All" in r.output and "100.0" in r.output
    r = CliRunner().invoke(app, args + ["--match-categories-by-name"])
    assert r.exit_code == 0, r.output
    assert "mapped by class name" in r.output


def _reference_pq_image(pan_gt, gt_ann_segs, pan_pred, pred_ann_segs):
    """A literal transcription of the per-image loop of panopticapi's ``pq_compute_single_core``
    (gt areas from the PNG instead of the JSON); returns {cat: [iou, tp, fp, fn]}."""
    from collections import defaultdict

    offset, void = 256 * 256 * 256, 0
    stat = defaultdict(lambda: [0.0, 0, 0, 0])
    gt_segms = {el["id"]: dict(el) for el in gt_ann_segs}
    pred_segms = {el["id"]: dict(el) for el in pred_ann_segs}
    for lab, cnt in zip(*np.unique(pan_gt, return_counts=True)):
        if int(lab) in gt_segms:
            gt_segms[int(lab)]["area"] = int(cnt)
    for lab, cnt in zip(*np.unique(pan_pred, return_counts=True)):
        if int(lab) != void:
            pred_segms[int(lab)]["area"] = int(cnt)
    pan_gt_pred = pan_gt.astype(np.uint64) * offset + pan_pred.astype(np.uint64)
    gt_pred_map = {}
    for lab, inter in zip(*np.unique(pan_gt_pred, return_counts=True)):
        gt_pred_map[(int(lab) // offset, int(lab) % offset)] = int(inter)
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        if gt_segms[gt_label]["iscrowd"] == 1:
            continue
        if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (pred_segms[pred_label]["area"] + gt_segms[gt_label].get("area", 0) - intersection
                 - gt_pred_map.get((void, pred_label), 0))
        iou = intersection / union
        if iou > 0.5:
            stat[gt_segms[gt_label]["category_id"]][0] += iou
            stat[gt_segms[gt_label]["category_id"]][1] += 1
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    crowd_labels_dict = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_info["iscrowd"] == 1:
            crowd_labels_dict[gt_info["category_id"]] = gt_label
            continue
        stat[gt_info["category_id"]][3] += 1
    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        intersection = gt_pred_map.get((void, pred_label), 0)
        if pred_info["category_id"] in crowd_labels_dict:
            intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
        if intersection / pred_info["area"] > 0.5:
            continue
        stat[pred_info["category_id"]][2] += 1
    return stat


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_reference_transcription(seed):
    rng = np.random.default_rng(seed)
    h, w = 24, 24

    def blobs(n_ids):
        ids = np.zeros((h, w), np.uint32)
        for i in range(1, n_ids + 1):
            y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
            ids[y0:y0 + rng.integers(4, 14), x0:x0 + rng.integers(4, 14)] = i
        return ids

    gt = blobs(6)
    pred = gt.copy()
    noise = rng.random((h, w)) < 0.25  # perturb: moved pixels, some pred blobs of their own
    pred[noise] = rng.integers(0, 9, size=int(noise.sum()))
    gt_ids = [int(i) for i in np.unique(gt) if i]
    used_crowd = set()
    gsegs = []
    for i in gt_ids:
        cat = int(rng.integers(1, 4))
        crowd = int(rng.random() < 0.25 and cat not in used_crowd)  # one crowd per class, as COCO
        used_crowd |= {cat} if crowd else set()
        gsegs.append({"id": i, "category_id": cat, "iscrowd": crowd})
    gcat = {s["id"]: s["category_id"] for s in gsegs}
    psegs = [{"id": int(i), "category_id": gcat.get(int(i), int(rng.integers(1, 4)))
              if rng.random() < 0.8 else int(rng.integers(1, 4))} for i in np.unique(pred) if i]
    ours = pq_stats_image(gt, gsegs, pred, psegs, CATS)
    ref = _reference_pq_image(gt, gsegs, pred, psegs)
    for cat in CATS:
        st = ours.per_cat.get(cat)
        got = [st.iou, st.tp, st.fp, st.fn] if st else [0.0, 0, 0, 0]
        exp = ref.get(cat, [0.0, 0, 0, 0])
        assert got[1:] == exp[1:] and got[0] == pytest.approx(exp[0])


def test_gt_area_from_the_json_and_last_crowd_per_category_as_the_reference():
    """panopticapi (``pq_compute_single_core``): the union uses the gt segment's JSON ``area``; for the FP
    rule, an image keeps one crowd segment per category, the last one in ``segments_info``."""
    # gt: seg 1 (A) 5 px in the PNG but 6 in its JSON area; pred 9 (A) exactly those 5 px
    gt = row((1, 5), (2, 5))
    gsegs = [seg(1, A) | {"area": 6}, seg(2, B) | {"area": 5}]
    st = pq_stats_image(gt, gsegs, row((9, 5), (8, 5)), [seg(9, A), seg(8, B)], CATS)
    assert metrics(st, A)["sq"] == pytest.approx(100 * 5 / 6)  # 5 / (5 + 6 - 5), not 1.0
    assert metrics(st, B)["sq"] == 100.0
    # two crowd regions of A: crowd 1 (6 px), crowd 2 (2 px), listed in that order, then B (2 px)
    gt = row((1, 6), (2, 2), (3, 2))
    gsegs = [seg(1, A, crowd=1), seg(2, A, crowd=1), seg(3, B)]
    pred = row((7, 8), (0, 2))  # pred 7 (A) covers both crowds: only crowd 2 (2 of 8 px) excuses it
    st = pq_stats_image(gt, gsegs, pred, [seg(7, A)], CATS)
    assert (metrics(st, A)["fp"], metrics(st, B)["fn"]) == (1, 1)
    # listed the other way round, crowd 1 (6 of 8 px) is the one kept: not a FP
    st = pq_stats_image(gt, [gsegs[1], gsegs[0], gsegs[2]], pred, [seg(7, A)], CATS)
    assert metrics(st, A)["fp"] == 0
