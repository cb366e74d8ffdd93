"""label: unlabeled images -> proposals -> masked CLIP queries -> retrieval + CLIP ensemble ->
panoptic merge -> COCO panoptic PNGs + JSON and Parquet segments (layout in docs/interfaces.md).

Resumable like build-db: a worker writes each piece's PNGs, COCO part and Parquet segments, then its
commit record (:mod:`ragseg.ledger`); a rerun skips the images of committed pieces and recomputes the
rest, so nothing is duplicated. ``OUT/panoptic.json`` is streamed from the parts at the end
(:mod:`ragseg.labels_out`), only when asked or below ``label.panoptic_json_max_images``.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from ragseg import io, labels_out, ledger
from ragseg.config import JobConfig
from ragseg.errors import UserError, error_text, failed_rows_table
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
from ragseg.schema import MASK_TYPE, masks_to_arrow

# columns the piece writer reads (pixels are dropped before it)
RESULT_COLUMNS = ["image_id", "uri", "error", "coco_id", "file_name", "png_name", "height", "width", "segments_info"]

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
    pa.field("mask_rle", MASK_TYPE),  # pycocotools.mask.decode(row["mask_rle"]) (ragseg.schema.MASK_TYPE)
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
        out["png_name"] = names
        out["error"] = errors
        return out


def _png_bytes(img) -> bytes:
    import io as _io

    b = _io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def _check_index(cfg: JobConfig, index_uri: str) -> dict:
    """The index's meta (read without opening its FAISS files), after checking that its keys come from
    the embedder this run queries with (ragseg.identity: model, weights, mode, pooling size, dim),
    for every proposal method."""
    from ragseg import identity
    from ragseg.index.versions import read_meta

    meta = read_meta(index_uri)
    if cfg.label.proposals == "fcclip":
        from ragseg.stages.fcclip import check_index_identity

        check_index_identity(cfg, meta, index_uri)
        return meta
    identity.check(identity.index_identity(meta), identity.embed_identity(cfg), f"index {index_uri}")
    return meta


def adopt_index_embedder(cfg: JobConfig, index_uri: str) -> JobConfig:
    """The embedder identity fields of ``models.clip`` that the config leaves out, taken from the index
    (ragseg.identity.adopt_clip): a label config need not repeat how the DB was embedded."""
    from ragseg import identity
    from ragseg.index.versions import read_meta

    meta = read_meta(index_uri)
    return identity.adopt_clip(cfg, identity.index_clip(meta), identity.index_identity(meta).get("fcclip_input"))


def build_graph(cfg: JobConfig, ds, vocab):
    """The Ray Data graph over ``ds``, the pending image rows (a read task's pieces a block), as a list
    of stages (:mod:`ragseg.pipelines.graph`): decode, proposals, embed, classify, merge, write the
    panoptic PNGs; with ``label.proposals: fcclip`` FC-CLIP's whole test-time path (network, retrieval
    of every query, ensemble, filter, Mask2Former's panoptic inference) in one actor after its CPU
    resize: only the panoptic pixels and segments JSON leave it."""
    from ragseg.pipelines.graph import apply_stages, decode_stages, embed_stages, model, proposal_stages, task
    from ragseg.stages.classify import Classify
    from ragseg.stages.merge import PanopticMerge

    lc = cfg.label
    write = task("write", functools.partial(WritePanoptic, lc.out))
    if lc.proposals == "fcclip":
        from ragseg.stages.fcclip import FcclipLabel, FcclipPrep

        stages = [task("fcclip_prep", functools.partial(FcclipPrep, cfg)),
                  model("fcclip", functools.partial(FcclipLabel, cfg, vocab, lc.index, lc.fallback_index)), write]
    else:
        stages = [*proposal_stages(cfg, lc.proposals, detect_vocab=list(vocab.names)), *embed_stages(cfg),
                  model("classify", functools.partial(Classify, cfg, vocab, lc.index, lc.fallback_index), gpu=False),
                  task("merge", functools.partial(PanopticMerge, cfg, vocab)), write]
    ds = apply_stages(ds, cfg, [*decode_stages(cfg), *stages])
    return ds.map_batches(select_columns, fn_kwargs={"keep": frozenset(RESULT_COLUMNS)},
                          batch_size=cfg.ray.images_per_block)


class WriteLabelPiece:
    """Last stage of label, on a worker: writes one piece (this batch of images): its segments Parquet
    (with the per-source scores), its COCO panoptic part (JSON lines, one image a line) and its errors
    table, then its commit record (ragseg.ledger), and returns only the record to the driver. The
    panoptic PNGs were written per image by :class:`WritePanoptic` before."""

    def __init__(self, out: str, vocab, epoch: int = 0, retry: bool = False, provenance: bytes | None = None):
        self.out = out
        self.id2name = {int(i): str(n) for i, n in zip(vocab.ids, vocab.names)}
        self.epoch, self.retry = epoch, retry  # the job's lease epoch; a --retry-errors run
        self.provenance = provenance  # ragseg.provenance: JSON bytes for every file's schema metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        if n == 0:
            return empty_record_batch()
        ids = [str(v) for v in batch["image_id"]]
        errors = [str(e) if e else "" for e in batch["error"]]
        name = ledger.piece_name(ids, f"retry-{self.epoch}" if self.retry else "")
        paths = labels_out.piece_paths(name)
        lines, seg_rows, empty = [], defaultdict(list), 0
        for i in sorted((i for i in range(n) if not errors[i]), key=lambda i: ids[i]):
            infos = json.loads(str(batch["segments_info"][i]))
            empty += not infos
            lines.append(json.dumps({
                "image_id": ids[i], "id": _coco_id(batch, i, ids[i]), "png_name": str(batch["png_name"][i]),
                "file_name": _cell(batch, "file_name", i) or str(batch["uri"][i]).rsplit("/", 1)[-1],
                "uri": str(batch["uri"][i]),
                "height": int(batch["height"][i]), "width": int(batch["width"][i]),
                "segments_info": [{k: v for k, v in s.items() if k not in ("mask_rle", "s_ret", "s_clip", "s_iv")}
                                  for s in infos]}, sort_keys=True))
            for s in infos:
                x, y, w, h = (float(v) for v in s["bbox"])
                seg_rows["image_id"].append(ids[i])
                seg_rows["segment_id"].append(int(s["id"]))
                seg_rows["label"].append(self.id2name[int(s["category_id"])])
                seg_rows["category_id"].append(int(s["category_id"]))
                seg_rows["score"].append(_num(s.get("score")))
                for k in ("s_ret", "s_clip", "s_iv"):
                    seg_rows[k].append(_num(s.get(k)))
                seg_rows["box"].append([x, y, x + w, y + h])
                seg_rows["area"].append(int(s["area"]))
                seg_rows["mask_rle"].append(str(s["mask_rle"]))
        table = pa.table({f.name: masks_to_arrow(seg_rows.get(f.name, [])) if f.name == "mask_rle"
                          else pa.array(seg_rows.get(f.name, []), f.type) for f in SEGMENTS_SCHEMA},
                         schema=SEGMENTS_SCHEMA)
        io.write_parquet_atomic(io.join(self.out, paths["segments"]), attach(table, self.provenance))
        io.write_text_atomic(io.join(self.out, paths["parts"]), "".join(line + "\n" for line in lines))
        bad = [i for i in range(n) if errors[i]]
        if bad:
            rows = [{"uri": batch["uri"][i], "image_id": ids[i], "error": errors[i]} for i in bad]
            io.write_parquet_atomic(io.join(self.out, paths["errors"]), attach(failed_rows_table(rows), self.provenance))
        rec = ledger.new_record(name, sorted(ids), images=n, segments=table.num_rows, errors=len(bad),
                                empty_images=empty, data_path=paths["segments"],
                                errors_path=paths["errors"] if bad else None, parts_path=paths["parts"],
                                stage_seconds=stage_seconds(batch), epoch=self.epoch, retry=self.retry)
        ledger.write_commit(self.out, rec)
        return record_batch(rec)


def _cell(batch: dict[str, np.ndarray], col: str, i: int) -> str:
    v = batch[col][i] if col in batch else None
    return "" if v is None else str(v)


def _coco_id(batch: dict[str, np.ndarray], i: int, image_id: str):
    """The image's id as the source's ground-truth JSON has it (COCO numbers images), so COCO tools
    pair the labels with that ground truth; the string image id for sources without one."""
    raw = _cell(batch, "coco_id", i)
    return json.loads(raw) if raw else image_id


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


# label settings that do not change what is labelled (resuming with another value is fine)
_HASH_EXEMPT = ("out", "panoptic_json", "panoptic_json_max_images")


def label_hash(cfg: JobConfig) -> str:
    """Hash of everything that decides the labels (label section less :data:`_HASH_EXEMPT`, models)."""
    import hashlib

    data = cfg.model_dump(mode="json")
    label = {k: v for k, v in data["label"].items() if k not in _HASH_EXEMPT}
    # where weights come from (cache, mirror, offline) and checksum pins do not change the model
    models = {k: ({kk: vv for kk, vv in v.items() if kk != "sha256"} if isinstance(v, dict) else v)
              for k, v in data["models"].items() if k != "weights"}
    return hashlib.sha256(json.dumps({"label": label, "models": models}, sort_keys=True).encode()).hexdigest()[:16]


def run_label(cfg: JobConfig, execute: Executor | None = None, *, retry_errors: bool = False,
              errors_matching: str | None = None) -> dict[str, Any]:
    """label into ``cfg.label.out``; ``execute`` replaces the model graph (tests and benchmarks of the
    commit path, which then need no index). ``retry_errors``: re-process only the images whose latest
    outcome is an error row (matching ``errors_matching``, when given), :mod:`ragseg.pipelines.retry`."""
    if errors_matching and not retry_errors:
        raise UserError("--errors-matching selects which errors --retry-errors retries: give both")
    if execute is None and cfg.label.index:
        cfg = adopt_index_embedder(cfg, cfg.label.index)
    if execute is None:
        preflight(cfg, "label")  # model sections checked on the driver, before Ray starts
    from ragseg.vocab import load_vocab

    lc = cfg.label
    # scores=clip (FC-CLIP alone with fcclip proposals) reads no index
    need_index = execute is None and lc.ensemble.scores != "clip"
    for key in ("images", "vocab", "index") if need_index else ("images", "vocab"):
        if getattr(lc, key) is None:
            raise UserError(f"label needs label.{key} (config or --{key.replace('_', '-')})")
    vocab = load_vocab(lc.vocab, synonyms=lc.synonyms)
    meta = _check_index(cfg, lc.index) if execute is None and lc.index else {}
    if lc.fallback_index and execute is None:
        _check_index(cfg, lc.fallback_index)

    from ragseg import provenance

    out = lc.out
    job_hash = label_hash(cfg)
    prov = provenance.job_provenance(
        cfg, "label", vocabulary=vocab.categories(),
        index={"uri": lc.index, "version": meta.get("version")} if lc.index else None,
        fallback_index={"uri": lc.fallback_index} if lc.fallback_index else None)
    with ledger.Lease(out, cfg.commit.lease_ttl_s, "label") as lease:
        io.remove_tmp_litter(out)
        clear_listings(out)
        def check(header: dict) -> None:
            if header.get("config_hash") != job_hash:
                raise UserError(
                    f"{out} holds labels made with another config (hash {header.get('config_hash')} != "
                    f"{job_hash}); use a new --out, or the same config to resume")

        c = cfg.commit
        led, header, comp = ledger.open_for_writing(
            out, labels_out.KIND, c.compact_every, c.compact_seconds, c.max_segments,
            lambda: ledger.new_header(labels_out.KIND, config_hash=job_hash, index_version=meta.get("version"),
                                      vocab=vocab.categories(), provenance=prov), check, lease=lease)

        source_errors: list[dict] = []
        pending, n_listed = pending_source(out, lc.images, led, lc.images_per_shard, source_errors, retry_errors,
                                           errors_matching, ray_cfg=cfg.ray if execute is None else None)
        stats = RunStats(shards_skipped=led.records.num_rows if led is not None else 0)
        del led  # the committed ids were only needed to filter the listing
        stats.errors += write_source_errors(out, source_errors, provenance.to_bytes(prov))

        n_pending = pending.num_rows
        if n_pending:
            execute = execute or ray_executor(functools.partial(build_graph, cfg, vocab=vocab), out)
            records = execute(cfg, pending, functools.partial(WriteLabelPiece, out, vocab, lease.epoch, retry_errors,
                                                              provenance.to_bytes(prov)),
                              lc.images_per_shard)
            del pending  # the executor's now (the Ray one writes the rows out and drops them)
            drain_records(records, comp, stats, n_pending, "label", cfg.ray.progress,
                          pieces=-(-n_pending // lc.images_per_shard), interval=cfg.ray.progress_interval_s)

        comp.check()  # panoptic.json belongs to whoever holds the folder now
        pj = labels_out.maybe_write_panoptic_json(out, header, vocab.categories(), lc.panoptic_json,
                                                  lc.panoptic_json_max_images, changed=stats.shards_written > 0,
                                                  info={"provenance": header.get("provenance") or prov})
        run_info = {"listed": n_listed, "summary": stats.summary(), "panoptic_json": pj}
        if retry_errors:
            run_info["retry_errors"] = {"errors_matching": errors_matching}
        ledger.add_run(out, header, run_info)
        comp.write_header()
    summary = {"out": out, "images_listed": n_listed, "panoptic_json": pj, **stats.summary()}
    print_summary("label", summary, cfg.ray.progress)
    return summary
