"""Readers on data sets written by hand from the published format descriptions (not by make-synthetic):

- ADEChallengeData2016 (SceneParsing, http://sceneparsing.csail.mit.edu): ``objectInfo150.txt``
  tab-separated ``Idx Ratio Train Val Name`` with comma-separated synonyms, lines copied verbatim
  from the file (github.com/CSAILVision/sceneparsing/objectInfo150.txt, trailing spaces included),
  ``images/validation/*.jpg``, ``annotations/validation/*.png`` (class index, 0 = other);
- the CSAIL segmentation repository's ``data/object150_info.csv``
  (github.com/CSAILVision/semantic-segmentation-pytorch): ``Idx,Ratio,Train,Val,Stuff,Name`` with
  ``;`` between the words of the synonyms, lines copied verbatim;
- the ADE20k panoptic layout written by Mask2Former's ``datasets/prepare_ade20k_pan_seg.py``: string
  image ids (the file stem), category ids = class index - 1, names of ``ADE20K_150_CATEGORIES``
  (``road, route``, ``window `` with its trailing space);
- COCO panoptic 2017 (cocodataset.org/#format-data, "Panoptic Segmentation"): integer image ids,
  ``file_name`` of the image and of the PNG, ``id = R + 256 G + 256^2 B``;
- Open Images V7 as the official downloader writes it (``<dir>/<split>/<ImageID>.jpg``) with the
  V7 CSVs (``oidv7-class-descriptions.csv``: LabelName,DisplayName; image labels:
  ImageID,Source,LabelName,Confidence; the V7 download page,
  storage.googleapis.com/openimages/web/download_v7.html), and the public bucket
  ``s3://open-images-dataset/<split>/`` (served here by moto on 127.0.0.1, read with anonymous access);
  ImageIDs are 16 hex digits. A partial download: full-split CSVs, some images.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ragseg.config import JobConfig, SourceConfig
from ragseg.errors import UserError
from ragseg.masks import id_to_rgb
from ragseg.sources import ROW_COLUMNS, list_rows
from ragseg.sources.gt import load_gt_segments

# verbatim lines of objectInfo150.txt (note "22 " and the trailing spaces of "windowpane, window ")
OBJECT_INFO_TXT = (
    "Idx\tRatio\tTrain\tVal\tName\n"
    "1\t0.1576\t11664\t1172\twall\n"
    "5\t0.0480\t6678\t641\ttree\n"
    "7\t0.0398\t4023\t408\troad, route\n"
    "9\t0.0198\t4688\t460\twindowpane, window \n"
    "13\t0.0160\t5075\t526\tperson, individual, someone, somebody, mortal, soul\n"
    "21\t0.0098\t3164\t306\tcar, auto, automobile, machine, motorcar\n"
    "22 \t0.0074\t709\t75\twater\n"
    "45\t0.0019\t549\t46\tchest of drawers, chest, bureau, dresser\n"
)
# the same classes in the CSAIL CSV (verbatim lines; its Stuff column differs from the panoptic split
# for "tree", and class 21 starts with "auto")
OBJECT150_INFO_CSV = (
    "Idx,Ratio,Train,Val,Stuff,Name\n"
    "1,0.1576,11664,1172,1,wall\n"
    "5,0.0480,6678,641,0,tree\n"
    "7,0.0398,4023,408,1,road;route\n"
    "9,0.0198,4688,460,0,windowpane;window\n"
    "13,0.0160,5075,526,0,person;individual;someone;somebody;mortal;soul\n"
    "21,0.0098,3164,306,0,auto;automobile;machine;motorcar\n"
    "22,0.0074,709,75,1,water\n"
    "45,0.0019,549,46,0,chest;of;drawers;chest;bureau;dresser\n"
)
# (class index, Mask2Former ADE20K_150_CATEGORIES name, isthing) of the same classes
M2F = [(1, "wall", 0), (5, "tree", 0), (7, "road, route", 0), (9, "window ", 1), (13, "person", 1),
       (21, "car", 1), (22, "water", 0), (45, "chest of drawers, chest, bureau, dresser", 1)]
EXPECTED = {1: ("wall", False), 5: ("tree", False), 7: ("road", False), 9: ("window", True),
            13: ("person", True), 21: ("car", True), 22: ("water", False), 45: ("chest of drawers", True)}
H = W = 32
STEM = "ADE_val_00000001"


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(h: int = H, w: int = W, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _class_map() -> np.ndarray:
    """A class-index map: wall top, road bottom, a window, two persons (one instance map later), 0 = other."""
    sem = np.zeros((H, W), np.uint8)
    sem[1:12, :] = 1
    sem[12:31, :] = 7
    sem[3:9, 3:9] = 9
    sem[14:20, 4:10] = 13
    sem[14:20, 20:26] = 13
    sem[22:28, 12:18] = 21
    return sem


@pytest.fixture()
def ade_parent(tmp_path) -> Path:
    """<tmp>/datasets/ADEChallengeData2016 in the SceneParsing layout plus Mask2Former's panoptic files."""
    root = tmp_path / "datasets" / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    (root / "ade20k_panoptic_val").mkdir()
    (root / "objectInfo150.txt").write_text(OBJECT_INFO_TXT)
    (root / "images" / "validation" / f"{STEM}.jpg").write_bytes(_jpeg())
    sem = _class_map()
    (root / "annotations" / "validation" / f"{STEM}.png").write_bytes(_png(sem))
    # panoptic: stuff = one segment per class, things = one per instance (the two persons split)
    pan = np.zeros((H, W), np.uint32)
    segs = []
    next_id = 1
    for idx, _, _ in M2F:
        mask = sem == idx
        if not mask.any():
            continue
        parts = [mask]
        if idx == 13:
            left = mask.copy()
            left[:, 16:] = False
            parts = [left, mask & ~left]
        for m in parts:
            sid = idx * 1000 + next_id
            next_id += 1
            pan[m] = sid
            ys, xs = np.nonzero(m)
            segs.append({"id": sid, "category_id": idx - 1, "area": int(m.sum()), "iscrowd": 0,
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)]})
    (root / "ade20k_panoptic_val" / f"{STEM}.png").write_bytes(_png(id_to_rgb(pan)))
    doc = {"images": [{"id": STEM, "file_name": f"{STEM}.jpg", "width": W, "height": H}],
           "annotations": [{"image_id": STEM, "file_name": f"{STEM}.png", "segments_info": segs}],
           "categories": [{"id": idx - 1, "name": name, "isthing": thing, "color": [idx, idx, idx]}
                          for idx, name, thing in M2F]}
    (root / "ade20k_panoptic_val.json").write_text(json.dumps(doc))
    return tmp_path / "datasets"


def _labels(rows) -> dict[int, tuple[str, bool]]:
    return {s["id"]: (s["label"], s["isthing"]) for s in json.loads(rows[0]["gt_segments"])}


# ---------- ADE20k ----------
def test_packaged_ade150_table():
    from ragseg.sources.ade20k import ade150

    table = ade150()
    assert sorted(table) == list(range(1, 151))
    assert sum(c["isthing"] for c in table.values()) == 100  # the ADE20k panoptic split: 100 things, 50 stuff
    for c in table.values():
        info = [s.strip() for s in c["object_info_name"].split(",")]
        assert c["name"] == c["panoptic_name"].split(",")[0].strip()
        assert c["name"] in info or c["name"] == "pool", c  # "swimming pool, ..." is "pool" in the panoptic data
        assert set(info) - {c["name"]} <= set(c["synonyms"])
    assert (table[9]["name"], table[9]["isthing"]) == ("window", 1)
    assert (table[5]["name"], table[5]["isthing"]) == ("tree", 0)


@pytest.mark.parametrize("where", ["parent", "dataset"])
def test_ade_semantic_reads_object_info_txt(ade_parent, where):
    uri = ade_parent if where == "parent" else ade_parent / "ADEChallengeData2016"
    errs: list[dict] = []
    rows = list_rows(SourceConfig(kind="ade20k", uri=str(uri), split="val"), errs)
    assert errs == [] and len(rows) == 1 and list(rows[0]) == ROW_COLUMNS
    assert _labels(rows) == EXPECTED
    r = rows[0]
    assert r["image_id"] == STEM and r["file_name"] == f"{STEM}.jpg" and r["coco_id"] == ""
    got = {s.label: int(s.mask.sum()) for s in load_gt_segments(r, (H, W))}
    sem = _class_map()
    assert got == {EXPECTED[i][0]: int((sem == i).sum()) for i in (1, 7, 9, 13, 21)}


def test_ade_semantic_reads_the_csail_csv(ade_parent):
    root = ade_parent / "ADEChallengeData2016"
    (root / "objectInfo150.txt").unlink()
    (root / "objectInfo150.csv").write_text(OBJECT150_INFO_CSV)  # the fallback name
    assert _labels(list_rows(SourceConfig(kind="ade20k", uri=str(root), split="validation"))) == EXPECTED
    csv = root / "object150_info.csv"
    csv.write_text(OBJECT150_INFO_CSV + "151,0.0001,1,1,0,gizmo;widget\n152,0.0001,1,1,1,goo\n")
    labels = _labels(list_rows(SourceConfig(kind="ade20k", uri=str(root), split="val", class_list=str(csv))))
    # a class outside the 150: first synonym, isthing from the Stuff column
    assert labels == {**EXPECTED, 151: ("gizmo", True), 152: ("goo", False)}


def test_ade_categories_file_and_isthing_column_win(ade_parent):
    root = ade_parent / "ADEChallengeData2016"
    cats = root / "cats.json"
    cats.write_text(json.dumps([{"id": 1, "name": "road, route", "isthing": 1}]))
    labels = _labels(list_rows(SourceConfig(kind="ade20k", uri=str(root), split="val", categories=str(cats))))
    assert labels[7] == ("road", True) and labels[9] == ("window", True)
    (root / "objectInfo150.txt").write_text("Idx\tName\tisthing\n7\troad, route\t1\n9\twindowpane, window \t0\n")
    labels = _labels(list_rows(SourceConfig(kind="ade20k", uri=str(root), split="val")))
    assert labels == {7: ("road", True), 9: ("window", False)}
    (root / "objectInfo150.txt").write_text("Index;Class\n1;wall\n")
    with pytest.raises(UserError, match="needs 'Idx' and 'Name' columns"):
        list_rows(SourceConfig(kind="ade20k", uri=str(root), split="val"))
    (root / "objectInfo150.txt").unlink()
    with pytest.raises(UserError, match="objectInfo150.txt"):
        list_rows(SourceConfig(kind="ade20k", uri=str(ade_parent), split="val"))


def test_ade_panoptic_gets_the_same_names(ade_parent):
    errs: list[dict] = []
    pan = list_rows(SourceConfig(kind="ade20k_panoptic", uri=str(ade_parent), split="val"), errs)
    sem = list_rows(SourceConfig(kind="ade20k", uri=str(ade_parent), split="val"))
    assert errs == [] and len(pan) == 1 and list(pan[0]) == ROW_COLUMNS
    r = pan[0]
    assert json.loads(r["coco_id"]) == STEM and r["file_name"] == f"{STEM}.jpg" and r["image_id"] == STEM
    assert r["labels"] == ["car", "person", "road", "wall", "window"]
    pan_segs = load_gt_segments(r, (H, W))
    sem_segs = {s.label: s for s in load_gt_segments(sem[0], (H, W))}
    assert {s.label for s in pan_segs} == set(sem_segs)
    for s in pan_segs:  # same label, same thing/stuff flag, the panoptic masks tile the semantic ones
        assert s.isthing == sem_segs[s.label].isthing
        assert not (s.mask & ~sem_segs[s.label].mask).any()
    assert sum(s.label == "person" for s in pan_segs) == 2


# ---------- COCO ----------
def _coco(tmp_path: Path, listed_extra: bool = False) -> Path:
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    (root / "val2017" / "000000000139.jpg").write_bytes(_jpeg(16, 16))
    ids = np.zeros((16, 16), np.uint32)
    ids[:8] = 3226956  # a real-looking id: R + 256 G + 256^2 B
    ids[8:] = 6979964
    (root / "annotations" / "panoptic_val2017" / "000000000139.png").write_bytes(_png(id_to_rgb(ids)))
    segs = [{"id": 3226956, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 16, 8], "area": 128},
            {"id": 6979964, "category_id": 184, "iscrowd": 0, "bbox": [0, 8, 16, 8], "area": 128}]
    if listed_extra:
        segs.append({"id": 1234, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1})
    doc = {"images": [{"id": 139, "file_name": "000000000139.jpg", "height": 16, "width": 16}],
           "annotations": [{"image_id": 139, "file_name": "000000000139.png", "segments_info": segs}],
           "categories": [{"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
                          {"id": 184, "name": "tree-merged", "isthing": 0, "supercategory": "plant"}]}
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    return root


def test_coco_rows_keep_the_json_id_type_and_file_name(tmp_path):
    rows = list_rows(SourceConfig(kind="coco_panoptic", uri=str(_coco(tmp_path)), split="val2017"))
    r = rows[0]
    assert r["image_id"] == "000000000139" and r["file_name"] == "000000000139.jpg"
    assert json.loads(r["coco_id"]) == 139 and isinstance(json.loads(r["coco_id"]), int)
    assert [s.label for s in load_gt_segments(r, (16, 16))] == ["person", "tree-merged"]


def test_gt_segment_absent_from_its_png_is_an_error_row(tmp_path):
    from ragseg.stages.decode import DecodeImages, LoadGroundTruth

    row = list_rows(SourceConfig(kind="coco_panoptic", uri=str(_coco(tmp_path, listed_extra=True)),
                                 split="val2017"))[0]
    batch = {k: np.array([v], dtype=object) for k, v in row.items()} | {"error": np.array([""], dtype=object)}
    cfg = JobConfig()
    out = LoadGroundTruth(cfg)(DecodeImages(cfg)(batch))
    err = str(out["error"][0])
    assert err.startswith("gt: ValueError: image 000000000139: segment id 1234 (person) listed in the "
                          "ground-truth JSON but absent from its PNG"), err
    assert "000000000139.png" in err and list(out["seg_ids"][0]) == []


# ---------- Open Images ----------
OI_IDS = ["0001eeaf4aed83f9", "000595fe6fee6369"]


def _openimages(root: Path, images_at: str | None = "validation") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "oidv7-class-descriptions.csv").write_text("LabelName,DisplayName\n/m/01g317,Person\n/m/0k4j,Car\n")
    (root / "oidv7-validation-annotations-human-imagelabels.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n"
        f"{OI_IDS[0]},verification,/m/01g317,1\n{OI_IDS[1]},crowdsource-verified,/m/0k4j,1\n"
        f"{OI_IDS[1]},verification,/m/01g317,0\n")
    if images_at:
        (root / images_at).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(OI_IDS):
            (root / images_at / f"{i}.jpg").write_bytes(_jpeg(seed=k))
    return root


@pytest.mark.parametrize("images_at", ["validation", "images/validation"])
def test_openimages_finds_the_downloader_layout(tmp_path, images_at):
    root = _openimages(tmp_path / "oi", images_at)
    rows = list_rows(SourceConfig(kind="openimages", uri=str(root), split="validation"))
    assert [r["uri"] for r in rows] == [str(root / images_at / f"{i}.jpg") for i in OI_IDS]
    assert [r["labels"] for r in rows] == [["Person"], ["Car"]]
    assert rows[0]["file_name"] == f"{OI_IDS[0]}.jpg"


def test_openimages_without_images_stops_with_one_line(tmp_path, caplog):
    root = _openimages(tmp_path / "oi", None)
    with pytest.raises(UserError) as e:
        list_rows(SourceConfig(kind="openimages", uri=str(root), split="validation"))
    msg = str(e.value)
    assert "\n" not in msg and OI_IDS[0] in msg
    assert f"found in {root}/images/validation or " in msg and f" or {root}/validation or " in msg
    # an explicit images_dir is trusted: the rows are listed (their images become decode error rows),
    # with one warning that none is there
    rows = list_rows(SourceConfig(kind="openimages", uri=str(root), split="validation",
                                  images_dir=str(tmp_path / "elsewhere")))
    assert [r["uri"] for r in rows] == [f"{tmp_path}/elsewhere/{i}.jpg" for i in OI_IDS]
    warned = [r.getMessage() for r in caplog.records if "annotated images present" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"Open Images: 0 of 2 annotated images present in {tmp_path}/elsewhere")


def _hex_ids(n: int, seed: int) -> list[str]:
    """ImageIDs as Open Images has them: 16 random hex digits."""
    rng = np.random.default_rng(seed)
    return sorted({"".join(f"{b:02x}" for b in rng.integers(0, 256, 8)) for _ in range(n)})


def _openimages_labels(root: Path, ids: list[str]) -> None:
    """The V7 CSVs for ``ids`` (format as in the module docstring: oidv7-class-descriptions.csv and
    oidv7-validation-annotations-human-imagelabels.csv)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oidv7-class-descriptions.csv").write_text("LabelName,DisplayName\n/m/01g317,Person\n/m/0k4j,Car\n")
    (root / "oidv7-validation-annotations-human-imagelabels.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n" + "".join(f"{i},verification,/m/01g317,1\n" for i in ids))


@pytest.mark.parametrize("explicit", [False, True])
def test_openimages_partial_download(tmp_path, caplog, explicit):
    """Full-split CSVs, a few images on disk (the last ones in ImageID order, so that probing the first
    sorted ids would find none): the folder is found by its contents (or trusted when given), every
    annotated image gets a row, and one warning gives the counts up front."""
    ids = _hex_ids(20_000, seed=3)
    root = tmp_path / "oi"
    _openimages_labels(root, ids)
    present = ids[-4:]
    (root / "validation").mkdir()
    for k, i in enumerate(present):
        (root / "validation" / f"{i}.jpg").write_bytes(_jpeg(seed=k))
    (root / "validation" / "README.txt").write_text("not an image")
    cfg = SourceConfig(kind="openimages", uri=str(root), split="validation",
                       images_dir=str(root / "validation") if explicit else None)
    rows = list_rows(cfg)
    assert len(rows) == len(ids) and rows[-1]["uri"] == str(root / "validation" / f"{ids[-1]}.jpg")
    warned = [r.getMessage() for r in caplog.records if "annotated images present" in r.getMessage()]
    assert warned == [f"Open Images: 4 of 20k annotated images present in {root}/validation; rows for the others "
                      "go to the errors table; use `source.image_list` (a file of ImageIDs) to restrict the job "
                      "to the images you have"]
    # the fix it names: a file of ImageIDs (one a line, no header) restricts the job to them, no warning
    caplog.clear()
    (tmp_path / "have.txt").write_text("".join(i + "\n" for i in present))
    rows = list_rows(cfg.model_copy(update={"image_list": str(tmp_path / "have.txt")}))
    assert [r["image_id"] for r in rows] == present and all(r["labels"] == ["Person"] for r in rows)
    assert all(os.path.exists(r["uri"]) for r in rows)
    assert not [r for r in caplog.records if "annotated images present" in r.getMessage()]


def test_openimages_most_images_present_no_warning(tmp_path, caplog):
    ids = _hex_ids(10, seed=4)
    root = tmp_path / "oi"
    _openimages_labels(root, ids)
    (root / "images" / "validation").mkdir(parents=True)
    for i in ids[:6]:
        (root / "images" / "validation" / f"{i}.jpg").write_bytes(b"x")
    rows = list_rows(SourceConfig(kind="openimages", uri=str(root), split="validation"))
    assert len(rows) == 10 and rows[0]["uri"].startswith(f"{root}/images/validation/")
    assert not [r for r in caplog.records if "annotated images present" in r.getMessage()]


@pytest.fixture()
def moto_s3(monkeypatch, moto_starter):
    proc, endpoint = moto_starter()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # no credentials anywhere: only anonymous requests can work
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait(timeout=10)


def test_openimages_public_bucket_with_anonymous_access(tmp_path, moto_s3):
    import boto3

    from ragseg import io as rio
    from ragseg.stages.decode import DecodeImages

    s3 = boto3.client("s3", endpoint_url=moto_s3, aws_access_key_id="x",
                      aws_secret_access_key="x", region_name="us-east-1")
    s3.create_bucket(Bucket="open-images-dataset", ACL="public-read")  # public, as the real bucket
    for k, i in enumerate(OI_IDS):
        s3.put_object(Bucket="open-images-dataset", Key=f"validation/{i}.jpg", Body=_jpeg(seed=k), ACL="public-read")
    root = _openimages(tmp_path / "oi", None)  # CSVs local, images in the bucket
    cfg = SourceConfig(kind="openimages", uri=str(root), split="validation",
                       images_dir="s3://open-images-dataset/validation/", storage_options={"anon": True})
    rows = list_rows(cfg)
    assert [r["uri"] for r in rows] == [f"s3://open-images-dataset/validation/{i}.jpg" for i in OI_IDS]
    assert rio.fs_and_path(rows[0]["uri"])[0].anon is True
    assert rio.storage_options(str(root)) == {}  # local paths are left alone
    # a worker process starts without the driver's registrations: the stage registers them itself
    rio._STORAGE_OPTIONS.clear()
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]} | \
        {"error": np.array(["", ""], dtype=object)}
    out = DecodeImages(JobConfig(source=cfg))(batch)
    assert list(out["error"]) == ["", ""] and [im.shape for im in out["image"]] == [(H, W, 3)] * 2
    rio._STORAGE_OPTIONS.clear()
    # without anonymous access there are no credentials to sign with: one line naming the folder
    with pytest.raises(UserError, match="image folder s3://open-images-dataset/validation/ cannot be read"):
        list_rows(cfg.model_copy(update={"storage_options": {}}))


def test_openimages_partial_bucket_is_judged_by_one_listing_page(tmp_path, moto_s3, caplog, monkeypatch):
    """An images folder in a bucket: one ListObjectsV2 page (here 5 keys) decides. 10 of 40 annotated
    images are there (every 4th in ImageID order): the page holds the first 5 present, the 5th of them is
    the 17th annotated id, so about 5 / 17 * 40 = 12 are estimated present."""
    import boto3

    from ragseg.sources import openimages

    monkeypatch.setattr(openimages, "LISTING_PAGE", 5)
    s3 = boto3.client("s3", endpoint_url=moto_s3, aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    s3.create_bucket(Bucket="oi-partial", ACL="public-read")
    ids = _hex_ids(40, seed=5)
    for i in ids[::4]:
        s3.put_object(Bucket="oi-partial", Key=f"validation/{i}.jpg", Body=b"x", ACL="public-read")
    root = tmp_path / "oi"
    _openimages_labels(root, ids)
    cfg = SourceConfig(kind="openimages", uri=str(root), split="validation",
                       images_dir="s3://oi-partial/validation", storage_options={"anon": True})
    rows = list_rows(cfg)
    assert len(rows) == 40
    warned = [r.getMessage() for r in caplog.records if "annotated images present" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("Open Images: about 12 of 40 annotated images present in "
                                                     "s3://oi-partial/validation (estimated from one listing page")
    # a page that is the whole folder counts exactly
    caplog.clear()
    monkeypatch.setattr(openimages, "LISTING_PAGE", 1000)
    list_rows(cfg)
    warned = [r.getMessage() for r in caplog.records if "annotated images present" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("Open Images: 10 of 40 annotated images present")


# ---------- index store ----------
def test_prune_removes_the_empty_staging_folder(tmp_path):
    from ragseg.index.versions import STAGING, prune

    store = tmp_path / "index"
    (store / STAGING / "killed-build").mkdir(parents=True)
    prune(str(store), keep=1, grace_s=3600)  # a recent staging dir (maybe a build in progress) stays
    assert (store / STAGING / "killed-build").is_dir()
    prune(str(store), keep=1, grace_s=0)
    assert not (store / STAGING).exists()


# ---------- vocabulary ----------
def test_ade_panoptic_categories_as_vocabulary_match_the_db_labels(ade_parent):
    """A vocabulary made of the ground truth's categories keeps their ids and names and matches the
    labels the ADE readers give (``road`` -> ``road, route``); words shared by classes match none."""
    from ragseg.sources.ade20k import ade150
    from ragseg.vocab import load_vocab, parse_vocab

    v = load_vocab(str(ade_parent / "ADEChallengeData2016" / "ade20k_panoptic_val.json"))
    assert v.ids == [idx - 1 for idx, _, _ in M2F] and v.names[3] == "window"
    for idx, (label, _) in EXPECTED.items():
        assert v.index_of(label) == [i for i, _, _ in M2F].index(idx), label
    assert v.names[v.index_of("route")] == "road, route" and v.names[v.index_of("bureau")].startswith("chest of")
    full = parse_vocab(json.dumps([{"id": c["id"] - 1, "name": c["panoptic_name"], "isthing": c["isthing"]}
                                   for c in ade150().values()]))
    assert all(full.index_of(c["name"]) == c["id"] - 1 for c in ade150().values())
    info = parse_vocab(json.dumps([{"id": c["id"], "name": c["object_info_name"], "isthing": c["isthing"]}
                                   for c in ade150().values()]))
    assert info.index_of("window") == 8 and info.index_of("road") == 6 and info.index_of("car") == 20
    assert info.index_of("screen") == 130  # first synonym of class 131, also a later synonym of 59 and 64
    assert info.index_of("ground") is None  # "earth, ground" and "land, ground, soil"
