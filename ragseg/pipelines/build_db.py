"""build-db: source -> decode -> (ground-truth masks | detect -> segment) -> embed -> feature shards.

The Ray Data graph streams image rows through the stages (decode and ground truth as CPU tasks, the
model stages as actor pools, GPUs when the cluster has them) into a writer task that writes each
piece (a batch of ``build_db.images_per_shard`` images) next to the data and commits it
(:mod:`ragseg.ledger`). Only the commit records, a few hundred bytes per piece, reach the driver,
which folds them into the manifest every ``commit.compact_every`` pieces; it touches no segment.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from ragseg import db as dblib
from ragseg import io, ledger
from ragseg.config import JobConfig
from ragseg.errors import UserError, failed_rows_table
from ragseg.pipelines.common import (
    Executor,
    RunStats,
    drain_records,
    empty_record_batch,
    pending_source,
    print_summary,
    ray_executor,
    record_batch,
    select_columns,
    stage_seconds,
    write_source_errors,
)
from ragseg.pipelines.listing import clear_listings
from ragseg.preflight import preflight
from ragseg.provenance import attach
from ragseg.schema import embeddings_to_arrow, feature_schema, masks_to_arrow
from ragseg.stages.batch import as_list

log = logging.getLogger(__name__)

# columns that travel to the driver (pixels never do)
RESULT_COLUMNS = ["image_id", "uri", "error", "seg_masks_rle", "seg_labels", "seg_ids", "seg_scores",
                  "seg_areas", "seg_boxes", "embeddings"]


def embed_identity(cfg: JobConfig) -> tuple[str, str, int]:
    """(model id, mode, dim) of the configured CLIP embedder, without loading weights. Must agree
    with ``Embed.model_id`` / ``Embed.dim`` (a test checks it). The full identity that jobs compare
    is :func:`ragseg.identity.embed_identity`."""
    from ragseg.identity import embed_identity as full

    ident = full(cfg, checksum=False)
    return ident["model"], ident["mode"], ident["dim"]


def segments_table(batch: dict[str, np.ndarray], rows: np.ndarray, label_source: str, model_id: str, mode: str,
                   dim: int) -> pa.Table:
    """The feature rows of the given (ok) rows of a batch: columns straight from the stages' lists,
    area and box as the mask-making stage computed them (no RLE is decoded here)."""
    cols: dict[str, list] = defaultdict(list)
    embs = []
    for i in rows:
        n = len(batch["seg_masks_rle"][i])
        if n == 0:
            continue
        embs.append(np.asarray(batch["embeddings"][i], dtype=np.float16).reshape(n, dim))
        cols["image_id"].extend([str(batch["image_id"][i])] * n)
        cols["segment_id"].extend(as_list(batch["seg_ids"][i]))
        cols["label"].extend(as_list(batch["seg_labels"][i]))
        cols["score"].extend(as_list(batch["seg_scores"][i]))
        cols["box"].extend(as_list(batch["seg_boxes"][i]))
        cols["area"].extend(as_list(batch["seg_areas"][i]))
        cols["mask_rle"].extend(as_list(batch["seg_masks_rle"][i]))
    schema = feature_schema(dim)
    n_rows = len(cols["image_id"])
    arrays = {
        "image_id": pa.array(cols["image_id"], pa.string()),
        "segment_id": pa.array(cols["segment_id"], pa.int64()),
        "label": pa.array(cols["label"], pa.string()).dictionary_encode(),
        "label_source": pa.array([label_source] * n_rows, pa.string()).dictionary_encode(),
        "score": pa.array(cols["score"], pa.float32()),
        "box": pa.array([np.asarray(b, np.float32) for b in cols["box"]], pa.list_(pa.float32(), 4)),
        "area": pa.array(cols["area"], pa.int64()),
        "mask_rle": masks_to_arrow(cols["mask_rle"]),
        "embedding": embeddings_to_arrow(np.concatenate(embs) if embs else np.zeros((0, dim), np.float16)),
        "embed_model": pa.array([model_id] * n_rows, pa.string()).dictionary_encode(),
        "embed_mode": pa.array([mode] * n_rows, pa.string()).dictionary_encode(),
    }
    table = pa.table([arrays[f.name] for f in schema], schema=schema)
    return table.sort_by([("image_id", "ascending"), ("segment_id", "ascending")])


class WriteDbPiece:
    """Last stage of build-db, on a worker: writes one piece (this batch of images) of the DB, its
    feature Parquet and errors table, then its commit record (ragseg.ledger), and returns only that
    record (one row) to the driver."""

    def __init__(self, out: str, label_source: str, model_id: str, mode: str, dim: int, epoch: int = 0,
                 retry: bool = False, provenance: bytes | None = None):
        self.out, self.label_source, self.model_id, self.mode, self.dim = out, label_source, model_id, mode, dim
        self.epoch, self.retry = epoch, retry  # the job's lease epoch; a --retry-errors run
        self.provenance = provenance  # ragseg.provenance: JSON bytes for every file's schema metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(v) for v in batch["image_id"]]
        if not ids:
            return empty_record_batch()
        errors = [str(e) if e else "" for e in batch["error"]]
        ok = np.array([i for i, e in enumerate(errors) if not e], dtype=np.int64)
        bad = [i for i, e in enumerate(errors) if e]
        name = ledger.piece_name(ids, f"retry-{self.epoch}" if self.retry else "")
        paths = dblib.piece_paths(name)
        table = segments_table(batch, ok, self.label_source, self.model_id, self.mode, self.dim)
        io.write_parquet_atomic(io.join(self.out, paths["features"]), attach(table, self.provenance))
        if bad:
            rows = [{"uri": batch["uri"][i], "image_id": ids[i], "error": errors[i]} for i in bad]
            io.write_parquet_atomic(io.join(self.out, paths["errors"]), attach(failed_rows_table(rows), self.provenance))
        empty = int(sum(1 for i in ok if len(batch["seg_masks_rle"][i]) == 0))
        rec = ledger.new_record(name, ids, images=len(ids), segments=table.num_rows, errors=len(bad),
                                empty_images=empty, data_path=paths["features"],
                                errors_path=paths["errors"] if bad else None, parts_path=None,
                                stage_seconds=stage_seconds(batch), epoch=self.epoch, retry=self.retry)
        ledger.write_commit(self.out, rec)
        return record_batch(rec)


def mask_model(cfg: JobConfig) -> str:
    """What makes this build's masks: ``gt`` (ground truth) or the mask model's id
    (:func:`ragseg.models.sam.mask_model_id`, family and checkpoint included)."""
    from ragseg.models.sam import mask_model_id

    return "gt" if cfg.build_db.masks == "gt" else mask_model_id(cfg.models.sam)


def _pending(cfg: JobConfig, out: str, led, source_errors: list[dict], retry_errors: bool,
             errors_matching: str | None, ray_cfg):
    """(pending rows or listing, images listed): :func:`ragseg.pipelines.common.pending_source` (a
    folder's listing in a Ray task with ``ray_cfg``: the job runs on Ray)."""
    if cfg.source is None:
        raise UserError("build-db needs a `source:` section in the config (kind, uri, split)")
    return pending_source(out, cfg.source, led, cfg.build_db.images_per_shard, source_errors, retry_errors,
                          errors_matching, ray_cfg=ray_cfg)


def build_graph(cfg: JobConfig, ds):
    """The Ray Data graph over ``ds``, the pending image rows (a read task's pieces a block): decode,
    the masks (ground truth, or Grounding DINO + SAM), the embedder (:mod:`ragseg.pipelines.graph`)."""
    from ragseg.pipelines.graph import apply_stages, decode_stages, embed_stages, proposal_stages

    masks = "gt" if cfg.build_db.masks == "gt" else "gdino-sam"
    ds = apply_stages(ds, cfg, [*decode_stages(cfg), *proposal_stages(cfg, masks), *embed_stages(cfg)])
    return ds.map_batches(select_columns, fn_kwargs={"keep": frozenset(RESULT_COLUMNS)},
                          batch_size=cfg.ray.images_per_block)


def run_build_db(cfg: JobConfig, execute: Executor | None = None, *, retry_errors: bool = False,
                 errors_matching: str | None = None) -> dict[str, Any]:
    """build-db into ``cfg.build_db.out``; ``execute`` replaces the model graph (tests, benchmarks).
    ``retry_errors``: re-process only the images whose latest outcome is an error row (matching the
    regular expression ``errors_matching``, when given), :mod:`ragseg.pipelines.retry`."""
    if errors_matching and not retry_errors:
        raise UserError("--errors-matching selects which errors --retry-errors retries: give both")
    if execute is None:
        preflight(cfg, "build-db")  # model sections checked on the driver, before Ray starts
    from ragseg import identity, provenance

    out = cfg.build_db.out
    embedder = identity.record(cfg)
    prov = provenance.job_provenance(cfg, "build-db")
    model_id, mode, dim = embedder["model"], embedder["mode"], embedder["dim"]
    with ledger.Lease(out, cfg.commit.lease_ttl_s, "build-db") as lease:
        clear_listings(out)
        c = cfg.commit
        led, header, comp = ledger.open_for_writing(
            out, dblib.KIND, c.compact_every, c.compact_seconds, c.max_segments,
            lambda: dblib.new_header(model_id, mode, dim, cfg.hash("models.clip"), cfg.models.model_dump(mode="json"),
                                     embedder=embedder, provenance=prov),
            lambda h: identity.check(identity.header_identity(h), embedder, f"DB {out}",
                                     fix="use a new --out DB (or the models.clip it was built with)"), lease=lease)
        masks_by = mask_model(cfg)
        mixed = dblib.note_mask_model(header, masks_by, out)
        if mixed:
            log.warning(mixed)

        source_errors: list[dict] = []
        pending, n_listed = _pending(cfg, out, led, source_errors, retry_errors, errors_matching,
                                     cfg.ray if execute is None else None)
        stats = RunStats(shards_skipped=led.records.num_rows if led is not None else 0)
        del led  # the committed ids were only needed to filter the listing
        label_source = "gt" if cfg.build_db.masks == "gt" else "detector"
        run_info = {"source": cfg.source.model_dump(mode="json"), "masks": cfg.build_db.masks, "mask_model": masks_by,
                    "config_hash": cfg.hash(), "listed": n_listed, "pending": pending.num_rows,
                    "source_errors": len(source_errors)}
        if retry_errors:
            run_info["retry_errors"] = {"errors_matching": errors_matching}
        stats.errors += write_source_errors(out, source_errors, provenance.to_bytes(prov))

        n_pending = pending.num_rows
        if n_pending:
            execute = execute or ray_executor(functools.partial(build_graph, cfg), out)
            writer = functools.partial(WriteDbPiece, out, label_source, model_id, mode, dim, lease.epoch, retry_errors,
                                       provenance.to_bytes(prov))
            records = execute(cfg, pending, writer, cfg.build_db.images_per_shard)
            del pending  # the executor's now (the Ray one writes the rows out and drops them)
            drain_records(records, comp, stats, n_pending, "build-db", cfg.ray.progress,
                          pieces=-(-n_pending // cfg.build_db.images_per_shard), interval=cfg.ray.progress_interval_s)

        ledger.add_run(out, header, {**run_info, "summary": stats.summary()})
        comp.write_header()
    summary = {"db": out, "embed_model": model_id, "embed_mode": mode, "dim": dim, "mask_model": masks_by,
               "pieces_total": header["totals"]["pieces"], **stats.summary()}
    if mixed:
        summary["warnings"] = [mixed]
    print_summary("build-db", summary, cfg.ray.progress)
    return summary
