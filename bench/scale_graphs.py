"""bench/scale.py, driver figures on the jobs' real Ray Data graphs (one fresh driver process each).

``child_graph`` runs ``run_build_db`` or ``run_label`` through ``ray_executor`` with exactly the graph
the job's ``build_graph`` builds (build-db ``masks: detector``: decode, detect, segment, embed, select,
piece writer; label ``proposals: gdino-sam``: decode, detect, segment, embed, classify, merge, PNG
writer, select, piece writer), on real JPEG files. The model stages' classes are replaced, in this
driver before the graph is built, by the stand-ins of ``ragseg.testing.generated`` (same
constructor arguments and output columns, results generated from the image id, at a set pace or as
fast as the CPUs allow); everything else is the production code: DecodeImages decodes, PanopticMerge
paints, WritePanoptic writes PNGs, the piece writers write and commit. Measured: the driver's CPU
from the executor's start to the last record drained (its threads, not the Ray workers), the job's
wall time, and the driver's peak RSS (VmHWM reset after Ray's start-up), with ``label.panoptic_json``
as configured (the default ``auto`` writes OUT/panoptic.json after the drain).

``child_json`` times the assembly of the panoptic JSON alone, on a label folder of N images written
straight (parts + ledger, as the piece writers leave them): peak RSS and seconds of
``maybe_write_panoptic_json`` at 10k .. 1M images.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time

import scalelib

VOCAB = [{"name": "wall", "isthing": False}, {"name": "person", "isthing": True}, {"name": "car", "isthing": True}]


def patch_models(spec) -> None:
    """Make the jobs' graphs build the stand-ins instead of the model stages (this process only: the
    graph pickles a reference to the stand-in class, which the Ray workers import)."""
    import ragseg.stages.classify as classify
    import ragseg.stages.decode as decode
    import ragseg.stages.detect as detect
    import ragseg.stages.embed as embed
    import ragseg.stages.segment as segment
    from ragseg.testing import generated as g

    detect.Detect = functools.partial(g.StandInDetect, spec)
    segment.Segment = functools.partial(g.StandInSegment, spec)
    segment.SamGrid = functools.partial(g.StandInSegment, spec)
    decode.LoadGroundTruth = functools.partial(g.StandInSegment, spec)
    embed.Embed = functools.partial(g.StandInEmbed, spec)
    classify.Classify = functools.partial(g.StandInClassify, spec)


def _record_stages(module, sink: list) -> None:
    """Note each stage the graph adds (name, task or actor pool, batch size) as build_graph adds it."""
    real = module.add_stage

    def add_stage(ds, factory, name, cfg, *, actor, batch_size, **kw):
        sink.append({"stage": name, "kind": "actor pool" if actor else "task", "batch_size": batch_size})
        return real(ds, factory, name, cfg, actor=actor, batch_size=batch_size, **kw)

    module.add_stage = add_stage


def child_graph(a) -> dict:
    from ragseg.config import load_config
    from ragseg.pipelines import common
    from ragseg.runtime import init_ray
    from ragseg.testing.generated import StandInSpec

    kind = a._graph
    work = tempfile.mkdtemp(prefix=f"bench-scale-{kind}-", dir=a.workdir)
    try:
        imgs = scalelib.graph_images(a, work)
        out = os.path.join(work, "out")
        spec = StandInSpec(segments=a.segments_per_image, mask_pool=a.mask_pool, dim=768,
                           images_per_s=a.stand_in_rate or None)
        patch_models(spec)
        common_over = [*scalelib.ray_overrides(a.images_per_block), f"ray.model_actors={a.model_actors}",
                       f"ray.scheduler_wait_s={a.scheduler_wait}",
                       f"ray.cpus_per_actor={a.cpus_per_actor}"]
        stages: list = []
        if kind == "build-db":
            from ragseg.pipelines import build_db as job

            cfg = load_config(None, ["source.kind=folder", f"source.uri={imgs}", f"build_db.out={out}",
                                     "build_db.masks=detector", f"build_db.images_per_shard={a.piece_images}",
                                     *common_over])
            graph = functools.partial(job.build_graph, cfg)
        else:
            from ragseg.pipelines import label as job
            from ragseg.vocab import load_vocab

            vocab_p = os.path.join(work, "vocab.json")
            with open(vocab_p, "w") as f:
                json.dump(VOCAB, f)
            cfg = load_config(None, ["label.images.kind=folder", f"label.images.uri={imgs}", f"label.vocab={vocab_p}",
                                     f"label.out={out}", f"label.images_per_shard={a.piece_images}",
                                     "label.proposals=gdino-sam", f"label.panoptic_json={a.panoptic_json}",
                                     *common_over])
            graph = functools.partial(job.build_graph, cfg, vocab=load_vocab(vocab_p))
        _record_stages(common, stages)
        init_ray(cfg.ray)  # Ray's start-up is not part of the job
        import psutil

        rss0 = psutil.Process().memory_info().rss
        hwm = scalelib.reset_peak_rss()
        sink: dict = {}
        execute = scalelib.measured(common.ray_executor(graph, out), sink)
        load0 = scalelib.load()
        c0, w0 = scalelib.cpu(), time.perf_counter()
        with scalelib.RssSampler() as smp:
            s = (job.run_build_db if kind == "build-db" else job.run_label)(cfg, execute=execute)
        job_cpu, job_wall = scalelib.cpu() - c0, time.perf_counter() - w0
        images, pieces = s["images"], s["shards_written"]
        proposals = images * a.segments_per_image
        dc = sink["drain_cpu_s"]
        peak = scalelib.peak_rss_kb() / 1024 if hwm else None
        return {
            "graph": kind, "stages": stages, "images": images, "pieces": pieces,
            "segments_per_image": a.segments_per_image, "proposal_segments": proposals,
            "committed_segments": s["segments"], "panoptic_json": s.get("panoptic_json"),
            "driver_cpu_s_drain": round(dc, 3), "drain_wall_s": round(sink["drain_wall_s"], 2),
            "driver_cpu_share_of_one_core": round(dc / max(sink["drain_wall_s"], 1e-9), 4),
            "driver_cpu_s_drain_by_thread": sink["drain_cpu_s_by_thread"],
            "driver_cpu_ms_per_piece": round(dc / max(pieces, 1) * 1e3, 3),
            "driver_cpu_s_per_1m_segments": round(dc / max(proposals, 1) * 1e6, 3),
            "segments_per_s": round(proposals / max(sink["drain_wall_s"], 1e-9), 1),
            "driver_cpu_s_job": round(job_cpu, 3), "job_wall_s": round(job_wall, 2),
            "rss_before_job_mb": round(rss0 / 2**20, 1),
            "peak_rss_mb": round(peak, 1) if peak else None,
            "peak_rss_sampled_mb": round(smp.peak / 2**20, 1),
            "loadavg_start": load0, "loadavg_end": scalelib.load()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The panoptic JSON alone, at 10k .. 1M images
# ----------------------------------------------------------------------------------------------
def write_label_folder(out: str, images: int, per_piece: int, segments: int) -> None:
    """A label output of ``images`` images as the piece writers leave it: a part (one JSON line per
    image, ``segments`` segments each) and a commit record per piece, compacted 1000 records a segment."""
    from ragseg import io, labels_out, ledger

    header = ledger.new_header(labels_out.KIND, vocab=[{"id": i + 1, **c} for i, c in enumerate(VOCAB)])
    ledger.write_header(out, header)
    comp = ledger.Compactor(out, header, every=1000, seconds=float("inf"))
    segs = [{"id": j + 1, "category_id": 1 + j % 3, "area": 100 + j, "bbox": [j, j, 10, 12], "iscrowd": 0,
             "score": 0.5} for j in range(segments)]
    for p in range(0, images, per_piece):
        ids = [f"{i // 1000:05d}/im{i:08d}" for i in range(p, min(images, p + per_piece))]
        name = ledger.piece_name(ids)
        paths = labels_out.piece_paths(name)
        lines = "".join(json.dumps({"image_id": i, "id": i, "png_name": i.replace("/", "_") + ".png",
                                    "file_name": i + ".jpg", "uri": f"s3://bucket/{i}.jpg", "height": 480,
                                    "width": 640, "segments_info": segs}, sort_keys=True) + "\n" for i in ids)
        io.write_text_atomic(io.join(out, paths["parts"]), lines)
        rec = ledger.new_record(name, ids, images=len(ids), segments=len(ids) * segments, errors=0,
                                empty_images=0, data_path=paths["segments"], errors_path=None,
                                parts_path=paths["parts"], stage_seconds={})
        comp.pending.append(rec)  # compacted without commit objects (the records as a run leaves them)
        if len(comp.pending) >= comp.every:
            comp._write(comp.pending, [])
            comp.pending = []
    comp.flush()
    ledger.write_header(out, header)


def child_json(a) -> dict:
    from ragseg import labels_out, ledger

    work = tempfile.mkdtemp(prefix="bench-scale-json-", dir=a.workdir)
    try:
        out = os.path.join(work, "labels")
        t0 = time.perf_counter()
        write_label_folder(out, a._n, a.piece_images, a.json_segments)
        prep = time.perf_counter() - t0
        header = ledger.read_header(out, labels_out.KIND)
        import psutil

        rss0 = psutil.Process().memory_info().rss
        hwm = scalelib.reset_peak_rss()
        c0, w0 = scalelib.cpu(), time.perf_counter()
        with scalelib.RssSampler() as smp:
            res = labels_out.maybe_write_panoptic_json(out, header, header["vocab"], "auto", a.json_max_images,
                                                       changed=True)
        wall, cpu_s = time.perf_counter() - w0, scalelib.cpu() - c0
        split = os.path.join(out, labels_out.PANOPTIC_PARTS_DIR)
        files = [os.path.join(out, labels_out.PANOPTIC_JSON)] + (
            [os.path.join(split, f) for f in os.listdir(split)] if os.path.isdir(split) else [])
        size = sum(os.path.getsize(f) for f in files if os.path.exists(f))
        return {"images": a._n, "segments_per_image": a.json_segments, "max_images_per_file": a.json_max_images,
                "layout": res.get("layout"), "files": res.get("files", 1), "json_bytes": size,
                "prep_s": round(prep, 1), "seconds": round(wall, 2), "cpu_s": round(cpu_s, 2),
                "images_per_s": round(a._n / max(wall, 1e-9), 1),
                "rss_before_mb": round(rss0 / 2**20, 1),
                "peak_rss_mb": round(scalelib.peak_rss_kb() / 1024, 1) if hwm else None,
                "peak_rss_sampled_mb": round(smp.peak / 2**20, 1), "loadavg": scalelib.load()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
