"""`ragseg demo`: the whole method end to end on a generated set with the tiny random-weight models.

synthetic set -> build-db (train split, ground-truth masks) -> build-index -> label the val split with
`gt` proposals scored by retrieval only, CLIP only and the ensemble, and with `gdino-sam` proposals ->
PQ of each against the ground truth -> a visualisation. With random weights CLIP's text side carries
no signal, so CLIP-only is near chance while retrieval (masked query vs masked keys) works: that is
the method's point, in miniature.
"""

from __future__ import annotations

import time
from typing import Any

from ragseg import io
from ragseg.config import JobConfig


def _with(cfg: JobConfig, **sections: Any) -> JobConfig:
    from ragseg.config import deep_merge

    return JobConfig.model_validate(deep_merge(cfg.model_dump(mode="json"), sections))


def run_demo(cfg: JobConfig) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from ragseg.console import err_stream
    from ragseg.eval.pq import evaluate
    from ragseg.index.build import build_index
    from ragseg.pipelines.build_db import run_build_db
    from ragseg.pipelines.label import run_label
    from ragseg.pipelines.visualize import visualize
    from ragseg.sources.synthetic import make_synthetic

    console = Console(file=err_stream())  # the terminal, also while the job's log holds fd 2
    t0 = time.perf_counter()
    work = cfg.demo.workdir
    data = io.join(work, "data")
    console.rule("[bold]1. synthetic panoptic set")
    syn = make_synthetic(data, images=cfg.demo.images, seed=cfg.demo.seed)
    val = syn["splits"]["val"]

    console.rule("[bold]2. build-db (train split, ground-truth masks)")
    db = io.join(work, "db")
    run_build_db(_with(cfg, source={"kind": "synthetic", "uri": data, "split": "train"},
                       build_db={"out": db, "masks": "gt"}))

    console.rule("[bold]3. build-index")
    index = io.join(work, "index")
    build_index(db, _with(cfg, index={"out": index}))

    runs = [("gt", "retrieval"), ("gt", "clip"), ("gt", "ensemble"), ("gdino-sam", "ensemble")]
    rows = []
    for proposals, scores in runs:
        name = f"{proposals}-{scores}"
        console.rule(f"[bold]4. label val: proposals={proposals} scores={scores}")
        out = io.join(work, "labels", name)
        run_label(_with(cfg, label={
            "images": {"kind": "synthetic", "uri": data, "split": "val"}, "vocab": syn["categories"],
            "index": index, "out": out, "proposals": proposals, "ensemble": {"scores": scores},
        }))
        res = evaluate(val["coco_json"], val["coco_dir"], io.join(out, "panoptic.json"), io.join(out, "panoptic"))
        io.write_json_atomic(io.join(out, "pq.json"), res)
        rows.append((proposals, scores, res))

    console.rule("[bold]5. visualisation")
    vis = visualize(val["images"], io.join(work, "labels", "gt-ensemble"), io.join(work, "vis"), limit=24)

    table = Table(title="PQ on the synthetic val split (tiny random-weight models)")
    for col in ("proposals", "scores", "PQ", "SQ", "RQ", "PQ things", "PQ stuff"):
        table.add_column(col, justify="right")
    summary = []
    for proposals, scores, res in rows:
        a, th, st = res["All"], res["Things"], res["Stuff"]
        table.add_row(proposals, scores, f"{a['pq']:.1f}", f"{a['sq']:.1f}", f"{a['rq']:.1f}",
                      f"{th['pq']:.1f}", f"{st['pq']:.1f}")
        summary.append({"proposals": proposals, "scores": scores, "pq": a["pq"], "sq": a["sq"], "rq": a["rq"]})
    console.print(table)
    console.print(f"visualisation: {vis.get('index_html', vis)}")
    console.print(f"demo finished in {time.perf_counter() - t0:.1f} s; outputs under {work}")
    return {"results": summary, "visualization": vis, "workdir": work}
