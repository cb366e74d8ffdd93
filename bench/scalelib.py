"""Helpers of bench/scale.py and its parts: the driver's CPU (by thread) and peak RSS, the
machine's load, small generated inputs, and a local S3 server (moto on 127.0.0.1) that lists like S3.

The S3 server: moto's ``list_objects_v2`` filters and sorts every key of the bucket at every page
(O(N) per page, so listing N keys is quadratic), and moto takes about 1.5 ms of client time per PUT,
so a bucket of 200k objects takes half an hour to fill. :func:`s3_server` starts moto in a child
process that (1) answers ListObjectsV2 without a delimiter from a sorted key list kept per bucket
(bisect; rebuilt after any write), which makes a page cost what it costs S3, a constant, and (2)
creates the requested image objects straight in moto's backend before it serves. Everything else
is moto's own S3.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def stats(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"median": round(float(np.median(a)), 5), "p90": round(float(np.percentile(a, 90)), 5),
            "min": round(float(a.min()), 5), "max": round(float(a.max()), 5), "n": len(xs)}


def cpu() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def _thread_cpu_times() -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of this process, named (Python's name, else the OS's)."""
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for t in psutil.Process().threads():
        name = names.get(t.id)
        if name is None:
            try:
                with open(f"/proc/self/task/{t.id}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = "?"
        out[t.id] = (name, t.user_time + t.system_time)
    return out


class ThreadCpu:
    """Samples the CPU seconds of each of this process's threads every ``every`` s (a thread that ends
    keeps its last sample), so the drain's CPU can be split by thread; its own thread is reported."""

    NAME = "bench-thread-sampler"

    def __init__(self, every: float = 2.0):
        self.every, self.first, self.last = every, {}, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name=self.NAME, daemon=True)

    def _sample(self) -> None:
        for tid, (name, c) in _thread_cpu_times().items():
            self.first.setdefault(tid, (name, 0.0) if self.last else (name, c))
            self.last[tid] = (name, c)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()

    def by_thread(self, top: int = 6) -> dict[str, float]:
        import re

        agg: dict[str, float] = {}
        for tid, (name, c) in self.last.items():
            key = re.sub(r"-.*$", "", name)  # StreamingExecutor-dataset_<id>, Thread-3 (...) ...
            agg[key] = agg.get(key, 0.0) + c - self.first[tid][1]
        return {k: round(v, 3) for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:top] if v > 0.005}


def measured(execute, sink: dict):
    """Wrap an executor: the driver's CPU seconds from its start to the last record drained (less the
    thread sampler's own), and their split by thread of the driver."""

    def ex(cfg, pending, writer, per_piece):
        c0, w0 = cpu(), time.perf_counter()
        with ThreadCpu() as th:
            gen = execute(cfg, pending, writer, per_piece)
            del pending  # the executor's now, as in the jobs
            yield from gen
        split = th.by_thread(top=100)
        own = sum(split.pop(k) for k in [k for k in split if k.startswith("bench")])  # the samplers' own
        sink["drain_cpu_s"] = cpu() - c0 - own
        sink["drain_wall_s"] = time.perf_counter() - w0
        sink["drain_cpu_s_by_thread"] = dict(list(split.items())[:6])

    return ex


class RssSampler:
    def __init__(self, every: float = 0.1):
        import psutil

        self.p, self.every, self.peak, self.peak_private = psutil.Process(), every, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)

    def _run(self):
        while not self._stop.is_set():
            m = self.p.memory_info()
            self.peak = max(self.peak, m.rss)
            self.peak_private = max(self.peak_private, m.rss - getattr(m, "shared", 0))
            time.sleep(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: ``5`` to /proc/self/clear_refs resets VmHWM), so that
    the peak read after the job is the job's own, not the imports' or Ray start-up's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss_kb() > 0
    except OSError:
        return False


def peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0




def ray_overrides(images_per_block: int) -> list[str]:
    """Every Ray run of the benchmarks: a local Ray, 2 CPUs, a 500 MB object store, no progress bars."""
    return [f"ray.images_per_block={images_per_block}", "ray.num_cpus=2", f"ray.object_store_memory={500 * 2**20}",
            "ray.node_ip_address=127.0.0.1", "ray.progress=false"]


LINKS_PER_PROTO = 50_000  # hard links per file stay under the file system's limit (ext4: 65000)


def jpeg_tree(d: str, n: int, hw: tuple[int, int], per_dir: int = 1000, start: int = 0) -> list[str]:
    """``n`` real JPEG files (one noise image of ``hw``, hard-linked) as ``d/<k>/im<i>.jpg``, 1000 a
    folder; returns their image ids (paths below ``d`` without the extension)."""
    import shutil

    from PIL import Image

    os.makedirs(d, exist_ok=True)
    proto = os.path.join(d, "_proto.jpeg.tmp")
    if not os.path.exists(proto):
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(proto, format="JPEG", quality=80)
    ids = []
    for i in range(start, start + n):
        sub = os.path.join(d, f"{i // per_dir:05d}")
        if i % per_dir == 0 or i == start:
            os.makedirs(sub, exist_ok=True)
        src = f"{proto}.{i // LINKS_PER_PROTO}"
        if not os.path.exists(src):
            shutil.copyfile(proto, src)
        p = os.path.join(sub, f"im{i:08d}.jpg")
        if not os.path.exists(p):
            os.link(src, p)
        ids.append(f"{i // per_dir:05d}/im{i:08d}")
    return ids


def remove_proto(d: str) -> None:
    for f in os.listdir(d):
        if f.startswith("_proto.jpeg.tmp"):
            os.remove(os.path.join(d, f))


def graph_images(a, work: str) -> str:
    """The graph runs' image folder: ``a._images`` when the parent made it, else ``a._n`` JPEGs of
    ``a.graph_hw`` generated under ``work``."""
    if a._images:
        return a._images
    imgs = os.path.join(work, "imgs")
    jpeg_tree(imgs, a._n, tuple(a.graph_hw))
    remove_proto(imgs)
    return imgs


# ----------------------------------------------------------------------------------------------
# Local S3 server (module docstring)
# ----------------------------------------------------------------------------------------------
def s3_key(prefix: str, i: int, per_dir: int = 1000) -> str:
    """The key of generated object ``i`` under ``prefix`` (1000 a "folder", like :func:`jpeg_tree`)."""
    return f"{prefix}/{i // per_dir:05d}/im{i:08d}.jpg"


def _serve(port: int, fills: list[str]) -> None:
    """The server child: ``fills`` = ``bucket/prefix:N`` objects to create before serving."""
    import bisect

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3 import models as m
    from moto.server import ThreadedMotoServer

    gen, cache = [0], {}

    def bump(fn):
        def w(self, *a, **k):
            gen[0] += 1
            return fn(self, *a, **k)
        return w

    for name in ("put_object", "delete_object", "delete_objects", "copy_object", "create_bucket", "delete_bucket",
                 "complete_multipart_upload"):
        if hasattr(m.S3Backend, name):
            setattr(m.S3Backend, name, bump(getattr(m.S3Backend, name)))
    orig = m.S3Backend.list_objects_v2

    def list_objects_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        if delimiter:
            return orig(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        c = cache.get(bucket.name)
        if c is None or c[0] != gen[0]:
            names = sorted(k for k, v in bucket.keys.items() if not isinstance(v, m.FakeDeleteMarker))
            c = cache[bucket.name] = (gen[0], names)
        names, prefix = c[1], prefix or ""
        lo = bisect.bisect_left(names, prefix)
        after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
        if after:
            lo = max(lo, bisect.bisect_right(names, after))
        out, i = [], lo
        while i < len(names) and len(out) <= max_keys and names[i].startswith(prefix):
            out.append(bucket.keys[names[i]])
            i += 1
        return self._truncate_result(out, max_keys)

    m.S3Backend.list_objects_v2 = list_objects_v2
    backend = m.s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for spec in fills:
        path, n = spec.rsplit(":", 1)
        bucket, prefix = path.split("/", 1)
        if bucket not in backend.buckets:
            backend.create_bucket(bucket, "us-east-1")
        for i in range(int(n)):
            backend.put_object(bucket, s3_key(prefix, i), b"")
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    print("ready", flush=True)
    threading.Event().wait()


@contextlib.contextmanager
def s3_server(fills: list[str] = ()):
    """The local S3 server (module docstring) while the block runs, with the AWS_* variables pointing
    s3fs (and every child process and Ray worker started meanwhile) at it; yields those variables."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-s3", str(port), *fills],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the local S3 server did not start (exit {proc.poll()})")
        from ragseg.testing.s3 import s3_env

        with s3_env(f"http://127.0.0.1:{port}") as env:
            yield env
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--serve-s3":
        _serve(int(sys.argv[2]), sys.argv[3:])
