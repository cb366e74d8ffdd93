"""ragseg visualize on a small hand-made label output: overlays, thumbnails, index.html."""

from __future__ import annotations

import html
import io
import json

import fsspec
import numpy as np
import pytest
from PIL import Image

from ragseg import io as rio
from ragseg.masks import id_to_rgb
from ragseg.pipelines.visualize import render_overlay, segment_color, visualize

EVIL = 'tree <b>&"x"'


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _make_label_output(root: str) -> tuple[str, str]:
    """images/a.jpg (32x24), images/sub/b.png (20x20); a label output for a, sub/b and a missing image."""
    images = rio.join(root, "images")
    pred = rio.join(root, "pred")
    rng = np.random.default_rng(0)
    img_a = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    img_b = np.full((20, 20, 3), 40, np.uint8)
    rio.write_bytes_atomic(rio.join(images, "a.jpg"), _png(img_a, "JPEG"))
    rio.write_bytes_atomic(rio.join(images, "sub", "b.png"), _png(img_b))

    ids_a = np.zeros((24, 32), np.uint32)
    ids_a[2:12, 2:14] = 1
    ids_a[12:24, 16:32] = 2 + 256  # G channel in use
    ids_b = np.zeros((20, 20), np.uint32)
    ids_b[:, :10] = 3
    ids_b[:, 10:] = 4
    for iid, ids in (("a", ids_a), ("sub/b", ids_b), ("gone", ids_b)):
        rio.write_bytes_atomic(rio.join(pred, "panoptic", rio.safe_name(iid) + ".png"), _png(id_to_rgb(ids)))
    doc = {
        "images": [{"id": "a", "file_name": "a.jpg", "height": 24, "width": 32}],  # sub/b: found by listing
        "annotations": [
            {"image_id": "a", "file_name": "a.png", "segments_info": [
                {"id": 1, "category_id": 1, "area": 120, "bbox": [2, 2, 12, 10], "iscrowd": 0, "score": 0.91},
                {"id": 258, "category_id": 2, "area": 192, "bbox": [16, 12, 16, 12], "iscrowd": 0, "score": 0.5}]},
            {"image_id": "sub/b", "file_name": rio.safe_name("sub/b") + ".png", "segments_info": [
                {"id": 3, "category_id": 2, "area": 200, "bbox": [0, 0, 10, 20], "iscrowd": 0, "score": 0.7},
                {"id": 4, "category_id": 2, "area": 200, "bbox": [10, 0, 10, 20], "iscrowd": 0, "score": 0.6}]},
            {"image_id": "gone", "file_name": "gone.png", "segments_info": []},
        ],
        "categories": [{"id": 1, "name": "person", "isthing": 1, "supercategory": "x"},
                       {"id": 2, "name": EVIL, "isthing": 0, "supercategory": "x"}],
    }
    rio.write_json_atomic(rio.join(pred, "panoptic.json"), doc)
    return images, pred


def _size(uri: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(rio.read_bytes(uri))) as im:
        return im.size


def test_visualize_local(tmp_path):
    images, pred = _make_label_output(str(tmp_path))
    out = str(tmp_path / "html")
    res = visualize(images, pred, out)
    assert (res["images"], res["errors"], res["total"], res["skipped"]) == (2, 1, 3, 0)
    assert res["failed"][0]["image_id"] == "gone"
    names = {"a": "a", "sub/b": rio.safe_name("sub/b")}
    for iid, (w, h) in (("a", (32, 24)), ("sub/b", (20, 20))):
        ov = rio.join(out, "overlays", names[iid] + ".png")
        assert _size(ov) == (2 * w, h)  # original | overlay
        assert rio.exists(rio.join(out, "thumbs", names[iid] + ".jpg"))
    page = (tmp_path / "html" / "index.html").read_text()
    assert res["index_html"] == rio.join(out, "index.html")
    for n in names.values():
        assert f'href="overlays/{n}.png"' in page
        assert f'src="thumbs/{n}.jpg"' in page
    assert html.escape(EVIL) in page and EVIL not in page  # class names escaped
    assert "person" in page and "gone" in page  # class list and the failed image
    r, g, b = segment_color(next(c["id"] for c in json.loads(rio.read_text(rio.join(pred, "panoptic.json")))["categories"]
                                 if c["name"] == "person"), 0)
    assert "<h2>Legend</h2>" in page and f"background:#{r:02x}{g:02x}{b:02x}" in page  # the class colours
    assert "<h2>Provenance</h2>" in page  # (this hand-made output records none: said so)


def test_overlay_pixels():
    img = np.full((40, 40, 3), 100, np.uint8)
    ids = np.zeros((40, 40), np.uint32)
    ids[:, 20:] = 7
    out = np.asarray(render_overlay(img, ids, [{"id": 7, "category_id": 3, "score": 0.5}], {3: "x"}))
    assert out.shape == (40, 80, 3)
    assert (out[:, :40] == 100).all()  # left: the original
    right = out[:, 40:]
    assert (right[0, 0] == 100).all()  # void: untouched
    assert (right[:8, 19] == 255).all() and (right[:8, 20] == 255).all()  # contour (above the label)
    expected = np.round(0.5 * 100 + 0.5 * np.array(segment_color(3, 0)))
    assert np.abs(right[0, 39].astype(int) - expected).max() <= 1  # blended, away from the label
    assert (right[14:26, 22:38] == 0).all(axis=-1).any()  # the label's dark box near the centroid
    assert segment_color(3, 0) == segment_color(3, 0) != segment_color(4, 0)
    assert segment_color(3, 0) != segment_color(3, 1)  # instances of one class differ


def test_visualize_limit_and_glob(tmp_path):
    images, pred = _make_label_output(str(tmp_path))
    res = visualize(images + "/**/*.png", pred, str(tmp_path / "h1"), limit=2)
    # "a" is a .jpg outside the glob: not found; "sub/b" is found relative to the glob's folder
    assert (res["images"], res["errors"], res["skipped"]) == (1, 1, 1)
    assert (tmp_path / "h1" / "overlays" / (rio.safe_name("sub/b") + ".png")).exists()


def test_visualize_memory_fs():
    fs = fsspec.filesystem("memory")
    root = "memory://viz-test"
    try:
        images, pred = _make_label_output(root)
        res = visualize(images, pred, root + "/html", limit=10)
        assert res["images"] == 2
        page = rio.read_text(root + "/html/index.html")
        assert 'href="overlays/a.png"' in page
        assert _size(root + "/html/overlays/a.png") == (64, 24)
    finally:
        fs.rm("/viz-test", recursive=True)


def test_visualize_cli_and_missing_output(tmp_path):
    from typer.testing import CliRunner

    from ragseg.errors import UserError
    from ragseg.jobs.cli import app

    images, pred = _make_label_output(str(tmp_path))
    r = CliRunner().invoke(app, ["visualize", "--images", images, "--pred", pred, "--out", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["images"] == 2
    with pytest.raises(UserError):
        visualize(images, str(tmp_path / "nothing"), str(tmp_path / "h2"))
