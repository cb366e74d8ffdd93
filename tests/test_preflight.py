"""Driver-side checks before Ray starts (ragseg.preflight) and a worker's UserError as one CLI line
(ragseg.errors.user_error_from_ray)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ragseg.errors import UserError, user_error_from_ray
from ragseg.preflight import models_needed, preflight, problems

BIN = Path(sys.executable).parent


def _cfg(tiny_cfg, **sets):
    from ragseg.config import apply_overrides

    data = apply_overrides(tiny_cfg.model_dump(mode="json"), [f"{k}={v}" for k, v in sets.items()])
    from ragseg.config import JobConfig

    return JobConfig.model_validate(data)


def test_models_needed(tiny_cfg):
    assert models_needed(tiny_cfg, "build-db") == {"clip"}
    assert models_needed(_cfg(tiny_cfg, **{"build_db.masks": "detector"}), "build-db") == {"clip", "sam", "gdino"}
    assert models_needed(_cfg(tiny_cfg, **{"label.proposals": "sam-grid"}), "label") == {"clip", "sam"}
    assert models_needed(_cfg(tiny_cfg, **{"label.proposals": "gt"}), "label") == {"clip"}
    assert problems(tiny_cfg, "build-db") == [] and problems(tiny_cfg, "label") == []


def test_sam_arch_without_checkpoint(tiny_cfg):
    cfg = _cfg(tiny_cfg, **{"models.sam.arch": "vit_h", "models.sam.checkpoint": "null",
                            "label.proposals": "sam-grid"})
    (p,) = problems(cfg, "label")
    assert "models.sam.checkpoint is required for arch vit_h" in p
    # a job that does not load SAM does not care
    assert problems(_cfg(tiny_cfg, **{"models.sam.arch": "vit_h", "models.sam.checkpoint": "null"}), "build-db") == []
    with pytest.raises(UserError) as ei:
        preflight(cfg, "label")
    assert str(ei.value).startswith("label cannot start: ") and "\n" not in str(ei.value)


def test_bad_sections_all_reported(tiny_cfg):
    cfg = _cfg(tiny_cfg, **{"build_db.masks": "detector", "models.sam.encoder_num_heads": 3,
                            "models.sam.image_size": 100, "models.gdino.tiny": "{bogus: 1}",
                            "models.clip.pretrained": "laion2b_nope"})
    found = problems(cfg, "build-db")
    text = " | ".join(found)
    assert "models.sam.image_size must be a multiple of 16" in text
    assert "divisible by encoder_num_heads" in text
    assert "models.gdino.tiny: unknown keys ['bogus']" in text
    assert "models.clip.pretrained 'laion2b_nope' is neither an open_clip tag" in text
    cfg = _cfg(tiny_cfg, **{"models.clip.model": "no-such-arch", "models.clip.model_cfg": "null"})
    assert "is not an open_clip architecture" in problems(cfg, "build-db")[0]
    cfg = _cfg(tiny_cfg, **{"models.clip.model": "ViT-B-32", "models.clip.model_cfg": "null",
                            "models.clip.pretrained": "null", "models.clip.mode": "pool"})
    assert "mode pool needs a timm" in problems(cfg, "build-db")[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_cuda_asked_without_cuda(tiny_cfg, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (p,) = problems(_cfg(tiny_cfg, **{"models.device.device": "cuda"}), "build-db")
    assert "models.device.device is cuda" in p and "ragseg env" in p
    # on a cluster the driver cannot speak for the workers
    assert problems(_cfg(tiny_cfg, **{"models.device.device": "cuda", "ray.address": "ray://head:10001"}),
                    "build-db") == []


def test_offline_missing_checkpoint_named(tiny_cfg, tmp_path, monkeypatch):
    from ragseg.models import weights

    monkeypatch.delenv("RAGSEG_CACHE", raising=False)
    url = "http://127.0.0.1:9/sam_vit_b_01ec64.pth"
    cfg = _cfg(tiny_cfg, **{"label.proposals": "sam-grid", "models.sam.checkpoint": url,
                            "models.weights.offline": "true", "models.weights.cache_dir": str(tmp_path)})
    (p,) = problems(cfg, "label")
    assert url in p and str(weights.cache_path(url, cfg.models.weights)) in p and "offline" in p
    # a local checkpoint path that is not there
    cfg = _cfg(tiny_cfg, **{"label.proposals": "sam-grid", "models.sam.checkpoint": str(tmp_path / "sam.pth")})
    assert "local file not found" in problems(cfg, "label")[0]
    # cached: fine, offline or not
    target = weights.cache_path(url, cfg.models.weights.model_copy(update={"cache_dir": str(tmp_path)}))
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    cfg = _cfg(tiny_cfg, **{"label.proposals": "sam-grid", "models.sam.checkpoint": url,
                            "models.weights.offline": "true", "models.weights.cache_dir": str(tmp_path)})
    assert problems(cfg, "label") == []


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from conftest import run_cli_main

    return run_cli_main(argv, capsys)


def test_cli_build_db_fails_before_ray(tiny_cfg_path, synthetic_root, tmp_path, capsys):
    import ray

    was = ray.is_initialized()
    code, out, err = _cli(["build-db", "--config", tiny_cfg_path, "--set", "source.kind=synthetic",
                           "--set", f"source.uri={synthetic_root}", "--set", "build_db.masks=detector",
                           "--set", "models.sam.arch=vit_h", "--set", "models.sam.checkpoint=null",
                           "--out", str(tmp_path / "db")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: build-db cannot start: models.sam.checkpoint is required for arch vit_h")
    assert ray.is_initialized() == was and not os.path.exists(tmp_path / "db")


# ----------------------------------------------------------------------------------------------
# A UserError raised inside a Ray worker
# ----------------------------------------------------------------------------------------------
def _mismatched_sam_checkpoint(tiny_cfg, tmp_path) -> str:
    """A real SAM state dict of another size: the arch/checkpoint mismatch only loading finds."""
    from ragseg.models.sam import build_sam_arch

    other = build_sam_arch(encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=1,
                           encoder_global_attn_indexes=[0], image_size=64, prompt_embed_dim=16)
    path = tmp_path / "sam_other.pth"
    torch.save(other.state_dict(), path)
    return str(path)


def test_worker_user_error_from_actor_constructor(ray_local, tiny_cfg, tmp_path):
    from ragseg.pipelines.common import add_stage
    from ragseg.stages.segment import Segment

    cfg = _cfg(tiny_cfg, **{"models.sam.checkpoint": _mismatched_sam_checkpoint(tiny_cfg, tmp_path),
                            "ray.model_actors": 1})
    assert problems(cfg, "label") == []  # the file exists: only loading it shows the mismatch
    ds = ray_local.data.from_items([{"image_id": "a", "error": ""}])
    ds = add_stage(ds, functools.partial(Segment, cfg), "segment", cfg, actor=True, batch_size=1, gpu=True)
    with pytest.raises(Exception) as ei:
        ds.take_all()
    assert len(str(ei.value).splitlines()) > 5  # what Ray hands the driver: a traceback
    found = user_error_from_ray(ei.value)
    assert isinstance(found, UserError)
    msg = str(found)
    assert msg.startswith("stage segment: SAM checkpoint ") and "does not match arch custom" in msg
    assert "\n" not in msg


def test_worker_user_error_from_task(ray_local):
    @ray_local.remote(max_retries=0)
    def decode_rows():
        from ragseg.config import ConfigError

        raise ConfigError("source.uri: bucket not found")

    with pytest.raises(Exception) as ei:
        ray_local.get(decode_rows.remote())
    found = user_error_from_ray(ei.value)
    assert type(found).__name__ == "ConfigError" and str(found) == "stage decode_rows: source.uri: bucket not found"
    # not a Ray error, or no UserError inside: nothing to report
    assert user_error_from_ray(UserError("driver side")) is None
    assert user_error_from_ray(RuntimeError("a bug")) is None


def test_cli_worker_user_error_one_line(tiny_cfg_path, synthetic_root, tmp_path):
    """Through the CLI: the worker's UserError comes back as one line naming the stage, exit code 2."""
    ck = _mismatched_sam_checkpoint(None, tmp_path)
    cmd = [str(BIN / "ragseg"), "build-db", "--config", tiny_cfg_path, "--set", "source.kind=synthetic",
           "--set", f"source.uri={synthetic_root}", "--set", "source.split=val", "--set", "source.limit=2",
           "--set", "build_db.masks=detector", "--set", f"models.sam.checkpoint={ck}",
           # one actor per model stage, and CPUs for all three (detect, segment, embed) plus a task: with
           # fewer, the segment actor may wait forever for a CPU instead of failing in its constructor
           "--set", "ray.num_cpus=4", "--set", "ray.model_actors=1", "--out", str(tmp_path / "db")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2, res.stderr[-3000:]
    assert last.startswith("error: stage segment: SAM checkpoint ") and "does not match arch custom" in last
    assert '"shards_total"' not in res.stdout  # no summary: the job failed
