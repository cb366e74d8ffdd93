"""Embed: masked-CLIP features of every segment of an image (Ray Data callable).

In: ``image`` (HxWx3 uint8, object column), ``seg_masks_rle`` (per image a list of COCO RLE JSON
strings), ``error``. Out: ``embeddings`` per image, an (n, dim) float16 array of L2-normalised rows in
the order of ``seg_masks_rle`` ((0, dim) for an image without masks or an errored row).

``models.clip.mode`` picks the feature (:mod:`ragseg.models.masked_clip`; the exact maths in :mod:`ragseg.models.clip`):
``pool`` = area-weighted mask pooling over the dense map of a CLIP ConvNeXt at ``pool_image_size``, one
trunk pass per image; ``fcclip`` = FC-CLIP's own pooling at its test input (the keys that
``label.proposals: fcclip`` queries; :meth:`~ragseg.models.masked_clip.MaskedClipEmbedder._fcclip`); ``crop`` = ``encode_image`` on each masked,
padded crop. A database and its queries must use the same mode and model (``model_id`` and ``mode`` are
recorded in the DB manifest by the pipeline).

A row fails alone (``error`` = ``"embed: <Type>: <msg>"``): an undecodable RLE, a mask whose size
differs from the image, or an empty mask. When a batched forward pass fails, the rows are retried one by
one so only the guilty row is marked.
"""

from __future__ import annotations

import logging

import numpy as np

from ragseg.config import JobConfig
from ragseg.models.masked_clip import MaskedClipEmbedder, decode_masks
from ragseg.stages.batch import as_list, map_rows, model_inputs, object_column

log = logging.getLogger(__name__)

STAGE = "embed"


class Embed:
    """Ray Data callable: loads the CLIP model once (``__init__``: :class:`MaskedClipEmbedder`), maps
    batches (``__call__``)."""

    def __init__(self, cfg: JobConfig, bundle=None):
        self.core = MaskedClipEmbedder(cfg, bundle)
        self.cfg, self.mode, self.dim = cfg, self.core.mode, self.core.dim
        self.model_id, self.device, self.bundle = self.core.model_id, self.core.device, self.core.bundle
        self.embed_rows = self.core.embed_rows

    # --------------------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rles = batch.get("seg_masks_rle")

        def prepare(i: int):
            # after FcclipPrep (fcclip mode): the image at FC-CLIP's test size and the original size
            img, hw = model_inputs(batch, i)
            if img.ndim not in (2, 3):
                raise ValueError(f"image must be HxWx3, got shape {img.shape}")
            masks = decode_masks(as_list(rles[i] if rles is not None else None), hw or img.shape[:2])
            return (img, masks) if len(masks) else None

        out, errors = map_rows(batch, STAGE, prepare, self.embed_rows,
                               lambda: np.zeros((0, self.dim), np.float16), log)
        res = dict(batch)
        res["embeddings"] = object_column(out)
        res["error"] = np.array(errors, dtype=object)
        return res
