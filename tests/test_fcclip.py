"""FC-CLIP: the official checkpoint's names load strictly into the full-size model, the tiny model's
proposal stage, the shared-trunk query equals Embed's pool feature, the ensemble maths, convert-weights
and the index-identity check."""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from ragseg.config import FcclipConfig, load_config
from ragseg.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "fcclip_convnext_large_keys.json"


@pytest.fixture(scope="module")
def tiny(tiny_cfg_path):
    from ragseg.models.clip import load_clip
    from ragseg.models.fcclip import load_fcclip

    cfg = load_config(tiny_cfg_path)
    bundle = load_clip(cfg.models)
    return cfg, bundle, load_fcclip(cfg, bundle)


def _vocab(tmp_path, names=("sky", "grass", "person", "bike")):
    from ragseg.vocab import load_vocab

    p = tmp_path / "vocab.json"
    p.write_text(json.dumps([{"name": n, "isthing": n in ("person", "bike")} for n in names]))
    return load_vocab(str(p))


def _image(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (30, 120, 40)
    img[:, w // 2:] = (120, 160, 220)
    img[h // 3: 2 * h // 3, w // 4: w // 2] = (200, 40, 40)
    return np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# full-size model vs the official checkpoint's names and shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_size_model_loads_official_names_strictly():
    import open_clip

    from ragseg.models.fcclip import build_fcclip

    keys = {k: tuple(v) for k, v in json.loads(FIXTURE.read_text())["keys"].items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip_model = open_clip.create_model("convnext_large_d_320", pretrained=None)
    model = build_fcclip(clip_model, FcclipConfig())  # the default config = FC-CLIP's eval config
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(keys) - set(mine)) == []  # nothing the checkpoint has is missing
    assert sorted(set(mine) - set(keys)) == []  # nothing unexpected
    assert {k: s for k, s in mine.items() if keys[k] != s} == {}
    sd = {k: torch.full(s, 0.5) for k, s in keys.items()}
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert float(model.sem_seg_head.predictor.logit_scale) == 0.5
    assert model.sem_seg_head.predictor.query_feat.weight.shape == (250, 256)
    del sd, model, clip_model


def test_checkpoint_mismatch_is_one_line(tiny, tmp_path):
    from safetensors.torch import save_file

    from ragseg.models.fcclip import load_safetensors_into

    _, _, model = tiny
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.pop("void_embedding.weight")
    sd["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(UserError) as e:
        load_safetensors_into(model, str(path), "bad.safetensors")
    msg = str(e.value)
    assert "1 missing (e.g. void_embedding.weight)" in msg and "1 unexpected" in msg and "shape mismatch" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="convert-weights"):
        load_safetensors_into(model, str(tmp_path / "x.pth"), "x.pth")


def test_tiny_checkpoint_roundtrip_through_resolve(tiny, tmp_path):
    """A safetensors file of the tiny model loads strictly through the config (weights.resolve + sha256)."""
    from safetensors.torch import save_file

    from ragseg.models.fcclip import load_fcclip
    from ragseg.models.weights import file_sha256

    cfg, bundle, model = tiny
    sd = {k: v.clone() + 0.25 for k, v in model.state_dict().items()}
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    from ragseg.models.clip import load_clip

    def with_fc(**kw):
        return cfg.models.model_copy(update={"fcclip": cfg.models.fcclip.model_copy(update=kw)})

    b2 = load_clip(cfg.models, cache=False)  # its own copy: loading overwrites the backbone too
    loaded = load_fcclip(with_fc(checkpoint=str(path), sha256=file_sha256(path)), b2)
    assert torch.equal(loaded.void_embedding.weight, sd["void_embedding.weight"])
    assert torch.equal(b2.model.visual.trunk.stem[0].weight, sd["backbone.clip_model.visual.trunk.stem.0.weight"])
    with pytest.raises(UserError, match="sha256"):
        load_fcclip(with_fc(checkpoint=str(path), sha256="0" * 64), b2)


# ----------------------------------------------------------------------------------------------
# one trunk pass: queries = Embed's pool features
# ----------------------------------------------------------------------------------------------
def test_shared_trunk_query_equals_embed_pool_feature(tiny, tmp_path):
    from ragseg.masks import encode_rle
    from ragseg.models.clip import dense_features, image_tensor, resize
    from ragseg.stages.embed import Embed
    from ragseg.stages.fcclip import FcclipProposals

    cfg, bundle, model = tiny
    stage = FcclipProposals(cfg, _vocab(tmp_path), bundle=bundle, model=model)
    img = _image()
    masks = np.zeros((3, *img.shape[:2]), bool)
    masks[0, 32:64, 32:64] = True
    masks[1, :, 64:] = True
    masks[2, 5:7, 100:103] = True  # tiny: below one feature cell
    shape = stage.input_shape(img.shape[:2])
    x = resize(image_tensor(img, bundle)[None], shape, bundle.interpolation)
    with torch.inference_mode():
        feats, dense = model.trunk(x)
        assert torch.equal(dense, dense_features(bundle.visual, x))  # the map Embed pools from
        q = stage.pool_embeddings(dense[0].float(), torch.from_numpy(masks))
    emb = Embed(cfg, bundle=bundle)
    want = emb.embed_rows([(img, masks)])[0]
    assert q.dtype == np.float16 and q.shape == want.shape == (3, bundle.dim)
    np.testing.assert_array_equal(q, want)
    # and through the Ray batch interface of Embed
    col, rles = np.empty(1, dtype=object), np.empty(1, dtype=object)
    col[0], rles[0] = img, [encode_rle(m) for m in masks]
    out = emb({"image": col, "seg_masks_rle": rles, "error": np.array([""], dtype=object)})
    np.testing.assert_array_equal(out["embeddings"][0], q)


def test_stage_columns_and_bad_rows(tiny, tmp_path):
    from ragseg.masks import decode_rle
    from ragseg.stages.fcclip import FcclipProposals

    cfg, bundle, model = tiny
    vocab = _vocab(tmp_path)
    stage = FcclipProposals(cfg, vocab, bundle=bundle, model=model)
    imgs = np.empty(4, dtype=object)
    imgs[0], imgs[1], imgs[2], imgs[3] = _image(), _image(80, 60, 1), np.zeros((4,), np.uint8), _image()
    batch = {"image": imgs, "error": np.array(["", "", "", "decode: broken"], dtype=object)}
    out = stage(batch)
    assert out["error"][0] == "" and out["error"][1] == ""
    assert out["error"][2].startswith("fcclip: ValueError") and out["error"][3] == "decode: broken"
    for i, (h, w) in ((0, (96, 128)), (1, (80, 60))):
        n = len(out["seg_masks_rle"][i])
        assert 1 <= n <= cfg.models.fcclip.topk
        assert out["embeddings"][i].shape == (n, bundle.dim) and out["embeddings"][i].dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(out["embeddings"][i].astype(np.float32), axis=1), 1, atol=2e-3)
        assert out["seg_iv_logits"][i].shape == (n, len(vocab))
        assert list(out["seg_ids"][i]) == list(range(1, n + 1))
        scores = out["seg_scores"][i]
        assert np.all(np.diff(scores) <= 0) and np.all((scores > 0) & (scores <= 1))
        for r in out["seg_masks_rle"][i]:
            m = decode_rle(r)
            assert m.shape == (h, w) and m.any()
    for i in (2, 3):
        assert len(out["seg_masks_rle"][i]) == 0 and out["embeddings"][i].shape == (0, bundle.dim)


def test_void_and_topk_filter(tiny, tmp_path):
    """Post-processing on hand-made logits: void-argmax queries and those <= the threshold are dropped,
    the top-k by class probability kept, masks binarised at logit 0."""
    from ragseg.masks import decode_rle
    from ragseg.stages.fcclip import FcclipProposals

    cfg, bundle, model = tiny
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={
        "fcclip": cfg.models.fcclip.model_copy(update={"topk": 2, "object_mask_threshold": 0.3})})})
    stage = FcclipProposals(cfg, _vocab(tmp_path, ("a", "b")), bundle=bundle, model=model)
    # 5 queries over C = 2 classes + void
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1],    # kept (0.7)
                                     [0.1, 0.2, 0.7],    # void argmax: dropped
                                     [0.25, 0.5, 0.25],  # kept (0.5)
                                     [0.4, 0.35, 0.25],  # 0.4: cut by top-k 2
                                     [0.28, 0.27, 0.45]]))  # void wins
    masks = torch.full((5, 8, 8), -5.0)
    masks[0, :4] = 5.0
    masks[2, 4:] = 5.0
    masks[3] = 5.0
    dense = torch.randn(bundle.visual.trunk.num_features, 1, 1)
    out = stage.postprocess((32, 32), (32, 32), logits, masks, dense)
    np.testing.assert_allclose(out["seg_scores"], [0.7, 0.5], rtol=1e-6)
    np.testing.assert_allclose(out["seg_iv_logits"], logits[[0, 2], :2].numpy(), rtol=1e-6)
    m0, m1 = (decode_rle(r) for r in out["seg_masks_rle"])
    assert m0[:15].all() and not m0[17:].any() and m1[17:].all() and not m1[:15].any()


# ----------------------------------------------------------------------------------------------
# ensemble maths (FC-CLIP geometric form with retrieval), hand-computed
# ----------------------------------------------------------------------------------------------
def test_geometric_ensemble_hand_computed(tmp_path):
    from ragseg.models.fcclip import trained_class_names
    from ragseg.scoring import ensemble, in_train_mask, iv_scores_over_vocab
    from ragseg.vocab import load_vocab

    p = tmp_path / "v.csv"
    p.write_text("name,isthing,id,synonyms\nperson,1,1,individual\nbike,1,2,\nwindmill,1,3,\n")
    vocab = load_vocab(str(p))
    in_train = in_train_mask(vocab, trained_class_names())
    assert list(in_train) == [True, True, False]  # person, bike (a bicycle synonym) trained; windmill novel

    iv = np.log(np.array([[0.6, 0.3, 0.1]]))  # logits over the vocabulary: softmax = s_iv
    s_iv = iv_scores_over_vocab(iv, vocab, [])
    np.testing.assert_allclose(s_iv, [[0.6, 0.3, 0.1]], rtol=1e-6)
    s_ret = np.array([[0.2, 0.0, 0.8]])
    s_clip = np.array([[0.5, 0.25, 0.25]])
    a, b, g = 0.4, 0.7, 0.3
    got = ensemble(s_ret, s_clip, s_iv, in_train, a, b, g, "geometric")
    # s_oov = 0.3 s_ret + 0.7 s_clip = [0.41, 0.175, 0.415]
    want = [0.6 ** 0.6 * 0.41 ** 0.4,      # trained: s_iv^(1-alpha) s_oov^alpha
            0.3 ** 0.6 * 0.175 ** 0.4,
            0.1 ** 0.3 * 0.415 ** 0.7]     # novel: s_iv^(1-beta) s_oov^beta
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    np.testing.assert_allclose(got[0], [0.5152, 0.2418, 0.2708], atol=1e-4)  # the same, as numbers
    # gamma = 0 is FC-CLIP alone (no retrieval): s_oov = s_clip
    np.testing.assert_allclose(ensemble(s_ret, s_clip, s_iv, in_train, a, 0.8, 0.0, "geometric")[0],
                               [0.6 ** 0.6 * 0.5 ** 0.4, 0.3 ** 0.6 * 0.25 ** 0.4, 0.1 ** 0.2 * 0.25 ** 0.8],
                               rtol=1e-5)


def test_label_config_fills_trained_classes(tiny_cfg_path):
    from ragseg.stages.fcclip import label_config

    cfg = load_config(tiny_cfg_path, ["label.proposals=fcclip"])
    filled = label_config(cfg).label.ensemble.trained_classes
    assert "person" in filled and "bicycle" in filled and "wall-other-merged" in filled and len(filled) > 133
    mine = load_config(tiny_cfg_path, ["label.ensemble.trained_classes=[cat]"])
    assert label_config(mine).label.ensemble.trained_classes == ["cat"]


# ----------------------------------------------------------------------------------------------
# index identity
# ----------------------------------------------------------------------------------------------
def test_index_identity_refusals(tiny_cfg_path, tmp_path):
    from ragseg import db as dblib
    from ragseg.pipelines.build_db import embed_identity
    from ragseg.stages.fcclip import check_index_identity

    cfg = load_config(tiny_cfg_path, ["label.proposals=fcclip", "models.clip.mode=crop"])
    model_id, _, dim = embed_identity(cfg)
    ok = {"embed_model": model_id, "embed_mode": "pool", "dim": dim}
    check_index_identity(cfg, ok, "idx")  # fcclip always pools: the config's crop mode is irrelevant
    for bad in ({**ok, "embed_mode": "crop"}, {**ok, "embed_model": "open_clip:ViT-B-32/openai"},
                {**ok, "dim": dim * 2}):
        with pytest.raises(UserError, match="label.proposals=fcclip") as e:
            check_index_identity(cfg, bad, "idx")
        assert "\n" not in str(e.value)
    db = tmp_path / "db"
    from ragseg import ledger

    ledger.write_header(str(db), dblib.new_header(model_id, "pool", dim, "h", {"clip": {"pool_image_size": 320}}))
    with pytest.raises(UserError, match="pool_image_size 320 there vs 512 here"):
        check_index_identity(cfg, {**ok, "db_uri": str(db)}, "idx")
    same = load_config(tiny_cfg_path, ["label.proposals=fcclip", "models.clip.pool_image_size=320"])
    check_index_identity(same, {**ok, "db_uri": str(db)}, "idx")


# ----------------------------------------------------------------------------------------------
# convert-weights
# ----------------------------------------------------------------------------------------------
def test_convert_weights_detectron2_layout(tmp_path):
    """A file in the layout detectron2's Checkpointer writes ({"model": state_dict, plus trainer
    state}); model-zoo conversions hold numpy arrays."""
    from safetensors.torch import load_file

    from ragseg.jobs.cli import app
    from ragseg.models.fcclip import convert_checkpoint

    sd = OrderedDict([("sem_seg_head.predictor.query_feat.weight", torch.randn(4, 8)),
                      ("void_embedding.weight", np.arange(6, dtype=np.float32).reshape(1, 6)),
                      ("criterion.empty_weight", torch.ones(3)),
                      ("sem_seg_head.predictor.logit_scale", torch.tensor(2.5))])
    src = tmp_path / "model_final.pth"
    torch.save({"model": sd, "iteration": 368749, "__author__": "fcclip", "scheduler": {"last_epoch": 3}},
               str(src))
    with pytest.raises(pickle.UnpicklingError):  # the reason convert-weights exists
        torch.load(str(src), weights_only=True)
    out = tmp_path / "fcclip.safetensors"
    summary = convert_checkpoint(str(src), str(out))
    assert summary["tensors"] == 4 and len(summary["sha256"]) == 64
    got = load_file(str(out))
    assert torch.equal(got["sem_seg_head.predictor.query_feat.weight"], sd["sem_seg_head.predictor.query_feat.weight"])
    assert torch.equal(got["void_embedding.weight"], torch.arange(6.0).reshape(1, 6))
    assert got["sem_seg_head.predictor.logit_scale"].shape == ()

    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["convert-weights", str(src), str(tmp_path / "cli.safetensors")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["tensors"] == 4


class _Evil:  # a type outside the allow-list
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_convert_weights_refuses_other_types(tmp_path):
    from ragseg.models.fcclip import convert_checkpoint

    src = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "x": _Evil()}, str(src))
    with pytest.raises(UserError, match="allow-list") as e:
        convert_checkpoint(str(src), str(tmp_path / "o.safetensors"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "notes.pth"
    torch.save({"model": {"w": "a string"}}, str(bad))
    with pytest.raises(UserError, match="not a tensor"):
        convert_checkpoint(str(bad), str(tmp_path / "o2.safetensors"))


def test_stage_runs_under_bf16_autocast(tiny_cfg_path, tmp_path):
    """The CUDA path's dtypes (bf16 autocast, pixel decoder in fp32), exercised with CPU autocast."""
    from ragseg.stages.fcclip import FcclipProposals

    cfg = load_config(tiny_cfg_path, ["models.device.precision=bf16"])
    stage = FcclipProposals(cfg, _vocab(tmp_path))
    imgs = np.empty(2, dtype=object)
    imgs[0], imgs[1] = _image(), _image(seed=1)
    out = stage({"image": imgs, "error": np.array(["", ""], dtype=object)})
    assert list(out["error"]) == ["", ""]
    for i in range(2):
        n = len(out["seg_masks_rle"][i])
        assert out["embeddings"][i].shape == (n, stage.dim) and np.isfinite(out["seg_iv_logits"][i]).all()
