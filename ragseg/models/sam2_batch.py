"""Batched SAM 2.1 through the ``sam2`` package (``models.sam.family: sam2``): many images through the
Hiera image encoder in one forward pass, then box prompts per image on its slice of the embeddings.
Importing this module imports ``sam2`` (and with it hydra, which the package initialises)."""

from __future__ import annotations

import numpy as np
from sam2.sam2_image_predictor import SAM2ImagePredictor

from ragseg.config import ModelsConfig
from ragseg.models.sam import chunks, load_sam2, stack_box_masks, wrap_encoder


class Sam2Batch:
    """SAM 2.1 over a batch of images, the steps of ``SAM2ImagePredictor.set_image_batch`` (to tensor,
    resize to the square model input, normalise: the package's own transform modules, here on the
    model's device; backbone; ``no_mem_embed``) ``encoder_batch`` images per forward pass; then per
    image the steps of ``SAM2ImagePredictor.predict`` (box transform, prompt encoder, mask decoder with
    the image's high-resolution features, postprocess to the image size) on its slice."""

    family = "sam2"

    def __init__(self, models_cfg: ModelsConfig, device: str):
        self.cfg = models_cfg.sam
        self.device = device
        self.sam = load_sam2(models_cfg).to(device)
        self.image_size = int(self.sam.image_size)
        self.attention = "sdpa"  # Hiera and the SAM 2 decoder call scaled_dot_product_attention already
        wrap_encoder(self.sam.image_encoder, device, models_cfg.device, self.cfg.compile)
        self.predictor = StagedSam2Predictor(self.sam)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image)  # the resize runs on the model's device (a tensor op)

    def input_ok(self, image: np.ndarray, prepared) -> bool:
        return False

    def encode(self, prepared: list[np.ndarray], hws: list[tuple[int, int]]) -> list[dict]:
        import torch

        m, tf = self.sam, self.predictor._transforms
        out = []
        with torch.inference_mode():
            for a, b in chunks(len(prepared), self.cfg.encoder_batch):
                x = torch.stack([tf.transforms(torch.as_tensor(p, device=self.device).permute(2, 0, 1)
                                               .float().div(255)) for p in prepared[a:b]])
                backbone_out = m.forward_image(x)
                _, vision_feats, _, feat_sizes = m._prepare_backbone_features(backbone_out)
                if m.directly_add_no_mem_embed:
                    vision_feats[-1] = vision_feats[-1] + m.no_mem_embed
                feats = [f.permute(1, 2, 0).reshape(b - a, -1, *s)
                         for f, s in zip(vision_feats[::-1], feat_sizes[::-1])][::-1]
                for j in range(b - a):
                    out.append({"image_embed": feats[-1][j:j + 1], "high_res_feats": [f[j:j + 1] for f in feats[:-1]],
                                "hw": tuple(int(v) for v in hws[a + j])})
        return out

    def predict_boxes(self, state: dict, boxes: np.ndarray, multimask: bool, chunk: int,
                      return_logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
        import torch

        p = self.predictor
        p.set_features(state)
        h, w = state["hw"]
        masks_out, ious_out = [], []
        try:
            with torch.inference_mode():
                for a, b in chunks(len(boxes), chunk):
                    t = torch.as_tensor(boxes[a:b], dtype=torch.float32, device=self.device)
                    t = p._transforms.transform_boxes(t, normalize=True, orig_hw=(h, w))
                    m, q, _ = p._predict(None, None, t, None, multimask, return_logits=return_logits)
                    masks_out.append(m.float().cpu().numpy() if return_logits else m.cpu().numpy())
                    ious_out.append(q.float().cpu().numpy())
        finally:
            p.reset_predictor()
        return stack_box_masks(masks_out, ious_out, multimask, (h, w), return_logits)


class StagedSam2Predictor(SAM2ImagePredictor):
    """``SAM2ImagePredictor`` with ``set_features`` (one image's state from :meth:`Sam2Batch.encode`:
    what ``set_image`` leaves) and a staged embedding for the next ``set_image`` of an image of that size
    (``SAM2AutomaticMaskGenerator`` calls it), as ``sam_batch.StagedSamPredictor``. The backbone feature
    sizes follow the model's input size (the package assumes 1024)."""

    def __init__(self, model):
        super().__init__(model)
        s = int(model.image_size)
        self._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        self.staged = None

    def set_features(self, state: dict) -> None:
        self.reset_predictor()
        self._features = {"image_embed": state["image_embed"], "high_res_feats": state["high_res_feats"]}
        self._orig_hw = [tuple(state["hw"])]
        self._is_image_set = True

    def stage(self, state) -> None:
        self.staged = state

    def set_image(self, image) -> None:
        staged, self.staged = self.staged, None
        if staged is not None and tuple(np.asarray(image).shape[:2]) == tuple(staged["hw"]):
            self.set_features(staged)
            return
        super().set_image(image)

