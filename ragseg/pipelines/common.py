"""Pieces shared by the pipelines: running stages as Ray Data tasks or actor pools with per-stage
timing, splitting work into deterministic input shards, progress and the closing summary."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ragseg.config import JobConfig

TIME_PREFIX = "t_"


def _timed_call(fn: Callable[[dict], dict], name: str, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    out = fn(batch)
    n = len(out["error"])
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


def actor_pool(cfg: JobConfig, num_gpus: float, model_stages: int = 1):
    """A fixed pool of ``ray.model_actors`` actors, or ("auto") a pool that starts with this stage's
    share of the cluster (its GPUs for GPU stages, else its CPUs, split evenly over the graph's
    ``model_stages`` actor stages) and may grow to the whole of it when the others are idle."""
    import ray

    n = cfg.ray.model_actors
    if n != "auto":
        return ray.data.ActorPoolStrategy(size=n)
    res = ray.cluster_resources()
    if num_gpus > 0:
        units = int(res.get("GPU", 0) // num_gpus)
    else:
        units = int(res.get("CPU", 1) // cfg.ray.cpus_per_actor)
    share = max(1, units // max(1, model_stages))
    return ray.data.ActorPoolStrategy(min_size=share, max_size=max(share, units))


def add_stage(ds, factory: Callable[[], Callable], name: str, cfg: JobConfig, *, actor: bool,
              batch_size: int, gpu: bool = False, model_stages: int = 1):
    """Append a stage to a Ray Dataset: a CPU task, or an actor pool (:func:`actor_pool`;
    ``gpus_per_actor`` GPUs each when the cluster has GPUs)."""
    if not actor:
        token = uuid.uuid4().hex
        return ds.map_batches(_stage_task, fn_kwargs={"factory": factory, "name": name, "token": token},
                              batch_size=batch_size, num_cpus=1)

    from ragseg.runtime import cluster_gpus

    num_gpus = cfg.ray.gpus_per_actor if (gpu and cluster_gpus() > 0) else 0
    return ds.map_batches(
        StageActor,
        fn_constructor_kwargs={"factory": factory, "name": name},
        batch_size=batch_size,
        compute=actor_pool(cfg, num_gpus, model_stages),
        num_cpus=cfg.ray.cpus_per_actor,
        num_gpus=num_gpus,
    )


def select_columns(batch: dict[str, np.ndarray], keep: frozenset[str]) -> dict[str, np.ndarray]:
    """Keep the named columns and the per-stage timings (pixels never travel to the driver)."""
    from ragseg.runtime import quiet_ray_data

    quiet_ray_data()
    return {k: v for k, v in batch.items() if k in keep or k.startswith(TIME_PREFIX)}


# ----------------------------------------------------------------------------------------------
# Input shards
# ----------------------------------------------------------------------------------------------
def shard_key(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(str(r["image_id"]).encode())
        h.update(b"\0")
        h.update(str(r["uri"]).encode())
        h.update(b"\n")
    return h.hexdigest()[:12]


def make_shards(rows: list[dict], per_shard: int, start_index: int) -> list[tuple[str, list[dict]]]:
    """Chunk rows (already in a stable order) into named input shards ``sNNNNN-<key>``."""
    out = []
    for j, i in enumerate(range(0, len(rows), per_shard)):
        chunk = rows[i : i + per_shard]
        out.append((f"s{start_index + j:05d}-{shard_key(chunk)}", chunk))
    return out


def write_source_errors(out: str, errors: list[dict]) -> int:
    """Listing errors (bad CSV lines, malformed annotation entries) belong to no shard: they go to
    ``<out>/errors/source-<content hash>.parquet``, so a rerun rewrites the same file, never a twin."""
    if not errors:
        return 0
    from ragseg import io
    from ragseg.errors import errors_table

    table = errors_table(errors)
    key = hashlib.sha256(str(table.to_pylist()).encode()).hexdigest()[:12]
    io.write_parquet_atomic(io.join(out, "errors", f"source-{key}.parquet"), table)
    return len(errors)


def collect_shards(ds, sizes: dict[str, int], columns: list[str], on_shard: Callable[[str, list[dict]], None],
                   stats: RunStats, description: str, progress: bool) -> None:
    """Stream the pipeline's per-image rows to the driver and hand each input shard to ``on_shard``
    as soon as all of its images are through (rows carry their ``shard``). A shard is never handed
    over partially: rows lost inside the pipeline make this raise instead."""
    buffers: dict[str, list[dict]] = defaultdict(list)
    bar = Progress(sum(sizes.values()), description, progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            stats.add_times(batch)
            n = len(batch["error"])
            for i in range(n):
                row = {k: batch[k][i] for k in columns}
                name = row["shard"]
                buffers[name].append(row)
                if len(buffers[name]) == sizes[name]:
                    on_shard(name, buffers.pop(name))
            bar.advance(n)
    finally:
        bar.close()
    if buffers:
        raise RuntimeError(f"pipeline ended with incomplete shards: {sorted(buffers)}")


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

    def add_times(self, batch: dict[str, np.ndarray]) -> None:
        for k, v in batch.items():
            if k.startswith(TIME_PREFIX):
                self.stage_seconds[k[len(TIME_PREFIX):]] += float(np.sum(v))

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


class Progress:
    """A rich progress bar over images (total known up front), showing images/s; a no-op when off."""

    def __init__(self, total: int, description: str, enabled: bool):
        self.enabled = enabled and total > 0
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                transient=False,
            )
            self._p.start()
            self._task = self._p.add_task(description, total=total, rate="-")
            self._t0 = time.perf_counter()
            self._done = 0

    def advance(self, n: int) -> None:
        if self.enabled:
            self._done += n
            rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
            self._p.update(self._task, advance=n, rate=f"{rate:.2f}")

    def close(self) -> None:
        if self.enabled:
            self._p.stop()


def print_summary(title: str, summary: dict[str, Any], enabled: bool = True) -> None:
    if not enabled:
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary.items():
        if k != "stages":
            t.add_row(k, str(v))
    for name, s in summary.get("stages", {}).items():
        t.add_row(f"stage {name}", f"{s['busy_seconds']} s busy, {s['images_per_busy_second']} img/s")
    Console(stderr=True).print(t)
