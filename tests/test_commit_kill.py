"""Exactly-once under kill -9 at every step of the commit path, for build-db and label, local and S3.

The job runs its real driver (lease, ledger, compaction, panoptic.json) and its real piece writers,
with generated stage results instead of models (ragseg.testing.generated, inline executor), in a
forked child. The io fault point (ragseg.faults, RAGSEG_FAULT_AFTER_WRITES=k) SIGKILLs the child right after the k-th
write or delete of the job. For every k up to the number of steps of a clean run, the killed job is
rerun to completion and its output must equal the clean run's: same committed rows, every image in
exactly one committed piece, same PNGs, same panoptic.json content; and only named objects remain
in the folder (a kill inside a compaction leaves an orphan segment or compacted commit objects, which
the rerun removes).
"""

from __future__ import annotations

import hashlib
import json
import os
import traceback

import pyarrow.parquet as pq
import pytest
from conftest import commit_path_cfg as _cfg
from conftest import only_named_objects

from ragseg import faults, io

N_IMAGES = 5  # 3 pieces of 2 (one image fails: errors tables), compaction every 2 pieces


def _images(root) -> str:
    d = os.path.join(root, "imgs")
    os.makedirs(d, exist_ok=True)
    for i in range(N_IMAGES):
        with open(os.path.join(d, f"im{i}.jpg"), "wb") as f:
            f.write(b"not decoded: the generated results stand in for the stages")
    return d


def _run(kind: str, cfg) -> None:
    from ragseg.pipelines.common import inline_executor
    from ragseg.testing.generated import DbResults, LabelResults

    if kind == "db":
        from ragseg.pipelines.build_db import run_build_db

        # the folder source's ids are file stems; im3 fails in decode. dim: the default CLIP's (768)
        run_build_db(cfg, execute=inline_executor(DbResults(segments_per_image=3, hw=(24, 32), fail_suffix="3")))
    else:
        from ragseg.pipelines.label import run_label
        from ragseg.vocab import load_vocab

        ids = [int(i) for i in load_vocab(cfg.label.vocab).ids]
        run_label(cfg, execute=inline_executor(LabelResults(cfg.label.out, ids, segments_per_image=3,
                                                            hw=(24, 32), fail_suffix="3")))


def _forked(kind: str, cfg, fault_at: int | None, counter: str) -> int:
    """Run the job in a forked child (its own process group); returns its wait status."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.setpgid(0, 0)
            os.environ[faults.FAULT_COUNTER] = counter
            os.environ[faults.FAULT_AFTER] = str(fault_at or 0)  # 0: count the steps, never fire
            _run(kind, cfg)
            code = 0
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _content(kind: str, out: str) -> dict:
    """The output as a reader sees it (committed pieces only), independent of the grouping into pieces."""
    from ragseg import ledger

    led = ledger.load(out, kind)
    recs = led.records.to_pylist()
    ids = [i for r in recs for i in r["image_ids"]]
    assert len(ids) == len(set(ids)), "an image is in two committed pieces"
    fs, root = io.fs_and_path(out)
    rows = []
    for r in recs:
        with fs.open(f"{root}/{r['data_path']}", "rb") as f:
            rows += [json.dumps({k: v for k, v in row.items()}, sort_keys=True, default=str)
                     for row in pq.read_table(f).to_pylist()]
    errs = []
    for r in recs:
        if r["errors_path"]:
            with fs.open(f"{root}/{r['errors_path']}", "rb") as f:
                errs += [json.dumps(e, sort_keys=True) for e in pq.read_table(f).to_pylist()]
    c = {"images": sorted(ids), "rows": sorted(rows), "errors": sorted(errs),
         "totals": {k: v for k, v in led.header["totals"].items()}}
    if kind == "labels":
        from ragseg.labels_out import iter_images

        c["parts"] = sorted(json.dumps(a, sort_keys=True) for a in iter_images(out))
        pngs = {}
        for p in fs.find(f"{root}/panoptic"):
            name = p.rsplit("/", 1)[-1]
            if not name.startswith(io.TMP_MARK):
                pngs[name] = hashlib.sha256(fs.cat_file(p)).hexdigest()
        c["png"] = pngs
        doc = json.loads(fs.cat_file(f"{root}/panoptic.json"))
        c["panoptic.json"] = {k: sorted(doc[k], key=lambda a: str(a.get("id", a.get("image_id"))))
                              for k in ("images", "annotations")} | {"categories": doc["categories"]}
    assert not fs.exists(f"{root}/_lease.json"), "the lease was not released"
    return c


def _kill_everywhere(kind: str, base: str, tmp_path) -> int:
    images = _images(str(tmp_path))
    vocab = str(tmp_path / "vocab.json")
    with open(vocab, "w") as f:
        json.dump([{"name": "wall", "isthing": False}, {"name": "person", "isthing": True},
                   {"name": "car", "isthing": True}], f)
    counter = str(tmp_path / "counter")
    # import (open_clip, torch) once here, not in each forked child
    from ragseg.pipelines import build_db, label  # noqa: F401

    build_db.embed_identity(_cfg("db", images, "unused", vocab))
    ref_out = io.join(base, f"{kind}-ref")
    open(counter, "w").close()
    assert _forked(kind, _cfg(kind, images, ref_out, vocab), None, counter) == 0
    steps = int(open(counter).read())
    ref = _content(kind, ref_out)
    assert len(ref["images"]) == N_IMAGES and len(ref["errors"]) == 1
    only_named_objects(kind, ref_out)
    for k in range(1, steps + 1):
        out = io.join(base, f"{kind}-k{k}")
        open(counter, "w").close()
        status = _forked(kind, _cfg(kind, images, out, vocab), k, counter)
        assert os.WIFSIGNALED(status), f"step {k} of {steps}: the fault hook did not fire"
        assert _forked(kind, _cfg(kind, images, out, vocab), None, counter) == 0, f"rerun after step {k} failed"
        assert _content(kind, out) == ref, f"kill after write {k} of {steps}, then rerun: output differs"
        only_named_objects(kind, out)
    return steps


@pytest.mark.parametrize("kind", ["db", "labels"])
def test_kill_at_every_write_local(kind, tmp_path):
    assert _kill_everywhere(kind, str(tmp_path / "out"), tmp_path) >= 10


@pytest.mark.parametrize("kind", ["db", "labels"])
def test_kill_at_every_write_s3(kind, tmp_path, s3_server):
    import fsspec

    fs = fsspec.filesystem("s3")
    bucket = f"kill-{kind}"
    fs.mkdir(bucket)
    assert _kill_everywhere(kind, f"s3://{bucket}/out", tmp_path) >= 10
