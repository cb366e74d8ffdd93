"""The Ray Data plans of build-db and label: decoding and resizing run as CPU tasks, the model stages run
as actor pools with their configured actors / GPU fraction and receive ready uint8 arrays (checked on
the logical plan, and by executing the plan's stages in this process with every decode / resize entry
point made to fail inside the model stages)."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

from ragseg.config import load_config

MODEL_CLASSES = {"Detect", "Segment", "SamGrid", "Embed", "FcclipLabel", "Classify"}
CPU_CLASSES = {"DecodeImages", "LoadGroundTruth", "SamPrep", "FcclipPrep", "PanopticMerge", "WritePanoptic"}


def _ops(ds) -> list:
    """The map operators of a dataset's logical plan, source first."""
    from ray.data._internal.logical.operators.map_operator import AbstractUDFMap

    out, op = [], ds._logical_plan.dag
    while op is not None:
        if isinstance(op, AbstractUDFMap):
            out.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return out[::-1]


def _stage(op) -> tuple[str, str, bool]:
    """(stage name, class of the stage, runs as an actor pool) of one map operator."""
    from ray.data import ActorPoolStrategy

    kw = (op.fn_constructor_kwargs or {}) if isinstance(op.compute, ActorPoolStrategy) else (op.fn_kwargs or {})
    factory = kw.get("factory")
    cls = factory.func.__name__ if isinstance(factory, functools.partial) else getattr(op.fn, "__name__", "")
    return kw.get("name", cls), cls, isinstance(op.compute, ActorPoolStrategy)


def _rows_ds(synthetic_root, n=3):
    import ray

    from ragseg.config import SourceConfig
    from ragseg.sources import list_rows

    rows = list_rows(SourceConfig(kind="synthetic", uri=synthetic_root, split="train", limit=n))
    return ray.data.from_items(rows), rows


RESOURCES = ["ray.model_actors=1", "ray.stages={detect: {gpus: 0.25, actors: 2}, segment: {gpus: 0.5}, "
             "embed: {gpus: 0.25, cpus: 2}, sam_grid: {gpus: 0.5}, fcclip: {gpus: 0.75}}"]


@pytest.fixture
def one_gpu_cluster(monkeypatch):
    """The plan as it is built on a cluster with a GPU (add_stage asks ragseg.runtime.cluster_gpus)."""
    import ragseg.runtime

    monkeypatch.setattr(ragseg.runtime, "cluster_gpus", lambda: 1.0)


def _check_plan(ds, want: list[str], gpus: dict[str, float]) -> None:
    ops = _ops(ds)
    stages = [_stage(op) for op in ops]
    names = [s[0] for s in stages if s[0] != "select_columns"]
    assert names == want, names
    for op, (name, cls, actor) in zip(ops, stages):
        remote = op.ray_remote_args or {}
        if cls in MODEL_CLASSES:
            assert actor, f"{name} should be an actor pool"
            assert remote.get("num_gpus", 0) == gpus.get(name, 0), (name, remote)
        else:  # decode, gt, resize, merge, write, column selection: CPU tasks, never a GPU
            assert not actor and remote.get("num_gpus", 0) == 0, (name, cls, remote)
            assert cls in CPU_CLASSES | {"select_columns"}, cls
    first_model = min(i for i, s in enumerate(stages) if s[1] in MODEL_CLASSES)
    assert stages[0][1] == "DecodeImages" and first_model > 0  # decoding happens before any model stage
    if "segment" in want or "sam_grid" in want:
        prep = names.index("sam_prep")
        assert prep == names.index("segment" if "segment" in want else "sam_grid") - 1


def test_build_db_plan(tiny_cfg_path, synthetic_root, ray_local, one_gpu_cluster):
    from ragseg.pipelines.build_db import build_graph

    ds, _ = _rows_ds(synthetic_root)
    cfg = load_config(tiny_cfg_path, ["build_db.masks=detector", *RESOURCES])
    plan = build_graph(cfg, ds)
    _check_plan(plan, ["decode", "detect", "sam_prep", "segment", "embed"],
                {"detect": 0.25, "segment": 0.5, "embed": 0.25})
    from ray.data import ActorPoolStrategy

    ops = {_stage(op)[0]: op for op in _ops(plan)}
    assert ops["detect"].compute == ActorPoolStrategy(size=2)  # ray.stages.detect.actors
    assert ops["segment"].compute == ActorPoolStrategy(size=1)  # ray.model_actors
    assert ops["embed"].ray_remote_args["num_cpus"] == 2
    # SAM 2.1 resizes on its device: no CPU resize task; ground-truth masks: no mask model at all
    cfg2 = load_config(tiny_cfg_path, ["build_db.masks=detector", "models.sam.family=sam2", *RESOURCES])
    assert "sam_prep" not in [_stage(op)[0] for op in _ops(build_graph(cfg2, ds))]
    gt = build_graph(load_config(tiny_cfg_path, ["build_db.masks=gt", *RESOURCES]), ds)
    _check_plan(gt, ["decode", "gt", "embed"], {"embed": 0.25})
    # keys for FC-CLIP labelling: FC-CLIP's test resize on a CPU task before the embed actor
    fc = build_graph(load_config(tiny_cfg_path, ["build_db.masks=gt", "models.clip.mode=fcclip", *RESOURCES]), ds)
    _check_plan(fc, ["decode", "gt", "fcclip_prep", "embed"], {"embed": 0.25})


@pytest.mark.parametrize("proposals,want", [
    ("gdino-sam", ["decode", "detect", "sam_prep", "segment", "embed", "classify", "merge", "write"]),
    ("sam-grid", ["decode", "sam_prep", "sam_grid", "embed", "classify", "merge", "write"]),
    ("gt", ["decode", "gt", "embed", "classify", "merge", "write"]),
    ("fcclip", ["decode", "fcclip_prep", "fcclip", "write"]),
])
def test_label_plan(tiny_cfg_path, synthetic_root, ray_local, one_gpu_cluster, proposals, want):
    from ragseg.pipelines.label import build_graph
    from ragseg.vocab import Vocab

    ds, _ = _rows_ds(synthetic_root)
    cfg = load_config(tiny_cfg_path, [f"label.proposals={proposals}", "label.out=/tmp/unused", *RESOURCES])
    plan = build_graph(cfg, ds, Vocab.from_names(["a", "b"]))
    _check_plan(plan, want, {"detect": 0.25, "segment": 0.5, "embed": 0.25, "sam_grid": 0.5, "fcclip": 0.75})


@contextlib.contextmanager
def _no_decoding(calls: list[str]):
    """Every way to decode or resize an image fails (and is recorded) while a model stage runs."""
    import PIL.Image
    from segment_anything.utils.transforms import ResizeLongestSide

    import ragseg.io
    import ragseg.models.sam
    import ragseg.stages.decode

    def forbid(what):
        def f(*a, **k):
            calls.append(what)
            raise AssertionError(f"a model stage called {what}")
        return f

    patches = [(PIL.Image, "open"), (ragseg.stages.decode, "decode_image"), (ragseg.io, "read_bytes"),
               (ResizeLongestSide, "apply_image"), (ragseg.models.sam, "resize_longest"),
               (PIL.Image.Image, "resize"), (PIL.Image, "fromarray")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches]
    try:
        for obj, name in patches:
            setattr(obj, name, forbid(f"{getattr(obj, '__name__', obj)}.{name}"))
        yield
    finally:
        for obj, name, v in saved:
            setattr(obj, name, v)


@pytest.mark.parametrize("job,overrides,want", [
    ("build-db", ["build_db.masks=detector"], ["decode", "detect", "sam_prep", "segment", "embed"]),
    ("build-db", ["build_db.masks=gt", "models.clip.mode=fcclip"], ["decode", "gt", "fcclip_prep", "embed"]),
    ("label", ["label.proposals=fcclip", "label.ensemble.scores=clip"], ["decode", "fcclip_prep", "fcclip", "write"]),
])
def test_model_stages_do_no_decoding(tiny_cfg_path, synthetic_root, ray_local, tmp_path, job, overrides, want):
    """Run the plan's stages in order in this process, as Ray would (tasks: ``fn(batch, **fn_kwargs)``;
    actors: ``fn(**constructor kwargs)(batch)``): inside every model stage, reading, decoding and
    resizing images fail, and the rows still come out without errors. The GPU actors got decoded uint8
    images, SAM's and FC-CLIP's resized inputs from the CPU tasks before them."""
    from ray.data import ActorPoolStrategy

    from ragseg.vocab import Vocab

    ds, rows = _rows_ds(synthetic_root, n=2)
    cfg = load_config(tiny_cfg_path, [*overrides, f"label.out={tmp_path / 'labels'}"])
    if job == "build-db":
        from ragseg.pipelines.build_db import build_graph

        plan = build_graph(cfg, ds)
    else:
        from ragseg.pipelines.label import build_graph

        plan = build_graph(cfg, ds, Vocab.from_names(["a", "b"]))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    calls: list[str] = []
    seen = []
    for op in _ops(plan):
        name, cls, actor = _stage(op)
        if isinstance(op.compute, ActorPoolStrategy):
            stage = op.fn(**op.fn_constructor_kwargs)  # built (weights loaded) outside the guard
            images = batch["fcclip_input"] if "fcclip_input" in batch else batch["image"]
            assert all(im.dtype == np.uint8 and im.ndim == 3 for im in images)
            if cls == "Segment":
                assert all(p.dtype == np.uint8 and max(p.shape[:2]) == 128 for p in batch["sam_image"])
            if "fcclip_input" in batch:  # FC-CLIP's test size of the 96 px synthetic images
                assert all(p.shape[:2] == (256, 256) for p in batch["fcclip_input"])
            with _no_decoding(calls):
                batch = stage(batch)
        else:
            batch = op.fn(batch, **(op.fn_kwargs or {}))
        seen.append(name)
        assert list(batch["error"]) == ["", ""], (name, list(batch["error"]))
    assert seen == [*want, "select_columns"]
    assert calls == []
    if job == "build-db":
        assert all(len(e) == len(m) > 0 for e, m in zip(batch["embeddings"], batch["seg_masks_rle"]))
    else:
        assert all(p.endswith(".png") for p in batch["png_name"])
    assert not {"image", "sam_image", "fcclip_input"} & set(batch)
