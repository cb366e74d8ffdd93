"""SAM loading and the Segment / SamGrid stages, with segment_anything's classes at a tiny size."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from ragseg.masks import decode_rle, encode_rle
from ragseg.stages.segment import (
    SamGrid,
    Segment,
    as_boxes,
    clean_mask,
    connected_components,
    pick_masks,
    remove_small_regions,
)


def _images(n=3, seed=0):
    rs = np.random.RandomState(seed)
    shapes = [(80, 120), (64, 64), (50, 90), (72, 48)]
    out = []
    for i in range(n):
        h, w = shapes[i % 4]
        im = np.full((h, w, 3), 30, np.uint8)
        im[h // 4: 3 * h // 4, w // 5: w // 2] = (200, 40, 40)  # a red block
        im += rs.randint(0, 20, im.shape).astype(np.uint8)
        out.append(im)
    return out


def _boxes(im, k):
    h, w = im.shape[:2]
    base = np.array([[0, 0, w / 2, h / 2], [w / 5, h / 4, w / 2, 3 * h / 4], [w / 3, h / 3, w - 1, h - 1],
                     [1, 2, w, h]], np.float32)
    return base[np.arange(k) % 4]


def _obj(values):
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def _batch(images, ks, errors=None):
    boxes = [_boxes(im, k) for im, k in zip(images, ks)]
    labels = [[f"c{j}" for j in range(k)] for k in ks]
    scores = [np.linspace(0.9, 0.5, k).astype(np.float32) for k in ks]
    return {"image": _obj(images), "boxes": _obj(boxes), "box_labels": _obj(labels), "box_scores": _obj(scores),
            "error": np.array(errors or [""] * len(images), dtype=object)}


@pytest.fixture(scope="module")
def segment():
    from ragseg.config import load_config
    from tests.conftest import TINY

    return Segment(load_config(TINY))


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------
def test_helpers():
    m = np.zeros((2, 3, 4, 5), bool)
    m[0, 2, 0, 0] = True
    m[1, 0, 1, 1] = True
    q = np.array([[0.1, 0.2, 0.9], [0.8, 0.1, 0.3]], np.float32)
    best, iou = pick_masks(m, q)
    assert best.shape == (2, 4, 5) and best[0, 0, 0] and best[1, 1, 1]
    np.testing.assert_allclose(iou, [0.9, 0.8])
    assert as_boxes(None).shape == (0, 4)
    assert as_boxes(_obj([np.array([1, 2, 3, 4.0]), np.array([5, 6, 7, 8.0])])).tolist() == [[1, 2, 3, 4],
                                                                                             [5, 6, 7, 8]]
    assert as_boxes(np.array([], dtype=object)).shape == (0, 4)
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[5, 5] = False  # a 1-pixel hole
    mask[18, 18] = True  # a 1-pixel island
    cleaned = clean_mask(mask, 4)
    assert cleaned[5, 5] and not cleaned[18, 18] and cleaned[2:12, 2:12].all()
    assert clean_mask(mask, 0) is mask


def _flood_areas(mask):
    """Reference 8-connected component areas by flood fill."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    areas = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                stack, n = [(y, x)], 0
                seen[y, x] = True
                while stack:
                    a, b = stack.pop()
                    n += 1
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            u, v = a + da, b + db
                            if 0 <= u < h and 0 <= v < w and mask[u, v] and not seen[u, v]:
                                seen[u, v] = True
                                stack.append((u, v))
                areas.append(n)
    return sorted(areas)


def test_connected_components_matches_flood_fill():
    rs = np.random.RandomState(1)
    for p in (0.2, 0.45, 0.6):
        m = rs.rand(23, 31) < p
        labels, areas = connected_components(m)
        assert sorted(areas[1:].tolist()) == _flood_areas(m)
        assert areas[0] == (~m).sum() and ((labels > 0) == m).all()
        for k in range(1, len(areas)):
            assert (labels == k).sum() == areas[k]
    assert connected_components(np.zeros((3, 4), bool))[1].tolist() == [12]
    # every island small: the largest is kept
    m = np.zeros((10, 10), bool)
    m[0, 0] = True
    m[5:7, 5:7] = True
    out, changed = remove_small_regions(m, 10, "islands")
    assert changed and out.sum() == 4 and out[5:7, 5:7].all()


def test_load_sam_custom(tiny_cfg):
    import torch

    from ragseg.models.sam import load_sam

    a, b = load_sam(tiny_cfg.models), load_sam(tiny_cfg.models)
    assert a.image_encoder.img_size == 128 and not a.training
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_load_sam_checkpoint(tmp_path, tiny_cfg):
    """The checkpoint path: save a state dict, load it back through weights.resolve/load_state_dict."""
    pytest.importorskip("ragseg.models.weights")
    import torch

    from ragseg.models.sam import load_sam

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.sam.seed = 5
    src = load_sam(cfg.models)
    path = tmp_path / "sam_tiny.pth"
    torch.save(src.state_dict(), path)
    cfg.models.sam.seed = 0
    cfg.models.sam.checkpoint = str(path)
    got = load_sam(cfg.models)
    for (n, p), (_, q) in zip(src.state_dict().items(), got.state_dict().items()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------------------------
# Segment
# ----------------------------------------------------------------------------------------------
def test_segment_one_mask_per_box(segment):
    images = _images(3)
    ks = [3, 0, 20]  # 20 > boxes_per_batch (16): two predictor chunks
    batch = _batch(images, ks)
    out = segment(batch)
    assert list(out["error"]) == ["", "", ""]
    for i, (im, k) in enumerate(zip(images, ks)):
        rles = out["seg_masks_rle"][i]
        assert len(rles) == k
        assert out["seg_labels"][i] == batch["box_labels"][i]
        assert out["seg_ids"][i] == list(range(1, k + 1))
        assert out["seg_isthing"][i] == [True] * k
        sc = np.asarray(out["seg_scores"][i])
        assert sc.shape == (k,) and (sc >= 0).all() and (sc <= np.asarray(batch["box_scores"][i]) + 1e-6).all()
        for r in rles:
            m = decode_rle(r)
            assert m.shape == im.shape[:2] and m.dtype == bool
    assert out["boxes"] is batch["boxes"]  # inputs pass through


def test_masks_roundtrip_and_chunking(segment):
    im = _images(1)[0]
    boxes = _boxes(im, 20)
    masks, ious = segment.masks_for_boxes(im, boxes)
    assert masks.shape == (20, *im.shape[:2]) and ious.shape == (20,)
    assert masks.any()
    for m in masks:
        np.testing.assert_array_equal(decode_rle(encode_rle(m)), m)
    # chunking does not change results: the same boxes one at a time
    m1, q1 = segment.masks_for_boxes(im, boxes[:1])
    np.testing.assert_array_equal(m1[0], masks[0])
    np.testing.assert_allclose(q1[0], ious[0], rtol=1e-4, atol=1e-5)


def test_segment_multimask_and_regions(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.sam.multimask_output = True
    cfg.models.sam.min_region_area = 8
    seg = Segment(cfg)
    im = _images(1)[0]
    masks, ious = seg.masks_for_boxes(im, _boxes(im, 3))
    assert masks.shape == (3, *im.shape[:2]) and ious.shape == (3,)
    for m in masks:
        np.testing.assert_array_equal(clean_mask(m, 8), m)
    del seg
    gc.collect()


def test_segment_deterministic(segment, tiny_cfg):
    images = _images(2, seed=4)
    a = segment(_batch(images, [4, 2]))
    b = Segment(tiny_cfg)(_batch(images, [4, 2]))
    for col in ("seg_masks_rle", "seg_labels", "seg_ids"):
        assert list(a[col]) == list(b[col])
    for x, y in zip(a["seg_scores"], b["seg_scores"]):
        np.testing.assert_allclose(x, y, rtol=1e-5)


def test_segment_error_rows(segment):
    images = _images(3)
    batch = _batch(images, [2, 2, 2], ["detect: RuntimeError: boom", "", ""])
    batch["boxes"][2] = np.array([[1.0, 2.0, 3.0]])  # malformed boxes -> this row errors
    out = segment(batch)
    assert out["error"][0] == "detect: RuntimeError: boom"
    assert out["seg_masks_rle"][0] == [] and out["seg_ids"][0] == []
    assert out["error"][1] == "" and len(out["seg_masks_rle"][1]) == 2
    assert out["error"][2].startswith("segment: ValueError")
    assert out["seg_masks_rle"][2] == [] and out["seg_scores"][2] == []


# ----------------------------------------------------------------------------------------------
# SamGrid
# ----------------------------------------------------------------------------------------------
def test_sam_grid(tiny_cfg):
    grid = SamGrid(tiny_cfg)
    images = _images(2)
    out = grid({"image": _obj(images), "error": np.array(["", "decode: OSError: x"], dtype=object)})
    rles = out["seg_masks_rle"][0]
    assert len(rles) > 0
    assert out["seg_labels"][0] == [""] * len(rles)
    assert out["seg_isthing"][0] == [True] * len(rles)
    assert out["seg_ids"][0] == list(range(1, len(rles) + 1))
    assert all(decode_rle(r).shape == images[0].shape[:2] for r in rles)
    assert (np.diff(out["seg_scores"][0]) <= 0).all()
    assert out["error"][1] == "decode: OSError: x" and out["seg_masks_rle"][1] == []


def test_stages_under_bf16_autocast(tiny_cfg):
    """The CUDA precision path (bf16 autocast), exercised on the CPU: no dtype errors anywhere."""
    from ragseg.stages.detect import Detect

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.device.precision = "bf16"
    images = _images(2)
    labels = _obj([["cat", "dog"], ["tree"]])
    out = Detect(cfg)({"image": _obj(images), "labels": labels, "error": np.array(["", ""], dtype=object)})
    assert list(out["error"]) == ["", ""] and all(b.dtype == np.float32 for b in out["boxes"])
    out = Segment(cfg)(out)
    assert list(out["error"]) == ["", ""]
    assert [len(m) for m in out["seg_masks_rle"]] == [len(b) for b in out["boxes"]]
    out = SamGrid(cfg)(out)
    assert list(out["error"]) == ["", ""] and all(len(m) > 0 for m in out["seg_masks_rle"])


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------
def test_segment_grid_on_ray(ray_local, tiny_cfg):
    """Segment then SamGrid as actor pools on a Ray Dataset (Detect on Ray: tests/test_detect.py)."""
    import ray

    def keep_seg_columns(batch):  # local: pickled by value for the Ray workers
        """Copy Segment's output aside before SamGrid writes the same columns."""
        for col in ("seg_masks_rle", "seg_labels", "seg_ids", "seg_scores"):
            batch["box_" + col] = batch[col]
        return batch

    images = _images(4)
    ks = [3, 2, 0, 5]
    items = [{"image_id": f"im{i}", "image": im, "boxes": _boxes(im, k), "box_labels": [f"c{j}" for j in range(k)],
              "box_scores": np.full(k, 0.5, np.float32), "error": "" if i != 1 else "decode: x"}
             for i, (im, k) in enumerate(zip(images, ks))]
    ds = (ray.data.from_items(items)
          .map_batches(Segment, fn_constructor_args=(tiny_cfg,), batch_size=2,
                       compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
          .map_batches(keep_seg_columns, batch_size=2)
          .map_batches(SamGrid, fn_constructor_args=(tiny_cfg,), batch_size=2,
                       compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
          .drop_columns(["image"]))
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    assert [r["error"] for r in rows] == ["", "decode: x", "", ""]
    assert len(rows[1]["seg_masks_rle"]) == 0 and len(rows[1]["box_seg_masks_rle"]) == 0
    for r, im in zip(rows, images):
        if r["error"]:
            continue
        # Segment: one mask per detector box, labels carried over
        n = len(r["box_labels"])
        assert len(r["box_seg_masks_rle"]) == n
        assert list(r["box_seg_labels"]) == list(r["box_labels"])
        assert list(r["box_seg_ids"]) == list(range(1, n + 1))
        assert all(decode_rle(m).shape == im.shape[:2] for m in r["box_seg_masks_rle"])
        # SamGrid: class-agnostic proposals
        assert len(r["seg_masks_rle"]) > 0 and set(r["seg_labels"]) == {""}
        assert decode_rle(r["seg_masks_rle"][0]).shape == im.shape[:2]


@pytest.mark.slow
def test_sam_vit_h_constructs():
    """The official vit_h architecture builds (random weights; construction only)."""
    import torch

    from ragseg.models.sam import OFFICIAL, build_sam_arch

    dim, depth, heads, glob = OFFICIAL["vit_h"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = build_sam_arch(dim, depth, heads, glob, image_size=1024, prompt_embed_dim=256)
    n_enc = sum(p.numel() for p in sam.image_encoder.parameters())
    n = sum(p.numel() for p in sam.parameters())
    assert sam.image_encoder.img_size == 1024 and len(sam.image_encoder.blocks) == 32
    assert abs(n_enc - 636e6) < 2e6, n_enc  # the published ViT-H image encoder: ~636M
    assert abs(n - 641e6) < 1e6, n  # the whole model (encoder + prompt encoder + mask decoder): ~641M
    del sam
    gc.collect()


@pytest.mark.slow
def test_sam_vit_b_matches_segment_anything_builder():
    """Our builder gives exactly segment_anything's official vit_b module (names and shapes)."""
    from segment_anything import sam_model_registry

    from ragseg.models.sam import OFFICIAL, build_sam_arch

    dim, depth, heads, glob = OFFICIAL["vit_b"]
    ours = build_sam_arch(dim, depth, heads, glob, image_size=1024, prompt_embed_dim=256)
    ref = sam_model_registry["vit_b"](checkpoint=None)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b
    ours.load_state_dict(ref.state_dict())  # a real checkpoint of that arch loads strictly
    del ours, ref
    gc.collect()
