"""Shared fixtures: a capped local Ray, the tiny config, deterministic seeds."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "test-tiny.yaml")

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_cfg_path() -> str:
    return TINY


@pytest.fixture
def tiny_cfg():
    from ragseg.config import load_config

    return load_config(TINY)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, capped to this small machine."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """A small synthetic panoptic set (all three layouts), made once per session."""
    from ragseg.sources.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(out), images=24, seed=0, size=96, val_fraction=0.25)
    return str(out)
