"""build-db: source -> decode -> (ground-truth masks | detect -> segment) -> embed -> feature shards.

The Ray Data graph streams image rows through the stages (decode and ground truth as CPU tasks, the
model stages as actor pools, GPUs when the cluster has them); only per-segment results (RLE +
embedding, never pixels) come back to the driver, which writes each input shard atomically once all
of its images are through, then records it in the manifest (see :mod:`ragseg.db`).
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from ragseg import db as dblib
from ragseg import io
from ragseg.config import JobConfig
from ragseg.errors import UserError, failed_rows_table
from ragseg.masks import rle_area, rle_bbox_xyxy
from ragseg.pipelines.common import (
    RunStats,
    add_stage,
    collect_shards,
    make_shards,
    print_summary,
    select_columns,
    write_source_errors,
)
from ragseg.preflight import preflight
from ragseg.schema import embeddings_to_arrow, feature_schema

log = logging.getLogger(__name__)

# columns that travel to the driver (pixels never do)
RESULT_COLUMNS = ["image_id", "uri", "shard", "error", "seg_masks_rle", "seg_labels", "seg_ids",
                  "seg_scores", "embeddings"]


def embed_identity(cfg: JobConfig) -> tuple[str, str, int]:
    """(model id, mode, dim) of the configured CLIP embedder, without loading weights. Must agree
    with ``Embed.model_id`` / ``Embed.dim`` (a test checks it)."""
    import open_clip

    c = cfg.models.clip
    arch = c.model_cfg or open_clip.get_model_config(c.model)
    if arch is None:
        raise UserError(f"unknown open_clip model {c.model!r} (set models.clip.model or models.clip.model_cfg)")
    return f"open_clip:{c.model}/{c.pretrained or 'random'}", c.mode, int(arch["embed_dim"])


def _segments_table(rows: list[dict], label_source: str, model_id: str, mode: str, dim: int) -> pa.Table:
    cols: dict[str, list] = defaultdict(list)
    embs = []
    for r in rows:
        n = len(r["seg_masks_rle"])
        if n == 0:
            continue
        emb = np.asarray(r["embeddings"], dtype=np.float16).reshape(n, dim)
        embs.append(emb)
        for j in range(n):
            rle = r["seg_masks_rle"][j]
            cols["image_id"].append(str(r["image_id"]))
            cols["segment_id"].append(int(r["seg_ids"][j]))
            cols["label"].append(str(r["seg_labels"][j]))
            cols["score"].append(float(r["seg_scores"][j]))
            cols["box"].append([float(v) for v in rle_bbox_xyxy(rle)])
            cols["area"].append(rle_area(rle))
            cols["mask_rle"].append(str(rle))
    schema = feature_schema(dim)
    n_rows = len(cols["image_id"])
    arrays = {
        "image_id": pa.array(cols["image_id"], pa.string()),
        "segment_id": pa.array(cols["segment_id"], pa.int64()),
        "label": pa.array(cols["label"], pa.string()).dictionary_encode(),
        "label_source": pa.array([label_source] * n_rows, pa.string()).dictionary_encode(),
        "score": pa.array(cols["score"], pa.float32()),
        "box": pa.array(cols["box"], pa.list_(pa.float32(), 4)),
        "area": pa.array(cols["area"], pa.int64()),
        "mask_rle": pa.array(cols["mask_rle"], pa.string()),
        "embedding": embeddings_to_arrow(np.concatenate(embs) if embs else np.zeros((0, dim), np.float16)),
        "embed_model": pa.array([model_id] * n_rows, pa.string()).dictionary_encode(),
        "embed_mode": pa.array([mode] * n_rows, pa.string()).dictionary_encode(),
    }
    table = pa.table([arrays[f.name] for f in schema], schema=schema)
    return table.sort_by([("image_id", "ascending"), ("segment_id", "ascending")])


def _source_rows(cfg: JobConfig, source_errors: list[dict]) -> list[dict]:
    from ragseg.sources import list_rows

    if cfg.source is None:
        raise UserError("build-db needs a `source:` section in the config (kind, uri, split)")
    return list_rows(cfg.source, errors=source_errors)


def build_graph(cfg: JobConfig, rows: list[dict]):
    """The Ray Data graph over the pending image rows (each carrying its ``shard`` name)."""
    import ray

    from ragseg.stages.decode import DecodeImages, LoadGroundTruth
    from ragseg.stages.embed import Embed

    n_blocks = max(1, min(len(rows), -(-len(rows) // cfg.ray.images_per_block)))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    per_block = cfg.ray.images_per_block
    ds = add_stage(ds, functools.partial(DecodeImages, cfg), "decode", cfg, actor=False, batch_size=per_block)
    model = functools.partial(add_stage, cfg=cfg, actor=True, gpu=True,
                              model_stages=1 if cfg.build_db.masks == "gt" else 3)
    if cfg.build_db.masks == "gt":
        ds = add_stage(ds, functools.partial(LoadGroundTruth, cfg), "gt", cfg, actor=False, batch_size=per_block)
    else:
        from ragseg.stages.detect import Detect
        from ragseg.stages.segment import Segment

        ds = model(ds, functools.partial(Detect, cfg), "detect", batch_size=cfg.models.gdino.batch_size)
        ds = model(ds, functools.partial(Segment, cfg), "segment", batch_size=per_block)
    ds = model(ds, functools.partial(Embed, cfg), "embed", batch_size=per_block)
    return ds.map_batches(select_columns, fn_kwargs={"keep": frozenset(RESULT_COLUMNS)}, batch_size=per_block)


def run_build_db(cfg: JobConfig) -> dict[str, Any]:
    preflight(cfg, "build-db")  # model sections checked on the driver, before Ray starts
    from ragseg.runtime import init_ray

    out = cfg.build_db.out
    model_id, mode, dim = embed_identity(cfg)
    manifest = dblib.read_manifest(out)
    if manifest is not None:
        dblib.check_compatible(manifest, model_id, mode, dim, out)
    else:
        manifest = dblib.new_manifest(model_id, mode, dim, cfg.hash("models.clip"), cfg.models.model_dump(mode="json"))

    source_errors: list[dict] = []
    rows = _source_rows(cfg, source_errors)
    covered = dblib.covered_image_ids(out, manifest)
    pending = [r for r in rows if str(r["image_id"]) not in covered]
    shards = make_shards(pending, cfg.build_db.images_per_shard, start_index=len(manifest["shards"]))
    stats = RunStats(shards_skipped=len(manifest["shards"]))
    label_source = "gt" if cfg.build_db.masks == "gt" else "detector"

    run_info = {"source": cfg.source.model_dump(mode="json"), "masks": cfg.build_db.masks,
                "config_hash": cfg.hash(), "listed": len(rows), "pending": len(pending),
                "source_errors": len(source_errors)}
    stats.errors += write_source_errors(out, source_errors)

    if shards:
        init_ray(cfg.ray)
        todo = []
        sizes: dict[str, int] = {}
        for name, chunk in shards:
            dblib.write_shard_inputs(out, name, chunk)
            sizes[name] = len(chunk)
            todo.extend({**r, "shard": name} for r in chunk)

        collect_shards(build_graph(cfg, todo), sizes, RESULT_COLUMNS,
                       lambda name, rows: _write_shard(out, manifest, name, rows, label_source, model_id, mode,
                                                       dim, stats),
                       stats, "build-db", cfg.ray.progress)

    manifest["runs"].append({**run_info, "summary": stats.summary()})
    dblib.write_manifest(out, manifest)
    summary = {"db": out, "embed_model": model_id, "embed_mode": mode, "dim": dim,
               "shards_total": len(manifest["shards"]), **stats.summary()}
    print_summary("build-db", summary, cfg.ray.progress)
    return summary


def _write_shard(out: str, manifest: dict, name: str, rows: list[dict], label_source: str,
                 model_id: str, mode: str, dim: int, stats: RunStats) -> None:
    paths = dblib.shard_paths(name)
    ok = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    table = _segments_table(ok, label_source, model_id, mode, dim)
    io.write_parquet_atomic(io.join(out, paths["features"]), table)
    if bad:
        io.write_parquet_atomic(io.join(out, paths["errors"]), failed_rows_table(bad))
    empty = sum(1 for r in ok if len(r["seg_masks_rle"]) == 0)
    manifest["shards"].append({
        "name": name, "inputs": paths["inputs"], "path": paths["features"],
        "errors_path": paths["errors"] if bad else None,
        "rows": table.num_rows, "images": len(rows), "errors": len(bad), "empty_images": empty,
    })
    dblib.write_manifest(out, manifest)
    stats.images += len(rows)
    stats.segments += table.num_rows
    stats.errors += len(bad)
    stats.empty += empty
    stats.shards_written += 1
