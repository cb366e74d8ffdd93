"""Masked-CLIP features of an image's segments: the per-image core every caller shares.

:class:`MaskedClipEmbedder` loads the CLIP model once and turns (image, (n, H, W) bool masks) rows into
(n, dim) float16 L2-normalised features, in ``models.clip.mode``:

- ``pool``: area-weighted mask pooling over the dense map of a CLIP ConvNeXt at ``pool_image_size``,
  one trunk pass per image (images of one input shape batched together);
- ``fcclip``: FC-CLIP's own pooling at its test input (the keys that ``label.proposals: fcclip``
  queries): each binary mask as a probability map through the operator that pools FC-CLIP's queries;
- ``crop``: ``encode_image`` on each masked, padded crop.

The Ray Data stage :class:`ragseg.stages.embed.Embed` wraps it with the row contract; ``ragseg search``
(:mod:`ragseg.index.search`) embeds its one query region with it, and
the experiments' box-crop features call :meth:`MaskedClipEmbedder.embed_rows`. The maths lives in
:mod:`ragseg.models.clip` and :mod:`ragseg.fcclip_inference`.
"""

from __future__ import annotations

import numpy as np

from ragseg.config import JobConfig
from ragseg.errors import UserError


def decode_masks(rles: list, hw: tuple[int, int]) -> np.ndarray:
    """A row's RLE strings -> (n, H, W) bool; every mask must have the image's size and be non-empty."""
    from ragseg.masks import decode_rle

    h, w = hw
    out = np.zeros((len(rles), h, w), bool)
    for i, r in enumerate(rles):
        m = decode_rle(r)
        if m.shape != (h, w):
            raise ValueError(f"mask {i} has size {m.shape[0]}x{m.shape[1]}, image is {h}x{w}")
        if not m.any():
            raise ValueError(f"mask {i} of {len(rles)} is empty")
        out[i] = m
    return out


class MaskedClipEmbedder:
    """``models.clip`` loaded once (or the given ``bundle``); :meth:`embed_rows` per batch of images."""

    def __init__(self, cfg: JobConfig, bundle=None):
        from ragseg.models.clip import has_dense_trunk, load_clip

        self.cfg = cfg
        self.ccfg = cfg.models.clip
        self.mode = self.ccfg.mode
        self.bundle = bundle or load_clip(cfg.models)
        self.dim = self.bundle.dim
        self.model_id = self.bundle.model_id
        self.device = self.bundle.device
        if self.mode in ("pool", "fcclip") and not has_dense_trunk(self.bundle.visual):
            raise UserError(
                f"models.clip.mode={self.mode} needs a CLIP with a dense convolutional trunk (open_clip timm "
                f"ConvNeXt, e.g. convnext_large_d_320); {self.model_id} has none (ViT?). "
                f"Set models.clip.mode=crop for this model"
            )

    def embed_rows(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """(image, (n, H, W) bool masks) per row -> (n, dim) float16 L2-normalised per row."""
        import torch

        from ragseg.runtime import autocast

        with torch.inference_mode(), autocast(self.device, self.cfg.models.device):
            feats = {"pool": self._pool, "crop": self._crop, "fcclip": self._fcclip}[self.mode](rows)
        outs = []
        for f in feats:
            f = torch.nn.functional.normalize(f.float(), dim=-1)
            outs.append(f.cpu().numpy().astype(np.float16))
        return outs

    def _crop(self, rows):
        import torch

        from ragseg.models.clip import crop_batch, image_tensor, mask_boxes

        b, bs = self.bundle, self.ccfg.batch_size
        work = []  # (row, image tensor, mask tensor, box) in order
        tensors = []
        for r, (img, masks) in enumerate(rows):
            x = image_tensor(img, b)
            m = torch.from_numpy(masks).to(self.device)
            tensors.append((x, m))
            for j, box in enumerate(mask_boxes(masks)):
                work.append((r, j, box))
        feats: list[list] = [[] for _ in rows]
        for s in range(0, len(work), bs):
            chunk = work[s:s + bs]
            inputs = torch.cat([
                crop_batch(tensors[r][0], tensors[r][1][j:j + 1], box[None], self.ccfg.context_pad,
                           b.image_size, b.interpolation)
                for r, j, box in chunk
            ])
            emb = b.model.encode_image(inputs).float()
            for (r, _, _), e in zip(chunk, emb, strict=True):
                feats[r].append(e)
        return [torch.stack(f) for f in feats]

    def _pool(self, rows):
        import torch

        from ragseg.models.clip import (
            dense_features,
            image_tensor,
            mask_cell_weights,
            mask_pool,
            pool_input_shape,
            pooled_to_embedding,
            resize,
            trunk_stride,
        )

        b, bs = self.bundle, self.ccfg.batch_size
        visual = b.visual
        side = self.ccfg.pool_image_size or max(b.image_size)
        stride = trunk_stride(visual)
        shapes = [pool_input_shape(img.shape[:2], side, stride) for img, _ in rows]
        dense: list = [None] * len(rows)
        # one trunk pass per image, images of the same input shape batched together
        by_shape: dict[tuple[int, int], list[int]] = {}
        for r, s in enumerate(shapes):
            by_shape.setdefault(s, []).append(r)
        for shape, idx in by_shape.items():
            for s in range(0, len(idx), bs):
                part = idx[s:s + bs]
                x = torch.stack([resize(image_tensor(rows[r][0], b)[None], shape, b.interpolation)[0]
                                 for r in part])
                d = dense_features(visual, x).float()
                for r, dr in zip(part, d, strict=True):
                    dense[r] = dr
        out = []
        for r, (_, masks) in enumerate(rows):
            grid = tuple(dense[r].shape[-2:])
            pooled = []
            for s in range(0, len(masks), bs):
                m = torch.from_numpy(masks[s:s + bs]).to(self.device)
                pooled.append(mask_pool(dense[r], mask_cell_weights(m, grid)))
            pooled = torch.cat(pooled)
            out.append(torch.cat([pooled_to_embedding(visual, pooled[s:s + bs]).float()
                                  for s in range(0, len(pooled), bs)]))
        return out

    def _fcclip(self, rows):
        """FC-CLIP's pooling of database keys (``ragseg.fcclip_inference``): the image at FC-CLIP's test
        input (``models.fcclip`` sizes), each binary mask as a probability map through the operator that
        pools FC-CLIP's queries (:func:`~ragseg.fcclip_inference.binary_mask_logits`,
        :func:`~ragseg.fcclip_inference.key_pooling`), the model's head; pooling and head in float32."""
        import torch

        from ragseg.fcclip_inference import binary_mask_logits, key_pooling, network_input
        from ragseg.models.clip import dense_features, pooled_to_embedding
        from ragseg.models.fcclip import test_geometry

        b, bs = self.bundle, self.ccfg.batch_size
        geo = test_geometry(self.cfg.models.fcclip)
        # an image already at FC-CLIP's test size (FcclipPrep) is checked against its masks' size
        inputs = [network_input(img, geo, b.mean, b.std, self.device,
                                None if img.shape[:2] == masks.shape[1:] else masks.shape[1:])
                  for img, masks in rows]
        dense: list = [None] * len(rows)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for r, (x, _) in enumerate(inputs):
            by_shape.setdefault(tuple(x.shape[-2:]), []).append(r)
        for idx in by_shape.values():
            for s in range(0, len(idx), bs):
                part = idx[s:s + bs]
                d = dense_features(b.visual, torch.stack([inputs[r][0] for r in part])).float()
                for r, dr in zip(part, d, strict=True):
                    dense[r] = dr
        out = []
        with torch.autocast(device_type=torch.device(self.device).type, enabled=False):
            for r, (_, masks) in enumerate(rows):
                x, size = inputs[r]
                padded = tuple(x.shape[-2:])
                feats = []
                for s in range(0, len(masks), bs):
                    m = torch.from_numpy(masks[s:s + bs]).to(self.device)
                    pooled = key_pooling(dense[r], binary_mask_logits(m, size, padded))
                    feats.append(pooled_to_embedding(b.visual, pooled).float())
                out.append(torch.cat(feats))
        return out
