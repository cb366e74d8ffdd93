"""ragseg experiment: the feature cache re-scores exactly what a label run gives, and every experiment
runs end to end on a small embedded world (tiny random-weight models) and writes its table and plots."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ragseg.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = """extends: {base}
label: {{images_per_shard: 4}}
ray: {{images_per_block: 4, progress: false}}
experiment:
  cache: {cache}
  k_max: 16
  world: {{db_images: 40, pool_images: 30, val_images: 8, generic_images: 16, b_images: 6, b_size: 128}}
  domain_shift: {{max_points: 100}}
  db_size: {{fractions: [0.1, 1.0], seeds: [0, 1]}}
  coverage: {{fractions: [0.5, 1.0], seeds: [0]}}
  sweep: {{gamma: [0.0, 0.3, 1.0], k: [4, 8], retrieval_temperature: [0.05]}}
  vocab_add: {{counts: [1, 5]}}
"""


@pytest.fixture(scope="module")
def exp_cfg(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("experiments")
    path = root / "small.yaml"
    path.write_text(SMALL.format(base=os.path.join(ROOT, "configs", "experiments.yaml"), cache=root / "cache"))
    return str(path)


@pytest.fixture(scope="module")
def all_runs(exp_cfg, ray_local, tmp_path_factory):
    """`ragseg experiment all` once, through the CLI's own function."""
    from ragseg.experiments.runs import run

    out = str(tmp_path_factory.mktemp("exp_out"))
    return out, run(load_config(exp_cfg), "all", out, exp_cfg)


def test_each_experiment_writes_its_table_and_plots(all_runs):
    out, res = all_runs
    from ragseg.experiments import EXPERIMENTS

    assert set(res) == set(EXPERIMENTS)
    for name in EXPERIMENTS:
        d = os.path.join(out, name)
        doc = json.load(open(os.path.join(d, "results.json")))
        assert doc["experiment"] == name
        prov = doc["provenance"]
        assert prov["config"] and prov["config_hash"] and prov["databases"]
        md = open(os.path.join(d, "results.md")).read()
        assert "| " in md and "config " in md, name
        html = open(os.path.join(d, "index.html")).read()
        assert doc["files"]["plots"], name
        for png in doc["files"]["plots"]:
            assert os.path.getsize(os.path.join(d, png)) > 1000
            assert png in html and png in md
    assert os.path.exists(os.path.join(out, "index.html"))


def test_domain_shift_retrieval_recovers_what_masking_costs_clip(all_runs):
    doc = all_runs[1]["domain-shift"]
    m = doc["methods"]
    # random-weight CLIP text: near chance; retrieval in the masked domain works
    assert m["retrieval-masked"]["top1"] > m["clip-masked"]["top1"] + 0.3
    assert m["retrieval-masked"]["pq"] > m["clip-full"]["pq"]
    assert doc["mmd"] and all(np.isfinite(v["mmd2"]) for v in doc["mmd"].values())
    assert doc["embedding"]["points"] > 0


def test_db_size_builds_a_real_index_per_subset(all_runs):
    doc = all_runs[1]["db-size"]
    sizes = sorted({p["size"] for p in doc["points"]})
    assert len(sizes) == 2 and sizes[-1] == doc["db_segments"]
    assert all(p["ten_recall_at_10"] is not None for p in doc["points"])
    assert len({p["index"] for p in doc["points"]}) == 3  # 100% is one build for both seeds
    assert doc["saturation_segments"] in sizes


def test_coverage_uncovered_class_is_zero_without_fallback_and_not_with_it(all_runs):
    doc = all_runs[1]["coverage"]
    half = [p for p in doc["points"] if p["fraction"] == 0.5]
    no_fb = next(p for p in half if not p["fallback"])
    with_fb = next(p for p in half if p["fallback"])
    uncovered = [c for c in no_fb["uncovered"] if c in no_fb["per_class"]]
    assert uncovered
    # gamma 1 (configs/experiments.yaml): nothing votes for a class the DB lacks
    assert all(no_fb["per_class"][c] == 0.0 for c in uncovered)
    # the fallback DB (things only) brings some of them back
    assert max(with_fb["per_class"].get(c, 0.0) for c in uncovered) > 0.0
    assert with_fb["pq_uncovered"] > no_fb["pq_uncovered"]


def test_vocab_add_pq_on_the_added_class_rises_from_zero(all_runs):
    doc = all_runs[1]["vocab-add"]
    steps = doc["steps"]
    assert [s["n"] for s in steps] == [0, 1, 5]
    assert steps[0]["pq_x"] == 0.0 and not steps[0]["x_label_in_index"]
    assert steps[-1]["pq_x"] > 0.0 and steps[-1]["x_label_in_index"]
    assert all(s["seconds_to_published_index"] > 0 for s in steps[1:])
    assert len({s["index"] for s in steps}) == len(steps)  # every step published a new version


def test_sweep_reports_transfer_and_the_paper_point(all_runs):
    doc = all_runs[1]["sweep"]
    assert doc["tune"] == "A" and doc["apply"] == "B"
    assert doc["paper"]["params"]["gamma"] == 0.3
    assert doc["transfer_loss"] >= 0.0
    assert doc["grid_points"] == len(doc["points"])
    assert any(f.startswith("heatmap_") for f in doc["files"]["plots"])


def test_cache_rescoring_equals_a_label_run(all_runs, exp_cfg, tmp_path):
    """The issue's exactness check: PQ re-scored from the cache == `ragseg label` + `ragseg eval` at the
    same settings. One label run covers retrieval (a coverage subset as the primary index), the
    fallback index, CLIP and the ensemble (the paper's gamma 0.3)."""
    from ragseg.eval.pq import evaluate
    from ragseg.experiments.rescore import Retrieval
    from ragseg.experiments.runs import Context
    from ragseg.pipelines.label import run_label

    cov = all_runs[1]["coverage"]
    primary = next(p for p in cov["points"] if p["fraction"] == 0.5)["index"].rsplit("@", 1)[0]
    base = load_config(exp_cfg)
    ctx = Context.make(base, exp_cfg)
    A = ctx.sets[0]
    out = str(tmp_path / "labels")
    lab = ["label.ensemble.gamma=0.3", f"label.index={primary}", f"label.fallback_index={A.fallback_index}",
           f"label.vocab={A.vocab}", f"label.out={out}", "label.images.kind=synthetic",
           f"label.images.uri={A.images.uri}", f"label.images.split={A.images.split}"]
    cfg = load_config(exp_cfg, lab)
    run_label(cfg)
    want = evaluate(A.gt_json, A.gt_dir, out)

    ctx.cfg = cfg
    r = ctx.rescorer(A)
    got = r.evaluate(cfg.label.ensemble, Retrieval(ctx.neighbours(r, primary), ctx.neighbours(r, A.fallback_index)),
                     cfg.label.merge)
    assert got["All"] == want["All"]
    assert got["per_class"] == want["per_class"]
    # and the fallback mattered (the primary lacks classes): without it the result differs
    alone = r.evaluate(cfg.label.ensemble, Retrieval(ctx.neighbours(r, primary)), cfg.label.merge)
    assert alone["per_class"] != want["per_class"]


def test_feature_cache_key_and_reuse(all_runs, exp_cfg):
    from ragseg import ledger
    from ragseg.experiments import cache as fc
    from ragseg.experiments.runs import Context

    cfg = load_config(exp_cfg)
    ctx = Context.make(cfg, exp_cfg)
    A = ctx.sets[0]
    vocab = ctx.vocab(A)
    key, _ = fc.features_key(cfg, A.images, vocab, False)
    # re-scoring settings are not part of the key; models, proposals and the input size are
    assert fc.features_key(load_config(exp_cfg, ["label.ensemble.gamma=0.5", "label.merge.overlap_threshold=0.5"]),
                           A.images, vocab, False)[0] == key
    for change in ("models.clip.pool_image_size=256", "label.proposals=sam-grid", "models.clip.seed=1"):
        assert fc.features_key(load_config(exp_cfg, [change]), A.images, vocab, False)[0] != key, change
    # the domain-shift run made the cache with box crops; a plain request reuses it, nothing reruns
    uri = fc.ensure_features(cfg, A.images, vocab)
    head = ledger.read_header(uri, fc.KIND)
    assert head["full_crops"] is True
    runs = len(head["runs"])
    assert fc.ensure_features(cfg, A.images, vocab) == uri
    assert len(ledger.read_header(uri, fc.KIND)["runs"]) == runs
    fs = fc.load_features(uri)
    assert fs.n_proposals > 0 and fs.full is not None and fs.iv_logits is None


def test_mmd_and_saturation():
    from ragseg.experiments.stats import mmd_rbf, saturation

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 8))
    same, _ = mmd_rbf(x[:40], x[40:])
    shifted, _ = mmd_rbf(x[:40], x[40:] + 1.5)
    assert abs(same) < 0.05 < shifted
    assert saturation([10, 100, 1000], [20.0, 39.5, 40.0], 1.0) == 100


def test_unknown_experiment_is_one_line(capsys, exp_cfg):
    from conftest import run_cli_main

    code, _, err = run_cli_main(["experiment", "nope", "--config", exp_cfg], capsys)
    assert code == 2
    assert "unknown experiment 'nope'" in err and len(err.strip().splitlines()) == 1
