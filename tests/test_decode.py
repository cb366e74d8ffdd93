"""DecodeImages / LoadGroundTruth: unit checks and a real Ray Data run over the synthetic set."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ragseg.config import JobConfig, SourceConfig
from ragseg.masks import decode_rle
from ragseg.sources import list_rows, read_source
from ragseg.sources.gt import load_gt_segments
from ragseg.stages.decode import DecodeImages, LoadGroundTruth, decode_image


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in rows[0]:
        col = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            col[i] = r[k]
        out[k] = col
    return out


def test_decode_image_exif_modes_and_truncation():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img = decode_image(_jpeg(arr, exif=exif))
    assert img.shape == (30, 20, 3) and img.dtype == np.uint8
    gray = io.BytesIO()
    Image.fromarray(arr[..., 0]).save(gray, format="PNG")
    assert decode_image(gray.getvalue()).shape == (20, 30, 3)
    rgba = io.BytesIO()
    Image.fromarray(np.dstack([arr, arr[..., :1]])).save(rgba, format="PNG")
    assert decode_image(rgba.getvalue()).shape == (20, 30, 3)
    data = _jpeg(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2])
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):
        decode_image(b"not an image")


@pytest.fixture()
def broken_val(synthetic_root, tmp_path) -> Path:
    root = tmp_path / "s"
    shutil.copytree(Path(synthetic_root) / "coco", root / "coco")
    jpg = root / "coco" / "val" / "syn_000019.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 2])  # truncated JPEG
    return root


def test_decode_and_gt_batch_without_ray(broken_val):
    cfg = JobConfig()
    rows = [{**r, "error": ""} for r in list_rows(SourceConfig(kind="synthetic", uri=str(broken_val), split="val"))]
    rows[2]["error"] = "source: earlier failure"
    rows[3]["uri"] = str(broken_val / "missing.jpg")
    out = DecodeImages(cfg)(_batch(rows))
    errs = list(out["error"])
    assert errs[1].startswith("decode: OSError") and "syn_000019.jpg" in errs[1]
    assert errs[2] == "source: earlier failure"
    assert errs[3].startswith("decode: FileNotFoundError") and "missing.jpg" in errs[3]
    assert errs[0] == errs[4] == errs[5] == ""
    for i in (0, 4, 5):
        assert out["image"][i].shape == (96, 96, 3) and out["height"][i] == out["width"][i] == 96
    for i in (1, 2, 3):
        assert out["image"][i].size == 0 and out["height"][i] == 0
    gt = LoadGroundTruth(cfg)(out)
    for i in (1, 2, 3):
        assert gt["seg_masks_rle"][i] == [] and gt["error"][i] == errs[i]
    ref = load_gt_segments(rows[0], (96, 96))
    assert gt["seg_ids"][0] == [s.segment_id for s in ref if s.mask.sum() >= cfg.build_db.min_segment_area]
    assert gt["seg_scores"][0] == [1.0] * len(gt["seg_ids"][0])
    for rle, s in zip(gt["seg_masks_rle"][0], [s for s in ref if s.segment_id in gt["seg_ids"][0]]):
        assert np.array_equal(decode_rle(rle), s.mask)


def test_gt_crowd_min_area_and_bad_annotation(synthetic_root):
    row = {**list_rows(SourceConfig(kind="synthetic", uri=synthetic_root, split="val"))[0], "error": ""}
    segs = json.loads(row["gt_segments"])
    areas = {s.segment_id: int(s.mask.sum()) for s in load_gt_segments(row, (96, 96))}
    segs[0]["iscrowd"] = True
    row["gt_segments"] = json.dumps(segs)
    batch = {**_batch([row]), "height": np.array([96]), "width": np.array([96])}
    cfg = JobConfig.model_validate({"build_db": {"min_segment_area": 0}})
    assert segs[0]["id"] not in LoadGroundTruth(cfg)(batch)["seg_ids"][0]
    with_crowd = LoadGroundTruth(cfg, SourceConfig(kind="synthetic", uri="x", include_crowd=True))(batch)
    assert with_crowd["seg_ids"][0] == [s["id"] for s in segs]
    big = sorted(areas.values())[1]
    cfg2 = JobConfig.model_validate({"build_db": {"min_segment_area": big}})
    kept = LoadGroundTruth(cfg2, SourceConfig(kind="synthetic", uri="x", include_crowd=True))(batch)["seg_ids"][0]
    assert kept == [i for i, a in areas.items() if a >= big]
    bad = {**batch, "gt_png_uri": np.array(["/nonexistent/x.png"], dtype=object)}
    res = LoadGroundTruth(cfg)(bad)
    assert res["error"][0].startswith("gt: ValueError") and "/nonexistent/x.png" in res["error"][0]
    assert res["seg_labels"][0] == []


def test_ray_pipeline_with_corrupt_image(ray_local, broken_val):
    cfg = JobConfig()
    src = SourceConfig(kind="synthetic", uri=str(broken_val), split="val")
    errors: list[dict] = []
    ds = read_source(src, errors, images_per_block=2)
    assert errors == []
    ds = ds.map_batches(DecodeImages(cfg), batch_format="numpy", batch_size=4)
    ds = ds.map_batches(LoadGroundTruth(cfg, src), batch_format="numpy", batch_size=4)
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    assert [r["image_id"] for r in rows] == [f"syn_{i:06d}" for i in range(18, 24)]
    bad = [r for r in rows if r["error"]]
    assert [r["image_id"] for r in bad] == ["syn_000019"] and bad[0]["error"].startswith("decode: ")
    for r in rows:
        if r["error"]:
            assert len(r["seg_labels"]) == 0
            continue
        assert np.asarray(r["image"]).shape == (96, 96, 3) and r["height"] == 96
        ref = [s for s in load_gt_segments(r, (96, 96)) if s.mask.sum() >= cfg.build_db.min_segment_area]
        assert list(r["seg_labels"]) == [s.label for s in ref]
        assert list(r["seg_isthing"]) == [s.isthing for s in ref]
        assert np.array_equal(decode_rle(r["seg_masks_rle"][0]), ref[0].mask)
        assert list(r["labels"]) == sorted({s.label for s in load_gt_segments(r, (96, 96))})
