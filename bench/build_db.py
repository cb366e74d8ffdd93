"""build-db benchmark: the Ray Data pipeline vs the same stages in a plain Python loop, and peak memory
at N and 10 N images (the streaming check).

    python bench/build_db.py [--images N] [--config configs/test-tiny.yaml] [--masks gt|detector]

Each measurement runs in a fresh subprocess; peak RSS is the maximum, sampled every 0.1 s, of the summed
resident memory of that process and all its descendants (the local Ray's workers included).
Prints one JSON object per benchmark and writes bench/results/build_db.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(args: list[str]) -> tuple[dict, int]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {args}")
    return json.loads(out.strip().splitlines()[-1]), peak


def child_pipeline(config: str, data: str, n: int, masks: str) -> dict:
    from ragseg.config import load_config
    from ragseg.pipelines.build_db import run_build_db

    out = tempfile.mkdtemp(prefix="bench-db-")
    cfg = load_config(config, ["source.kind=synthetic", f"source.uri={data}", "source.split=train",
                               f"source.limit={n}", f"build_db.out={out}", f"build_db.masks={masks}",
                               "ray.progress=false", "ray.num_cpus=2"])
    from ragseg.runtime import init_ray

    t_start = time.perf_counter()
    init_ray(cfg.ray)  # Ray's start-up is a fixed cost per job, reported apart from throughput
    t0 = time.perf_counter()
    s = run_build_db(cfg)
    wall = time.perf_counter() - t0
    return {"images": s["images"], "segments": s["segments"], "seconds": wall, "ray_start_seconds": t0 - t_start}


def child_loop(config: str, data: str, n: int, masks: str) -> dict:
    """The same stages, called one after the other on blocks of images, in this process."""
    import numpy as np

    from ragseg.config import load_config
    from ragseg.pipelines.build_db import WriteDbPiece, embed_identity
    from ragseg.sources import list_rows
    from ragseg.stages.decode import DecodeImages, LoadGroundTruth
    from ragseg.stages.embed import Embed

    out = tempfile.mkdtemp(prefix="bench-loop-")
    cfg = load_config(config, ["source.kind=synthetic", f"source.uri={data}", "source.split=train",
                               f"source.limit={n}", f"build_db.masks={masks}"])
    t0 = time.perf_counter()
    rows = list_rows(cfg.source)
    decode, embed = DecodeImages(cfg), Embed(cfg)
    if masks == "gt":
        stages = [decode, LoadGroundTruth(cfg), embed]
    else:
        from ragseg.stages.detect import Detect
        from ragseg.stages.segment import Segment

        stages = [decode, Detect(cfg), Segment(cfg), embed]
    model_id, mode, dim = embed_identity(cfg)
    write = WriteDbPiece(out, masks if masks == "gt" else "detector", model_id, mode, dim)
    per = cfg.build_db.images_per_shard
    segs = 0
    for i in range(0, len(rows), per):
        chunk = rows[i:i + per]
        batch = {k: np.array([r[k] for r in chunk] + [None], dtype=object)[:-1] for k in chunk[0]}
        batch["error"] = np.array([""] * len(chunk), dtype=object)
        for st in stages:
            batch = st(batch)
        segs += int(write(batch)["segments"][0])  # the pipeline's own piece writer (files + commit)
    return {"images": len(rows), "segments": segs, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--config", default=str(ROOT / "configs" / "test-tiny.yaml"))
    ap.add_argument("--masks", default="gt", choices=["gt", "detector"])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--_child", default=None)
    ap.add_argument("--_data", default=None)
    ap.add_argument("--_n", type=int, default=0)
    a = ap.parse_args()
    if a._child:
        fn = child_pipeline if a._child == "pipeline" else child_loop
        print(json.dumps(fn(a.config, a._data, a._n, a.masks)))
        return

    from ragseg.sources.synthetic import make_synthetic

    n, big = a.images, 10 * a.images
    data = tempfile.mkdtemp(prefix="bench-syn-")
    # 10 N train images (val_fraction small so train holds them)
    make_synthetic(data, images=int(big / 0.9) + 2, seed=0, size=a.size, val_fraction=0.1)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = ["--config", a.config, "--masks", a.masks, "--_data", data]
    results = []
    # throughput at 10 N, Ray already started (its start-up is reported apart); memory at N and 10 N
    loop, loop_rss = run_measured(["--_child", "loop", "--_n", str(big), *common])
    pipe, pipe_rss = run_measured(["--_child", "pipeline", "--_n", str(n), *common])
    pipe_big, pipe_big_rss = run_measured(["--_child", "pipeline", "--_n", str(big), *common])
    env = {"device": device, "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "config": os.path.relpath(a.config, ROOT), "masks": a.masks, "image_size": a.size}
    loop_rate = loop["images"] / loop["seconds"]
    results.append({"benchmark": "build_db_throughput", **env, "images": big,
                    "loop_images_per_s": round(loop_rate, 3),
                    "pipeline_images_per_s": round(pipe_big["images"] / pipe_big["seconds"], 3),
                    "ratio_pipeline_over_loop": round((pipe_big["images"] / pipe_big["seconds"]) / loop_rate, 3),
                    "ray_start_seconds": round(pipe_big["ray_start_seconds"], 2),
                    "pipeline_images_per_s_incl_ray_start": round(
                        pipe_big["images"] / (pipe_big["seconds"] + pipe_big["ray_start_seconds"]), 3),
                    "segments_pipeline": pipe_big["segments"], "segments_loop": loop["segments"]})
    results.append({"benchmark": "build_db_peak_rss", **env, "images_n": n, "images_10n": big,
                    "peak_rss_mb_n": round(pipe_rss / 2**20, 1), "peak_rss_mb_10n": round(pipe_big_rss / 2**20, 1),
                    "ratio_10n_over_n": round(pipe_big_rss / pipe_rss, 3), "loop_peak_rss_mb_10n": round(loop_rss / 2**20, 1)})
    for r in results:
        print(json.dumps(r))
    out = ROOT / "bench" / "results" / "build_db.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
