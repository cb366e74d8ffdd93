"""GPU smoke test: one command that proves ragseg's CUDA paths on one GPU, in under 5 minutes.

    python bench/gpu_smoke.py              # on a GPU machine -> bench/results/gpu_smoke.json
    python bench/gpu_smoke.py --cpu-check  # the same code on the CPU at tiny sizes (no FAISS GPU step),
                                           # to check this script where no GPU is lent

Steps (each recorded in the JSON; a failing step does not stop the others):

1. ``env``: devices and versions (``ragseg env``'s facts: torch, CUDA, GPUs, FAISS build).
2. ``faiss``: IVF-PQ (IVF1024,PQ64, inner product) on 200k clustered random 768-d vectors: trained and
   searched on the CPU, as a ``GpuIndexIVFPQ`` trained and searched on the GPU, the CPU-trained index
   cloned to the GPU (what ``ragseg.index.store.Index.open`` does) and ragseg's own ``faiss_util.train`` with
   the coarse k-means on the GPU; recall@10 of each against exact search. Check: every GPU recall is
   within ``faiss_recall_gap`` of the CPU recall.
3. ``stages``: each model stage at full size with random weights (bench/stages.py ``--full``:
   ConvNeXt-L d-320 mask pooling at ``pool_image_size`` 1088, SAM ViT-H with box prompts, SAM 2.1
   hiera-l with box prompts, Grounding DINO base; FC-CLIP when ``ragseg.models.fcclip`` exists),
   images/s per batch size under bf16 autocast with the peak GPU memory, each rate also as a share of
   the FLOP ceiling (``bench/results/flops.json``: FLOPs per image; ``share_of_peak`` = images/s x FLOPs /
   989 TFLOPS, the H100/H200 dense bf16 peak), and bf16 against fp32 on the same inputs. The SAM stages
   run batched (``models.sam.encoder_batch`` 4: the batch's images in one encoder pass); their encoder
   features batched vs one image per pass are compared too. Checks (``TOLERANCES``): embeddings'
   cosine, SAM's / SAM 2.1's and Grounding DINO's image-encoder outputs' relative error (bf16 vs fp32,
   batched vs per image), and Grounding DINO's top boxes matched as sets (its two-stage query
   selection may pick other queries under bf16). Thresholded masks are reported (mean IoU), not
   checked: with random weights SAM's mask logits sit near 0, so bf16 flips pixels at the threshold.
4. ``pipeline``: a 32-image build-db (ground-truth masks, ConvNeXt-L pooling) and a 32-image label
   (gdino-sam proposals) through Ray with ``num_gpus`` actors sharing the GPU (``ray.gpus_per_actor``),
   on a generated set; images/s of each. Check: every image done, no errored row.

On a machine without a CUDA GPU it prints one line and exits 0. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

import stages as bstages  # noqa: E402  (bench/stages.py)

TOLERANCES = {
    "faiss_recall_gap": 0.03,  # GPU recall@10 >= CPU recall@10 - this
    "embed_cos_min": 0.97,  # every bf16 embedding vs its fp32 twin
    "sam_encoder_rel_err": 0.05,  # ||bf16 - fp32|| / ||fp32|| of SAM's (and SAM 2.1's) image features
    "sam_batched_rel_err": 0.02,  # the same features, 4 images in one encoder pass vs one per pass (bf16)
    "gdino_encoder_rel_err": 0.05,  # Grounding DINO's vision encoder output, as SAM's
    # the top-20 fp32 boxes (by score) with a bf16 box at IoU >= 0.8: the two-stage query selection
    # may pick other queries under bf16, so boxes are matched as sets, not query by query
    "gdino_top_boxes_matched": 0.8,
}
MODEL_STAGES = ("embed-pool", "segment", "segment-sam2", "detect")


def log(msg: str) -> None:
    print(f"[gpu_smoke] {msg}", file=sys.stderr, flush=True)


def run_step(name: str, fn, doc: dict) -> None:
    t0 = time.perf_counter()
    try:
        doc[name] = fn()
    except Exception as e:  # noqa: BLE001 - record and go on with the other steps
        traceback.print_exc()
        doc[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
    if isinstance(doc[name], dict):
        doc[name]["step_s"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: done in {time.perf_counter() - t0:.1f} s")


# ----------------------------------------------------------------------------------------------
# 1. env
# ----------------------------------------------------------------------------------------------
def env_step() -> dict:
    from ragseg import envinfo

    info = {"torch": envinfo._guard(envinfo.torch_info), "faiss": envinfo._guard(envinfo.faiss_info),
            "packages": {p: envinfo._version(p) for p in envinfo.PACKAGES}}
    t, f = info["torch"], info["faiss"]
    print(f"torch {t.get('version')} (CUDA {t.get('cuda_build')}, cuDNN {t.get('cudnn')}); "
          f"GPUs: {', '.join(g['name'] for g in t.get('gpus', [])) or 'none'}; "
          f"faiss {f.get('version')} {f.get('build')} build, {f.get('gpus')} GPU(s)", flush=True)
    return info


# ----------------------------------------------------------------------------------------------
# 2. FAISS
# ----------------------------------------------------------------------------------------------
def clustered(n: int, d: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors around 1000 random centres, and nq queries near database vectors."""
    rs = np.random.RandomState(seed)
    centres = rs.randn(1000, d).astype(np.float32)
    x = centres[rs.randint(0, 1000, n)] + 0.5 * rs.randn(n, d).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rs.choice(n, nq, replace=False)] + 0.05 * rs.randn(nq, d).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q


def recall_at(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def faiss_step(n: int, d: int, nq: int, gpu: bool) -> dict:
    import faiss

    from ragseg.index.faiss_util import train as _train
    from ragseg.index.params import IndexParams

    nlist = 1024 if n >= 100_000 else max(8, int(4 * math.sqrt(n)))
    m = 64 if d >= 512 else 8  # PQ64 on 768-d: 12 dimensions per sub-quantizer
    nprobe = 32
    x, q = clustered(n, d, nq)
    xt = x[: min(n, 40 * nlist)]
    out: dict = {"n": n, "dim": d, "queries": nq, "factory": f"IVF{nlist},PQ{m}", "nprobe": nprobe,
                 "train_size": len(xt), "omp_threads": faiss.omp_get_max_threads()}
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    _, exact = flat.search(q, 10)

    def timed_search(index) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        _, ids = index.search(q, 10)
        return ids, round(nq / (time.perf_counter() - t), 1)

    t = time.perf_counter()
    cpu = faiss.index_factory(d, out["factory"], faiss.METRIC_INNER_PRODUCT)
    cpu.train(xt)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    cpu.add(x)
    add_s = time.perf_counter() - t
    faiss.extract_index_ivf(cpu).nprobe = nprobe
    ids, qps = timed_search(cpu)
    out["cpu"] = {"train_s": round(train_s, 2), "add_s": round(add_s, 2), "qps": qps,
                  "recall_at10": round(recall_at(ids, exact), 4)}
    log(f"faiss cpu: {out['cpu']}")
    if not gpu:
        out["gpu"] = "skipped (no GPU: --cpu-check)"
        return out

    if not hasattr(faiss, "StandardGpuResources"):
        out["gpu"] = (f"not run: this faiss {faiss.__version__} is a CPU build (make setup GPU=1 installs "
                      f"faiss-gpu)")
        out["checks"] = {"faiss_gpu_build": False}
        return out
    res = faiss.StandardGpuResources()
    gcfg = faiss.GpuIndexIVFPQConfig()
    gcfg.device = 0
    gcfg.useFloat16LookupTables = True  # 64 sub-quantizers x 256 x fp32 tables would not fit shared memory
    t = time.perf_counter()
    g = faiss.GpuIndexIVFPQ(res, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT, gcfg)
    g.train(xt)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    g.add(x)
    add_s = time.perf_counter() - t
    g.nprobe = nprobe
    ids, qps = timed_search(g)
    out["gpu_trained"] = {"train_s": round(train_s, 2), "add_s": round(add_s, 2), "qps": qps,
                          "recall_at10": round(recall_at(ids, exact), 4)}
    log(f"faiss gpu: {out['gpu_trained']}")

    co = faiss.GpuClonerOptions()
    co.useFloat16 = True
    t = time.perf_counter()
    cloned = faiss.index_cpu_to_gpu(res, 0, cpu, co)
    clone_s = time.perf_counter() - t
    faiss.GpuParameterSpace().set_index_parameter(cloned, "nprobe", nprobe)
    ids, qps = timed_search(cloned)
    out["cpu_trained_on_gpu"] = {"clone_s": round(clone_s, 2), "qps": qps,
                                 "recall_at10": round(recall_at(ids, exact), 4)}

    params = IndexParams(factory=out["factory"], nlist=nlist, m=m, opq=False, train_size=len(xt), code_bytes=m)
    t = time.perf_counter()
    _, used_gpu = _train(params, d, xt, use_gpu=True)
    out["ragseg_train"] = {"train_s": round(time.perf_counter() - t, 2), "coarse_kmeans_on_gpu": bool(used_gpu)}

    gap = TOLERANCES["faiss_recall_gap"]
    ref = out["cpu"]["recall_at10"]
    out["checks"] = {
        "gpu_trained_recall": out["gpu_trained"]["recall_at10"] >= ref - gap,
        "cloned_recall": out["cpu_trained_on_gpu"]["recall_at10"] >= ref - gap,
        "ragseg_train_on_gpu": bool(used_gpu),
    }
    return out


# ----------------------------------------------------------------------------------------------
# 3. stages at full size
# ----------------------------------------------------------------------------------------------
def set_precision(fn, precision: str) -> None:
    """The stages read ``cfg.models.device`` at call time (SAM's encoder wrapper holds the same object)."""
    fn.cfg.models.device.precision = precision


def compare_embed(fn, batch: dict) -> dict:
    set_precision(fn, "fp32")
    a = fn(dict(batch))["embeddings"]
    set_precision(fn, "bf16")
    b = fn(dict(batch))["embeddings"]
    cos = np.concatenate([np.sum(x.astype(np.float32) * y.astype(np.float32), axis=1) for x, y in zip(a, b)])
    return {"embed_cos_min": round(float(cos.min()), 5), "embed_cos_mean": round(float(cos.mean()), 5),
            "ok": bool(cos.min() >= TOLERANCES["embed_cos_min"])}


def _features(fn, images: list) -> "torch.Tensor":  # noqa: F821
    """The mask model's image embeddings of ``images`` (SAM: (n, 256, 64, 64); SAM 2.1: image_embed)."""
    import torch

    m = fn.model
    states = m.encode([m.prepare(im) for im in images], [im.shape[:2] for im in images])
    return torch.cat([s["image_embed"] if isinstance(s, dict) else s[0] for s in states]).float()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def compare_segment(fn, batch: dict, device: str) -> dict:
    """bf16 vs fp32 image features and masks of a SAM stage (either family), and the batched encoder
    (``encoder_batch`` 4) vs one image per pass."""
    from ragseg.masks import decode_rle

    images = [np.asarray(im) for im in batch["image"]]
    feats = {}
    for prec in ("fp32", "bf16"):
        set_precision(fn, prec)
        feats[prec] = _features(fn, images)
    rel = _rel(feats["bf16"], feats["fp32"])
    masks = {}
    for prec in ("fp32", "bf16"):
        set_precision(fn, prec)
        masks[prec] = fn(dict(batch))["seg_masks_rle"]
    ious = []
    for ra, rb in zip(masks["fp32"], masks["bf16"]):
        for ma, mb in zip(ra, rb):
            a, b = decode_rle(ma).astype(bool), decode_rle(mb).astype(bool)
            union = np.logical_or(a, b).sum()
            ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
    # batched vs per image, bf16 (the production path): 4 images in one encoder pass, then one by one
    eb = fn.model.cfg.encoder_batch
    quad = (images * 4)[:4]
    fn.model.cfg.encoder_batch = 4
    together = _features(fn, quad)
    fn.model.cfg.encoder_batch = 1
    alone = _features(fn, quad)
    fn.model.cfg.encoder_batch = eb
    brel = _rel(together, alone)
    return {"sam_encoder_rel_err": round(rel, 5), "mask_iou_mean_info": round(float(np.mean(ious)), 4),
            "sam_batched_rel_err": round(brel, 6), "family": fn.model.family, "attention": fn.model.attention,
            "ok": bool(rel <= TOLERANCES["sam_encoder_rel_err"] and brel <= TOLERANCES["sam_batched_rel_err"])}


def add_ceiling_share(results: list[dict], flops: dict[str, int]) -> None:
    """Each measured rate as a share of the FLOP ceiling: images/s x FLOPs per image / the 989 TFLOPS
    H100/H200 dense bf16 peak (whatever the GPU; its name is in the row)."""
    for r in results:
        f = flops.get(r.get("stage"))
        if f:
            r["flops_per_image"] = f
            r["ceiling_images_per_s"] = round(bstages.PEAK_FLOPS / f, 2)
            r["share_of_peak"] = round(r["images_per_s"] * f / bstages.PEAK_FLOPS, 4)


def compare_detect(fn, batch: dict) -> dict:
    import torch
    from torchvision.ops import box_convert, box_iou

    from ragseg.runtime import autocast

    images = list(batch["image"][:2])
    prompt = " . ".join(bstages.CLASSES) + " ."
    inputs = fn.processor(images=images, text=[prompt] * len(images), return_tensors="pt", truncation=True,
                          max_length=fn.max_tokens)
    inputs = {k: v.to(fn.device) for k, v in inputs.items()}
    out = {}
    for prec in ("fp32", "bf16"):
        set_precision(fn, prec)
        with torch.inference_mode(), autocast(fn.device, fn.cfg.models.device):
            o = fn.model(**inputs)
        out[prec] = {"enc": o.encoder_last_hidden_state_vision.float().cpu(), "boxes": o.pred_boxes.float().cpu(),
                     "scores": o.logits.float().sigmoid().max(-1).values.cpu()}
    a, b = out["fp32"], out["bf16"]
    rel = float((b["enc"] - a["enc"]).norm() / a["enc"].norm())
    matched = []
    for i in range(len(images)):
        top = a["scores"][i].topk(min(20, a["scores"].shape[1])).indices
        ious = box_iou(box_convert(a["boxes"][i][top], "cxcywh", "xyxy"), box_convert(b["boxes"][i], "cxcywh", "xyxy"))
        matched.append(float((ious.max(1).values >= 0.8).float().mean()))
    frac = float(np.mean(matched))
    return {"gdino_encoder_rel_err": round(rel, 5), "gdino_top_boxes_matched": round(frac, 4),
            "ok": bool(rel <= TOLERANCES["gdino_encoder_rel_err"] and frac >= TOLERANCES["gdino_top_boxes_matched"])}


def stages_step(device: str, full: bool, batch_sizes: list[int], images: int) -> dict:
    import torch

    from ragseg.config import load_config

    over = (list(bstages.FULL_OVERRIDES) if full else []) + [f"models.device.device={device}",
                                                             "models.device.precision=bf16"]
    if full:  # the pool embeddings at their production size, as flops.json counts them
        over.append(f"models.clip.pool_image_size={bstages.POOL_SIDE}")
    cfg = load_config(None if full else str(ROOT / "configs" / "test-tiny.yaml"), over)
    hw = (480, 640) if full else (96, 128)
    args = argparse.Namespace(batch_sizes=batch_sizes, images=images, segments=16 if full else 8,
                              height=hw[0], width=hw[1])
    meta = {"device": device, "precision": "bf16", "config": "full-random" if full else "test-tiny"}
    out: dict = {"image_hw": list(hw), "tolerances": TOLERANCES, "results": [], "bf16_vs_fp32": {}}
    for stage in MODEL_STAGES:
        t = time.perf_counter()
        try:
            fn, model_id = bstages.build_stage(stage, cfg)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out["bf16_vs_fp32"][stage] = {"error": f"{type(e).__name__}: {e}"[:500], "ok": False}
            continue
        bstages.sync(device)
        load_s = time.perf_counter() - t
        log(f"{stage}: built {model_id} in {load_s:.1f} s")
        try:
            out["results"] += bstages.time_stage(fn, stage, model_id, args, device, meta, load_s)
            batch, _ = bstages.make_batch(stage, 2, hw, args.segments, seed=7)
            if stage.startswith("embed"):
                out["bf16_vs_fp32"][stage] = compare_embed(fn, batch)
            elif stage.startswith("segment"):
                out["bf16_vs_fp32"][stage] = compare_segment(fn, batch, device)
            else:
                out["bf16_vs_fp32"][stage] = compare_detect(fn, batch)
            log(f"{stage}: bf16 vs fp32 {out['bf16_vs_fp32'][stage]}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out["bf16_vs_fp32"][stage] = {"error": f"{type(e).__name__}: {e}"[:500], "ok": False}
        finally:
            del fn
            if device == "cuda":
                torch.cuda.empty_cache()
    if importlib.util.find_spec("ragseg.models.fcclip") is None:
        out["fcclip"] = "skipped: ragseg.models.fcclip is not in this checkout"
    else:
        out["fcclip"] = "skipped: ragseg.models.fcclip exists, but bench/stages.py has no fcclip stage yet"
    flops = bstages.flops_by_stage()
    out["flops_source"] = "bench/results/flops.json" if flops else "missing: run bench/stages.py --flops"
    if full:
        add_ceiling_share(out["results"], flops)
    out["checks"] = {s: bool(v.get("ok")) for s, v in out["bf16_vs_fp32"].items()}
    return out


# ----------------------------------------------------------------------------------------------
# 4. build-db + label through Ray
# ----------------------------------------------------------------------------------------------
def pipeline_step(device: str, full: bool, n_images: int, workdir: str) -> dict:
    import ray

    from ragseg.config import JobConfig, deep_merge, load_config
    from ragseg.index.build import build_index
    from ragseg.pipelines.build_db import run_build_db
    from ragseg.pipelines.label import run_label
    from ragseg.sources.synthetic import make_synthetic

    over = (list(bstages.FULL_OVERRIDES) if full else []) + [
        f"models.device.device={device}", "models.device.precision=auto", "models.gdino.max_boxes=32",
        "ray.model_actors=1", "ray.progress=false"]
    if not full:
        over += ["ray.num_cpus=2", "ray.object_store_memory=300000000"]
    base = load_config(None if full else str(ROOT / "configs" / "test-tiny.yaml"), over)

    def with_(**sections) -> JobConfig:
        return JobConfig.model_validate(deep_merge(base.model_dump(mode="json"), sections))

    data = os.path.join(workdir, "data")
    syn = make_synthetic(data, images=2 * n_images, seed=0, size=512 if full else 128, val_fraction=0.5)
    out: dict = {"images_per_job": n_images}
    db = os.path.join(workdir, "db")
    t = time.perf_counter()
    # one model stage (embed): a whole GPU may go to it; label has three sharing the GPU
    res = run_build_db(with_(source={"kind": "synthetic", "uri": data, "split": "train", "limit": n_images},
                             build_db={"out": db, "masks": "gt"}, ray={"gpus_per_actor": 0.5}))
    dt = time.perf_counter() - t
    out["build_db"] = {"seconds": round(dt, 1), "images_per_s": round(res["images"] / dt, 3), "summary": res,
                       "cluster_gpus": float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0}
    index = os.path.join(workdir, "index")
    build_index(db, with_(index={"out": index}))
    t = time.perf_counter()
    res = run_label(with_(label={"images": {"kind": "synthetic", "uri": data, "split": "val", "limit": n_images},
                                 "vocab": syn["categories"], "index": index, "out": os.path.join(workdir, "labels"),
                                 "proposals": "gdino-sam"}, ray={"gpus_per_actor": 0.3}))
    dt = time.perf_counter() - t
    out["label"] = {"seconds": round(dt, 1), "images_per_s": round(res["images"] / dt, 3), "summary": res}
    out["checks"] = {job: out[job]["summary"]["images"] == n_images and out[job]["summary"]["errors"] == 0
                     for job in ("build_db", "label")}
    if ray.is_initialized():
        ray.shutdown()
    return out


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-check", action="store_true", help="run on the CPU at tiny sizes (no FAISS GPU step)")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: faiss, stages, pipeline")
    ap.add_argument("--faiss-n", type=int, default=None, help="database vectors (default 200000)")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--images", type=int, default=16, help="images timed per batch size")
    ap.add_argument("--pipeline-images", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    if not args.cpu_check and not torch.cuda.is_available():
        print(f"gpu_smoke: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              f"nothing to do", flush=True)
        return 0
    device = "cpu" if args.cpu_check else "cuda"
    full = not args.cpu_check
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out_path = Path(args.out) if args.out else (
        ROOT / "bench" / "results" / "gpu_smoke.json" if full else Path(tempfile.gettempdir()) / "gpu_smoke-cpu.json")
    t0 = time.perf_counter()
    doc: dict = {"bench": "gpu_smoke", "mode": "cpu-check" if args.cpu_check else "gpu",
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    run_step("env", env_step, doc)
    if "faiss" not in skip:
        n = args.faiss_n or (200_000 if full else 5_000)
        run_step("faiss", lambda: faiss_step(n, 768 if full else 64, 1000 if full else 100, gpu=full), doc)
    if "stages" not in skip:
        bss = [int(b) for b in args.batch_sizes.split(",")]
        run_step("stages", lambda: stages_step(device, full, bss, args.images if full else 2), doc)
    if "pipeline" not in skip:
        with tempfile.TemporaryDirectory(prefix="ragseg-gpu-smoke-") as work:
            run_step("pipeline", lambda: pipeline_step(device, full, args.pipeline_images if full else 4, work), doc)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [f"{step}.{name}" for step in ("faiss", "stages", "pipeline") if isinstance(doc.get(step), dict)
              for name, ok in doc[step].get("checks", {"ran": "error" not in doc[step]}).items() if not ok]
    doc["failed_checks"] = failed
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"gpu_smoke: {'OK' if not failed else 'FAILED ' + ', '.join(failed)} in {doc['seconds']} s; "
          f"wrote {out_path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
