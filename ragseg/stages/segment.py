"""Segment (SAM masks for detector boxes) and SamGrid (class-agnostic SAM proposals): Ray Data callables.

Both output ``seg_masks_rle`` (list[str] COCO RLE json), ``seg_labels`` (list[str]), ``seg_ids``
(list[int], 1..n), ``seg_isthing`` (list[bool]), ``seg_scores`` (list[float]), ``seg_areas`` (list[int])
and ``seg_boxes`` (list of xyxy) (:data:`ragseg.masks.SEG_COLUMNS`); see docs/interfaces.md.
"""

from __future__ import annotations

import logging

import numpy as np

from ragseg.config import JobConfig
from ragseg.errors import error_text
from ragseg.masks import SEG_COLUMNS, encode_rle_stats
from ragseg.stages.batch import as_list, as_rgb, errors_of, object_column

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


class _SamStage:
    stage = STAGE

    def __init__(self, cfg: JobConfig):
        from ragseg.models.sam import load_sam
        from ragseg.runtime import select_device

        self.cfg = cfg
        self.scfg = cfg.models.sam
        self.device = select_device(cfg.models.device)
        self.sam = load_sam(cfg.models).to(self.device)
        self._autocast_encoder()

    def _autocast_encoder(self) -> None:
        """Run only the image encoder (nearly all of SAM's compute) under the configured autocast and
        hand its features on as float32: the prompt encoder / mask decoder stay fp32, so the
        automatic mask generator's numpy conversions never meet bf16 tensors."""
        from ragseg.runtime import autocast

        enc = self.sam.image_encoder
        inner = enc.forward
        device, dcfg = self.device, self.cfg.models.device

        def forward(x):
            with autocast(device, dcfg):
                return inner(x).float()

        enc.forward = forward

    def segment_row(self, batch: dict, i: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image"]) if "image" in batch else len(batch.get("error", []))
        errors = errors_of(batch, n)
        rows = []
        for i in range(n):
            row = _empty_row()
            if not errors[i]:
                try:
                    row = self.segment_row(batch, i)
                except Exception as e:  # noqa: BLE001 - one bad row never stops the batch
                    log.warning("%s failed on a row: %s", self.stage, e)
                    errors[i] = error_text(self.stage, e)
            rows.append(row)
        out = dict(batch)
        for col in SEG_COLUMNS:
            out[col] = object_column([r[col] for r in rows])
        out["error"] = np.array(errors, dtype=object)
        return out


class Segment(_SamStage):
    """SAM masks for each row's detector boxes: one mask per box, in box order."""

    def __init__(self, cfg: JobConfig):
        from segment_anything import SamPredictor

        super().__init__(cfg)
        self.predictor = SamPredictor(self.sam)

    def masks_for_boxes(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HxWx3 uint8 image, (n,4) xyxy pixel boxes -> (n, H, W) bool masks, (n,) predicted IoU."""
        import torch

        h, w = image.shape[:2]
        if len(boxes) == 0:
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        p = self.predictor
        masks_out, ious_out = [], []
        with torch.inference_mode():
            p.set_image(image, image_format="RGB")
            try:
                for s in range(0, len(boxes), self.scfg.boxes_per_batch):
                    b = torch.as_tensor(boxes[s:s + self.scfg.boxes_per_batch], dtype=torch.float32, device=p.device)
                    b = p.transform.apply_boxes_torch(b, (h, w))
                    masks, ious, _ = p.predict_torch(point_coords=None, point_labels=None, boxes=b,
                                                     multimask_output=self.scfg.multimask_output)
                    m = masks.cpu().numpy().astype(bool)
                    q = ious.float().cpu().numpy()
                    if m.shape[1] > 1:
                        m, q = pick_masks(m, q)
                    else:
                        m, q = m[:, 0], q[:, 0]
                    masks_out.append(m)
                    ious_out.append(q)
            finally:
                p.reset_image()
        masks = np.concatenate(masks_out)
        if self.scfg.min_region_area > 0:
            masks = np.stack([clean_mask(m, self.scfg.min_region_area) for m in masks])
        return masks, np.concatenate(ious_out).astype(np.float32)

    def segment_row(self, batch: dict, i: int) -> dict:
        image = as_rgb(batch["image"][i])
        boxes = as_boxes(batch["boxes"][i])
        labels = [str(x) for x in as_list(batch["box_labels"][i])] if "box_labels" in batch else []
        bscores = np.asarray(as_list(batch["box_scores"][i]) if "box_scores" in batch else [], np.float32)
        if len(labels) != len(boxes):
            labels = (labels + [""] * len(boxes))[: len(boxes)]
        if len(bscores) != len(boxes):
            bscores = np.ones(len(boxes), np.float32)
        masks, ious = self.masks_for_boxes(image, boxes)
        scores = np.clip(ious, 0.0, 1.0) * bscores
        # a box whose mask came out empty has nothing to embed: drop it (ids stay contiguous)
        keep = [k for k, m in enumerate(masks) if m.any()]
        return _row([masks[k] for k in keep], [labels[k] for k in keep], [float(scores[k]) for k in keep])


class SamGrid(_SamStage):
    """Class-agnostic SAM proposals from a point grid (SamAutomaticMaskGenerator)."""

    def __init__(self, cfg: JobConfig):
        from segment_anything import SamAutomaticMaskGenerator

        super().__init__(cfg)
        s = self.scfg
        self.generator = SamAutomaticMaskGenerator(
            self.sam,
            points_per_side=s.points_per_side,
            points_per_batch=s.boxes_per_batch,
            pred_iou_thresh=s.pred_iou_thresh,
            stability_score_thresh=s.stability_score_thresh,
            min_mask_region_area=0,  # done below without OpenCV (segment_anything's needs cv2)
            output_mode="binary_mask",
        )

    def proposals(self, image: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
        import torch

        with torch.inference_mode():
            anns = self.generator.generate(image)
        anns = sorted(anns, key=lambda a: -float(a["predicted_iou"]))
        masks = [clean_mask(np.asarray(a["segmentation"], bool), self.scfg.min_region_area) for a in anns]
        keep = [k for k, m in enumerate(masks) if m.any()]
        return [masks[k] for k in keep], [float(anns[k]["predicted_iou"]) for k in keep]

    def segment_row(self, batch: dict, i: int) -> dict:
        masks, scores = self.proposals(as_rgb(batch["image"][i]))
        return _row(masks, [""] * len(masks), scores)
