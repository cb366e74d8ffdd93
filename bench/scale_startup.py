"""bench/scale.py, what a job's start costs: the resume start-up of a label job on a big bucket, and
what grows with a folder's history.

``child_resume`` (a fresh driver process, pointed at the local S3 server of scalelib): a label job's
real start on ``s3://bkt/<prefix>`` (N image objects) into an output folder with P committed pieces
(compacted segments plus ``compact_every / 2`` commit objects a killed run left): the lease, the
ledger's load with the adoption of the uncompacted records (``ledger.open_for_writing``), then
``pending_source``: the paged listing, each batch filtered against the committed ids, the pending
listing file written and uploaded. Each step's wall and CPU seconds (this process: the driver),
the listing's pages split out, and the driver's peak RSS.

``history`` (in-process, local disk): 1000 runs of 30 pieces each on one folder, as with the
ledger of this version (last runs in the header, older ones in ``_runs/``; consolidation of the
smallest segments) and as with the previous one (every run in the header; past ``max_segments``
all segments rewritten into one at a start): per start, the header's size and write time, the
consolidation's time and bytes rewritten.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time

import scalelib

PREFIX = "imgs"


def listing_id(i: int) -> str:
    """The image id of generated object ``i`` (its key below the folder, without the extension)."""
    return scalelib.s3_key("", i)[1:].rsplit(".", 1)[0]


def _record(ids: list[str], stage_seconds: dict | None = None) -> dict:
    from ragseg import labels_out, ledger

    name = ledger.piece_name(ids)
    paths = labels_out.piece_paths(name)
    return ledger.new_record(name, ids, images=len(ids), segments=20 * len(ids), errors=0, empty_images=0,
                             data_path=paths["segments"], errors_path=None, parts_path=paths["parts"],
                             stage_seconds=stage_seconds or {"decode": 0.8, "detect": 3.1, "segment": 4.2,
                                                             "embed": 6.1, "classify": 1.2, "merge": 0.9})


def populate_labels(root: str, pieces: int, per_piece: int, listed: int, done_share: float, every: int,
                    config_hash: str) -> dict:
    """A label output with ``pieces`` committed pieces: the first ``done_share`` of the ``listed``
    objects' images are covered, the other pieces cover images no longer listed; compacted in
    segments of ``every`` records, the last ``every // 2`` left as commit objects (a killed run)."""
    from ragseg import io, labels_out, ledger

    header = ledger.new_header(labels_out.KIND, config_hash=config_hash, index_version=None,
                               vocab=[{"id": 1, "name": "wall", "isthing": False}])
    ledger.write_header(root, header)
    comp = ledger.Compactor(root, header, every, float("inf"))
    covered = int(listed * done_share) // per_piece
    tail = min(pieces, every // 2)

    def ids(p: int) -> list[str]:
        if p < covered:
            return [listing_id(i) for i in range(p * per_piece, (p + 1) * per_piece)]
        return [f"gone/{p:07d}-{j:03d}" for j in range(per_piece)]

    for start in range(0, pieces - tail, every):
        comp._write([_record(ids(p)) for p in range(start, min(pieces - tail, start + every))], [])
    recs = [_record(ids(p)) for p in range(pieces - tail, pieces)]
    fs, _ = io.fs_and_path(root)
    fs.pipe({io.fs_and_path(ledger.commit_uri(root, r["name"]))[1]: json.dumps(r, sort_keys=True).encode()
             for r in recs})
    return {"pieces": pieces, "segments": len(header["segments"]), "uncompacted": tail,
            "covered_listed_images": covered * per_piece, "done_ids": pieces * per_piece}


class _Timer:
    """Cumulative wall and driver-CPU seconds of the wrapped calls (and generator steps)."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.calls = 0

    def call(self, fn):
        def w(*a, **k):
            c0, w0 = scalelib.cpu(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.cpu += scalelib.cpu() - c0
                self.wall += time.perf_counter() - w0
                self.calls += 1
        return w

    def gen(self, fn):
        def w(*a, **k):
            it = fn(*a, **k)
            while True:
                c0, w0 = scalelib.cpu(), time.perf_counter()
                try:
                    x = next(it)
                except StopIteration:
                    return
                finally:
                    self.cpu += scalelib.cpu() - c0
                    self.wall += time.perf_counter() - w0
                self.calls += 1
                yield x
        return w

    def report(self) -> dict:
        return {"wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3), "calls": self.calls}


def child_resume(a) -> dict:
    """One restart (module docstring); the folder was populated by the parent."""
    import psutil

    from ragseg import io, labels_out, ledger
    from ragseg.config import SourceConfig
    from ragseg.idset import IdSet
    from ragseg.pipelines import common
    from ragseg.sources import s3list

    out, src = a._out, a._images
    cfg = SourceConfig(kind="folder", uri=src)
    ray_cfg = None
    if a.resume_listing == "task":  # as the jobs on Ray: the listing is a Ray task; Ray's start is not timed
        from ragseg.config import load_config
        from ragseg.runtime import init_ray

        ray_cfg = load_config(None, scalelib.ray_overrides(a.images_per_block)).ray  # the benchmarks' Ray
        init_ray(ray_cfg)
    pages_t, idset_t, upload_t = _Timer(), _Timer(), _Timer()
    s3list.iter_key_pages = pages_t.gen(s3list.iter_key_pages)
    IdSet.__init__ = idset_t.call(IdSet.__init__)
    io.put_file_atomic = upload_t.call(io.put_file_atomic)
    import fsspec

    fsspec.filesystem("s3").ls("bkt")  # the client's start-up is not the job's
    rss0 = psutil.Process().memory_info().rss
    hwm = scalelib.reset_peak_rss()
    steps = {}

    def step(name, fn):
        c0, w0 = scalelib.cpu(), time.perf_counter()
        r = fn()
        steps[name] = {"wall_s": round(time.perf_counter() - w0, 3), "cpu_s": round(scalelib.cpu() - c0, 3)}
        return r

    load0 = scalelib.load()
    lease = step("lease", lambda: ledger.Lease(out, 120.0, "label").acquire())
    led, header, comp = step("ledger_open_and_adopt", lambda: ledger.open_for_writing(
        out, labels_out.KIND, a.compact_every, 60.0, 64, lambda: None, None))
    errors: list = []
    pending, listed = step("listing_filter_write_upload",
                           functools.partial(common.pending_source, out, cfg, led, a.piece_images, errors,
                                             ray_cfg=ray_cfg))
    step("lease_release", lease.release)
    with_listing = steps["listing_filter_write_upload"]
    pages = pages_t.calls if ray_cfg is None else None  # the task's pages are not counted here
    rows_other_cpu = with_listing["cpu_s"] - pages_t.cpu - idset_t.cpu - upload_t.cpu
    size = int(pending.offsets[-1]) if pending.uri else 0
    return {"objects": listed, "pending": pending.num_rows, "pages": pages, "listing_in": a.resume_listing,
            "listing_task_cpu_s": round(pending.cpu_s, 3) if ray_cfg is not None and pending.cpu_s else None,
            "steps": steps, "listing_pages": pages_t.report(), "idset_build": idset_t.report(),
            "listing_upload": {**upload_t.report(), "bytes": size},
            "batches_filter_write_cpu_s": round(rows_other_cpu, 3),
            "total_wall_s": round(sum(s["wall_s"] for s in steps.values()), 3),
            "total_cpu_s": round(sum(s["cpu_s"] for s in steps.values()), 3),
            "rss_before_mb": round(rss0 / 2**20, 1),
            "peak_rss_mb": round(scalelib.peak_rss_kb() / 1024, 1) if hwm else None,
            "loadavg_start": load0, "loadavg_end": scalelib.load()}


def extrapolate_task(first: dict, last: dict, target_objects: int) -> dict:
    """As the jobs run it (the listing in a Ray task): the driver's CPU at ``target_objects`` objects =
    its steps that depend on the pieces only (lease, ledger load + adopt, release), as measured, plus
    its share of the listing step (submitting, waiting) extrapolated through the two measured sizes;
    the listing task's CPU likewise (its fixed part: the worker's start, the id set). A slope below 0
    (noise) counts as 0. The listing's wall time is the pages' latency, one after the other."""
    span = max(last["objects"] - first["objects"], 1)

    def at_target(a: float, b: float) -> tuple[float, float]:
        slope = max((b - a) / span, 0.0)
        return b + slope * (target_objects - last["objects"]), slope

    fixed = sum(last["steps"][k]["cpu_s"] for k in ("lease", "ledger_open_and_adopt", "lease_release"))
    step = "listing_filter_write_upload"
    drv_listing, drv_slope = at_target(first["steps"][step]["cpu_s"], last["steps"][step]["cpu_s"])
    task, task_slope = at_target(first["listing_task_cpu_s"] or 0.0, last["listing_task_cpu_s"] or 0.0)
    pages = target_objects / 1000
    return {"objects": target_objects, "pages": int(pages),
            "driver_fixed_steps_cpu_s": round(fixed, 2),
            "driver_listing_step_cpu_s_measured": {str(r["objects"]): r["steps"][step]["cpu_s"] for r in (first, last)},
            "driver_listing_step_cpu_us_per_object": round(drv_slope * 1e6, 3),
            "driver_cpu_s": round(fixed + drv_listing, 1),
            "listing_task_cpu_s_measured": {str(r["objects"]): r["listing_task_cpu_s"] for r in (first, last)},
            "listing_task_cpu_us_per_object": round(task_slope * 1e6, 3),
            "listing_task_cpu_s": round(task, 1),
            "listing_wall_s_at_measured_page_latency":
                round(last["steps"][step]["wall_s"] / max(last["objects"] / 1000, 1) * pages, 1)}


def extrapolate(run: dict, target_objects: int, per_page: int = 1000) -> dict:
    """The start of a job on ``target_objects`` objects with the same committed pieces, on paper: the
    steps that depend on the pieces only (lease, ledger load + adopt, the committed-id set) as
    measured; the listing's pages, the per-row work and the upload scaled by objects."""
    scale = target_objects / max(run["objects"], 1)
    pages = target_objects / per_page
    fixed = {k: run["steps"][k] for k in ("lease", "ledger_open_and_adopt", "lease_release")}
    fixed["idset_build"] = {"wall_s": run["idset_build"]["wall_s"], "cpu_s": run["idset_build"]["cpu_s"]}
    per_page_cpu = run["listing_pages"]["cpu_s"] / max(run["pages"], 1)
    per_page_wall = run["listing_pages"]["wall_s"] / max(run["pages"], 1)
    rows_cpu = run["batches_filter_write_cpu_s"] * scale
    upload = run["listing_upload"]["wall_s"] * scale
    fixed_cpu = sum(v["cpu_s"] for v in fixed.values())
    fixed_wall = sum(v["wall_s"] for v in fixed.values())
    cpu = fixed_cpu + per_page_cpu * pages + rows_cpu + run["listing_upload"]["cpu_s"] * scale
    return {"objects": target_objects, "pages": int(pages), "fixed_steps": fixed,
            "listing_cpu_s_per_page": round(per_page_cpu, 5), "listing_wall_s_per_page_measured": round(per_page_wall, 4),
            "driver_cpu_s": round(cpu, 1),
            "driver_wall_s_excl_listing_latency": round(fixed_wall + cpu - fixed_cpu + upload, 1),
            "listing_wall_s_at_measured_page_latency": round(per_page_wall * pages, 1),
            "upload_s": round(upload, 1), "pending_listing_bytes": int(run["listing_upload"]["bytes"] * scale)}


# ----------------------------------------------------------------------------------------------
# History growth
# ----------------------------------------------------------------------------------------------
RUN_ENTRY = {  # a label run's header entry as run_label writes it (~870 B)
    "listed": 120_000, "panoptic_json": {"written": False, "reason": "up to date", "layout": "parts"},
    "summary": {"images": 1920, "segments": 38_400, "errors": 3, "empty_images": 1, "shards_written": 30,
                "shards_skipped": 1875, "wall_seconds": 1234.567, "images_per_second": 1.555,
                "stages": {k: {"busy_seconds": 1234.567, "images_per_busy_second": 12.345}
                           for k in ("classify", "decode", "detect", "embed", "merge", "segment", "write")}}}


def _old_consolidate(comp, max_segments: int) -> list[str]:
    """The previous policy: past ``max_segments``, every segment read and rewritten as one."""
    import uuid

    import pyarrow as pa

    from ragseg import io, ledger

    segs = list(comp.header["segments"])
    if len(segs) <= max_segments:
        return []
    table = ledger._dedup(pa.concat_tables(ledger._read_segments(comp.root, segs)).sort_by("name"))
    rel = f"{ledger.SEGMENTS}/seg-{len(segs):06d}-{uuid.uuid4().hex[:8]}-all.parquet"
    io.write_parquet_atomic(io.join(comp.root, rel), table)
    comp.header["segments"] = [rel]
    comp.segment_rows = {rel: table.num_rows}
    ledger.write_header(comp.root, comp.header)
    io.remove_many([io.join(comp.root, s) for s in segs])
    return segs


def bench_history(a, policy: str, base: str) -> dict:
    """``a.history_runs`` runs of ``a.history_pieces // a.history_runs`` pieces each (module doc)."""
    from ragseg import io, ledger

    root = os.path.join(base, f"history-{policy}")
    header = ledger.new_header("labels", config_hash="h", vocab=[])
    ledger.write_header(root, header)
    per_run = max(1, a.history_pieces // a.history_runs)
    rows: dict[str, int] = {}
    marks = sorted({1, 10, 100, a.history_runs // 2, a.history_runs})
    out, total_rewritten, starts_rewriting, piece = [], 0, 0, 0
    cons_times, cons_bytes = [], []
    seg_dir = os.path.join(root, ledger.SEGMENTS)
    for run in range(1, a.history_runs + 1):
        comp = ledger.Compactor(root, header, 10**9, float("inf"))
        comp.segment_rows = rows
        before = {f: os.path.getsize(os.path.join(seg_dir, f)) for f in os.listdir(seg_dir)} if os.path.isdir(seg_dir) else {}
        t0 = time.perf_counter()
        merged = comp.consolidate(a.max_segments) if policy == "new" else _old_consolidate(comp, a.max_segments)
        cons_s = time.perf_counter() - t0
        rewritten = 0
        if merged:
            starts_rewriting += 1
            after = set(os.listdir(seg_dir))
            rewritten = sum(os.path.getsize(os.path.join(seg_dir, f)) for f in after - set(before))
            total_rewritten += rewritten
            cons_times.append(cons_s)
            cons_bytes.append(rewritten)
        rows = comp.segment_rows
        recs = [_record([f"r{run:05d}/im{piece + k:07d}-{j:02d}" for j in range(a.piece_images)], {})
                for k in range(per_run)]
        piece += per_run
        comp._write(recs, [])  # the run's records (one time-based flush)
        entry = {**RUN_ENTRY, "run": run}
        if policy == "new":
            ledger.add_run(root, header, entry)
        else:
            header["runs"].append(entry)
        t0 = time.perf_counter()
        ledger.write_header(root, header)
        head_s = time.perf_counter() - t0
        if run in marks:
            out.append({"run": run, "pieces": piece, "header_bytes": os.path.getsize(io.join(root, ledger.MANIFEST)),
                        "header_write_s": round(head_s, 4), "segments": len(header["segments"]),
                        "consolidation_at_this_start_s": round(cons_s, 3),
                        "consolidation_bytes_at_this_start": rewritten,
                        "segment_bytes_total": sum(os.path.getsize(os.path.join(seg_dir, f)) for f in os.listdir(seg_dir)),
                        "bytes_rewritten_by_consolidations_so_far": total_rewritten,
                        "starts_that_consolidated_so_far": starts_rewriting})
    t0 = time.perf_counter()
    led = ledger.load(root, "labels")
    load_s = time.perf_counter() - t0
    n_runs = ledger.run_count(header) if policy == "new" else len(header["runs"])
    return {"policy": policy, "runs": a.history_runs, "pieces": piece, "pieces_per_run": per_run,
            "max_segments": a.max_segments, "checkpoints": out, "runs_recorded": n_runs,
            "ledger_load_s_at_end": round(load_s, 3), "records_at_end": led.records.num_rows,
            "bytes_rewritten_by_consolidations": total_rewritten, "starts_that_consolidated": starts_rewriting,
            "consolidation_s": {"total": round(sum(cons_times), 3), "max_one_start": round(max(cons_times, default=0), 3)},
            "consolidation_bytes_max_one_start": max(cons_bytes, default=0),
            "header_write_s_at_end": out[-1]["header_write_s"] if out else None}


def history(a) -> dict:
    base = tempfile.mkdtemp(prefix="bench-scale-history-", dir=a.workdir)
    try:
        load0 = scalelib.load()
        res = {p: bench_history(a, p, base) for p in ("new", "old")}
        new, old = res["new"], res["old"]
        last_new, last_old = new["checkpoints"][-1], old["checkpoints"][-1]
        return {"benchmark": "scale_history", "store": "local", "runs": a.history_runs, "pieces": new["pieces"],
                "header_bytes_at_end": {"new": last_new["header_bytes"], "old": last_old["header_bytes"]},
                "header_bytes_per_run_old": round(last_old["header_bytes"] / a.history_runs, 1),
                "bytes_rewritten_by_consolidations": {"new": new["bytes_rewritten_by_consolidations"],
                                                      "old": old["bytes_rewritten_by_consolidations"]},
                "starts_that_consolidated": {"new": new["starts_that_consolidated"], "old": old["starts_that_consolidated"]},
                "consolidation_bytes_max_one_start": {"new": new["consolidation_bytes_max_one_start"],
                                                      "old": old["consolidation_bytes_max_one_start"]},
                "consolidation_s_max_one_start": {"new": new["consolidation_s"]["max_one_start"],
                                                  "old": old["consolidation_s"]["max_one_start"]},
                "segment_bytes_at_end": last_new["segment_bytes_total"],
                "new": new, "old": old, "loadavg_start": load0, "loadavg_end": scalelib.load()}
    finally:
        shutil.rmtree(base, ignore_errors=True)
