"""What a job shows: ragseg's own lines on the terminal, everything else in the job's log.

A job command (build-db, label, build-index, refresh, search) runs inside a :class:`JobConsole`:

- the process's file descriptors 1 and 2 point at the job's log file, so Ray's driver messages, the
  log lines Ray forwards from its workers, faiss's C-level prints, Python warnings and third-party
  logging all land in ``OUT/_logs/<UTC time>-<job>-<pid>.log`` (a remote ``OUT``: a local file,
  uploaded there when the job ends; no ``OUT``: a temporary file, deleted after a success);
- ragseg's own lines go to the terminal's original stdout / stderr (:func:`out_stream`,
  :func:`err_stream`): the progress display, warnings of ``ragseg.*`` loggers, the end summary, the
  one-line error, the JSON result on stdout;
- ``-v`` (``verbose``) copies the log to the terminal as it grows.

The progress display (:class:`JobProgress`) is a rich bar on a terminal (images, pieces committed,
images/s, ETA) and plain lines every ``ray.progress_interval_s`` seconds otherwise (a pipe, a CI log).
Outside a JobConsole (the library called from Python, the tests) everything goes to ``sys.stderr``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import IO, Any

LOGS = "_logs"

_ACTIVE: JobConsole | None = None


def err_stream() -> IO[str]:
    """Where ragseg's own lines go: the terminal's stderr (also while a job's log holds fd 2)."""
    return _ACTIVE.user_err if _ACTIVE is not None else sys.stderr


def out_stream() -> IO[str]:
    """Where results (the JSON a command prints) go: the terminal's stdout."""
    return _ACTIVE.user_out if _ACTIVE is not None else sys.stdout


def say(line: str) -> None:
    """One line of ragseg's own on the terminal's stderr."""
    s = err_stream()
    s.write(line.rstrip("\n") + "\n")
    s.flush()


def is_tty() -> bool:
    try:
        return err_stream().isatty()
    except (AttributeError, ValueError):
        return False


def active() -> JobConsole | None:
    return _ACTIVE


def log_path() -> str | None:
    """The running job's log file (local path; remote outputs get it uploaded at the end)."""
    return _ACTIVE.log_path if _ACTIVE is not None else None


def log_uri() -> str | None:
    """Where the running job's log ends up (``OUT/_logs/...``, or the local path)."""
    return _ACTIVE.final_uri if _ACTIVE is not None else None


class _UserLines(logging.Handler):
    """``ragseg.*`` warnings and errors as ``warning: ...`` lines on the terminal (they also reach the
    log through the root logger)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}")
        except Exception:  # noqa: BLE001 - a display problem never fails the job
            pass


class JobConsole:
    """Context manager: the job's log on fds 1 and 2, ragseg's lines on the saved terminal streams
    (module docstring). ``out`` is the job's output folder (None: a temporary log)."""

    def __init__(self, job: str, out: str | None = None, verbose: bool = False):
        self.job, self.out, self.verbose = job, out, verbose
        self.log_path: str | None = None
        self.final_uri: str | None = None
        self.user_out: IO[str] = sys.stdout
        self.user_err: IO[str] = sys.stderr
        self._saved: tuple[int, int] | None = None
        self._log_fd: int | None = None
        self._handler: _UserLines | None = None
        self._tail: threading.Thread | None = None
        self._stop = threading.Event()
        self.keep_log = True
        self._discard = False

    # -- log location ---------------------------------------------------------------------------
    def _open_log(self) -> None:
        from ragseg import io

        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"{stamp}-{self.job}-{os.getpid()}.log"
        local = bool(self.out) and io.protocol(self.out) == "file"
        if local:
            d = os.path.join(os.path.abspath(self.out.removeprefix("file://")), LOGS)
            try:
                os.makedirs(d, exist_ok=True)
                self.log_path = self.final_uri = os.path.join(d, name)
            except OSError:  # an unwritable output: the job itself will say so, in one line
                local = False
        if not local:
            d = os.path.join(tempfile.gettempdir(), "ragseg-logs")
            os.makedirs(d, exist_ok=True)
            self.log_path = os.path.join(d, name)
            remote = bool(self.out) and io.protocol(self.out) != "file"
            self.final_uri = io.join(self.out, LOGS, name) if remote else self.log_path
            self.keep_log = remote
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._log_fd, f"ragseg {self.job}: {' '.join(sys.argv)}\n".encode())

    # -- enter / exit ---------------------------------------------------------------------------
    def __enter__(self) -> JobConsole:
        global _ACTIVE
        try:
            fd1, fd2 = sys.stdout.fileno(), sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            fd1 = fd2 = -1
        if fd1 != 1 or fd2 != 2 or _ACTIVE is not None:  # not a real process (a test runner's streams)
            return self
        self._open_log()
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        enc = dict(encoding="utf-8", errors="replace", closefd=True, buffering=1)
        self.user_out = open(os.dup(self._saved[0]), "w", **enc)  # noqa: SIM115 - closed in __exit__
        self.user_err = open(os.dup(self._saved[1]), "w", **enc)  # noqa: SIM115
        os.dup2(self._log_fd, 1)
        os.dup2(self._log_fd, 2)
        self._handler = _UserLines(level=logging.WARNING)
        logging.getLogger("ragseg").addHandler(self._handler)
        _ACTIVE = self
        if self.verbose:
            self._tail = threading.Thread(target=self._follow, name="ragseg-log-tail", daemon=True)
            self._tail.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE
        if self._saved is None:
            return
        _flush_c_stdio()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        self._stop.set()
        if self._tail is not None:
            self._tail.join(timeout=2)
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        if self._handler is not None:
            logging.getLogger("ragseg").removeHandler(self._handler)
        _ACTIVE = None
        for stream in (self.user_out, self.user_err):
            with contextlib.suppress(Exception):
                stream.close()
        self.user_out, self.user_err = sys.stdout, sys.stderr
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._finish_log(failed=exc[0] is not None)

    def discard_log(self) -> None:
        """The job left no folder behind (a user error before its first commit): no log either."""
        self._discard = True
        self.final_uri = None

    def _finish_log(self, failed: bool) -> None:
        from ragseg import io

        if not self.log_path:
            return
        if self._discard:
            with contextlib.suppress(OSError):
                os.remove(self.log_path)
            return
        if self.final_uri != self.log_path:  # a remote output: upload (best effort)
            try:
                io.put_file_atomic(self.log_path, self.final_uri)
                os.remove(self.log_path)
            except Exception:  # noqa: BLE001 - the log stays local; its path is in the error line
                self.final_uri = self.log_path
        elif not self.keep_log and not failed:
            with contextlib.suppress(OSError):
                os.remove(self.log_path)

    def _follow(self) -> None:
        """``-v``: copy what the log gains to the terminal's stderr."""
        assert self.log_path is not None
        with open(self.log_path, "rb") as f:
            while True:
                chunk = f.read()
                if chunk:
                    with contextlib.suppress(Exception):
                        self.user_err.write(chunk.decode("utf-8", "replace"))
                        self.user_err.flush()
                elif self._stop.is_set():
                    return
                else:
                    self._stop.wait(0.2)

    def write_log(self, text: str) -> bool:
        """Append to the job's log (a traceback, a note); False when there is no log (inactive)."""
        if self._log_fd is None:
            return False
        _flush_c_stdio()
        os.write(self._log_fd, (text.rstrip("\n") + "\n").encode("utf-8", "replace"))
        self.keep_log = True
        return True


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------
def _eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class JobProgress:
    """Images and pieces committed, images/s and ETA of one job: a rich bar on a terminal, a plain
    line every ``interval`` seconds otherwise; nothing when ``enabled`` is false."""

    def __init__(self, description: str, images: int, pieces: int | None, enabled: bool = True,
                 interval: float = 60.0):
        self.description, self.images, self.pieces = description, int(images), pieces
        self.enabled = enabled and images > 0
        self.interval = float(interval)
        self.done_images = 0
        self.done_pieces = 0
        self.t0 = time.perf_counter()
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        if is_tty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                TextColumn("{task.fields[pieces]} pieces"), TextColumn("{task.fields[rate]} img/s"),
                TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=err_stream()), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(description, total=images, rate="-", pieces=self._pieces_text())
        else:
            self._thread = threading.Thread(target=self._lines, name="ragseg-progress", daemon=True)
            self._thread.start()

    def _pieces_text(self) -> str:
        return f"{self.done_pieces}/{self.pieces}" if self.pieces else str(self.done_pieces)

    def rate(self) -> float:
        return self.done_images / max(time.perf_counter() - self.t0, 1e-9)

    def line(self) -> str:
        r = self.rate()
        eta = (self.images - self.done_images) / r if r > 0 else None
        return (f"{self.description}: {self.done_images}/{self.images} images, {self._pieces_text()} pieces committed, "
                f"{r:.2f} images/s, ETA {_eta(eta)}")

    def advance(self, images: int, pieces: int = 1) -> None:
        if not self.enabled:
            return
        self.done_images += int(images)
        self.done_pieces += int(pieces)
        if self._bar is not None:
            self._bar.update(self._task, advance=images, rate=f"{self.rate():.2f}", pieces=self._pieces_text())

    HEARTBEAT = 10  # an unchanged count is repeated every this many intervals (the job is alive)

    def _lines(self) -> None:
        """A line at most every ``interval`` s when a piece was committed since the last one, and a
        heartbeat every HEARTBEAT intervals when none was."""
        last, quiet = 0, 0
        while not self._stop.wait(self.interval):
            quiet += 1
            if self.done_pieces != last or quiet >= self.HEARTBEAT:
                last, quiet = self.done_pieces, 0
                say(self.line())

    def close(self) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def summary_lines(title: str, summary: dict[str, Any]) -> list[str]:
    """The end summary: output, counts, errors with their folder, throughput (one or two lines)."""
    from ragseg import io

    out = summary.get("db") or summary.get("out") or ""
    images, segs, errs = summary.get("images", 0), summary.get("segments", 0), summary.get("errors", 0)
    pieces = summary.get("shards_written", 0)
    wall, rate = summary.get("wall_seconds"), summary.get("images_per_second")
    skipped = summary.get("shards_skipped", 0)
    if not pieces and not errs:
        lines = [f"{title}: nothing to do in {out}: every listed image is committed already"
                 + (f" ({skipped} pieces)" if skipped else "")]
    else:
        done = f"{images} images, {segs} segments, {errs} errors in {pieces} pieces"
        speed = f" ({wall:.1f} s, {rate:.2f} images/s)" if wall is not None and rate is not None else ""
        lines = [f"{title}: done: {done} -> {out}{speed}"]
    if errs:
        lines.append(f"{title}: {errs} errors: one row each in {io.join(out, 'errors')}/ (uri, image_id, stage, error)")
    return lines
