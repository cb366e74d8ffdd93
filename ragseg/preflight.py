"""Driver-side checks of a job's model sections, before Ray starts.

A problem a model stage would only find in its actor's constructor (on every worker, reported by Ray
as a long ``ActorDiedError``) is found here first and reported as one line (:class:`UserError`, exit
code 2): arch/checkpoint pairs and sizes, unknown open_clip architectures or tags, the device, and
whether every checkpoint the job needs is cached, local, in the mirror or (online) downloadable. In
offline mode a missing checkpoint is named with the place to put it. Nothing is downloaded or loaded.

The weights check looks at this machine's cache: with a cache shared by the nodes (``RAGSEG_CACHE``
on a shared file system) or a mirror (``models.weights.mirror``) that is what the workers see too.
"""

from __future__ import annotations

import os
from typing import Literal

from ragseg.config import ClipConfig, GroundingDinoConfig, JobConfig
from ragseg.errors import UserError

Job = Literal["build-db", "label", "search"]


def models_needed(cfg: JobConfig, job: Job) -> set[str]:
    """The model sections ``job`` loads with this config."""
    if job == "search":
        return {"clip"}
    if job == "build-db":
        return {"clip"} | ({"gdino", "sam"} if cfg.build_db.masks == "detector" else set())
    if job == "label":
        extra = {"gdino-sam": {"gdino", "sam"}, "sam-grid": {"sam"}, "gt": set(),
                 "fcclip": {"fcclip"}}[cfg.label.proposals]
        return {"clip"} | extra
    raise ValueError(job)


def clip_problems(c: ClipConfig, mirror: str | None) -> list[str]:
    import open_clip

    from ragseg.models.weights import is_remote, open_clip_tag_cfg

    arch = c.model_cfg or open_clip.get_model_config(c.model)
    if not arch:
        return [f"models.clip.model {c.model!r} is not an open_clip architecture (see open_clip.list_models()), "
                f"and models.clip.model_cfg is not given"]
    out = []
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in arch]
    if missing:
        out.append(f"models.clip.model_cfg for {c.model!r} misses {', '.join(missing)}")
    if c.mode == "pool" and not (arch.get("vision_cfg") or {}).get("timm_model_name"):
        out.append(f"models.clip.mode pool needs a timm (ConvNeXt) image tower; {c.model} has none: "
                   f"use mode: crop or a convnext model")
    ref = c.pretrained
    if ref and not open_clip_tag_cfg(c.model, ref) and not is_remote(ref) and not mirror \
            and not os.path.isfile(os.path.expanduser(ref.removeprefix("file://"))):
        tags = open_clip.list_pretrained_tags_by_model(c.model)
        out.append(f"models.clip.pretrained {ref!r} is neither an open_clip tag of {c.model} "
                   f"(tags: {', '.join(tags) or 'none'}) nor an existing file")
    return out


def gdino_problems(g: GroundingDinoConfig) -> list[str]:
    if g.model_id is not None:
        return []
    from ragseg.models.gdino import tiny_settings

    try:
        tiny_settings(g)
    except UserError as e:
        return [str(e)]
    return []


def fcclip_problems(checkpoint: str | None) -> list[str]:
    """Label jobs load FC-CLIP weights only as safetensors (the official .pth needs `convert-weights`)."""
    if checkpoint and not checkpoint.endswith(".safetensors"):
        return [f"models.fcclip.checkpoint {checkpoint!r} is not a .safetensors file: convert the official "
                f"checkpoint once with `ragseg convert-weights SRC.pth OUT.safetensors` and point the config at OUT"]
    return []


def device_problems(cfg: JobConfig) -> list[str]:
    """``device: cuda`` on a local run without CUDA. On a cluster the driver may have no GPU while
    the workers do, so nothing is checked there."""
    if cfg.models.device.device != "cuda" or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [f"models.device.device is cuda but torch {torch.__version__} sees no CUDA device here "
            f"(CUDA build {torch.version.cuda or 'none'}); set models.device.device: auto or cpu, or run "
            f"on a GPU machine (`ragseg env` shows what is visible)"]


def problems(cfg: JobConfig, job: Job) -> list[str]:
    """Every problem found, one line each (empty: the job may start)."""
    from ragseg.models import sam, weights

    m = cfg.models
    need = models_needed(cfg, job)
    out: list[str] = []
    if "clip" in need:
        out += clip_problems(m.clip, m.weights.mirror)
    if "sam" in need:
        out += sam.config_problems(m.sam)
    if "gdino" in need:
        out += gdino_problems(m.gdino)
    if "fcclip" in need:
        out += fcclip_problems(m.fcclip.checkpoint)
    out += device_problems(cfg)
    if not out:  # weights only for a sound config (a bad arch names no meaningful checkpoint)
        for ck in weights.checkpoints(m, need):
            st = weights.locate(ck, m.weights)
            if st.problem:
                out.append(st.problem)
            elif st.source == "origin":
                host = origin_host(ck)
                if host and not reachable(host):
                    out.append(f"{ck.what} {ck.ref} is not cached here and its origin {host} cannot be reached "
                               f"(offline?): put it in the cache (`ragseg weights check` shows where), "
                               f"use a weights mirror (models.weights.mirror), or a local path")
    return out


ORIGIN_PROBE_S = 3.0  # one TCP connect to a checkpoint's origin before a download is attempted


def origin_host(ck) -> str | None:
    """The host a checkpoint would be downloaded from (Hugging Face, or an http(s) URL's); None for
    bucket URIs (their endpoints and credentials are the store's business)."""
    from urllib.parse import urlparse

    from ragseg.models import weights

    hf = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    if ck.kind == "hf":
        return hf
    if ck.kind == "open_clip":
        tag = weights.open_clip_tag_cfg(ck.model or "", ck.ref)
        return hf if tag.get("hf_hub") else urlparse(tag.get("url", "")).hostname
    if ck.ref.startswith(("http://", "https://")):
        return urlparse(ck.ref).hostname
    return None


_REACHABLE: dict[str, bool] = {}


def reachable(host: str, timeout: float = ORIGIN_PROBE_S) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` s (name lookup included: it
    runs in a thread, so a resolver that never answers costs ``timeout`` too). Cached per process."""
    if host in _REACHABLE:
        return _REACHABLE[host]
    import socket
    import threading

    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    _REACHABLE[host] = bool(ok and ok[0])
    return _REACHABLE[host]


def preflight(cfg: JobConfig, job: Job) -> None:
    """Raise one :class:`UserError` listing every problem of ``job``'s model sections."""
    found = problems(cfg, job)
    if found:
        raise UserError(f"{job} cannot start: " + " | ".join(" ".join(p.split()) for p in found))
