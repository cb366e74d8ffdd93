"""FLOP accounting (bench/stages.py --flops): counted on meta tensors (no full-size forward pass), and
the committed bench/results/flops.json covers every stage at full size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import stages as bstages  # noqa: E402


def test_sam_vit_h_flops_on_meta():
    """SAM ViT-H's image encoder at 1024 px: ~2.98 TMAC (the published ~3.0 TMAC), on meta tensors."""
    row = bstages._rates(bstages.flops_sam())
    enc = row["parts"]["image_encoder"]
    assert abs(enc / 2 - 2.98e12) < 0.03e12, enc
    assert row["flops_per_image"] == enc + 16 * row["parts"]["prompts_per_box"]
    assert 160 < row["ceiling_images_per_s"] < 170 and row["counted_on"] == "meta"


def test_flops_json_covers_every_stage():
    doc = json.loads((ROOT / "bench" / "results" / "flops.json").read_text())
    got = {r["stage"] for r in doc["stages"]}
    assert {"detect", "segment", "embed-pool", "embed-crop", "fcclip"} <= got
    assert {f"segment-sam2-hiera_{a}" for a in ("t", "s", "b+", "l")} <= got
    for r in doc["stages"]:
        assert r["flops_per_image"] > 1e11
        assert abs(r["ceiling_images_per_s"] - doc["peak_flops"] / r["flops_per_image"]) < 0.01
    (p,) = [p for p in doc["projections"] if "SAM ViT-H" in p["pipeline"]]
    assert p["gpus"] == 8 and p["images"] == 1_900_000 and p["slowest_stage"] == "segment"
    assert bstages.flops_by_stage()["segment-sam2"] == bstages.flops_by_stage()["segment-sam2-hiera_l"]
