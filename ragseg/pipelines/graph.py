"""The jobs' stage graphs as data: a graph is a list of :class:`StageSpec` (decode, proposals, embed,
...), which :func:`apply_stages` appends to a Ray Dataset. The actor pools' share of the cluster is
split over the list's actor stages, counted from the list itself (never kept by hand).

:func:`proposal_stages` and :func:`embed_stages` are the pieces build-db, label and the experiments'
cache pass share, so their graphs cannot drift apart. The stage classes are looked up when a graph is
built (benchmarks stand in for the model stages by replacing them in their modules).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from ragseg.config import JobConfig


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (``ray.stages.<name>`` configures an actor stage), the factory of its
    callable, and how it runs: a CPU task (decoding, resizing, merging, writing) or an actor pool
    (a model, loaded once per actor; ``gpu``: it gets the stage's GPU fraction when the cluster has
    GPUs). ``batch_size`` None: ``ray.images_per_block``."""

    name: str
    factory: Callable[[], Callable]
    actor: bool = False
    gpu: bool = False
    batch_size: int | None = None


def task(name: str, factory: Callable[[], Callable], batch_size: int | None = None) -> StageSpec:
    return StageSpec(name, factory, actor=False, batch_size=batch_size)


def model(name: str, factory: Callable[[], Callable], gpu: bool = True, batch_size: int | None = None) -> StageSpec:
    return StageSpec(name, factory, actor=True, gpu=gpu, batch_size=batch_size)


def apply_stages(ds, cfg: JobConfig, specs: list[StageSpec]):
    """``ds`` through every stage of ``specs`` in order (:func:`ragseg.pipelines.common.add_stage`)."""
    from ragseg.pipelines.common import add_stage

    actors = sum(s.actor for s in specs)
    for s in specs:
        ds = add_stage(ds, s.factory, s.name, cfg, actor=s.actor, gpu=s.gpu,
                       batch_size=s.batch_size or cfg.ray.images_per_block, model_stages=max(1, actors))
    return ds


def decode_stages(cfg: JobConfig) -> list[StageSpec]:
    from ragseg.stages.decode import DecodeImages

    return [task("decode", functools.partial(DecodeImages, cfg))]


def sam_prep_stages(cfg: JobConfig) -> list[StageSpec]:
    """SAM's input resize on a CPU task (segment_anything family): the GPU actor gets ready arrays."""
    from ragseg.stages.segment import SamPrep, needs_prep

    return [task("sam_prep", functools.partial(SamPrep, cfg))] if needs_prep(cfg) else []


def proposal_stages(cfg: JobConfig, proposals: str, detect_vocab: list[str] | None = None) -> list[StageSpec]:
    """The stages that make an image's masks: ``gt`` (ground truth, a CPU task), ``gdino-sam``
    (Grounding DINO boxes, prompted with ``detect_vocab`` when given, then SAM), ``sam-grid`` (SAM's
    automatic mask generator)."""
    if proposals == "gt":
        from ragseg.stages.decode import LoadGroundTruth

        return [task("gt", functools.partial(LoadGroundTruth, cfg))]
    from ragseg.stages import segment

    if proposals == "gdino-sam":
        from ragseg.stages.detect import Detect

        detect = functools.partial(Detect, cfg) if detect_vocab is None else \
            functools.partial(Detect, cfg, vocab=detect_vocab)
        return [model("detect", detect, batch_size=cfg.models.gdino.batch_size), *sam_prep_stages(cfg),
                model("segment", functools.partial(segment.Segment, cfg))]
    if proposals == "sam-grid":
        return [*sam_prep_stages(cfg), model("sam_grid", functools.partial(segment.SamGrid, cfg))]
    raise ValueError(f"no proposal stages for {proposals!r}")


def embed_stages(cfg: JobConfig) -> list[StageSpec]:
    """Masked-CLIP features: in ``models.clip.mode: fcclip`` FC-CLIP's test resize first, on a CPU task
    (the GPU actor gets ready arrays; the original pixels are not needed after it), then Embed."""
    from ragseg.stages.embed import Embed

    prep = []
    if cfg.models.clip.mode == "fcclip":
        from ragseg.stages.fcclip import FcclipPrep

        prep = [task("fcclip_prep", functools.partial(FcclipPrep, cfg))]
    return [*prep, model("embed", functools.partial(Embed, cfg))]
