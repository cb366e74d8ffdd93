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


# ----------------------------------------------------------------------------------------------
# The weights mirror: sync into S3 (moto on 127.0.0.1) / a folder, then load from it
# ----------------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

TAG = "ragsegtest"  # an open_clip pretrained tag registered for the tiny test architecture
HUB_REPO = "ragseg-test/tiny-convnext-clip"


def _serve(root: Path):
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _fill_hub_cache(hub_dir: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """A Hugging Face hub cache entry as huggingface_hub writes it (the layout its docs describe:
    models--<org>--<name>/{refs/main, blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/...})."""
    base = hub_dir / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    (base / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


@pytest.fixture
def open_clip_tag():
    """Register TAG as an open_clip pretrained tag of the tiny architecture, hosted on HUB_REPO."""
    from open_clip import pretrained as ocp

    ocp._PRETRAINED.setdefault("tiny-convnext", {})[TAG] = ocp._pcfg(hf_hub=HUB_REPO + "/")
    yield TAG
    ocp._PRETRAINED["tiny-convnext"].pop(TAG, None)


@pytest.fixture
def origin(tmp_path, tiny_cfg, open_clip_tag):
    """Tiny real checkpoints at their origins: a SAM state dict and a saved Grounding DINO folder on
    a local http server, the CLIP tag's weights in a pre-filled open_clip hub cache (cache A)."""
    from ragseg.models.clip import load_clip
    from ragseg.models.gdino import load_gdino
    from ragseg.models.sam import load_sam

    www = tmp_path / "www"
    www.mkdir()
    sam = load_sam(tiny_cfg.models)
    torch.save(sam.state_dict(), www / "sam_tiny.pth")
    model, processor, _ = load_gdino(tiny_cfg.models)
    model.save_pretrained(www / "gdino")
    processor.save_pretrained(www / "gdino")
    clip = load_clip(tiny_cfg.models, device="cpu", cache=False)
    clip_bytes = www / "clip.bin"
    torch.save(clip.model.state_dict(), clip_bytes)
    cache_a = tmp_path / "cache-a"
    _fill_hub_cache(cache_a / "open_clip", HUB_REPO, {"open_clip_pytorch_model.bin": clip_bytes.read_bytes()})
    server, base = _serve(www)
    state = {"www": www, "base": base, "cache_a": cache_a, "server": server, "sam": sam.state_dict(),
             "clip": clip.model.state_dict()}
    yield state
    server.shutdown()
    server.server_close()


def _cfg_for(tiny_cfg, origin, cache: Path, **weights_kw):
    cfg = tiny_cfg.model_copy(deep=True)
    m = cfg.models
    m.clip.pretrained = TAG
    m.sam.checkpoint = origin["base"] + "/sam_tiny.pth"
    m.gdino.model_id = origin["base"] + "/gdino"
    m.weights = WeightsConfig(cache_dir=str(cache), **weights_kw)
    return cfg


@pytest.fixture
def no_env_cache(monkeypatch):
    monkeypatch.delenv("RAGSEG_CACHE", raising=False)


@pytest.fixture
def s3(monkeypatch, moto_starter):
    """A moto S3 server of its own on 127.0.0.1, one bucket."""
    proc, endpoint = moto_starter()
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.filesystem("s3").mkdir("mirror-test")
    try:
        yield "s3://mirror-test/weights"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait(timeout=10)


def test_checkpoints_named_by_config(tiny_cfg, open_clip_tag):
    assert weights.checkpoints(tiny_cfg.models) == []  # random weights: nothing to fetch
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.clip.pretrained = TAG
    cfg.models.sam.checkpoint = "https://example.invalid/sam_vit_h_4b8939.pth"
    cfg.models.gdino.model_id = "IDEA-Research/grounding-dino-base"
    cks = {c.field: c for c in weights.checkpoints(cfg.models)}
    assert cks["models.clip.pretrained"].kind == "open_clip"
    assert cks["models.sam.checkpoint"].kind == "file"
    assert cks["models.sam.checkpoint"].entry.startswith("files/") and \
        cks["models.sam.checkpoint"].file_name == "sam_vit_h_4b8939.pth"
    assert cks["models.gdino.model_id"].kind == "hf"
    assert cks["models.gdino.model_id"].entry == "hf/IDEA-Research--grounding-dino-base/main"
    assert [c.field for c in weights.checkpoints(cfg.models, {"sam"})] == ["models.sam.checkpoint"]


def test_sync_to_s3_then_load_from_mirror_only(tiny_cfg, origin, s3, tmp_path, no_env_cache):
    import fsspec

    from ragseg.models.clip import load_clip
    from ragseg.models.gdino import load_gdino
    from ragseg.models.sam import load_sam

    src = _cfg_for(tiny_cfg, origin, origin["cache_a"])
    records = weights.sync(src.models, s3)
    assert {r["field"]: r["kind"] for r in records} == {
        "models.clip.pretrained": "open_clip", "models.sam.checkpoint": "file", "models.gdino.model_id": "dir"}
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    for r in records:
        sums = weights.read_sums(r["entry"])
        assert sums == r["sha256"] and r["bytes"] > 0
        for name, sha in sums.items():  # the mirror holds exactly what SHA256SUMS says
            assert hashlib.sha256(fs.cat(r["entry"] + "/" + name)).hexdigest() == sha
    sam_sha = hashlib.sha256((origin["www"] / "sam_tiny.pth").read_bytes()).hexdigest()
    over = weights.sync_overrides(src.models, records, s3)
    assert over == [f"models.weights.mirror={s3}", f"models.sam.sha256={sam_sha}"]
    assert "config.json" in next(r for r in records if r["kind"] == "dir")["sha256"]
    # a second sync finds the same sha256s and rewrites nothing
    assert weights.sync(src.models, s3) == records

    # a fresh node: empty cache, the origins gone, offline (no origin may be used), the mirror set
    origin["server"].shutdown()
    origin["server"].server_close()
    node = _cfg_for(tiny_cfg, origin, tmp_path / "cache-b", offline=True, mirror=s3)
    node.models.sam.sha256 = sam_sha
    before = {c.field: weights.locate(c, node.models.weights) for c in weights.checkpoints(node.models)}
    assert {f: (s.source, s.cached, s.problem) for f, s in before.items()} == {
        f: ("mirror", False, None) for f in before}
    assert all(s.size and s.size > 0 for s in before.values())

    sam = load_sam(node.models)
    assert all(torch.equal(v, origin["sam"][k]) for k, v in sam.state_dict().items())
    model, processor, model_id = load_gdino(node.models)
    assert model_id == origin["base"] + "/gdino"  # the model id keeps the configured reference
    clip = load_clip(node.models, device="cpu", cache=False)
    assert clip.model_id == f"open_clip:tiny-convnext/{TAG}"
    assert all(torch.equal(v, origin["clip"][k]) for k, v in clip.model.state_dict().items())

    after = {c.field: weights.locate(c, node.models.weights, verify=True) for c in weights.checkpoints(node.models)}
    assert {f: (s.source, s.cached, s.verified) for f, s in after.items()} == {
        f: ("cache", True, True) for f in after}


def test_mirror_folder_corrupt_entry_refused(tiny_cfg, origin, tmp_path, no_env_cache):
    mirror = tmp_path / "mirror"
    src = _cfg_for(tiny_cfg, origin, origin["cache_a"])
    records = weights.sync(src.models, str(mirror), {"sam"})
    entry = Path(records[0]["entry"])
    (entry / "sam_tiny.pth").write_bytes(b"not a checkpoint")
    node = _cfg_for(tiny_cfg, origin, tmp_path / "cache-b", offline=True, mirror=str(mirror))
    with pytest.raises(weights.ChecksumError, match="sha256 mismatch"):
        weights.resolve(node.models.sam.checkpoint, cfg=node.models.weights, what="SAM checkpoint")
    assert not weights.cache_path(node.models.sam.checkpoint, node.models.weights).exists()


def test_offline_not_in_mirror_names_file_and_place(tiny_cfg, origin, tmp_path, no_env_cache):
    node = _cfg_for(tiny_cfg, origin, tmp_path / "cache-b", offline=True, mirror=str(tmp_path / "empty"))
    st = {c.field: weights.locate(c, node.models.weights) for c in weights.checkpoints(node.models)}
    for s in st.values():
        assert s.source == "missing" and s.problem and "\n" not in s.problem
    sam = st["models.sam.checkpoint"].problem
    assert "sam_tiny.pth" in sam and str(weights.cache_path(node.models.sam.checkpoint, node.models.weights)) in sam
    assert "weights sync" in sam
    with pytest.raises(UserError, match="offline mode and not cached"):
        weights.resolve_open_clip("tiny-convnext", TAG, node.models.weights)


def test_gdino_hub_id_from_prefilled_cache_then_mirror(tiny_cfg, origin, tmp_path, no_env_cache):
    """A hub id resolves from the hub cache (no network), syncs as a model folder, then loads on a
    node that only has the mirror."""
    from ragseg.models.gdino import load_gdino

    files = {p.name: p.read_bytes() for p in (origin["www"] / "gdino").iterdir()}
    cache_a = tmp_path / "hub-cache"
    _fill_hub_cache(cache_a / "hf", "ragseg-test/tiny-gdino", files)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.models.gdino.model_id = "ragseg-test/tiny-gdino"
    cfg.models.weights = WeightsConfig(cache_dir=str(cache_a), offline=True)
    (ck,) = weights.checkpoints(cfg.models, {"gdino"})
    assert ck.kind == "hf" and weights.locate(ck, cfg.models.weights).source == "cache"
    load_gdino(cfg.models)
    mirror = tmp_path / "mirror"
    (rec,) = weights.sync(cfg.models, str(mirror), {"gdino"})
    assert rec["entry"].endswith("hf/ragseg-test--tiny-gdino/main") and "config.json" in rec["sha256"]
    cfg.models.weights = WeightsConfig(cache_dir=str(tmp_path / "node"), offline=True, mirror=str(mirror))
    assert weights.locate(ck, cfg.models.weights).source == "mirror"
    _, _, model_id = load_gdino(cfg.models)
    assert model_id == "ragseg-test/tiny-gdino"
    assert weights.locate(ck, cfg.models.weights, verify=True).verified is True


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from conftest import run_cli_main

    return run_cli_main(argv, capsys)


def test_cli_weights_sync_and_check(tiny_cfg_path, origin, tmp_path, capsys, no_env_cache):
    mirror = str(tmp_path / "mirror")
    sets = ["--set", f"models.sam.checkpoint={origin['base']}/sam_tiny.pth",
            "--set", f"models.gdino.model_id={origin['base']}/gdino",
            "--set", f"models.weights.cache_dir={tmp_path / 'cache-c'}"]
    code, out, err = _cli(["weights", "check", "--config", tiny_cfg_path, *sets, "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["field"], r["source"], r["cached"]) for r in rows] == [
        ("models.sam.checkpoint", "origin", False), ("models.gdino.model_id", "origin", False)]

    written = tmp_path / "mirrored.yaml"
    code, out, err = _cli(["weights", "sync", "--config", tiny_cfg_path, *sets, "--to", mirror,
                           "--write-config", str(written)], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["overrides"][0] == f"models.weights.mirror={mirror}" and res["config"] == str(written)
    assert len(res["checkpoints"]) == 2

    # the written config, on a node with an empty cache and no origin: everything from the mirror
    origin["server"].shutdown()
    origin["server"].server_close()
    node = ["--set", f"models.weights.cache_dir={tmp_path / 'cache-d'}", "--set", "models.weights.offline=true"]
    code, out, err = _cli(["weights", "check", "--config", str(written), *node], capsys)
    assert code == 0, err
    assert out.count("mirror") >= 2 and "MISMATCH" not in out
    from ragseg.config import load_config
    from ragseg.models.sam import load_sam

    load_sam(load_config(str(written), node[1::2]).models)
    code, out, err = _cli(["weights", "check", "--config", str(written), *node, "--json"], capsys)
    rows = {r["field"]: r for r in json.loads(out)}
    assert rows["models.sam.checkpoint"]["source"] == "cache" and rows["models.sam.checkpoint"]["verified"] is True

    # no mirror, offline, not cached: one line naming the file, exit code 2
    code, out, err = _cli(["weights", "check", "--config", tiny_cfg_path, *sets[:4], "--set",
                           f"models.weights.cache_dir={tmp_path / 'cache-e'}", "--set", "models.weights.offline=true"],
                          capsys)
    assert code == 2 and err.startswith("error: 2 checkpoint(s) cannot be loaded") and err.count("\n") == 1
    assert "sam_tiny.pth" in err
