"""Ctrl-C for the jobs.

While a job command runs (:func:`handling`), the first SIGINT prints one line and raises
:class:`JobInterrupted` in the main thread: the driver stops taking commit records, which closes the
Ray Data iteration (no new work is started and the running tasks are cancelled: a piece whose commit
record was not written yet is abandoned, its files are overwritten by the next run), the records
already received are compacted, the lease is released and the job's own Ray is shut down. The CLI
then counts the committed pieces and prints ``interrupted: N pieces committed; rerun the same command
to resume`` and exits with code 130. A second SIGINT exits at once (``os._exit(130)``); the ledger
makes either safe to resume, as after a kill -9.

The handler is installed even when the process inherited SIGINT as ignored (a shell's background
job): ``kill -INT`` on a long job must stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

EXIT_CODE = 130


class JobInterrupted(BaseException):
    """The user pressed Ctrl-C (SIGINT) during a job; ``pieces`` is filled in by the caller. A
    BaseException like KeyboardInterrupt (no ``except Exception`` swallows it), but not one: click
    turns a KeyboardInterrupt into its own Abort."""

    def __init__(self, message: str = "interrupted", pieces: int | None = None):
        super().__init__(message)
        self.pieces = pieces


def resume_line(pieces: int | None) -> str:
    n = "?" if pieces is None else str(pieces)
    return f"interrupted: {n} pieces committed; rerun the same command to resume"


@contextlib.contextmanager
def handling():
    """SIGINT handling for one job (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from ragseg import console

    state = {"count": 0}

    def handler(signum, frame):
        state["count"] += 1
        if state["count"] == 1:
            with contextlib.suppress(Exception):
                console.say("interrupt: stopping; in-flight pieces are abandoned (Ctrl-C again to exit at once)")
            raise JobInterrupted()
        with contextlib.suppress(Exception):
            err = console.err_stream()
            err.write("interrupted again: exiting now; rerun the same command to resume\n")
            err.flush()
        os._exit(EXIT_CODE)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        with contextlib.suppress(Exception):
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
