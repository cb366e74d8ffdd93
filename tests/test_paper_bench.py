"""bench/paper.py end to end on the synthetic set (ADE20k panoptic layout) with the tiny random-weight
models: every row runs a label job and is scored against the ground truth (the numbers mean nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ragseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _paper():
    spec = importlib.util.spec_from_file_location("bench_paper", ROOT / "bench" / "paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_table_on_synthetic(tmp_path, tiny_cfg_path, ray_local, capsys):
    from ragseg.index.build import build_index
    from ragseg.pipelines.build_db import run_build_db
    from ragseg.sources.synthetic import make_synthetic

    syn = make_synthetic(str(tmp_path / "data"), images=12, seed=3, size=96, val_fraction=0.25)
    ade = syn["ade20k"]["root"]
    db, index = str(tmp_path / "db"), str(tmp_path / "index")
    # keys pooled FC-CLIP's way (configs/ade20k.yaml): one DB serves the fcclip and the binary-mask rows
    run_build_db(load_config(tiny_cfg_path, [f"source.uri={ade}", "source.kind=ade20k_panoptic",
                                             "source.split=train", f"build_db.out={db}", "build_db.masks=gt",
                                             "models.clip.mode=fcclip"]))
    build_index(db, load_config(tiny_cfg_path, [f"index.out={index}", "index.min_recall_at_10=0"]))
    paper = _paper()
    out = tmp_path / "paper"
    rc = paper.main(["--ade20k", ade, "--ade-index", index, "--oi-index", index, "--out", str(out),
                     "--config", tiny_cfg_path, "--limit", "2",
                     "--set", "label.images_per_shard=2", "--set", "ray.images_per_block=2",
                     "--set", "ray.model_actors=1", "--set", "models.clip.mode=fcclip"])
    assert rc == 0
    doc = json.loads((out / "paper.json").read_text())
    assert [r["row"] for r in doc["rows"]] == list(paper.ROWS)
    for r in doc["rows"]:
        assert r["images"] == 2 and r["errors"] == 0
        assert 0.0 <= r["pq"] <= 100.0 and r["paper_pq"] == paper.PAPER_PQ[r["row"]]
        assert (out / r["row"] / "panoptic.json").exists()
    printed = capsys.readouterr().out
    assert "| fcclip+ade20k-db |" in printed and "30.9" in printed and "7.8" in printed


def test_paper_refuses_missing_ground_truth(tmp_path):
    paper = _paper()
    rc = paper.main(["--ade20k", str(tmp_path), "--ade-index", "i", "--oi-index", "j", "--out", str(tmp_path / "o")])
    assert rc == 2
    with pytest.raises(SystemExit):
        paper.parse(["--ade20k", "a", "--ade-index", "i", "--oi-index", "j", "--out", "o", "--rows", "nope"])
