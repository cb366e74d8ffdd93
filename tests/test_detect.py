"""Grounding DINO loading and the Detect stage, with the real transformers classes at a tiny size."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from ragseg.stages.detect import (
    Detect,
    assign_classes,
    build_prompt,
    chunk_names,
    merge_detections,
    prompt_name,
    token_spans,
    unique_names,
)

VOCAB = ["cat", "Dog", "traffic light", "person", "tree", "sky", "road", "car", "building", "grass",
         "table", "chair"]


def _images(n=3, seed=0):
    rs = np.random.RandomState(seed)
    shapes = [(80, 120), (64, 64), (50, 90), (72, 48)]
    return [rs.randint(0, 255, (*shapes[i % 4], 3), dtype=np.uint8) for i in range(n)]


def _batch(images, labels, errors=None):
    img = np.empty(len(images), dtype=object)
    lab = np.empty(len(images), dtype=object)
    for i, (im, lb) in enumerate(zip(images, labels)):
        img[i], lab[i] = im, lb
    return {"image": img, "labels": lab, "error": np.array(errors or [""] * len(images), dtype=object)}


@pytest.fixture(scope="module")
def detect():
    from ragseg.config import load_config
    from tests.conftest import TINY

    return Detect(load_config(TINY))


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def test_prompt_and_names():
    assert prompt_name("  Traffic  Light. ") == "traffic light"
    assert unique_names(["Cat", "cat", "", "dog", "DOG "]) == ["Cat", "dog"]
    text, spans = build_prompt(["Cat", "traffic light"])
    assert text == "cat . traffic light ."
    assert [text[a:b] for a, b in spans] == ["cat", "traffic light"]


def test_chunk_names():
    # budget 10 - 2 specials = 8; costs 3, 3, 3, 9, 1
    assert chunk_names([2, 2, 2, 8, 0], 10) == [[0, 1], [2], [3], [4]]
    assert chunk_names([1] * 4, 256) == [[0, 1, 2, 3]]
    assert chunk_names([], 16) == []


def test_token_spans_and_assign():
    # [CLS] cat . traffic light . [SEP] with offsets into "cat . traffic light ."
    offsets = [(0, 0), (0, 3), (4, 5), (6, 13), (14, 19), (20, 21), (0, 0)]
    spans = token_spans(offsets, [(0, 3), (6, 19)])
    assert spans == [(1, 2), (3, 5)]
    assert token_spans(offsets, [(0, 3), (6, 19)], limit=4) == [(1, 2), (3, 4)]
    probs = np.zeros((3, 8), np.float32)
    probs[0, 1] = 0.9
    probs[1, 4] = 0.8
    probs[2, 1], probs[2, 3] = 0.3, 0.6
    names = ["cat", "Traffic Light"]
    # box 0: exact phrase; box 1: garbage phrase -> highest span; box 2: exact phrase wins over span
    idx, sc = assign_classes(["cat", "cat . traffic [SEP]", "traffic light"], probs, spans, names)
    assert idx.tolist() == [0, 1, 1]
    np.testing.assert_allclose(sc, [0.9, 0.8, 0.6])


def test_merge_detections():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [-5, -5, 200, 200], [3, 3, 3.5, 9]],
                     np.float32)
    scores = np.array([0.5, 0.9, 0.7, 0.2, 0.99], np.float32)
    classes = np.array([0, 0, 1, 0, 0])
    b, s, c = merge_detections(boxes, scores, classes, (50, 100), nms_iou=0.5, max_boxes=10)
    # box 4 too thin, box 0 suppressed by box 1 (same class), box 2 kept (other class), box 3 clipped
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.2])
    assert c.tolist() == [0, 1, 0]
    assert b[2].tolist() == [0, 0, 100, 50]
    b, s, c = merge_detections(boxes, scores, classes, (50, 100), nms_iou=0.5, max_boxes=2)
    assert len(b) == 2 and b.dtype == np.float32
    b, s, c = merge_detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0), (5, 5), 0.5, 3)
    assert b.shape == (0, 4)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def test_tiny_model_ids_and_vocab(detect):
    from ragseg.models.gdino import tiny_vocab

    tok = detect.tokenizer
    assert tok.cls_token_id == 101 and tok.sep_token_id == 102
    assert tok.convert_tokens_to_ids(".") == 1012 and tok.convert_tokens_to_ids("?") == 1029
    assert detect.model.config.text_config.vocab_size == len(tiny_vocab())
    assert detect.model_id.startswith("tiny-gdino:")


def test_detect_boxes(detect):
    images = _images(3)
    labels = [["cat", "dog"], ["Traffic Light", "cat", "person"], []]
    out = detect(_batch(images, labels))
    assert list(out["error"]) == ["", "", ""]
    for i in range(3):
        boxes, bl, bs = out["boxes"][i], out["box_labels"][i], out["box_scores"][i]
        h, w = images[i].shape[:2]
        assert boxes.dtype == np.float32 and boxes.shape == (len(bl), 4)
        assert bs.dtype == np.float32 and bs.shape == (len(bl),)
        assert len(bl) <= detect.gcfg.max_boxes
        if len(bl):
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert (np.diff(bs) <= 0).all()
            assert set(bl) <= set(labels[i])
    assert len(out["box_labels"][0]) > 0 and len(out["box_labels"][1]) > 0
    assert len(out["box_labels"][2]) == 0  # no labels, no prompt
    assert out["image"][0] is images[0]  # input columns pass through


def test_detect_fixed_vocab_long_prompt_chunked(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.gdino.max_text_tokens = 16
    cfg.models.gdino.max_boxes = 100
    cfg.models.gdino.nms_iou = 1.0
    det = Detect(cfg, vocab=VOCAB)
    plans = det.plan(det.vocab)
    assert len(plans) > 1
    assert all(p["tokens"] <= 16 for p in plans)
    assert [n for p in plans for n in p["names"]] == VOCAB
    for p in plans:  # every name's span decodes back to the name
        enc = det.tokenizer(p["prompt"])
        for name, (a, b) in zip(p["names"], p["spans"]):
            assert det.tokenizer.decode(enc["input_ids"][a:b]).replace(" ##", "").replace(" ", "") == \
                prompt_name(name).replace(" ", "")
    images = _images(2)
    out = det(_batch(images, [[], ["ignored"]]))
    labels = [x for row in out["box_labels"] for x in row]
    assert labels and set(labels) <= set(VOCAB)
    chunk_of = {n: k for k, p in enumerate(plans) for n in p["names"]}
    assert len({chunk_of[x] for x in labels}) > 1  # results come from several chunks
    del det
    gc.collect()


def test_detect_deterministic(detect, tiny_cfg):
    images = _images(2, seed=3)
    labels = [["cat", "dog", "tree"], ["sky"]]
    a = detect(_batch(images, labels))
    b = Detect(tiny_cfg)(_batch(images, labels))
    for i in range(2):
        np.testing.assert_array_equal(a["boxes"][i], b["boxes"][i])
        np.testing.assert_array_equal(a["box_scores"][i], b["box_scores"][i])
        assert a["box_labels"][i] == b["box_labels"][i]


def test_detect_error_rows(detect):
    images = _images(3)
    bad = np.zeros((7,), np.uint8)  # not an image
    batch = _batch([images[0], images[1], bad], [["cat"], ["dog"], ["cat"]], ["decode: OSError: broken", "", ""])
    out = detect(batch)
    assert out["error"][0] == "decode: OSError: broken"
    assert out["boxes"][0].shape == (0, 4) and out["box_labels"][0] == [] and len(out["box_scores"][0]) == 0
    assert out["error"][1] == "" and len(out["box_labels"][1]) > 0
    assert out["error"][2].startswith("detect: ValueError")
    assert out["boxes"][2].shape == (0, 4)


def test_load_gdino_saved_dir_and_bucket(tmp_path, monkeypatch, tiny_cfg):
    """The real from_pretrained path: a local saved dir and a copy on an fsspec store."""
    import fsspec
    import torch

    from ragseg.models.gdino import load_gdino

    model, processor, _ = load_gdino(tiny_cfg.models)
    d = tmp_path / "gd"
    model.save_pretrained(d)
    processor.save_pretrained(d)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.gdino.model_id = str(d)
    m2, p2, mid = load_gdino(cfg.models)
    assert mid == str(d)
    img = _images(1)[0]
    inp = processor(images=[img], text=["cat . dog ."], return_tensors="pt")
    inp2 = p2(images=[img], text=["cat . dog ."], return_tensors="pt")
    assert torch.equal(inp["input_ids"], inp2["input_ids"])
    with torch.inference_mode():
        a, b = model(**inp), m2(**inp2)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes)

    mem = fsspec.filesystem("memory")
    for f in d.iterdir():
        mem.pipe(f"/gdino-test/{f.name}", f.read_bytes())
    monkeypatch.setenv("RAGSEG_CACHE", str(tmp_path / "cache"))
    cfg.models.gdino.model_id = "memory://gdino-test"
    m3, _, _ = load_gdino(cfg.models)
    with torch.inference_mode():
        c = m3(**inp)
    torch.testing.assert_close(a.pred_boxes, c.pred_boxes)
    mem.rm("/gdino-test", recursive=True)


def test_detect_on_ray(ray_local, tiny_cfg):
    import ray

    images = _images(4)
    items = [{"image_id": f"im{i}", "image": im, "labels": ["cat", "dog"] if i != 2 else [], "error": ""}
             for i, im in enumerate(images)]
    ds = ray.data.from_items(items).map_batches(
        Detect, fn_constructor_args=(tiny_cfg,), batch_size=2, compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1)
    rows = sorted(ds.take_all(), key=lambda r: r["image_id"])
    assert [r["error"] for r in rows] == [""] * 4
    for r, im in zip(rows, images):
        boxes = np.asarray(r["boxes"], np.float32).reshape(-1, 4)
        assert len(boxes) == len(r["box_labels"]) == len(r["box_scores"])
        if len(boxes):
            assert (boxes[:, 2] <= im.shape[1]).all() and (boxes[:, 3] <= im.shape[0]).all()
            assert set(r["box_labels"]) <= {"cat", "dog"}
    assert len(rows[0]["box_labels"]) > 0 and len(rows[2]["box_labels"]) == 0


@pytest.mark.slow
def test_gdino_base_config_constructs():
    """The IDEA-Research/grounding-dino-base architecture builds (random weights, no download)."""
    import torch
    from transformers import GroundingDinoForObjectDetection

    from ragseg.models.gdino import base_config

    cfg = base_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GroundingDinoForObjectDetection(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert cfg.backbone_config.embed_dim == 128 and cfg.text_config.hidden_size == 768
    assert 200e6 < n < 260e6, n
    del model
    gc.collect()
