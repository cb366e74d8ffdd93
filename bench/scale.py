"""Scale benchmark of what the jobs cost their driver and their output folder, at the real N, on
local disk and on a local S3 server (127.0.0.1), with generated stage results instead of models.

    python bench/scale.py [--quick] [--sections commit,cpu,rss,json,resume,history] [options below]

One JSON object per benchmark on stdout; all of them in ``bench/results/scale.json`` (a run of some
sections keeps the other sections' objects of the file). The machine's load average is recorded
next to every figure (the development machine has 2 cores shared with other jobs).

``scale_commit`` (per store: local, moto S3): the time of one commit (a real ``WriteDbPiece`` of
  ``--piece-images`` images x 20 segments at dim 768 with 480x640 RLE masks, its commit record, and
  the driver's ``Compactor.add``, as ``drain_records`` does it) with 100 .. 30k pieces already
  committed (compacted segments of ``commit.compact_every`` records plus an uncompacted tail of
  ``compact_every / 2`` commit objects); median/p90 over ``--commits`` timed commits per level
  (round-robin over the levels), the files each commit writes, and one compaction amortised per piece.
``scale_driver_cpu`` (per graph: build-db ``masks: detector``, label ``proposals: gdino-sam``): the
  driver's CPU seconds per 1M segments (``--segments`` = 20 per image) and per piece on the job's
  real Ray Data graph (bench/scale_graphs.py: production stages, model stages replaced by
  generators), one fresh driver per size (``--cpu-images``), plus the marginal figure between sizes.
``scale_driver_rss``: the label job's driver peak RSS on its real graph with the default
  ``label.panoptic_json: auto`` (OUT/panoptic.json written after the drain), at ``--label-images``.
``scale_panoptic_json``: the panoptic JSON's assembly alone at ``--json-images`` (10k .. 1M; past
  ``label.panoptic_json_max_images`` the split JSON): peak RSS and seconds.
``scale_resume``: a label job's start on a bucket of ``--resume-objects`` objects (local S3 server:
  bench/scalelib.py) into a folder with ``--resume-pieces`` committed pieces: lease, ledger load and
  adoption, paged listing + filter + pending listing upload (bench/scale_startup.py), and that start
  on paper at ``--resume-target`` (10M) objects from the measured per-page and per-row costs.
``scale_history``: ``--history-runs`` runs of ``--history-pieces`` pieces in all on one folder, this
  version's ledger vs the previous one: header size, consolidation time and bytes rewritten.

Every Ray run starts a local Ray with 2 CPUs and a 500 MB object store. ``--quick``: tiny N, local
disk only, the graphs run inline (no Ray: the same stage classes in the graph's order), for the test
(its figures mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import scalelib  # noqa: E402

MODEL_ID, MODE, DIM = "open_clip:ViT-L-14/openai", "pool", 768  # the default CLIP's identity (dim 768)
LIMITS = {"commit_ratio": 1.5, "driver_cpu_s_per_1m_segments": 5.0, "rss_ratio": 1.25, "resume_s": 60.0}


def _env(quick: bool) -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "quick": quick,
            "note": "2-CPU development machine shared with other jobs: see the loadavg fields"}


def s3_server():
    """moto's own S3 server (tests/conftest.py), as the commit figures have always used it."""
    from ragseg.testing.s3 import moto_s3_env

    return moto_s3_env()


# ----------------------------------------------------------------------------------------------
# scale_commit: commit time vs pieces committed
# ----------------------------------------------------------------------------------------------
def _image_ids(piece: int, per_piece: int) -> list[str]:
    return [f"img{piece:07d}-{j:03d}" for j in range(per_piece)]


def _fake_record(piece: int, per_piece: int, segs_per_image: int) -> dict:
    """A committed piece's record as WriteDbPiece makes it (its data file need not exist)."""
    from ragseg import ledger

    ids = _image_ids(piece, per_piece)
    name = ledger.piece_name(ids)
    return ledger.new_record(name, ids, images=per_piece, segments=per_piece * segs_per_image, errors=0,
                             empty_images=0, data_path=f"features/{name}.parquet", errors_path=None,
                             parts_path=None, stage_seconds={"decode": 0.8, "gt": 0.3, "embed": 6.1, "write": 0.4})


def _put_commits(root: str, records: list[dict]) -> None:
    """Commit objects exactly as ledger.write_commit writes them (bulk PUTs on an object store)."""
    from ragseg import io, ledger

    data = {ledger.commit_uri(root, r["name"]): json.dumps(r, sort_keys=True).encode() for r in records}
    fs, _ = io.fs_and_path(root)
    if io.protocol_of_fs(fs) == "file":
        for uri, b in data.items():
            io.write_bytes_atomic(uri, b)
    elif data:
        fs.pipe({io.fs_and_path(u)[1]: b for u, b in data.items()})


def populate(root: str, n: int, every: int, per_piece: int, segs: int, placeholders: bool):
    """A DB folder with ``n`` committed pieces as a driver leaves it mid-run: compacted segments of
    ``every`` records (the last one partial, as a time-based flush makes them) plus a tail of
    ``min(n, every // 2)`` uncompacted commit objects, held by the returned Compactor as pending."""
    from ragseg import db as dblib
    from ragseg import io, ledger

    header = dblib.new_header(MODEL_ID, MODE, DIM, "", {})
    ledger.write_header(root, header)
    comp = ledger.Compactor(root, header, every, float("inf"))
    tail = min(n, every // 2)
    compacted = n - tail
    for start in range(0, compacted, every):
        recs = [_fake_record(i, per_piece, segs) for i in range(start, min(compacted, start + every))]
        comp._write(recs, [])  # the compactor's own segment + header write (no commit objects to delete)
    recs = [_fake_record(i, per_piece, segs) for i in range(compacted, n)]
    _put_commits(root, recs)
    for r in recs:
        comp.add(r)
    if placeholders and io.protocol(root) == "file":
        fdir = os.path.join(io.fs_and_path(root)[1], "features")
        os.makedirs(fdir, exist_ok=True)
        for i in range(n):
            open(os.path.join(fdir, f"{ledger.piece_name(_image_ids(i, per_piece))}.parquet"), "wb").close()
    return comp, {"segments": len(header["segments"]), "uncompacted": tail}


def _snapshot(root: str) -> dict[str, tuple[int, str]]:
    """path -> (size, version) of every file under root (local: mtime; S3: ETag)."""
    from ragseg import io

    fs, path = io.fs_and_path(root)
    fs.invalidate_cache()
    out = {}
    for p, info in fs.find(path, detail=True).items():
        ver = str(info.get("mtime") or info.get("ETag") or info.get("LastModified") or "")
        out[p[len(path.rstrip("/")) + 1:]] = (int(info.get("size") or 0), ver)
    return out


def _diff(before: dict, after: dict) -> dict:
    def kind(p: str) -> str:  # the folder, with the piece's name left out
        head, _, tail = p.rpartition("/")
        if head in ("features", "_commits", "errors"):
            return f"{head}/<piece>{tail[tail.find('.'):]}"
        if head == "_manifest":
            return "_manifest/<segment>.parquet"
        return p

    written = sorted((p, after[p][0]) for p in after if before.get(p) != after[p])
    deleted = [p for p in before if p not in after]
    return {"written": [{"file": kind(p), "bytes": b} for p, b in written],
            "bytes_written": int(sum(b for _, b in written)), "deleted": len(deleted)}


class _Batches:
    """A few generated result batches (the expensive part: RLE of 480x640 masks), reused with fresh
    image ids so that every timed commit is a new piece."""

    def __init__(self, per_piece: int, segs: int, hw: tuple[int, int], distinct: int = 2):
        from ragseg.testing.generated import DbResults

        gen = DbResults(dim=DIM, segments_per_image=segs, hw=hw)
        self.batches = []
        for d in range(distinct):
            rows = [{"image_id": f"gen{d}-{j:03d}", "uri": f"/imgs/gen{d}-{j:03d}.jpg"} for j in range(per_piece)]
            b = gen(rows)
            n = len(rows)
            for st, s in (("decode", 0.012), ("gt", 0.005), ("embed", 0.09)):  # the t_<stage> columns StageActor adds
                b[f"t_{st}"] = np.full(n, s)
            self.batches.append(b)

    def get(self, k: int, ids: list[str]) -> dict:
        from ragseg.stages.batch import object_column

        b = dict(self.batches[k % len(self.batches)])
        b["image_id"] = object_column(ids)
        b["uri"] = object_column([f"/imgs/{i}.jpg" for i in ids])
        return b


def _new_ids(level: int, counter, per_piece: int) -> list[str]:
    k = next(counter)
    return [f"new{level:06d}-{k:05d}-{j:03d}" for j in range(per_piece)]


def _commit_once(writer, comp, stats, batch) -> tuple[float, float]:
    """One piece: the worker's write + commit record, then what the driver does with the record."""
    from ragseg.pipelines.common import _plain_record

    t0 = time.perf_counter()
    rb = writer(batch)
    t1 = time.perf_counter()
    rec = _plain_record({k: v[0] for k, v in rb.items()})  # as drain_records receives it
    comp.add(rec)
    stats.add_record(rec)
    return t1 - t0, time.perf_counter() - t1


def bench_commit(store: str, base: str, a, batches: _Batches) -> dict:
    from ragseg import io, ledger
    from ragseg.pipelines.build_db import WriteDbPiece
    from ragseg.pipelines.common import RunStats

    levels = []
    load0 = scalelib.load()
    # every level's folder first; then the timed commits round-robin over the levels, so that the
    # load of this shared machine weighs on all levels alike
    st = []
    for n in a.levels:
        root = io.join(base, f"commit-{n}")
        t0 = time.perf_counter()
        comp, shape = populate(root, n, a.compact_every, a.piece_images, a.segments, placeholders=True)
        lv = {"n": n, "root": root, "comp": comp, "shape": shape, "prep_s": time.perf_counter() - t0,
              "writer": WriteDbPiece(root, "gt", MODEL_ID, MODE, DIM), "stats": RunStats(),
              "ids": functools.partial(_new_ids, n, itertools.count(), a.piece_images),
              "write_s": [], "add_s": [], "total_s": []}
        _commit_once(lv["writer"], comp, lv["stats"], batches.get(0, lv["ids"]()))  # warm-up: first write there
        st.append(lv)
    for c in range(a.commits):
        for lv in st:
            w, d = _commit_once(lv["writer"], lv["comp"], lv["stats"], batches.get(c, lv["ids"]()))
            lv["write_s"].append(w)
            lv["add_s"].append(d)
            lv["total_s"].append(w + d)
    for lv in st:
        n, root, comp = lv["n"], lv["root"], lv["comp"]
        before = _snapshot(root)
        _commit_once(lv["writer"], comp, lv["stats"], batches.get(0, lv["ids"]()))
        one = _diff(before, _snapshot(root))
        header_bytes = len(json.dumps(comp.header, indent=2, sort_keys=True).encode())

        # one compaction: top the pending records up to compact_every (light commit objects), flush
        todo = a.compact_every - len(comp.pending)
        extra = [_fake_record(10_000_000 + n + i, a.piece_images, a.segments) for i in range(max(0, todo))]
        _put_commits(root, extra)
        for r in extra:
            comp.pending.append(r)
            comp.pending_uris.append(ledger.commit_uri(root, r["name"]))
        flushed = len(comp.pending)
        before = _snapshot(root)
        t0 = time.perf_counter()
        comp.flush()
        flush_s = time.perf_counter() - t0
        fl = _diff(before, _snapshot(root))
        med = statistics.median(lv["total_s"])
        levels.append({"pieces": n, **lv["shape"], "prep_s": round(lv["prep_s"], 2),
                       "commit_s": scalelib.stats(lv["total_s"]), "write_s": scalelib.stats(lv["write_s"]),
                       "driver_add_s": scalelib.stats(lv["add_s"]),
                       "files_written_per_commit": one["written"], "bytes_per_commit": one["bytes_written"],
                       "header_bytes": header_bytes,
                       "flush": {"records": flushed, "seconds": round(flush_s, 4),
                                 "per_piece_s": round(flush_s / max(flushed, 1), 6),
                                 "files_written": fl["written"], "objects_deleted": fl["deleted"]},
                       "commit_plus_amortised_flush_median_s": round(med + flush_s / max(flushed, 1), 5),
                       "loadavg": scalelib.load()})
        print(f"# {store} {n} pieces: commit median {med:.3f}s, flush {flush_s:.2f}s", file=sys.stderr)
        with contextlib.suppress(Exception):
            fs, p = io.fs_and_path(root)
            fs.rm(p, recursive=True)
    lo, hi = levels[0]["commit_s"]["median"], levels[-1]["commit_s"]["median"]
    ratio = hi / lo
    result = {"benchmark": "scale_commit", "store": store, "piece_images": a.piece_images,
              "segments_per_image": a.segments, "dim": DIM, "mask_hw": list(a.hw),
              "compact_every": a.compact_every, "levels": levels,
              f"ratio_median_{levels[-1]['pieces']}_over_{levels[0]['pieces']}": round(ratio, 3),
              "ratio": round(ratio, 3), "limit": LIMITS["commit_ratio"], "ok": bool(ratio <= LIMITS["commit_ratio"]),
              "loadavg_start": load0, "loadavg_end": scalelib.load()}
    return result


# ----------------------------------------------------------------------------------------------
# Children: one fresh driver process per figure
# ----------------------------------------------------------------------------------------------
def _run_child(args: list[str], a) -> dict:
    # the common options first: a child's own options (args) come last and win
    proc = subprocess.run([sys.executable, __file__, *_common(a), *args], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {args}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _common(a) -> list[str]:
    out = ["--piece-images", str(a.piece_images), "--segments", str(a.segments), "--executor", a.executor,
           "--images-per-block", str(a.images_per_block), "--scheduler-wait", str(a.scheduler_wait),
           "--mask-pool", str(a.mask_pool),
           "--graph-hw", ",".join(map(str, a.graph_hw)), "--stand-in-rate", str(a.stand_in_rate),
           "--model-actors", str(a.model_actors), "--cpus-per-actor", str(a.cpus_per_actor),
           "--compact-every", str(a.compact_every), "--resume-listing", a.resume_listing, "--json-segments", str(a.json_segments),
           "--json-max-images", str(a.json_max_images)]
    return out + (["--workdir", a.workdir] if a.workdir else [])


def _graph_child(a) -> dict:
    import scale_graphs

    if a.executor == "inline":
        return inline_graph(a)
    return scale_graphs.child_graph(a)


def bench_cpu(a) -> list[dict]:
    """Per graph, one fresh driver per size; the figure is the drain's driver CPU per 1M segments at
    the largest size (20 segments/image: 50k images = 1M), per piece, and (two sizes or more) the
    marginal one between the smallest and the largest, which leaves out the per-job fixed costs."""
    out = []
    for graph in a.graphs:
        runs = [_run_child(["--_child", "graph", "--_graph", graph, "--_n", str(n), "--segments-per-image",
                            str(a.segments), "--panoptic-json", "never"], a) for n in sorted(a.cpu_images)]
        last = runs[-1]
        marginal = None
        if len(runs) > 1 and last["proposal_segments"] > runs[0]["proposal_segments"]:
            d = last["driver_cpu_s_drain"] - runs[0]["driver_cpu_s_drain"]
            marginal = {"per_1m_segments": round(d / (last["proposal_segments"] - runs[0]["proposal_segments"]) * 1e6, 3),
                        "ms_per_piece": round(d / max(last["pieces"] - runs[0]["pieces"], 1) * 1e3, 3)}
        limit = LIMITS["driver_cpu_s_per_1m_segments"]
        ray = a.executor == "ray"
        pace = None
        if ray:
            # the driver's CPU is mostly Ray Data's scheduling loop, which costs per second of the job,
            # so the figure per 1M segments is the driver's share of a core over the segments/s
            share = last["driver_cpu_share_of_one_core"]
            pace = {"driver_cpu_share_of_one_core": share, "segments_per_s_measured": last["segments_per_s"],
                    "per_1m_segments_if_all_per_second_at": {str(p): round(share * 1e6 / p, 2)
                                                             for p in (5_000, 10_000, 20_000)},
                    "segments_per_s_for_the_limit": round(share * 1e6 / limit)}
            if a.cpu_slow_rate:
                slow = _run_child(["--_child", "graph", "--_graph", graph, "--_n", str(min(a.cpu_images)),
                                   "--segments-per-image", str(a.segments), "--panoptic-json", "never",
                                   "--stand-in-rate", str(a.cpu_slow_rate)], a)
                per_s = slow["driver_cpu_s_drain"] / max(slow["drain_wall_s"], 1e-9)
                per_piece = (last["driver_cpu_s_drain"] - per_s * last["drain_wall_s"]) / max(last["pieces"], 1)
                pace.update({"slow_run": slow, "driver_cpu_s_per_wall_s_slow": round(per_s, 4),
                             "driver_cpu_ms_per_piece_beyond_per_second": round(per_piece * 1e3, 2),
                             "model": "driver CPU = per_wall_s x wall + per_piece x pieces"})

        out.append({"benchmark": "scale_driver_cpu", "graph": graph, "executor": a.executor,
                    "stages": last.get("stages"), "segments_per_image": a.segments, "piece_images": a.piece_images,
                    "images_per_block": a.images_per_block, "scheduler_wait_s": a.scheduler_wait, "image_hw": list(a.graph_hw), "mask_pool": a.mask_pool,
                    "stand_in_images_per_s": a.stand_in_rate or None, "model_actors": a.model_actors,
                    "cpus_per_actor": a.cpus_per_actor, "runs": runs,
                    "driver_cpu_s_per_1m_segments": last["driver_cpu_s_per_1m_segments"],
                    "driver_cpu_ms_per_piece": last["driver_cpu_ms_per_piece"], "marginal": marginal, "pace": pace,
                    "limit_s_per_1m_segments": limit,
                    # inline (--quick): the piece writers run in the driver: no driver figure
                    "ok": bool(last["driver_cpu_s_per_1m_segments"] <= limit) if ray else None,
                    "ok_marginal": (bool(marginal["per_1m_segments"] <= limit) if marginal else None) if ray else None})
    return out


def bench_rss(a) -> dict:
    sizes = sorted(a.label_images)
    base = tempfile.mkdtemp(prefix="bench-scale-imgs-", dir=a.workdir)
    try:
        # nested folders: size i's folder holds size i-1's folder plus the images it adds
        dirs, prev, d = [], 0, base
        for _ in sizes:
            d = os.path.join(d, "more")
            dirs.append(d)
        dirs = dirs[::-1]  # dirs[0]: the smallest size's folder (the deepest)
        for n, d in zip(sizes, dirs):
            scalelib.jpeg_tree(d, n - prev, tuple(a.label_hw), start=prev)
            scalelib.remove_proto(d)
            prev = n
        runs = [{"images_listed": n, **_run_child(["--_child", "graph", "--_graph", "label", "--_n", str(n),
                                                   "--_images", d, "--segments-per-image", str(a.label_segments),
                                                   "--graph-hw", ",".join(map(str, a.label_hw)),
                                                   "--panoptic-json", "auto"], a)}
                for n, d in zip(sizes, dirs)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    ratio_s = runs[-1]["peak_rss_sampled_mb"] / runs[0]["peak_rss_sampled_mb"]
    return {"benchmark": "scale_driver_rss", "graph": "label", "executor": a.executor,
            "panoptic_json": "auto", "image_hw": list(a.label_hw), "segments_per_image": a.label_segments,
            "piece_images": a.piece_images, "runs": runs,
            f"ratio_{sizes[-1]}_over_{sizes[0]}": round(ratio, 3), "ratio": round(ratio, 3),
            "ratio_sampled": round(ratio_s, 3), "limit": LIMITS["rss_ratio"], "ok": bool(ratio <= LIMITS["rss_ratio"])}


def bench_json(a) -> dict:
    runs = [_run_child(["--_child", "json", "--_n", str(n)], a) for n in sorted(a.json_images)]
    base = runs[0]["peak_rss_mb"] or runs[0]["peak_rss_sampled_mb"]
    for r in runs:
        r["peak_rss_over_smallest"] = round((r["peak_rss_mb"] or r["peak_rss_sampled_mb"]) / base, 3)
    return {"benchmark": "scale_panoptic_json", "max_images_per_file": a.json_max_images,
            "segments_per_image": a.json_segments, "piece_images": a.piece_images, "runs": runs,
            "ratio_largest_over_smallest": runs[-1]["peak_rss_over_smallest"]}


def bench_resume(a) -> dict:
    import scale_startup

    sizes = sorted(a.resume_objects)
    fills = [f"bkt/{scale_startup.PREFIX}{k}:{n}" for k, n in enumerate(sizes)]
    runs = []
    with scalelib.s3_server(fills):
        import fsspec

        fsspec.filesystem("s3").mkdir("out")
        for k, n in enumerate(sizes):
            out = f"s3://out/labels{k}"
            t0 = time.perf_counter()
            shape = scale_startup.populate_labels(out, a.resume_pieces, a.piece_images, n, a.resume_done_share,
                                                  a.compact_every, "bench")
            prep = time.perf_counter() - t0
            r = _run_child(["--_child", "resume", "--_out", out, "--_images", f"s3://bkt/{scale_startup.PREFIX}{k}"], a)
            runs.append({"objects_in_bucket": n, "folder": shape, "prep_s": round(prep, 1), **r})
    last = runs[-1]
    if a.resume_listing == "task":
        paper = scale_startup.extrapolate_task(runs[0], last, a.resume_target)
    else:
        paper = scale_startup.extrapolate(last, a.resume_target)
    return {"benchmark": "scale_resume", "store": "s3 (local moto server, bisect listing: bench/scalelib.py)",
            "listing_in": a.resume_listing,
            "pieces": a.resume_pieces, "piece_images": a.piece_images, "done_share_of_listed": a.resume_done_share,
            "compact_every": a.compact_every, "runs": runs,
            "peak_rss_ratio_largest_over_smallest": round(last["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3)
            if last.get("peak_rss_mb") and runs[0].get("peak_rss_mb") else None,
            "measured_total_wall_s": last["total_wall_s"], "measured_total_cpu_s": last["total_cpu_s"],
            "paper": paper, "limit_s": LIMITS["resume_s"],
            "ok_paper_driver_cpu": bool(paper["driver_cpu_s"] <= LIMITS["resume_s"]),
            "ok_measured": bool(last["total_wall_s"] <= LIMITS["resume_s"])}


# ----------------------------------------------------------------------------------------------
# --quick: the graphs without Ray
# ----------------------------------------------------------------------------------------------
class _InlineDataset:
    """Records the ``map_batches`` calls a job's ``build_graph`` makes and applies them to one batch
    in this process, in order (task functions called, actor classes built once): the graph without
    Ray, for the test of this benchmark's code at tiny N."""

    def __init__(self):
        self.ops, self.made = [], {}

    def map_batches(self, fn, *, fn_kwargs=None, fn_constructor_kwargs=None, **_):
        self.ops.append((fn, fn_kwargs or {}, fn_constructor_kwargs))
        return self

    def __call__(self, rows: list[dict]) -> dict:
        from ragseg.stages.batch import object_column

        batch = {k: object_column([r[k] for r in rows]) for k in rows[0]}
        for k, (fn, kw, ctor) in enumerate(self.ops):
            if ctor is not None:
                if k not in self.made:
                    self.made[k] = fn(**ctor)
                batch = self.made[k](batch)
            else:
                batch = fn(batch, **kw)
        return batch


def inline_graph(a) -> dict:
    import scale_graphs

    from ragseg.config import load_config
    from ragseg.pipelines.common import inline_executor
    from ragseg.testing.generated import StandInSpec

    kind = a._graph
    work = tempfile.mkdtemp(prefix="bench-scale-inline-", dir=a.workdir)
    try:
        imgs = scalelib.graph_images(a, work)
        out = os.path.join(work, "out")
        scale_graphs.patch_models(StandInSpec(segments=a.segments_per_image, mask_pool=a.mask_pool, dim=DIM))
        over = [*scalelib.ray_overrides(a.images_per_block), "ray.model_actors=1"]
        ds = _InlineDataset()
        if kind == "build-db":
            from ragseg.pipelines.build_db import build_graph, run_build_db

            cfg = load_config(None, ["source.kind=folder", f"source.uri={imgs}", f"build_db.out={out}",
                                     "build_db.masks=detector", f"build_db.images_per_shard={a.piece_images}", *over])
            build_graph(cfg, ds)
            s = run_build_db(cfg, execute=inline_executor(ds))
        else:
            from ragseg.pipelines.label import build_graph, run_label
            from ragseg.vocab import load_vocab

            vocab_p = os.path.join(work, "vocab.json")
            with open(vocab_p, "w") as f:
                json.dump(scale_graphs.VOCAB, f)
            cfg = load_config(None, ["label.images.kind=folder", f"label.images.uri={imgs}", f"label.vocab={vocab_p}",
                                     f"label.out={out}", f"label.images_per_shard={a.piece_images}",
                                     "label.proposals=gdino-sam", f"label.panoptic_json={a.panoptic_json}", *over])
            build_graph(cfg, ds, load_vocab(vocab_p))
            s = run_label(cfg, execute=inline_executor(ds))
        import psutil

        n = s["images"] * a.segments_per_image
        return {"graph": kind, "stages": [getattr(op[0], "__name__", str(op[0])) for op in ds.ops],
                "images": s["images"], "pieces": s["shards_written"], "segments_per_image": a.segments_per_image,
                "proposal_segments": n, "committed_segments": s["segments"], "panoptic_json": s.get("panoptic_json"),
                "driver_cpu_s_drain": 0.0, "driver_cpu_ms_per_piece": 0.0, "driver_cpu_s_per_1m_segments": 0.0,
                "peak_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
                "peak_rss_sampled_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny N, local only, graphs inline (for the test)")
    ap.add_argument("--sections", default="commit,cpu,rss,json,resume,history")
    ap.add_argument("--stores", default="local,s3")
    ap.add_argument("--levels", type=_ints, default=[100, 1000, 10000, 30000], help="pieces already committed")
    ap.add_argument("--commits", type=int, default=20, help="timed commits per level")
    ap.add_argument("--piece-images", type=int, default=64)
    ap.add_argument("--segments", type=int, default=20, help="segments per image (commit, driver CPU)")
    ap.add_argument("--hw", type=_ints, default=[480, 640], help="mask size of the timed commits")
    ap.add_argument("--compact-every", type=int, default=None, help="default: CommitConfig().compact_every")
    ap.add_argument("--graphs", default="build-db,label", help="driver CPU: the jobs' graphs to run")
    ap.add_argument("--cpu-images", type=_ints, default=[5000, 50000],
                    help="one driver per size; 50k images x 20 segments = 1M segments")
    ap.add_argument("--images-per-block", type=int, default=None, help="default: RayConfig().images_per_block")
    ap.add_argument("--scheduler-wait", type=float, default=None, help="ray.scheduler_wait_s of the graph runs "
                    "(default: RayConfig().scheduler_wait_s)")
    ap.add_argument("--graph-hw", type=_ints, default=[48, 64], help="size of the JPEGs the graphs decode")
    ap.add_argument("--mask-pool", type=int, default=64, help="masks per image size the stand-ins draw from")
    ap.add_argument("--stand-in-rate", type=float, default=0.0,
                    help="images/s of each stand-in actor (a GPU's pace); 0: as fast as the CPUs allow")
    ap.add_argument("--cpu-slow-rate", type=float, default=0.0,
                    help="driver CPU: also run the smallest size with the stand-ins paced at this many images/s "
                         "(the driver's CPU per second of a slower job, to split per-second from per-piece costs)")
    ap.add_argument("--model-actors", default="1", help="ray.model_actors of the graph runs")
    ap.add_argument("--cpus-per-actor", type=float, default=0.25,
                    help="ray.cpus_per_actor of the graph runs (a model actor holds a GPU in production; "
                         "here its stand-in needs little CPU)")
    ap.add_argument("--label-images", type=_ints, default=[10000, 100000])
    ap.add_argument("--label-hw", type=_ints, default=[24, 32])
    ap.add_argument("--label-segments", type=int, default=2)
    ap.add_argument("--json-images", type=_ints, default=[10000, 100000, 1000000])
    ap.add_argument("--json-segments", type=int, default=8)
    ap.add_argument("--json-max-images", type=int, default=None, help="default: LabelConfig().panoptic_json_max_images")
    ap.add_argument("--resume-objects", type=_ints, default=[50000, 200000])
    ap.add_argument("--resume-pieces", type=int, default=30000)
    ap.add_argument("--resume-done-share", type=float, default=0.19,
                    help="share of the listed images the committed pieces cover (30k x 64 of 10M)")
    ap.add_argument("--resume-target", type=int, default=10_000_000)
    ap.add_argument("--resume-listing", default="task", choices=["task", "driver"],
                    help="where the restarted job lists: a Ray task (the jobs on Ray) or the driver (inline)")
    ap.add_argument("--history-runs", type=int, default=1000)
    ap.add_argument("--history-pieces", type=int, default=30000)
    ap.add_argument("--max-segments", type=int, default=None, help="default: CommitConfig().max_segments")
    ap.add_argument("--executor", default="ray", choices=["ray", "inline"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="results file (default bench/results/scale.json; none with --quick)")
    ap.add_argument("--_child", default=None)
    ap.add_argument("--_graph", default=None)
    ap.add_argument("--_n", type=int, default=0)
    ap.add_argument("--_images", default=None)
    ap.add_argument("--_out", default=None)
    ap.add_argument("--segments-per-image", type=int, default=20)
    ap.add_argument("--panoptic-json", default="auto")
    a = ap.parse_args()
    a.graphs = [g for g in a.graphs.split(",") if g]
    if a.quick:
        a.stores, a.levels, a.commits = "local", [20, 120], 3
        a.piece_images, a.hw, a.compact_every = 8, [48, 64], 40
        a.cpu_images, a.graph_hw, a.label_images, a.label_hw, a.executor = [16, 32], [24, 32], [16, 40], [24, 32], "inline"
        a.json_images, a.json_max_images = [40, 200], 64
        a.history_runs, a.history_pieces, a.max_segments = 30, 120, 8
        a.sections = ",".join(s for s in a.sections.split(",") if s != "resume")
    from ragseg.config import CommitConfig, LabelConfig, RayConfig

    a.images_per_block = a.images_per_block or RayConfig().images_per_block
    a.scheduler_wait = a.scheduler_wait or RayConfig().scheduler_wait_s
    a.compact_every = a.compact_every or CommitConfig().compact_every
    a.max_segments = a.max_segments or CommitConfig().max_segments
    a.json_max_images = a.json_max_images or LabelConfig().panoptic_json_max_images
    if a._child:
        import scale_graphs
        import scale_startup

        fn = {"graph": _graph_child, "json": scale_graphs.child_json, "resume": scale_startup.child_resume}[a._child]
        print(json.dumps(fn(a)))
        return

    sections = set(a.sections.split(","))
    env = _env(a.quick)
    results: list[dict] = []

    def emit(r: dict) -> None:
        r = {**r, **env}
        print(json.dumps(r), flush=True)
        results.append(r)

    if "commit" in sections:
        batches = _Batches(a.piece_images, a.segments, tuple(a.hw))
        for store in a.stores.split(","):
            if store == "local":
                base = tempfile.mkdtemp(prefix="bench-scale-", dir=a.workdir)
                try:
                    emit(bench_commit("local", base, a, batches))
                finally:
                    shutil.rmtree(base, ignore_errors=True)
            elif store == "s3":
                with s3_server():
                    import fsspec

                    fsspec.filesystem("s3").mkdir("bench-scale")
                    emit(bench_commit("s3", "s3://bench-scale/out", a, batches))
            else:
                raise SystemExit(f"unknown store {store!r} (local, s3)")
    if "cpu" in sections:
        for r in bench_cpu(a):
            emit(r)
    if "rss" in sections:
        emit(bench_rss(a))
    if "json" in sections:
        emit(bench_json(a))
    if "resume" in sections:
        emit(bench_resume(a))
    if "history" in sections:
        import scale_startup

        emit(scale_startup.history(a))

    out = a.out if a.out is not None else ("" if a.quick else str(ROOT / "bench" / "results" / "scale.json"))
    if out:
        def key(r: dict) -> tuple:
            return r.get("benchmark"), r.get("store"), r.get("graph")

        def current(r: dict) -> bool:  # an object of this version's benchmarks (not an earlier layout's)
            b = r.get("benchmark")
            return (b in ("scale_commit", "scale_panoptic_json", "scale_history")
                    or (b in ("scale_driver_cpu", "scale_driver_rss") and "graph" in r)
                    or (b == "scale_resume" and "paper" in r))

        mine = {key(r) for r in results}
        old = json.loads(Path(out).read_text()) if Path(out).exists() else []
        kept = [r for r in old if key(r) not in mine and current(r)]
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(kept + results, indent=2) + "\n")


if __name__ == "__main__":
    main()
