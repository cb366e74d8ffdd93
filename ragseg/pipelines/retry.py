"""``--retry-errors``: the listed rows to re-process, those whose image's latest outcome in the
output's ledger is an error row (optionally only errors matching a regular expression). Arrow compute
only, on the driver: one bulk read of the errors tables, one ``is_in`` over the listing."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from ragseg import ledger as ledgerlib
from ragseg.errors import UserError

log = logging.getLogger(__name__)


def error_text(errs: pa.Table) -> pa.Array:
    """The error rows as the pipeline wrote them: ``"<stage>: <Type>: <message>"``."""
    return pc.binary_join_element_wise(errs.column("stage"), errs.column("error"), ": ")


def retry_rows(rows: pa.Table, led: ledgerlib.Ledger | None, pattern: str | None = None) -> pa.Table:
    """The rows of ``rows`` (the source's listing) whose image's latest outcome is an error row whose
    ``"<stage>: <Type>: <message>"`` matches ``pattern`` (an RE2 regular expression, searched; None: every
    error). Error rows of images the listing no longer has are reported in one warning."""
    if led is None or led.records.num_rows == 0:
        return rows.slice(0, 0)
    errs = ledgerlib.latest_errors(led)
    if pattern:
        try:
            errs = errs.filter(pc.match_substring_regex(error_text(errs), pattern))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise UserError(f"--errors-matching {pattern!r} is not a valid regular expression ({e})") from None
    ids = pc.unique(errs.column("image_id"))
    if len(ids) == 0:
        return rows.slice(0, 0)
    out = rows.filter(pc.is_in(rows.column("image_id"), value_set=ids))
    if out.num_rows < len(ids):
        log.warning("--retry-errors: %d image(s) with an error row are no longer listed by the source; "
                    "they are not retried", len(ids) - out.num_rows)
    return out
