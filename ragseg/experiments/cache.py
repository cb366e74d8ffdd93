"""The feature cache of ``ragseg experiment``: run the models once per evaluation set, re-score forever.

Layout under ``experiment.cache`` (any fsspec URI)::

    features/<key>/                 one evaluation set x proposal method x models (a ledgered folder,
                                    kind "feature-cache": killed passes resume, nothing is duplicated)
        key.json                    what the key hashes (readable)
        images/<piece>.parquet      one row per image: image_id, uri, coco_id, file_name, height,
                                    width, proposals, error ("" = ok)
        proposals/<piece>.parquet   one row per proposal: image_id, idx, mask_rle (COCO RLE), label
                                    (the proposal's own: the ground-truth class for gt proposals, the
                                    detector's phrase for gdino-sam, "" for sam-grid), isthing, score,
                                    embedding (the masked-CLIP query, float16, exactly what the label
                                    job's Embed stage gives Classify), full_embedding (CLIP on the
                                    unmasked padded box crop; domain-shift only), iv_logits (the
                                    proposal model's in-vocabulary logits; null for binary-mask proposals)
        neighbours/<nkey>/          per database version: layer.json (index URI, version, count,
                                    k_max, nprobe, re-rank k', the label table) and per piece
                                    <piece>.parquet: sims (k_max float32), ids (k_max int64), codes
                                    (k_max int32 into the label table; -1 = no neighbour)
    text/<tkey>.npy                 CLIP text embeddings of a vocabulary (prompt-template ensemble)

The first pass runs the label job's own stages (``DecodeImages``, ``LoadGroundTruth`` / ``Detect`` +
``Segment`` / ``SamGrid``, ``Embed``) through the same Ray executor, piece size and batch sizes, so
the cached queries are the ones a ``ragseg label`` run classifies. The key of ``features/`` hashes the
proposal method, the model sections it uses (CLIP, and SAM / Grounding DINO when they propose; device
and precision), the evaluation source, the vocabulary when it prompts the detector, the ground-truth
filters of gt proposals and whether box crops are embedded. A neighbour layer's key adds the index
URI, its live version (and that version's creation time and count), nprobe, re-rank k', ``k_max`` and
which queries searched it (masked or full). Nothing is ever overwritten: a new database version is a
new layer.

FC-CLIP proposals (``label.proposals: fcclip``) run FC-CLIP's own inference and are not cached yet;
``iv_logits`` and the per-proposal rows are where their s_iv and mask logits would go.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ragseg import io, ledger
from ragseg.config import JobConfig, SourceConfig
from ragseg.errors import UserError, failed_rows_table
from ragseg.schema import embeddings_to_arrow
from ragseg.stages.batch import as_list

log = logging.getLogger(__name__)

KIND = "feature-cache"
FORMAT = 1
PROPOSALS = ("gt", "gdino-sam", "sam-grid")  # binary-mask proposal methods the cache runs
RESULT_COLUMNS = ["image_id", "uri", "error", "coco_id", "file_name", "height", "width", "seg_masks_rle",
                  "seg_labels", "seg_isthing", "seg_scores", "embeddings", "full_embeddings", "seg_iv_logits"]

IMAGE_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()), pa.field("uri", pa.string()), pa.field("coco_id", pa.string()),
    pa.field("file_name", pa.string()), pa.field("height", pa.int32()), pa.field("width", pa.int32()),
    pa.field("proposals", pa.int32()), pa.field("error", pa.string()),
])


def proposal_schema(dim: int, full: bool) -> pa.Schema:
    fields = [
        pa.field("image_id", pa.string()), pa.field("idx", pa.int32()), pa.field("mask_rle", pa.string()),
        pa.field("label", pa.string()), pa.field("isthing", pa.bool_()), pa.field("score", pa.float32()),
        pa.field("embedding", pa.list_(pa.float16(), dim)),
    ]
    if full:
        fields.append(pa.field("full_embedding", pa.list_(pa.float16(), dim)))
    fields.append(pa.field("iv_logits", pa.list_(pa.float32())))
    return pa.schema(fields)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_section(d: dict) -> dict:
    """A model section without what does not change the model (checksum pins)."""
    return {k: v for k, v in d.items() if k != "sha256"}


def features_key(cfg: JobConfig, source: SourceConfig, vocab, full: bool) -> tuple[str, dict]:
    """``(key, parts)``: the hash of everything the cached proposals and queries depend on."""
    lc = cfg.label
    if lc.proposals not in PROPOSALS:
        raise UserError(f"ragseg experiment caches the binary-mask proposal methods {', '.join(PROPOSALS)}; "
                        f"label.proposals={lc.proposals} is not supported yet")
    m = cfg.models.model_dump(mode="json")
    models = {"clip": _model_section(m["clip"]), "device": m["device"]}
    if lc.proposals in ("gdino-sam", "sam-grid"):
        models["sam"] = _model_section(m["sam"])
    if lc.proposals == "gdino-sam":
        models["gdino"] = _model_section(m["gdino"])
    parts: dict[str, Any] = {
        "format": FORMAT, "proposals": lc.proposals, "models": models,
        "source": source.model_dump(mode="json"),
        # the label job's batching (pieces, blocks) decides which images share a forward pass
        "batching": {"images_per_shard": lc.images_per_shard, "images_per_block": cfg.ray.images_per_block},
        "full_crops": bool(full),
    }
    if lc.proposals == "gdino-sam":  # Grounding DINO is prompted with the vocabulary
        parts["vocab"] = {"names": list(vocab.names)}
    if lc.proposals == "gt":
        parts["gt"] = {"min_segment_area": cfg.build_db.min_segment_area,
                       "include_crowd": bool(cfg.source.include_crowd) if cfg.source is not None else False}
    return _hash(parts), parts


# ----------------------------------------------------------------------------------------------
# stages of the cache pass
# ----------------------------------------------------------------------------------------------
def box_masks(masks: np.ndarray) -> np.ndarray:
    """(n, H, W) bool -> (n, H, W) bool: each mask's tight box filled (the "unmasked" region)."""
    from ragseg.models.clip import mask_boxes

    out = np.zeros_like(masks, dtype=bool)
    for i, (x0, y0, x1, y1) in enumerate(mask_boxes(masks)):
        out[i, y0:y1, x0:x1] = True
    return out


class EmbedBoxCrop:
    """Adds ``full_embeddings``: the CLIP feature of each proposal's *unmasked* padded box crop (the
    label job's ``Embed`` in ``crop`` mode, given the box instead of the mask), for domain-shift."""

    STAGE = "embed_full"

    def __init__(self, cfg: JobConfig):
        from ragseg.config import deep_merge
        from ragseg.stages.embed import Embed

        crop = JobConfig.model_validate(deep_merge(cfg.model_dump(mode="json"), {"models": {"clip": {"mode": "crop"}}}))
        self.embed = Embed(crop)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ragseg.stages.batch import map_rows, object_column
        from ragseg.stages.embed import decode_masks

        def prepare(i: int):
            rles = as_list(batch["seg_masks_rle"][i])
            if not rles:
                return None
            img = np.asarray(batch["image"][i])
            return img, box_masks(decode_masks(rles, img.shape[:2]))

        done, errors = map_rows(batch, self.STAGE, prepare, self.embed.embed_rows,
                                lambda: np.zeros((0, self.embed.dim), np.float16), log)
        col = object_column(done)
        out = dict(batch)
        out["full_embeddings"] = col
        out["error"] = np.asarray(errors, dtype=object)
        return out


def build_graph(cfg: JobConfig, vocab, full: bool, ds):
    """The label job's proposal and embedding stages (the same stage lists as
    ``ragseg.pipelines.label.build_graph``: :mod:`ragseg.pipelines.graph`), then optionally
    :class:`EmbedBoxCrop`; no classify."""
    from ragseg.pipelines.common import select_columns
    from ragseg.pipelines.graph import apply_stages, decode_stages, embed_stages, model, proposal_stages

    full_stage = [model("embed_full", functools.partial(EmbedBoxCrop, cfg))] if full else []
    # the box crops before Embed: in models.clip.mode=fcclip its CPU resize replaces the original pixels
    ds = apply_stages(ds, cfg, [*decode_stages(cfg), *proposal_stages(cfg, cfg.label.proposals, list(vocab.names)),
                                *full_stage, *embed_stages(cfg)])
    return ds.map_batches(select_columns, fn_kwargs={"keep": frozenset(RESULT_COLUMNS)},
                          batch_size=cfg.ray.images_per_block)


def piece_paths(name: str) -> dict[str, str]:
    return {"images": f"images/{name}.parquet", "proposals": f"proposals/{name}.parquet",
            "errors": f"errors/{name}.parquet"}


class WriteCachePiece:
    """Last stage of the cache pass, on a worker: one piece's images and proposals tables, its errors,
    then its commit record (ragseg.ledger); only the record goes back to the driver."""

    def __init__(self, out: str, dim: int, full: bool):
        self.out, self.dim, self.full = out, dim, full

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ragseg.pipelines.common import empty_record_batch, record_batch, stage_seconds

        n = len(batch["image_id"])
        if n == 0:
            return empty_record_batch()
        ids = [str(v) for v in batch["image_id"]]
        errors = [str(e) if e else "" for e in batch["error"]]
        name = ledger.piece_name(ids)
        paths = piece_paths(name)
        img_rows: dict[str, list] = {f.name: [] for f in IMAGE_SCHEMA}
        prop: dict[str, list] = {k: [] for k in ("image_id", "idx", "mask_rle", "label", "isthing", "score",
                                                 "iv_logits")}
        embs, fulls = [], []
        for i in sorted(range(n), key=lambda i: ids[i]):
            rles = [] if errors[i] else as_list(batch["seg_masks_rle"][i])
            k = len(rles)
            img_rows["image_id"].append(ids[i])
            img_rows["uri"].append(str(batch["uri"][i]))
            img_rows["coco_id"].append(_cell(batch, "coco_id", i))
            img_rows["file_name"].append(_cell(batch, "file_name", i))
            img_rows["height"].append(int(batch["height"][i]) if "height" in batch else 0)
            img_rows["width"].append(int(batch["width"][i]) if "width" in batch else 0)
            img_rows["proposals"].append(k)
            img_rows["error"].append(errors[i])
            if not k:
                continue
            emb = np.asarray(batch["embeddings"][i], np.float16).reshape(k, self.dim)
            embs.append(emb)
            if self.full:
                fulls.append(np.asarray(batch["full_embeddings"][i], np.float16).reshape(k, self.dim))
            labels = as_list(batch["seg_labels"][i]) if "seg_labels" in batch else [""] * k
            things = as_list(batch["seg_isthing"][i]) if "seg_isthing" in batch else [True] * k
            scores = as_list(batch["seg_scores"][i]) if "seg_scores" in batch else [1.0] * k
            iv = batch.get("seg_iv_logits")
            iv_i = None if iv is None or iv[i] is None else np.asarray(iv[i], np.float32).reshape(k, -1)
            for j in range(k):
                prop["image_id"].append(ids[i])
                prop["idx"].append(j)
                prop["mask_rle"].append(str(rles[j]))
                prop["label"].append(str(labels[j]))
                prop["isthing"].append(bool(things[j]))
                prop["score"].append(float(scores[j]))
                prop["iv_logits"].append(None if iv_i is None else iv_i[j].tolist())
        schema = proposal_schema(self.dim, self.full)
        cols = {k: pa.array(v, schema.field(k).type) for k, v in prop.items()}
        cols["embedding"] = embeddings_to_arrow(np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float16))
        if self.full:
            cols["full_embedding"] = embeddings_to_arrow(
                np.concatenate(fulls) if fulls else np.zeros((0, self.dim), np.float16))
        ptab = pa.table([cols[f.name] for f in schema], schema=schema)
        itab = pa.table({f.name: pa.array(img_rows[f.name], f.type) for f in IMAGE_SCHEMA}, schema=IMAGE_SCHEMA)
        io.write_parquet_atomic(io.join(self.out, paths["proposals"]), ptab)
        bad = [i for i in range(n) if errors[i]]
        if bad:
            rows = [{"uri": batch["uri"][i], "image_id": ids[i], "error": errors[i]} for i in bad]
            io.write_parquet_atomic(io.join(self.out, paths["errors"]), failed_rows_table(rows))
        io.write_parquet_atomic(io.join(self.out, paths["images"]), itab)  # read by the record's parts_path
        rec = ledger.new_record(name, sorted(ids), images=n, segments=ptab.num_rows, errors=len(bad),
                                empty_images=sum(1 for c in img_rows["proposals"] if c == 0),
                                data_path=paths["proposals"], errors_path=paths["errors"] if bad else None,
                                parts_path=paths["images"], stage_seconds=stage_seconds(batch))
        ledger.write_commit(self.out, rec)
        return record_batch(rec)


def _cell(batch: dict[str, np.ndarray], col: str, i: int) -> str:
    v = batch[col][i] if col in batch else None
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------------------
def with_images(cfg: JobConfig, source: SourceConfig) -> JobConfig:
    from ragseg.config import deep_merge

    return JobConfig.model_validate(deep_merge(cfg.model_dump(mode="json"),
                                               {"label": {"images": source.model_dump(mode="json")}}))


def ensure_features(cfg: JobConfig, source: SourceConfig, vocab, full: bool = False) -> str:
    """The cache folder of ``source`` under ``cfg``'s proposals and models, made (or finished) now.
    A complete folder with box crops serves a request without them. Returns its URI."""
    from ragseg.pipelines.build_db import embed_identity
    from ragseg.pipelines.common import RunStats, drain_records, pending_rows, ray_executor
    from ragseg.pipelines.listing import clear_listings
    from ragseg.preflight import preflight
    from ragseg.sources import list_table

    root = cfg.experiment.cache
    if not full:  # a folder with box crops holds everything a plain one does
        k_full, _ = features_key(cfg, source, vocab, True)
        uri = io.join(root, "features", k_full)
        if _complete(uri, cfg, source):
            return uri
    key, parts = features_key(cfg, source, vocab, full)
    out = io.join(root, "features", key)
    if _complete(out, cfg, source):
        return out
    preflight(cfg, "label")
    _, _, dim = embed_identity(cfg)
    job = with_images(cfg, source)
    with ledger.Lease(out, cfg.commit.lease_ttl_s, "experiment-cache"):
        io.remove_tmp_litter(out)
        clear_listings(out)
        if not io.exists(io.join(out, "key.json")):
            io.write_json_atomic(io.join(out, "key.json"), {"key": key, **parts})

        def check(header: dict) -> None:
            if header.get("key") != key:
                raise UserError(f"{out} holds a feature cache with key {header.get('key')} != {key}")

        c = cfg.commit
        led, header, comp = ledger.open_for_writing(
            out, KIND, c.compact_every, c.compact_seconds, c.max_segments,
            lambda: ledger.new_header(KIND, key=key, dim=dim, full_crops=bool(full), proposals=cfg.label.proposals),
            check)
        source_errors: list[dict] = []
        rows = list_table(source, errors=source_errors)
        for e in source_errors[:5]:
            log.warning("experiment cache: source row skipped: %s", e)
        pending = pending_rows(rows, led)
        n_pending = pending.num_rows
        stats = RunStats(shards_skipped=led.records.num_rows if led is not None else 0)
        if n_pending:
            vocab_for_graph = vocab
            execute = ray_executor(functools.partial(build_graph, job, vocab_for_graph, full), out)
            records = execute(job, pending, functools.partial(WriteCachePiece, out, dim, full),
                              cfg.label.images_per_shard)
            del pending
            drain_records(records, comp, stats, n_pending, f"feature cache {key[:8]}", cfg.ray.progress)
        header["runs"].append({"listed": rows.num_rows, "summary": stats.summary()})
        header["complete_listing"] = rows.num_rows
        ledger.write_header(out, header)
    return out


def _complete(uri: str, cfg: JobConfig, source: SourceConfig) -> bool:
    """Every listed image of ``source`` is in a committed piece of the cache at ``uri``."""
    if not io.exists(io.join(uri, ledger.MANIFEST)):
        return False
    from ragseg.pipelines.common import pending_rows
    from ragseg.sources import list_table

    led = ledger.load(uri, KIND)
    if led is None:
        return False
    return pending_rows(list_table(source), led).num_rows == 0


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
@dataclass
class FeatureSet:
    """A loaded cache: images in piece order, their proposals concatenated (``offsets[i]:offsets[i+1]``
    are image i's rows)."""

    uri: str
    key: str
    images: pa.Table  # IMAGE_SCHEMA rows
    offsets: np.ndarray  # (n_images + 1,) int64
    rles: list[str]
    labels: np.ndarray  # (N,) object: each proposal's own label
    isthing: np.ndarray  # (N,) bool
    scores: np.ndarray  # (N,) float32
    queries: np.ndarray  # (N, d) float16
    full: np.ndarray | None  # (N, d) float16
    iv_logits: list | None
    pieces: list[tuple[str, int, int]] = field(default_factory=list)  # (name, first row, end row)
    bytes_on_disk: dict[str, int] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return self.images.num_rows

    @property
    def n_proposals(self) -> int:
        return len(self.rles)

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))


def load_features(uri: str) -> FeatureSet:
    """Read a cache folder's committed pieces (sorted by piece name) into memory."""
    from ragseg.schema import arrow_to_embeddings

    led = ledger.load(uri, KIND)
    if led is None:
        raise UserError(f"no feature cache at {uri}")
    rec = led.records.select(["name", "data_path", "parts_path"]).to_pydict()
    itabs, ptabs, pieces, start = [], [], [], 0
    nbytes = {"proposals": 0, "images": 0}
    for name, dpath, ipath in zip(rec["name"], rec["data_path"], rec["parts_path"]):
        it = io.read_parquet(io.join(uri, ipath))
        pt = io.read_parquet(io.join(uri, dpath))
        if pt.num_rows != int(pa.compute.sum(it.column("proposals")).as_py() or 0):
            raise UserError(f"feature cache piece {name} in {uri}: proposals and images tables disagree")
        itabs.append(it)
        ptabs.append(pt)
        pieces.append((name, start, start + pt.num_rows))
        start += pt.num_rows
        for k, p in (("proposals", dpath), ("images", ipath)):
            fs, path = io.fs_and_path(io.join(uri, p))
            nbytes[k] += int(fs.size(path))
    images = pa.concat_tables(itabs) if itabs else IMAGE_SCHEMA.empty_table()
    props = pa.concat_tables(ptabs, promote_options="permissive") if ptabs else None
    counts = images.column("proposals").to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if props is None or props.num_rows == 0:
        dim = int(led.header.get("dim", 0))
        z = np.zeros((0, dim), np.float16)
        return FeatureSet(uri, str(led.header.get("key")), images, offsets, [], np.zeros(0, object),
                          np.zeros(0, bool), np.zeros(0, np.float32), z, z if led.header.get("full_crops") else None,
                          None, pieces, nbytes)
    full = (arrow_to_embeddings(props.column("full_embedding")).astype(np.float16)
            if "full_embedding" in props.column_names else None)
    iv = props.column("iv_logits").to_pylist()
    iv_logits = None if all(v is None for v in iv) else iv
    return FeatureSet(
        uri=uri, key=str(led.header.get("key")), images=images, offsets=offsets,
        rles=props.column("mask_rle").to_pylist(),
        labels=np.asarray(props.column("label").to_pylist(), dtype=object),
        isthing=props.column("isthing").to_numpy(zero_copy_only=False).astype(bool),
        scores=props.column("score").to_numpy().astype(np.float32),
        queries=arrow_to_embeddings(props.column("embedding")).astype(np.float16),
        full=full, iv_logits=iv_logits, pieces=pieces, bytes_on_disk=nbytes)


# ----------------------------------------------------------------------------------------------
# text embeddings (computed in a Ray worker, as the label job's Classify actor computes them)
# ----------------------------------------------------------------------------------------------
def _encode_text(models_json: dict, names: list[str]) -> np.ndarray:
    from ragseg.config import ModelsConfig
    from ragseg.models.clip import TextEmbedder

    return TextEmbedder(ModelsConfig.model_validate(models_json)).encode(names)


def text_embeddings(cfg: JobConfig, vocab) -> np.ndarray:
    """(C, d) float32 CLIP text embeddings of the vocabulary, cached under ``text/``."""
    c = cfg.models.clip
    key = _hash({"clip": _model_section(c.model_dump(mode="json")), "device": cfg.models.device.model_dump(),
                 "names": list(vocab.names)})
    uri = io.join(cfg.experiment.cache, "text", f"{key}.npy")
    if io.exists(uri):
        import io as _io

        return np.load(_io.BytesIO(io.read_bytes(uri)), allow_pickle=False)
    import ray

    from ragseg.runtime import init_ray

    init_ray(cfg.ray)
    task = ray.remote(num_cpus=cfg.ray.cpus_per_actor)(_encode_text)
    emb = np.asarray(ray.get(task.remote(cfg.models.model_dump(mode="json"), list(vocab.names))), np.float32)
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    io.write_bytes_atomic(uri, buf.getvalue())
    return emb


# ----------------------------------------------------------------------------------------------
# neighbour layers
# ----------------------------------------------------------------------------------------------
@dataclass
class Neighbours:
    """The cached k_max nearest neighbours of every proposal in one database version."""

    key: str
    index_uri: str
    version: str
    count: int
    sims: np.ndarray  # (N, k_max) float32, -inf = none
    ids: np.ndarray  # (N, k_max) int64, -1 = none
    labels: np.ndarray  # (N, k_max) object, "" = none
    labels_vocab: set[str]  # the labels present in that version (Index.labels_vocab)
    meta: dict


def index_identity(index) -> dict:
    return {"uri": index.uri, "version": index.version, "count": int(index.meta.get("count", 0)),
            "created": index.meta.get("created"), "nprobe": int(index.nprobe), "rerank_k": int(index.rerank_k)}


def ensure_neighbours(cfg: JobConfig, fs: FeatureSet, index_uri: str, queries: str = "masked",
                      index=None) -> Neighbours:
    """Search ``index_uri``'s live version (as ``Index.open`` gives it to the label job) with every
    cached query, ``experiment.k_max`` neighbours each; pieces already searched are read back."""
    from ragseg.index.store import Index

    if queries not in ("masked", "full"):
        raise ValueError(f"queries must be masked or full, got {queries!r}")
    if queries == "full" and fs.full is None:
        raise UserError(f"feature cache {fs.uri} has no box-crop features (domain-shift makes them)")
    index = index or Index.open(index_uri)
    k_max = max(cfg.experiment.k_max, cfg.label.ensemble.k)
    ident = index_identity(index)
    nkey = _hash({"features": fs.key, "index": ident, "k_max": k_max, "queries": queries})
    root = io.join(fs.uri, "neighbours", nkey)
    vocab_labels = sorted(index.labels_vocab)
    layer_uri = io.join(root, "layer.json")
    if io.exists(layer_uri):
        layer = io.read_json(layer_uri)
    else:
        layer = {"key": nkey, "index": ident, "k_max": k_max, "queries": queries, "labels": vocab_labels,
                 "features": fs.key, "recall": index.meta.get("recall")}
        io.write_json_atomic(layer_uri, layer)
    table = list(layer["labels"])
    code_of = {lab: i for i, lab in enumerate(table)}
    n = fs.n_proposals
    sims = np.full((n, k_max), -np.inf, np.float32)
    ids = np.full((n, k_max), -1, np.int64)
    codes = np.full((n, k_max), -1, np.int32)
    q_all = fs.queries if queries == "masked" else fs.full
    for name, lo, hi in fs.pieces:
        uri = io.join(root, f"{name}.parquet")
        if io.exists(uri):
            t = io.read_parquet(uri)
            if t.num_rows != hi - lo:
                raise UserError(f"{uri} has {t.num_rows} rows, the cache piece has {hi - lo}")
            if t.num_rows:
                sims[lo:hi] = _fixed(t.column("sims"), np.float32, k_max)
                ids[lo:hi] = _fixed(t.column("ids"), np.int64, k_max)
                codes[lo:hi] = _fixed(t.column("codes"), np.int32, k_max)
            continue
        if hi > lo:
            # Index.search (what the label job's Classify calls) less its image/segment id columns:
            # the same search_ids call, the same "missing" convention (sim -inf, label "", id -1)
            s, i_ = index.search_ids(np.asarray(q_all[lo:hi], np.float32), k_max)
            missing = i_ < 0
            sims[lo:hi] = np.where(missing, -np.inf, s).astype(np.float32)
            ids[lo:hi] = np.where(missing, -1, i_)
            lab = index._labels[np.where(missing, len(index._labels) - 1, i_)]
            codes[lo:hi] = np.vectorize(lambda x: code_of.get(x, -1), otypes=[np.int32])(lab)
        io.write_parquet_atomic(uri, pa.table({
            "sims": pa.FixedSizeListArray.from_arrays(pa.array(sims[lo:hi].reshape(-1)), k_max),
            "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids[lo:hi].reshape(-1)), k_max),
            "codes": pa.FixedSizeListArray.from_arrays(pa.array(codes[lo:hi].reshape(-1)), k_max),
        }))
    lab_arr = np.asarray(table + [""], dtype=object)
    labels = lab_arr[np.where(codes >= 0, codes, len(table))]
    return Neighbours(nkey, index.uri, index.version, ident["count"], sims, ids, labels, set(index.labels_vocab),
                      dict(index.meta))


def _fixed(col, dtype, k: int) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, k)
