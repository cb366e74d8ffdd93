"""The commit ledger of a job's output folder (a feature DB or a label output), format 2.

A job writes its output in *pieces*: a piece is one batch of input images whose files (Parquet, JSON
lines, PNGs) a Ray worker writes next to the data. After its files, the worker writes the piece's
**commit record** ``_commits/<piece>.json`` (name, image ids covered, counts, the files, the writer's
node id and pid). The record's existence is the commit: a piece without one does not exist for any
reader, and its files are overwritten or ignored.

The driver never rewrites a file that grows with the number of pieces. It receives each record (a few
hundred bytes) as the pipeline streams, and every ``commit.compact_every`` records or
``commit.compact_seconds`` seconds it *compacts*: it writes the records since the last compaction as
one Parquet segment ``_manifest/seg-<n>-<uuid>.parquet``, adds the segment's name to the small header
``manifest.json`` (replaced atomically) and then deletes the compacted ``_commits/`` objects in bulk.
So a commit costs O(1) in the pieces already done, and the header grows by one name per segment.

Readers (:func:`load`) list ``_commits/`` first, then read the header and its segments (fsspec's bulk
``cat``: concurrent on object stores, one request per object, never one serial GET per piece), then
read the listed commit objects the segments do not already hold, and deduplicate by piece name. A
kill -9 at any point leaves a consistent state:

- between a piece's files and its record: the piece is not committed; a rerun redoes its images;
- after a segment is written but before the header names it: the segment is ignored, the commit
  objects are still there;
- after the header but before the deletes: segment and objects both hold the record; dedup by name.

What grows with a folder's history is bounded too. The header keeps the last
:data:`RUNS_IN_HEADER` runs' summaries; older ones move, :data:`RUNS_IN_HEADER` at a time, to
immutable files ``_runs/runs-<n>.json`` (:func:`add_run`, :func:`iter_runs`). At a job's start,
more than ``commit.max_segments`` segments are consolidated by merging the smallest ones only
(:meth:`Compactor.consolidate`), so a start rewrites the small segments recent runs left, not the
whole history.

``_lease.json`` makes the writer unique: a second job on the same folder refuses to start while the
first one's lease is alive (renewed every ``lease_ttl_s / 3`` seconds; a lease whose owner process is
gone from this host, or that expired, is taken over).

Fencing. Every lease taken (a new job, or a takeover of a dead or stalled one) carries an *epoch*, one
more than any before it (the lease's and the header's). A writer stamps its epoch into the header with
its first header write and into each commit record, and writes the header only *conditionally* on the
version it last read or wrote (:func:`ragseg.io.write_if`: ``If-Match`` / ``If-None-Match`` on S3,
compare-then-rename under ``flock`` locally). A writer that stalled past its lease (GC pause, suspended
VM, partition) and wakes up after another job took the folder over finds the header changed: it stops
with :class:`LeaseLost` (one line, exit code 2) before deleting anything, leaving at most an orphan
segment. Commit objects of an older epoch than the header's that no segment holds were written by such
a stale writer after the takeover: readers ignore them (the new writer recomputes those images).

Litter. A writer, once its header is in place, removes what killed or fenced writers left behind:
segments under ``_manifest/`` that the header does not name, commit objects whose record a segment
already holds, and stale commit objects (:meth:`Compactor.clean`). So after any kill and a rerun only
named objects remain.

Retries. A record written by ``--retry-errors`` (``retry`` true) re-processes images whose latest
outcome was an error row: for each image the record of the highest epoch is its outcome (an image is
retried only after an error, so the outcomes it supersedes are all errors). Totals count each image
once (:meth:`Ledger.totals`), :meth:`Ledger.covered_image_ids` is distinct, and :func:`latest_errors`
gives the error rows of the images whose latest outcome is an error.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ragseg import io
from ragseg.errors import UserError

log = logging.getLogger(__name__)

FORMAT = 2
MANIFEST = "manifest.json"
COMMITS = "_commits"
SEGMENTS = "_manifest"
LEASE = "_lease.json"
RUNS = "_runs"
# run summaries kept in the header; past twice this many, the oldest RUNS_IN_HEADER go to a _runs/ file
RUNS_IN_HEADER = 20

RECORD_SCHEMA = pa.schema([
    pa.field("name", pa.string()),
    pa.field("image_ids", pa.list_(pa.string())),
    pa.field("images", pa.int64()),
    pa.field("segments", pa.int64()),
    pa.field("errors", pa.int64()),
    pa.field("empty_images", pa.int64()),
    pa.field("data_path", pa.string()),  # the piece's main Parquet (features/ or segments/)
    pa.field("errors_path", pa.string()),  # null when the piece had no bad image
    pa.field("parts_path", pa.string()),  # label: the piece's COCO panoptic JSON lines; null for a DB
    pa.field("node_id", pa.string()),
    pa.field("host", pa.string()),
    pa.field("pid", pa.int64()),
    pa.field("created", pa.float64()),
    pa.field("stage_seconds", pa.string()),  # JSON {stage: busy seconds} of the piece's images
    pa.field("epoch", pa.int64()),  # the writing job's lease epoch (null: written before epochs)
    pa.field("retry", pa.bool_()),  # true: re-processes images whose latest outcome was an error
])
RECORD_FIELDS = tuple(RECORD_SCHEMA.names)


# ----------------------------------------------------------------------------------------------
# Records (worker side)
# ----------------------------------------------------------------------------------------------
def piece_name(image_ids: Iterable[str], salt: str = "") -> str:
    """Content name of a piece: the same images always give the same name (a retried write task
    overwrites its own files), different images practically never do. ``salt`` tells apart pieces of
    the same images written by different runs (``--retry-errors``)."""
    import hashlib

    h = hashlib.sha256(salt.encode())
    for i in sorted(str(x) for x in image_ids):
        h.update(i.encode())
        h.update(b"\n")
    return "p-" + h.hexdigest()[:20]


def writer_identity() -> dict[str, Any]:
    """Node id (Ray's, when inside a Ray worker), host name and pid of the writing process."""
    node = ""
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id() or ""
    except Exception:  # noqa: BLE001 - identity is informational
        node = ""
    return {"node_id": node, "host": socket.gethostname(), "pid": os.getpid()}


def new_record(name: str, image_ids: list[str], *, images: int, segments: int, errors: int,
               empty_images: int, data_path: str, errors_path: str | None, parts_path: str | None,
               stage_seconds: dict[str, float], epoch: int = 0, retry: bool = False) -> dict[str, Any]:
    return {"name": name, "image_ids": [str(i) for i in image_ids], "images": int(images),
            "segments": int(segments), "errors": int(errors), "empty_images": int(empty_images),
            "data_path": data_path, "errors_path": errors_path, "parts_path": parts_path,
            **writer_identity(), "created": time.time(),
            "stage_seconds": json.dumps({k: round(float(v), 6) for k, v in sorted(stage_seconds.items())}),
            "epoch": int(epoch), "retry": bool(retry)}


def commit_uri(root: str, name: str) -> str:
    return io.join(root, COMMITS, f"{name}.json")


def write_commit(root: str, record: dict[str, Any]) -> None:
    """The commit point of a piece: called after all of the piece's files are in place."""
    io.write_text_atomic(commit_uri(root, record["name"]), json.dumps(record, sort_keys=True))


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in RECORD_FIELDS} for r in records], schema=RECORD_SCHEMA)


def _conform(table: pa.Table, names: list[str] | None = None) -> pa.Table:
    """A segment written by an older ragseg (fewer record columns) as RECORD_SCHEMA (or its ``names``
    columns): nulls for the columns it lacks."""
    fields = [RECORD_SCHEMA.field(n) for n in (names or RECORD_FIELDS)]
    for f in fields:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select([f.name for f in fields]).cast(pa.schema(fields))


class LeaseLost(UserError):
    """This job's lease was taken over (its header changed under it): it stops, deleting nothing."""


# ----------------------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------------------
def manifest_uri(root: str) -> str:
    return io.join(root, MANIFEST)


def read_header(root: str, kind: str) -> dict[str, Any] | None:
    """The folder's header, or None for a new folder. A format-1 folder is refused with how to
    migrate it; anything else that is not a ragseg header of ``kind`` is refused too."""
    return read_header_versioned(root, kind)[0]


def read_header_versioned(root: str, kind: str) -> tuple[dict[str, Any] | None, str | None]:
    """:func:`read_header` and the header's version (for a conditional write, :func:`ragseg.io.write_if`)."""
    uri = manifest_uri(root)
    try:
        data, version = io.read_versioned(uri)
    except FileNotFoundError:
        return None, None
    text = data.decode("utf-8")
    try:
        h = json.loads(text)
    except ValueError as e:
        raise UserError(f"{uri} is not valid JSON ({e}); is {root} a ragseg output folder?") from None
    if not isinstance(h, dict):
        raise UserError(f"{uri} is not a ragseg manifest")
    if h.get("format") == 1:
        raise UserError(f"{root} was written by an older ragseg (manifest format 1); upgrade it in place with "
                        f"`ragseg migrate {root}` and run again")
    if h.get("format") != FORMAT or not isinstance(h.get("segments"), list):
        raise UserError(f"{uri} is not a ragseg manifest of format {FORMAT}")
    if h.get("kind") != kind:
        raise UserError(f"{root} holds ragseg {h.get('kind')!r} output, not {kind!r}")
    return h, version


def peek_kind(root: str) -> str:
    """The ``kind`` a folder's header declares ("db" or "labels"); "" when unreadable."""
    try:
        h = io.read_json(manifest_uri(root))
    except (FileNotFoundError, ValueError):
        return ""
    return str(h.get("kind", "")) if isinstance(h, dict) else ""


def new_header(kind: str, **fields: Any) -> dict[str, Any]:
    return {"format": FORMAT, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "runs": [], "segments": [], "totals": _zero_totals(), **fields}


def _zero_totals() -> dict[str, int]:
    return {"pieces": 0, "images": 0, "segments": 0, "errors": 0, "empty_images": 0}


def header_bytes(header: dict[str, Any]) -> bytes:
    return json.dumps(header, indent=2, sort_keys=True).encode("utf-8")


def write_header(root: str, header: dict[str, Any]) -> None:
    """Unconditional header write (new folders made by tools and tests; jobs use
    :meth:`Compactor.write_header`, conditional on the version they read)."""
    io.write_bytes_atomic(manifest_uri(root), header_bytes(header))


def header_epoch(root: str) -> int:
    """The epoch a folder's header records (0: none yet, or no header)."""
    try:
        h = io.read_json(manifest_uri(root))
    except (FileNotFoundError, ValueError):
        return 0
    return int(h.get("epoch") or 0) if isinstance(h, dict) else 0


def runs_uri(root: str, n: int) -> str:
    return io.join(root, RUNS, f"runs-{n:06d}.json")


def add_run(root: str, header: dict[str, Any], run: dict[str, Any]) -> None:
    """Append a run's summary to ``header["runs"]`` (the caller writes the header). Once the header
    holds ``2 * RUNS_IN_HEADER`` runs, the oldest ``RUNS_IN_HEADER`` are written to the next
    ``_runs/runs-<n>.json`` first and dropped from the header, which counts them in
    ``runs_archived``. A kill before the header is written leaves the header as it was; the next run
    rewrites the same file with the same runs."""
    runs = header.setdefault("runs", [])
    runs.append(run)
    if len(runs) < 2 * RUNS_IN_HEADER:
        return
    arch = header.get("runs_archived") or {"files": 0, "runs": 0}
    old, header["runs"] = runs[:RUNS_IN_HEADER], runs[RUNS_IN_HEADER:]
    io.write_json_atomic(runs_uri(root, int(arch["files"])), old)
    header["runs_archived"] = {"files": int(arch["files"]) + 1, "runs": int(arch["runs"]) + len(old)}


def run_count(header: dict[str, Any]) -> int:
    """Runs recorded in the folder's history (archived + in the header)."""
    return int((header.get("runs_archived") or {}).get("runs", 0)) + len(header.get("runs", []))


def iter_runs(root: str, header: dict[str, Any]):
    """Every run summary of the folder, oldest first: the ``_runs/`` files, then the header's."""
    for n in range(int((header.get("runs_archived") or {}).get("files", 0))):
        yield from io.read_json(runs_uri(root, n))
    yield from header.get("runs", [])


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What a reader sees: the header and every committed record (compacted or not)."""

    root: str
    header: dict[str, Any]
    records: pa.Table  # RECORD_SCHEMA, one row per committed piece, sorted by name
    uncompacted: list[str] = field(default_factory=list)  # commit object URIs not yet in a segment
    version: str | None = None  # the header's version as read (ragseg.io.read_versioned)
    # objects nobody needs: commit objects whose record a segment already holds, and commit objects
    # written by a fenced writer with the files they name
    litter: list[str] = field(default_factory=list)
    segment_rows: dict[str, int] = field(default_factory=dict)  # records per header segment, as read

    def retried(self) -> bool:
        """True when some piece re-processed images (``--retry-errors``): an image may then be in
        several pieces, the one of the highest epoch being its outcome."""
        return self.records.num_rows > 0 and bool(pc.any(pc.fill_null(self.records.column("retry"), False)).as_py())

    def covered_image_ids(self) -> pa.Array:
        """Every image id that has an outcome, once (an Arrow string array; no Python set)."""
        col = self.records.column("image_ids")
        if not self.records.num_rows:
            return pa.array([], pa.string())
        ids = pc.list_flatten(col).combine_chunks()
        return pc.unique(ids) if self.retried() else ids

    def totals(self) -> dict[str, int]:
        """Pieces, then images (each once), segments, errors (images whose latest outcome is an error)
        and empty images. A retry piece's images all had an error outcome before, which it supersedes:
        they are not counted again as images, and their earlier errors are taken off."""
        t = {"pieces": self.records.num_rows}
        for k in ("images", "segments", "errors", "empty_images"):
            t[k] = int(pc.sum(self.records.column(k)).as_py() or 0) if self.records.num_rows else 0
        if self.records.num_rows:
            retry = pc.fill_null(self.records.column("retry"), False)
            redone = int(pc.sum(pc.if_else(retry, self.records.column("images"), 0)).as_py() or 0)
            t["images"] -= redone
            t["errors"] -= redone
        return t


def _cat(uris: list[str]) -> dict[str, bytes | Exception]:
    """Bulk read through fsspec (concurrent requests on object stores)."""
    if not uris:
        return {}
    fs, _ = io.fs_and_path(uris[0])
    paths = [io.fs_and_path(u)[1] for u in uris]
    got = fs.cat(paths, on_error="return")
    if not isinstance(got, dict):  # a single path returns bytes
        got = {paths[0]: got}
    return {u: got[p] for u, p in zip(uris, paths)}


def list_commits(root: str) -> list[str]:
    """URIs of the commit objects under ``_commits/`` (one listing, paginated by the store)."""
    fs, path = io.fs_and_path(io.join(root, COMMITS))
    fs.invalidate_cache(path)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(io.unstrip(fs, p) for p in names if p.endswith(".json") and not io.is_tmp(p))


# a column :func:`load` can derive instead of reading ``image_ids``: each piece's smallest image id
FIRST_IMAGE_ID = "first_image_id"


def _project(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """``table`` (RECORD_SCHEMA) reduced to ``columns`` (``name`` always kept; :data:`FIRST_IMAGE_ID`
    derived from the sorted ``image_ids``); the whole table when ``columns`` is None."""
    if columns is None:
        return table
    cols = {"name": table.column("name")}
    for c in columns:
        if c == FIRST_IMAGE_ID:
            cols[c] = pc.list_element(table.column("image_ids"), 0)
        elif c != "name":
            cols[c] = table.column(c)
    return pa.table(cols)


def _read_segments(root: str, names: list[str], columns: list[str] | None = None) -> list[pa.Table]:
    import pyarrow.parquet as pq

    uris = [io.join(root, n) for n in names]
    read = None
    if columns is not None:
        read = sorted({"name", *("image_ids" if c == FIRST_IMAGE_ID else c for c in columns)})
    out = []
    got = _cat(uris)
    for uri in uris:  # in the header's order
        data = got.pop(uri)
        if isinstance(data, Exception):
            raise UserError(f"manifest segment {uri} listed in {manifest_uri(root)} is unreadable "
                            f"({type(data).__name__}: {data})")
        pf = pq.ParquetFile(pa.BufferReader(data))
        have = set(pf.schema_arrow.names)
        t = pf.read(columns=None if read is None else [c for c in read if c in have])
        del data, pf
        out.append(_project(_conform(t, read), columns))
    return out


def load(root: str, kind: str, *, retries: int = 5, columns: list[str] | None = None) -> Ledger | None:
    """Header + all committed records of ``root``; None when the folder has no header yet but also
    no commit (a new folder). Safe while a job writes (see module docstring). ``columns``: keep only
    these record columns (and ``name``; :data:`FIRST_IMAGE_ID` may stand for ``image_ids``), so a
    reader that needs no image ids (panoptic JSON assembly) does not hold them all."""
    for _ in range(retries):
        commits = list_commits(root)
        header, version = read_header_versioned(root, kind)
        if header is None:
            if commits:
                raise UserError(f"{root} has commit records but no {MANIFEST}; was it written by ragseg?")
            return None
        tables = _read_segments(root, header["segments"], columns)
        seg_rows = {name: t.num_rows for name, t in zip(header["segments"], tables)}
        known = set()
        for t in tables:
            known.update(t.column("name").to_pylist())
        todo, folded = [], []
        for u in commits:
            (folded if u.rsplit("/", 1)[-1][: -len(".json")] in known else todo).append(u)
        got = _cat(todo)
        if any(isinstance(v, FileNotFoundError) for v in got.values()):
            continue  # compacted meanwhile: the header now names its segment
        recs, valid, stale = [], [], []
        epoch = int(header.get("epoch") or 0)
        for uri, data in got.items():
            if isinstance(data, Exception):
                raise UserError(f"commit record {uri} is unreadable ({type(data).__name__}: {data})")
            try:
                rec = json.loads(data)
            except ValueError as e:
                raise UserError(f"commit record {uri} is not valid JSON ({e})") from None
            if int(rec.get("epoch") or 0) < epoch:  # a fenced writer's, committed after the takeover:
                # litter, with its files (its name is no valid piece's: that one would be in a segment)
                stale += [uri] + [io.join(root, rec[k]) for k in ("data_path", "errors_path", "parts_path")
                                  if rec.get(k)]
                continue
            recs.append(rec)
            valid.append(uri)
        if recs:
            tables.append(_project(records_table(recs), columns))
        table = pa.concat_tables(tables) if tables else _project(records_table([]), columns)
        if table.num_rows:
            table = _dedup(table.sort_by("name"))
        return Ledger(root, header, table, uncompacted=valid, version=version, litter=folded + stale,
                      segment_rows=seg_rows)
    raise UserError(f"{root}: commit records kept moving while reading them; is a compaction stuck?")


def _dedup(table: pa.Table) -> pa.Table:
    names = table.column("name").to_numpy(zero_copy_only=False)
    import numpy as np

    keep = np.ones(len(names), bool)
    keep[1:] = names[1:] != names[:-1]
    return table.filter(pa.array(keep)) if not keep.all() else table


# ----------------------------------------------------------------------------------------------
# Compaction (driver side, single writer under the lease)
# ----------------------------------------------------------------------------------------------
class Compactor:
    """Collects the records a running job commits and folds them into segments (module docstring).

    With an ``epoch`` (a job under its lease) every header write is conditional on ``version``, the
    header's version as this writer last read or wrote it; a failed one means another job took the
    folder over: :class:`LeaseLost`, and nothing is deleted. Without (tools, tests) writes are plain."""

    def __init__(self, root: str, header: dict[str, Any], every: int, seconds: float, *,
                 epoch: int | None = None, version: str | None = None, lease: Lease | None = None):
        self.root = root
        self.lease = lease  # when its renewal finds it taken over, stop before the next write
        self.header = header
        self.every = max(1, int(every))
        self.seconds = float(seconds)
        self.epoch = epoch
        self.version = version
        self.stopped: str | None = None  # why this writer was fenced off
        self.pending: list[dict[str, Any]] = []
        self.pending_uris: list[str] = []
        self.segment_rows: dict[str, int] = {}  # records per segment, where known (Ledger.segment_rows)
        self._last = time.monotonic()

    def add(self, record: dict[str, Any]) -> None:
        if self.lease is not None and self.lease.lost and not self.stopped:
            self._stop(header_epoch(self.root))
        self.pending.append(record)
        self.pending_uris.append(commit_uri(self.root, record["name"]))
        if len(self.pending) >= self.every or time.monotonic() - self._last >= self.seconds:
            self.flush()

    def adopt(self, ledger: Ledger) -> None:
        """At start: fold the commit objects an earlier (killed) run left uncompacted."""
        if not ledger.uncompacted:
            return
        names = {u.rsplit("/", 1)[-1][: -len(".json")] for u in ledger.uncompacted}
        mask = pc.is_in(ledger.records.column("name"), pa.array(sorted(names)))
        recs = ledger.records.filter(mask).to_pylist()
        self._write(recs, list(ledger.uncompacted))

    def take_over(self, ledger: Ledger) -> None:
        """At start, under this job's lease: stamp the epoch into the header and write it (the fence:
        from now on a writer of an older epoch cannot write the header), folding the commit objects an
        earlier run left uncompacted on the way; then remove the litter (:meth:`clean`)."""
        if self.epoch is None:
            self.adopt(ledger)
            return
        have = int(self.header.get("epoch") or 0)
        if have >= self.epoch:
            self._stop(have)
        self.header["epoch"] = self.epoch
        if ledger.uncompacted:
            self.adopt(ledger)
        else:
            self.write_header()
        self.clean(ledger)

    def clean(self, ledger: Ledger) -> None:
        """Remove what killed or fenced writers left (after this writer's header is in place): segments
        the header does not name (a compaction killed before its header write, a consolidation killed
        before its deletes, a fenced writer's last segment), commit objects a segment already holds (a
        compaction killed before its deletes) or that a fenced writer wrote (``ledger.litter``), and
        temporary files of killed local writes."""
        named = set(self.header["segments"])
        seg_dir = io.join(self.root, SEGMENTS)
        orphans = [u for u in io.list_dir(seg_dir) if f"{SEGMENTS}/{u.rsplit('/', 1)[-1]}" not in named]
        io.remove_many(orphans + list(ledger.litter))
        for d in (self.root, io.join(self.root, COMMITS)):
            io.remove_tmp_litter(d)

    def flush(self) -> None:
        if self.stopped:
            return  # fenced: nothing more is written or deleted
        if self.pending:
            self._write(self.pending, self.pending_uris)
        self.pending, self.pending_uris = [], []
        self._last = time.monotonic()

    def write_header(self) -> None:
        """Write the header: conditional on the version this writer last read or wrote (with an epoch),
        else plainly. Raises :class:`LeaseLost` when the folder was taken over."""
        if self.stopped:
            raise LeaseLost(self.stopped)
        if self.epoch is None:
            write_header(self.root, self.header)
            return
        try:
            self.version = io.write_if(manifest_uri(self.root), header_bytes(self.header), self.version)
        except io.PreconditionFailed:
            self._stop(header_epoch(self.root))

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the header changed since this writer wrote it (before a write
        outside the ledger that a newer writer owns, e.g. label's panoptic.json)."""
        if self.stopped:
            raise LeaseLost(self.stopped)
        if self.epoch is None:
            return
        try:
            _, version = io.read_versioned(manifest_uri(self.root))
        except FileNotFoundError:
            version = None
        if version != self.version:
            self._stop(header_epoch(self.root))

    def _stop(self, newer: int) -> None:
        lease = _read_lease(io.join(self.root, LEASE)) or {}
        who = (f" ({lease.get('job')} on {lease.get('host')}, pid {lease.get('pid')})"
               if lease.get("owner") and int(lease.get("epoch") or 0) > int(self.epoch or 0) else "")
        if newer > int(self.epoch or 0):
            what = f"was taken over by another job{who} (epoch {newer} > this job's {self.epoch})"
        else:
            what = f"had its {MANIFEST} changed by another writer{who}"
        self.stopped = (f"{self.root} {what}: this job's lease had expired (commit.lease_ttl_s); it stops here "
                        "and deletes nothing; what it committed is kept, and the images it did not commit are "
                        "left to the other job or a rerun")
        raise LeaseLost(self.stopped)

    def _write(self, records: list[dict[str, Any]], uris: list[str]) -> None:
        n = len(self.header["segments"])
        rel = f"{SEGMENTS}/seg-{n:06d}-{uuid.uuid4().hex[:8]}.parquet"
        io.write_parquet_atomic(io.join(self.root, rel), records_table(records))
        self.header["segments"].append(rel)
        self.segment_rows[rel] = len(records)
        tot = self.header.setdefault("totals", _zero_totals())
        tot["pieces"] += len(records)
        for k in ("images", "segments", "errors", "empty_images"):
            tot[k] += sum(int(r[k]) for r in records)
        redone = sum(int(r["images"]) for r in records if r.get("retry"))  # see Ledger.totals
        tot["images"] -= redone
        tot["errors"] -= redone
        self.write_header()
        io.remove_many(uris)

    def consolidate(self, max_segments: int) -> list[str]:
        """Past ``max_segments`` segments, merge the smallest ``len - max_segments // 2 + 1`` of them
        into one (once per run, at start): the many small segments of time-based flushes and short
        runs are folded together, the large ones already merged stay untouched, so a record is
        rewritten O(log N) times over a folder's history instead of at every start past the limit.
        Sizes come from :attr:`segment_rows` (a segment of unknown size is read to learn it).
        Returns the segments merged."""
        segs = list(self.header["segments"])
        if len(segs) <= max_segments:
            return []
        unknown = [s for s in segs if s not in self.segment_rows]
        if unknown:
            for name, t in zip(unknown, _read_segments(self.root, unknown, ["name"])):
                self.segment_rows[name] = t.num_rows
        take = len(segs) - max(1, max_segments // 2) + 1
        order = sorted(range(len(segs)), key=lambda i: (self.segment_rows[segs[i]], i))
        chosen = [segs[i] for i in sorted(order[:take])]
        table = _dedup(pa.concat_tables(_read_segments(self.root, chosen)).sort_by("name"))
        rel = f"{SEGMENTS}/seg-{len(segs):06d}-{uuid.uuid4().hex[:8]}-merged.parquet"
        io.write_parquet_atomic(io.join(self.root, rel), table)
        gone = set(chosen)
        self.header["segments"] = [s for s in segs if s not in gone] + [rel]
        self.segment_rows[rel] = table.num_rows
        self.write_header()
        io.remove_many([io.join(self.root, s) for s in chosen])
        for s in chosen:
            self.segment_rows.pop(s, None)
        return chosen


def open_for_writing(root: str, kind: str, every: int, seconds: float, max_segments: int, make_header,
                     check=None, lease: Lease | None = None) -> tuple[Ledger | None, dict[str, Any], Compactor]:
    """A job's start, under its ``lease``: read the folder's ledger (``check(header)`` refuses an
    incompatible one), or create a new header (``make_header()``, only if there is still none); stamp
    the lease's epoch into the header (the fence), fold the commit records a killed run left
    uncompacted, remove the litter and consolidate a long segment list (its smallest segments).
    Without a lease (tools, tests) header writes are plain. Returns (ledger or None, header, compactor)."""
    epoch = lease.epoch if lease is not None else None
    led = load(root, kind)
    if led is not None:
        header = led.header
        if check is not None:
            check(header)
        comp = Compactor(root, header, every, seconds, epoch=epoch, version=led.version, lease=lease)
        comp.segment_rows.update(led.segment_rows)
        comp.take_over(led)
        comp.consolidate(max_segments)
    else:
        header = make_header()
        if epoch is not None:
            header["epoch"] = epoch
        comp = Compactor(root, header, every, seconds, epoch=epoch, version=None, lease=lease)
        comp.write_header()
    return led, header, comp


# ----------------------------------------------------------------------------------------------
# Lease
# ----------------------------------------------------------------------------------------------
def _read_lease(uri: str) -> dict[str, Any] | None:
    try:
        cur = json.loads(io.read_bytes(uri))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"owner": "?", "expires": 0}
    return cur if isinstance(cur, dict) else {"owner": "?", "expires": 0}


class Lease:
    """One writer per output folder. ``acquire`` refuses while another live job holds the lease, and
    takes over a dead or expired one. Each lease taken gets an ``epoch`` one more than any before
    (the lease's, the header's): the fence of :class:`Compactor`. Renewals are conditional on the
    lease this writer last wrote; one that fails means another job took the folder over: ``lost``."""

    def __init__(self, root: str, ttl_s: float, job: str):
        self.root = root
        self.uri = io.join(root, LEASE)
        self.ttl = float(ttl_s)
        self.job = job
        self.owner = uuid.uuid4().hex
        self.epoch = 0
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "job": self.job, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed": now, "expires": now + self.ttl,
                           "epoch": self.epoch}).encode()

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            data, version = io.read_versioned(self.uri)
        except FileNotFoundError:
            return None, None
        try:
            cur = json.loads(data)
        except ValueError:
            cur = None
        if not isinstance(cur, dict):
            cur = {"owner": "?", "expires": 0}  # a torn lease (cannot happen with atomic writes) is stale
        return cur, version

    def _stale(self, cur: dict[str, Any]) -> bool:
        if float(cur.get("expires", 0)) < time.time():
            return True
        if cur.get("host") == socket.gethostname():
            import psutil

            pid = int(cur.get("pid", -1))
            return pid != os.getpid() and not psutil.pid_exists(pid)
        return False

    def acquire(self) -> Lease:
        io.makedirs(self.root)
        for _ in range(3):
            cur, version = self._read()
            if cur is not None and not self._stale(cur):
                raise UserError(
                    f"{self.root} is being written by another ragseg job ({cur.get('job')} on "
                    f"{cur.get('host')}, pid {cur.get('pid')}, lease renewed "
                    f"{time.time() - float(cur.get('renewed', 0)):.0f} s ago); wait for it to finish, or "
                    f"if it is dead remove {self.uri} (it expires {self.ttl:.0f} s after its last renewal)")
            self.epoch = max(int((cur or {}).get("epoch") or 0), header_epoch(self.root)) + 1
            try:  # a takeover replaces exactly the stale lease read above; a new lease must not exist
                self.version = io.write_if(self.uri, self._body(), version)
                break
            except io.PreconditionFailed:
                continue
        else:
            raise UserError(f"could not take the lease {self.uri}: another job keeps taking it")
        self._thread = threading.Thread(target=self._renew, name="ragseg-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.version = io.write_if(self.uri, self._body(), self.version)
            except io.PreconditionFailed:
                cur, version = self._read()
                if cur is not None and cur.get("owner") == self.owner:  # our own write, its answer lost
                    self.version = version
                    continue
                self.lost = True  # the driver stops at its next commit record or header write
                log.debug("lost the lease %s: another job took the folder over", self.uri)
                return
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried; expiry is ttl away
                log.warning("could not renew the lease %s: %s", self.uri, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        cur, _ = self._read()
        if cur is not None and cur.get("owner") == self.owner:
            io.remove(self.uri)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# Error rows of the latest outcomes (--retry-errors, ragseg info)
# ----------------------------------------------------------------------------------------------
ERRORS_PER_READ = 256  # errors tables fetched per bulk read


def latest_errors(led: Ledger) -> pa.Table:
    """The error rows (``ragseg.errors.ERRORS_SCHEMA`` plus the record's ``epoch``) of the images whose
    latest outcome is an error: the errors tables of the records that hold errors, read in bulk, less
    the rows of images that a later retry piece (higher epoch) re-processed. Arrow only: no per-image
    Python work."""
    import pyarrow.parquet as pq

    from ragseg.errors import ERRORS_SCHEMA

    schema = ERRORS_SCHEMA.append(pa.field("epoch", pa.int64()))
    t = led.records
    if t.num_rows == 0:
        return schema.empty_table()
    t = t.filter(pc.and_(pc.greater(t.column("errors"), 0), pc.is_valid(t.column("errors_path"))))
    paths = t.column("errors_path").to_pylist()
    epochs = pc.fill_null(t.column("epoch"), 0).to_pylist()
    tables = []
    for a in range(0, len(paths), ERRORS_PER_READ):
        uris = [io.join(led.root, p) for p in paths[a:a + ERRORS_PER_READ]]
        got = _cat(uris)
        for uri, epoch in zip(uris, epochs[a:a + ERRORS_PER_READ]):
            data = got[uri]
            if isinstance(data, Exception):
                raise UserError(f"errors table {uri} of a committed piece is unreadable ({type(data).__name__}: {data})")
            e = pq.read_table(pa.BufferReader(data)).select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
            tables.append(e.append_column("epoch", pa.repeat(pa.scalar(epoch, pa.int64()), e.num_rows)))
    errs = pa.concat_tables(tables) if tables else schema.empty_table()
    if errs.num_rows == 0 or not led.retried():
        return errs
    r = led.records.filter(pc.fill_null(led.records.column("retry"), False))
    ids = pc.list_flatten(r.column("image_ids"))
    parents = pc.list_parent_indices(r.column("image_ids"))
    latest = pa.table({"image_id": ids, "latest": pc.take(pc.fill_null(r.column("epoch"), 0), parents)})
    latest = latest.group_by("image_id").aggregate([("latest", "max")])
    joined = errs.join(latest, "image_id", join_type="left outer")
    keep = pc.or_kleene(pc.is_null(joined.column("latest_max")),
                        pc.greater_equal(joined.column("epoch"), joined.column("latest_max")))
    return joined.filter(pc.fill_null(keep, True)).select(schema.names).sort_by([("image_id", "ascending")])


def error_counts(led: Ledger) -> dict[str, dict[str, int]]:
    """Errors of the latest outcomes by stage, then by reason (the exception type an error row names,
    ``decode: FileNotFoundError: ...`` -> ``FileNotFoundError``; "other" when it names none)."""
    errs = latest_errors(led)
    if errs.num_rows == 0:
        return {}
    reason = pc.struct_field(pc.extract_regex(errs.column("error"), r"^(?P<reason>[A-Za-z_][A-Za-z0-9_.]*):"), [0])
    t = pa.table({"stage": errs.column("stage"), "reason": pc.fill_null(reason, "other"), "n": errs.column("image_id")})
    out: dict[str, dict[str, int]] = {}
    for row in t.group_by(["stage", "reason"]).aggregate([("n", "count")]).sort_by(
            [("stage", "ascending"), ("reason", "ascending")]).to_pylist():
        out.setdefault(row["stage"], {})[row["reason"]] = int(row["n_count"])
    return out
