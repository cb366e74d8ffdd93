"""The errors table: bad input never stops a job and is never dropped silently.

Inside a Ray Data pipeline every batch carries an ``error`` column (empty string = ok). A stage that
fails on one row sets that row's ``error`` to ``"<stage>: <Type>: <message>"`` and leaves the row's
payload empty; later stages pass errored rows through untouched. The pipeline's writer splits them
off into Parquet files under ``<out>/errors/`` with the columns of :data:`ERRORS_SCHEMA`.
"""

from __future__ import annotations

import re

import pyarrow as pa


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, model mismatch). The CLI prints the
    message on one line and exits with code 2, without a traceback."""


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("error", pa.string()),
    ]
)


def describe(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters."""
    msg = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {msg}"[:limit]


def error_text(stage: str, exc: BaseException | str) -> str:
    return f"{stage}: {exc if isinstance(exc, str) else describe(exc)}"


def split_error(text: str) -> tuple[str, str]:
    """``"stage: Type: msg"`` -> ("stage", "Type: msg")."""
    stage, _, rest = text.partition(": ")
    return stage, rest


def failed_rows_table(rows: list[dict]) -> pa.Table:
    """Pipeline rows whose ``error`` is set (``"stage: Type: msg"``) -> an errors table."""
    out = []
    for r in rows:
        stage, msg = split_error(str(r["error"]))
        out.append({"uri": r["uri"], "image_id": r["image_id"], "stage": stage, "error": msg})
    return errors_table(out)


def errors_table(rows: list[dict]) -> pa.Table:
    """Rows with ``uri``, ``image_id``, ``stage``, ``error`` -> an Arrow table of ERRORS_SCHEMA."""
    cols = {f.name: [str(r.get(f.name, "") or "") for r in rows] for f in ERRORS_SCHEMA}
    return pa.table(cols, schema=ERRORS_SCHEMA)


# ----------------------------------------------------------------------------------------------
# A UserError raised inside a Ray worker, back as one line
# ----------------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the exception line of a formatted traceback: "ragseg.errors.UserError: message"
_EXC_LINE = re.compile(r"^(ragseg(?:\.\w+)+): (.*)$", re.M)
_STAGE_FRAME = re.compile(r'File "[^"]*ragseg/stages/(\w+)\.py", line \d+')
_RAY_FN = re.compile(r"ray::(?:MapWorker\()?(?:MapBatches\()?(\w+)")


def _user_error_class(dotted: str) -> type | None:
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, UserError) else None


def _chain(exc: BaseException):
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(x, BaseException))


def _stage_of(text: str) -> str | None:
    """The ragseg stage a worker traceback ran in: its innermost ``ragseg/stages/<name>.py`` frame, else
    the Ray task / actor name (``ray::MapWorker(MapBatches(Segment))`` -> ``Segment``)."""
    frames = _STAGE_FRAME.findall(text)
    if frames:
        return frames[-1]
    names = [n for n in _RAY_FN.findall(text) if n not in ("StageActor", "MapWorker", "MapBatches")]
    return names[-1] if names else None


def user_error_from_ray(exc: BaseException) -> UserError | None:
    """The :class:`UserError` a Ray worker raised, out of the exception Ray (Data) hands the driver
    (``RayTaskError``, ``ActorDiedError`` when an actor's constructor raised, Ray Data's
    ``UserCodeException`` / ``SystemException`` wrapping either), as one line naming the stage:
    ``stage segment: <message>``. None when the chain holds no ragseg UserError (a real bug: keep the
    traceback). A plain UserError raised on the driver is not a Ray error: None too."""
    texts: list[str] = []
    for e in _chain(exc):
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError) and not _is_ray_error(cause):
            tb = getattr(e, "traceback_str", "") or str(e)
            return _named(type(cause), " ".join(str(cause).split()), _stage_of(_ANSI.sub("", tb)))
        if _is_ray_error(e) or type(e).__module__.startswith("ray."):
            texts.append(_ANSI.sub("", str(e) + "\n" + str(getattr(e, "traceback_str", "") or "")))
    for text in texts:
        hits = [(m.group(1), m.group(2)) for m in _EXC_LINE.finditer(text)]
        for dotted, msg in reversed(hits):
            cls = _user_error_class(dotted)
            if cls is not None:
                return _named(cls, msg.strip(), _stage_of(text))
    return None


def _is_ray_error(e: BaseException) -> bool:
    return any(c.__module__.startswith("ray.") for c in type(e).__mro__)


def _named(cls: type, msg: str, stage: str | None) -> UserError:
    stage = (stage or "").lower()
    text = f"stage {stage}: {msg}" if stage else f"in a Ray worker: {msg}"
    try:
        return cls(text)
    except Exception:  # noqa: BLE001 - a subclass with another constructor
        return UserError(text)
