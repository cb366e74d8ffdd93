"""Scale benchmark of the job commit path (ragseg.ledger) at the real N, on local disk and on a local
S3 server (moto, 127.0.0.1), with generated stage results instead of models
(ragseg.pipelines.generated).

    python bench/scale.py [--quick] [--stores local,s3] [--levels 100,1000,10000,30000]
                          [--cpu-images 5000,50000] [--label-images 10000,100000]

Four benchmarks, one JSON object each on stdout, all of them in ``bench/results/scale.json``:

``scale_commit`` (per store): the time of one commit (a real ``WriteDbPiece`` of ``--piece-images``
  images x 20 segments at dim 768 with 480x640 RLE masks, its commit record, and the driver's
  ``Compactor.add``, as ``drain_records`` does it) with 100 .. 30k pieces already committed. The
  ledger is pre-populated with *records* as the driver would have left them mid-run: compacted
  segments of ``commit.compact_every`` records (written by the real ``Compactor``) plus an uncompacted
  tail of ``compact_every / 2`` commit objects, which the compactor holds as pending; their data files
  do not exist (on local disk an empty placeholder per piece keeps ``features/`` as full as a real
  run's). Median/p90 over ``--commits`` timed commits per level (round-robin over the levels, so that
  the machine's load weighs on all alike), the files each commit writes (listed at every level, so
  that a file growing with N shows) and, apart, one compaction (a flush of ``compact_every`` records:
  segment, header, bulk delete) amortised per piece.
``scale_resume`` (per store): resume start-up at 10k pieces: ``ledger.load`` + ``pending_rows`` for
  a listing of (10k pieces x piece images) committed image rows plus 1 % new ones.
``scale_driver_cpu``: driver CPU seconds per 1M segments: a real Ray Data job (``run_build_db`` through
  ``ray_executor``: listing read tasks -> generated DbResults task -> the real WriteDbPiece task), measuring the
  driver process's own CPU time (psutil, this pid only, all its threads; not the Ray workers) from the
  executor's start to the last record drained. Masks are smaller than 480x640 here (``--cpu-hw``): only
  the workers ever see them.
``scale_driver_rss``: driver peak RSS while labelling generated images through the commit path
  (``run_label`` through ``ray_executor``: listing read tasks -> generated LabelResults task (PNG written)
  -> the real WriteLabelPiece task), tiny masks (the driver's memory must not depend on the images),
  one fresh driver per size; peak = the driver's ``ru_maxrss``, and the peak of psutil samples.

Every Ray run starts a local Ray with 2 CPUs and a 500 MB object store (``ragseg.runtime.init_ray``).
``--quick``: tiny N, local disk only, and the inline executor instead of Ray (the test checks the JSON
shape; its figures mean nothing). The machine's load average is recorded next to each figure.
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
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_ID, MODE, DIM = "open_clip:ViT-L-14/openai", "pool", 768  # the default CLIP's identity (dim 768)
LIMITS = {"commit_ratio": 1.5, "driver_cpu_s_per_1m_segments": 5.0, "resume_s": 30.0, "rss_ratio": 1.25}


def _env(quick: bool) -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "quick": quick}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _stats(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"median": round(float(np.median(a)), 5), "p90": round(float(np.percentile(a, 90)), 5),
            "min": round(float(a.min()), 5), "max": round(float(a.max()), 5), "n": len(xs)}


# ----------------------------------------------------------------------------------------------
# Local S3 server (moto): the tests' own (tests/conftest.py), so that both start it one way
# ----------------------------------------------------------------------------------------------
def s3_server():
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import moto_s3_env

    return moto_s3_env()


# ----------------------------------------------------------------------------------------------
# (a) commit time vs pieces committed, (c) resume start-up
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
        from ragseg.pipelines.generated import DbResults

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


def bench_commit(store: str, base: str, a, batches: _Batches, resume_at: int | None) -> tuple[dict, dict | None]:
    from ragseg import io, ledger
    from ragseg.pipelines.build_db import WriteDbPiece
    from ragseg.pipelines.common import RunStats
    from ragseg.sources import make_row

    levels, resume = [], None
    load0 = _load()
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

        if resume_at is not None and n == resume_at:
            resume = bench_resume(store, root, n, a.piece_images, make_row)

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
                       "commit_s": _stats(lv["total_s"]), "write_s": _stats(lv["write_s"]),
                       "driver_add_s": _stats(lv["add_s"]),
                       "files_written_per_commit": one["written"], "bytes_per_commit": one["bytes_written"],
                       "header_bytes": header_bytes,
                       "flush": {"records": flushed, "seconds": round(flush_s, 4),
                                 "per_piece_s": round(flush_s / max(flushed, 1), 6),
                                 "files_written": fl["written"], "objects_deleted": fl["deleted"]},
                       "commit_plus_amortised_flush_median_s": round(med + flush_s / max(flushed, 1), 5),
                       "loadavg": _load()})
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
              "loadavg_start": load0, "loadavg_end": _load()}
    return result, resume


def bench_resume(store: str, root: str, n: int, per_piece: int, make_row) -> dict:
    """Resume start-up: ledger.load + pending_rows over the committed images' rows plus 1 % new ones."""
    from ragseg import db as dblib
    from ragseg.pipelines.common import pending_rows

    ids = [i for p in range(n) for i in _image_ids(p, per_piece)]
    ids += [f"fresh-{j:07d}" for j in range(len(ids) // 100)]
    import pyarrow as pa

    from ragseg.sources import row_schema

    rows = pa.Table.from_pylist([make_row(i, f"s3://bucket/imgs/{i}.jpg", "folder", file_name=f"{i}.jpg")
                                 for i in ids], schema=row_schema())
    load0 = _load()
    t0 = time.perf_counter()
    led = dblib.open_db(root)
    t1 = time.perf_counter()
    pending = pending_rows(rows, led)
    t2 = time.perf_counter()
    total = t2 - t0
    return {"benchmark": "scale_resume", "store": store, "pieces": led.records.num_rows,
            "segments": len(led.header["segments"]), "uncompacted": len(led.uncompacted),
            "listed_rows": rows.num_rows, "pending": pending.num_rows, "load_s": round(t1 - t0, 3),
            "pending_rows_s": round(t2 - t1, 3), "total_s": round(total, 3), "limit_s": LIMITS["resume_s"],
            "ok": bool(total <= LIMITS["resume_s"]), "loadavg": load0}


# ----------------------------------------------------------------------------------------------
# (b) driver CPU, (d) driver RSS: one fresh driver process each
# ----------------------------------------------------------------------------------------------
def _dummy_images(d: str, ids: range) -> None:
    os.makedirs(d, exist_ok=True)
    for i in ids:
        open(os.path.join(d, f"im{i:07d}.jpg"), "wb").close()  # never decoded: generated results stand in


class GenDbStage:
    """Ray Data callable: rows -> the generated results WriteDbPiece reads (DbResults)."""

    def __init__(self, hw, segs, sleep_s: float = 0.0, mask_pool: int = 0):
        from ragseg.pipelines.generated import DbResults

        self.gen = DbResults(dim=DIM, segments_per_image=segs, hw=tuple(hw), mask_pool=mask_pool)
        self.sleep_s = sleep_s

    def __call__(self, batch):
        if self.sleep_s:
            time.sleep(self.sleep_s)  # a slower model stage: same work, longer job
        rows = [{"image_id": i, "uri": u} for i, u in zip(batch["image_id"], batch["uri"])]
        return self.gen(rows)


class GenLabelStage:
    """Ray Data callable: rows -> label's merged results with their PNGs written (LabelResults)."""

    def __init__(self, out, cats, hw, segs):
        from ragseg.pipelines.generated import LabelResults

        self.gen = LabelResults(out, cats, segments_per_image=segs, hw=tuple(hw))

    def __call__(self, batch):
        from ragseg.stages.batch import object_column

        rows = [{"image_id": i, "uri": u} for i, u in zip(batch["image_id"], batch["uri"])]
        out = self.gen(rows)
        for col in ("file_name", "coco_id"):  # carried from the source rows, as the real graph does
            if col in batch:
                out[col] = object_column(list(batch[col]))
        return out


def _graph(stage_factory, cfg, ds):
    from ragseg.pipelines.common import add_stage

    per_block = cfg.ray.images_per_block
    return add_stage(ds, stage_factory, "generate", cfg, actor=False,
                     batch_size=per_block)


def _executor(kind: str, stage_factory, inline_results, out: str):
    from ragseg.pipelines.common import inline_executor, ray_executor

    if kind == "inline":
        return inline_executor(inline_results)
    return ray_executor(lambda ds: _graph(stage_factory, _CFG, ds), out)


_CFG = None  # the child's config, for the graph


def _cpu() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of this process, named (Python's name, else the OS's)."""
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for t in psutil.Process().threads():
        name = names.get(t.id)
        if name is None:
            try:
                with open(f"/proc/self/task/{t.id}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = "?"
        out[t.id] = (name, t.user_time + t.system_time)
    return out


class _ThreadCpu:
    """Samples the CPU seconds of each of this process's threads every ``every`` s (a thread that ends
    keeps its last sample), so the drain's CPU can be split by thread; its own thread is reported."""

    NAME = "bench-thread-sampler"

    def __init__(self, every: float = 2.0):
        self.every, self.first, self.last = every, {}, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name=self.NAME, daemon=True)

    def _sample(self) -> None:
        for tid, (name, c) in _thread_cpu().items():
            self.first.setdefault(tid, (name, 0.0) if self.last else (name, c))
            self.last[tid] = (name, c)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()

    def by_thread(self, top: int = 6) -> dict[str, float]:
        import re

        agg: dict[str, float] = {}
        for tid, (name, c) in self.last.items():
            key = re.sub(r"-.*$", "", name)  # StreamingExecutor-dataset_<id>, Thread-3 (...) ...
            agg[key] = agg.get(key, 0.0) + c - self.first[tid][1]
        return {k: round(v, 3) for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:top] if v > 0.005}


def _measured(execute, sink: dict):
    """Wrap an executor: the driver's CPU seconds from its start to the last record drained (less the
    thread sampler's own), and their split by thread of the driver."""

    def ex(cfg, pending, writer, per_piece):
        c0, w0 = _cpu(), time.perf_counter()
        with _ThreadCpu() as th:
            gen = execute(cfg, pending, writer, per_piece)
            del pending  # the executor's now, as in the jobs
            yield from gen
        split = th.by_thread(top=100)
        own = split.pop(_ThreadCpu.NAME, 0.0)
        sink["drain_cpu_s"] = _cpu() - c0 - own
        sink["drain_wall_s"] = time.perf_counter() - w0
        sink["drain_cpu_s_by_thread"] = dict(list(split.items())[:6])

    return ex


def _ray_overrides(a) -> list[str]:
    return [f"ray.images_per_block={a.images_per_block}", "ray.num_cpus=2", f"ray.object_store_memory={500 * 2**20}", "ray.node_ip_address=127.0.0.1",
            "ray.progress=false"]


def child_cpu(a) -> dict:
    global _CFG
    from ragseg.config import load_config
    from ragseg.pipelines.build_db import run_build_db
    from ragseg.pipelines.generated import DbResults

    work = tempfile.mkdtemp(prefix="bench-scale-cpu-")
    try:
        _dummy_images(os.path.join(work, "imgs"), range(a.cpu_images[0]))
        cfg = _CFG = load_config(None, ["source.kind=folder", f"source.uri={work}/imgs", f"build_db.out={work}/db",
                                        f"build_db.images_per_shard={a.piece_images}", *_ray_overrides(a)])
        if a.executor == "ray":
            from ragseg.runtime import init_ray

            init_ray(cfg.ray)  # Ray's start-up is not part of the job's per-segment cost
        sink: dict = {}
        factory = functools.partial(GenDbStage, a.cpu_hw, a.segments, a.cpu_stage_sleep, a.mask_pool)
        inline = DbResults(dim=DIM, segments_per_image=a.segments, hw=tuple(a.cpu_hw), mask_pool=a.mask_pool)
        load0 = _load()
        c0, w0 = _cpu(), time.perf_counter()
        s = run_build_db(cfg, execute=_measured(_executor(a.executor, factory, inline, cfg.build_db.out), sink))
        job_cpu, job_wall = _cpu() - c0, time.perf_counter() - w0
        return {"images": s["images"], "segments": s["segments"], "pieces": s["shards_written"],
                "driver_cpu_s_drain": round(sink["drain_cpu_s"], 3), "drain_wall_s": round(sink["drain_wall_s"], 2),
                "driver_cpu_share_of_one_core": round(sink["drain_cpu_s"] / sink["drain_wall_s"], 4),
                "driver_cpu_s_drain_by_thread": sink["drain_cpu_s_by_thread"],
                "driver_cpu_s_job": round(job_cpu, 3), "job_wall_s": round(job_wall, 2),
                "driver_cpu_s_per_1m_segments": round(sink["drain_cpu_s"] / max(s["segments"], 1) * 1e6, 3),
                "loadavg_start": load0, "loadavg_end": _load()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _RssSampler:
    def __init__(self, every: float = 0.1):
        import psutil

        self.p, self.every, self.peak, self.peak_private = psutil.Process(), every, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            m = self.p.memory_info()
            self.peak = max(self.peak, m.rss)
            self.peak_private = max(self.peak_private, m.rss - getattr(m, "shared", 0))
            time.sleep(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: ``5`` to /proc/self/clear_refs resets VmHWM), so that
    the peak read after the job is the job's own, not the imports' or Ray start-up's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss_kb() > 0
    except OSError:
        return False


def _peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child_rss(a) -> dict:
    global _CFG
    import resource

    import psutil

    from ragseg.config import load_config
    from ragseg.pipelines.generated import LabelResults
    from ragseg.pipelines.label import run_label
    from ragseg.vocab import load_vocab

    work = tempfile.mkdtemp(prefix="bench-scale-rss-")
    try:
        vocab = os.path.join(work, "vocab.json")
        with open(vocab, "w") as f:
            json.dump([{"name": "wall", "isthing": False}, {"name": "person", "isthing": True},
                       {"name": "car", "isthing": True}], f)
        out = os.path.join(work, "labels")
        cfg = _CFG = load_config(None, ["label.images.kind=folder", f"label.images.uri={a._images}", f"label.vocab={vocab}",
                                        f"label.out={out}", f"label.images_per_shard={a.piece_images}",
                                        "label.panoptic_json=never", *_ray_overrides(a)])
        cats = [int(i) for i in load_vocab(vocab).ids]
        if a.executor == "ray":
            from ragseg.runtime import init_ray

            init_ray(cfg.ray)
        rss0 = psutil.Process().memory_info().rss
        hwm_reset = _reset_peak_rss()
        factory = functools.partial(GenLabelStage, out, cats, a.label_hw, a.label_segments)
        inline = LabelResults(out, cats, segments_per_image=a.label_segments, hw=tuple(a.label_hw))
        sink: dict = {}
        load0 = _load()
        t0 = time.perf_counter()
        with _RssSampler() as smp:
            s = run_label(cfg, execute=_measured(_executor(a.executor, factory, inline, out), sink))
        wall = time.perf_counter() - t0
        ru_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"images": s["images"], "segments": s["segments"], "pieces": s["shards_written"],
                "rss_before_job_mb": round(rss0 / 2**20, 1),
                "peak_rss_mb": round((_peak_rss_kb() if hwm_reset else ru_kb) / 1024, 1),
                "peak_rss_source": "VmHWM after clear_refs" if hwm_reset else "ru_maxrss (whole process life)",
                "peak_rss_sampled_mb": round(smp.peak / 2**20, 1),
                "peak_rss_minus_shared_mb": round(smp.peak_private / 2**20, 1),
                "driver_cpu_s_drain": round(sink["drain_cpu_s"], 2), "wall_s": round(wall, 1),
                "images_per_s": round(s["images"] / wall, 1), "loadavg_start": load0, "loadavg_end": _load()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {args}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_cpu(a, common: list[str]) -> dict:
    """One fresh driver per size; the figure is the drain's driver CPU per 1M segments at the largest
    size, and (two sizes or more) the marginal one: the slope between the smallest and the largest,
    which leaves out the per-job fixed costs (planning the dataset, starting the executor)."""
    sizes = sorted(a.cpu_images)
    runs = [_run_child(["--_child", "cpu", "--cpu-images", str(n), *common]) for n in sizes]
    per_1m = runs[-1]["driver_cpu_s_per_1m_segments"]
    marginal = None
    if len(runs) > 1 and runs[-1]["segments"] > runs[0]["segments"]:
        marginal = round((runs[-1]["driver_cpu_s_drain"] - runs[0]["driver_cpu_s_drain"])
                         / (runs[-1]["segments"] - runs[0]["segments"]) * 1e6, 3)
    limit = LIMITS["driver_cpu_s_per_1m_segments"]
    return {"benchmark": "scale_driver_cpu", "executor": a.executor, "dim": DIM, "mask_hw": list(a.cpu_hw),
            "mask_pool": a.mask_pool,
            "segments_per_image": a.segments, "piece_images": a.piece_images, "images_per_block": a.images_per_block,
            "stage_sleep_s_per_block": a.cpu_stage_sleep, "runs": runs, "driver_cpu_s_per_1m_segments": per_1m, "marginal_driver_cpu_s_per_1m_segments": marginal,
            "limit": limit,
            # inline (--quick): the piece writers run in the driver, so the figure is no driver figure
            "ok": bool(per_1m <= limit) if a.executor == "ray" else None,
            "ok_marginal": (bool(marginal <= limit) if marginal is not None else None) if a.executor == "ray" else None}


def bench_rss(a, common: list[str]) -> dict:
    sizes = sorted(a.label_images)
    base = tempfile.mkdtemp(prefix="bench-scale-imgs-")
    try:
        # nested folders: size i's folder holds size i-1's folder plus the images it adds
        dirs, prev, d = [], 0, base
        for i in reversed(range(len(sizes))):
            d = os.path.join(d, f"level{i}")
            dirs.append(d)
        dirs = dirs[::-1]  # dirs[0]: the smallest size's folder (the deepest)
        for n, d in zip(sizes, dirs):
            _dummy_images(d, range(prev, n))
            prev = n
        runs = [{"images_listed": n, **_run_child(["--_child", "rss", "--_images", d, *common])}
                for n, d in zip(sizes, dirs)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    ratio_s = runs[-1]["peak_rss_sampled_mb"] / runs[0]["peak_rss_sampled_mb"]
    return {"benchmark": "scale_driver_rss", "executor": a.executor, "mask_hw": list(a.label_hw),
            "segments_per_image": a.label_segments, "piece_images": a.piece_images, "runs": runs,
            f"ratio_{sizes[-1]}_over_{sizes[0]}": round(ratio, 3), "ratio": round(ratio, 3),
            "ratio_sampled": round(ratio_s, 3), "limit": LIMITS["rss_ratio"], "ok": bool(ratio <= LIMITS["rss_ratio"])}


# ----------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny N, local only, inline executor (for the test)")
    ap.add_argument("--stores", default="local,s3")
    ap.add_argument("--levels", type=_ints, default=[100, 1000, 10000, 30000], help="pieces already committed")
    ap.add_argument("--commits", type=int, default=20, help="timed commits per level")
    ap.add_argument("--resume-at", type=int, default=10000, help="level at which to time the resume start-up")
    ap.add_argument("--piece-images", type=int, default=64)
    ap.add_argument("--segments", type=int, default=20, help="segments per image")
    ap.add_argument("--hw", type=_ints, default=[480, 640], help="mask size of the timed commits")
    ap.add_argument("--compact-every", type=int, default=None, help="default: CommitConfig().compact_every")
    ap.add_argument("--cpu-images", type=_ints, default=[5000, 50000],
                    help="one driver per size; the largest, 50k images x 20 segments, is the real N of (b): 1M segments")
    ap.add_argument("--images-per-block", type=int, default=None, help="default: RayConfig().images_per_block")
    ap.add_argument("--cpu-hw", type=_ints, default=[120, 160])
    ap.add_argument("--mask-pool", type=int, default=256,
                    help="(b): segments' RLEs drawn from this many masks made once (0: a new mask each), so the "
                         "results come at GPU pace and the driver is measured at a realistic segment rate")
    ap.add_argument("--cpu-stage-sleep", type=float, default=0.0,
                    help="seconds the generated stage sleeps per block (does the driver's CPU follow the wall time?)")
    ap.add_argument("--label-images", type=_ints, default=[10000, 100000])
    ap.add_argument("--label-hw", type=_ints, default=[24, 32])
    ap.add_argument("--label-segments", type=int, default=2)
    ap.add_argument("--executor", default="ray", choices=["ray", "inline"])
    ap.add_argument("--sections", default="commit,cpu,rss")
    ap.add_argument("--out", default=None, help="results file (default bench/results/scale.json; none with --quick)")
    ap.add_argument("--_child", default=None)
    ap.add_argument("--_images", default=None)
    a = ap.parse_args()
    if a.quick:
        a.stores, a.levels, a.commits, a.resume_at = "local", [20, 120], 3, 120
        a.piece_images, a.hw, a.compact_every = 8, [48, 64], 40
        a.cpu_images, a.cpu_hw, a.label_images, a.label_hw, a.executor = [32, 64], [24, 32], [40, 160], [24, 32], "inline"
    if a.images_per_block is None:
        from ragseg.config import RayConfig

        a.images_per_block = RayConfig().images_per_block
    if a.compact_every is None:
        from ragseg.config import CommitConfig

        a.compact_every = CommitConfig().compact_every
    if a._child:
        fn = child_cpu if a._child == "cpu" else child_rss
        print(json.dumps(fn(a)))
        return

    common = ["--piece-images", str(a.piece_images), "--segments", str(a.segments), "--executor", a.executor,
              "--images-per-block", str(a.images_per_block), "--cpu-stage-sleep", str(a.cpu_stage_sleep),
              "--cpu-hw", ",".join(map(str, a.cpu_hw)), "--mask-pool", str(a.mask_pool),
              "--label-hw", ",".join(map(str, a.label_hw)), "--label-segments", str(a.label_segments),
              "--compact-every", str(a.compact_every)]
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
                base = tempfile.mkdtemp(prefix="bench-scale-")
                try:
                    for r in bench_commit("local", base, a, batches, a.resume_at):
                        if r:
                            emit(r)
                finally:
                    shutil.rmtree(base, ignore_errors=True)
            elif store == "s3":
                with s3_server():
                    import fsspec

                    fsspec.filesystem("s3").mkdir("bench-scale")
                    for r in bench_commit("s3", "s3://bench-scale/out", a, batches, a.resume_at):
                        if r:
                            emit(r)
            else:
                raise SystemExit(f"unknown store {store!r} (local, s3)")
    if "cpu" in sections:
        emit(bench_cpu(a, common))
    if "rss" in sections:
        emit(bench_rss(a, common))

    out = a.out if a.out is not None else ("" if a.quick else str(ROOT / "bench" / "results" / "scale.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
