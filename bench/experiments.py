"""Cost of ``ragseg experiment``: the feature cache's bytes per proposal, and re-scoring throughput
against a full ``ragseg label`` + ``ragseg eval`` run at the same settings.

    python bench/experiments.py [--config configs/experiments.yaml] [--points 40] \\
        [--out bench/results/experiments.json]

Uses the embedded world and the feature cache that ``make experiments`` makes (``experiment.cache``;
made here first when missing). Measures on dataset A:

- ``cache``: the first pass's wall time (from the cache's own ledger), the on-disk bytes per proposal
  per column (Parquet column-chunk sizes: mask RLE, query embedding, box-crop embedding, ...) and per
  database of a neighbour layer (``k_max`` sims, ids, label codes);
- ``rescore``: ``--points`` configurations of the embedded sweep grid (gamma x k x temperature),
  each re-scored by a *fresh* :class:`~ragseg.experiments.rescore.Rescorer` (cold: retrieval and CLIP
  scores, every merge and PQ computed; no memo shared between points), then all of them by one
  Rescorer (warm: as a sweep runs them); proposals/s per point;
- ``label``: ``run_label`` + ``evaluate`` of the same images at the config's settings, twice in one
  process (the second with Ray and the model actors' code already loaded is the one compared);
- ``speedup`` = label seconds / cold re-score seconds per point (the issue asks >= 50x); also against
  the label run's stage busy seconds alone (what is left of it on a quiet machine).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def column_bytes(uris: list[str]) -> dict[str, int]:
    import pyarrow.parquet as pq

    from ragseg import io

    out: dict[str, int] = {}
    for uri in uris:
        fs, path = io.fs_and_path(uri)
        with fs.open(path, "rb") as f:
            md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + int(col.total_compressed_size)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "experiments.yaml"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--points", type=int, default=40)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "experiments.json"))
    a = p.parse_args(argv)

    from ragseg import io, ledger
    from ragseg.config import load_config
    from ragseg.eval.pq import evaluate
    from ragseg.experiments import cache as fc
    from ragseg.experiments.rescore import GroundTruth, Rescorer, Retrieval
    from ragseg.experiments.runs import Context
    from ragseg.pipelines.label import run_label

    cfg = load_config(a.config, a.set)
    ctx = Context.make(cfg, a.config)
    A = ctx.sets[0]
    r = ctx.rescorer(A)
    fs = r.fs
    nb = ctx.neighbours(r, ctx.index_of(A))
    head = ledger.read_header(fs.uri, fc.KIND)
    first = (head.get("runs") or [{}])[0].get("summary", {})
    rec = ledger.load(fs.uri, fc.KIND).records.to_pydict()
    cols = column_bytes([io.join(fs.uri, pth) for pth in rec["data_path"]])
    img_bytes = sum(column_bytes([io.join(fs.uri, pth) for pth in rec["parts_path"]]).values())
    nb_files = [io.join(fs.uri, "neighbours", nb.key, f"{name}.parquet") for name, _, _ in fs.pieces]
    nb_cols = column_bytes([u for u in nb_files if io.exists(u)])
    n = fs.n_proposals
    cache = {
        "uri": fs.uri, "images": fs.n_images, "proposals": n, "dim": int(fs.queries.shape[1]),
        "first_pass_wall_seconds": first.get("wall_seconds"), "first_pass_stages": first.get("stages"),
        "bytes_per_proposal": {k: round(v / n, 1) for k, v in sorted(cols.items())},
        "bytes_per_proposal_total": round((sum(cols.values()) + img_bytes) / n, 1),
        "neighbour_layer_bytes_per_proposal_per_db": {k: round(v / n, 1) for k, v in sorted(nb_cols.items())},
        "neighbour_layer_total_per_proposal_per_db": round(sum(nb_cols.values()) / n, 1),
        "k_max": int(nb.sims.shape[1]),
    }
    print(json.dumps({"cache": cache}), flush=True)

    sw = cfg.experiment.sweep
    ens0 = cfg.label.ensemble
    grid = list(itertools.product(sorted(set(sw.gamma) | {0.3}), sorted(set(sw.k) | {ens0.k}),
                                  sorted(set(sw.retrieval_temperature) | {ens0.retrieval_temperature})))
    step = max(1, len(grid) // a.points)
    grid = grid[::step][: a.points]
    ret = Retrieval(nb)
    gt = GroundTruth.load(A.gt_json, A.gt_dir, fs)
    text = fc.text_embeddings(cfg, ctx.vocab(A))
    cold = []
    for g, k, t in grid:
        e = ens0.model_copy(update={"gamma": g, "k": k, "retrieval_temperature": t})
        fresh = Rescorer(fs, gt, ctx.vocab(A), text, mask_cache_mb=cfg.experiment.mask_cache_mb)
        t0 = time.perf_counter()
        fresh.evaluate(e, ret, cfg.label.merge)
        cold.append(time.perf_counter() - t0)
    warm_r = Rescorer(fs, gt, ctx.vocab(A), text, mask_cache_mb=cfg.experiment.mask_cache_mb)
    t0 = time.perf_counter()
    for g, k, t in grid:
        warm_r.evaluate(ens0.model_copy(update={"gamma": g, "k": k, "retrieval_temperature": t}), ret, cfg.label.merge)
    warm = (time.perf_counter() - t0) / len(grid)
    cold_mean = sum(cold) / len(cold)
    rescore = {"points": len(grid), "cold_seconds_per_point": cold_mean,
               "cold_proposals_per_second_per_point": n / cold_mean,
               "warm_seconds_per_point": warm, "warm_proposals_per_second_per_point": n / warm,
               "warm_merges_computed": warm_r.merges, "warm_merges_possible": fs.n_images * len(grid)}
    print(json.dumps({"rescore": rescore}), flush=True)

    label_runs = []
    tmp = io.join(cfg.experiment.cache, "bench-label")
    for i in range(2):
        out = io.join(tmp, f"run{i}-{int(time.time())}")
        lab = load_config(a.config, a.set + [
            f"label.index={ctx.index_of(A)}", f"label.vocab={A.vocab}", f"label.out={out}",
            "label.images.kind=synthetic", f"label.images.uri={A.images.uri}", f"label.images.split={A.images.split}"])
        t0 = time.perf_counter()
        summary = run_label(lab)
        t1 = time.perf_counter()
        res = evaluate(A.gt_json, A.gt_dir, out)
        t2 = time.perf_counter()
        label_runs.append({"label_seconds": t1 - t0, "eval_seconds": t2 - t1, "total_seconds": t2 - t0,
                           "stages": summary.get("stages"), "pq": res["All"]["pq"]})
        io.remove(out, recursive=True)
    same = Rescorer(fs, gt, ctx.vocab(A), text).evaluate(ens0, ret, cfg.label.merge)["All"]["pq"]
    label = {"runs": label_runs, "compared_seconds": label_runs[-1]["total_seconds"], "images": fs.n_images,
             "proposals": n, "pq_label": label_runs[-1]["pq"], "pq_rescored": same}
    speed = label["compared_seconds"] / cold_mean
    # a loaded machine inflates the label run's wall time (Ray start-up, actor scheduling): also compare
    # with the busy seconds of its stages alone (the models' and the merge's own work)
    busy = sum(v["busy_seconds"] for v in (label_runs[-1]["stages"] or {}).values())
    label["stage_busy_seconds"] = busy
    doc = {"config": a.config, "set": a.set, "cache": cache, "rescore": rescore, "label": label,
           "speedup_cold": speed, "speedup_warm": label["compared_seconds"] / warm,
           "speedup_cold_vs_stage_busy": busy / cold_mean, "target_speedup": 50,
           "pass": bool(speed >= 50 and abs(same - label["pq_label"]) < 1e-9),
           "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())}}
    io.write_json_atomic(a.out, doc)
    print(json.dumps({"speedup_cold": speed, "speedup_warm": doc["speedup_warm"], "pass": doc["pass"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
