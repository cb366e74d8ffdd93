"""bench/scale.py --quick runs (tiny N, local disk, the graphs inline) and prints the benchmarks' JSON
objects with the fields the README's tables and the issue's limits read. Figures are not checked
(timings are never asserted); only the shape, and what does not depend on timing (the files a commit
writes, the stages of each graph, the images and pieces each run made, the history's bounds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], out: Path, timeout: int = 600) -> list[dict]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == json.loads(out.read_text())
    return printed


def test_scale_bench_quick(tmp_path):
    printed = _run(["--quick"], tmp_path / "scale.json")
    by = {(r["benchmark"], r.get("graph")): r for r in printed}
    assert set(by) == {("scale_commit", None), ("scale_driver_cpu", "build-db"), ("scale_driver_cpu", "label"),
                       ("scale_driver_rss", "label"), ("scale_panoptic_json", None), ("scale_history", None)}

    c = by["scale_commit", None]
    assert c["store"] == "local" and c["quick"] is True and isinstance(c["ok"], bool)
    assert [lv["pieces"] for lv in c["levels"]] == [20, 120]
    for lv in c["levels"]:
        assert {"median", "p90", "n"} <= set(lv["commit_s"]) and lv["commit_s"]["n"] == 3
        # one commit writes the piece's data file and its record, nothing else (at every level)
        assert sorted(f["file"] for f in lv["files_written_per_commit"]) == \
            ["_commits/<piece>.json", "features/<piece>.parquet"]
        assert lv["bytes_per_commit"] > 0
        assert sorted(f["file"] for f in lv["flush"]["files_written"]) == \
            ["_manifest/<segment>.parquet", "manifest.json"]
        assert lv["flush"]["objects_deleted"] == lv["flush"]["records"] == 40
    assert c["levels"][1]["segments"] == 3 and c["levels"][1]["uncompacted"] == 20

    # the graphs build_graph builds (run inline: the same stage classes, model stages stood in for)
    db, lab = by["scale_driver_cpu", "build-db"], by["scale_driver_cpu", "label"]
    assert db["executor"] == "inline" and db["ok"] is None  # no driver figure without Ray
    # decode, detect, sam_prep (SAM's input resize, a CPU task), segment, embed, ...
    assert db["stages"] == ["_stage_task", "StageActor", "_stage_task", "StageActor", "StageActor", "select_columns"]
    assert lab["stages"] == ["_stage_task", "StageActor", "_stage_task", "StageActor", "StageActor", "StageActor",
                             "_stage_task", "_stage_task", "select_columns"]
    for g in (db, lab):
        assert [x["images"] for x in g["runs"]] == [16, 32] and [x["pieces"] for x in g["runs"]] == [2, 4]
        assert [x["proposal_segments"] for x in g["runs"]] == [16 * 20, 32 * 20] and g["marginal"] is not None
    assert db["runs"][1]["committed_segments"] == 32 * 20
    assert 0 < lab["runs"][1]["committed_segments"] <= 32 * 20  # the merge keeps the visible segments

    rss = by["scale_driver_rss", "label"]
    assert [x["images"] for x in rss["runs"]] == [16, 40] and rss["panoptic_json"] == "auto"
    assert all(x["panoptic_json"]["written"] and x["panoptic_json"]["layout"] == "file" for x in rss["runs"])

    pj = by["scale_panoptic_json", None]
    assert [(r["images"], r["layout"]) for r in pj["runs"]] == [(40, "file"), (200, "parts")]
    assert pj["runs"][1]["files"] == 4 and all(r["json_bytes"] > 0 for r in pj["runs"])

    h = by["scale_history", None]
    assert h["runs"] == 30 and h["pieces"] == 120
    assert h["new"]["runs_recorded"] == h["old"]["runs_recorded"] == 30
    assert h["new"]["records_at_end"] == h["old"]["records_at_end"] == 120


def test_scale_bench_resume_tiny(tmp_path):
    """The resume start-up on the bench's local S3 server: every object listed once, the pending ones
    written out, each step timed, and the 10M start on paper."""
    printed = _run(["--sections", "resume", "--resume-objects", "1500,2600", "--resume-pieces", "40",
                    "--compact-every", "10", "--piece-images", "8", "--resume-done-share", "0.1"], tmp_path / "r.json")
    (r,) = printed
    assert r["benchmark"] == "scale_resume" and [x["objects"] for x in r["runs"]] == [1500, 2600]
    for x in r["runs"]:  # the listing in a Ray task, as the jobs on Ray run it
        assert x["listing_in"] == "task" and x["pages"] is None and x["listing_task_cpu_s"] > 0
        assert x["pending"] == x["objects"] - x["folder"]["covered_listed_images"]
        assert set(x["steps"]) == {"lease", "ledger_open_and_adopt", "listing_filter_write_upload", "lease_release"}
        assert x["folder"]["uncompacted"] == 5 and x["listing_upload"]["bytes"] > 0
    assert r["paper"]["objects"] == 10_000_000 and r["paper"]["pages"] == 10_000
