"""Batched mask models: many images through the image encoder in one forward pass give the same masks
as the libraries' own per-image predictors (segment_anything ``SamPredictor``, sam2
``SAM2ImagePredictor``), for box prompts (Segment) and point grids (SamGrid), on images of different
sizes in one batch; SDPA attention equals segment_anything's eager attention."""

from __future__ import annotations

import numpy as np
import pytest

from ragseg.masks import decode_rle

SHAPES = [(80, 120), (64, 64), (50, 90), (150, 70), (96, 40)]  # one larger than the tiny encoder (128)


def _obj(values):
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def _images(seed=0):
    rs = np.random.RandomState(seed)
    out = []
    for h, w in SHAPES:
        im = np.full((h, w, 3), 40, np.uint8)
        im[h // 4: 3 * h // 4, w // 5: w // 2] = (200, 60, 30)
        im += rs.randint(0, 30, im.shape).astype(np.uint8)
        out.append(im)
    return out


def _boxes(im, k=5):
    h, w = im.shape[:2]
    base = np.array([[0, 0, w / 2, h / 2], [w / 5, h / 4, w / 2, 3 * h / 4], [w / 3, h / 3, w - 1, h - 1],
                     [1, 2, w, h], [w / 4, 0, 3 * w / 4, h / 3]], np.float32)
    return base[np.arange(k) % len(base)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _cfg(tiny_cfg, family="sam", encoder_batch=4, **sam):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.sam.family = family
    cfg.models.sam.encoder_batch = encoder_batch
    for k, v in sam.items():
        setattr(cfg.models.sam, k, v)
    return cfg


def _randomise_rel_pos(sam) -> None:
    """segment_anything zero-initialises the relative positions: give them values, so the attention
    bias is not trivially 0."""
    import torch

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in sam.image_encoder.blocks:
            for p in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# ----------------------------------------------------------------------------------------------
# segment_anything SAM
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam_segment():
    from ragseg.config import load_config
    from ragseg.stages.segment import Segment
    from tests.conftest import TINY

    cfg = load_config(TINY, ["models.sam.encoder_batch=4"])
    seg = Segment(cfg)
    _randomise_rel_pos(seg.sam)
    return seg


def test_batched_sam_equals_per_image_predictor(sam_segment):
    """Five images of five sizes, encoded 4 + 1 per forward pass, then box prompts per image: logits
    within 1e-4 of segment_anything's SamPredictor (set_image + predict_torch per image, fp32) and the
    binarised masks identical (IoU 1.0)."""
    import torch
    from segment_anything import SamPredictor

    seg = sam_segment
    m = seg.model
    images = _images()
    assert m.cfg.encoder_batch == 4 and len(images) == 5  # two encoder passes: 4 images, then 1
    calls = []
    hook = seg.sam.image_encoder.patch_embed.register_forward_hook(lambda mod, i, o: calls.append(o.shape[0]))
    try:
        states = m.encode([m.prepare(im) for im in images], [im.shape[:2] for im in images])
    finally:
        hook.remove()
    assert calls == [4, 1]  # the batch went through the encoder in one pass per encoder_batch
    ref = SamPredictor(seg.sam)
    for im, state in zip(images, states):
        boxes = _boxes(im)
        logits, ious = m.predict_boxes(state, boxes, multimask=False, chunk=3, return_logits=True)
        ref.set_image(im)
        t = ref.transform.apply_boxes_torch(torch.as_tensor(boxes), im.shape[:2])
        with torch.inference_mode():
            rl, rq, _ = ref.predict_torch(None, None, boxes=t, multimask_output=False, return_logits=True)
        rl, rq = rl.numpy(), rq.numpy()
        assert logits.shape == rl.shape == (len(boxes), 1, *im.shape[:2])
        np.testing.assert_allclose(logits, rl, atol=1e-4, rtol=0)
        np.testing.assert_allclose(ious, rq, atol=1e-4, rtol=0)
        for a, b in zip(logits > seg.sam.mask_threshold, rl > seg.sam.mask_threshold):
            assert _iou(a, b) == 1.0
        assert (logits > 0).any() and (logits <= 0).any()  # the threshold is exercised


def test_segment_stage_batched_equals_one_image_per_pass(sam_segment, tiny_cfg):
    """The Segment stage itself: encoder_batch 4 vs 1 give the same rows (RLEs, scores)."""
    from ragseg.stages.segment import Segment

    images = _images(1)
    batch = {"image": _obj(images), "boxes": _obj([_boxes(im, 3 + i % 3) for i, im in enumerate(images)]),
             "box_labels": _obj([[f"c{j}" for j in range(3 + i % 3)] for i in range(len(images))]),
             "box_scores": _obj([np.full(3 + i % 3, 0.8, np.float32) for i in range(len(images))]),
             "error": np.array([""] * len(images), dtype=object)}
    batch["boxes"][2] = np.zeros((0, 4), np.float32)  # an image without boxes is not encoded
    batch["box_labels"][2], batch["box_scores"][2] = [], np.zeros(0, np.float32)
    one = Segment(_cfg(tiny_cfg, encoder_batch=1))
    _randomise_rel_pos(one.sam)
    a, b = sam_segment(dict(batch)), one(dict(batch))
    assert list(a["error"]) == [""] * len(images)
    assert list(a["seg_masks_rle"]) == list(b["seg_masks_rle"])
    for x, y in zip(a["seg_scores"], b["seg_scores"]):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert a["seg_masks_rle"][2] == [] and all(len(a["seg_masks_rle"][i]) for i in (0, 1, 3, 4))


def test_sam_prep_column_is_used_and_dropped(sam_segment):
    """The CPU task's resized input (SamPrep) is what the actor encodes; the copy goes no further."""
    from ragseg.models.sam import resize_longest
    from ragseg.stages.segment import SAM_INPUT, SamPrep

    images = _images(2)[:3]
    batch = {"image": _obj(images), "boxes": _obj([_boxes(im, 2) for im in images]),
             "box_labels": _obj([["a", "b"]] * 3), "box_scores": _obj([np.ones(2, np.float32)] * 3),
             "error": np.array(["", "decode: OSError: x", ""], dtype=object)}
    prepped = SamPrep(sam_segment.cfg)(dict(batch))
    size = sam_segment.model.image_size
    assert prepped[SAM_INPUT][1].shape == (0, 0, 3)
    for i in (0, 2):
        np.testing.assert_array_equal(prepped[SAM_INPUT][i], resize_longest(images[i], size))
        assert max(prepped[SAM_INPUT][i].shape[:2]) == size and prepped[SAM_INPUT][i].dtype == np.uint8
    out = sam_segment(prepped)
    assert SAM_INPUT not in out
    ref = sam_segment(dict(batch))
    assert list(out["seg_masks_rle"]) == list(ref["seg_masks_rle"])
    assert out["error"][1] == "decode: OSError: x"


def test_sdpa_attention_equals_eager(tiny_cfg):
    """SdpaAttention (SDPA with the decomposed relative positions as an additive mask) equals
    segment_anything's eager Attention in fp32, over windowed and global blocks, batch of 3."""
    import torch

    from ragseg.models.sam import load_sam, use_eager, use_sdpa

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.sam.encoder_depth = 3
    cfg.models.sam.encoder_global_attn_indexes = [1]
    sam = load_sam(cfg.models)
    _randomise_rel_pos(sam)
    enc = sam.image_encoder
    assert {blk.window_size for blk in enc.blocks} == {0, min(14, cfg.models.sam.image_size // 16)}
    x = torch.randn(3, 3, enc.img_size, enc.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = enc(x)
        assert use_sdpa(enc) == 3
        sdpa = enc(x)
        assert use_eager(enc) == 3
        again = enc(x)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, eager)
    assert not torch.equal(sdpa, torch.zeros_like(sdpa))


def test_sdpa_segment_masks_match_eager(tiny_cfg):
    """The Segment stage with attention sdpa vs eager: logits within 1e-4."""
    from ragseg.stages.segment import Segment

    images = _images(3)[:2]
    outs = {}
    for kind in ("eager", "sdpa"):
        seg = Segment(_cfg(tiny_cfg, attention=kind))
        _randomise_rel_pos(seg.sam)
        assert seg.model.attention == kind
        st = seg.model.encode([seg.model.prepare(im) for im in images], [im.shape[:2] for im in images])
        outs[kind] = [seg.model.predict_boxes(s, _boxes(im), False, 8, return_logits=True)[0]
                      for s, im in zip(st, images)]
    for a, b in zip(outs["eager"], outs["sdpa"]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_sam_grid_batched_equals_per_image(tiny_cfg):
    """SamGrid: the batch's images encoded together, then the automatic mask generator per image on its
    staged embedding, equals the generator run image by image (its own set_image)."""
    from ragseg.stages.segment import SamGrid

    grid = SamGrid(_cfg(tiny_cfg, encoder_batch=3))
    images = _images(4)[:4]
    out = grid({"image": _obj(images), "error": np.array([""] * 4, dtype=object)})
    assert list(out["error"]) == [""] * 4
    for i, im in enumerate(images):
        masks, scores = grid.proposals(im)  # no staged state: the library's per-image set_image
        got = [decode_rle(r) for r in out["seg_masks_rle"][i]]
        assert len(got) == len(masks) > 0
        for a, b in zip(got, masks):
            assert _iou(a, b) == 1.0
        np.testing.assert_allclose(out["seg_scores"][i], scores, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# SAM 2.1 (sam2 package)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam2_segment():
    pytest.importorskip("sam2")
    from ragseg.config import load_config
    from ragseg.stages.segment import Segment
    from tests.conftest import TINY

    return Segment(load_config(TINY, ["models.sam.family=sam2", "models.sam.encoder_batch=4"]))


def test_sam2_batched_equals_image_predictor(sam2_segment):
    """SAM 2.1: five images of five sizes encoded 4 + 1 per pass vs sam2's SAM2ImagePredictor
    (set_image + predict per image): logits within 1e-4, binarised masks IoU 1.0; and the encoder
    features equal those of the package's own set_image_batch."""
    import torch
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    m = sam2_segment.model
    assert m.family == "sam2"
    images = _images()
    states = m.encode([m.prepare(im) for im in images], [im.shape[:2] for im in images])
    ref = SAM2ImagePredictor(m.sam)
    ref._bb_feat_sizes = m.predictor._bb_feat_sizes  # the package assumes a 1024 input; the tiny one is 256
    ref.set_image_batch(images[:4])
    torch.testing.assert_close(torch.cat([s["image_embed"] for s in states[:4]]), ref._features["image_embed"],
                               atol=1e-5, rtol=1e-5)
    for im, state in zip(images, states):
        boxes = _boxes(im)
        logits, ious = m.predict_boxes(state, boxes, multimask=False, chunk=2, return_logits=True)
        ref.set_image(im)
        rl, rq, _ = ref.predict(box=boxes, multimask_output=False, return_logits=True)
        assert logits.shape == rl.shape == (len(boxes), 1, *im.shape[:2])
        np.testing.assert_allclose(logits, rl, atol=1e-4, rtol=0)
        np.testing.assert_allclose(ious, rq, atol=1e-4, rtol=0)
        for a, b in zip(logits > 0, rl > 0):
            assert _iou(a, b) == 1.0


def test_sam2_segment_contract(sam2_segment):
    """The same box-prompt contract as SAM: one mask per box in box order (empty masks dropped), labels
    carried, scores = predicted IoU x box score, masks at image size; errored rows pass through."""
    images = _images(5)[:3]
    ks = [3, 0, 5]
    batch = {"image": _obj(images), "boxes": _obj([_boxes(im, k) for im, k in zip(images, ks)]),
             "box_labels": _obj([[f"c{j}" for j in range(k)] for k in ks]),
             "box_scores": _obj([np.linspace(0.9, 0.5, k).astype(np.float32) for k in ks]),
             "error": np.array(["", "", ""], dtype=object)}
    out = sam2_segment(batch)
    assert list(out["error"]) == ["", "", ""]
    for i, (im, k) in enumerate(zip(images, ks)):
        n = len(out["seg_masks_rle"][i])
        assert n <= k and out["seg_ids"][i] == list(range(1, n + 1))
        assert set(out["seg_labels"][i]) <= {f"c{j}" for j in range(k)}
        assert all(decode_rle(r).shape == im.shape[:2] for r in out["seg_masks_rle"][i])
        assert all(0 <= s <= 0.9 + 1e-6 for s in out["seg_scores"][i])
    assert out["seg_masks_rle"][1] == []
    assert len(out["seg_masks_rle"][0]) > 0 and len(out["seg_masks_rle"][2]) > 0
    batch["error"] = np.array(["detect: x", "", ""], dtype=object)
    again = sam2_segment(batch)
    assert again["error"][0] == "detect: x" and again["seg_masks_rle"][0] == []
    assert list(again["seg_masks_rle"][2]) == list(out["seg_masks_rle"][2])


def test_sam2_grid(tiny_cfg):
    """sam-grid proposals with SAM 2.1: batched encoder + the package's automatic mask generator."""
    pytest.importorskip("sam2")
    from ragseg.stages.segment import SamGrid

    grid = SamGrid(_cfg(tiny_cfg, family="sam2", encoder_batch=2))
    images = _images(6)[:3]
    out = grid({"image": _obj(images), "error": np.array([""] * 3, dtype=object)})
    assert list(out["error"]) == [""] * 3
    for i, im in enumerate(images):
        masks, _ = grid.proposals(im)
        got = [decode_rle(r) for r in out["seg_masks_rle"][i]]
        assert len(got) == len(masks) > 0 and set(out["seg_labels"][i]) == {""}
        for a, b in zip(got, masks):
            assert a.shape == im.shape[:2] and _iou(a, b) == 1.0


def test_sam2_checkpoint_roundtrip(tmp_path, tiny_cfg):
    """A SAM 2.1 checkpoint in the official layout ({"model": state_dict}) loads strictly through the
    weights resolver; one of another arch is one clear error."""
    pytest.importorskip("sam2")
    import torch

    from ragseg.errors import UserError
    from ragseg.models.sam import load_sam2, mask_model_id

    cfg = _cfg(tiny_cfg, family="sam2")
    cfg.models.sam.sam2.seed = 7
    src = load_sam2(cfg.models)
    path = tmp_path / "sam2.1_tiny.pt"
    torch.save({"model": src.state_dict()}, path)
    cfg.models.sam.sam2.seed = 0
    cfg.models.sam.sam2.checkpoint = str(path)
    got = load_sam2(cfg.models)
    for (n, p), (_, q) in zip(src.state_dict().items(), got.state_dict().items()):
        assert torch.equal(p, q), n
    assert mask_model_id(cfg.models.sam) == f"sam2.1:custom:{path}"
    cfg.models.sam.sam2.d_model = 64
    with pytest.raises(UserError, match="does not match arch custom"):
        load_sam2(cfg.models)


def test_sam2_official_configs():
    """The four SAM 2.1 architectures come from the package's configs (hydra, as build_sam2 reads
    them) with the published trunk sizes, and their checkpoints resolve to the official URLs."""
    pytest.importorskip("sam2")
    from hydra import compose

    from ragseg.config import Sam2Config
    from ragseg.models.sam import SAM2_CONFIG_FILES, sam2_checkpoint

    sizes = {"hiera_t": (96, [1, 2, 7, 2]), "hiera_s": (96, [1, 2, 11, 2]), "hiera_b+": (112, [2, 3, 16, 3]),
             "hiera_l": (144, [2, 6, 36, 4])}
    names = {"hiera_t": "tiny", "hiera_s": "small", "hiera_b+": "base_plus", "hiera_l": "large"}
    for arch, (dim, stages) in sizes.items():
        trunk = compose(config_name=SAM2_CONFIG_FILES[arch]).model.image_encoder.trunk
        got = list(trunk.get("stages") or (2, 3, 16, 3))  # b+ keeps Hiera's default stages
        assert (trunk.embed_dim, got) == (dim, stages), arch
        assert sam2_checkpoint(Sam2Config(arch=arch)) == (
            f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{names[arch]}.pt")
    assert sam2_checkpoint(Sam2Config(arch="custom")) is None


def test_sam2_checkpoint_through_the_weights_resolver(tiny_cfg):
    """SAM 2.1 checkpoints are ordinary single-file checkpoints of the resolver / mirror / preflight:
    the official URL of the arch by default, none with random weights or a custom arch."""
    from ragseg.config import SAM2_CHECKPOINTS
    from ragseg.models import weights
    from ragseg.models.sam import config_problems

    cfg = _cfg(tiny_cfg, family="sam2")
    assert weights.checkpoints(cfg.models, {"sam"}) == []  # custom, random weights
    cfg.models.sam.sam2.arch = "hiera_l"
    (ck,) = weights.checkpoints(cfg.models, {"sam"})
    assert (ck.field, ck.kind, ck.ref) == ("models.sam.sam2.checkpoint", "file", SAM2_CHECKPOINTS["hiera_l"])
    assert ck.file_name == "sam2.1_hiera_large.pt"
    rec = {"field": ck.field, "kind": "file", "sha256": {"sam2.1_hiera_large.pt": "ab" * 32}}
    assert weights.sync_overrides(cfg.models, [rec], "s3://m/")[1] == f"models.sam.sam2.sha256={'ab' * 32}"
    cfg.models.sam.sam2.random_weights = True
    assert weights.checkpoints(cfg.models, {"sam"}) == []
    cfg.models.sam.sam2.arch = "custom"
    cfg.models.sam.sam2.global_att_blocks = [1]  # the first block of stage 2 pools its queries
    assert any("global_att_blocks" in p for p in config_problems(cfg.models.sam))


def test_compile_option_wraps_the_encoder(tiny_cfg, monkeypatch):
    """models.sam.compile: the image encoder's forward goes through torch.compile (static shapes); the
    stage's output is unchanged (the stand-in compiler returns the function as is: no C++ build here)."""
    import torch

    from ragseg.stages.segment import Segment

    seen = []

    def fake_compile(fn, **kw):
        seen.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    images = _images(7)[:2]
    batch = {"image": _obj(images), "boxes": _obj([_boxes(im, 2) for im in images]),
             "box_labels": _obj([["a", "b"]] * 2), "box_scores": _obj([np.ones(2, np.float32)] * 2),
             "error": np.array(["", ""], dtype=object)}
    a = Segment(_cfg(tiny_cfg, compile=True))(dict(batch))
    assert seen == [{"dynamic": False}]
    b = Segment(_cfg(tiny_cfg))(dict(batch))
    assert list(a["seg_masks_rle"]) == list(b["seg_masks_rle"])
