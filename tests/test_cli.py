"""CLI behaviour a user sees: config overrides, one-line errors with exit code 2, no tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ragseg.config import ConfigError, load_config

RAGSEG = os.path.join(os.path.dirname(sys.executable), "ragseg")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAGSEG, *args], capture_output=True, text=True, timeout=120)


def test_overrides_and_extends(tiny_cfg_path, tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {tiny_cfg_path}\nbuild_db:\n  images_per_shard: 7\n")
    cfg = load_config(str(child), ["label.ensemble.gamma=0.5", "models.clip.templates=['a {}.']", "ray.address=null"])
    assert cfg.build_db.images_per_shard == 7
    assert cfg.label.ensemble.gamma == 0.5
    assert cfg.models.clip.templates == ["a {}."]
    assert cfg.models.clip.model == "tiny-convnext"  # from the parent
    assert cfg.ray.address is None


@pytest.mark.parametrize("override, where", [
    ("models.clip.bogus=1", "models.clip.bogus"),
    ("label.ensemble.alpha=2", "label.ensemble.alpha"),
    ("ray.num_cpus=many", "ray.num_cpus"),
    ("source.shard=3/2", "source.shard"),
])
def test_bad_values_name_the_key(tiny_cfg_path, override, where):
    extra = ["source.kind=folder", "source.uri=/x"] if override.startswith("source") else []
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(tiny_cfg_path, extra + [override])


def test_circular_extends(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(a))


@pytest.mark.parametrize("args, needle", [
    (["build-db", "--config", "/nonexistent/c.yaml"], "config file not found: /nonexistent/c.yaml"),
    (["build-db", "--config", "configs/test-tiny.yaml", "--set", "models.clip.nope=1"], "models.clip.nope"),
    (["build-db", "--config", "configs/test-tiny.yaml"], "source"),
    (["build-index", "--db", "/nonexistent/db", "--out", "/tmp/x"], "manifest"),
    (["info", "/nonexistent/index"], "/nonexistent/index"),
    (["eval", "--gt-json", "/nonexistent/g.json", "--gt-dir", "/x", "--pred-json", "/y.json", "--pred-dir", "/z"],
     "/nonexistent/g.json"),
])
def test_user_errors_exit_2_one_line(args, needle):
    res = run(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]) == 1


def test_help_lists_commands():
    res = run("--help")
    assert res.returncode == 0
    for cmd in ("make-synthetic", "build-db", "build-index", "refresh", "search", "info", "label", "eval",
                "visualize", "demo"):
        assert cmd in res.stdout


def test_usage_error_is_short():
    res = run("build-db", "--no-such-option")
    assert res.returncode == 2
    assert "No such option" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("text, where, problem", [
    ('name: x\nsource:\n  kind: folder\n   uri: /x\n', ":4:7:", "mapping values are not allowed here"),
    ('name: x\nsource:\n  uri: "/tmp\n', ":4:1:", "quoted scalar at 3:8"),
    ("name: [x\n", ":2:1:", "flow sequence"),
])
def test_yaml_syntax_error_is_one_line(tmp_path, text, where, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert "\n" not in msg and f"{bad}{where}" in msg and problem in msg
    res = run("build-db", "--config", str(bad))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {msg}"]
