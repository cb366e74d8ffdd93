"""Pieces shared by the pipelines: running stages as Ray Data tasks or actor pools with per-stage
timing, the pending rows of a resumed job, the driver loop over commit records (ragseg.ledger),
progress and the closing summary."""

from __future__ import annotations

import gc
import hashlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragseg.config import JobConfig
from ragseg.stages.batch import batch_len

TIME_PREFIX = "t_"


def _timed_call(fn: Callable[[dict], dict], name: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    out = fn(batch)
    n = batch_len(out)
    out[TIME_PREFIX + name] = np.full(n, (time.perf_counter() - t0) / max(n, 1), dtype=np.float64)
    return out


class StageActor:
    """Actor-pool wrapper: builds the stage once per worker from ``factory`` and times each batch."""

    def __init__(self, factory: Callable[[], Callable], name: str):
        from ragseg.runtime import quiet_ray_data

        quiet_ray_data()
        self.fn = factory()
        self.name = name

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _timed_call(self.fn, self.name, batch)


_TASK_CACHE: dict[str, Callable] = {}


def _stage_task(batch: dict[str, np.ndarray], factory: Callable[[], Callable], name: str, token: str) -> dict:
    # a cheap stage (decode, gt) runs as a Ray task; its instance is cached per worker process and
    # per pipeline run (token), so a later run with another config never reuses a stale one
    key = f"{name}:{token}"
    fn = _TASK_CACHE.get(key)
    if fn is None:
        from ragseg.runtime import quiet_ray_data

        quiet_ray_data()
        _TASK_CACHE.clear()
        fn = _TASK_CACHE[key] = factory()
    return _timed_call(fn, name, batch)


def actor_pool(cfg: JobConfig, num_gpus: float, model_stages: int = 1, stage: str | None = None):
    """A fixed pool of the stage's ``actors`` (``ray.stages.<stage>.actors``, else ``ray.model_actors``),
    or ("auto") a pool that starts with this stage's share of the cluster (its GPUs for GPU stages,
    else its CPUs, split evenly over the graph's ``model_stages`` actor stages) and may grow to the
    whole of it when the others are idle."""
    import ray

    res_cfg = cfg.ray.resources(stage or "")
    n = res_cfg.actors
    if n != "auto":
        return ray.data.ActorPoolStrategy(size=n)
    res = ray.cluster_resources()
    if num_gpus > 0:
        units = int(res.get("GPU", 0) // num_gpus)
    else:
        units = int(res.get("CPU", 1) // res_cfg.cpus)
    share = max(1, units // max(1, model_stages))
    return ray.data.ActorPoolStrategy(min_size=share, max_size=max(share, units))


def stage_gpus(cfg: JobConfig, name: str, gpu: bool) -> float:
    """GPUs per actor of model stage ``name``: its configured fraction (``ray.stages.<name>.gpus``, else
    ``ray.gpus_per_actor``) when it is a GPU stage and the cluster has GPUs, else 0."""
    from ragseg.runtime import cluster_gpus

    return float(cfg.ray.resources(name).gpus) if (gpu and cluster_gpus() > 0) else 0.0


def add_stage(ds, factory: Callable[[], Callable], name: str, cfg: JobConfig, *, actor: bool,
              batch_size: int, gpu: bool = False, model_stages: int = 1):
    """Append a stage to a Ray Dataset: a CPU task (decoding, resizing, writing: never on a GPU), or
    an actor pool (:func:`actor_pool`) with the stage's ``ray.stages.<name>`` resources (GPUs per actor
    when the cluster has GPUs, CPUs per actor; defaults ``ray.gpus_per_actor`` / ``cpus_per_actor``)."""
    if not actor:
        token = uuid.uuid4().hex
        return ds.map_batches(_stage_task, fn_kwargs={"factory": factory, "name": name, "token": token},
                              batch_size=batch_size, num_cpus=1)

    num_gpus = stage_gpus(cfg, name, gpu)
    return ds.map_batches(
        StageActor,
        fn_constructor_kwargs={"factory": factory, "name": name},
        batch_size=batch_size,
        compute=actor_pool(cfg, num_gpus, model_stages, stage=name),
        num_cpus=cfg.ray.resources(name).cpus,
        num_gpus=num_gpus,
    )


def select_columns(batch: dict[str, np.ndarray], keep: frozenset[str]) -> dict[str, np.ndarray]:
    """Keep the named columns and the per-stage timings (drops pixels before the piece writer)."""
    from ragseg.runtime import quiet_ray_data

    quiet_ray_data()
    return {k: v for k, v in batch.items() if k in keep or k.startswith(TIME_PREFIX)}


# ----------------------------------------------------------------------------------------------
# Pending work, pieces and the driver loop
# ----------------------------------------------------------------------------------------------
def pending_rows(rows, ledger):
    """The listed rows (an Arrow table, ragseg.sources.row_schema) whose image no committed piece
    covers: one vectorised ``is_in`` against the ledger's image ids, no per-id Python object."""
    import pyarrow.compute as pc

    if ledger is None or ledger.records.num_rows == 0 or rows.num_rows == 0:
        return rows
    done = pc.is_in(rows.column("image_id"), value_set=ledger.covered_image_ids())
    return rows.filter(pc.invert(done))


def pending_source(out: str, source, ledger, per_piece: int, errors: list[dict], retry_errors: bool = False,
                   errors_matching: str | None = None, ray_cfg=None):
    """List a job's source and keep the images no committed piece covers: (pending, images listed).
    With ``retry_errors``: the listed images whose latest outcome is an error (matching
    ``errors_matching``), :func:`ragseg.pipelines.retry.retry_rows`, from the whole listing.

    A folder without ``limit`` / ``shard`` (the 10M-image corpora) is listed a batch of pages at a
    time, each batch filtered against the committed ids and appended to the pending listing file, so
    nothing holds the listing (:mod:`ragseg.pipelines.pending`): ``pending`` is then the written
    :class:`~ragseg.pipelines.listing.Listing`. With ``ray_cfg`` (the jobs on Ray) that work runs as a
    Ray task, not on the driver; without (the inline executor), here. Other sources are listed whole
    (their annotation files are read whole anyway) and filtered with :func:`pending_rows`:
    ``pending`` is an Arrow table. Both have ``num_rows``."""
    from ragseg.sources import folder, list_table

    if retry_errors:
        from ragseg.pipelines.retry import retry_rows

        rows = list_table(source, errors=errors)
        return retry_rows(rows, ledger, errors_matching), rows.num_rows
    if source.kind != "folder" or not folder.streamable(source):
        rows = list_table(source, errors=errors)
        return pending_rows(rows, ledger), rows.num_rows
    from ragseg.pipelines import pending

    done = ledger.covered_image_ids() if ledger is not None and ledger.records.num_rows else None
    if ray_cfg is None:
        return pending.list_pending(out, source, done, per_piece, errors)
    return pending.list_pending_remote(out, source, done, per_piece, errors, ray_cfg)


def stage_seconds(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Busy seconds per stage of a batch's rows (the ``t_<stage>`` columns :class:`StageActor` adds)."""
    return {k[len(TIME_PREFIX):]: float(np.sum(v)) for k, v in batch.items() if k.startswith(TIME_PREFIX)}


def record_batch(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """A commit record as the one-row batch a piece writer returns to the driver."""
    out = {}
    for k, v in record.items():
        col = np.empty(1, dtype=object)
        col[0] = v
        out[k] = col
    return out


def empty_record_batch() -> dict[str, np.ndarray]:
    from ragseg.ledger import RECORD_FIELDS

    return {k: np.empty(0, dtype=object) for k in RECORD_FIELDS}


# An executor runs the pending rows (an Arrow table, or a Listing already written: pending_source)
# through a job's stages and its piece writer and yields the commit records:
# ``execute(cfg, pending, writer_factory, images_per_piece) -> Iterator[record]``.
Executor = Callable[[JobConfig, Any, Callable[[], Callable], int], Iterator[dict]]


def ray_executor(graph: Callable[[Any], Any], out: str) -> Executor:
    """The production executor: the pending rows go to ``<out>/_listing/`` (ragseg.pipelines.listing;
    a :class:`~ragseg.pipelines.listing.Listing` is there already), which Ray's read tasks read a
    few pieces each; then the Ray Data graph ``graph(ds)`` (decode, models, ...) and the piece
    writer as a CPU task stage; only its one-row commit records stream back to the driver. The
    listing file is removed when the job ends."""

    def execute(cfg: JobConfig, pending, writer: Callable[[], Callable], per_piece: int):
        from ragseg.pipelines import listing
        from ragseg.runtime import init_ray

        # Ray and the listing first, eagerly: a cluster that cannot be reached or a full disk is the
        # job's only line, before it says what it is going to do
        init_ray(cfg.ray)
        if isinstance(pending, listing.Listing):
            uri, offsets, schema = pending.uri, pending.offsets, pending.schema
        else:
            uri, offsets, schema = listing.write_listing(out, pending, per_piece)
        n_rows = pending.num_rows
        del pending  # the driver keeps only the pieces' offsets while the job runs
        return iterate(cfg, writer, per_piece, uri, offsets, schema, n_rows)

    def iterate(cfg: JobConfig, writer, per_piece: int, uri: str, offsets, schema, n_rows: int):
        import ray

        from ragseg.pipelines import listing

        # Ray's PythonGCThread runs gc.collect() on the driver whenever the raylet asks (object store
        # pressure); the driver's heap is mostly modules and configs loaded before the job, which do not
        # become garbage while it runs: frozen, a full collection walks only what the job itself makes.
        # Unfrozen at the end, so a process running many jobs (experiments, tests) collects them again
        gc.freeze()
        from ragseg.runtime import set_scheduler_wait

        wait0 = set_scheduler_wait(cfg.ray.scheduler_wait_s)  # this job's; the process's again at the end
        try:
            pieces = len(offsets) - 1
            cpus = int(ray.cluster_resources().get("CPU", 1))
            plan = listing.read_task_plan(pieces, cfg.ray.pieces_per_read_task, cfg.ray.max_read_tasks,
                                          min_tasks=2 * cpus)
            source = listing.make_datasource(uri, offsets, schema, n_rows, per_piece, plan)
            # one block per read task (no SplitBlocks: Ray would otherwise split them up to its
            # default parallelism). A read is one small ranged GET: it takes no CPU slot (the model
            # actors may hold them all), and at most ray.read_concurrency run at once (each running
            # task holds a worker process)
            ds = ray.data.read_datasource(source, override_num_blocks=len(plan), num_cpus=0,
                                          concurrency=cfg.ray.read_concurrency)
            ds = add_stage(graph(ds), writer, "write", cfg, actor=False, batch_size=per_piece)
            yield from ds.iter_rows()
        finally:
            # only our own listing: a job fenced off after its lease expired must not delete the one of
            # the job that took the folder over (a killed run's are removed at the next start)
            listing.remove_listing(uri)
            set_scheduler_wait(wait0)
            gc.unfreeze()

    return execute


def inline_executor(results: Callable[[list[dict]], dict[str, np.ndarray]]) -> Executor:
    """Runs in this process without Ray: ``results(rows)`` makes each piece's result batch (the
    columns the writer reads), the writer writes and commits it. For the commit-path harness of the
    tests and benchmarks (no models)."""

    def execute(cfg: JobConfig, pending, writer: Callable[[], Callable], per_piece: int):
        from ragseg.pipelines.listing import Listing, remove_listing

        w = writer()
        if isinstance(pending, Listing):
            pieces = pending.iter_pieces()
        else:
            pieces = (pending.slice(i, per_piece) for i in range(0, pending.num_rows, per_piece))
        try:
            for piece in pieces:
                rec = w(results(piece.to_pylist()))
                yield {k: v[0] for k, v in rec.items()}
        finally:
            if isinstance(pending, Listing):
                remove_listing(pending.uri)

    return execute


def drain_records(records: Iterator[dict], compactor, stats: RunStats, expected_images: int, description: str,
                  progress: bool, pieces: int | None = None, interval: float = 60.0) -> None:
    """The driver loop: receive each piece's commit record (the only rows that reach the driver),
    hand it to the compactor and count it. O(1) per piece, nothing per segment. ``progress``: one
    line saying what is to do, then :class:`ragseg.console.JobProgress` (a bar on a terminal, a line
    every ``interval`` s otherwise). A Ctrl-C (ragseg.interrupt) lands here: the records received so
    far are compacted and the iteration is closed, which stops the Ray pipeline."""
    from ragseg import console

    if progress and expected_images:
        log = console.log_uri()
        console.say(f"{description}: {expected_images} images to do in {pieces or '?'} pieces"
                    + (f" (Ray's output: {log})" if log else ""))
    bar = console.JobProgress(description, expected_images, pieces, progress, interval)
    seen = 0
    try:
        for rec in records:
            rec = _plain_record(rec)
            compactor.add(rec)
            stats.add_record(rec)
            seen += rec["images"]
            bar.advance(rec["images"])
    finally:
        bar.close()
        close = getattr(records, "close", None)
        if close is not None:
            close()  # a generator: its cleanup (Ray Data's executor, the listing file) runs now
        compactor.flush()
    if seen != expected_images:
        raise RuntimeError(f"the pipeline committed {seen} images but {expected_images} were pending; "
                           "rerun the job to finish the rest")


def _plain_record(rec: dict[str, Any]) -> dict[str, Any]:
    from ragseg.ledger import RECORD_FIELDS

    out = {}
    for k in RECORD_FIELDS:
        v = rec.get(k)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    out["image_ids"] = [str(x) for x in out["image_ids"]]
    return out


def write_source_errors(out: str, errors: list[dict], provenance: bytes | None = None) -> int:
    """Listing errors (bad CSV lines, malformed annotation entries) belong to no piece: they go to
    ``<out>/errors/source-<content hash>.parquet``, so a rerun rewrites the same file, never a twin."""
    if not errors:
        return 0
    from ragseg import io
    from ragseg.errors import errors_table
    from ragseg.provenance import attach

    table = errors_table(errors)
    key = hashlib.sha256(str(table.to_pylist()).encode()).hexdigest()[:12]
    io.write_parquet_atomic(io.join(out, "errors", f"source-{key}.parquet"), attach(table, provenance))
    return len(errors)


# ----------------------------------------------------------------------------------------------
# Progress and summary
# ----------------------------------------------------------------------------------------------
@dataclass
class RunStats:
    images: int = 0
    segments: int = 0
    errors: int = 0
    empty: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    stage_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    t0: float = field(default_factory=time.perf_counter)

    def add_record(self, rec: dict[str, Any]) -> None:
        import json

        self.images += int(rec["images"])
        self.segments += int(rec["segments"])
        self.errors += int(rec["errors"])
        self.empty += int(rec["empty_images"])
        self.shards_written += 1
        for k, v in json.loads(rec["stage_seconds"] or "{}").items():
            self.stage_seconds[k] += float(v)

    def summary(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        return {
            "images": self.images,
            "segments": self.segments,
            "errors": self.errors,
            "empty_images": self.empty,
            "shards_written": self.shards_written,
            "shards_skipped": self.shards_skipped,
            "wall_seconds": round(wall, 3),
            "images_per_second": round(self.images / wall, 3) if wall > 0 else None,
            "stages": {
                name: {"busy_seconds": round(sec, 3), "images_per_busy_second": round(self.images / sec, 3) if sec > 0 else None}
                for name, sec in sorted(self.stage_seconds.items())
            },
        }


def print_summary(title: str, summary: dict[str, Any], enabled: bool = True) -> None:
    """The end summary on the terminal (ragseg.console.summary_lines): output, counts, errors and
    where their rows are, throughput. The per-stage figures are in the JSON the command prints."""
    if not enabled:
        return
    from ragseg import console

    for line in console.summary_lines(title, summary):
        console.say(line)
