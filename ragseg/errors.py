"""The errors table: bad input never stops a job and is never dropped silently.

Inside a Ray Data pipeline every batch carries an ``error`` column (empty string = ok). A stage that
fails on one row sets that row's ``error`` to ``"<stage>: <Type>: <message>"`` and leaves the row's
payload empty; later stages pass errored rows through untouched. The pipeline's writer splits them
off into Parquet files under ``<out>/errors/`` with the columns of :data:`ERRORS_SCHEMA`.
"""

from __future__ import annotations

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
