"""The pending image rows of a job, handed to Ray Data as a file that Ray's read tasks read.

The driver writes the pending rows (Arrow tables, ragseg.sources.row_schema) once, to
``<out>/_listing/<run>.arrows``: one Arrow IPC stream per piece (``images_per_shard`` rows), one
after the other (:class:`ListingWriter`: batch by batch as the source is listed, holding at most one
piece's rows). It keeps only the byte offset of each piece. A :class:`ListingDatasource` read task
covers a run of consecutive pieces: one ranged GET of its bytes, then a table per piece (Ray's
output buffer joins them into one block of the task's pieces).

So the driver builds no block and holds no row in Ray's object store (``from_items`` /
``from_arrow`` put every input block into the object store from the driver, which stays there for
the whole job), and a block of the graph is a few pieces: Ray Data's per-task work on the driver is
per few pieces, not per ``images_per_block`` images (the stages still batch ``images_per_block``
images at a time inside a task).
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ragseg import io

LISTING_DIR = "_listing"
SUFFIX = ".arrows"


def listing_dir(out: str) -> str:
    return io.join(out, LISTING_DIR)


def clear_listings(out: str) -> None:
    """Remove listing files that earlier (killed) runs left; only called under the folder's lease."""
    d = listing_dir(out)
    if io.exists(d):
        io.remove(d, recursive=True)


def remove_listing(uri: str | None) -> None:
    """Remove one job's listing file (and the listing folder once empty, locally): a job never removes
    another's, even one that took its folder over after its lease expired. None: no file was written."""
    if uri is None:
        return
    io.remove(uri)
    fs, path = io.fs_and_path(uri)
    if io.protocol_of_fs(fs) == "file":
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:  # not empty (another job's listing) or gone
            pass


@dataclass
class Listing:
    """A pending listing written to ``<out>/_listing/``: its URI (None when it has no row), the byte
    offsets of its pieces (``len = pieces + 1``), the rows' Arrow schema and the row count."""

    uri: str | None
    offsets: np.ndarray
    schema: object
    num_rows: int
    cpu_s: float | None = None  # CPU seconds of the listing that wrote it, where it ran (a Ray task)

    def iter_pieces(self) -> Iterator:
        """Its pieces as Arrow tables, read back one ranged read at a time (the inline executor)."""
        if self.uri is None:
            return
        for k in range(len(self.offsets) - 1):
            yield from read_pieces(self.uri, (int(self.offsets[k]), int(self.offsets[k + 1])))


class ListingWriter:
    """Writes pending rows (tables of one schema, given a batch at a time) with an ``error`` column
    ("") as consecutive IPC streams of ``per_piece`` rows to a local temporary file, holding at most
    one piece's rows; :meth:`close` uploads the file in one go (io.put_file_atomic) to
    ``<out>/_listing/<uuid>.arrows`` and returns the :class:`Listing`."""

    def __init__(self, out: str, schema, per_piece: int):
        import pyarrow as pa

        self.out, self.per_piece = out, int(per_piece)
        self.schema = schema.append(pa.field("error", pa.string()))
        fd, self.tmp = tempfile.mkstemp(prefix="ragseg-listing-", suffix=SUFFIX)
        self.f = os.fdopen(fd, "wb")
        self.offsets = [0]
        self.rows = 0
        self.buf: list = []
        self.nbuf = 0

    def add(self, table) -> None:
        import pyarrow as pa

        if table.num_rows == 0:
            return
        self.buf.append(table.append_column("error", pa.repeat(pa.scalar("", pa.string()), table.num_rows)))
        self.nbuf += table.num_rows
        if self.nbuf >= self.per_piece:
            t = pa.concat_tables(self.buf)
            full = (t.num_rows // self.per_piece) * self.per_piece
            for start in range(0, full, self.per_piece):
                self._piece(t.slice(start, self.per_piece))
            self.buf, self.nbuf = ([t.slice(full)] if full < t.num_rows else []), t.num_rows - full

    def _piece(self, t) -> None:
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as w:
            w.write_table(t if t.schema.equals(self.schema) else t.cast(self.schema))
        self.f.write(sink.getvalue())
        self.offsets.append(self.f.tell())
        self.rows += t.num_rows

    def close(self) -> Listing:
        import pyarrow as pa

        try:
            if self.nbuf:
                self._piece(pa.concat_tables(self.buf))
            self.buf, self.nbuf = [], 0
            self.f.close()
            uri = None
            if self.rows:
                uri = io.join(listing_dir(self.out), f"{uuid.uuid4().hex}{SUFFIX}")
                io.put_file_atomic(self.tmp, uri)
            return Listing(uri, np.asarray(self.offsets, dtype=np.int64), self.schema, self.rows)
        finally:
            self.abort()

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def write_listing(out: str, rows, per_piece: int):
    """Write ``rows`` (one Arrow table) as :class:`ListingWriter` does; returns the file's URI, the
    byte offsets of the pieces (``len = pieces + 1``) and the rows' Arrow schema (with ``error``)."""
    w = ListingWriter(out, rows.schema, per_piece)
    try:
        w.add(rows)
    except BaseException:
        w.abort()
        raise
    lst = w.close()
    return lst.uri, lst.offsets, lst.schema


def read_pieces(uri: str, offsets: tuple[int, ...]) -> Iterator:
    """A read task's body: one ranged read of ``offsets[0]:offsets[-1]``, one Arrow table per piece."""
    import pyarrow as pa

    buf = pa.py_buffer(io.read_range(uri, offsets[0], offsets[-1]))
    for a, b in zip(offsets[:-1], offsets[1:]):
        with pa.ipc.open_stream(buf.slice(a - offsets[0], b - a)) as r:
            yield r.read_all()


def read_task_plan(pieces: int, pieces_per_task: int, max_tasks: int, min_tasks: int) -> list[tuple[int, int]]:
    """Consecutive piece ranges ``[a, b)``, one per read task: ``pieces_per_task`` pieces each, more
    when that would make over ``max_tasks`` tasks, fewer when it would make under ``min_tasks`` (so
    that a small job still spreads over the cluster)."""
    per = max(pieces_per_task, math.ceil(pieces / max(max_tasks, 1)))
    per = max(1, min(per, math.ceil(pieces / max(min_tasks, 1))))
    return [(a, min(a + per, pieces)) for a in range(0, pieces, per)]


def make_datasource(uri: str, offsets: np.ndarray, schema, rows: int, per_piece: int, plan: list[tuple[int, int]]):
    """The Ray Data datasource over a listing file (its read tasks as planned by :func:`read_task_plan`)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ListingDatasource(Datasource):
        def get_name(self) -> str:
            return "PendingImages"

        def estimate_inmemory_data_size(self) -> int:
            return int(offsets[-1])

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_) -> list[ReadTask]:
            tasks = []
            for a, b in plan:
                offs = tuple(int(x) for x in offsets[a:b + 1])
                n = min(b * per_piece, rows) - a * per_piece
                meta = BlockMetadata(num_rows=n, size_bytes=offs[-1] - offs[0], input_files=None,
                                     exec_stats=None)
                tasks.append(ReadTask(functools.partial(read_pieces, uri, offs), meta, schema=schema,
                                      per_task_row_limit=per_task_row_limit))
            return tasks

    return ListingDatasource()
