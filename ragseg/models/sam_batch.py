"""Batched segment_anything SAM (``models.sam.family: sam``): many images through the image encoder
in one forward pass, then prompts per image on its slice of the embeddings."""

from __future__ import annotations

import numpy as np
from segment_anything import SamPredictor

from ragseg.config import ModelsConfig
from ragseg.models.sam import (
    attention_kind,
    chunks,
    load_sam,
    resize_longest,
    sam_input_shape,
    stack_box_masks,
    use_sdpa,
    wrap_encoder,
)


class SamBatch:
    """segment_anything SAM over a batch of images: ``encode`` stacks the images (resized with
    :func:`resize_longest`, normalised and padded by ``Sam.preprocess``, exactly as ``SamPredictor``
    does per image) through the image encoder ``encoder_batch`` at a time; ``predict_boxes`` runs the
    prompt encoder and mask decoder on one image's slice (``SamPredictor.predict_torch`` on that
    image's features)."""

    family = "sam"

    def __init__(self, models_cfg: ModelsConfig, device: str):
        self.cfg = models_cfg.sam
        self.device = device
        self.sam = load_sam(models_cfg).to(device)
        self.image_size = int(self.sam.image_encoder.img_size)
        self.attention = attention_kind(self.cfg, device)
        if self.attention == "sdpa":
            use_sdpa(self.sam.image_encoder)
        wrap_encoder(self.sam.image_encoder, device, models_cfg.device, self.cfg.compile)
        self.predictor = StagedSamPredictor(self.sam)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The model input of one image (resized uint8, longer side = the encoder's input size)."""
        return resize_longest(image, self.image_size)

    def input_ok(self, image: np.ndarray, prepared) -> bool:
        """Whether ``prepared`` (a CPU task's ``sam_image``) is this model's input for ``image``."""
        p = np.asarray(prepared) if prepared is not None else None
        return (p is not None and p.dtype == np.uint8 and p.ndim == 3
                and tuple(p.shape[:2]) == sam_input_shape(image.shape[:2], self.image_size))

    def encode(self, prepared: list[np.ndarray], hws: list[tuple[int, int]]) -> list[tuple]:
        """Resized uint8 inputs and the original (H, W) -> per image (features (1, C, h, w), input size,
        original size), ``encoder_batch`` images per forward pass."""
        import torch

        out = []
        with torch.inference_mode():
            for a, b in chunks(len(prepared), self.cfg.encoder_batch):
                xs, sizes = [], []
                for p in prepared[a:b]:
                    t = torch.as_tensor(p, device=self.device).permute(2, 0, 1).contiguous()[None]
                    sizes.append(tuple(t.shape[-2:]))
                    xs.append(self.sam.preprocess(t))
                feats = self.sam.image_encoder(torch.cat(xs))
                for j in range(b - a):
                    out.append((feats[j:j + 1], sizes[j], tuple(int(v) for v in hws[a + j])))
        return out

    def predict_boxes(self, state: tuple, boxes: np.ndarray, multimask: bool, chunk: int,
                      return_logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(n, 4) xyxy pixel boxes on one encoded image -> (n, H, W) masks (bool, or float32 logits),
        (n, C) predicted IoUs (C = 3 with ``multimask``, else 1)."""
        import torch

        p = self.predictor
        p.set_features(*state)
        h, w = state[2]
        masks_out, ious_out = [], []
        try:
            with torch.inference_mode():
                for a, b in chunks(len(boxes), chunk):
                    t = torch.as_tensor(boxes[a:b], dtype=torch.float32, device=self.device)
                    t = p.transform.apply_boxes_torch(t, (h, w))
                    m, q, _ = p.predict_torch(point_coords=None, point_labels=None, boxes=t,
                                              multimask_output=multimask, return_logits=return_logits)
                    masks_out.append(m.float().cpu().numpy() if return_logits else m.cpu().numpy())
                    ious_out.append(q.float().cpu().numpy())
        finally:
            p.reset_image()
        return stack_box_masks(masks_out, ious_out, multimask, (h, w), return_logits)


class StagedSamPredictor(SamPredictor):
    """A ``SamPredictor`` that can be handed an image's precomputed embedding (``set_features``), and
    whose next ``set_image`` of an image of the staged size uses the staged embedding instead of running
    the encoder again (so ``SamAutomaticMaskGenerator``, which calls ``set_image`` itself, works on
    embeddings computed for a whole batch at once)."""

    def __init__(self, model):
        super().__init__(model)
        self.staged = None

    def set_features(self, features, input_size, original_size) -> None:
        """The state ``SamPredictor.set_torch_image`` leaves, from an embedding made elsewhere."""
        self.reset_image()
        self.features = features
        self.input_size = tuple(input_size)
        self.original_size = tuple(original_size)
        self.is_image_set = True

    def stage(self, state) -> None:
        self.staged = state

    def set_image(self, image, image_format: str = "RGB") -> None:
        staged, self.staged = self.staged, None
        if staged is not None and tuple(image.shape[:2]) == tuple(staged[2]):
            self.set_features(*staged)
            return
        super().set_image(image, image_format)

