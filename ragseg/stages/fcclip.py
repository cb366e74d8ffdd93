"""FcclipProposals: FC-CLIP mask proposals, in-vocabulary logits and mask-pooled queries from one trunk
pass per image (Ray Data callable; replaces proposals + Embed in ``label.proposals: fcclip``).

In: ``image`` (HxWx3 uint8), ``error``. Out, per image, n kept proposals:

- ``seg_masks_rle`` (list[str] COCO RLE), ``seg_labels`` ("" each: class-agnostic), ``seg_ids`` (1..n),
  ``seg_isthing`` (True: unknown until classified), ``seg_scores`` (the in-vocabulary class probability
  of the query, void included in the softmax);
- ``seg_iv_logits`` ((n, C) float32): FC-CLIP's class logits over the vocabulary (void column removed),
  so Classify's ``softmax`` gives FC-CLIP's s_iv;
- ``embeddings`` ((n, dim) float16, L2-normalised): the query feature of each proposal mask, computed
  exactly like :class:`ragseg.stages.embed.Embed` in ``pool`` mode on the same trunk pass (same input
  size ``pool_input_shape(hw, models.clip.pool_image_size)``, same ``mask_cell_weights`` / ``mask_pool`` /
  ``pooled_to_embedding``), so queries live in the database's key space.

Post-processing (FC-CLIP's ``panoptic_inference`` up to the merge): a query is dropped when void is the
argmax of its in-vocabulary softmax over C + 1 columns or its best class probability is <=
``models.fcclip.object_mask_threshold``; the ``models.fcclip.topk`` best remain; masks are upsampled
(bilinear) from stride 4 to the model input and then to the image, and a proposal is its logit >= 0
(sigmoid >= 0.5); empty masks are dropped. Classify then fuses s_iv with s_clip and s_ret, and the
panoptic merge (``label.merge``: overlap 0.8 = FC-CLIP's) paints the proposals.
"""

from __future__ import annotations

import logging

import numpy as np

from ragseg.config import JobConfig
from ragseg.errors import error_text
from ragseg.stages.batch import run_batched

log = logging.getLogger(__name__)

STAGE = "fcclip"
OUT_COLUMNS = ("seg_masks_rle", "seg_labels", "seg_ids", "seg_isthing", "seg_scores", "seg_iv_logits",
               "embeddings")


def label_config(cfg: JobConfig) -> JobConfig:
    """The label config FC-CLIP proposals run with: an empty ``label.ensemble.trained_classes`` becomes
    FC-CLIP's COCO panoptic class names and synonyms (``ragseg/data/fcclip_coco_panoptic_classes.json``)."""
    from ragseg.models.fcclip import trained_class_names

    if cfg.label.ensemble.trained_classes:
        return cfg
    ens = cfg.label.ensemble.model_copy(update={"trained_classes": trained_class_names()})
    return cfg.model_copy(update={"label": cfg.label.model_copy(update={"ensemble": ens})})


def check_index_identity(cfg: JobConfig, meta: dict, index_uri: str) -> None:
    """FC-CLIP queries are ``pool`` features of ``models.clip`` at ``pool_image_size``: refuse (one line)
    an index whose keys came from another trunk, weights, mode, dimension or pooling input size
    (:func:`ragseg.identity.check`; the identity fields FC-CLIP's pooling adds go there)."""
    from ragseg import identity

    identity.check(identity.index_identity(meta), identity.embed_identity(cfg, mode="pool"), f"index {index_uri}",
                   context=" (label.proposals=fcclip queries are the FC-CLIP trunk's mask-pooled features, "
                           "mode=pool)",
                   fix="build the database with models.clip = the FC-CLIP trunk, mode pool and the same "
                       "pool_image_size")


class FcclipProposals:
    """Ray Data callable: loads CLIP + FC-CLIP and the vocabulary's text classifier once (``__init__``)."""

    def __init__(self, cfg: JobConfig, vocab, bundle=None, model=None):
        import torch

        from ragseg.models.clip import TextEmbedder, load_clip
        from ragseg.models.fcclip import load_fcclip

        self.cfg = cfg
        self.fc = cfg.models.fcclip
        self.ccfg = cfg.models.clip
        self.bundle = bundle or load_clip(cfg.models)
        self.model = model or load_fcclip(cfg, self.bundle)
        self.device = self.bundle.device
        self.dim = self.bundle.dim
        self.model_id = self.bundle.model_id
        self.n_classes = len(vocab)
        text = TextEmbedder(cfg, self.bundle).encode(list(vocab.names))
        with torch.inference_mode():
            self.classifier = self.model.text_classifier(torch.from_numpy(text).to(self.device)).float()

    # --------------------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        errors = [str(e) for e in batch["error"]] if "error" in batch else [""] * n
        outs = [self._empty() for _ in range(n)]
        prepared: dict[int, np.ndarray] = {}
        for i in range(n):
            if errors[i]:
                continue
            try:
                img = np.asarray(images[i])
                if img.dtype == object:
                    img = np.asarray(img.tolist(), dtype=np.uint8)
                if img.ndim not in (2, 3):
                    raise ValueError(f"image must be HxWx3, got shape {img.shape}")
                prepared[i] = img
            except Exception as e:  # noqa: BLE001 - one bad row never stops the batch
                errors[i] = error_text(STAGE, e)
        for i, o in run_batched(prepared, self.predict, errors, STAGE, log).items():
            outs[i] = o
        res = dict(batch)
        for k in OUT_COLUMNS:
            col = np.empty(n, dtype=object)
            for i in range(n):
                col[i] = (outs[i] if not errors[i] else self._empty())[k]
            res[k] = col
        res["error"] = np.array(errors, dtype=object)
        return res

    def _empty(self) -> dict:
        return {"seg_masks_rle": [], "seg_labels": [], "seg_ids": np.zeros(0, np.int64),
                "seg_isthing": np.zeros(0, bool), "seg_scores": np.zeros(0, np.float32),
                "seg_iv_logits": np.zeros((0, self.n_classes), np.float32),
                "embeddings": np.zeros((0, self.dim), np.float16)}

    # --------------------------------------------------------------------------------------------
    def input_shape(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The trunk input size of an image: Embed's pool-mode rule (shared, so keys and queries match)."""
        from ragseg.models.clip import pool_input_shape, trunk_stride

        side = self.ccfg.pool_image_size or max(self.bundle.image_size)
        return pool_input_shape(hw, side, trunk_stride(self.bundle.visual))

    def predict(self, images: list[np.ndarray]) -> list[dict]:
        """Images -> per image the output columns (see the module docstring)."""
        import torch

        from ragseg.models.clip import image_tensor, resize
        from ragseg.runtime import autocast

        b = self.bundle
        shapes = [self.input_shape(img.shape[:2]) for img in images]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for r, s in enumerate(shapes):
            by_shape.setdefault(s, []).append(r)
        out: list = [None] * len(images)
        with torch.inference_mode():
            for shape, idx in by_shape.items():
                for s in range(0, len(idx), self.fc.batch_size):
                    part = idx[s:s + self.fc.batch_size]
                    x = torch.stack([resize(image_tensor(images[r], b)[None], shape, b.interpolation)[0]
                                     for r in part])
                    with autocast(self.device, self.cfg.models.device):
                        logits, masks, dense = self.model(x, self.classifier)
                    for j, r in enumerate(part):
                        out[r] = self.postprocess(images[r].shape[:2], shape, logits[j].float(),
                                                  masks[j].float(), dense[j].float())
        return out

    def postprocess(self, hw, in_shape, logits, masks, dense) -> dict:
        """One image: (Q, C + 1) logits, (Q, h/4, w/4) mask logits, (C', gh, gw) dense map -> columns."""
        import torch
        import torch.nn.functional as F

        from ragseg.masks import encode_rle

        C = self.n_classes
        probs = logits.softmax(-1)
        score, label = probs.max(-1)
        keep = (label != C) & (score > self.fc.object_mask_threshold)
        idx = torch.nonzero(keep).flatten()
        idx = idx[score[idx].argsort(descending=True, stable=True)][: self.fc.topk]
        if len(idx) == 0:
            return self._empty()
        m = F.interpolate(masks[idx][None], size=in_shape, mode="bilinear", align_corners=False)
        m = F.interpolate(m, size=tuple(hw), mode="bilinear", align_corners=False)[0] >= 0
        nonempty = m.flatten(1).any(1)
        idx, m = idx[nonempty], m[nonempty]
        if len(idx) == 0:
            return self._empty()
        emb = self.pool_embeddings(dense, m)
        bins = m.cpu().numpy()
        return {"seg_masks_rle": [encode_rle(x) for x in bins], "seg_labels": [""] * len(idx),
                "seg_ids": np.arange(1, len(idx) + 1, dtype=np.int64), "seg_isthing": np.ones(len(idx), bool),
                "seg_scores": score[idx].cpu().numpy().astype(np.float32),
                "seg_iv_logits": logits[idx, :C].cpu().numpy().astype(np.float32), "embeddings": emb}

    def pool_embeddings(self, dense, masks) -> np.ndarray:
        """(C', gh, gw) dense map of the shared pass + (n, H, W) bool masks -> (n, dim) float16
        L2-normalised: Embed's pool feature (same functions, same chunking)."""
        import torch

        from ragseg.models.clip import mask_cell_weights, mask_pool, pooled_to_embedding
        from ragseg.runtime import autocast

        bs = self.ccfg.batch_size
        grid = tuple(dense.shape[-2:])
        with autocast(self.device, self.cfg.models.device):
            pooled = torch.cat([mask_pool(dense, mask_cell_weights(masks[s:s + bs], grid))
                                for s in range(0, len(masks), bs)])
            emb = torch.cat([pooled_to_embedding(self.bundle.visual, pooled[s:s + bs]).float()
                             for s in range(0, len(pooled), bs)])
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy().astype(np.float16)
