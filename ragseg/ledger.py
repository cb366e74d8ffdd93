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
])
RECORD_FIELDS = tuple(RECORD_SCHEMA.names)


# ----------------------------------------------------------------------------------------------
# Records (worker side)
# ----------------------------------------------------------------------------------------------
def piece_name(image_ids: Iterable[str]) -> str:
    """Content name of a piece: the same images always give the same name (a retried write task
    overwrites its own files), different images practically never do."""
    import hashlib

    h = hashlib.sha256()
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
               stage_seconds: dict[str, float]) -> dict[str, Any]:
    return {"name": name, "image_ids": [str(i) for i in image_ids], "images": int(images),
            "segments": int(segments), "errors": int(errors), "empty_images": int(empty_images),
            "data_path": data_path, "errors_path": errors_path, "parts_path": parts_path,
            **writer_identity(), "created": time.time(),
            "stage_seconds": json.dumps({k: round(float(v), 6) for k, v in sorted(stage_seconds.items())})}


def commit_uri(root: str, name: str) -> str:
    return io.join(root, COMMITS, f"{name}.json")


def write_commit(root: str, record: dict[str, Any]) -> None:
    """The commit point of a piece: called after all of the piece's files are in place."""
    io.write_text_atomic(commit_uri(root, record["name"]), json.dumps(record, sort_keys=True))


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in RECORD_FIELDS} for r in records], schema=RECORD_SCHEMA)


# ----------------------------------------------------------------------------------------------
# Header
# ----------------------------------------------------------------------------------------------
def manifest_uri(root: str) -> str:
    return io.join(root, MANIFEST)


def read_header(root: str, kind: str) -> dict[str, Any] | None:
    """The folder's header, or None for a new folder. A format-1 folder is refused with how to
    migrate it; anything else that is not a ragseg header of ``kind`` is refused too."""
    uri = manifest_uri(root)
    try:
        text = io.read_text(uri)
    except FileNotFoundError:
        return None
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
    return h


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


def write_header(root: str, header: dict[str, Any]) -> None:
    io.write_json_atomic(manifest_uri(root), header)


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
    segment_rows: dict[str, int] = field(default_factory=dict)  # records per header segment, as read

    def covered_image_ids(self) -> pa.Array:
        """Every image id of every committed piece (an Arrow string array; no Python set)."""
        col = self.records.column("image_ids")
        return pc.list_flatten(col).combine_chunks() if self.records.num_rows else pa.array([], pa.string())

    def totals(self) -> dict[str, int]:
        t = {"pieces": self.records.num_rows}
        for k in ("images", "segments", "errors", "empty_images"):
            t[k] = int(pc.sum(self.records.column(k)).as_py() or 0) if self.records.num_rows else 0
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
        t = pq.read_table(pa.BufferReader(data), columns=read)
        del data
        schema = RECORD_SCHEMA if read is None else pa.schema([RECORD_SCHEMA.field(c) for c in t.schema.names])
        out.append(_project(t.cast(schema), columns))
    return out


def load(root: str, kind: str, *, retries: int = 5, columns: list[str] | None = None) -> Ledger | None:
    """Header + all committed records of ``root``; None when the folder has no header yet but also
    no commit (a new folder). Safe while a job writes (see module docstring). ``columns``: keep only
    these record columns (and ``name``; :data:`FIRST_IMAGE_ID` may stand for ``image_ids``), so a
    reader that needs no image ids (panoptic JSON assembly) does not hold them all."""
    for _ in range(retries):
        commits = list_commits(root)
        header = read_header(root, kind)
        if header is None:
            if commits:
                raise UserError(f"{root} has commit records but no {MANIFEST}; was it written by ragseg?")
            return None
        tables = _read_segments(root, header["segments"], columns)
        seg_rows = {name: t.num_rows for name, t in zip(header["segments"], tables)}
        known = set()
        for t in tables:
            known.update(t.column("name").to_pylist())
        todo = [u for u in commits if u.rsplit("/", 1)[-1][: -len(".json")] not in known]
        got = _cat(todo)
        if any(isinstance(v, FileNotFoundError) for v in got.values()):
            continue  # compacted meanwhile: the header now names its segment
        recs = []
        for uri, data in got.items():
            if isinstance(data, Exception):
                raise UserError(f"commit record {uri} is unreadable ({type(data).__name__}: {data})")
            try:
                recs.append(json.loads(data))
            except ValueError as e:
                raise UserError(f"commit record {uri} is not valid JSON ({e})") from None
        if recs:
            tables.append(_project(records_table(recs), columns))
        table = pa.concat_tables(tables) if tables else _project(records_table([]), columns)
        if table.num_rows:
            table = _dedup(table.sort_by("name"))
        return Ledger(root, header, table, uncompacted=todo, segment_rows=seg_rows)
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
    """Collects the records a running job commits and folds them into segments (module docstring)."""

    def __init__(self, root: str, header: dict[str, Any], every: int, seconds: float):
        self.root = root
        self.header = header
        self.every = max(1, int(every))
        self.seconds = float(seconds)
        self.pending: list[dict[str, Any]] = []
        self.pending_uris: list[str] = []
        self.segment_rows: dict[str, int] = {}  # records per segment, where known (Ledger.segment_rows)
        self._last = time.monotonic()

    def add(self, record: dict[str, Any]) -> None:
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

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending, self.pending_uris)
        self.pending, self.pending_uris = [], []
        self._last = time.monotonic()

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
        write_header(self.root, self.header)
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
        write_header(self.root, self.header)
        io.remove_many([io.join(self.root, s) for s in chosen])
        for s in chosen:
            self.segment_rows.pop(s, None)
        return chosen


def open_for_writing(root: str, kind: str, every: int, seconds: float, max_segments: int, make_header,
                     check=None) -> tuple[Ledger | None, dict[str, Any], Compactor]:
    """A job's start, under its lease: read the folder's ledger (``check(header)`` refuses an
    incompatible one), or write a new header (``make_header()``); fold the commit records a killed run
    left uncompacted and consolidate a long segment list (its smallest segments). Returns (ledger or
    None, header, compactor)."""
    led = load(root, kind)
    if led is not None:
        header = led.header
        if check is not None:
            check(header)
    else:
        header = make_header()
        write_header(root, header)
    comp = Compactor(root, header, every, seconds)
    if led is not None:
        comp.segment_rows.update(led.segment_rows)
        comp.adopt(led)
        comp.consolidate(max_segments)
    return led, header, comp


# ----------------------------------------------------------------------------------------------
# Lease
# ----------------------------------------------------------------------------------------------
class Lease:
    """One writer per output folder. ``acquire`` refuses while another live job holds the lease."""

    def __init__(self, root: str, ttl_s: float, job: str):
        self.root = root
        self.uri = io.join(root, LEASE)
        self.ttl = float(ttl_s)
        self.job = job
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "job": self.job, "host": socket.gethostname(),
                           "pid": os.getpid(), "renewed": now, "expires": now + self.ttl}).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(io.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"owner": "?", "expires": 0}  # a torn lease (cannot happen with atomic writes) is stale

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
            cur = self._read()
            if cur is not None:
                if not self._stale(cur):
                    raise UserError(
                        f"{self.root} is being written by another ragseg job ({cur.get('job')} on "
                        f"{cur.get('host')}, pid {cur.get('pid')}, lease renewed "
                        f"{time.time() - float(cur.get('renewed', 0)):.0f} s ago); wait for it to finish, or "
                        f"if it is dead remove {self.uri} (it expires {self.ttl:.0f} s after its last renewal)")
                io.remove(self.uri)
            if io.create_exclusive(self.uri, self._body()):
                break
        else:
            raise UserError(f"could not take the lease {self.uri}: another job keeps taking it")
        self._thread = threading.Thread(target=self._renew, name="ragseg-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                io.write_bytes_atomic(self.uri, self._body())
            except Exception as e:  # noqa: BLE001 - a missed renewal is retried; expiry is ttl away
                log.warning("could not renew the lease %s: %s", self.uri, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        cur = self._read()
        if cur is not None and cur.get("owner") == self.owner:
            io.remove(self.uri)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
