"""The feature DB as the index build sees it: its committed shards (:func:`load_db`), reading their
embeddings, the per-shard Ray tasks (read rows, add a shard to the trained index, exact top-k of the
quality queries) and the global id layout (contiguous id ranges per shard, in manifest order)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ragseg import io as rio
from ragseg.errors import UserError
from ragseg.schema import arrow_to_embeddings


@dataclass(frozen=True)
class DbShard:
    name: str
    uri: str
    rows: int
    input_key: str = ""


@dataclass(frozen=True)
class FeatureDb:
    uri: str
    dim: int
    embed_model: str
    embed_mode: str
    config_hash: str
    shards: tuple[DbShard, ...]
    embedder: dict | None = None  # ragseg.identity: the keys' embedder identity + models.clip section
    provenance: dict | None = None  # ragseg.provenance: the DB's (its manifest's)

    @property
    def total(self) -> int:
        return sum(s.rows for s in self.shards)


def load_db(db_uri: str, check_files: bool = True) -> FeatureDb:
    """The committed pieces of a feature DB (ragseg.ledger: header + segments + commit records, read
    in bulk). ``check_files``: one listing of ``features/`` confirms every piece's file is there;
    row counts and dims are checked by the per-shard tasks that read them."""
    from ragseg import db as dblib

    led = dblib.open_db(db_uri)
    if led is None:
        raise UserError(f"feature DB manifest not found: {rio.join(db_uri, 'manifest.json')} (run build-db first)")
    h = led.header
    t = led.records.select(["name", "data_path", "segments"]).to_pydict()
    shards = tuple(DbShard(n, rio.join(db_uri, p), int(r)) for n, p, r in zip(t["name"], t["data_path"], t["segments"]))
    from ragseg import identity

    embedder = {**identity.header_identity(h), "clip": identity.header_clip(h)}
    db = FeatureDb(db_uri, int(h["dim"]), str(h.get("embed_model", "")), str(h.get("embed_mode", "")),
                   str(h.get("models_hash", "")), shards, embedder, h.get("provenance"))
    if check_files and shards:
        present = set(rio.list_dir(rio.join(db_uri, "features")))
        for s in shards:
            if s.uri not in present:
                raise UserError(f"feature shard {s.uri} is committed in the DB but missing")
    return db


def check_shard_file(s: DbShard, dim: int) -> None:
    fs, path = rio.fs_and_path(s.uri)
    if not fs.exists(path):
        raise UserError(f"feature shard {s.uri} is listed in the DB manifest but missing")
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            nrows = pf.metadata.num_rows
            schema = pf.schema_arrow
    except Exception as e:
        raise UserError(f"feature shard {s.uri} is corrupt or not Parquet ({type(e).__name__}: {e})") from None
    if nrows != s.rows:
        raise UserError(f"feature shard {s.uri} has {nrows} rows but the DB manifest says {s.rows}")
    if "embedding" not in schema.names:
        raise UserError(f"feature shard {s.uri} has no 'embedding' column")
    t = schema.field("embedding").type
    size = getattr(t, "list_size", None)
    if size != dim:
        raise UserError(f"feature shard {s.uri}: embedding dim {size} != manifest dim {dim}")


def read_embeddings(uri: str, expected_rows: int) -> np.ndarray:
    try:
        tab = rio.read_parquet(uri, columns=["embedding"])
    except Exception as e:
        raise UserError(f"feature shard {uri} is corrupt or unreadable ({type(e).__name__}: {e})") from None
    if tab.num_rows != expected_rows:
        raise UserError(f"feature shard {uri} has {tab.num_rows} rows but the DB manifest says {expected_rows}")
    if tab.num_rows == 0:
        return np.zeros((0, tab.schema.field("embedding").type.list_size), np.float32)
    x = np.ascontiguousarray(arrow_to_embeddings(tab.column("embedding")), dtype=np.float32)
    if not np.isfinite(x).all():
        raise UserError(f"feature shard {uri} contains non-finite embeddings")
    return x


# ----------------------------------------------------------------------------------------------
# Ray tasks
# ----------------------------------------------------------------------------------------------
def exact_topk(x: np.ndarray, start: int, queries: np.ndarray | None, k: int):
    """Exact inner-product top-k of ``queries`` among the rows of ``x`` (global ids from start)."""
    if queries is None or len(queries) == 0:
        return None
    nq = len(queries)
    if len(x) == 0:
        return np.full((nq, 0), -np.inf, np.float32), np.zeros((nq, 0), np.int64)
    sims = queries @ x.T  # (nq, rows)
    kk = min(k, x.shape[0])
    part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    ps = np.take_along_axis(sims, part, axis=1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(ps, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64) + start


@ray.remote(num_cpus=1)
def _read_rows_task(uri: str, rows: int, local_rows: np.ndarray) -> np.ndarray:
    return read_embeddings(uri, rows)[local_rows]


@ray.remote(num_cpus=1)
def shard_task(trained: bytes | None, uri: str, rows: int, start: int, queries: np.ndarray | None, k: int,
                want_vectors: bool = False):
    """Read one shard; add it (ids start..start+rows) to a copy of the trained index when given;
    return (serialised shard index | None, labels dict | None, exact top-k | None, float16 vectors
    for the re-rank store | None)."""
    import faiss

    x = read_embeddings(uri, rows)
    blob = labels = None
    if trained is not None:
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        if len(x):
            index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        blob = faiss.serialize_index(index).tobytes()
        tab = rio.read_parquet(uri, columns=["label", "image_id", "segment_id"])
        labels = {
            "label": [str(v) if v is not None else "" for v in tab.column("label").cast(pa.string()).to_pylist()],
            "image_id": tab.column("image_id").to_pylist(),
            "segment_id": tab.column("segment_id").to_numpy(zero_copy_only=False).astype(np.int64),
        }
    return blob, labels, exact_topk(x, start, queries, k), (x.astype(np.float16) if want_vectors else None)


def ray_get(refs):
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise


def merge_topk(parts: list, k: int):
    sims = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


# ----------------------------------------------------------------------------------------------
# Global id layout
# ----------------------------------------------------------------------------------------------
def layout(shards: list[DbShard], start: int = 0) -> list[tuple[DbShard, int]]:
    out = []
    for s in shards:
        out.append((s, start))
        start += s.rows
    return out


def gather(layout: list[tuple[DbShard, int]], gids: np.ndarray) -> np.ndarray:
    """Vectors of the given global ids (any order), one Ray task per shard touched."""
    order = np.argsort(gids, kind="stable")
    sorted_ids = gids[order]
    refs, spans = [], []
    for s, start in layout:
        lo, hi = np.searchsorted(sorted_ids, [start, start + s.rows])
        if hi > lo:
            refs.append(_read_rows_task.remote(s.uri, s.rows, sorted_ids[lo:hi] - start))
            spans.append((lo, hi))
    parts = ray_get(refs)
    dim = parts[0].shape[1] if parts else 0
    out_sorted = np.zeros((len(gids), dim), np.float32)
    for (lo, hi), p in zip(spans, parts):
        out_sorted[lo:hi] = p
    out = np.empty_like(out_sorted)
    out[order] = out_sorted
    return out
