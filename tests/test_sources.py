"""Source readers read the synthetic set back in every layout; bad items become errors."""

from __future__ import annotations

import functools
import http.server
import json
import posixpath
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ragseg.config import SourceConfig
from ragseg.errors import UserError
from ragseg.io import safe_name
from ragseg.sources import ROW_COLUMNS, list_rows
from ragseg.sources.gt import load_gt_segments

HW = (96, 96)


def cfg_for(root: str, kind: str, split: str = "val", **kw) -> SourceConfig:
    sub = {"coco_panoptic": "coco", "ade20k": "ADEChallengeData2016", "ade20k_panoptic": "ADEChallengeData2016",
           "openimages": "openimages", "synthetic": "", "folder": "coco/" + split}[kind]
    uri = f"{root}/{sub}".rstrip("/") if "://" not in root else root.rstrip("/") + ("/" + sub if sub else "")
    return SourceConfig(kind=kind, uri=uri, split=split, **kw)


def seg_set(row, things_only=False):
    return sorted((s.label, s.mask.tobytes()) for s in load_gt_segments(row, HW) if s.isthing or not things_only)


@pytest.mark.parametrize("split", ["train", "val"])
def test_layouts_agree(synthetic_root, split):
    errs: list[dict] = []
    coco = list_rows(cfg_for(synthetic_root, "coco_panoptic", split), errs)
    syn = list_rows(cfg_for(synthetic_root, "synthetic", split), errs)
    ade = list_rows(cfg_for(synthetic_root, "ade20k_panoptic", split), errs)
    sem = list_rows(cfg_for(synthetic_root, "ade20k", split, categories=f"{synthetic_root}/categories.json"), errs)
    oi = list_rows(cfg_for(synthetic_root, "openimages", split), errs)
    assert errs == []
    n = 18 if split == "train" else 6
    ids = [r["image_id"] for r in coco]
    assert len(ids) == n and ids == sorted(ids)
    for rows in (syn, ade, sem, oi):
        assert [r["image_id"] for r in rows] == ids
        for r in rows:
            assert list(r) == ROW_COLUMNS
            assert isinstance(r["labels"], list) and isinstance(json.loads(r["gt_segments"]), list)
    assert {r["source"] for r in ade} == {"ade20k_panoptic"} and {r["source"] for r in syn} == {"synthetic"}
    for c, s, a, se, o in zip(coco, syn, ade, sem, oi):
        assert c["gt_format"] == "panoptic_rgb" and se["gt_format"] == "semantic_index"
        assert o["gt_format"] == "instance_masks"
        assert c["labels"] == s["labels"] == a["labels"] == o["labels"]  # OI: Confidence-1 labels only
        full = seg_set(c)
        assert full and full == seg_set(s) == seg_set(a)
        assert seg_set(c, things_only=True) == seg_set(o)
        # semantic: one segment per class, the union of that class's panoptic segments
        by_class: dict[str, np.ndarray] = {}
        for g in load_gt_segments(c, HW):
            by_class[g.label] = by_class.get(g.label, np.zeros(HW, bool)) | g.mask
        sem_segs = load_gt_segments(se, HW)
        assert {g.label: g.mask.tobytes() for g in sem_segs} == {k: v.tobytes() for k, v in by_class.items()}
        assert all(g.isthing == (g.label in {"ball", "crate", "kite", "egg", "clock", "book", "sign", "plate"})
                   for g in sem_segs)


def test_openimages_image_list_and_negatives(synthetic_root):
    oi = f"{synthetic_root}/openimages"
    rows = list_rows(cfg_for(synthetic_root, "openimages", "val", image_list=f"{oi}/val-images-with-rotation.csv"))
    plain = list_rows(cfg_for(synthetic_root, "openimages", "val"))
    assert [r["uri"] for r in rows] == [r["uri"] for r in plain]
    assert all(Path(r["uri"]).is_file() for r in rows)
    # Confidence-0 labels never become labels
    negatives = {}
    for line in Path(f"{oi}/oidv7-val-annotations-human-imagelabels.csv").read_text().splitlines()[1:]:
        image_id, _, mid, conf = line.split(",")
        if conf == "0":
            negatives.setdefault(image_id, set()).add(int(mid[-2:]))
    classes = json.loads(Path(f"{synthetic_root}/categories.json").read_text())
    names = {c["id"]: c["name"] for c in classes}
    assert negatives
    for r in rows:
        assert not {names[i] for i in negatives.get(r["image_id"], ())} & set(r["labels"])


def test_openimages_masks_are_resized(synthetic_root, tmp_path):
    root = tmp_path / "oi"
    shutil.copytree(Path(synthetic_root) / "openimages", root)
    row = list_rows(SourceConfig(kind="openimages", uri=str(root), split="val"))[0]
    before = seg_set(row)
    for s in json.loads(row["gt_segments"]):  # store the masks at 2x the image size, like real OI
        im = Image.open(s["mask_uri"])
        im.resize((im.width * 2, im.height * 2), Image.NEAREST).save(s["mask_uri"])
    assert Image.open(json.loads(row["gt_segments"])[0]["mask_uri"]).size == (192, 192)
    assert seg_set(row) == before


def test_limit_and_shard(synthetic_root):
    base = cfg_for(synthetic_root, "coco_panoptic", "train")
    all_ids = [r["image_id"] for r in list_rows(base)]
    limited = [r["image_id"] for r in list_rows(base.model_copy(update={"limit": 7}))]
    assert limited == all_ids[:7]
    shards = [[r["image_id"] for r in list_rows(base.model_copy(update={"limit": 7, "shard": f"{i}/3"}))]
              for i in range(3)]
    assert sorted(sum(shards, [])) == limited and shards[0] == limited[0::3]
    assert [r["image_id"] for r in list_rows(base.model_copy(update={"shard": "1/2"}))] == all_ids[1::2]
    with pytest.raises(ValueError):
        SourceConfig(kind="folder", uri="x", shard="2/2")


def test_folder_reader(synthetic_root, tmp_path):
    rows = list_rows(cfg_for(synthetic_root, "folder", "val"))
    assert [r["image_id"] for r in rows] == [f"syn_{i:06d}" for i in range(18, 24)]
    assert all(r["gt_format"] == "" and r["labels"] == [] and r["gt_segments"] == "[]" for r in rows)
    # nested folders, mixed extensions, non-images ignored, duplicate ids reported
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    src = Path(rows[0]["uri"])
    shutil.copy(src, d / "a.jpg")
    shutil.copy(src, d / "sub" / "b.JPEG")
    Image.open(src).save(d / "a.png")
    (d / "notes.txt").write_text("x")
    errs: list[dict] = []
    got = list_rows(SourceConfig(kind="folder", uri=str(d)), errs)
    assert [r["image_id"] for r in got] == ["a", "sub/b"]
    assert len(errs) == 1 and errs[0]["image_id"] == "a" and "duplicate" in errs[0]["error"]
    assert [r["image_id"] for r in list_rows(SourceConfig(kind="folder", uri=str(d), pattern="sub/*"))] == ["sub/b"]
    assert [r["image_id"] for r in list_rows(SourceConfig(kind="folder", uri=f"{d}/*.png"))] == ["a"]
    with pytest.raises(UserError, match="not found"):
        list_rows(SourceConfig(kind="folder", uri=str(tmp_path / "nope")))


@pytest.fixture()
def broken_root(synthetic_root, tmp_path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(synthetic_root, root)
    return root


def test_corrupted_coco_items_become_errors(broken_root):
    ann_uri = broken_root / "coco" / "annotations" / "panoptic_val.json"
    data = json.loads(ann_uri.read_text())
    anns = data["annotations"]
    anns[0]["segments_info"][0]["category_id"] = 999  # unknown category
    (broken_root / "coco" / "annotations" / "panoptic_val" / anns[1]["file_name"]).unlink()  # missing PNG
    data["images"][2]["file_name"] = "../../x.jpg"  # path traversal
    anns[3]["segments_info"] = "oops"  # malformed
    data["annotations"].append({"no_image_id": 1})
    ann_uri.write_text(json.dumps(data))
    errs: list[dict] = []
    rows = list_rows(SourceConfig(kind="coco_panoptic", uri=str(broken_root / "coco"), split="val"), errs)
    assert [r["image_id"] for r in rows] == ["syn_000022", "syn_000023"]
    assert len(errs) == 5 and all(e["stage"] == "source" for e in errs)
    by_id = {e["image_id"]: e["error"] for e in errs}
    assert "unknown category_id 999" in by_id["syn_000018"]
    assert "PNG not found" in by_id["syn_000019"]
    assert "escapes" in by_id["../../x"]
    assert "segments_info" in by_id["syn_000021"]
    # the ids that reach file names downstream are sanitised
    assert "/" not in safe_name("../../x") and ".." not in safe_name("../../x")
    assert safe_name("../x") != safe_name("__x")


def test_missing_annotation_file_is_a_user_error(broken_root):
    (broken_root / "coco" / "annotations" / "panoptic_val.json").unlink()
    with pytest.raises(UserError, match="panoptic_val.json"):
        list_rows(SourceConfig(kind="coco_panoptic", uri=str(broken_root / "coco"), split="val"))
    (broken_root / "coco" / "annotations" / "panoptic_train.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        list_rows(SourceConfig(kind="coco_panoptic", uri=str(broken_root / "coco"), split="train"))
    (broken_root / "ADEChallengeData2016" / "objectInfo150.txt").unlink()
    with pytest.raises(UserError, match="objectInfo150.txt"):
        list_rows(SourceConfig(kind="ade20k", uri=str(broken_root / "ADEChallengeData2016"), split="val"))
    (broken_root / "openimages" / "oidv7-class-descriptions.csv").unlink()
    with pytest.raises(UserError, match="class descriptions"):
        list_rows(SourceConfig(kind="openimages", uri=str(broken_root / "openimages"), split="val"))


def test_corrupted_openimages_lines_become_errors(broken_root):
    oi = broken_root / "openimages"
    seg_csv = oi / "val-annotations-object-segmentation.csv"
    lines = seg_csv.read_text().splitlines()
    n_segs = len(lines) - 1
    lines.insert(2, "garbage,line")  # wrong number of cells
    lines.insert(3, "x.png,syn_000019,/m/nope,b,0,1,0,1,0.9,")  # unknown MID
    seg_csv.write_text("\n".join(lines) + "\n")
    first_mask = lines[1].split(",")[0]
    (oi / "masks" / "val" / first_mask).unlink()  # missing mask PNG
    lab_csv = oi / "oidv7-val-annotations-human-imagelabels.csv"
    lab_csv.write_text(lab_csv.read_text() + 'syn_000020,verification,"/m/0syn01\n')  # unterminated quote
    errs: list[dict] = []
    rows = list_rows(SourceConfig(kind="openimages", uri=str(oi), split="val"), errs)
    assert len(rows) == 6
    assert sum(len(json.loads(r["gt_segments"])) for r in rows) == n_segs - 1
    kinds = sorted(e["error"].split(":")[0] for e in errs)
    assert len(errs) == 4, errs
    assert any("mask PNG not found" in e["error"] and first_mask in e["error"] for e in errs)
    assert any("unknown MID" in e["error"] for e in errs)
    assert sum("bad CSV line" in e["error"] for e in errs) == 3, kinds


def test_ade_semantic_missing_png_and_bad_class_line(broken_root):
    ade = broken_root / "ADEChallengeData2016"
    (ade / "annotations" / "validation" / "syn_000020.png").unlink()
    with open(ade / "objectInfo150.txt", "a") as f:
        f.write("notanumber\t0.1\t1\t1\tthing\n")
    errs: list[dict] = []
    rows = list_rows(SourceConfig(kind="ade20k", uri=str(ade), split="validation"), errs)
    assert "syn_000020" not in [r["image_id"] for r in rows] and len(rows) == 5
    assert len(errs) == 2
    assert {len(json.loads(r["gt_segments"])) for r in rows} == {13}


def test_gt_errors_name_the_file(synthetic_root, tmp_path):
    row = dict(list_rows(cfg_for(synthetic_root, "coco_panoptic", "val"))[0])
    with pytest.raises(ValueError, match="image is 50x40"):
        load_gt_segments(row, (40, 50))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="bad.png"):
        load_gt_segments({**row, "gt_png_uri": str(bad)}, HW)
    with pytest.raises(ValueError, match="not found.*missing.png"):
        load_gt_segments({**row, "gt_png_uri": str(tmp_path / "missing.png")}, HW)
    assert load_gt_segments({**row, "gt_format": ""}, HW) == []
    assert len(load_gt_segments(row, None)) == len(json.loads(row["gt_segments"]))


@pytest.fixture(scope="module")
def http_root(synthetic_root):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a, **k):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Quiet, directory=synthetic_root))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_coco_over_http(synthetic_root, http_root):
    local = list_rows(cfg_for(synthetic_root, "coco_panoptic", "val"))
    errs: list[dict] = []
    remote = list_rows(SourceConfig(kind="coco_panoptic", uri=f"{http_root}/coco", split="val"), errs)
    assert errs == []
    assert [r["image_id"] for r in remote] == [r["image_id"] for r in local]
    assert remote[0]["uri"].startswith("http://127.0.0.1:") and remote[0]["gt_png_uri"].startswith("http://")
    assert seg_set(remote[0]) == seg_set(local[0])
    from ragseg.io import read_bytes

    assert read_bytes(remote[0]["uri"]) == Path(local[0]["uri"]).read_bytes()


def test_folder_listing_pages_local_and_s3(tmp_path, s3_server, monkeypatch):
    """A folder is listed a page at a time (os.scandir locally, ListObjectsV2 pages of 1000 keys on
    S3): more than one page each, nested keys, non-images and a glob pattern, same rows as expected."""
    import fsspec

    from ragseg.sources import folder, list_table

    monkeypatch.setattr(folder, "LOCAL_PAGE", 7)
    names = [f"d{i % 3}/im{i:05d}.jpg" for i in range(1205)] + ["top.png", "notes.txt", "d0/x.y.JPG"]
    want = sorted(posixpath.splitext(n)[0] for n in names if not n.endswith(".txt"))
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    fs = fsspec.filesystem("s3")
    fs.mkdir("pages")
    fs.pipe({f"pages/imgs/{n}": b"" for n in names})
    for uri in (str(tmp_path), "s3://pages/imgs"):
        t = list_table(SourceConfig(kind="folder", uri=uri))
        assert t.column("image_id").to_pylist() == want, uri
        assert t.column("uri")[0].as_py() == f"{uri}/d0/im00000.jpg"
        sub = list_table(SourceConfig(kind="folder", uri=uri, pattern="d1/*.jpg")).column("image_id").to_pylist()
        assert sub == [w for w in want if w.startswith("d1/")]
