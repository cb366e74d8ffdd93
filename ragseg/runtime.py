"""Ray start-up and device selection, shared by every job."""

from __future__ import annotations

import logging
import os

from ragseg.config import DeviceConfig, RayConfig
from ragseg.errors import UserError

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig, address: str | None = None) -> None:
    """Join a cluster or start a fresh local Ray.

    The address comes from the ``address`` argument, then ``cfg.address``, then ``RAY_ADDRESS``
    (``auto`` joins the cluster this machine belongs to). Without one a *new* local instance is
    started (``address="local"``: a stale cluster file from a crashed ``ray start`` is ignored), capped
    at ``cfg.num_cpus`` CPUs and ``cfg.object_store_memory`` bytes, bound to ``cfg.node_ip_address``
    (127.0.0.1 by default: nothing but this machine talks to a local instance). A cluster that
    cannot be reached is a :class:`UserError` (one line, exit code 2)."""
    # Ray Data's per-dataset INFO lines and its own progress bars would fight with ours
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    addr = address or cfg.address or os.environ.get("RAY_ADDRESS")
    if addr and addr not in ("local", "auto"):
        _probe(addr, cfg.connect_timeout_s)
    try:
        if addr and addr != "local":
            ray.init(address=addr, log_to_driver=True, logging_level=logging.WARNING)
        else:
            os.environ.pop("RAY_ADDRESS", None)  # "local" must not be overridden by the environment
            ray.init(
                address="local",
                num_cpus=cfg.num_cpus,
                object_store_memory=cfg.object_store_memory,
                _node_ip_address=cfg.node_ip_address,
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=True,
                logging_level=logging.WARNING,
            )
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:300]
        where = f"the Ray cluster at {addr!r}" if addr and addr != "local" else "a local Ray instance"
        raise UserError(f"could not start or reach {where}: {type(e).__name__}: {msg}") from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ragseg draws one bar over images (ray.progress)
    ctx.max_errored_blocks = cfg.max_errored_blocks


def set_scheduler_wait(seconds: float | None) -> float | None:
    """Set how long Ray Data's scheduling loop (in this driver) waits for task completions per step
    (``ray.scheduler_wait_s``); returns the value it replaces (None: nothing set). Ray Data keeps it in
    a module constant of its streaming executor (``WAIT_FOR_TASK_COMPLETION_TIMEOUT_S``, read at every
    step); with a Ray Data that has none, the setting is ignored with a warning."""
    from ray.data._internal.execution import streaming_executor_state as ses

    if seconds is None:
        return None
    old = getattr(ses, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", None)
    if old is None:
        log.warning("ray.scheduler_wait_s is ignored: this Ray Data has no WAIT_FOR_TASK_COMPLETION_TIMEOUT_S")
        return None
    ses.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = float(seconds)
    return old


def _probe(addr: str, timeout: float) -> None:
    """One TCP connect to the cluster's address (GCS ``host:port`` or ``ray://host:port``), so an
    unreachable cluster is one line after ``timeout`` s, not minutes of Ray's own retries."""
    import socket

    hostport = addr.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"Ray address {addr!r} is not host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {addr!r} ({type(e).__name__}: {e}); is it running, "
                        "and is the address (--address / ray.address / RAY_ADDRESS) right?") from None


def quiet_ray_data() -> None:
    """Ray Data logs each dataset's execution at INFO and warns whenever a ragged per-image list column
    is stored as pickled objects, which is how ragseg's batches are meant to travel: keep both quiet."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.tensor_extensions.arrow").setLevel(logging.ERROR)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def select_device(cfg: DeviceConfig) -> str:
    import torch

    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            log.warning("device 'cuda' asked for but CUDA is not available; using CPU")
            return "cpu"
        return "cuda"
    if cfg.device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: str, cfg: DeviceConfig):
    """Autocast context: bf16 (or fp16) on CUDA, nothing on CPU unless asked."""
    import contextlib

    import torch

    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if device == "cuda" else "fp32"
    if prec == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if prec == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)
