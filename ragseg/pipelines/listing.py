"""The pending image rows of a job, handed to Ray Data as a file that Ray's read tasks read.

The driver writes the pending rows (an Arrow table, ragseg.sources.row_schema) once, to
``<out>/_listing/<run>.arrows``: one Arrow IPC stream per piece (``images_per_shard`` rows), one
after the other. It keeps only the byte offset of each piece. A :class:`ListingDatasource` read task
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


def remove_listing(uri: str) -> None:
    """Remove one job's listing file (and the listing folder once empty, locally): a job never removes
    another's, even one that took its folder over after its lease expired."""
    io.remove(uri)
    fs, path = io.fs_and_path(uri)
    if io.protocol_of_fs(fs) == "file":
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:  # not empty (another job's listing) or gone
            pass


def write_listing(out: str, rows, per_piece: int):
    """Write ``rows`` with an ``error`` column ("") as consecutive IPC streams of ``per_piece`` rows;
    returns the file's URI, the byte offsets of the pieces (``len = pieces + 1``) and the rows' Arrow
    schema. Written to a local temporary file first, then uploaded in one go (io.put_file_atomic)."""
    import pyarrow as pa

    rows = rows.append_column("error", pa.repeat(pa.scalar("", pa.string()), rows.num_rows))
    n = rows.num_rows
    offsets = np.zeros(math.ceil(n / per_piece) + 1, dtype=np.int64)
    fd, tmp = tempfile.mkstemp(prefix="ragseg-listing-", suffix=SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            for k, start in enumerate(range(0, n, per_piece)):
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, rows.schema) as w:
                    w.write_table(rows.slice(start, per_piece))
                f.write(sink.getvalue())
                offsets[k + 1] = f.tell()
        uri = io.join(listing_dir(out), f"{uuid.uuid4().hex}{SUFFIX}")
        io.put_file_atomic(tmp, uri)
    finally:
        os.unlink(tmp)
    return uri, offsets, rows.schema


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
