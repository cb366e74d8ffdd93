"""bench/scale.py --quick runs (tiny N, local disk, inline executor) and prints the four benchmarks'
JSON objects with the fields the README's table and the issue's limits read. Figures are not checked
(timings are never asserted); only the shape, and what does not depend on timing (the files a commit
writes, which do not change with the number of pieces committed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_bench_quick(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == json.loads(out.read_text())
    by = {r["benchmark"]: r for r in printed}
    assert set(by) == {"scale_commit", "scale_resume", "scale_driver_cpu", "scale_driver_rss"}

    c = by["scale_commit"]
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

    r = by["scale_resume"]
    assert r["listed_rows"] > r["pending"] > 0 and r["total_s"] >= r["load_s"]

    cpu = by["scale_driver_cpu"]
    assert cpu["executor"] == "inline" and cpu["ok"] is None  # no driver figure without Ray
    assert [x["segments"] for x in cpu["runs"]] == [32 * 20, 64 * 20]
    assert cpu["driver_cpu_s_per_1m_segments"] > 0 and cpu["marginal_driver_cpu_s_per_1m_segments"] is not None

    rss = by["scale_driver_rss"]
    assert [x["images"] for x in rss["runs"]] == [40, 160]
    assert all(x["peak_rss_mb"] > 0 for x in rss["runs"]) and rss["ratio"] > 0
