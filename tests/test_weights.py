"""ragseg.models.weights: local paths, URL download into the cache, cache hits, checksums, offline."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading

import pytest
import torch

from ragseg.config import WeightsConfig
from ragseg.errors import UserError
from ragseg.models import weights


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def served(tmp_path):
    """A checkpoint saved with torch.save, served over http on 127.0.0.1 from a thread."""
    root = tmp_path / "www"
    root.mkdir()
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    torch.save({"state_dict": sd}, root / "model.pt")
    sha = hashlib.sha256((root / "model.pt").read_bytes()).hexdigest()
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/model.pt"
    state = {"url": url, "sha": sha, "sd": sd, "server": server, "stopped": False}

    def stop():
        if not state["stopped"]:
            server.shutdown()
            server.server_close()
            state["stopped"] = True

    state["stop"] = stop
    yield state
    stop()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("RAGSEG_CACHE", raising=False)
    return WeightsConfig(cache_dir=str(tmp_path / "cache"))


def test_local_path_used_as_is(tmp_path, cache):
    p = tmp_path / "ck.pt"
    torch.save({"model": {"x": torch.zeros(2)}}, p)
    assert weights.resolve(str(p), cfg=cache) == str(p)
    assert weights.resolve(f"file://{p}", cfg=cache) == str(p)
    sd = weights.load_state_dict(p)
    assert list(sd) == ["x"]
    with pytest.raises(UserError, match="not found"):
        weights.resolve(str(tmp_path / "nope.pt"), cfg=cache)


def test_url_download_then_cache_hit(served, cache):
    path = weights.resolve(served["url"], sha256=served["sha"], cfg=cache)
    assert path.startswith(cache.cache_dir) and path.endswith("model.pt")
    sd = weights.load_state_dict(path)
    assert set(sd) == {"w", "b"} and torch.equal(sd["w"], served["sd"]["w"])
    # no temporary litter left next to the cached file
    assert [p.name for p in weights.cache_path(served["url"], cache).parent.iterdir()] == [
        weights.cache_path(served["url"], cache).name]
    served["stop"]()
    # the server is gone: a cache hit must not touch the network
    assert weights.resolve(served["url"], sha256=served["sha"], cfg=cache) == path
    assert weights.resolve(served["url"], cfg=WeightsConfig(cache_dir=cache.cache_dir, offline=True)) == path


def test_env_var_overrides_cache_dir(served, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGSEG_CACHE", str(tmp_path / "envcache"))
    path = weights.resolve(served["url"], cfg=WeightsConfig(cache_dir=str(tmp_path / "other")))
    assert path.startswith(str(tmp_path / "envcache"))


def test_checksum_mismatch_not_cached(served, cache):
    with pytest.raises(weights.ChecksumError, match="sha256 mismatch"):
        weights.resolve(served["url"], sha256="0" * 64, cfg=cache)
    target = weights.cache_path(served["url"], cache)
    assert not target.exists()
    assert not any(target.parent.iterdir())  # the bad download was discarded, tmp included
    # the right checksum then works
    assert weights.resolve(served["url"], sha256=served["sha"], cfg=cache) == str(target)
    # a local file with the wrong checksum is refused too
    with pytest.raises(weights.ChecksumError):
        weights.resolve(str(target), sha256="1" * 64, cfg=cache)


def test_offline_missing_message(served, cache):
    offline = WeightsConfig(cache_dir=cache.cache_dir, offline=True)
    target = weights.cache_path(served["url"], offline)
    with pytest.raises(UserError) as ei:
        weights.resolve(served["url"], cfg=offline, what="SAM checkpoint")
    msg = str(ei.value)
    assert "SAM checkpoint" in msg and served["url"] in msg and str(target) in msg
    assert "local path" in msg and "\n" not in msg


def test_fetch_failure_missing_message(cache):
    url = "http://127.0.0.1:9/missing.pt"  # discard port: connection refused
    with pytest.raises(UserError) as ei:
        weights.resolve(url, cfg=cache)
    msg = str(ei.value)
    assert "download failed" in msg and str(weights.cache_path(url, cache)) in msg
