"""Per-stage throughput: images/s and segments/s of each model stage alone, over a batch-size sweep.

    python bench/stages.py                 # tiny models (configs/test-tiny.yaml) on cuda if present else cpu
    python bench/stages.py --full          # full-size architectures, random weights (for a GPU machine):
                                           # CLIP convnext_large_d_320, SAM ViT-H sizes, Grounding DINO base
    python bench/stages.py --device cpu --batch-sizes 1,8 --images 32 --stages embed-pool,segment
    python bench/stages.py --flops         # FLOPs per image of every stage at full size (meta tensors)
                                           # -> bench/results/flops.json (no timing, a few seconds)
    python bench/stages.py --sam-batching  # SAM ViT-H and SAM 2.1 hiera-t, random weights, 1024 px: images/s
                                           # with the batch in one encoder pass vs one image per pass

Stages: ``embed-crop`` and ``embed-pool`` (ragseg.stages.embed.Embed, ``segments`` masks per image),
``detect`` (ragseg.stages.detect.Detect, prompted with ``--classes`` class names; its segments are the
boxes it returns), ``segment`` (ragseg.stages.segment.Segment on ``segments`` random boxes per image, the
batch's images in ``models.sam.encoder_batch``-image encoder passes), ``segment-sam2`` (the same with
SAM 2.1, ``models.sam.family: sam2``; hiera-l at full size) and
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
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

ALL_STAGES = ("embed-crop", "embed-pool", "detect", "segment", "segment-sam2", "fcclip")
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
    "models.sam.encoder_batch=4",
    # SAM 2.1 hiera-l through the package config, random weights (segment-sam2)
    "models.sam.sam2.arch=hiera_l",
    "models.sam.sam2.random_weights=true",
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
    elif stage.startswith("segment"):
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
    if stage == "segment-sam2":
        from ragseg.models.sam import mask_model_id
        from ragseg.stages.segment import Segment

        c = cfg.model_copy(deep=True)
        c.models.sam.family = "sam2"
        return Segment(c), mask_model_id(c.models.sam)
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


# ----------------------------------------------------------------------------------------------
# FLOP accounting (torch.utils.flop_counter.FlopCounterMode: matmuls and convolutions, 2 FLOPs per
# multiply-add; element-wise ops, softmax, interpolation and grid_sample are not counted)
# ----------------------------------------------------------------------------------------------
PEAK_FLOPS = 989e12  # H100 / H200 SXM: dense BF16 tensor-core peak
UTILISATION = 0.40  # the estimate's assumed share of that peak
OPEN_IMAGES = 1_900_000  # Open Images V7 train images to build a DB from
PROJECTION_GPUS = 8
FLOP_IMAGE_HW = (480, 640)  # a 4:3 image, as the timing runs use
FLOP_BOXES = 16  # box prompts (masks) per image, as the timing runs use
GDINO_TOKENS = 18  # "person . dog . cat . car . tree . building . sky . road ." with [CLS] / [SEP] (BERT)
FCCLIP_HW = (800, 1088)  # FC-CLIP's test size (shorter side 800) = the trunk input of the pool embeddings
FCCLIP_CLASSES = 150  # ADE20k's vocabulary
POOL_SIDE = 1088  # models.clip.pool_image_size of configs/ade20k.yaml (the pool embeddings' longer side)


def count_flops(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _meta(*shape, dtype=None):
    import torch

    return torch.zeros(*shape, device="meta", dtype=dtype or torch.float32)


def flops_detect() -> dict:
    """Grounding DINO base (Swin-B 384, BERT-base, 900 queries) at the processor's size for a 480x640
    image (shortest edge 800), one 8-class prompt. On meta tensors; transformers' value checks of the
    deformable attention are skipped (they read tensor data). Its grid_sample is not counted."""
    from unittest import mock

    import torch
    import transformers.models.grounding_dino.modeling_grounding_dino as gm
    from transformers import GroundingDinoForObjectDetection, GroundingDinoImageProcessor

    from ragseg.models.gdino import base_config

    proc = GroundingDinoImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333})
    hw = tuple(proc(images=[np.zeros((*FLOP_IMAGE_HW, 3), np.uint8)], return_tensors="pt")["pixel_values"].shape[-2:])
    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(base_config())
    model.to("meta").eval()  # a few parameters are made with the legacy constructor (CPU)
    ids = torch.zeros(1, GDINO_TOKENS, dtype=torch.long, device="meta")
    with mock.patch.object(gm, "torch_compilable_check", lambda *a, **k: None):
        f = count_flops(lambda: model(pixel_values=_meta(1, 3, *hw), pixel_mask=_meta(1, *hw, dtype=torch.long),
                                      input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=ids))
    return {"stage": "detect", "model": "Grounding DINO base (Swin-B 384, BERT-base)",
            "input": f"{hw[0]}x{hw[1]}, {GDINO_TOKENS} text tokens", "flops_per_image": f, "counted_on": "meta"}


def flops_sam() -> dict:
    """SAM ViT-H: the image encoder at 1024x1024 + prompt encoder and mask decoder for FLOP_BOXES boxes."""
    import torch

    from ragseg.models.sam import OFFICIAL, build_sam_arch

    with torch.device("meta"):
        sam = build_sam_arch(*OFFICIAL["vit_h"])
    enc = count_flops(lambda: sam.image_encoder(_meta(1, 3, 1024, 1024)))

    def decode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=_meta(FLOP_BOXES, 4), masks=None)
        sam.mask_decoder(image_embeddings=_meta(1, 256, 64, 64), image_pe=sam.prompt_encoder.get_dense_pe(),
                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)

    dec = count_flops(decode)
    return {"stage": "segment", "model": "SAM ViT-H (segment_anything)", "input": f"1024x1024, {FLOP_BOXES} boxes",
            "flops_per_image": enc + dec, "parts": {"image_encoder": enc, "prompts_per_box": dec // FLOP_BOXES},
            "counted_on": "meta"}


def flops_sam2(arch: str) -> dict:
    """SAM 2.1 ``arch``: Hiera + FPN at 1024x1024 (``forward_image``) + prompt encoder and mask decoder
    (high-resolution features) for FLOP_BOXES boxes. Built on the CPU (Hiera's constructor reads a
    tensor value), then moved to meta for the count."""
    import torch
    from sam2.build_sam import build_sam2

    from ragseg.config import Sam2Config
    from ragseg.models.sam import SAM2_CONFIG_FILES, sam2_overrides

    model = build_sam2(SAM2_CONFIG_FILES[arch], None, device="cpu", mode="eval",
                       hydra_overrides_extra=sam2_overrides(Sam2Config(arch=arch))).to("meta")
    enc = count_flops(lambda: model.forward_image(_meta(1, 3, 1024, 1024)))
    d = model.sam_prompt_encoder.embed_dim

    def decode():
        pts = (_meta(FLOP_BOXES, 2, 2), torch.zeros(FLOP_BOXES, 2, dtype=torch.int, device="meta"))
        sparse, dense = model.sam_prompt_encoder(points=pts, boxes=None, masks=None)
        model.sam_mask_decoder(image_embeddings=_meta(1, d, 64, 64), image_pe=model.sam_prompt_encoder.get_dense_pe(),
                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                               multimask_output=False, repeat_image=True,
                               high_res_features=[_meta(1, d // 8, 256, 256), _meta(1, d // 4, 128, 128)])

    dec = count_flops(decode)
    return {"stage": f"segment-sam2-{arch}", "model": f"SAM 2.1 {arch} (sam2)", "input": f"1024x1024, {FLOP_BOXES} boxes",
            "flops_per_image": enc + dec, "parts": {"image_encoder": enc, "prompts_per_box": dec // FLOP_BOXES},
            "counted_on": "meta (built on the CPU)"}


def _mask_pool(dense, n: int):
    """ragseg.models.clip.mask_pool's matmul (its autocast guard has no meta device): (n, cells) weights
    times the (C, cells) map."""
    return _meta(n, dense.shape[-2] * dense.shape[-1]) @ dense.flatten(1).T


def _clip_meta():
    import open_clip
    import torch

    with torch.device("meta"):
        return open_clip.create_model("convnext_large_d_320", pretrained=None, device="meta").eval()


def flops_embed_pool(clip) -> dict:
    """ConvNeXt-L d-320 dense trunk at the pooling input of a FLOP_IMAGE_HW image with
    ``pool_image_size`` POOL_SIDE (configs/ade20k.yaml), FLOP_BOXES masks pooled, the CLIP head on each."""
    from ragseg.models.clip import dense_features, pool_input_shape, pooled_to_embedding

    v = clip.visual
    hw = pool_input_shape(FLOP_IMAGE_HW, POOL_SIDE)

    def run():
        dense = dense_features(v, _meta(1, 3, *hw))[0]
        pooled_to_embedding(v, _mask_pool(dense, FLOP_BOXES))

    return {"stage": "embed-pool", "model": "CLIP ConvNeXt-L d-320 mask pooling",
            "input": f"{hw[0]}x{hw[1]}, {FLOP_BOXES} masks", "flops_per_image": count_flops(run),
            "counted_on": "meta"}


def flops_embed_crop(clip) -> dict:
    """ConvNeXt-L d-320 ``encode_image`` on FLOP_BOXES masked crops at 320 px."""
    return {"stage": "embed-crop", "model": "CLIP ConvNeXt-L d-320 masked crops",
            "input": f"{FLOP_BOXES} crops of 320x320",
            "flops_per_image": count_flops(lambda: clip.encode_image(_meta(FLOP_BOXES, 3, 320, 320))),
            "counted_on": "meta"}


def flops_fcclip(clip) -> dict:
    """FC-CLIP (ConvNeXt-L trunk, deformable pixel decoder, 250-query masked-attention decoder) at
    FCCLIP_HW with an FCCLIP_CLASSES-class vocabulary, plus the pooled query of its 100 kept proposals."""
    import contextlib
    from unittest import mock

    import torch

    from ragseg.config import FcclipConfig
    from ragseg.models.clip import pooled_to_embedding
    from ragseg.models.fcclip import FCCLIP

    fc = FcclipConfig()
    with torch.device("meta"):
        model = FCCLIP(clip, fc)
    model.to("meta").eval()
    dim = int(clip.text_projection.shape[-1])

    def run():
        _, masks, dense = model(_meta(1, 3, *FCCLIP_HW), _meta(FCCLIP_CLASSES + 1, dim))
        pooled_to_embedding(model.visual, _mask_pool(dense[0], fc.topk))

    # the pixel decoder's fp32 guard (torch.autocast(enabled=False)) has no meta device: a no-op here;
    # the masked attention's fix-up of fully masked rows indexes with nonzero (no FLOPs): a meta stand-in
    from torch.fx.experimental import _config as fx_config

    with mock.patch.object(torch, "autocast", lambda *a, **k: contextlib.nullcontext()), \
            mock.patch.object(fx_config, "meta_nonzero_assume_all_nonzero", True):
        f = count_flops(run)
    return {"stage": "fcclip", "model": "FC-CLIP (ConvNeXt-L, 250 queries)",
            "input": f"{FCCLIP_HW[0]}x{FCCLIP_HW[1]}, {FCCLIP_CLASSES} classes, {fc.topk} pooled queries",
            "flops_per_image": f, "counted_on": "meta"}


def _rates(row: dict) -> dict:
    f = row["flops_per_image"]
    row["tflops_per_image"] = round(f / 1e12, 4)
    row["ceiling_images_per_s"] = round(PEAK_FLOPS / f, 2)
    row["estimate_images_per_s_at_40pct"] = round(UTILISATION * PEAK_FLOPS / f, 2)
    return row


def projection(rows: dict[str, dict], stages: list[str], name: str) -> dict:
    """Open Images build time on PROJECTION_GPUS GPUs at UTILISATION: from the slowest stage (each stage
    given GPUs in proportion, the pipeline runs at the slowest one's rate: the lower bound), and with
    all stages sharing the same GPUs (total FLOPs / (GPUs x peak x utilisation))."""
    per = {s: rows[s]["flops_per_image"] for s in stages}
    slowest = max(per, key=per.get)
    rate = PROJECTION_GPUS * UTILISATION * PEAK_FLOPS
    return {"pipeline": name, "stages": stages, "images": OPEN_IMAGES, "gpus": PROJECTION_GPUS,
            "slowest_stage": slowest,
            "hours_slowest_stage_alone": round(OPEN_IMAGES * per[slowest] / rate / 3600, 2),
            "hours_all_stages_on_the_same_gpus": round(OPEN_IMAGES * sum(per.values()) / rate / 3600, 2),
            "note": "estimate: FLOPs at 40% of the 989 TFLOPS bf16 peak, not a measurement"}


def flops_main(out: Path) -> int:
    import torch

    t0 = time.perf_counter()
    clip = _clip_meta()
    builders = [flops_detect, flops_sam, lambda: flops_embed_pool(clip), lambda: flops_embed_crop(clip),
                lambda: flops_fcclip(clip)] + [functools.partial(flops_sam2, a) for a in ("hiera_t", "hiera_s",
                                                                                        "hiera_b+", "hiera_l")]
    rows = {}
    for b in builders:
        r = _rates(b())
        rows[r["stage"]] = r
        print(json.dumps(r), flush=True)
    doc = {"bench": "flops", "torch": torch.__version__, "peak_flops": PEAK_FLOPS, "peak": "H100/H200 SXM dense bf16",
           "utilisation_estimate": UTILISATION, "image_hw": list(FLOP_IMAGE_HW), "boxes_per_image": FLOP_BOXES,
           "counter": "torch.utils.flop_counter.FlopCounterMode (matmul/conv, 2 per multiply-add)",
           "stages": list(rows.values()),
           "projections": [
               projection(rows, ["detect", "segment", "embed-pool"], "build-db Open Images, detector masks (SAM ViT-H)"),
               projection(rows, ["detect", "segment-sam2-hiera_l", "embed-pool"],
                          "build-db Open Images, detector masks (SAM 2.1 hiera-l)"),
               projection(rows, ["detect", "segment-sam2-hiera_t", "embed-pool"],
                          "build-db Open Images, detector masks (SAM 2.1 hiera-t)"),
               projection(rows, ["embed-pool"], "build-db, ground-truth masks"),
           ],
           "seconds": round(time.perf_counter() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for p in doc["projections"]:
        print(json.dumps(p), flush=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def flops_by_stage(path: Path = ROOT / "bench" / "results" / "flops.json") -> dict[str, int]:
    """FLOPs per image of each stage from flops.json (``segment-sam2`` = hiera-l): for the share of the
    ceiling a GPU run reaches (bench/gpu_smoke.py)."""
    try:
        rows = {r["stage"]: int(r["flops_per_image"]) for r in json.loads(path.read_text())["stages"]}
    except (OSError, ValueError, KeyError):
        return {}
    if "segment-sam2-hiera_l" in rows:
        rows["segment-sam2"] = rows["segment-sam2-hiera_l"]
    return rows


# ----------------------------------------------------------------------------------------------
# SAM batching on the CPU: one encoder pass for the batch vs one per image
# ----------------------------------------------------------------------------------------------
def sam_batching_main(args, out: Path) -> int:
    """SAM ViT-H and SAM 2.1 hiera-t with random weights on 768x1024 images (longer side 1024: the
    encoders' input), FLOP_BOXES boxes each: images/s of the Segment stage with the batch in one encoder
    pass (``encoder_batch`` = batch size) and with one image per pass (``encoder_batch`` 1), at each batch
    size (at batch 1 they are the same run); ``--iters`` timed batches (after one warm-up image for
    SAM 2.1; none for ViT-H). Appends to ``out`` (stages.json)."""
    import torch

    from ragseg.config import load_config

    hw = (768, 1024)
    base = list(FULL_OVERRIDES) + ["models.device.device=cpu", "models.device.precision=fp32",
                                   f"models.sam.attention={args.sam_attention}"]
    models = {"sam-vit_h": base, "sam2-hiera_t": base + ["models.sam.family=sam2", "models.sam.sam2.arch=hiera_t"]}
    rows = []
    for name, over in models.items():
        if args.sam_models and name not in args.sam_models.split(","):
            continue
        from ragseg.stages.segment import Segment

        seg = Segment(load_config(None, over))
        if name != "sam-vit_h":  # one warm-up image (ViT-H: skipped, a full image costs minutes on 2 CPUs)
            warm, _ = make_batch("segment", 1, hw, FLOP_BOXES, seed=99)
            seg(warm)
        for bs in args.batch_sizes:
            # at batch 1 both modes are the same run (one image per pass)
            for mode, eb in (("batched", bs), ("per_image", 1)) if bs > 1 else (("batched", 1),):
                seg.model.cfg.encoder_batch = eb
                batches = [make_batch("segment", bs, hw, FLOP_BOXES, seed=k)[0] for k in range(args.iters)]
                t, c = time.perf_counter(), time.process_time()
                for b in batches:
                    out_b = seg(b)
                    assert not any(out_b["error"]), list(out_b["error"])
                dt, cpu = time.perf_counter() - t, time.process_time() - c
                r = {"bench": "sam_batching", "model": name, "mode": mode, "batch_size": bs, "encoder_batch": eb,
                     "images": bs * args.iters, "image_hw": list(hw), "boxes_per_image": FLOP_BOXES,
                     "attention": seg.model.attention, "seconds": round(dt, 2),
                     "images_per_s": round(bs * args.iters / dt, 4), "cpu_seconds": round(cpu, 2),
                     "loadavg_1m": round(os.getloadavg()[0], 2), "peak_rss_mb": peak_rss_mb(),
                     "torch_threads": torch.get_num_threads()}
                print(json.dumps(r), flush=True)
                rows.append(r)
        del seg
    doc = json.loads(out.read_text()) if out.exists() else {"bench": "stages"}
    doc["sam_batching"] = {"device": "cpu", "cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "note": "random weights; shared 2-CPU machine: wall time depends on the other load "
                                   "(loadavg_1m); no timing is asserted anywhere", "results": rows}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


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
    ap.add_argument("--flops", action="store_true", help="FLOPs per image at full size -> flops.json")
    ap.add_argument("--sam-batching", action="store_true",
                    help="SAM ViT-H / SAM 2.1 hiera-t batched vs per-image encoder passes (CPU) -> stages.json")
    ap.add_argument("--sam-models", default="", help="with --sam-batching: sam-vit_h,sam2-hiera_t (default both)")
    ap.add_argument("--sam-attention", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--iters", type=int, default=1, help="with --sam-batching: timed batches per setting")
    args = ap.parse_args(argv)
    if args.flops:
        return flops_main(Path(args.out) if args.out else ROOT / "bench" / "results" / "flops.json")
    if args.sam_batching:
        args.batch_sizes = [int(x) for x in (args.batch_sizes or "1,2,4").split(",")]
        return sam_batching_main(args, Path(args.out) if args.out else ROOT / "bench" / "results" / "stages.json")

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
