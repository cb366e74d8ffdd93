"""Per-stage throughput: images/s and segments/s of each model stage alone, over a batch-size sweep.

    python bench/stages.py                 # tiny models (configs/test-tiny.yaml) on cuda if present else cpu
    python bench/stages.py --full          # full-size architectures, random weights (for a GPU machine):
                                           # CLIP convnext_large_d_320, SAM ViT-H sizes, Grounding DINO base
    python bench/stages.py --device cpu --batch-sizes 1,8 --images 32 --stages embed-pool,segment

Stages: ``embed-crop`` and ``embed-pool`` (ragseg.stages.embed.Embed, ``segments`` masks per image),
``detect`` (ragseg.stages.detect.Detect, prompted with ``--classes`` class names; its segments are the
boxes it returns), ``segment`` (ragseg.stages.segment.Segment on ``segments`` random boxes per image) and
``fcclip`` (ragseg.stages.fcclip.FcclipLabel over the class names: FC-CLIP's test input (shorter side
``models.fcclip.min_size_test``, 800 with --full), trunk + pixel decoder + masked decoder, pooling of
every query, ensemble, filter, Mask2Former's panoptic inference; ``label.ensemble.scores=clip``, so no
index search; its segments are the panoptic segments; ``bytes_in/out_per_image`` is what crosses the
stage).
``peak_rss_mb`` is the process's peak resident memory so far.
Inputs are synthetic (smooth random images, random rectangle/ellipse masks) so no data is needed; weights
are random, so the numbers measure compute, not quality (Detect's box count depends on its thresholds:
the tiny config keeps every box up to ``max_boxes``; --full uses ``box_threshold: 0`` too).

Each stage is built once (``load_s``: 0 when its model was already loaded in this process), warmed up on one batch, then timed over ``--images`` images per
batch size; CUDA is synchronised before every clock read. ``cpu_seconds`` (process CPU time) and
``loadavg_1m`` are recorded too: on a shared CPU machine wall-clock rates depend on the other load.
``peak_rss_mb`` is the process's peak RSS so far (run one stage per process for a per-stage figure).
Prints one JSON object per benchmark and writes
``bench/results/stages.json`` (``stages-full-<device>.json`` with --full) naming the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_STAGES = ("embed-crop", "embed-pool", "detect", "segment", "fcclip")
CLASSES = ["person", "dog", "cat", "car", "tree", "building", "sky", "road"]

# the full-size architectures, random weights (no checkpoint download)
FULL_OVERRIDES = [
    "models.clip.model=convnext_large_d_320",
    "models.clip.pretrained=null",
    "models.clip.model_cfg=null",
    "models.clip.batch_size=32",
    # SAM ViT-H sizes through the custom builder (arch vit_h needs a checkpoint)
    "models.sam.arch=custom",
    "models.sam.checkpoint=null",
    "models.sam.image_size=1024",
    "models.sam.encoder_embed_dim=1280",
    "models.sam.encoder_depth=32",
    "models.sam.encoder_num_heads=16",
    "models.sam.encoder_global_attn_indexes=[7,15,23,31]",
    "models.sam.prompt_embed_dim=256",
    "models.sam.boxes_per_batch=64",
    # Grounding DINO base sizes (Swin-B 384, BERT-base; the tiny word-piece vocabulary stands in for BERT's)
    "models.gdino.model_id=null",
    "models.gdino.box_threshold=0.0",
    "models.gdino.text_threshold=0.0",
    "models.gdino.max_boxes=100",
    "models.gdino.batch_size=4",
    "models.gdino.tiny={d_model: 256, encoder_layers: 6, decoder_layers: 6, encoder_ffn_dim: 2048, "
    "decoder_ffn_dim: 2048, encoder_attention_heads: 8, decoder_attention_heads: 8, encoder_n_points: 4, "
    "decoder_n_points: 4, num_queries: 900, image_size: 800, max_image_size: 1333, "
    "backbone: {image_size: 384, embed_dim: 128, depths: [2, 2, 18, 2], num_heads: [4, 8, 16, 32], "
    "window_size: 12}, text: {hidden_size: 768, num_hidden_layers: 12, num_attention_heads: 12, "
    "intermediate_size: 3072, max_position_embeddings: 512}}",
]


# ----------------------------------------------------------------------------------------------
# Synthetic inputs
# ----------------------------------------------------------------------------------------------
def make_image(rs: np.random.RandomState, hw: tuple[int, int]) -> np.ndarray:
    """A smooth random image (upsampled noise), HxWx3 uint8."""
    h, w = hw
    small = rs.randint(0, 256, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    ys = np.linspace(0, small.shape[0] - 1, h).astype(int)
    xs = np.linspace(0, small.shape[1] - 1, w).astype(int)
    img = small[ys][:, xs] + rs.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_boxes(rs: np.random.RandomState, hw: tuple[int, int], n: int) -> np.ndarray:
    h, w = hw
    x0 = rs.uniform(0, w * 0.7, n)
    y0 = rs.uniform(0, h * 0.7, n)
    bw = rs.uniform(w * 0.1, w * 0.3, n)
    bh = rs.uniform(h * 0.1, h * 0.3, n)
    return np.stack([x0, y0, np.minimum(w - 1, x0 + bw), np.minimum(h - 1, y0 + bh)], 1).astype(np.float32)


def make_masks(rs: np.random.RandomState, hw: tuple[int, int], n: int) -> np.ndarray:
    """n masks: ellipses inscribed in random boxes."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w), bool)
    for i, (x0, y0, x1, y1) in enumerate(make_boxes(rs, hw, n)):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max(1.0, (x1 - x0) / 2), max(1.0, (y1 - y0) / 2)
        out[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return out


def object_column(values: list) -> np.ndarray:
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def make_batch(stage: str, n: int, hw: tuple[int, int], segments: int, seed: int) -> tuple[dict, int]:
    """A batch of n synthetic rows for ``stage`` and the number of segments it carries."""
    from ragseg.masks import encode_rle

    rs = np.random.RandomState(seed)
    images = [make_image(rs, hw) for _ in range(n)]
    batch: dict = {"image": object_column(images), "error": np.array([""] * n, dtype=object)}
    segs = 0
    if stage.startswith("embed"):
        batch["seg_masks_rle"] = object_column([[encode_rle(m) for m in make_masks(rs, hw, segments)]
                                                for _ in range(n)])
        segs = n * segments
    elif stage == "detect":
        batch["labels"] = object_column([list(CLASSES) for _ in range(n)])
    elif stage == "segment":
        boxes = [make_boxes(rs, hw, segments) for _ in range(n)]
        batch["boxes"] = object_column(boxes)
        batch["box_labels"] = object_column([["object"] * segments for _ in range(n)])
        batch["box_scores"] = object_column([np.ones(segments, np.float32) for _ in range(n)])
        segs = n * segments
    return batch, segs


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def build_stage(stage: str, cfg):
    """-> (callable, model id) or raises ImportError when the stage's module is not there."""
    if stage.startswith("embed"):
        from ragseg.stages.embed import Embed

        mode = stage.split("-", 1)[1]
        c = cfg.model_copy(deep=True)
        c.models.clip.mode = mode
        e = Embed(c)
        return e, f"{e.model_id} ({mode})"
    if stage == "detect":
        from ragseg.stages.detect import Detect

        d = Detect(cfg)
        return d, getattr(d, "model_id", "gdino")
    if stage == "segment":
        from ragseg.models.sam import model_id
        from ragseg.stages.segment import Segment

        return Segment(cfg), model_id(cfg.models.sam)
    if stage == "fcclip":
        from ragseg.stages.fcclip import FcclipLabel
        from ragseg.vocab import Vocab

        c = cfg.model_copy(deep=True)
        c.label.ensemble.scores = "clip"  # no index: the FAISS search of ~250 queries is the index bench's
        f = FcclipLabel(c, Vocab.from_names(list(CLASSES)))
        fc = c.models.fcclip
        return f, f"fcclip q{fc.num_queries} on {f.model_id} @{fc.min_size_test}/{fc.max_size_test}"
    raise ValueError(stage)


def count_segments(stage: str, out: dict, given: int) -> int:
    if stage == "detect":
        return int(sum(len(b) for b in out["boxes"]))
    if stage == "fcclip":
        return int(sum(len(json.loads(s)) for s in out["segments_info"]))
    return given


def stage_bytes(stage: str, batch: dict, out: dict) -> dict:
    """Bytes per image that cross into and out of the stage (the fcclip stage's object-store traffic:
    the decoded image in, the panoptic pixels and the segments' JSON out)."""
    if stage != "fcclip":
        return {}
    n = len(batch["image"])
    b_in = sum(np.asarray(x).nbytes for x in batch["image"])
    b_out = sum(np.asarray(p).nbytes + len(s) for p, s in zip(out["panoptic_png"], out["segments_info"]))
    return {"bytes_in_per_image": int(b_in / n), "bytes_out_per_image": int(b_out / n)}


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB): one stage per process gives its own."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_stage(stage: str, cfg, args, device: str, meta: dict) -> list[dict]:
    t0 = time.perf_counter()
    try:
        fn, model_id = build_stage(stage, cfg)
    except ImportError as e:
        return [{"bench": "stage", "stage": stage, "skipped": f"stage module not available: {e}"}]
    sync(device)
    load_s = time.perf_counter() - t0
    results = time_stage(fn, stage, model_id, args, device, meta, load_s)
    del fn
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return results


def time_stage(fn, stage: str, model_id: str, args, device: str, meta: dict, load_s: float) -> list[dict]:
    """Warm up on one batch, then time ``args.images`` images per batch size in ``args.batch_sizes``."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    hw = (args.height, args.width)
    results = []
    for bs in args.batch_sizes:
        warm, _ = make_batch(stage, min(bs, args.images), hw, args.segments, seed=1000 + bs)
        out = fn(warm)
        errs = [e for e in out["error"] if e]
        if errs:
            results.append({"bench": "stage", "stage": stage, "batch_size": bs, "failed": errs[0]})
            continue
        batches = []
        left, k = args.images, 0
        while left > 0:
            b, s = make_batch(stage, min(bs, left), hw, args.segments, seed=k)
            batches.append((b, s))
            left -= min(bs, left)
            k += 1
        segs = 0
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        for b, s in batches:
            out = fn(b)
            segs += count_segments(stage, out, s)
        traffic = stage_bytes(stage, batches[-1][0], out)
        sync(device)
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        r = {
            "bench": "stage", "stage": stage, "model": model_id, **meta, "batch_size": bs,
            "images": args.images, "segments": segs, "image_hw": list(hw), "seconds": round(dt, 4),
            "images_per_s": round(args.images / dt, 3), "segments_per_s": round(segs / dt, 3),
            "load_s": round(load_s, 2), "cpu_seconds": round(cpu, 4),
            "loadavg_1m": round(os.getloadavg()[0], 2), "peak_rss_mb": peak_rss_mb(), **traffic,
        }
        if device == "cuda":
            import torch

            r["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="full-size architectures (random weights)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    ap.add_argument("--config", default=str(ROOT / "configs" / "test-tiny.yaml"))
    ap.add_argument("--stages", default=",".join(ALL_STAGES))
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 1,4,8)")
    ap.add_argument("--images", type=int, default=None, help="images timed per batch size")
    ap.add_argument("--segments", type=int, default=None, help="masks / boxes per image")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--pool-image-size", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from ragseg.config import load_config
    from ragseg.runtime import select_device

    full = args.full
    args.batch_sizes = [int(x) for x in (args.batch_sizes or "1,4,8").split(",")]
    args.images = args.images or (16 if full else 8)
    args.segments = args.segments or (16 if full else 8)
    args.height = args.height or (480 if full else 96)
    args.width = args.width or (640 if full else 128)
    overrides = list(FULL_OVERRIDES) if full else []
    overrides += [f"models.device.device={args.device}", f"models.device.precision={args.precision}"]
    if args.pool_image_size:
        overrides.append(f"models.clip.pool_image_size={args.pool_image_size}")
    cfg = load_config(None if full else args.config, overrides)
    device = select_device(cfg.models.device)
    meta = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor()
                                                                               or platform.machine()),
        "config": "full-random" if full else Path(args.config).stem,
        "precision": args.precision,
        "torch_threads": torch.get_num_threads(),
    }
    results, skipped = [], []
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        if stage not in ALL_STAGES:
            ap.error(f"unknown stage {stage!r} (one of {', '.join(ALL_STAGES)})")
        for r in run_stage(stage, cfg, args, device, meta):
            if "skipped" in r or "failed" in r:
                print(json.dumps(r), flush=True)
                skipped.append(r)
            else:
                results.append(r)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"stages-full-{device}.json" if full else "stages.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": "stages", **meta, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()},
        "results": results, "skipped": skipped,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
