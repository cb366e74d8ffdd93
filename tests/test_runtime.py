"""Ray start-up (ragseg.runtime.init_ray): a fresh local instance despite a stale cluster file, and an
unreachable cluster as one line with exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

SCRIPT = r"""
import ray
from ragseg.config import RayConfig
from ragseg.runtime import init_ray
init_ray(RayConfig(num_cpus=1, object_store_memory=80 * 1024 * 1024))
print("nodes", len(ray.nodes()), ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def test_no_address_starts_a_fresh_local_ray_despite_a_stale_cluster_file():
    """A crashed `ray start` leaves <tmp>/ray/ray_current_cluster behind: plain ray.init() would try
    to join it (and refuse num_cpus); ragseg starts its own instance on 127.0.0.1."""
    tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths live below it
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:1")  # nothing listens there
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-2000:]
        line = [x for x in res.stdout.splitlines() if x.startswith("nodes")][0]
        assert line.split()[1] == "1" and line.split()[2].startswith("127.0.0.1:")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_unreachable_cluster_is_one_line_exit_2(tmp_path, tiny_cfg_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.jpg")
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ragseg"), "build-db", "--config",
                          tiny_cfg_path, "--set", "source.kind=folder", "--set", f"source.uri={tmp_path / 'imgs'}",
                          "--set", "ray.connect_timeout_s=2", "--out", str(tmp_path / "db"),
                          "--address", "127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "cannot reach the Ray cluster" in res.stderr


def test_scheduler_wait_sets_ray_datas_loop_wait_and_gives_back_the_old_one():
    """ray.scheduler_wait_s reaches the constant Ray Data's scheduling loop reads at every step (a Ray
    upgrade that renames it fails here, not silently in production)."""
    from ray.data._internal.execution import streaming_executor_state as ses

    from ragseg.runtime import set_scheduler_wait

    before = ses.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    old = set_scheduler_wait(0.7)
    try:
        assert old == before and ses.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == 0.7
    finally:
        assert set_scheduler_wait(old) == 0.7
    assert ses.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == before and set_scheduler_wait(None) is None
