"""Failures as the user sees them: one line, and an output folder that tells the truth.

- :func:`classify` turns an operating-system problem (no space left, read-only or not permitted),
  raised on the driver or inside a Ray worker (Ray wraps it in its own errors, with pages of
  traceback), into one :class:`~ragseg.errors.UserError` line naming the folder (and, for a full
  disk, the bytes still free there).
- :class:`OutputGuard` notes what an output folder held before a job; when the job fails before its
  first commit it removes what the job created (a user error: the whole folder it made) or marks the
  folder as not started (an interrupt or an internal error: everything but ``_logs/`` goes, so ``info``
  and a rerun see a new folder). A folder with committed pieces, or with a lease (another job is
  writing there: the job's own lease is released before the guard runs), is never touched.
- :class:`InternalError`: an unexpected exception, reduced to one summary line that names the log
  holding its full traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil

from ragseg.errors import UserError

log = logging.getLogger(__name__)

USER_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\][^'\"\n]*?(?:: ['\"]([^'\"\n]+)['\"])?")


class InternalError(Exception):
    """An unexpected error, as the one line the CLI prints (the traceback is in the job's log)."""


def _chain(exc: BaseException):
    from ragseg.errors import _chain as chain

    return chain(exc)


def os_error_of(exc: BaseException) -> tuple[int, str | None] | None:
    """(errno, file name) of a user-fixable OSError anywhere in ``exc``'s chain, also inside the text
    of a Ray error that wraps one; None when there is none."""
    texts = []
    for e in _chain(exc):
        no = getattr(e, "errno", None)
        if isinstance(e, OSError) and no in USER_ERRNOS:
            return no, getattr(e, "filename", None)
        texts.append(str(e))
        tb = getattr(e, "traceback_str", None)
        if tb:
            texts.append(str(tb))
    for text in texts:
        for m in _ERRNO_TEXT.finditer(text):
            if int(m.group(1)) in USER_ERRNOS:
                return int(m.group(1)), m.group(2)
    return None


def free_bytes(path: str) -> tuple[str, int] | None:
    """(the nearest existing local folder of ``path``, bytes free there); None for remote paths."""
    if "://" in path and not path.startswith("file://"):
        return None
    p = os.path.abspath(path.removeprefix("file://"))
    while p and not os.path.isdir(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        return p, shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def classify(exc: BaseException, out: str | None) -> UserError | None:
    """The one-line UserError for an OS-level problem in ``exc`` (see module docstring), else None."""
    got = os_error_of(exc)
    if got is None:
        return None
    no, filename = got
    what = USER_ERRNOS[no]
    where = out or filename or "the output"
    if no in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(filename or out or ".")
        room = f"; {free[1]} bytes ({_size(free[1])}) free in {free[0]}" if free else ""
        return UserError(f"{what} while writing {where}{room}: free some space (or use another --out) and rerun "
                         f"the same command to resume")
    name = f" ({filename})" if filename and filename != where else ""
    if out and filename and not os.path.abspath(str(filename)).startswith(os.path.abspath(out.removeprefix("file://"))):
        return UserError(f"cannot access {filename}: {what}")
    return UserError(f"cannot write the output folder {where}{name}: {what}; choose a writable --out")


# ----------------------------------------------------------------------------------------------
# The output folder before and after a failed job
# ----------------------------------------------------------------------------------------------
def committed_pieces(out: str) -> int | None:
    """Committed pieces of a ledger folder (commit objects + compacted records), None when unknown."""
    from ragseg import ledger

    try:
        kind = ledger.peek_kind(out)
        if not kind:
            return len(ledger.list_commits(out))
        led = ledger.load(out, kind)
        return 0 if led is None else led.records.num_rows
    except Exception as e:  # noqa: BLE001 - unknown: the folder is left alone
        log.debug("cannot count the committed pieces of %s: %s", out, e)
        return None


class OutputGuard:
    """See the module docstring. ``committed(out) -> int | None`` counts what a reader would trust
    (default: the ledger's pieces; an index store: its published versions)."""

    def __init__(self, out: str | None, committed=committed_pieces):
        from ragseg import io

        self.out = out
        self.committed = committed
        self.existed = bool(out) and _exists(out)
        self.entries = set(_entries(out)) if self.existed else set()
        self._io = io

    def after_failure(self, kind: str) -> bool:
        """``kind``: "user" (remove what the job created, its log too), "interrupt" / "internal" (keep
        ``_logs/``). True when the job's log went with what was removed."""
        from ragseg import ledger

        if not self.out or not _exists(self.out):
            return False
        if _exists(self._io.join(self.out, ledger.LEASE)):
            return False  # another job's lease (ours is released by now): its files are not ours to remove
        n = self.committed(self.out)
        if n is None or n > 0:
            return False
        from ragseg.console import LOGS

        try:
            if not self.existed and kind == "user":
                self._io.remove(self.out, recursive=True)
                return True
            keep = set(self.entries) | ({LOGS} if kind != "user" else set())
            for name in _entries(self.out):
                if name not in keep:
                    self._io.remove(self._io.join(self.out, name), recursive=True)
            return LOGS not in keep
        except Exception as e:  # noqa: BLE001 - cleaning up must not hide the job's own error
            log.debug("could not clean %s: %s", self.out, e)
            return False


def _exists(uri: str) -> bool:
    from ragseg import io

    try:
        return io.exists(uri)
    except Exception:  # noqa: BLE001
        return False


def _entries(uri: str | None, prefix: str = "") -> list[str]:
    """Names directly under a folder (those starting with ``prefix``); [] when it cannot be listed."""
    from ragseg import io

    if not uri:
        return []
    try:
        fs, path = io.fs_and_path(uri)
        fs.invalidate_cache(path)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        return [n for n in names if n.startswith(prefix)]
    except Exception:  # noqa: BLE001
        return []
