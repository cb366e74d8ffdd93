"""How the CLI runs one job: its console and log (ragseg.console), Ctrl-C (ragseg.interrupt), and what
a failure leaves behind and prints (ragseg.failures). The pipelines know nothing of this."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

from ragseg import console, failures, interrupt
from ragseg.errors import UserError


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def shutdown_own_ray(was_running: bool) -> None:
    """Stop the Ray this job started (a Ray the caller started, e.g. a test session's, is the caller's)."""
    if _ray_running() and not was_running:
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # noqa: BLE001 - shutting down must not hide the job's result
            pass


def run_job(job: str, out: str | None, fn: Callable[[], Any], *, verbose: bool = False,
            committed: Callable[[str], int | None] | None = None) -> Any:
    """Run ``fn`` (the job) with its output folder ``out`` (None: no folder, e.g. search): the job's
    log in ``out/_logs/``, ragseg's own lines on the terminal, SIGINT as :class:`JobInterrupted`, and
    a failure as one line (UserError, exit 2; InternalError naming the log, exit 1) that leaves no
    folder the job created before its first commit."""
    counter = committed or failures.committed_pieces
    guard = failures.OutputGuard(out, counter) if out else None
    ray_before = _ray_running()
    con = console.JobConsole(job, out, verbose)
    with interrupt.handling(), con:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - every way out is sorted below
            shutdown_own_ray(ray_before)
            raise _failure(e, job, out, guard, con, counter) from None
        shutdown_own_ray(ray_before)
        return result


def _failure(e: BaseException, job: str, out: str | None, guard, con: console.JobConsole, counter) -> BaseException:
    from ragseg.errors import user_error_from_ray

    if isinstance(e, (SystemExit,)) or type(e).__module__.startswith(("click", "typer")):
        return e
    if isinstance(e, (KeyboardInterrupt, interrupt.JobInterrupted)):
        if guard is not None:
            guard.after_failure("interrupt")
        pieces = counter(out) if out else None
        return interrupt.JobInterrupted(interrupt.resume_line(pieces), pieces)
    user = user_error_from_ray(e) or (e if isinstance(e, UserError) else None) or failures.classify(e, out)
    if user is not None:
        con.write_log("".join(traceback.format_exception(e)))
        if guard is not None and guard.after_failure("user"):
            con.discard_log()
        return user
    trace_text = "".join(traceback.format_exception(e))
    where = con.final_uri if con.write_log(trace_text) else _temp_log(job, trace_text)
    if guard is not None:
        guard.after_failure("internal")
    trace = f"full trace in {where}" if where else "no log could be written"
    msg = " ".join(str(e).split())[:300]
    return failures.InternalError(f"internal error in {job}: {type(e).__name__}: {msg} ({trace})")


def _temp_log(job: str, text: str) -> str | None:
    """A trace written to a temporary file (when the job had no log of its own)."""
    import tempfile
    import time

    try:
        fd, path = tempfile.mkstemp(prefix=f"ragseg-{job}-{time.strftime('%Y%m%dT%H%M%S')}-", suffix=".log")
        with open(fd, "w") as f:
            f.write(" ".join(sys.argv) + "\n" + text)
        return path
    except OSError:
        return None
