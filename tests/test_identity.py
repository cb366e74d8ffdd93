"""The embedder identity (ragseg.identity): recorded, compared field by field, adopted from an index."""

from __future__ import annotations

import logging

import pytest

from ragseg import identity
from ragseg.config import load_config
from ragseg.errors import UserError


def test_identity_fields_and_one_line_differences(tiny_cfg_path):
    cfg = load_config(tiny_cfg_path)
    base = identity.embed_identity(cfg)
    assert base == {"model": "open_clip:tiny-convnext/random", "arch": base["arch"], "weights": "random(seed=0)",
                    "weights_sha256": None, "mode": "pool", "pool_image_size": 512, "fcclip_input": None,
                    "context_pad": None, "dim": 64}
    identity.check(base, base, "index I")
    for override, field in (("models.clip.pool_image_size=256", "pool_image_size 512 there vs 256 here"),
                            ("models.clip.seed=3", "weights random(seed=0) there vs random(seed=3) here"),
                            ("models.clip.mode=crop", "mode pool there vs crop here"),
                            ("models.clip.model_cfg.vision_cfg.timm_model_name=convnext_femto", "arch")):
        other = identity.embed_identity(load_config(tiny_cfg_path, [override]))
        with pytest.raises(UserError) as e:
            identity.check(base, other, "index I")
        assert field in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("index I ")
    # FC-CLIP's pooling: its test input rule is part of the identity
    fc = identity.embed_identity(load_config(tiny_cfg_path, ["models.clip.mode=fcclip"]))
    assert fc["fcclip_input"] == [256, 427, 32] and fc["pool_image_size"] is None
    other = identity.embed_identity(load_config(tiny_cfg_path, ["models.clip.mode=fcclip",
                                                                "models.fcclip.max_size_test=512"]))
    with pytest.raises(UserError, match=r"fcclip_input \[256, 427, 32\] there vs \[256, 512, 32\] here"):
        identity.check(fc, other, "index I")


def test_weights_compare_by_checksum_when_both_know_it():
    a = {"model": "m", "weights": "/a/w.pt", "weights_sha256": "ab" * 32, "dim": 4}
    assert identity.compare(a, {**a, "weights": "s3://mirror/w.pt"}) == ([], [])  # same file elsewhere
    assert identity.compare(a, {**a, "weights_sha256": "cd" * 32}) == (["weights"], [])
    assert identity.compare({**a, "weights_sha256": None}, {**a, "weights": "/b/w.pt"}) == (["weights"], [])


def test_old_records_warn_about_what_they_do_not_say(tiny_cfg_path, caplog):
    want = identity.embed_identity(load_config(tiny_cfg_path))
    old_meta = {"embed_model": want["model"], "embed_mode": "pool", "dim": 64}  # an index of ragseg 0.2
    have = identity.index_identity(old_meta)
    with caplog.at_level(logging.WARNING, logger="ragseg.identity"):
        identity.check(have, want, "index I")
    assert "does not record the embedder's arch, weights, pool_image_size" in caplog.text
    # an old DB manifest's models section fills in what it knows
    header = {"embed_model": want["model"], "embed_mode": "pool", "dim": 64,
              "models": {"clip": load_config(tiny_cfg_path).models.clip.model_dump(mode="json")}}
    assert identity.compare(identity.header_identity(header), want) == ([], [])


def test_adopt_clip_takes_only_what_the_config_leaves_out(tiny_cfg_path):
    recorded = load_config(tiny_cfg_path).models.clip.model_dump(mode="json")
    bare = identity.adopt_clip(load_config(None), recorded)
    assert bare.models.clip.model == "tiny-convnext" and bare.models.clip.model_cfg == recorded["model_cfg"]
    assert identity.embed_identity(bare) == identity.embed_identity(load_config(tiny_cfg_path))
    mine = identity.adopt_clip(load_config(None, ["models.clip.pool_image_size=256", "models.clip.batch_size=2"]),
                               recorded)
    assert mine.models.clip.pool_image_size == 256 and mine.models.clip.batch_size == 2  # the user's, checked later
    assert mine.models.clip.model == "tiny-convnext"
