"""Segment (SAM masks for detector boxes) and SamGrid (class-agnostic SAM proposals): Ray Data callables.

Both output ``seg_masks_rle`` (list[str] COCO RLE json), ``seg_labels`` (list[str]), ``seg_ids``
(list[int], 1..n), ``seg_isthing`` (list[bool]), ``seg_scores`` (list[float]), ``seg_areas`` (list[int])
and ``seg_boxes`` (list of xyxy) (:data:`ragseg.masks.SEG_COLUMNS`); see docs/interfaces.md.
"""

from __future__ import annotations

import logging

import numpy as np

from ragseg.config import JobConfig
from ragseg.masks import SEG_COLUMNS, encode_rle_stats
from ragseg.stages.batch import as_list, as_rgb, map_rows, object_column

log = logging.getLogger(__name__)

STAGE = "segment"


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a 2-D bool mask -> (labels HxW int32, 0 = background, 1..k; areas (k+1,)
    with areas[0] = background pixels). Pure numpy + a union-find over row runs (no OpenCV needed)."""
    m = np.asarray(mask, bool)
    h, w = m.shape
    labels = np.zeros((h, w), np.int32)
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = m
    d = np.diff(padded, axis=1)
    rs, xs = np.nonzero(d == 1)
    _, xe = np.nonzero(d == -1)  # same row order as the starts
    n = len(rs)
    if n == 0:
        return labels, np.array([h * w], np.int64)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_start = np.searchsorted(rs, np.arange(h + 1))
    for y in range(1, h):
        a0, a1 = row_start[y - 1], row_start[y]  # runs of the previous row
        b0, b1 = row_start[y], row_start[y + 1]
        i, j = a0, b0
        while i < a1 and j < b1:
            # 8-connectivity: [xs, xe) runs touch if they overlap or meet diagonally
            if xs[i] <= xe[j] and xs[j] <= xe[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if xe[i] < xe[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(k) for k in range(n)])
    uniq, comp = np.unique(roots, return_inverse=True)
    comp = comp.astype(np.int32) + 1
    lengths = (xe - xs).astype(np.int64)
    areas = np.zeros(len(uniq) + 1, np.int64)
    np.add.at(areas, comp, lengths)
    areas[0] = h * w - lengths.sum()
    for k in range(n):
        labels[rs[k], xs[k]:xe[k]] = comp[k]
    return labels, areas


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """segment_anything's ``remove_small_regions`` (same rules: fill holes / drop islands smaller than
    ``area_thresh``, keep the largest island when all are small) without its OpenCV dependency."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working = np.logical_xor(correct_holes, np.asarray(mask, bool))
    regions, areas = connected_components(working)
    sizes = areas[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return np.asarray(mask, bool), False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(len(areas)) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def clean_mask(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill holes and remove islands smaller than ``min_area`` pixels (no-op when 0)."""
    if min_area <= 0:
        return mask
    mask, _ = remove_small_regions(mask, min_area, mode="holes")
    mask, _ = remove_small_regions(mask, min_area, mode="islands")
    return mask


def pick_masks(masks: np.ndarray, ious: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, m, H, W) masks and (k, m) predicted IoUs -> the best-IoU mask of each box: (k, H, W), (k,)."""
    best = np.argmax(ious, axis=1)
    k = np.arange(masks.shape[0])
    return masks[k, best], ious[k, best]


def as_boxes(value) -> np.ndarray:
    """A per-row boxes cell ((n,4) array, list of 4-lists, flat array, None) -> (n, 4) float32."""
    if value is None:
        return np.zeros((0, 4), np.float32)
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = [np.asarray(v, dtype=np.float32) for v in value]
        if not value:
            return np.zeros((0, 4), np.float32)
    return np.asarray(value, dtype=np.float32).reshape(-1, 4)


def _empty_row() -> dict:
    return {k: [] for k in SEG_COLUMNS}


def _row(masks: list[np.ndarray], labels: list[str], scores: list[float]) -> dict:
    stats = [encode_rle_stats(m) for m in masks]
    return {
        "seg_masks_rle": [s[0] for s in stats],
        "seg_labels": [str(x) for x in labels],
        "seg_ids": list(range(1, len(masks) + 1)),
        "seg_isthing": [True] * len(masks),
        "seg_scores": [float(s) for s in scores],
        "seg_areas": [s[1] for s in stats],
        "seg_boxes": [s[2] for s in stats],
    }


SAM_INPUT = "sam_image"  # column: the mask model's input of an image, resized on a CPU task (SamPrep)


def needs_prep(cfg: JobConfig) -> bool:
    """Whether the mask model's input is resized on the CPU before its stage: segment_anything's
    ``ResizeLongestSide`` is a PIL resize of the uint8 image (host work, kept off the GPU actor); SAM
    2.1 resizes its float tensor on the model's device."""
    return cfg.models.sam.family == "sam"


class SamPrep:
    """CPU task before Segment / SamGrid (``family: sam``): adds ``sam_image``, each image resized to
    the encoder's input side exactly as ``SamPredictor.set_image`` would (uint8, longer side =
    ``image_size``), so the GPU actor receives ready arrays. Errored rows get an empty array."""

    stage = "sam_prep"

    def __init__(self, cfg: JobConfig):
        from ragseg.models.sam import arch_sizes

        self.size = int(arch_sizes(cfg.models.sam)["image_size"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ragseg.models.sam import resize_longest

        out, errors = map_rows(batch, STAGE, lambda i: resize_longest(as_rgb(batch["image"][i]), self.size),
                               empty=lambda: np.zeros((0, 0, 3), np.uint8))
        res = dict(batch)
        res[SAM_INPUT] = object_column(out)
        res["error"] = np.array(errors, dtype=object)
        return res


class _SamStage:
    """Shared by Segment and SamGrid: the mask model (``models.sam.family``: segment_anything SAM or SAM
    2.1, :func:`ragseg.models.mask_model.load_mask_model`), the batch's images encoded together
    (``encoder_batch`` per forward pass), then each image's prompts on its slice."""

    stage = STAGE

    def __init__(self, cfg: JobConfig):
        from ragseg.models.mask_model import load_mask_model
        from ragseg.runtime import select_device

        self.cfg = cfg
        self.scfg = cfg.models.sam
        self.device = select_device(cfg.models.device)
        self.model = load_mask_model(cfg.models, self.device)
        self.sam = self.model.sam

    def model_input(self, batch: dict, i: int, image: np.ndarray) -> np.ndarray:
        """The CPU task's resized input when it is there and right, else resized here."""
        col = batch.get(SAM_INPUT)
        if col is not None and self.model.input_ok(image, col[i]):
            return np.asarray(col[i])
        return self.model.prepare(image)

    def encode(self, rows: list[dict]) -> list:
        """Every row's image through the image encoder, ``encoder_batch`` images a pass."""
        return self.model.encode([r["input"] for r in rows], [r["image"].shape[:2] for r in rows])

    def prepare_row(self, batch: dict, i: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_rows(self, rows: list[dict]) -> list[dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, errors = map_rows(batch, self.stage, lambda i: self.prepare_row(batch, i), self.run_rows, _empty_row, log)
        out = {k: v for k, v in batch.items() if k != SAM_INPUT}  # the resized copy goes no further
        for col in SEG_COLUMNS:
            out[col] = object_column([r[col] for r in rows])
        out["error"] = np.array(errors, dtype=object)
        return out


class Segment(_SamStage):
    """SAM masks for each row's detector boxes: one mask per box, in box order."""

    def best_masks(self, masks: np.ndarray, ious: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, C, H, W), (n, C) -> the best-IoU mask of each box (C = 3 with multimask), cleaned."""
        if masks.shape[1] > 1:
            masks, ious = pick_masks(masks, ious)
        else:
            masks, ious = masks[:, 0], ious[:, 0]
        if self.scfg.min_region_area > 0 and len(masks):
            masks = np.stack([clean_mask(m, self.scfg.min_region_area) for m in masks])
        return masks, ious.astype(np.float32)

    def masks_for_boxes(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image alone: HxWx3 uint8 image, (n,4) xyxy pixel boxes -> (n, H, W) bool masks, (n,)
        predicted IoU (the per-image path: one encoder pass for this image)."""
        h, w = image.shape[:2]
        if len(boxes) == 0:
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        state = self.model.encode([self.model.prepare(image)], [(h, w)])[0]
        return self.best_masks(*self.model.predict_boxes(state, boxes, self.scfg.multimask_output,
                                                         self.scfg.boxes_per_batch))

    def prepare_row(self, batch: dict, i: int) -> dict:
        image = as_rgb(batch["image"][i])
        boxes = as_boxes(batch["boxes"][i])
        labels = [str(x) for x in as_list(batch["box_labels"][i])] if "box_labels" in batch else []
        bscores = np.asarray(as_list(batch["box_scores"][i]) if "box_scores" in batch else [], np.float32)
        if len(labels) != len(boxes):
            labels = (labels + [""] * len(boxes))[: len(boxes)]
        if len(bscores) != len(boxes):
            bscores = np.ones(len(boxes), np.float32)
        row = {"image": image, "boxes": boxes, "labels": labels, "bscores": bscores}
        if len(boxes):
            row["input"] = self.model_input(batch, i, image)
        return row

    def run_rows(self, rows: list[dict]) -> list[dict]:
        todo = [r for r in rows if len(r["boxes"])]  # an image without boxes needs no embedding
        states = dict(zip(map(id, todo), self.encode(todo)))
        out = []
        for r in rows:
            if not len(r["boxes"]):
                out.append(_empty_row())
                continue
            masks, ious = self.best_masks(*self.model.predict_boxes(
                states[id(r)], r["boxes"], self.scfg.multimask_output, self.scfg.boxes_per_batch))
            scores = np.clip(ious, 0.0, 1.0) * r["bscores"]
            # a box whose mask came out empty has nothing to embed: drop it (ids stay contiguous)
            keep = [k for k, m in enumerate(masks) if m.any()]
            out.append(_row([masks[k] for k in keep], [r["labels"][k] for k in keep],
                            [float(scores[k]) for k in keep]))
        return out


class SamGrid(_SamStage):
    """Class-agnostic SAM proposals from a point grid (the family's automatic mask generator), the
    batch's images encoded together first."""

    def __init__(self, cfg: JobConfig):
        super().__init__(cfg)
        s = self.scfg
        kw = dict(points_per_side=s.points_per_side, points_per_batch=s.boxes_per_batch,
                  pred_iou_thresh=s.pred_iou_thresh, stability_score_thresh=s.stability_score_thresh,
                  min_mask_region_area=0,  # done below without OpenCV (the generators' needs cv2)
                  output_mode="binary_mask")
        if s.family == "sam2":
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

            self.generator = SAM2AutomaticMaskGenerator(self.sam, **kw)
        else:
            from segment_anything import SamAutomaticMaskGenerator

            self.generator = SamAutomaticMaskGenerator(self.sam, **kw)
        self.generator.predictor = self.model.predictor  # takes the embeddings staged per image

    def proposals(self, image: np.ndarray, state=None) -> tuple[list[np.ndarray], list[float]]:
        """One image's proposals (its embedding ``state`` from the batch pass, else encoded here)."""
        import torch

        if state is not None:
            self.model.predictor.stage(state)
        try:
            with torch.inference_mode():
                anns = self.generator.generate(image)
        finally:
            self.model.predictor.stage(None)
        anns = sorted(anns, key=lambda a: -float(a["predicted_iou"]))
        masks = [clean_mask(np.asarray(a["segmentation"], bool), self.scfg.min_region_area) for a in anns]
        keep = [k for k, m in enumerate(masks) if m.any()]
        return [masks[k] for k in keep], [float(anns[k]["predicted_iou"]) for k in keep]

    def prepare_row(self, batch: dict, i: int) -> dict:
        image = as_rgb(batch["image"][i])
        return {"image": image, "input": self.model_input(batch, i, image)}

    def run_rows(self, rows: list[dict]) -> list[dict]:
        out = []
        for r, state in zip(rows, self.encode(rows), strict=True):
            masks, scores = self.proposals(r["image"], state)
            out.append(_row(masks, [""] * len(masks), scores))
        return out
