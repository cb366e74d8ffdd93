"""``--retry-errors``: a transient fault (image files that cannot be decoded in the first run, fixed
before the rerun: a half-written download) is retried under the same ledger; afterwards every reader
(ledger totals and covered ids, the errors of the latest outcomes, the DB's pieces as build-index
reads them, the label parts, panoptic.json, eval's prediction) sees each image once with its newest
outcome, and the output equals a clean run's. An image that fails again keeps one error row.

The commit-path tests run the real driver, piece writers and the real ``DecodeImages`` stage in this
process (ragseg.pipelines.common.inline_executor) with generated results for the decoded images; the
last test runs ``ragseg build-db`` itself (Ray, the tiny real models)."""

from __future__ import annotations

import io as _io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import commit_path_cfg as _cfg
from PIL import Image

from ragseg import io, ledger

N_IMAGES = 7
TRANSIENT = ("im1", "im4")  # truncated in the first run, whole before the retry
BROKEN = "im6"  # never an image


def _jpeg(seed: int) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _images(root) -> str:
    d = os.path.join(root, "imgs")
    os.makedirs(d, exist_ok=True)
    for i in range(N_IMAGES):
        with open(os.path.join(d, f"im{i}.jpg"), "wb") as f:
            f.write(b"GIF89a, not a picture" if f"im{i}" == BROKEN else _jpeg(i))
    return d


def _damage(images: str) -> None:
    for name in TRANSIENT:
        p = os.path.join(images, f"{name}.jpg")
        data = _jpeg(int(name[2:]))
        with open(p, "wb") as f:
            f.write(data[: len(data) // 2])  # a half-written download


def _repair(images: str) -> None:
    for name in TRANSIENT:
        with open(os.path.join(images, f"{name}.jpg"), "wb") as f:
            f.write(_jpeg(int(name[2:])))


class Decoded:
    """The piece writer's input: the real DecodeImages stage on the rows, then ``make`` (generated
    results, ragseg.testing.generated) for the images it decoded; the others keep its error row."""

    def __init__(self, cfg, make, empty: dict):
        from ragseg.stages.decode import DecodeImages

        self.decode, self.make, self.empty = DecodeImages(cfg), make, empty

    def __call__(self, rows: list[dict]) -> dict[str, np.ndarray]:
        from ragseg.stages.batch import object_column

        batch = {k: object_column([r[k] for r in rows]) for k in rows[0]} | {"error": object_column([""] * len(rows))}
        errors = list(self.decode(batch)["error"])
        ok = [i for i, e in enumerate(errors) if not e]
        made = self.make([rows[i] for i in ok]) if ok else {}
        out = {}
        for col in (made or self.empty):
            vals = [self.empty[col]] * len(rows) if col in self.empty else [None] * len(rows)
            for j, i in enumerate(ok):
                vals[i] = made[col][j]
            out[col] = object_column(vals)
        out["image_id"] = object_column([str(r["image_id"]) for r in rows])
        out["uri"] = object_column([str(r["uri"]) for r in rows])
        out["error"] = object_column([e if e else "" for e in errors])
        for col in ("height", "width"):
            if col in out:
                out[col] = np.asarray([int(v or 0) for v in out[col]], np.int64)
        return out


def _run(kind: str, images: str, out: str, vocab: str, **retry) -> dict:
    from ragseg.pipelines.common import inline_executor
    from ragseg.testing.generated import DbResults, LabelResults

    cfg = _cfg(kind, images, out, vocab)
    if kind == "db":
        from ragseg.pipelines.build_db import run_build_db

        empty = {k: [] for k in ("seg_masks_rle", "seg_labels", "seg_ids", "seg_scores", "seg_areas", "seg_boxes")}
        empty["embeddings"] = np.zeros((0, 768), np.float16)
        make = Decoded(cfg, DbResults(segments_per_image=3, hw=(24, 32)), empty)
        return run_build_db(cfg, execute=inline_executor(make), **retry)
    from ragseg.pipelines.label import run_label
    from ragseg.vocab import load_vocab

    ids = [int(i) for i in load_vocab(vocab).ids]
    empty = {"height": 0, "width": 0, "segments_info": "[]", "png_name": ""}
    make = Decoded(cfg, LabelResults(out, ids, segments_per_image=3, hw=(24, 32)), empty)
    return run_label(cfg, execute=inline_executor(make), **retry)


def _content(kind: str, out: str) -> dict:
    """The output as its readers see it, independent of how images were grouped into pieces."""
    led = ledger.load(out, kind)
    covered = led.covered_image_ids().to_pylist()
    assert len(covered) == len(set(covered)), "an image is seen twice"
    rows = []
    for p in led.records.column("data_path").to_pylist():
        rows += [json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(io.join(out, p)).to_pylist()]
    errs = ledger.latest_errors(led).drop_columns(["epoch"]).to_pylist()
    for e in errs:  # PIL names the BytesIO it was given: "<_io.BytesIO object at 0x7f...>"
        e["error"] = re.sub(r" at 0x[0-9a-f]+", "", e["error"])
    totals = led.totals()
    assert totals == {k: v for k, v in led.header["totals"].items()}, "header totals and ledger totals differ"
    c = {"covered": sorted(covered), "rows": sorted(rows), "errors": sorted(json.dumps(e, sort_keys=True) for e in errs),
         "totals": {k: v for k, v in totals.items() if k != "pieces"}, "errors_by_stage": ledger.error_counts(led)}
    if kind == "db":
        from ragseg.index.shards import load_db

        db = load_db(out)  # what build-index reads
        c["db_rows"] = db.total
    else:
        from ragseg.labels_out import iter_images, prediction

        parts = [a for a in iter_images(out)]
        assert len({a["image_id"] for a in parts}) == len(parts)
        c["parts"] = sorted(json.dumps(a, sort_keys=True) for a in parts)
        c["prediction"] = sorted(a["image_id"] for a in prediction(out)["annotations"])  # what eval reads
        doc = json.load(open(os.path.join(out, "panoptic.json")))
        c["panoptic.json"] = sorted(json.dumps(a, sort_keys=True) for a in doc["annotations"])
    return c


@pytest.fixture
def vocab(tmp_path) -> str:
    p = str(tmp_path / "vocab.json")
    with open(p, "w") as f:
        json.dump([{"name": "wall", "isthing": False}, {"name": "person", "isthing": True},
                   {"name": "car", "isthing": True}], f)
    return p


@pytest.mark.parametrize("kind", ["db", "labels"])
def test_retry_errors_gives_a_clean_runs_output(kind, tmp_path, vocab):
    images = _images(str(tmp_path))
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "out")
    _run(kind, images, ref_out, vocab)
    ref = _content(kind, ref_out)
    assert ref["totals"]["errors"] == 1 and ref["errors_by_stage"] == {"decode": {"UnidentifiedImageError": 1}}

    _damage(images)
    first = _run(kind, images, out, vocab)
    assert first["errors"] == 3
    got = _content(kind, out)
    assert got["totals"]["errors"] == 3 and got["totals"]["images"] == N_IMAGES
    assert got["errors_by_stage"] == {"decode": {"OSError": 2, "UnidentifiedImageError": 1}}
    _repair(images)

    # a plain rerun does nothing: every image has an outcome
    assert _run(kind, images, out, vocab)["images"] == 0
    # a pattern no error matches retries nothing
    assert _run(kind, images, out, vocab, retry_errors=True, errors_matching="no such error")["images"] == 0
    # only the truncated files (OSError: image file is truncated)
    again = _run(kind, images, out, vocab, retry_errors=True, errors_matching=r"decode: OSError: Truncated")
    assert again["images"] == 2 and again["errors"] == 0
    assert _content(kind, out) == ref
    # every error left: the broken file fails again, still one error row
    again = _run(kind, images, out, vocab, retry_errors=True)
    assert again["images"] == 1 and again["errors"] == 1
    assert _content(kind, out) == ref
    led = ledger.load(out, kind)
    assert led.records.num_rows == ledger.load(ref_out, kind).records.num_rows + 2  # two retry pieces
    assert sorted(led.records.column("retry").to_pylist()) == [False] * 4 + [True] * 2


def test_retry_errors_cli(tmp_path, vocab, capsys):
    """``ragseg info`` counts the errors of the latest outcomes by stage and reason;
    ``--errors-matching`` alone, or with an invalid expression, stops with one line."""
    from conftest import run_cli_main

    images = _images(str(tmp_path))
    out = str(tmp_path / "db")
    _damage(images)
    _run("db", images, out, vocab)
    code, stdout, _ = run_cli_main(["info", out], capsys)
    assert code == 0
    info = json.loads(stdout)
    assert info["errors_by_stage"] == {"decode": {"OSError": 2, "UnidentifiedImageError": 1}}
    assert info["committed"]["errors"] == 3 and info["committed"]["images"] == N_IMAGES
    code, _, err = run_cli_main(["build-db", "--set", "source.kind=folder", "--set", f"source.uri={images}",
                                 "--out", out, "--errors-matching", "decode"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "--retry-errors" in err
    from ragseg.errors import UserError

    with pytest.raises(UserError, match="not a valid regular expression"):
        _run("db", images, out, vocab, retry_errors=True, errors_matching="(unclosed")
    _repair(images)
    _run("db", images, out, vocab, retry_errors=True)
    code, stdout, _ = run_cli_main(["info", out], capsys)
    info = json.loads(stdout)
    assert info["errors_by_stage"] == {"decode": {"UnidentifiedImageError": 1}}
    assert info["committed"]["errors"] == 1 and info["committed"]["images"] == N_IMAGES


def test_build_db_retry_errors_end_to_end(tmp_path, tiny_cfg_path, ray_local, capsys):
    """``ragseg build-db`` (Ray, decode + ground-truth masks + the tiny real CLIP): two image files
    truncated in the first run, repaired, then ``--retry-errors``: the DB equals a clean run's."""
    from conftest import run_cli_main

    from ragseg.config import SourceConfig
    from ragseg.schema import arrow_to_embeddings
    from ragseg.sources import list_rows
    from ragseg.sources.synthetic import make_synthetic

    data = str(tmp_path / "data")
    make_synthetic(data, images=10, seed=2, size=64, val_fraction=0.2)
    uris = [r["uri"] for r in list_rows(SourceConfig(kind="synthetic", uri=data, split="train"))]
    bad = uris[1:6:3]
    good = {u: open(u, "rb").read() for u in bad}

    def build(out: str, *extra: str) -> dict:
        code, stdout, err = run_cli_main(
            ["build-db", "--config", tiny_cfg_path, "--set", "source.kind=synthetic", "--set", f"source.uri={data}",
             "--set", "source.split=train", "--set", "build_db.masks=gt", "--set", "build_db.images_per_shard=2",
             "--set", "ray.images_per_block=2", "--set", "ray.progress=false", "--out", out, *extra], capsys)
        assert code == 0, err
        return json.loads(stdout)

    def features(out: str):
        led = ledger.load(out, "db")
        t = pa.concat_tables([pq.read_table(io.join(out, p)) for p in led.records.column("data_path").to_pylist()])
        t = t.sort_by([("image_id", "ascending"), ("segment_id", "ascending")])
        emb = arrow_to_embeddings(t.column("embedding"))
        return t.drop_columns(["embedding"]).to_pylist(), emb, led.totals()

    ref = str(tmp_path / "ref")
    assert build(ref)["errors"] == 0
    for u in bad:
        with open(u, "wb") as f:
            f.write(good[u][: len(good[u]) // 3])
    out = str(tmp_path / "db")
    assert build(out)["errors"] == 2
    for u, b in good.items():
        with open(u, "wb") as f:
            f.write(b)
    summary = build(out, "--retry-errors")
    assert summary["images"] == 2 and summary["errors"] == 0
    rows, emb, totals = features(out)
    ref_rows, ref_emb, ref_totals = features(ref)
    assert rows == ref_rows and {k: v for k, v in totals.items() if k != "pieces"} == \
        {k: v for k, v in ref_totals.items() if k != "pieces"}
    np.testing.assert_allclose(emb.astype(np.float32), ref_emb.astype(np.float32), atol=2e-3)
    assert ledger.error_counts(ledger.load(out, "db")) == {}
