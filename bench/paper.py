"""The paper's ADE20k panoptic table, for a user with the data, the checkpoints and a GPU.

    python bench/paper.py --ade20k s3://bucket/datasets/ade20k/ADEChallengeData2016 \\
        --ade-index s3://bucket/ragseg/index-ade20k --oi-index s3://bucket/ragseg/index-openimages \\
        --fcclip-checkpoint s3://bucket/models/fcclip_convnext_large_coco.safetensors \\
        --out s3://bucket/ragseg/paper-run1 [--config configs/label.yaml] [--set k=v ...] [--limit N]

``--ade20k`` is the ADE20k val set in the panoptic layout of Mask2Former's ``prepare_ade20k_pan_seg.py``
(``images/validation``, ``ade20k_panoptic_val.json``, ``ade20k_panoptic_val/``); its categories are the
vocabulary and its PNGs the ground truth. The indexes are ``ragseg build-index`` outputs of an ADE20k
train DB and an Open Images DB built with the same CLIP trunk, ``models.clip.mode: fcclip`` and
``models.fcclip`` test sizes as the label config (``configs/ade20k.yaml`` / ``configs/openimages.yaml``):
keys pooled exactly as FC-CLIP pools its queries; the SAM and Grounding DINO checkpoints
come from the config (``models.sam`` / ``models.gdino``). Every path may be local, ``http(s)://`` or a
bucket URI. Rows (each a ``ragseg label`` run into ``OUT/<row>/`` then PQ against the ground truth):

=================  ================================================  ===========
row                what                                              paper PQ
=================  ================================================  ===========
fcclip             FC-CLIP alone: gamma = 0, alpha / beta 0.4 / 0.8  26.4
fcclip+ade20k-db   + retrieval from the ADE20k DB (0.4 / 0.7 / 0.3)  30.9
fcclip+oi-db       + retrieval from the Open Images DB               28.3
gdino-sam          training-free Grounding DINO boxes -> SAM         (not given)
sam-grid           training-free SAM grid sampling                   7.8
=================  ================================================  ===========

(26.4 = 30.9 - 4.5 = 28.3 - 1.9, the paper's retrieval gains.) The fcclip rows run FC-CLIP's own test-time
path (:mod:`ragseg.fcclip_inference`: its resize and padding, mask pooling of every query, its ensemble
normalisation with void, the filter on the ensembled distribution, Mask2Former's panoptic inference,
synonym max) with the eval config's thresholds (object mask 0.0, overlap 0.8); alpha 0.4 / beta 0.8
are FC-CLIP's, beta 0.7 / gamma 0.3 the paper's.

The paper's experiments on the same data: ``--experiments`` then runs ``ragseg experiment all`` with
``--experiments-config`` (default ``configs/experiments-ade20k.yaml``) into ``OUT/experiments/``, its
first dataset pointed at ``--ade20k`` / ``--ade-index`` / ``--ade-db`` with ``--oi-index`` as the
fallback (domain shift, PQ against DB size and class coverage, the alpha/beta/gamma transfer to the
config's second dataset, vocabulary update). The same commands without this script::

    ragseg experiment all --config configs/experiments-ade20k.yaml --out s3://bucket/ragseg/experiments

Prints one table (PQ / SQ / RQ next to the
paper's PQ) and writes ``OUT/paper.json``. A finished row is not rerun (label jobs resume by their
manifest). Nothing here downloads data; ``tests/test_paper_bench.py`` runs it on the synthetic set with
the tiny random-weight models (``--config configs/test-tiny.yaml``), where the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PAPER_PQ = {"fcclip": 26.4, "fcclip+ade20k-db": 30.9, "fcclip+oi-db": 28.3, "gdino-sam": None, "sam-grid": 7.8}
ROWS = tuple(PAPER_PQ)


def row_overrides(row: str, a: argparse.Namespace) -> list[str]:
    """The label settings of one table row (on top of the config and --set)."""
    fc = ["label.proposals=fcclip", "label.ensemble.form=geometric", "label.ensemble.alpha=0.4"]
    if a.fcclip_checkpoint:
        fc.append(f"models.fcclip.checkpoint={a.fcclip_checkpoint}")
    return {
        "fcclip": fc + ["label.ensemble.gamma=0", "label.ensemble.beta=0.8", f"label.index={a.ade_index}"],
        "fcclip+ade20k-db": fc + ["label.ensemble.gamma=0.3", "label.ensemble.beta=0.7",
                                  f"label.index={a.ade_index}"],
        "fcclip+oi-db": fc + ["label.ensemble.gamma=0.3", "label.ensemble.beta=0.7", f"label.index={a.oi_index}"],
        "gdino-sam": ["label.proposals=gdino-sam", "label.ensemble.form=arithmetic", f"label.index={a.ade_index}"],
        "sam-grid": ["label.proposals=sam-grid", "label.ensemble.form=arithmetic", f"label.index={a.ade_index}"],
    }[row]


def run(a: argparse.Namespace) -> dict:
    from ragseg import io
    from ragseg.config import load_config
    from ragseg.eval.pq import evaluate
    from ragseg.pipelines.label import run_label

    gt_json = io.join(a.ade20k, "ade20k_panoptic_val.json")
    gt_dir = io.join(a.ade20k, "ade20k_panoptic_val")
    for what, uri in (("ground-truth json", gt_json), ("ground-truth PNG folder", gt_dir)):
        if not io.exists(uri):
            from ragseg.errors import UserError

            raise UserError(f"--ade20k {a.ade20k}: {what} {uri} not found (expected Mask2Former's ADE20k "
                            f"panoptic layout)")
    base = ["label.images.kind=ade20k_panoptic", f"label.images.uri={a.ade20k}", "label.images.split=val",
            "label.fallback_index=null", f"label.vocab={gt_json}"]
    if a.limit:
        base.append(f"label.images.limit={a.limit}")
    results = []
    for row in a.rows:
        out = io.join(a.out, row)
        cfg = load_config(a.config, base + row_overrides(row, a) + [f"label.out={out}"] + list(a.set or []))
        t0 = time.time()
        summary = run_label(cfg)
        # --limit labels a subset: the images it left out are scored as empty predictions (so PQ is
        # only comparable between rows of one run); a full run must cover every gt image
        res = evaluate(gt_json, gt_dir, io.join(out, "panoptic.json"), io.join(out, "panoptic"),
                       allow_missing=bool(a.limit))
        r = {"row": row, "pq": res["All"]["pq"], "sq": res["All"]["sq"], "rq": res["All"]["rq"],
             "pq_things": res.get("Things", {}).get("pq"), "pq_stuff": res.get("Stuff", {}).get("pq"),
             "paper_pq": PAPER_PQ[row], "images": summary.get("images"), "errors": summary.get("errors"),
             "seconds": round(time.time() - t0, 1), "out": out}
        results.append(r)
        print(json.dumps(r), flush=True)
    doc = {"ade20k": a.ade20k, "config": a.config, "set": a.set or [], "limit": a.limit, "rows": results}
    io.write_json_atomic(io.join(a.out, "paper.json"), doc)
    print(table(results))
    if a.experiments:
        doc["experiments"] = run_experiments(a)
    return doc


def run_experiments(a: argparse.Namespace) -> dict:
    """``ragseg experiment all`` on the ADE20k data and indexes given on the command line."""
    from ragseg import io
    from ragseg.config import load_config
    from ragseg.experiments.runs import run

    cfg = load_config(a.experiments_config, list(a.set or []))
    ds = list(cfg.experiment.datasets)
    if not ds:
        from ragseg.errors import UserError

        raise UserError(f"{a.experiments_config} lists no experiment.datasets")
    first = ds[0].model_copy(update={
        "images": ds[0].images.model_copy(update={"kind": "ade20k_panoptic", "uri": a.ade20k, "split": "val",
                                                  "limit": a.limit}),
        "index": a.ade_index, "db": a.ade_db or ds[0].db, "fallback_index": a.oi_index})
    cfg = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"datasets": [first, *ds[1:]]})})
    res = run(cfg, "all", io.join(a.out, "experiments"), a.experiments_config)
    return {name: {"out": io.join(a.out, "experiments", name), "seconds": r.get("seconds")} for name, r in res.items()}


def table(results: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    lines = ["| row | PQ | SQ | RQ | paper PQ |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {f(r['pq'])} | {f(r['sq'])} | {f(r['rq'])} | {f(r['paper_pq'])} |" for r in results]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ade20k", required=True, help="ADEChallengeData2016 folder (panoptic layout)")
    p.add_argument("--ade-index", required=True, help="index of the ADE20k (train) DB")
    p.add_argument("--oi-index", required=True, help="index of the Open Images DB")
    p.add_argument("--fcclip-checkpoint", help="FC-CLIP .safetensors (default: the config's models.fcclip)")
    p.add_argument("--out", required=True, help="output folder (one label run per row)")
    p.add_argument("--config", default=str(ROOT / "configs" / "label.yaml"))
    p.add_argument("--set", action="append", help="config override a.b=c (repeatable)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--limit", type=int, help="first N val images only")
    p.add_argument("--experiments", action="store_true", help="then run `ragseg experiment all` (module doc)")
    p.add_argument("--experiments-config", default=str(ROOT / "configs" / "experiments-ade20k.yaml"))
    p.add_argument("--ade-db", help="feature DB of the ADE20k index (db-size, coverage, vocab-add)")
    a = p.parse_args(argv)
    a.rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in a.rows if r not in PAPER_PQ]
    if bad:
        p.error(f"unknown rows {bad}; known: {', '.join(ROWS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    from ragseg.errors import UserError

    try:
        run(parse(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
