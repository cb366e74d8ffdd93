"""Evaluation sets of ``ragseg experiment``: the config's ``experiment.datasets``, or the embedded
synthetic world that ``experiment.world`` describes.

The world (built once under ``<experiment.cache>/world/<key>/``, ``world.json`` written last):

- set A (``make_synthetic``, ``world.size`` px): its train split is cut into the DB images (the first
  ``db_images``: ``build-db`` with ground-truth masks + ``build-index``) and a pool of new images
  (the next ``pool_images``, for vocab-add); its val split (``val_images``) is dataset ``A``;
- set G (``generic_images``, another seed): ``build-db`` of its *Open Images* layout (things only, the
  detector-style generic database) + ``build-index``: the fallback database;
- set B (``b_images`` at ``b_size`` px, seed ``b_seed``): dataset ``B``, labelled with A's database
  (the sweep's transfer target: other images, another scale).

The subsets of A are COCO panoptic JSONs written next to A's own (``panoptic_dbtrain.json``,
``panoptic_pool.json``) and read with ``source.kind: coco_panoptic``, so image ids stay unique.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ragseg import io
from ragseg.config import ExperimentDataset, JobConfig, SourceConfig, deep_merge
from ragseg.errors import UserError


@dataclass
class Dataset:
    name: str
    images: SourceConfig
    gt_json: str
    gt_dir: str
    vocab: str
    db: str | None
    index: str | None
    fallback_index: str | None


def gt_paths(src: SourceConfig) -> tuple[str, str]:
    """The COCO panoptic JSON and PNG folder of a source with panoptic ground truth."""
    if src.kind in ("synthetic", "coco_panoptic"):
        base = io.join(src.uri, "coco") if src.kind == "synthetic" else io.join(src.uri)
        return (src.annotations or io.join(base, "annotations", f"panoptic_{src.split}.json"),
                src.masks_dir or io.join(base, "annotations", f"panoptic_{src.split}"))
    if src.kind == "ade20k_panoptic":
        from ragseg.sources.ade20k import SHORT, dataset_root

        root = dataset_root(src.uri)
        short = SHORT.get(src.split, src.split)
        return (src.annotations or io.join(root, f"ade20k_panoptic_{short}.json"),
                src.masks_dir or io.join(root, f"ade20k_panoptic_{short}"))
    raise UserError(f"experiment datasets need panoptic ground truth (source kind synthetic, coco_panoptic or "
                    f"ade20k_panoptic), got {src.kind}; or give gt_json and gt_dir")


def resolve(cfg: JobConfig, d: ExperimentDataset) -> Dataset:
    gj, gd = (d.gt_json, d.gt_dir) if d.gt_json and d.gt_dir else gt_paths(d.images)
    return Dataset(d.name, d.images, gj, gd, d.vocab or gj, d.db, d.index, d.fallback_index)


def datasets(cfg: JobConfig) -> tuple[list[Dataset], dict]:
    """The evaluation sets (``world`` first when set) and the world's extras (pool, vocab-add class)."""
    extras: dict = {}
    out: list[Dataset] = []
    if cfg.experiment.world is not None:
        w = ensure_world(cfg)
        extras = w
        for d in w["datasets"]:
            out.append(resolve(cfg, ExperimentDataset.model_validate(d)))
    out += [resolve(cfg, d) for d in cfg.experiment.datasets]
    if not out:
        raise UserError("ragseg experiment needs experiment.datasets (or experiment.world for the embedded set)")
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise UserError(f"experiment dataset names must be unique, got {names}")
    return out, extras


def pick(sets: list[Dataset], name: str | None, what: str, default: int = 0) -> Dataset:
    if name is None:
        if default >= len(sets):
            raise UserError(f"{what} needs {default + 1} experiment datasets, {len(sets)} configured")
        return sets[default]
    for d in sets:
        if d.name == name:
            return d
    raise UserError(f"{what}: no experiment dataset named {name!r} (have {[d.name for d in sets]})")


def pick_with_db(sets: list[Dataset], name: str | None, what: str) -> Dataset:
    """:func:`pick`, for a study that reads the dataset's feature DB: one line when it has none."""
    d = pick(sets, name, what)
    if not d.db:
        raise UserError(f"{what} needs the feature DB of dataset {d.name} (experiment.datasets[].db)")
    return d


# ----------------------------------------------------------------------------------------------
# the embedded world
# ----------------------------------------------------------------------------------------------
def _subset_json(src_json: str, dst_json: str, first: int, count: int) -> int:
    """Write the images ``first .. first + count`` of a COCO panoptic JSON (with their annotations)."""
    doc = io.read_json(src_json)
    images = doc["images"][first:first + count]
    keep = {im["id"] for im in images}
    anns = [a for a in doc["annotations"] if a["image_id"] in keep]
    io.write_json_atomic(dst_json, {**doc, "images": images, "annotations": anns})
    return len(images)


def world_key(cfg: JobConfig) -> str:
    from ragseg.experiments.cache import _model_section

    m = cfg.models.model_dump(mode="json")
    parts = {"world": cfg.experiment.world.model_dump(mode="json"), "clip": _model_section(m["clip"]),
             "device": m["device"], "build_db": {k: v for k, v in cfg.build_db.model_dump().items() if k != "out"},
             "index": {k: v for k, v in cfg.index.model_dump(mode="json").items() if k != "out"}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _job(cfg: JobConfig, **sections) -> JobConfig:
    return JobConfig.model_validate(deep_merge(cfg.model_dump(mode="json"), sections))


def ensure_world(cfg: JobConfig) -> dict:
    """Build (or read back) the embedded world; returns ``world.json``."""
    from rich.console import Console

    from ragseg.experiments.derive import index_cfg
    from ragseg.index.build import build_index
    from ragseg.pipelines.build_db import run_build_db
    from ragseg.sources.synthetic import make_synthetic

    w = cfg.experiment.world
    key = world_key(cfg)
    root = io.join(cfg.experiment.cache, "world", key)
    marker = io.join(root, "world.json")
    if io.exists(marker):
        return io.read_json(marker)
    console = Console(stderr=True)
    console.print(f"[bold]experiment world[/] {root}: generating the synthetic sets")
    total = w.db_images + w.pool_images + w.val_images
    a_root, g_root, b_root = io.join(root, "A"), io.join(root, "G"), io.join(root, "B")
    a = make_synthetic(a_root, images=total, seed=w.seed, size=w.size, val_fraction=w.val_images / total)
    if a["splits"]["val"]["count"] != w.val_images:
        raise UserError(f"world: the val split has {a['splits']['val']['count']} images, not {w.val_images}")
    ann = io.join(a_root, "coco", "annotations")
    _subset_json(io.join(ann, "panoptic_train.json"), io.join(ann, "panoptic_dbtrain.json"), 0, w.db_images)
    pool_n = _subset_json(io.join(ann, "panoptic_train.json"), io.join(ann, "panoptic_pool.json"), w.db_images,
                          w.pool_images) if w.pool_images else 0
    make_synthetic(g_root, images=w.generic_images, seed=w.seed + 1000, size=w.size, val_fraction=0.0)
    make_synthetic(b_root, images=w.b_images, seed=w.b_seed, size=w.b_size, val_fraction=0.0)

    db_a, db_g = io.join(root, "db-A"), io.join(root, "db-G")
    idx_a, idx_g = io.join(root, "index-A"), io.join(root, "index-G")
    dbtrain = SourceConfig(kind="coco_panoptic", uri=io.join(a_root, "coco"), split="train",
                           annotations=io.join(ann, "panoptic_dbtrain.json"))
    console.print("[bold]experiment world[/]: build-db A (ground-truth masks)")
    run_build_db(_job(cfg, source=dbtrain.model_dump(mode="json"), build_db={"out": db_a, "masks": "gt"}))
    build_index(db_a, index_cfg(cfg, idx_a))
    console.print("[bold]experiment world[/]: build-db G (Open Images layout: things only) = fallback DB")
    oi = SourceConfig(kind="openimages", uri=io.join(g_root, "openimages"), split="train")
    run_build_db(_job(cfg, source=oi.model_dump(mode="json"), build_db={"out": db_g, "masks": "gt"}))
    build_index(db_g, index_cfg(cfg, idx_g))

    val_a = SourceConfig(kind="synthetic", uri=a_root, split="val")
    set_b = SourceConfig(kind="synthetic", uri=b_root, split="train")
    doc = {
        "key": key, "root": root,
        "datasets": [
            {"name": "A", "images": val_a.model_dump(mode="json"), "db": db_a, "index": idx_a,
             "fallback_index": idx_g},
            {"name": "B", "images": set_b.model_dump(mode="json"), "db": db_a, "index": idx_a,
             "fallback_index": idx_g},
        ],
        "pool": SourceConfig(kind="coco_panoptic", uri=io.join(a_root, "coco"), split="train",
                             annotations=io.join(ann, "panoptic_pool.json")).model_dump(mode="json"),
        "pool_images": pool_n, "fallback_db": db_g,
        "describe": {"A": f"synthetic seed {w.seed}, {w.size} px: {w.db_images} DB images, {w.val_images} val",
                     "B": f"synthetic seed {w.b_seed}, {w.b_size} px, {w.b_images} images, A's DB",
                     "G": f"synthetic seed {w.seed + 1000}, Open Images layout (things only), "
                          f"{w.generic_images} images: the fallback DB"},
    }
    io.write_json_atomic(marker, doc)
    return doc
