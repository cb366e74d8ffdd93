"""Typed configuration of every ragseg job.

Every job reads one YAML file into a :class:`JobConfig` (``yaml.safe_load`` then pydantic validation)
and applies ``--set a.b=c`` overrides from the CLI. Unknown keys and wrong types are rejected with
the dotted key path and the reason (:class:`ConfigError`). No stage hard-codes a tunable constant:
it reads it from here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ragseg.errors import UserError


class ConfigError(UserError):
    """A config file or override is invalid; the message names the key path and the reason."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ----------------------------------------------------------------------------------------------
# Runtime
# ----------------------------------------------------------------------------------------------
# the pipelines' model stages (Ray actor pools); everything else (decode, gt, sam_prep, merge, write)
# runs as CPU tasks
MODEL_STAGES = ("detect", "segment", "sam_grid", "embed", "fcclip", "classify")


class StageResources(Strict):
    """One model stage's actor pool: ``actors`` (an int: fixed pool; "auto": autoscaling, see
    ``ray.model_actors``), ``gpus`` per actor (a fraction shares a GPU; used when the cluster has GPUs
    and the stage runs on one), ``cpus`` per actor. Unset fields take ``ray.model_actors`` /
    ``ray.gpus_per_actor`` / ``ray.cpus_per_actor``."""

    actors: int | Literal["auto"] | None = None
    gpus: float | None = Field(default=None, ge=0)
    cpus: float | None = Field(default=None, gt=0)

    @field_validator("actors")
    @classmethod
    def _actors(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("actors must be >= 1 or 'auto'")
        return v


class RayConfig(Strict):
    """How Ray is started. ``address`` (or the ``RAY_ADDRESS`` env var) joins a cluster; otherwise a
    local Ray is started with the CPU and object-store caps below."""

    address: str | None = None
    # the address a fresh local instance binds to (with no address / RAY_ADDRESS)
    node_ip_address: str = "127.0.0.1"
    connect_timeout_s: float = Field(default=10.0, gt=0)  # reaching ray.address before giving up
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_memory: int | None = Field(default=None, ge=50 * 1024 * 1024)
    # actors per model stage (each holds one copy of the model); GPUs per actor when CUDA exists.
    # "auto": an autoscaling pool of 1 .. (cluster GPUs / gpus_per_actor, or on a CPU-only cluster
    # cluster CPUs / cpus_per_actor) actors; an int: a fixed pool of that size
    model_actors: int | Literal["auto"] = "auto"
    gpus_per_actor: float = Field(default=1.0, gt=0)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    # images per batch of the decode, gt and per-image stages (a Ray Data block is one read task's
    # pieces, pieces_per_read_task x images_per_shard images; the stages run it in batches of this many)
    images_per_block: int = Field(default=16, ge=1)
    # consecutive pieces of the pending listing per Ray read task: more when that would make over
    # max_read_tasks tasks, fewer when it would make under two per cluster CPU (a small job spreads)
    pieces_per_read_task: int = Field(default=4, ge=1)
    max_read_tasks: int = Field(default=4000, ge=1)
    # read tasks of the listing running at once (they take no CPU slot; each is a worker process)
    read_concurrency: int = Field(default=4, ge=1)
    max_errored_blocks: int = 0
    # the longest Ray Data's scheduling loop on the driver waits for task completions before it looks
    # again (Ray's own value: 0.1 s). Each look costs the driver CPU whatever the work; the tasks of
    # these jobs take seconds, so looking less often costs no throughput (bench/scale.py: 21% less
    # driver CPU at 0.5 s, same segments/s). A new task is dispatched up to this long after a completion
    scheduler_wait_s: float = Field(default=0.5, gt=0, le=5.0)
    # ragseg's progress display and end summary on stderr: a bar on a terminal, else a plain line
    # every progress_interval_s seconds
    progress: bool = True
    progress_interval_s: float = Field(default=60.0, gt=0)
    # per-stage overrides of the three settings above (keys: the model stages' names, see
    # MODEL_STAGES), e.g. {segment: {gpus: 0.5}, detect: {gpus: 0.25, actors: 2}}: light stages take a
    # fraction of a GPU so that one GPU hosts several of them (README: layouts per GPU count)
    stages: dict[str, StageResources] = Field(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: dict[str, StageResources]) -> dict[str, StageResources]:
        bad = sorted(set(v) - set(MODEL_STAGES))
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; model stages are {list(MODEL_STAGES)}")
        return v

    def resources(self, stage: str) -> StageResources:
        """The actors / GPUs / CPUs of one model stage: its ``stages`` entry, else the defaults above."""
        own = self.stages.get(stage) or StageResources()
        return StageResources(actors=self.model_actors if own.actors is None else own.actors,
                              gpus=self.gpus_per_actor if own.gpus is None else own.gpus,
                              cpus=self.cpus_per_actor if own.cpus is None else own.cpus)


class SourceConfig(Strict):
    """Where images (and ground truth) come from. ``uri`` is any fsspec URI (local, s3://, gs://,
    http(s)://)."""

    kind: Literal["folder", "coco_panoptic", "ade20k", "ade20k_panoptic", "openimages", "synthetic"]
    uri: str
    split: str = "train"
    # folder: glob relative to uri
    pattern: str = "**/*"
    # coco_panoptic / ade20k_panoptic: explicit annotation json and png dir (defaults per layout)
    annotations: str | None = None
    masks_dir: str | None = None
    # every kind with ground truth: image folder (defaults per layout)
    images_dir: str | None = None
    # ade20k (semantic): class list (default <root>/objectInfo150.txt, else objectInfo150.csv); optional
    # COCO categories JSON (or list of {"name", "isthing"}) giving isthing per class name (default: the
    # ADE20k panoptic thing/stuff split shipped in ragseg/data for the 150 ADE classes)
    class_list: str | None = None
    categories: str | None = None
    # fsspec storage options for the source's remote locations (uri, images_dir, masks_dir,
    # annotations and the CSVs), e.g. {anon: true} for a public bucket such as s3://open-images-dataset
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # ground truth: keep crowd segments (COCO iscrowd=1) instead of skipping them
    include_crowd: bool = False
    # openimages: explicit CSV locations (defaults: the V7 file names under uri)
    class_descriptions: str | None = None
    image_labels: str | None = None
    boxes: str | None = None
    segmentations: str | None = None
    image_list: str | None = None
    # selection
    limit: int | None = Field(default=None, ge=1)
    shard: str | None = None  # "i/n": keep every image whose position % n == i

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            i, n = (int(p) for p in v.split("/"))
        except ValueError as e:
            raise ValueError(f"shard must look like 'i/n', got {v!r}") from e
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"shard {v!r}: need 0 <= i < n")
        return v


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class WeightsConfig(Strict):
    """Where model files are cached; ``RAGSEG_CACHE`` overrides ``cache_dir``. ``mirror`` (a bucket or
    folder URI filled by ``ragseg weights sync``) is tried before any checkpoint's origin (hub, URL)."""

    cache_dir: str | None = None
    offline: bool = False  # never download from an origin (hub, URL); only the cache, local paths, the mirror
    mirror: str | None = None


class DeviceConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU


class ClipConfig(Strict):
    """open_clip model. ``pretrained`` is an open_clip tag, a local path, an http(s) URL or a bucket
    URI of a checkpoint; null builds the architecture with random weights. ``model_cfg`` registers a
    custom architecture (used for tiny test models)."""

    model: str = "convnext_large_d_320"
    pretrained: str | None = "laion2b_s29b_b131k_ft_soup"
    sha256: str | None = None
    model_cfg: dict[str, Any] | None = None
    # crop: encode_image of each masked crop; pool: area-weighted mask pooling of the dense map at
    # pool_image_size; fcclip: FC-CLIP's pooling at its test input (models.fcclip min/max_size_test,
    # size_divisibility), the keys a label.proposals=fcclip run queries
    mode: Literal["crop", "pool", "fcclip"] = "pool"
    context_pad: float = Field(default=0.1, ge=0.0)  # crop mode: box padding as a ratio of its size
    batch_size: int = Field(default=32, ge=1)
    pool_image_size: int | None = None  # pool mode: image side fed to the dense encoder (None: model's)
    seed: int = 0
    templates: list[str] = Field(
        default_factory=lambda: [
            "a photo of a {}.",
            "a photo of the {}.",
            "a photo of a small {}.",
            "a photo of a large {}.",
            "there is a {} in the scene.",
            "a cropped photo of a {}.",
        ]
    )


SAM2_CHECKPOINTS = {  # SAM 2.1 (sam2 package README, "SAM 2.1 checkpoints")
    "hiera_t": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt",
    "hiera_s": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt",
    "hiera_b+": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt",
    "hiera_l": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt",
}


class Sam2Config(Strict):
    """SAM 2.1 through the ``sam2`` package (``models.sam.family: sam2``). ``arch``: hiera_t / hiera_s /
    hiera_b+ / hiera_l (the package's ``configs/sam2.1/sam2.1_<arch>.yaml``) or ``custom``: the hiera_t
    config with the ``tiny`` sizes below (random weights, tests). ``checkpoint``: path, URL or bucket URI
    of the official ``.pt`` (null: the official SAM 2.1 URL of ``arch``, :data:`SAM2_CHECKPOINTS`; with
    ``custom``, random weights from ``seed``)."""

    arch: Literal["hiera_t", "hiera_s", "hiera_b+", "hiera_l", "custom"] = "hiera_l"
    checkpoint: str | None = None
    sha256: str | None = None
    random_weights: bool = False  # the architecture with random weights from seed, no checkpoint (benchmarks)
    seed: int = 0
    # custom architecture (arch: custom): Hiera trunk and neck sizes, model input side
    image_size: int = Field(default=1024, ge=64)
    embed_dim: int = Field(default=96, ge=1)
    num_heads: int = Field(default=1, ge=1)
    stages: list[int] = Field(default_factory=lambda: [1, 2, 7, 2])
    global_att_blocks: list[int] = Field(default_factory=lambda: [5, 7, 9])
    window_spec: list[int] = Field(default_factory=lambda: [8, 4, 14, 7])
    d_model: int = Field(default=256, ge=16)


class SamConfig(Strict):
    """The mask model. ``family: sam``: segment_anything; ``arch`` vit_h / vit_l / vit_b (official
    sizes) or ``custom`` (sizes below, for tiny tests). ``family: sam2``: SAM 2.1 (``sam2`` below). The
    inference settings after the architecture apply to both."""

    family: Literal["sam", "sam2"] = "sam"
    arch: Literal["vit_h", "vit_l", "vit_b", "custom"] = "vit_h"
    checkpoint: str | None = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    sha256: str | None = None
    # custom architecture
    image_size: int = 1024
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: list[int] = Field(default_factory=lambda: [7, 15, 23, 31])
    prompt_embed_dim: int = 256
    seed: int = 0
    sam2: Sam2Config = Sam2Config()
    # inference. encoder_batch: images per image-encoder forward pass (a batch's images, resized and
    # padded as the model expects, are stacked; prompts are then decoded per image on its slice)
    encoder_batch: int = Field(default=4, ge=1)
    # image-encoder attention (family sam): sdpa = torch's scaled_dot_product_attention with SAM's
    # decomposed relative positions as an additive bias (equal to eager up to float rounding: tested),
    # eager = segment_anything's own; auto = sdpa on CUDA, eager on the CPU
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    compile: bool = False  # torch.compile the image encoder (CUDA; first batches pay the compile)
    boxes_per_batch: int = Field(default=64, ge=1)
    multimask_output: bool = False
    min_region_area: int = Field(default=0, ge=0)  # remove islands/holes smaller than this (pixels)
    # sam-grid proposals (automatic mask generator)
    points_per_side: int = 32
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95


class GroundingDinoConfig(Strict):
    """Grounding DINO through transformers. ``model_id`` is a hub id, local dir, URL or bucket URI of a
    saved model dir; null builds the tiny random architecture in ``tiny``."""

    model_id: str | None = "IDEA-Research/grounding-dino-base"
    revision: str | None = None
    tiny: dict[str, Any] | None = None
    seed: int = 0
    box_threshold: float = Field(default=0.35, ge=0.0, le=1.0)
    text_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    nms_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    max_text_tokens: int = Field(default=256, ge=8)
    max_boxes: int = Field(default=100, ge=1)
    batch_size: int = Field(default=4, ge=1)


class FcclipConfig(Strict):
    """FC-CLIP head (Mask2Former pixel decoder + masked-attention decoder with CLIP class embeddings) on
    the ``models.clip`` trunk. Defaults are the official COCO-panoptic ConvNeXt-Large eval config
    (``fcclip_convnext_large_eval_ade20k.yaml`` and its bases). ``checkpoint``: a ``.safetensors`` file
    (path, URL or bucket; make it from the official ``.pth`` with ``ragseg convert-weights``); null
    builds the head with random weights seeded with ``seed``."""

    checkpoint: str | None = None
    sha256: str | None = None
    seed: int = 0
    num_classes: int = Field(default=133, ge=1)  # trained classes (sizes criterion.empty_weight only)
    conv_dim: int = Field(default=256, ge=32)  # SEM_SEG_HEAD.CONVS_DIM (multiple of 32: GroupNorm(32))
    mask_dim: int = Field(default=256, ge=1)
    hidden_dim: int = Field(default=256, ge=1)
    num_queries: int = Field(default=250, ge=1)
    nheads: int = Field(default=8, ge=1)
    dim_feedforward: int = Field(default=2048, ge=1)
    dec_layers: int = Field(default=10, ge=2)  # MASK_FORMER.DEC_LAYERS: (dec_layers - 1) decoder layers
    enc_layers: int = Field(default=6, ge=1)  # deformable encoder layers of the pixel decoder
    enc_dim_feedforward: int = Field(default=1024, ge=1)
    enc_n_points: int = Field(default=4, ge=1)
    pre_norm: bool = False
    # test-time input (detectron2 INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, MASK_FORMER.SIZE_DIVISIBILITY): the
    # shorter side resized to min_size_test unless the longer passes max_size_test, zero-padded to a
    # multiple of size_divisibility. Also the input rule of models.clip.mode=fcclip database keys.
    min_size_test: int = Field(default=800, ge=32)
    max_size_test: int = Field(default=1333, ge=32)
    size_divisibility: int = Field(default=32, ge=0)
    # test-time path after the network (ragseg.fcclip_inference; FC-CLIP's eval config): a query is
    # dropped when void is the argmax of its ensembled distribution or its score is <=
    # object_mask_threshold (0.0 = FC-CLIP's ADE20k eval; Mask2Former's default is 0.8); Mask2Former's
    # panoptic inference drops a segment whose won / mask pixels < overlap_threshold
    object_mask_threshold: float = Field(default=0.0, ge=0, le=1)
    overlap_threshold: float = Field(default=0.8, ge=0, le=1)
    ensemble_on_valid_mask: bool = False  # FC_CLIP.ENSEMBLE_ON_VALID_MASK (ResNet CLIPs)
    # class names the text classifier embeds: "fcclip" = FC-CLIP's own synonym lists for classes named
    # as in ADE20k-150 / COCO panoptic (ragseg/data/fcclip_*_classes.json), the vocabulary's name and
    # synonyms for the others; "vocab" = the vocabulary's names and synonyms only
    class_names: Literal["fcclip", "vocab"] = "fcclip"
    templates: list[str] | None = None  # prompt templates of the text classifier; null: FC-CLIP's (ViLD)
    batch_size: int = Field(default=2, ge=1)  # images per forward pass (same padded input size)
    mask_chunk: int = Field(default=16, ge=1)  # kept queries resized to image size at a time (memory)

    @field_validator("conv_dim")
    @classmethod
    def _gn(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"conv_dim must be a multiple of 32 (GroupNorm with 32 groups), got {v}")
        return v


class ModelsConfig(Strict):
    weights: WeightsConfig = WeightsConfig()
    device: DeviceConfig = DeviceConfig()
    clip: ClipConfig = ClipConfig()
    sam: SamConfig = SamConfig()
    gdino: GroundingDinoConfig = GroundingDinoConfig()
    fcclip: FcclipConfig = FcclipConfig()


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------
class BuildDbConfig(Strict):
    out: str = "./db"
    masks: Literal["gt", "detector"] = "gt"  # gt: ground-truth masks where the source has them
    images_per_shard: int = Field(default=64, ge=1)  # an input shard = this many source images
    min_segment_area: int = Field(default=64, ge=0)
    include_stuff: bool = True


class IndexConfig(Strict):
    out: str = "./index"
    factory: str | None = None  # explicit faiss factory string overrides the rule below
    budget_bytes_per_vector: int = Field(default=64, ge=8)
    nlist_per_sqrt_n: float = Field(default=4.0, gt=0)  # nlist ~ 2..16 x sqrt(N)
    train_per_list: int = Field(default=64, ge=30)  # training sample ~ 50..256 x nlist
    opq: Literal["auto", "on", "off"] = "auto"
    # bits per PQ sub-quantizer: 4 = twice the sub-quantizers for the same bytes, searched with faiss's
    # SIMD fast-scan once a reader loads the lists (IVF-PQ x4 on disk, IVFPQFastScan in memory); 8 = plain
    pq_bits: Literal[4, 8] = 4
    # PQ codes encode the vector itself (false) or its residual to its list's centroid (true: faiss's
    # IVFPQ default); measured on the index benchmark, residual codes rank the re-rank shortlist worse
    pq_by_residual: bool = False
    # lists probed: "auto" = the smallest power of two (<= max_nprobe) that reaches the targets on the
    # tuning half of the quality queries; an int fixes it
    nprobe: int | Literal["auto"] = "auto"
    max_nprobe: int = Field(default=1024, ge=1)
    target_recall_at_10: float = Field(default=0.9, ge=0.0, le=1.0)  # nprobe tuning target (10-recall@10)
    target_vote_agreement: float = Field(default=0.99, ge=0.0, le=1.0)  # nprobe tuning target (kNN vote)
    # re-rank a k' shortlist with the exact float16 vectors (rerank.npy, memory-mapped, in the version dir)
    rerank: bool = True
    rerank_k: int = Field(default=256, ge=1)  # k' = max(rerank_k, k asked)
    recall_queries: int = Field(default=1000, ge=2)  # DB vectors: half tune nprobe, half measure quality
    # publish gate (measured on the evaluation half): below either, CURRENT stays where it was
    min_recall_at_10: float = Field(default=0.5, ge=0.0, le=1.0)  # 10-recall@10
    min_vote_agreement: float = Field(default=0.9, ge=0.0, le=1.0)
    keep_versions: int = Field(default=3, ge=1)
    prune_grace_s: float = Field(default=600.0, ge=0)  # never prune a version superseded less than this ago
    drift_ratio: float = Field(default=1.5, gt=1.0)  # retrain when new/old quantisation error > this
    use_gpu: Literal["auto", "on", "off"] = "auto"
    seed: int = 0


class EnsembleConfig(Strict):
    alpha: float = Field(default=0.4, ge=0, le=1)
    beta: float = Field(default=0.7, ge=0, le=1)
    gamma: float = Field(default=0.3, ge=0, le=1)
    form: Literal["arithmetic", "geometric"] = "arithmetic"
    trained_classes: list[str] = Field(default_factory=list)
    k: int = Field(default=16, ge=1)  # neighbours retrieved per query
    retrieval_temperature: float = Field(default=0.05, gt=0)
    clip_temperature: float = Field(default=0.01, gt=0)
    # which sources score: both (ensemble), retrieval (s_ret only), clip (s_clip only)
    scores: Literal["ensemble", "retrieval", "clip"] = "ensemble"


class MergeConfig(Strict):
    score_threshold: float = Field(default=0.0, ge=0, le=1)
    overlap_threshold: float = Field(default=0.8, ge=0, le=1)  # keep if visible/mask >= this
    min_area: int = Field(default=0, ge=0)


class LabelConfig(Strict):
    out: str = "./labels"
    images: SourceConfig | None = None
    vocab: str | None = None
    index: str | None = None
    fallback_index: str | None = None
    # fcclip: FC-CLIP masks + in-vocabulary scores + mask-pooled queries from one trunk pass
    proposals: Literal["gdino-sam", "sam-grid", "gt", "fcclip"] = "gdino-sam"
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    ensemble: EnsembleConfig = EnsembleConfig()
    merge: MergeConfig = MergeConfig()
    images_per_shard: int = Field(default=64, ge=1)
    # OUT/panoptic.json, merged from the per-piece parts at the end: always, never, or (auto) when
    # the output holds at most panoptic_json_max_images images (a 10M-image JSON helps nobody)
    panoptic_json: Literal["auto", "always", "never"] = "auto"
    panoptic_json_max_images: int = Field(default=200_000, ge=0)


class CommitConfig(Strict):
    """How a job commits its output pieces (ragseg.ledger): the driver folds the workers' commit
    records into a manifest segment every ``compact_every`` pieces or ``compact_seconds`` seconds;
    at start, past ``max_segments`` segments the smallest ones are merged (down to half the limit). ``lease_ttl_s``: a
    writer's lease on its output folder expires this long after its last renewal."""

    compact_every: int = Field(default=1000, ge=1)
    compact_seconds: float = Field(default=60.0, gt=0)
    max_segments: int = Field(default=64, ge=1)
    lease_ttl_s: float = Field(default=120.0, ge=3)


class DemoConfig(Strict):
    workdir: str = "./demo_out"
    images: int = Field(default=40, ge=4)
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# ragseg experiment (ragseg/experiments): the paper's studies, re-scored from a feature cache
# ----------------------------------------------------------------------------------------------
class ExperimentDataset(Strict):
    """An evaluation set of ``ragseg experiment``: images with COCO-panoptic ground truth (``images``:
    kind ``synthetic``, ``coco_panoptic`` or ``ade20k_panoptic``) and the database(s) under study."""

    name: str
    images: SourceConfig
    gt_json: str | None = None  # default: the source's panoptic JSON
    gt_dir: str | None = None  # default: the source's panoptic PNG folder
    vocab: str | None = None  # default: the categories of gt_json
    db: str | None = None  # feature DB (db-size, coverage and vocab-add derive DBs from it)
    index: str | None = None  # its index (default: built from db into the cache)
    fallback_index: str | None = None  # generic DB for classes the primary lacks (coverage)


class DomainShiftConfig(Strict):
    dataset: str | None = None  # default: the first dataset
    plot: Literal["tsne", "umap"] = "tsne"
    max_points: int = Field(default=1200, ge=10)  # segments in the 2-D embedding plot (x2: full and masked)
    mmd_max_per_class: int = Field(default=300, ge=4)
    min_class_segments: int = Field(default=4, ge=4)  # classes with fewer segments get no MMD
    seed: int = 0


class DbSizeConfig(Strict):
    dataset: str | None = None
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    saturation_pq: float = Field(default=1.0, ge=0)  # saturated: mean PQ within this of the largest DB's


class CoverageConfig(Strict):
    dataset: str | None = None
    fractions: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])


class SweepConfig(Strict):
    """alpha/beta/gamma grid (the paper's 0.4/0.7/0.3 is always added); ``k`` and
    ``retrieval_temperature`` are swept too when given (the label config's values are added)."""

    tune: str | None = None  # dataset A (default: the first)
    apply: str | None = None  # dataset B (default: the second)
    alpha: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    beta: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 1.0])
    gamma: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    k: list[int] = Field(default_factory=list)
    retrieval_temperature: list[float] = Field(default_factory=list)


class VocabAddConfig(Strict):
    """Add N examples of ``class_name`` from ``pool`` (new images with COCO-panoptic ground truth; only
    their ``class_name`` segments are ingested) to a DB that lacks the class, through build-db + refresh."""

    dataset: str | None = None
    class_name: str | None = None  # default: the first thing class of the vocabulary
    counts: list[int] = Field(default_factory=lambda: [1, 5, 25, 100])
    pool: SourceConfig | None = None  # default: the world's pool
    seed: int = 0


class WorldConfig(Strict):
    """The embedded synthetic world (``ragseg.experiments.world``): set A (DB images, a vocab-add pool,
    val images), a generic set G (its Open Images layout is the fallback DB: things only) and a set B
    drawn at another size (the sweep's transfer target, labelled with A's DB)."""

    seed: int = 0
    size: int = Field(default=96, ge=32)
    db_images: int = Field(default=80, ge=4)
    pool_images: int = Field(default=240, ge=0)  # vocab-add's new images (~0.5 segments of a class each)
    val_images: int = Field(default=24, ge=2)
    generic_images: int = Field(default=40, ge=2)
    b_images: int = Field(default=24, ge=2)
    b_size: int = Field(default=128, ge=32)
    b_seed: int = 7


class ExperimentConfig(Strict):
    cache: str = "./ragseg_cache"  # feature cache, derived DBs and indexes (reused across runs)
    k_max: int = Field(default=64, ge=1)  # neighbours cached per proposal and database
    datasets: list[ExperimentDataset] = Field(default_factory=list)
    world: WorldConfig | None = None  # set: generate the embedded synthetic world and use its datasets
    mask_cache_mb: int = Field(default=1024, ge=0)  # decoded masks / gt maps kept in memory while re-scoring
    domain_shift: DomainShiftConfig = DomainShiftConfig()
    db_size: DbSizeConfig = DbSizeConfig()
    coverage: CoverageConfig = CoverageConfig()
    sweep: SweepConfig = SweepConfig()
    vocab_add: VocabAddConfig = VocabAddConfig()


class JobConfig(Strict):
    """The root of every YAML config; each job reads the sections it needs."""

    name: str = "ragseg"
    ray: RayConfig = RayConfig()
    source: SourceConfig | None = None
    models: ModelsConfig = ModelsConfig()
    build_db: BuildDbConfig = BuildDbConfig()
    index: IndexConfig = IndexConfig()
    label: LabelConfig = LabelConfig()
    commit: CommitConfig = CommitConfig()
    demo: DemoConfig = DemoConfig()
    experiment: ExperimentConfig = ExperimentConfig()

    def hash(self, *sections: str) -> str:
        """Stable hash of the given sections (all when none), for manifests."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: _get_path(data, s) for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Loading and overrides
# ----------------------------------------------------------------------------------------------
def _get_path(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def _model_at(path: list[Any]) -> type[BaseModel] | None:
    """The config model class at a dotted path of :class:`JobConfig` (None past a non-model field)."""
    import typing

    model: type[BaseModel] | None = JobConfig
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = None
        for t in (ann, *typing.get_args(ann)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
    return model


def did_you_mean(path: list[Any]) -> str:
    """`` (did you mean a.b.c?)`` for an unknown key whose name is close to a known one, else ""."""
    import difflib

    model = _model_at(path[:-1])
    if model is None or not isinstance(path[-1], str):
        return ""
    close = difflib.get_close_matches(path[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join(str(p) for p in [*path[:-1], close[0]])}?)" if close else ""


def _blame(loc: list[Any], overrides: list[str], origins: list[str]) -> str | None:
    """How the user wrote the override that set ``loc`` (the last one whose key path is ``loc``, inside
    it or around it), None when the config file did."""
    dotted = [str(p) for p in loc]
    for text, origin in reversed(list(zip(overrides, origins))):
        key = text.split("=", 1)[0].strip().split(".")
        n = min(len(key), len(dotted))
        if key[:n] == dotted[:n]:
            return origin
    return None


def _format_validation(err: ValidationError, where: str, overrides: list[str] | None = None,
                       origins: list[str] | None = None) -> str:
    """One line for every problem, each blamed on the ``--set`` (or option) that caused it, else on
    the config file; unknown keys get a "did you mean" when a known key is close."""
    overrides = overrides or []
    origins = origins or [f"--set {t}" for t in overrides]
    by_source: dict[str, list[str]] = {}
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        hint = did_you_mean(list(e["loc"])) if e["type"] == "extra_forbidden" else ""
        msg = f"unknown key{hint}" if e["type"] == "extra_forbidden" else e["msg"]
        source = _blame(list(e["loc"]), overrides, origins) or f"config {where}"
        by_source.setdefault(source, []).append(f"{path}: {msg}")
    return "; ".join(f"invalid {src}: " + "; ".join(lines) for src, lines in by_source.items())


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value); the value is parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` wins; nested mappings are merged key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def yaml_error_line(path: str, err: yaml.YAMLError) -> str:
    """A YAML parser error on one line: ``config FILE:LINE:COLUMN: problem (context)``."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    cmark = getattr(err, "context_mark", None)
    if context and cmark is not None and mark is not None and (cmark.line, cmark.column) != (mark.line, mark.column):
        context = f"{context} at {cmark.line + 1}:{cmark.column + 1}"
    text = f"{problem} ({context})" if context else problem
    return f"config {where}: invalid YAML: {' '.join(str(text).split())}"


def read_yaml_config(path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read one YAML config; ``extends: other.yaml`` (relative to this file) is loaded first and
    this file's keys are merged over it."""
    from ragseg.io import read_text

    if path in _seen:
        raise ConfigError(f"config {path}: circular 'extends' ({' -> '.join(_seen + (path,))})")
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_line(path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    parent = data.pop("extends", None)
    if parent:
        if "://" not in parent and not parent.startswith("/"):
            parent = path.rsplit("/", 1)[0] + "/" + parent if "/" in path else parent
        data = deep_merge(read_yaml_config(parent, _seen + (path,)), data)
    return data


def load_config(path: str | None = None, overrides: list[str] | None = None,
                origins: list[str] | None = None) -> JobConfig:
    """Load a YAML config (any fsspec URI, or None for defaults) and apply ``a.b=c`` overrides;
    ``origins`` says how the user wrote each override (default ``--set a.b=c``), for error lines."""
    where = path or "<defaults>"
    overrides = list(overrides or [])
    origins = list(origins) if origins is not None else [f"--set {t}" for t in overrides]
    data: dict[str, Any] = read_yaml_config(path) if path else {}
    for text, origin in zip(overrides, origins):
        try:
            data = apply_overrides(data, [text])
        except ConfigError as e:
            raise ConfigError(f"{origin}: {str(e).split(': ', 1)[-1]}") from None
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, where, overrides, origins)) from None
