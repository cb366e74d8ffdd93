"""``ragseg env``: what a bug report needs, collected without starting anything.

Package versions, Python and platform, torch with its CUDA / cuDNN build and the GPUs it sees, the
FAISS build (GPU or CPU, version, GPUs it sees, which wheel is installed), the Ray address and - only
when a cluster is configured (``--address``, ``ray.address`` or ``RAY_ADDRESS``) or Ray already runs
in this process - the cluster's resources; "no cluster" otherwise (no local Ray is started). Also the
ragseg cache dir, the weights mirror and offline flag.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from ragseg.config import JobConfig

PACKAGES = ("ragseg", "torch", "torchvision", "open_clip_torch", "segment-anything", "transformers",
            "huggingface_hub", "timm", "ray", "pyarrow", "numpy", "fsspec", "s3fs", "gcsfs", "pydantic",
            "typer", "pycocotools", "pillow")
FAISS_DISTS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu-cuvs",
               "faiss-gpu-cu12-cuvs", "faiss-gpu-cu13-cuvs")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _guard(fn) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a report never fails on one broken part
        from ragseg.errors import describe

        return {"error": describe(e, 300)}


def torch_info() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                           "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported()})
    out["gpus"] = gpus
    out["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return out


def faiss_info() -> dict[str, Any]:
    """The FAISS build: which wheel(s) are installed (more than one is a broken install), its
    version, whether it is a GPU build and how many GPUs it sees. GPU-only symbols are looked up,
    never called, on a CPU build."""
    wheels = {d: v for d in FAISS_DISTS if (v := _version(d))}
    out: dict[str, Any] = {"wheels": wheels}
    if len(wheels) > 1:
        out["problem"] = (f"several FAISS wheels installed ({', '.join(wheels)}): they write the same `faiss` "
                          f"package; uninstall all and install exactly one (README: GPU install)")
    import faiss

    out["version"] = faiss.__version__
    gpu_build = hasattr(faiss, "StandardGpuResources")
    out["build"] = "GPU" if gpu_build else "CPU"
    out["gpus"] = int(faiss.get_num_gpus()) if gpu_build else 0
    return out


def ray_info(cfg: JobConfig | None) -> dict[str, Any]:
    import ray

    address = (cfg.ray.address if cfg else None) or os.environ.get("RAY_ADDRESS")
    out: dict[str, Any] = {"version": ray.__version__, "address": address}
    if not address and not ray.is_initialized():
        out["cluster"] = "no cluster (a local Ray is started per job)"
        return out
    started = False
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        started = True
    try:
        res = ray.cluster_resources()
        out["cluster"] = {"nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                          "resources": {k: v for k, v in sorted(res.items()) if not k.startswith("node:")},
                          "available": {k: v for k, v in sorted(ray.available_resources().items())
                                        if k in ("CPU", "GPU", "memory", "object_store_memory")}}
    finally:
        if started:
            ray.shutdown()
    return out


def collect(cfg: JobConfig | None = None) -> dict[str, Any]:
    from ragseg.models.weights import cache_root

    w = cfg.models.weights if cfg else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": {p: _version(p) for p in PACKAGES},
        "torch": _guard(torch_info),
        "faiss": _guard(faiss_info),
        "ray": _guard(lambda: ray_info(cfg)),
        "cache_dir": str(cache_root(w)),
        "RAGSEG_CACHE": os.environ.get("RAGSEG_CACHE"),
        "weights_mirror": w.mirror if w else None,
        "weights_offline": bool(w.offline) if w else False,
        "device": cfg.models.device.model_dump() if cfg else None,
    }


def format_text(info: dict[str, Any]) -> str:
    """The report as ``key: value`` lines (nested sections indented)."""
    lines: list[str] = []

    def walk(d: dict, indent: int) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                lines.append(f"{' ' * indent}{k}:")
                walk(v, indent + 2)
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                lines.append(f"{' ' * indent}{k}:")
                for x in v:
                    lines.append(f"{' ' * (indent + 2)}- " + ", ".join(f"{a}={b}" for a, b in x.items()))
            else:
                lines.append(f"{' ' * indent}{k}: {'-' if v is None or v == {} or v == [] else v}")

    walk(info, 0)
    return "\n".join(lines)
