"""The commit ledger (ragseg.ledger): records, compaction, readers during compaction, the lease,
the one-line refusal and migration of format-1 folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from ragseg import io, ledger
from ragseg.errors import UserError


def _rec(name: str, ids: list[str], segs: int = 3, epoch: int = 0) -> dict:
    return ledger.new_record(name, ids, images=len(ids), segments=segs, errors=0, empty_images=0,
                             data_path=f"features/{name}.parquet", errors_path=None, parts_path=None,
                             stage_seconds={"embed": 0.5}, epoch=epoch)


def test_commit_compact_and_read_back(tmp_path):
    root = str(tmp_path / "db")
    header = ledger.new_header("db", dim=4)
    ledger.write_header(root, header)
    comp = ledger.Compactor(root, header, every=3, seconds=1e9)
    for i in range(7):
        r = _rec(f"p{i}", [f"img{2 * i}", f"img{2 * i + 1}"])
        ledger.write_commit(root, r)
        comp.add(r)
    # two segments of 3 compacted, their commit objects deleted; the 7th still a commit object
    assert len(header["segments"]) == 2
    assert len(ledger.list_commits(root)) == 1
    led = ledger.load(root, "db")
    assert led.records.num_rows == 7 and len(led.uncompacted) == 1
    assert sorted(led.covered_image_ids().to_pylist()) == sorted(f"img{i}" for i in range(14))
    assert led.totals() == {"pieces": 7, "images": 14, "segments": 21, "errors": 0, "empty_images": 0}
    comp.flush()
    led = ledger.load(root, "db")
    assert led.records.num_rows == 7 and not led.uncompacted and header["totals"]["pieces"] == 7
    rec = led.records.to_pylist()[0]
    assert rec["pid"] == os.getpid() and rec["host"] and json.loads(rec["stage_seconds"]) == {"embed": 0.5}


def test_reader_sees_each_record_once_at_every_point_of_a_compaction(tmp_path):
    """A record is in a commit object, a segment not yet in the header, a segment in the header with
    the object not yet deleted, or only in the segment: the reader sees it exactly once each time."""
    root = str(tmp_path / "db")
    header = ledger.new_header("db")
    ledger.write_header(root, header)
    r = _rec("p0", ["a", "b"])
    ledger.write_commit(root, r)
    assert ledger.load(root, "db").records.num_rows == 1
    # segment written, header not yet updated (killed there)
    io.write_parquet_atomic(io.join(root, "_manifest/seg-000000-orphan.parquet"), ledger.records_table([r]))
    assert ledger.load(root, "db").records.num_rows == 1
    # header updated, commit object not yet deleted
    header["segments"].append("_manifest/seg-000000-orphan.parquet")
    ledger.write_header(root, header)
    led = ledger.load(root, "db")
    assert led.records.num_rows == 1 and not led.uncompacted
    io.remove(ledger.commit_uri(root, "p0"))
    assert ledger.load(root, "db").records.num_rows == 1


def test_adopt_and_consolidate(tmp_path):
    root = str(tmp_path / "db")
    header = ledger.new_header("db")
    ledger.write_header(root, header)
    comp = ledger.Compactor(root, header, every=1, seconds=1e9)
    for i in range(5):
        comp.add(_rec(f"p{i}", [f"i{i}"]))
    ledger.write_commit(root, _rec("p9", ["i9"]))  # left by a killed run
    led = ledger.load(root, "db")
    comp2 = ledger.Compactor(root, led.header, every=10, seconds=1e9)
    comp2.adopt(led)
    comp2.consolidate(max_segments=2)
    assert len(comp2.header["segments"]) == 1 and not ledger.list_commits(root)
    led = ledger.load(root, "db")
    assert led.records.column("name").to_pylist() == ["p0", "p1", "p2", "p3", "p4", "p9"]
    assert sorted(os.listdir(os.path.join(root, "_manifest"))) == [os.path.basename(comp2.header["segments"][0])]


def test_consolidate_merges_the_smallest_segments_only(tmp_path):
    """Past max_segments, the smallest segments are merged (down to half the limit); the large one
    of an earlier consolidation is neither read nor rewritten, and every record stays readable."""
    root = str(tmp_path / "db")
    header = ledger.new_header("db")
    ledger.write_header(root, header)
    comp = ledger.Compactor(root, header, every=1000, seconds=1e9)
    comp._write([_rec(f"big{i:03d}", [f"b{i}"]) for i in range(50)], [])  # a large, earlier merge
    big = header["segments"][0]
    big_mtime = os.path.getmtime(os.path.join(root, big))
    for i in range(8):  # eight small segments of 2 records (short runs, time-based flushes)
        comp._write([_rec(f"s{i}a", [f"s{i}a"]), _rec(f"s{i}b", [f"s{i}b"])], [])
    led = ledger.load(root, "db")
    assert led.segment_rows[big] == 50 and len(led.segment_rows) == 9
    comp2 = ledger.Compactor(root, led.header, every=1000, seconds=1e9)
    comp2.segment_rows.update(led.segment_rows)
    merged = comp2.consolidate(max_segments=4)
    # 9 segments > 4: the 9 - 2 + 1 = 8 smallest (the small ones) become one, the large one stays
    assert big not in merged and len(merged) == 8
    assert len(comp2.header["segments"]) == 2 and comp2.header["segments"][0] == big
    assert os.path.getmtime(os.path.join(root, big)) == big_mtime
    assert sorted(os.listdir(os.path.join(root, "_manifest"))) == sorted(os.path.basename(s) for s in comp2.header["segments"])
    led = ledger.load(root, "db")
    assert led.records.num_rows == 66 and led.segment_rows[comp2.header["segments"][1]] == 16
    assert comp2.consolidate(max_segments=4) == []  # under the limit: nothing to do


def test_old_runs_move_out_of_the_header(tmp_path):
    """The header keeps the last runs; older ones go RUNS_IN_HEADER at a time to _runs/ files, so the
    header stays small however many runs a folder has seen, and every run can still be read."""
    root = str(tmp_path / "db")
    header = ledger.new_header("db")
    ledger.write_header(root, header)
    k = ledger.RUNS_IN_HEADER
    sizes = []
    for i in range(5 * k + 3):
        ledger.add_run(root, header, {"i": i, "summary": {"images": i, "pad": "x" * 500}})
        ledger.write_header(root, header)
        sizes.append(os.path.getsize(os.path.join(root, ledger.MANIFEST)))
    assert k <= len(header["runs"]) < 2 * k
    assert header["runs_archived"] == {"files": 4, "runs": 4 * k}
    assert ledger.run_count(header) == 5 * k + 3
    assert [r["i"] for r in ledger.iter_runs(root, ledger.read_header(root, "db"))] == list(range(5 * k + 3))
    assert max(sizes) < 2 * k * 600 + 2000  # bounded: no header carries more than 2k runs
    # a kill after a _runs file but before the header: the next add rewrites the same file, same runs
    before = json.loads(open(os.path.join(root, ledger.MANIFEST)).read())
    for i in range(2 * k - len(before["runs"])):
        ledger.add_run(root, before, {"i": 1000 + i})
    again = json.load(open(ledger.runs_uri(root, 4)))
    assert [r["i"] for r in again] == [r["i"] for r in header["runs"][:k]] + [1000 + j for j in range(max(0, k - len(header["runs"])))]


def test_piece_names_are_content_names():
    assert ledger.piece_name(["b", "a"]) == ledger.piece_name(["a", "b"]) != ledger.piece_name(["a"])


def test_lease_refuses_a_second_writer_and_takes_over_a_dead_one(tmp_path):
    root = str(tmp_path / "out")
    with ledger.Lease(root, ttl_s=60, job="build-db"):
        with pytest.raises(UserError, match="being written by another ragseg job"):
            ledger.Lease(root, ttl_s=60, job="build-db").acquire()
    assert not os.path.exists(os.path.join(root, ledger.LEASE))
    # a lease left by a process that died (same host) is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(os.path.join(root, ledger.LEASE), "w") as f:
        json.dump({"owner": "x", "job": "label", "host": __import__("socket").gethostname(),
                   "pid": int(dead.stdout), "renewed": 0, "expires": 1e12}, f)
    with ledger.Lease(root, ttl_s=60, job="label") as lease:
        assert json.load(open(os.path.join(root, ledger.LEASE)))["owner"] == lease.owner


def test_two_jobs_on_one_db_second_refuses(tmp_path, tiny_cfg_path):
    """Two build-db processes on the same DB: while the first holds the lease the second stops with
    one line, exit code 2."""
    root = str(tmp_path / "db")
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from ragseg import ledger\n"
                               "with ledger.Lease(sys.argv[1], 60, 'build-db'):\n"
                               "    print('held', flush=True); time.sleep(60)\n", root],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ragseg"), "build-db", "--config",
                              tiny_cfg_path, "--set", "source.kind=folder", "--set", f"source.uri={tmp_path}",
                              "--out", root], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2
        assert res.stderr.strip().count("\n") == 0 and "being written by another ragseg job" in res.stderr
    finally:
        holder.kill()
        holder.wait()


def _v1_db(root: str, dim: int = 8) -> list[pa.Table]:
    """A DB as ragseg 0.1 wrote it (manifest format 1 + inputs/<shard>.json + features)."""
    from ragseg.schema import MASK_TYPE, embeddings_to_arrow, feature_schema

    rng = np.random.default_rng(0)
    shards, tables = [], []
    for s in range(2):
        name = f"s{s:05d}-abc{s}"
        ids = [f"im{s}_{j}" for j in range(3)]
        n = 4
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        t = pa.table({
            "image_id": pa.array([ids[j % 3] for j in range(n)]), "segment_id": pa.array(range(n), pa.int64()),
            "label": pa.array(["a", "b", "a", "c"]).dictionary_encode(),
            "label_source": pa.array(["gt"] * n).dictionary_encode(), "score": pa.array([1.0] * n, pa.float32()),
            "box": pa.array([[0, 0, 1, 1]] * n, pa.list_(pa.float32(), 4)), "area": pa.array([1] * n, pa.int64()),
            "mask_rle": pa.nulls(n, MASK_TYPE), "embedding": embeddings_to_arrow(emb.astype(np.float16)),
            "embed_model": pa.array(["m"] * n).dictionary_encode(), "embed_mode": pa.array(["pool"] * n).dictionary_encode(),
        }).cast(feature_schema(dim))
        io.write_parquet_atomic(io.join(root, f"features/{name}.parquet"), t)
        io.write_json_atomic(io.join(root, f"inputs/{name}.json"), {"image_ids": ids, "uris": ids})
        shards.append({"name": name, "inputs": f"inputs/{name}.json", "path": f"features/{name}.parquet",
                       "errors_path": None, "rows": n, "images": 3, "errors": 0, "empty_images": 0})
        tables.append(t)
    io.write_json_atomic(io.join(root, "manifest.json"), {
        "format": 1, "embed_model": "m", "embed_mode": "pool", "dim": dim, "models_hash": "h", "models": {},
        "created": "2026", "runs": [], "shards": shards})
    return tables


def test_format1_db_is_refused_in_one_line_and_migrates(tmp_path):
    from ragseg.db import migrate_v1, open_db
    from ragseg.index.shards import load_db

    root = str(tmp_path / "old")
    _v1_db(root)
    with pytest.raises(UserError, match=r"ragseg migrate"):
        open_db(root)
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ragseg"), "migrate", root],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    db = load_db(root)
    assert [s.name for s in db.shards] == ["s00000-abc0", "s00001-abc1"] and db.total == 8 and db.dim == 8
    led = open_db(root)
    assert sorted(led.covered_image_ids().to_pylist()) == sorted(f"im{s}_{j}" for s in range(2) for j in range(3))
    assert migrate_v1(root, "db")["migrated"] is False  # idempotent


# ---------- litter, fencing, retries ----------
def test_next_writer_removes_litter(tmp_path):
    """An orphan segment (compaction killed before its header write), commit objects already folded
    into a segment (killed before the deletes) and a temporary file: the next writer's start removes
    them all; only named objects remain."""
    root = str(tmp_path / "db")
    lease = ledger.Lease(root, ttl_s=60, job="build-db").acquire()
    try:
        _, header, comp = ledger.open_for_writing(root, "db", 2, 1e9, 64, lambda: ledger.new_header("db"), lease=lease)
        recs = [_rec(f"p{i}", [f"i{i}"], epoch=lease.epoch) for i in range(4)]
        for r in recs:
            ledger.write_commit(root, r)
        comp._write(recs[:2], [])  # segment + header, commit objects left: a kill before the deletes
        io.write_parquet_atomic(io.join(root, "_manifest/seg-000009-orphan.parquet"), ledger.records_table(recs[2:]))
        open(os.path.join(root, "_commits", ".tmp-abc-p9.json"), "w").close()
    finally:
        lease.release()
    with ledger.Lease(root, ttl_s=60, job="build-db") as lease2:
        assert lease2.epoch == 2
        led, header, comp = ledger.open_for_writing(root, "db", 2, 1e9, 64, lambda: None, lease=lease2)
        assert led.records.num_rows == 4 and sorted(led.litter) == [ledger.commit_uri(root, "p0"),
                                                                    ledger.commit_uri(root, "p1")]
    assert header["epoch"] == 2 and header["totals"]["pieces"] == 4
    assert os.listdir(os.path.join(root, "_commits")) == []
    assert sorted(f"_manifest/{f}" for f in os.listdir(os.path.join(root, "_manifest"))) == sorted(header["segments"])
    assert ledger.load(root, "db").records.column("name").to_pylist() == ["p0", "p1", "p2", "p3"]


def test_stale_commit_objects_are_ignored(tmp_path):
    """A commit object of an older epoch than the header's that no segment holds was written by a
    fenced writer after the takeover: readers do not see it."""
    root = str(tmp_path / "db")
    header = ledger.new_header("db")
    header["epoch"] = 5
    ledger.write_header(root, header)
    ledger.write_commit(root, ledger.new_record("p-old", ["a"], images=1, segments=1, errors=0, empty_images=0,
                                                data_path="features/x.parquet", errors_path=None, parts_path=None,
                                                stage_seconds={}, epoch=4))
    ledger.write_commit(root, ledger.new_record("p-new", ["b"], images=1, segments=1, errors=0, empty_images=0,
                                                data_path="features/y.parquet", errors_path=None, parts_path=None,
                                                stage_seconds={}, epoch=5))
    led = ledger.load(root, "db")
    assert led.records.column("name").to_pylist() == ["p-new"]
    assert led.litter == [ledger.commit_uri(root, "p-old"), io.join(root, "features/x.parquet")]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_conditional_writes(tmp_path, where, request):
    if where == "s3":
        request.getfixturevalue("s3_server")
        import fsspec

        fs = fsspec.filesystem("s3")
        if not fs.exists("cond-writes"):
            fs.mkdir("cond-writes")
        uri = "s3://cond-writes/x/manifest.json"
    else:
        uri = str(tmp_path / "x" / "manifest.json")
    v1 = io.write_if(uri, b"one", None)
    with pytest.raises(io.PreconditionFailed):
        io.write_if(uri, b"again", None)  # create-only: it exists
    data, v = io.read_versioned(uri)
    assert data == b"one" and v == v1
    v2 = io.write_if(uri, b"two", v1)
    with pytest.raises(io.PreconditionFailed):
        io.write_if(uri, b"stale", v1)  # conditional on a version that is gone
    assert io.read_versioned(uri) == (b"two", v2)


_WRITER = r"""
import os, sys, time
from ragseg.config import load_config
from ragseg.errors import UserError
from ragseg.jobs import cli
from ragseg.pipelines.build_db import run_build_db
from ragseg.pipelines.common import inline_executor
from ragseg.testing.generated import DbResults

images, out, per_piece, gate = sys.argv[1:5]
cfg = load_config(None, ["source.kind=folder", f"source.uri={images}", f"build_db.out={out}",
                         f"build_db.images_per_shard={per_piece}", "commit.compact_every=1",
                         "commit.lease_ttl_s=3", "ray.progress=false"])
make = DbResults(segments_per_image=2, hw=(16, 16))
calls = [0]

def results(rows):
    calls[0] += 1
    if gate != "-" and calls[0] == 2:  # the second piece: say so, then wait (paused from outside)
        open(gate + ".at", "w").close()
        while not os.path.exists(gate + ".go"):
            time.sleep(0.05)
    return make(rows)

try:
    run_build_db(cfg, execute=inline_executor(results))
except UserError as e:
    cli._exit_user_error(e, False)  # what `ragseg build-db` does: one line, exit code 2
"""


def _writer(images: str, out: str, per_piece: int, gate: str = "-") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, images, out, str(per_piece), gate],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_here(images: str, out: str, per_piece: int) -> None:
    """The writer script's job without a gate, in this process."""
    from ragseg.config import load_config
    from ragseg.pipelines.build_db import run_build_db
    from ragseg.pipelines.common import inline_executor
    from ragseg.testing.generated import DbResults

    cfg = load_config(None, ["source.kind=folder", f"source.uri={images}", f"build_db.out={out}",
                             f"build_db.images_per_shard={per_piece}", "commit.compact_every=1",
                             "commit.lease_ttl_s=3", "ray.progress=false"])
    run_build_db(cfg, execute=inline_executor(DbResults(segments_per_image=2, hw=(16, 16))))


def _committed_rows(out: str) -> tuple[list[str], list[str]]:
    import pyarrow.parquet as pq

    led = ledger.load(out, "db")
    ids = [i for r in led.records.to_pylist() for i in r["image_ids"]]
    fs, root = io.fs_and_path(out)
    rows = []
    for p in led.records.column("data_path").to_pylist():
        with fs.open(f"{root.rstrip('/')}/{p}", "rb") as f:
            rows += [json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(f).to_pylist()]
    return sorted(ids), sorted(rows)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_stalled_writer_is_fenced(tmp_path, where, request):
    """Writer A commits a piece, then stalls (SIGSTOP) past its lease's TTL in the middle of its second
    piece. Writer B takes the folder over (epoch + 1) and finishes the job with other piece sizes. A
    resumes: it commits its piece (a stale commit object, ignored by readers), then stops with one
    line, exit code 2, deleting nothing. Nothing is lost or doubled: the committed rows equal a clean
    run's; a rerun removes A's litter and only named objects remain."""
    import signal
    import time

    from conftest import only_named_objects

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(6):
        (images / f"im{i}.jpg").write_bytes(b"not decoded: generated results stand in for the stages")
    if where == "s3":
        request.getfixturevalue("s3_server")
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir("fence-test")
        base = "s3://fence-test"
    else:
        base = str(tmp_path)
    ref, out = f"{base}/ref", f"{base}/out"
    _run_here(str(images), ref, 2)

    gate = str(tmp_path / "gate")
    a = _writer(str(images), out, 2, gate)
    try:
        deadline = time.time() + 300
        while not os.path.exists(gate + ".at"):
            assert a.poll() is None, a.stderr.read()
            assert time.time() < deadline, "writer A never reached its second piece"
            time.sleep(0.05)
        a.send_signal(signal.SIGSTOP)  # a stall: GC pause, suspended VM
        time.sleep(3 + 1.5)  # past commit.lease_ttl_s
        b = _writer(str(images), out, 3)
        assert b.wait(timeout=300) == 0, b.stderr.read()
        open(gate + ".go", "w").close()
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=300) == 2
        err = a.stderr.read().strip()
    finally:
        if a.poll() is None:
            a.kill()
    assert err.count("\n") == 0 and err.startswith("error: ") and "taken over by another job" in err, err
    assert "epoch 2 > this job's 1" in err and "deletes nothing" in err
    assert _committed_rows(out) == _committed_rows(ref)  # B's output intact: A deleted nothing, doubled nothing
    _run_here(str(images), out, 2)  # a rerun: nothing to do but remove A's litter
    assert _committed_rows(out) == _committed_rows(ref)
    only_named_objects("db", out)
