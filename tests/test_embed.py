"""Embed stage and CLIP helpers on the tiny real open_clip models (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ragseg.config import load_config
from ragseg.errors import UserError
from ragseg.masks import encode_rle
from ragseg.models import clip as C
from ragseg.stages.embed import Embed

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


def _cfg(tiny_cfg_path, *overrides):
    return load_config(tiny_cfg_path, list(overrides))


def _batch(images, masks_per_image, errors=None):
    n = len(images)
    img_col = np.empty(n, dtype=object)
    rle_col = np.empty(n, dtype=object)
    for i in range(n):
        img_col[i] = images[i]
        rle_col[i] = [encode_rle(m) for m in masks_per_image[i]]
    err = np.array(errors or [""] * n, dtype=object)
    return {"image": img_col, "seg_masks_rle": rle_col, "error": err}


def _blob(hw, seed):
    """A random connected-ish mask: a union of rectangles."""
    rs = np.random.RandomState(seed)
    m = np.zeros(hw, bool)
    for _ in range(3):
        y0, x0 = rs.randint(0, hw[0] - 8), rs.randint(0, hw[1] - 8)
        m[y0:y0 + rs.randint(4, hw[0] // 2), x0:x0 + rs.randint(4, hw[1] // 2)] = True
    return m


@pytest.fixture(scope="module")
def pool_embed(tiny_cfg_path):
    return Embed(_cfg(tiny_cfg_path, "models.clip.pool_image_size=128"))


@pytest.fixture(scope="module")
def crop_embed(tiny_cfg_path):
    return Embed(_cfg(tiny_cfg_path, "models.clip.mode=crop", "models.clip.context_pad=0.0"))


@pytest.fixture
def image():
    return np.random.RandomState(1).randint(0, 256, (64, 64, 3), dtype=np.uint8)


def test_load_clip_bundle(pool_embed):
    b = pool_embed.bundle
    model, info = b  # docs/interfaces.md: load_clip(...) -> (model, preprocess_info)
    assert model is b.model and info is b and not model.training
    assert b.model_id == "open_clip:tiny-convnext/random" == pool_embed.model_id
    assert b.dim == pool_embed.dim == 64 and b.image_size == (64, 64)
    assert pool_embed.mode == "pool" and C.has_dense_trunk(b.visual)
    assert C.pool_input_shape((300, 640), 320) == (160, 320)
    assert C.pool_input_shape((100, 100), 64) == (64, 64)


def test_pool_equals_hand_masked_average(pool_embed, image):
    b = pool_embed.bundle
    masks = np.stack([_blob((64, 64), s) for s in range(3)] + [np.zeros((64, 64), bool)])
    masks[3, 5, 7] = True  # a one-pixel mask
    shape = C.pool_input_shape((64, 64), 128)
    assert shape == (128, 128)
    with torch.inference_mode():
        x = C.resize(C.image_tensor(image, b)[None], shape, b.interpolation)
        dense = C.dense_features(b.visual, x)[0].float()  # (C, 4, 4): one cell = 16x16 image pixels
        assert dense.shape[-2:] == (4, 4)
        pooled = C.mask_pool(dense, C.mask_cell_weights(torch.from_numpy(masks), (4, 4)))
    d = dense.numpy().transpose(1, 2, 0)  # (4, 4, C)
    for i, m in enumerate(masks):
        frac = m.reshape(4, 16, 4, 16).mean(axis=(1, 3))  # fraction of each cell inside the mask
        hand = (frac[..., None] * d).sum((0, 1)) / frac.sum()
        np.testing.assert_allclose(pooled[i].numpy(), hand, rtol=1e-4, atol=1e-5)
    # the stage gives the model's head on exactly that pooled vector, normalised, float16
    out = pool_embed(_batch([image], [masks]))
    emb = out["embeddings"][0]
    assert emb.dtype == np.float16 and emb.shape == (4, 64)
    with torch.inference_mode():
        ref = F.normalize(C.pooled_to_embedding(b.visual, pooled), dim=-1).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_pool_full_mask_is_model_pipeline(pool_embed):
    """A whole-image mask gives encode_image of the same resized (not cropped) input."""
    b = pool_embed.bundle
    img = np.random.RandomState(2).randint(0, 256, (64, 96, 3), dtype=np.uint8)
    emb = pool_embed(_batch([img], [[np.ones((64, 96), bool)]]))["embeddings"][0]
    shape = C.pool_input_shape((64, 96), 128)
    assert shape == (96, 128)
    with torch.inference_mode():
        x = C.resize(C.image_tensor(img, b)[None], shape, b.interpolation)
        ref = b.model.encode_image(x, normalize=True).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2e-3)


def test_crop_full_mask_is_plain_image_embedding(crop_embed):
    b = crop_embed.bundle
    img = np.random.RandomState(3).randint(0, 256, (96, 96, 3), dtype=np.uint8)
    emb = crop_embed(_batch([img], [[np.ones((96, 96), bool)]]))["embeddings"][0]
    mean = torch.tensor(b.mean).view(1, 3, 1, 1)
    std = torch.tensor(b.std).view(1, 3, 1, 1)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate((x - mean) / std, size=(64, 64), mode="bicubic", antialias=True)
    with torch.inference_mode():
        ref = b.model.encode_image(x, normalize=True).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2e-3)


def test_crop_inputs_mask_fill_pad_and_context(crop_embed):
    b = crop_embed.bundle
    img = np.full((64, 64, 3), 255, np.uint8)
    m = np.zeros((64, 64), bool)
    m[20:30, 10:30] = True  # 10 high, 20 wide
    x = C.image_tensor(img, b)
    boxes = C.mask_boxes(m[None])
    assert boxes.tolist() == [[10, 20, 30, 30]]
    inp = C.crop_batch(x, torch.from_numpy(m[None]), boxes, 0.0, (64, 64), "bilinear")[0]
    # aspect kept: content 32 rows high centred, mean-pixel (= 0) padding above and below
    assert inp.shape == (3, 64, 64)
    assert torch.all(inp[:, :15] == 0) and torch.all(inp[:, 49:] == 0)
    assert torch.all(inp[:, 20:44] > 1.0)
    # context pad 0.5: the box grows by half its size on each side; pixels outside the mask -> 0
    assert C.padded_box(boxes[0], 0.5, (64, 64)) == (0, 15, 40, 35)
    inp = C.crop_batch(x, torch.from_numpy(m[None]), boxes, 0.5, (64, 64), "bilinear")[0]
    assert torch.all(inp[:, 32, :12] == 0) and torch.all(inp[:, 32, 20:44] > 1.0)


def test_deterministic_and_checkpoint_path(tiny_cfg_path, image, tmp_path):
    masks = [_blob((64, 64), 7), _blob((64, 64), 8)]
    cfg = _cfg(tiny_cfg_path)
    a = C.load_clip(cfg.models, cache=False)
    e1 = Embed(cfg, bundle=a)(_batch([image], [masks]))["embeddings"][0]
    e2 = Embed(cfg)(_batch([image], [masks]))["embeddings"][0]  # separately built, same seed
    np.testing.assert_array_equal(e1, e2)
    # a checkpoint file (wrapped in {"state_dict": ...}) loads into a model with another seed
    ck = tmp_path / "tiny.pt"
    torch.save({"state_dict": a.model.state_dict()}, ck)
    cfg_ck = _cfg(tiny_cfg_path, f"models.clip.pretrained={ck}", "models.clip.seed=5")
    b = C.load_clip(cfg_ck.models, cache=False)
    assert b.model_id == f"open_clip:tiny-convnext/{ck}"
    e3 = Embed(cfg_ck, bundle=b)(_batch([image], [masks]))["embeddings"][0]
    np.testing.assert_array_equal(e1, e3)
    # another seed, random weights: other embeddings
    cfg_s = _cfg(tiny_cfg_path, "models.clip.seed=5")
    e4 = Embed(cfg_s, bundle=C.load_clip(cfg_s.models, cache=False))(_batch([image], [masks]))
    assert not np.allclose(e1, e4["embeddings"][0], atol=1e-2)


@pytest.mark.parametrize("mode", ["pool", "crop"])
def test_bf16_autocast_close_to_fp32(tiny_cfg_path, image, mode):
    masks = [_blob((64, 64), 4), _blob((64, 64), 5)]
    ref = Embed(_cfg(tiny_cfg_path, f"models.clip.mode={mode}"))(_batch([image], [masks]))["embeddings"][0]
    e = Embed(_cfg(tiny_cfg_path, f"models.clip.mode={mode}", "models.device.precision=bf16"))
    emb = e(_batch([image], [masks]))["embeddings"][0].astype(np.float32)
    assert emb.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    assert (emb * ref.astype(np.float32)).sum(1).min() > 0.97


def test_error_rows_pass_through(pool_embed, image):
    good = _blob((64, 64), 3)
    batch = _batch([image, image, image, image, image],
                   [[good], [good], [], [np.zeros((64, 64), bool)], [good]],
                   errors=["decode: OSError: broken", "", "", "", ""])
    batch["seg_masks_rle"][4] = [encode_rle(np.ones((32, 32), bool))]  # wrong size
    out = pool_embed(batch)
    errs = list(out["error"])
    assert errs[0] == "decode: OSError: broken"
    assert errs[1] == "" and errs[2] == ""
    assert errs[3].startswith("embed: ValueError: mask 0 of 1 is empty")
    assert errs[4].startswith("embed: ValueError: mask 0 has size 32x32")
    shapes = [e.shape for e in out["embeddings"]]
    assert shapes == [(0, 64), (1, 64), (0, 64), (0, 64), (0, 64)]
    assert all(e.dtype == np.float16 for e in out["embeddings"])
    assert "image" in out and "seg_masks_rle" in out


def test_text_embedder(pool_embed):
    te = C.TextEmbedder(pool_embed.cfg, bundle=pool_embed.bundle)
    names = ["cat", "dog", "traffic light"]
    v = te.encode(names)
    assert v.shape == (3, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # the template ensemble by hand
    b = pool_embed.bundle
    with torch.inference_mode():
        per = [F.normalize(b.model.encode_text(b.tokenizer([t.format(n) for t in te.templates])), dim=-1)
               for n in names]
    hand = F.normalize(torch.stack([p.mean(0) for p in per]), dim=-1).numpy()
    np.testing.assert_allclose(v, hand, atol=1e-5)
    assert tuple(names) in te._cache
    v[:] = 0  # callers get copies: the cache stays intact
    np.testing.assert_allclose(te.encode(names), hand, atol=1e-5)
    assert te.encode([]).shape == (0, 64)


def test_vit_crop_only(tiny_cfg_path, image):
    import json

    vit = ["models.clip.model=tiny-vit", f"models.clip.model_cfg={json.dumps(TINY_VIT)}"]
    with pytest.raises(UserError, match="mode=crop"):
        Embed(_cfg(tiny_cfg_path, *vit))
    e = Embed(_cfg(tiny_cfg_path, *vit, "models.clip.mode=crop"))
    assert e.dim == 32 and e.model_id == "open_clip:tiny-vit/random" and e.bundle.image_size == (32, 32)
    out = e(_batch([image], [[_blob((64, 64), 1), np.ones((64, 64), bool)]]))
    emb = out["embeddings"][0]
    assert emb.shape == (2, 32) and emb.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    x = F.interpolate(C.image_tensor(image, e.bundle)[None], size=(32, 32), mode="bicubic", antialias=True)
    with torch.inference_mode():
        ref = e.bundle.model.encode_image(x, normalize=True).numpy()[0]
    np.testing.assert_allclose(emb[1].astype(np.float32), ref, atol=2e-3)
    te = C.TextEmbedder(e.cfg, bundle=e.bundle)
    assert te.encode(["cat"]).shape == (1, 32)


def test_embed_in_ray_data(ray_local, tiny_cfg_path):
    import ray

    cfg = _cfg(tiny_cfg_path)
    rs = np.random.RandomState(0)
    rows = [{"image": rs.randint(0, 256, (48, 64, 3), dtype=np.uint8),
             "seg_masks_rle": [encode_rle(_blob((48, 64), i)) for i in range(i % 3)],
             "error": "", "i": i} for i in range(6)]
    ds = ray.data.from_items(rows).map_batches(Embed, fn_constructor_args=(cfg,),
                                               compute=ray.data.ActorPoolStrategy(size=1),
                                               batch_size=4, batch_format="numpy")
    out = sorted(ds.take_all(), key=lambda r: int(r["i"]))  # an actor pool need not keep the order
    assert [int(r["i"]) for r in out] == list(range(6))
    for i, r in enumerate(out):
        e = np.asarray(r["embeddings"])
        assert r["error"] == "" and e.shape == (i % 3, 64)


@pytest.mark.slow
def test_full_size_convnext_large_d_320(tiny_cfg_path):
    """FC-CLIP's backbone architecture at full size (random weights): 768-d, dense trunk, pool path."""
    cfg = _cfg(tiny_cfg_path, "models.clip.model=convnext_large_d_320", "models.clip.pretrained=null",
               "models.clip.model_cfg=null")
    b = C.load_clip(cfg.models, cache=False)
    assert b.dim == 768 and b.image_size == (320, 320) and C.has_dense_trunk(b.visual)
    assert b.model_id == "open_clip:convnext_large_d_320/random"
    img = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        x = C.image_tensor(img, b)[None]
        dense = C.dense_features(b.visual, x)[0]
        assert dense.shape == (1536, 2, 2)
        m = torch.ones((1, 64, 64), dtype=torch.bool)
        emb = C.pooled_to_embedding(b.visual, C.mask_pool(dense, C.mask_cell_weights(m, (2, 2))))
        ref = b.model.encode_image(x)
    assert emb.shape == (1, 768)
    torch.testing.assert_close(emb, ref, atol=1e-4, rtol=1e-4)
