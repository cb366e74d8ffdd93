"""moto's S3 server on 127.0.0.1 for tests and benchmarks (the real S3 protocol, no network)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    """Start moto's S3 server on 127.0.0.1 (a free port); returns (process, endpoint URL) once it answers."""
    import socket
    import subprocess
    import sys
    import time

    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.terminate()
                raise RuntimeError("moto_server did not start within 30 s") from None
            time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def s3_env(endpoint: str):
    """While the block runs, the AWS_* variables point s3fs (and every subprocess or Ray worker started
    meanwhile) at the S3 server ``endpoint``; yields those variables."""
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def moto_s3_env():
    """moto's S3 server on 127.0.0.1 while the block runs, with :func:`s3_env` pointing at it; yields
    the AWS_* variables. Also used by bench/scale.py."""
    proc, endpoint = start_moto()
    try:
        with s3_env(endpoint) as env:
            yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
