"""label: unlabeled images -> proposals -> masked CLIP queries -> retrieval + CLIP ensemble ->
panoptic merge -> COCO panoptic PNGs + JSON and Parquet segments (layout in docs/interfaces.md).

Resumable like build-db: images are chunked into input shards; a shard's PNGs, JSON part and
Parquet segments are written atomically and only then recorded in ``OUT/manifest.json``; a rerun
skips recorded shards and recomputes the rest into the same names, so nothing is duplicated.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from ragseg import db as dblib
from ragseg import io
from ragseg.config import JobConfig
from ragseg.errors import UserError, error_text, failed_rows_table
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

MANIFEST = "manifest.json"
RESULT_COLUMNS = ["image_id", "uri", "shard", "error", "file_name", "height", "width", "segments_info"]

SEGMENTS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("segment_id", pa.int64()),
    pa.field("label", pa.string()),
    pa.field("category_id", pa.int64()),
    pa.field("score", pa.float32()),
    pa.field("s_ret", pa.float32()),
    pa.field("s_clip", pa.float32()),
    pa.field("s_iv", pa.float32()),
    pa.field("box", pa.list_(pa.float32(), 4)),
    pa.field("area", pa.int64()),
    pa.field("mask_rle", pa.string()),
])


class WritePanoptic:
    """CPU stage: writes each image's panoptic PNG (atomically) and drops the pixel columns."""

    def __init__(self, out: str):
        self.out = out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        n = len(batch["error"])
        names = np.empty(n, dtype=object)
        errors = batch["error"].copy()
        for i in range(n):
            names[i] = ""
            if errors[i]:
                continue
            try:
                name = io.safe_name(str(batch["image_id"][i])) + ".png"
                buf = _png_bytes(Image.fromarray(np.asarray(batch["panoptic_png"][i], dtype=np.uint8)))
                io.write_bytes_atomic(io.join(self.out, "panoptic", name), buf)
                names[i] = name
            except Exception as e:  # noqa: BLE001 - one bad row never stops the job
                errors[i] = error_text("write", e)
        out = {k: v for k, v in batch.items() if k not in ("image", "panoptic_png", "embeddings")}
        out["file_name"] = names
        out["error"] = errors
        return out


def _png_bytes(img) -> bytes:
    import io as _io

    b = _io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def _check_index(cfg: JobConfig, index_uri: str) -> dict:
    from ragseg.index.store import Index
    from ragseg.pipelines.build_db import embed_identity

    meta = Index.open(index_uri).meta
    model_id, mode, dim = embed_identity(cfg)
    have = (meta.get("embed_model"), meta.get("embed_mode"), int(meta.get("dim", -1)))
    if have != (model_id, mode, dim):
        raise UserError(
            f"index {index_uri} holds embeddings of {have[0]} mode={have[1]} dim={have[2]}, but the label "
            f"config embeds queries with {model_id} mode={mode} dim={dim}: queries and keys must come "
            f"from the same CLIP model and mode (set models.clip to match the index)"
        )
    return meta


def build_graph(cfg: JobConfig, rows: list[dict], vocab):
    import ray

    from ragseg.stages.classify import Classify
    from ragseg.stages.decode import DecodeImages, LoadGroundTruth
    from ragseg.stages.embed import Embed
    from ragseg.stages.merge import PanopticMerge

    lc = cfg.label
    per_block = cfg.ray.images_per_block
    n_blocks = max(1, min(len(rows), -(-len(rows) // per_block)))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    ds = add_stage(ds, functools.partial(DecodeImages, cfg), "decode", cfg, actor=False, batch_size=per_block)
    n_models = {"gt": 2, "gdino-sam": 4, "sam-grid": 3}[lc.proposals]  # actor stages in this graph
    model = functools.partial(add_stage, cfg=cfg, actor=True, model_stages=n_models)
    if lc.proposals == "gt":
        ds = add_stage(ds, functools.partial(LoadGroundTruth, cfg), "gt", cfg, actor=False, batch_size=per_block)
    elif lc.proposals == "gdino-sam":
        from ragseg.stages.detect import Detect
        from ragseg.stages.segment import Segment

        ds = model(ds, functools.partial(Detect, cfg, vocab=list(vocab.names)), "detect",
                   batch_size=cfg.models.gdino.batch_size, gpu=True)
        ds = model(ds, functools.partial(Segment, cfg), "segment", batch_size=per_block, gpu=True)
    else:
        from ragseg.stages.segment import SamGrid

        ds = model(ds, functools.partial(SamGrid, cfg), "sam_grid", batch_size=per_block, gpu=True)
    ds = model(ds, functools.partial(Embed, cfg), "embed", batch_size=per_block, gpu=True)
    ds = model(ds, functools.partial(Classify, cfg, vocab, lc.index, lc.fallback_index), "classify",
               batch_size=per_block)
    ds = add_stage(ds, functools.partial(PanopticMerge, cfg, vocab), "merge", cfg, actor=False, batch_size=per_block)
    ds = add_stage(ds, functools.partial(WritePanoptic, lc.out), "write", cfg, actor=False, batch_size=per_block)
    return ds.map_batches(select_columns, fn_kwargs={"keep": frozenset(RESULT_COLUMNS)}, batch_size=per_block)


def _read_manifest(out: str) -> dict | None:
    uri = io.join(out, MANIFEST)
    return io.read_json(uri) if io.exists(uri) else None


def run_label(cfg: JobConfig) -> dict[str, Any]:
    preflight(cfg, "label")  # model sections checked on the driver, before Ray starts
    from ragseg.runtime import init_ray
    from ragseg.sources import list_rows
    from ragseg.vocab import load_vocab

    lc = cfg.label
    for key in ("images", "vocab", "index"):
        if getattr(lc, key) is None:
            raise UserError(f"label needs label.{key} (config or --{key.replace('_', '-')})")
    vocab = load_vocab(lc.vocab, synonyms=lc.synonyms)
    meta = _check_index(cfg, lc.index)
    if lc.fallback_index:
        _check_index(cfg, lc.fallback_index)

    out = lc.out
    job_hash = cfg.hash("label", "models")
    manifest = _read_manifest(out)
    if manifest is not None and manifest.get("config_hash") != job_hash:
        raise UserError(
            f"{out} holds labels made with another config (hash {manifest.get('config_hash')} != {job_hash}); "
            "use a new --out, or the same config to resume"
        )
    manifest = manifest or {"format": 1, "config_hash": job_hash, "index_version": meta.get("version"),
                            "vocab": vocab.categories(), "shards": []}

    source_errors: list[dict] = []
    rows = list_rows(lc.images, errors=source_errors)
    covered = dblib.covered_image_ids(out, manifest)
    pending = [r for r in rows if str(r["image_id"]) not in covered]
    shards = make_shards(pending, lc.images_per_shard, start_index=len(manifest["shards"]))
    stats = RunStats(shards_skipped=len(manifest["shards"]))
    stats.errors += write_source_errors(out, source_errors)

    if shards:
        init_ray(cfg.ray)
        sizes = {name: len(chunk) for name, chunk in shards}
        inputs = {name: dblib.write_shard_inputs(out, name, chunk) for name, chunk in shards}
        todo = [{**r, "shard": name} for name, chunk in shards for r in chunk]
        collect_shards(build_graph(cfg, todo, vocab), sizes, RESULT_COLUMNS,
                       lambda name, rows: _write_shard(out, manifest, name, inputs[name], rows, vocab, stats),
                       stats, "label", cfg.ray.progress)

    assemble_panoptic_json(out, manifest, vocab)
    summary = {"out": out, "images_listed": len(rows), **stats.summary()}
    print_summary("label", summary, cfg.ray.progress)
    return summary


def _write_shard(out: str, manifest: dict, name: str, inputs: str, rows: list[dict], vocab,
                 stats: RunStats) -> None:
    from ragseg.masks import rle_bbox_xyxy

    id2name = {int(i): str(n) for i, n in zip(vocab.ids, vocab.names)}
    ok = sorted((r for r in rows if not r["error"]), key=lambda r: str(r["image_id"]))
    bad = [r for r in rows if r["error"]]
    anns, seg_rows = [], defaultdict(list)
    for r in ok:
        infos = json.loads(str(r["segments_info"]))
        anns.append({"image_id": str(r["image_id"]), "file_name": str(r["file_name"]), "uri": str(r["uri"]),
                     "height": int(r["height"]), "width": int(r["width"]),
                     "segments_info": [{k: v for k, v in s.items() if k not in ("mask_rle", "s_ret", "s_clip", "s_iv")}
                                       for s in infos]})
        for s in infos:
            seg_rows["image_id"].append(str(r["image_id"]))
            seg_rows["segment_id"].append(int(s["id"]))
            seg_rows["label"].append(id2name[int(s["category_id"])])
            seg_rows["category_id"].append(int(s["category_id"]))
            seg_rows["score"].append(float(s.get("score", np.nan)))
            for k in ("s_ret", "s_clip", "s_iv"):
                v = s.get(k)
                seg_rows[k].append(None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v))
            seg_rows["box"].append([float(x) for x in rle_bbox_xyxy(s["mask_rle"])])
            seg_rows["area"].append(int(s["area"]))
            seg_rows["mask_rle"].append(str(s["mask_rle"]))
    table = pa.table({f.name: pa.array(seg_rows.get(f.name, []), f.type) for f in SEGMENTS_SCHEMA},
                     schema=SEGMENTS_SCHEMA)
    io.write_parquet_atomic(io.join(out, "segments", f"{name}.parquet"), table)
    io.write_json_atomic(io.join(out, "parts", f"{name}.json"), {"annotations": anns})
    if bad:
        io.write_parquet_atomic(io.join(out, "errors", f"{name}.parquet"), failed_rows_table(bad))
    manifest["shards"].append({"name": name, "inputs": inputs, "images": len(rows),
                               "segments": table.num_rows, "errors": len(bad)})
    io.write_json_atomic(io.join(out, MANIFEST), manifest)
    stats.images += len(rows)
    stats.segments += table.num_rows
    stats.errors += len(bad)
    stats.empty += sum(1 for a in anns if not a["segments_info"])
    stats.shards_written += 1


def assemble_panoptic_json(out: str, manifest: dict, vocab) -> str:
    """OUT/panoptic.json from every recorded shard's part, in image-id order."""
    anns = []
    for s in manifest["shards"]:
        anns.extend(io.read_json(io.join(out, "parts", f"{s['name']}.json"))["annotations"])
    anns.sort(key=lambda a: a["image_id"])
    images = [{"id": a["image_id"], "file_name": a["uri"].rsplit("/", 1)[-1], "uri": a["uri"],
               "height": a["height"], "width": a["width"]} for a in anns]
    for a in anns:
        for k in ("height", "width", "uri"):
            a.pop(k, None)
    doc = {"info": {"description": "ragseg pseudo-labels"}, "images": images, "annotations": anns,
           "categories": vocab.categories()}
    uri = io.join(out, "panoptic.json")
    io.write_json_atomic(uri, doc)
    return uri
