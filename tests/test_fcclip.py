"""FC-CLIP: the official checkpoint's names load strictly into the full-size model, the tiny model's label
stage, a database key equals the query with the same mask, the test-time steps on hand-made inputs
(tests/test_fcclip_golden.py checks them against the official code), convert-weights and the
index-identity check."""

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
# keys and queries pooled by one operator
# ----------------------------------------------------------------------------------------------
def test_key_from_a_mask_equals_the_query_with_that_mask(tiny, tiny_cfg_path, tmp_path):
    """A database key (Embed, models.clip.mode=fcclip, binary mask) and an FC-CLIP query whose mask
    logits are that mask's map give the identical vector: same input rule, same trunk pass, same
    pooling operator, same head."""
    from ragseg.fcclip_inference import TestGeometry, binary_mask_logits, network_input
    from ragseg.stages.embed import Embed
    from ragseg.stages.fcclip import FcclipLabel, geometry

    cfg, bundle, model = tiny
    cfg = load_config(tiny_cfg_path, ["models.clip.mode=fcclip", "label.ensemble.scores=clip"])
    img = _image(90, 140)  # non-square: the input is padded
    masks = np.zeros((3, 90, 140), bool)
    masks[0, 20:70, 30:90] = True
    masks[1, :, 100:] = True
    masks[2, 40:43, 60:62] = True  # tiny: below one cell
    key = Embed(cfg, bundle=bundle).embed_rows([(img, masks)])[0]
    geo = geometry(cfg)
    assert geo == TestGeometry(256, 427, 32)
    x, size = network_input(img, geo, bundle.mean, bundle.std)
    assert size == (256, 398) and tuple(x.shape[-2:]) == (256, 416)
    stage = FcclipLabel(cfg, _vocab(tmp_path), bundle=bundle, model=model)
    logits, _, dense, size2 = stage.forward([(img, None)])[0]
    assert size2 == size
    q_logits = torch.full((3, logits.shape[1]), 0.0)
    q_logits[:, 0] = 5.0
    q_masks = binary_mask_logits(torch.from_numpy(masks), size, tuple(x.shape[-2:]))
    res = stage.postprocess(img.shape[:2], q_logits, q_masks, dense, size)
    q = torch.nn.functional.normalize(res.embeddings, dim=-1).numpy().astype(np.float16)
    np.testing.assert_array_equal(q[:2], key[:2])
    # the tiny mask: the query pools nothing (FC-CLIP), the key falls back to its best cell
    assert not (res.mask_for_pooling[2] > 0).any()
    assert not np.array_equal(q[2], key[2])


def test_test_shape_is_detectron2s_rule():
    from ragseg.fcclip_inference import padded_shape, test_shape

    # shorter side 800 unless the longer passes 1333 (detectron2 ResizeShortestEdge), half up
    assert test_shape(480, 640, 800, 1333) == (800, 1067)
    assert test_shape(640, 480, 800, 1333) == (1067, 800)
    assert test_shape(500, 500, 800, 1333) == (800, 800)
    assert test_shape(300, 1000, 800, 1333) == (400, 1333)  # 800 x 2667 -> scaled to 1333
    assert padded_shape((800, 1067), 32) == (800, 1088)
    assert padded_shape((400, 1333), 32) == (416, 1344)
    assert padded_shape((37, 50), 0) == (37, 50)


def test_stage_columns_and_bad_rows(tiny, tiny_cfg_path, tmp_path):
    from ragseg.masks import decode_rle, rgb_to_id
    from ragseg.stages.fcclip import FcclipLabel

    cfg, bundle, model = tiny
    cfg = load_config(tiny_cfg_path, ["label.ensemble.scores=clip"])
    vocab = _vocab(tmp_path)
    stage = FcclipLabel(cfg, vocab, bundle=bundle, model=model)
    imgs = np.empty(4, dtype=object)
    imgs[0], imgs[1], imgs[2], imgs[3] = _image(), _image(80, 60, 1), np.zeros((4,), np.uint8), _image()
    batch = {"image": imgs, "error": np.array(["", "", "", "decode: broken"], dtype=object),
             "image_id": np.array(["a", "b", "c", "d"], dtype=object)}
    out = stage(batch)
    assert "image" not in out and list(out["image_id"]) == ["a", "b", "c", "d"]
    assert out["error"][0] == "" and out["error"][1] == ""
    assert out["error"][2].startswith("fcclip: ValueError") and out["error"][3] == "decode: broken"
    for i, (h, w) in ((0, (96, 128)), (1, (80, 60))):
        png = out["panoptic_png"][i]
        assert png.shape == (h, w, 3) and png.dtype == np.uint8
        ids = rgb_to_id(png)
        infos = json.loads(out["segments_info"][i])
        assert sorted(np.unique(ids[ids > 0]).tolist()) == sorted(s["id"] for s in infos)
        for s in infos:
            assert s["area"] == int((ids == s["id"]).sum()) and s["category_id"] in vocab.ids
            assert 0 < s["score"] <= 1 and s["s_ret"] is None and 0 <= s["s_clip"] <= 1 and 0 <= s["s_iv"] <= 1
            assert np.array_equal(decode_rle(s["mask_rle"]), ids == s["id"])
    for i in (2, 3):
        assert out["panoptic_png"][i].shape == (0, 0, 3) and out["segments_info"][i] == "[]"


def test_panoptic_inference_hand_computed():
    """Mask2Former's panoptic inference on hand-made inputs: void-argmax and sub-threshold queries are
    dropped (no top-k), pixels go to the highest score x sigmoid, a query that keeps < 80% of its mask is
    dropped, stuff of one class merges, thing instances stay apart."""
    from ragseg.fcclip_inference import panoptic_inference

    # C = 3 classes (0 thing, 1 stuff, 2 thing) + void; probabilities -> log (as FC-CLIP hands them on)
    probs = torch.tensor([[0.90, 0.05, 0.03, 0.02],   # q0 thing, big box left
                          [0.05, 0.80, 0.05, 0.10],   # q1 stuff, top band
                          [0.05, 0.75, 0.05, 0.15],   # q2 stuff, bottom band: merges into q1's segment
                          [0.10, 0.10, 0.10, 0.70],   # q3 void: dropped
                          [0.02, 0.03, 0.60, 0.35],   # q4 thing, overlaps q0 (loses most pixels): dropped
                          [0.05, 0.05, 0.55, 0.35],   # q5 thing, right strip
                          [0.30, 0.30, 0.30, 0.10]])  # q6: 0.3 <= threshold 0.35: dropped
    m = torch.full((7, 4, 4), -8.0)  # stride-4 logits of a 16 x 16 input
    m[0, 1:3, 0:2] = 8.0
    m[1, 0, :] = 8.0
    m[2, 3, :] = 8.0
    m[3, :, :] = 8.0
    m[4, 1:3, 0:2] = 8.0
    m[5, 1:3, 3] = 8.0
    m[6, :, :] = 8.0
    r = panoptic_inference(torch.log(probs + 1e-8), m, [True, False, True], (16, 16), (16, 16), (16, 16),
                           object_mask_threshold=0.35, overlap_threshold=0.8, chunk=2)
    assert r.keep.tolist() == [True, True, True, False, True, True, False]
    segs = [(s["id"], s["class_idx"], s["query"]) for s in r.segments]
    assert segs == [(1, 0, 0), (2, 1, 1), (3, 2, 5)]
    ids = r.id_map.numpy()
    assert set(np.unique(ids).tolist()) == {0, 1, 2, 3}
    assert (ids[0] == 2).sum() >= 12 and (ids[15] == 2).sum() >= 12  # both bands in one stuff segment
    # chunking does not change anything
    r1 = panoptic_inference(torch.log(probs + 1e-8), m, [True, False, True], (16, 16), (16, 16), (16, 16),
                            object_mask_threshold=0.35, overlap_threshold=0.8, chunk=64)
    assert torch.equal(r1.id_map, r.id_map) and r1.segments == r.segments


def test_ensemble_normalises_and_appends_void():
    """FC-CLIP's ensemble: geometric fusion per class group, log-softmax renormalisation, times (1 - p_void),
    p_void appended; RetCLIP's s_oov on rows with retrieval support only."""
    from ragseg.fcclip_inference import ensemble

    iv = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))  # in-vocab logits incl. void: s_iv = [2/3, 1/3]
    oov = torch.log(torch.tensor([[0.2, 0.8, 1.0]]))  # void column ignored: s_clip = [0.2, 0.8]
    s_ret = torch.tensor([[1.0, 0.0]])
    st = ensemble(iv, oov, torch.tensor([1, 0]), alpha=0.4, beta=0.7, s_ret=s_ret, gamma=0.3)
    s_oov = np.array([0.3 + 0.7 * 0.2, 0.7 * 0.8])
    fused = np.array([(2 / 3) ** 0.6 * s_oov[0] ** 0.4, (1 / 3) ** 0.3 * s_oov[1] ** 0.7])
    p = fused / fused.sum()
    np.testing.assert_allclose(st.s_oov.numpy()[0], s_oov, rtol=1e-6)
    np.testing.assert_allclose(st.mask_cls_probs.numpy()[0], [*(p * 0.9), 0.1], rtol=1e-5)
    np.testing.assert_allclose(st.mask_cls_results.numpy(), np.log(st.mask_cls_probs.numpy() + 1e-8), rtol=1e-6)
    # no support (s_ret all zero): s_oov = s_clip
    st0 = ensemble(iv, oov, torch.tensor([1, 0]), alpha=0.4, beta=0.7, s_ret=torch.zeros(1, 2), gamma=0.3)
    np.testing.assert_allclose(st0.s_oov.numpy(), [[0.2, 0.8]], rtol=1e-6)


def test_class_name_lists_and_overlap(tmp_path):
    from ragseg.models.fcclip import class_name_lists, overlap_mask
    from ragseg.vocab import Vocab

    v = Vocab.from_names(["window", "person", "windmill", "road, route", "tv"], synonyms={"windmill": ["mill"]})
    lists = class_name_lists(v, "fcclip")
    assert lists[0][:3] == ["windowpane", "window", "windows"]  # FC-CLIP's ADE20k-150 list
    assert lists[1][0] == "person" and "child" in lists[1]
    assert lists[2] == ["windmill", "mill"]  # not an FC-CLIP class: the vocabulary's names
    assert lists[3][:2] == ["road", "route"] and lists[4][0] == "television receiver"
    assert class_name_lists(v, "vocab")[0] == ["window"]
    assert overlap_mask(lists).tolist() == [True, True, False, True, True]  # road / tv: COCO names too
    assert overlap_mask([["a"], ["b", "c"]], ["c"]).tolist() == [False, True]


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


# ----------------------------------------------------------------------------------------------
# index identity
# ----------------------------------------------------------------------------------------------
def test_index_identity_refusals(tiny_cfg_path, tmp_path):
    """label.proposals=fcclip refuses (one line) an index whose keys another embedder or another input rule
    made: the identity recorded by build-db (ragseg.identity), FC-CLIP's test sizes included."""
    from ragseg import identity
    from ragseg.stages.fcclip import check_index_identity

    built = load_config(tiny_cfg_path, ["models.clip.mode=fcclip"])
    ok = {"embedder": identity.record(built)}
    assert ok["embedder"]["fcclip_input"] == [256, 427, 32]
    cfg = load_config(tiny_cfg_path, ["label.proposals=fcclip", "models.clip.mode=crop"])
    check_index_identity(cfg, ok, "idx")  # fcclip queries always pool FC-CLIP's way: clip.mode is irrelevant
    for other in (["models.clip.mode=pool"], ["models.clip.mode=crop"], ["models.clip.seed=7"],
                  ["models.clip.mode=fcclip", "models.fcclip.min_size_test=320"]):
        bad = {"embedder": identity.record(load_config(tiny_cfg_path, other))}
        with pytest.raises(UserError, match="label.proposals=fcclip") as e:
            check_index_identity(cfg, bad, "idx")
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"fcclip_input \[256, 427, 32\] there vs \[320, 427, 32\] here"):
        check_index_identity(load_config(tiny_cfg_path, ["models.fcclip.min_size_test=320"]), ok, "idx")
    # an index without the fcclip input rule (an older record) is refused with "rebuild"
    old = {"embed_model": ok["embedder"]["model"], "embed_mode": "fcclip", "dim": ok["embedder"]["dim"]}
    with pytest.raises(UserError, match="rebuild"):
        check_index_identity(cfg, old, "idx")


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
    """The CUDA path's dtypes (bf16 autocast, pixel decoder in fp32, post-processing in fp32), exercised
    with CPU autocast."""
    from ragseg.stages.fcclip import FcclipLabel

    cfg = load_config(tiny_cfg_path, ["models.device.precision=bf16", "label.ensemble.scores=clip"])
    stage = FcclipLabel(cfg, _vocab(tmp_path))
    imgs = np.empty(2, dtype=object)
    imgs[0], imgs[1] = _image(), _image(seed=1)
    out = stage({"image": imgs, "error": np.array(["", ""], dtype=object)})
    assert list(out["error"]) == ["", ""]
    for i in range(2):
        assert out["panoptic_png"][i].shape == (96, 128, 3)
        assert all(np.isfinite(s["score"]) for s in json.loads(out["segments_info"][i]))
