"""Named fault-injection points: the seams where the exactly-once tests kill or fail a job and where
the benchmarks time its phases. Nothing happens at a point unless a test or benchmark asks for it.

The code calls :func:`point` at each seam:

- ``io.write``: after every write or delete of :mod:`ragseg.io` (the commit path's steps);
- ``index.trained``, ``index.shards``, ``index.merged``, ``index.before_finalize``,
  ``index.before_publish``: between the steps of :mod:`ragseg.index.build`.

Two ways to act on them:

- in this process, :func:`hooked` (a context manager) calls ``hook(name)`` at every point while it is
  active: raise to inject a failure, or record the time;
- across processes (a job's driver and its Ray workers), the environment: with
  ``RAGSEG_FAULT_AFTER_WRITES=k`` and ``RAGSEG_FAULT_COUNTER=<file>``, every ``io.*`` point counts
  itself in that file (under a lock) and the k-th one SIGKILLs its whole process group: the job dies
  right after that step, as a ``kill -9`` would leave it (k=0 only counts); with
  ``RAGSEG_FAULT_SLOW_WRITES_S=s`` every ``io.*`` point sleeps ``s`` seconds (a slow store: the
  Ctrl-C tests make sure pieces are still in flight when the signal lands).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

FAULT_AFTER = "RAGSEG_FAULT_AFTER_WRITES"
FAULT_COUNTER = "RAGSEG_FAULT_COUNTER"
SLOW_WRITES = "RAGSEG_FAULT_SLOW_WRITES_S"

_HOOKS: list[Callable[[str], None]] = []


def point(name: str) -> None:
    """A named seam: the active hooks see it; an ``io.*`` point also ticks the kill counter."""
    for hook in list(_HOOKS):
        hook(name)
    if name.startswith("io.") and os.environ.get(SLOW_WRITES):
        import time

        time.sleep(float(os.environ[SLOW_WRITES]))
    if name.startswith("io.") and os.environ.get(FAULT_AFTER):
        _kill_counter_tick(int(os.environ[FAULT_AFTER]))


@contextlib.contextmanager
def hooked(hook: Callable[[str], None]) -> Iterator[None]:
    """Call ``hook(name)`` at every point reached in this process while the block runs."""
    _HOOKS.append(hook)
    try:
        yield
    finally:
        _HOOKS.remove(hook)


def _kill_counter_tick(k: int) -> None:
    import fcntl
    import signal

    with open(os.environ[FAULT_COUNTER], "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read().strip() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
        os.fsync(f.fileno())
    if n == k:
        os.killpg(os.getpgrp(), signal.SIGKILL)
