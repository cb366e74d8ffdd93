"""A newcomer's first hour (issue 25), end to end through the ``ragseg`` command as a user runs it:
make-synthetic, build-db, build-index, search without a config, label with an inline vocabulary,
Ctrl-C and resume, and the failures that must be one line, exit code 2, with no folder left behind.

Full job runs are few and shared (module fixture ``world``: one build-db, one build-index, one label;
the Ctrl-C test adds two interrupted runs and the resume); everything else fails before Ray starts
or runs in this process. Timings are printed, never asserted.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ragseg import faults

RAGSEG = os.path.join(os.path.dirname(sys.executable), "ragseg")
MAX_JOB_STDERR_LINES = 5


def ragseg(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """One CLI run with stdout and stderr piped (not a terminal: ragseg prints plain lines)."""
    t0 = time.time()
    res = subprocess.run([RAGSEG, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"ragseg {args[0]}: rc {res.returncode} in {time.time() - t0:.1f} s\n{res.stderr}")
    return res


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed as a user error: exit code 2 and exactly one stderr line, ``error: ...``."""
    err = lines(res.stderr)
    assert res.returncode == 2, res.stderr
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_cfg_path):
    """A synthetic set, a config for it, a DB, an index and a label output, all made by the CLI."""
    root = tmp_path_factory.mktemp("first_hour")
    data = str(root / "data")
    res = ragseg("make-synthetic", "--out", data, "--images", "24", "--size", "96", "--seed", "3")
    assert res.returncode == 0, res.stderr
    cfg = root / "tiny.yaml"
    cfg.write_text(f"extends: {tiny_cfg_path}\nsource: {{kind: synthetic, uri: {data}, split: train}}\n"
                   "build_db: {images_per_shard: 4}\nlabel: {images_per_shard: 4}\n")
    w = {"root": root, "data": data, "cfg": str(cfg), "db": str(root / "db"), "index": str(root / "index"),
         "labels": str(root / "labels")}
    w["build_db"] = ragseg("build-db", "--config", w["cfg"], "--out", w["db"])
    assert w["build_db"].returncode == 0, w["build_db"].stderr
    w["build_index"] = ragseg("build-index", "--db", w["db"], "--out", w["index"], "--config", w["cfg"],
                              "--set", "index.min_recall_at_10=0", "--set", "index.min_vote_agreement=0")
    assert w["build_index"].returncode == 0, w["build_index"].stderr
    cats = json.loads(open(os.path.join(data, "categories.json")).read())
    w["names"] = [c["name"] for c in cats]
    # a label run with no config at all: images, an inline vocabulary, the index; gt proposals need the
    # synthetic layout's ground truth, given as overrides
    w["label"] = ragseg("label", "--vocab", ",".join(w["names"]), "--index", w["index"], "--out", w["labels"],
                        "--proposals", "gt", "--set", "label.images.kind=synthetic",
                        "--set", f"label.images.uri={data}", "--set", "label.images.split=val",
                        "--set", "label.images_per_shard=4", "--set", "ray.num_cpus=2",
                        "--set", "ray.object_store_memory=300000000")
    assert w["label"].returncode == 0, w["label"].stderr
    return w


# ----------------------------------------------------------------------------------------------
# a quiet console
# ----------------------------------------------------------------------------------------------
def test_build_db_prints_only_its_own_lines(world):
    res = world["build_db"]
    err = lines(res.stderr)
    assert 1 <= len(err) <= MAX_JOB_STDERR_LINES, err
    assert all(ln.startswith("build-db: ") for ln in err), err  # no Ray, no warnings, no ANSI codes
    assert "\x1b" not in res.stderr
    done = err[-1]
    assert world["db"] in done and "18 images" in done and "0 errors" in done and "images/s" in done
    summary = json.loads(res.stdout)  # stdout is the JSON result, nothing else
    assert summary["images"] == 18
    logs = glob.glob(os.path.join(world["db"], "_logs", "*-build-db-*.log"))
    assert len(logs) == 1 and os.path.getsize(logs[0]) > 0  # Ray's own output went there


def test_build_index_hides_faiss_lines(world):
    err = lines(world["build_index"].stderr)
    assert not any("_staging" in ln or "IO_FLAG" in ln or "WARNING" in ln for ln in err), err
    assert glob.glob(os.path.join(world["index"], "_logs", "*-build-index-*.log"))


def test_search_without_config_takes_the_embedder_from_the_index(world):
    image = sorted(glob.glob(os.path.join(world["data"], "coco", "val", "*.jpg")))[0]
    res = ragseg("search", "--index", world["index"], "--image", image, "--box", "0,0,48,48", "-k", "3")
    assert res.returncode == 0, res.stderr
    hits = json.loads(res.stdout)
    assert len(hits) == 3 and hits[0]["label"] in world["names"]
    assert lines(res.stderr) == []  # open_clip's warning and faiss's notices are not the user's business
    loud = ragseg("search", "-v", "--index", world["index"], "--image", image, "--box", "0,0,48,48", "-k", "3")
    assert loud.returncode == 0 and "No pretrained weights loaded" in loud.stderr  # -v shows them


def test_label_with_inline_vocabulary_and_pycocotools_masks(world):
    from pycocotools import mask as mask_utils

    res = world["label"]
    err = lines(res.stderr)
    assert 1 <= len(err) <= MAX_JOB_STDERR_LINES and all(ln.startswith("label: ") for ln in err), err
    out = world["labels"]
    files = sorted(glob.glob(os.path.join(out, "segments", "*.parquet")))
    table = pq.read_table(files[0])
    row = table.slice(0, 1).to_pylist()[0]
    mask = mask_utils.decode(row["mask_rle"])  # as stored: no JSON to parse, no counts to re-encode
    assert mask.sum() == row["area"] and row["label"] in world["names"]
    from ragseg.labels_out import decode_mask

    assert (decode_mask(row) == mask.astype(bool)).all()
    # provenance: in the Parquet schema metadata, the manifest, panoptic.json and `ragseg info`
    prov = json.loads(table.schema.metadata[b"ragseg.provenance"])
    assert [c["name"] for c in prov["vocabulary"]] == world["names"]
    assert prov["proposals"] == "gt" and prov["index"]["uri"] == world["index"] and prov["index"]["version"]
    assert "ensemble" in prov and prov["models"][0]["id"] == "open_clip:tiny-convnext/random"
    assert "models:" in prov["config_yaml"] and prov["ragseg_version"]
    pj = json.loads(open(os.path.join(out, "panoptic.json")).read())
    assert pj["info"]["provenance"]["vocabulary"] == prov["vocabulary"]
    info = ragseg("info", out)
    assert info.returncode == 0
    shown = json.loads(info.stdout)
    assert shown["committed"]["images"] == 6 and "manifest_segment_files" in shown["ledger"]
    assert shown["provenance"]["index"]["uri"] == world["index"]


def test_db_and_index_describe_themselves(world):
    from ragseg import provenance

    feature = sorted(glob.glob(os.path.join(world["db"], "features", "*.parquet")))[0]
    prov = provenance.read_parquet(feature)
    assert prov["job"] == "build-db" and prov["source"]["split"] == "train" and prov["embedder"]["dim"] == 64
    meta = json.loads(open(glob.glob(os.path.join(world["index"], "v0*", "meta.json"))[0]).read())
    assert meta["embedder"]["model"] == "open_clip:tiny-convnext/random" and meta["embedder"]["clip"]["model_cfg"]
    assert meta["provenance"]["db"]["provenance"]["job"] == "build-db"
    labels_file = glob.glob(os.path.join(world["index"], "v0*", "labels.parquet"))[0]
    assert provenance.read_parquet(labels_file)["job"] == "build-index"


# ----------------------------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------------------------
def _committed(out: str) -> int:
    from conftest import committed_pieces

    return committed_pieces(out)


def _interrupt(args: list[str], out: str, signals: int, slow_writes_s: float = 0.0
               ) -> tuple[subprocess.CompletedProcess, float]:
    """Start a job, send ``signals`` SIGINTs once it has committed a piece more than before, wait.
    ``slow_writes_s``: every write of the job (driver and workers) takes that much longer
    (ragseg.faults), so that pieces are still in flight when the signals land."""
    before = _committed(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if slow_writes_s:
        env[faults.SLOW_WRITES] = str(slow_writes_s)
    proc = subprocess.Popen([RAGSEG, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and _committed(out) <= before:
        time.sleep(0.1)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    t0 = time.time()
    for _ in range(signals):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    stdout, stderr = proc.communicate(timeout=300)
    took = time.time() - t0
    print(f"{signals} SIGINT: exit {proc.returncode} after {took:.1f} s\n{stderr}")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), took


def _features(db: str) -> pa.Table:
    t = pa.concat_tables([pq.read_table(f) for f in glob.glob(os.path.join(db, "features", "*.parquet"))])
    t = t.select(["image_id", "segment_id", "label", "area", "mask_rle", "embedding"])
    return t.sort_by([("image_id", "ascending"), ("segment_id", "ascending")])


def test_ctrl_c_stops_and_a_rerun_resumes(world, tmp_path):
    out = str(tmp_path / "db")
    # a piece an image, read one piece at a time, every write 0.2 s slower: the Ctrl-C lands with work
    # left (on an idle machine the 18 tiny pieces could otherwise all be in flight, and all commit, by the
    # time the first commit shows; in-flight pieces may still commit)
    args = ["build-db", "--config", world["cfg"], "--out", out, "--set", "build_db.images_per_shard=1",
            "--set", "ray.pieces_per_read_task=1", "--set", "ray.read_concurrency=1"]
    first, _ = _interrupt(args, out, signals=1, slow_writes_s=0.2)
    err = lines(first.stderr)
    assert first.returncode == 130, first.stderr
    n = _committed(out)
    assert err[-1] == f"interrupted: {n} pieces committed; rerun the same command to resume"
    assert 1 <= n < 18
    # the second Ctrl-C exits at once; on a folder of its own, so that the job still has work when
    # the signals land (the first run's workers may have committed all but a piece or two meanwhile)
    out2 = str(tmp_path / "db2")
    args2 = [*args[:args.index("--out")], "--out", out2, *args[args.index("--out") + 2:]]
    second, _ = _interrupt(args2, out2, signals=2, slow_writes_s=0.2)
    assert second.returncode == 130 and "interrupted again" in lines(second.stderr)[-1], second.stderr
    resumed = ragseg(*args)
    assert resumed.returncode == 0, resumed.stderr
    clean, again = _features(world["db"]), _features(out)
    assert again.num_rows == clean.num_rows
    for col in clean.column_names:
        assert again.column(col).to_pylist() == clean.column(col).to_pylist(), col


# ----------------------------------------------------------------------------------------------
# failures: one line, exit code 2, no folder left behind
# ----------------------------------------------------------------------------------------------
def test_user_failures_are_one_line_and_leave_nothing(world, tmp_path):
    cfg = world["cfg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    cases = [
        (["build-db", "--config", cfg, "--set", "source.kind=folder", "--set", f"source.uri={empty}", "--out", out],
         ["no images to process", str(empty)]),
        (["build-db", "--config", cfg, "--set", "source.split=trian", "--out", out],
         ["source.split 'trian'", "splits there: train, val"]),
        (["build-db", "--config", cfg, "--set", "ray.num_cpus=abc", "--out", out], ["--set ray.num_cpus=abc"]),
        (["build-db", "--config", cfg, "--set", "ray.num_cpu=2", "--out", out], ["did you mean ray.num_cpus?"]),
        (["label", "--config", cfg, "--images", os.path.join(world["data"], "coco", "val"), "--vocab", "ball.csv",
          "--index", world["index"], "--out", out], ["vocabulary file not found: ball.csv", "ball,crate,sky"]),
        # the index's keys were pooled at 512: a label config pooling at 256 stops, for every proposal method
        (["label", "--config", cfg, "--images", os.path.join(world["data"], "coco", "val"), "--vocab", "ball,sky",
          "--index", world["index"], "--out", out, "--proposals", "sam-grid", "--set", "models.clip.pool_image_size=256"],
         ["pool_image_size 512 there vs 256 here"]),
    ]
    for args, needles in cases:
        one_line_error(ragseg(*args), *needles)
        assert not os.path.exists(out), args


def test_unwritable_output_is_one_line(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    args = [RAGSEG, "build-db", "--config", world["cfg"], "--out", str(ro / "db")]
    if os.geteuid() != 0:
        ro.chmod(0o500)
        cmd = args
    elif subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0:
        # root ignores file modes: a read-only file system in a private mount namespace
        cmd = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{ro}" && exec "$@"', "sh", *args]
    else:
        pytest.skip("running as root without unshare: no way to make an unwritable folder")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    one_line_error(res, str(ro / "db"))
    assert "read-only" in res.stderr or "permission denied" in res.stderr


def test_label_identity_check_for_every_proposal_method(world):
    from ragseg.config import load_config
    from ragseg.errors import UserError
    from ragseg.pipelines.label import _check_index, adopt_index_embedder

    for proposals in ("gt", "gdino-sam", "sam-grid"):
        ok = load_config(world["cfg"], [f"label.proposals={proposals}"])
        _check_index(ok, world["index"])
        for bad, field in (("models.clip.pool_image_size=256", "pool_image_size"), ("models.clip.seed=1", "weights"),
                           ("models.clip.model_cfg.embed_dim=32", "dim")):
            cfg = load_config(world["cfg"], [f"label.proposals={proposals}", bad])
            with pytest.raises(UserError, match=field) as e:
                _check_index(cfg, world["index"])
            assert "\n" not in str(e.value)
    # FC-CLIP's queries are its own mask-pooled dense features (mode fcclip): a DB of pooled crops is refused
    with pytest.raises(UserError, match="mode pool there vs fcclip here") as e:
        _check_index(load_config(world["cfg"], ["label.proposals=fcclip"]), world["index"])
    assert "\n" not in str(e.value)
    # a config that says nothing about CLIP embeds like the index
    bare = adopt_index_embedder(load_config(None, ["label.proposals=sam-grid"]), world["index"])
    assert bare.models.clip.model == "tiny-convnext" and bare.models.clip.pool_image_size == 512
    _check_index(bare, world["index"])


def test_full_disk_and_internal_errors_in_the_runner(tmp_path, monkeypatch):
    """A full disk (ENOSPC, as a Ray worker raises it: wrapped, deep in a chain) is one line naming the
    folder and the bytes free; an unexpected error is one line naming the log that holds its trace; a
    folder that got no commit is removed (user error) or marked as not started (internal error)."""
    import errno

    from ragseg import ledger
    from ragseg.errors import UserError
    from ragseg.failures import InternalError
    from ragseg.jobs.runner import run_job

    out = str(tmp_path / "db")

    def full_disk():
        ledger.write_header(out, ledger.new_header("db"))
        try:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(out, "features", "p.parquet"))
        except OSError as e:
            raise RuntimeError("ray.exceptions.RayTaskError(UserCodeException): UDF failed") from e

    with pytest.raises(UserError) as e:
        run_job("build-db", out, full_disk)
    assert "no space left on device" in str(e.value) and out in str(e.value) and "bytes" in str(e.value)
    assert not os.path.exists(out)  # it made the folder and committed nothing: gone

    def bug():
        ledger.write_header(out, ledger.new_header("db"))
        raise KeyError("oops")

    with pytest.raises(InternalError) as e:
        run_job("build-db", out, bug)
    assert "KeyError" in str(e.value) and "full trace in" in str(e.value)
    # the folder is kept for its log but is not a DB any more: info and a rerun treat it as new
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    from typer.testing import CliRunner

    from ragseg.jobs.cli import app

    shown = CliRunner().invoke(app, ["info", out])
    assert shown.exit_code == 0 and "not started" in shown.output


def test_ray_wrapped_os_error_is_classified(ray_local):
    import errno

    from ragseg.failures import classify

    @ray_local.remote
    def write():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/features/p.parquet")

    with pytest.raises(Exception) as e:  # noqa: PT011 - whatever Ray wraps it in
        ray_local.get(write.remote())
    got = classify(e.value, "/data/out")
    assert got is not None and "no space left on device while writing /data/out" in str(got)


def test_empty_file_reason_is_readable(tmp_path):
    from ragseg.stages.decode import decode_image

    with pytest.raises(Exception, match=r"empty file \(0 bytes\)"):
        decode_image(b"")
    with pytest.raises(Exception, match="not an image format PIL reads") as e:
        decode_image(b"hello")
    assert "BytesIO" not in str(e.value)


def test_inline_vocabulary_json_and_text_are_the_same(tmp_path):
    from ragseg.vocab import load_vocab

    (tmp_path / "v.txt").write_text("ball\ncrate\nsky\n")
    (tmp_path / "v.json").write_text('["ball", "crate", "sky"]')
    got = [load_vocab(s).categories() for s in ("ball,crate,sky", str(tmp_path / "v.txt"), str(tmp_path / "v.json"))]
    assert got[0] == got[1] == got[2] and [c["isthing"] for c in got[0]] == [1, 1, 0]
    assert np.array_equal(load_vocab("ball,sky:thing").isthing, [True, True])
