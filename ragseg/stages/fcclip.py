"""FcclipLabel: ``label.proposals: fcclip`` in one actor (Ray Data callable): FC-CLIP's whole test-time
path per image, retrieval included, so that no per-query mask crosses a stage.

In: ``image`` (HxWx3 uint8), ``error``. Out: ``panoptic_png`` (H x W x 3 uint8, ``id = R + 256 G +
256^2 B``) and ``segments_info`` (JSON list of ``{"id", "category_id", "area", "bbox", "iscrowd",
"score", "s_ret", "s_clip", "s_iv", "mask_rle"}``: the columns :class:`ragseg.stages.merge.PanopticMerge`
gives the binary-mask proposal paths); ``image`` is dropped.

Per image (:mod:`ragseg.fcclip_inference` has every step and its reference in the official code):
FC-CLIP's test input (shorter side ``models.fcclip.min_size_test``, longer <= ``max_size_test``, zero
padding to ``size_divisibility``; images of one padded size share a forward pass of up to
``models.fcclip.batch_size``), the network (:class:`ragseg.models.fcclip.FCCLIP`; the text classifier
holds every synonym of every class, :func:`ragseg.models.fcclip.class_name_lists`), mask pooling of
every query on the dense CLIP map, retrieval of every query's neighbours (one FAISS search per image
of about ``num_queries`` vectors) before any filter, FC-CLIP's ensemble with RetCLIP's
``s_oov = gamma * s_ret + (1 - gamma) * s_clip``, the filter on the ensembled distribution and
Mask2Former's panoptic inference. Bytes that cross stages per image: the decoded image in, the panoptic
pixels and the segments' JSON out.

``label.ensemble.scores``: ``ensemble`` (gamma as set), ``clip`` (gamma 0: FC-CLIP alone, no index
needed), ``retrieval`` (gamma 1). ``label.merge`` does not apply here (it is the binary-mask merge).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from ragseg.config import JobConfig
from ragseg.errors import UserError
from ragseg.fcclip_inference import PostprocessSettings, TestGeometry
from ragseg.stages.batch import FCCLIP_INPUT, map_rows, model_inputs, object_column

log = logging.getLogger(__name__)

STAGE = "fcclip"
OUT_COLUMNS = ("panoptic_png", "segments_info")


def settings(cfg: JobConfig) -> PostprocessSettings:
    """The post-processing settings of a label run (``models.fcclip`` + ``label.ensemble``)."""
    fc, ens = cfg.models.fcclip, cfg.label.ensemble
    gamma = {"ensemble": ens.gamma, "clip": 0.0, "retrieval": 1.0}[ens.scores]
    return PostprocessSettings(alpha=ens.alpha, beta=ens.beta, gamma=gamma, form=ens.form,
                               object_mask_threshold=fc.object_mask_threshold,
                               overlap_threshold=fc.overlap_threshold,
                               ensemble_on_valid_mask=fc.ensemble_on_valid_mask, chunk=fc.mask_chunk)


def geometry(cfg: JobConfig) -> TestGeometry:
    from ragseg.models.fcclip import test_geometry  # torch: imported where the stage runs

    return test_geometry(cfg.models.fcclip)


def uses_retrieval(cfg: JobConfig) -> bool:
    return settings(cfg).gamma > 0


def check_index_identity(cfg: JobConfig, meta: dict, index_uri: str) -> None:
    """FC-CLIP queries are ``models.clip.mode=fcclip`` features of ``models.clip`` at FC-CLIP's test input:
    refuse (one line) an index whose keys came from another trunk, weights, mode, dimension or input
    rule (``models.fcclip`` min/max_size_test, size_divisibility): :func:`ragseg.identity.check`."""
    from ragseg import identity

    identity.check(identity.index_identity(meta), identity.embed_identity(cfg, mode="fcclip"), f"index {index_uri}",
                   context=" (label.proposals=fcclip queries are FC-CLIP's mask-pooled features, mode=fcclip)",
                   fix="build the database with models.clip = the FC-CLIP trunk, models.clip.mode=fcclip and the "
                       "same models.fcclip test sizes")


def text_classifier(cfg: JobConfig, vocab, bundle, model):
    """(classifier (S + 1, D) with void last, num_templates per class, overlap (C,) bool): every name
    of every class embedded with FC-CLIP's templates (template-averaged per name, as FC-CLIP does)."""
    import torch

    from ragseg.models.clip import TextEmbedder
    from ragseg.models.fcclip import VILD_TEMPLATES, class_name_lists, overlap_mask

    fc = cfg.models.fcclip
    lists = class_name_lists(vocab, fc.class_names)
    tmpl = list(fc.templates or VILD_TEMPLATES)
    mcfg = cfg.models.model_copy(update={"clip": cfg.models.clip.model_copy(update={"templates": tmpl})})
    rows = TextEmbedder(mcfg, bundle).encode([n for names in lists for n in names])
    with torch.inference_mode():
        classifier = model.text_classifier(torch.from_numpy(rows).to(bundle.device)).float()
    trained = list(cfg.label.ensemble.trained_classes) or None
    return classifier, [len(n) for n in lists], overlap_mask(lists, trained)


class FcclipPrep:
    """CPU task before :class:`FcclipLabel` (and before ``Embed`` in ``models.clip.mode: fcclip``): adds
    ``fcclip_input``, each image resized to FC-CLIP's test size exactly as detectron2 does (PIL bilinear
    on uint8), so the GPU actor receives ready arrays (it only normalises and pads). ``drop_image``: the
    original pixels are not needed after it (``height`` / ``width`` stay). Errored rows get an empty array."""

    stage = "fcclip_prep"

    def __init__(self, cfg: JobConfig, drop_image: bool = True):
        self.geometry = geometry(cfg)
        self.drop_image = drop_image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ragseg.fcclip_inference import prepare_image
        from ragseg.stages.batch import as_rgb, map_rows, object_column

        out, errors = map_rows(batch, STAGE, lambda i: prepare_image(as_rgb(batch["image"][i]), self.geometry)[0],
                               empty=lambda: np.zeros((0, 0, 3), np.uint8))
        res = {k: v for k, v in batch.items() if not (self.drop_image and k == "image")}
        res[FCCLIP_INPUT] = object_column(out)
        res["error"] = np.array(errors, dtype=object)
        return res


def _num(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) or math.isinf(v) else v


class FcclipLabel:
    """Ray Data callable: loads CLIP + FC-CLIP, the text classifier and the index once (``__init__``).
    ``bundle`` / ``model`` / ``index`` / ``fallback_index`` can be injected (tests, benchmarks)."""

    def __init__(self, cfg: JobConfig, vocab, index_uri: str | None = None,
                 fallback_index_uri: str | None = None, *, bundle=None, model=None, index=None,
                 fallback_index=None):
        import torch

        from ragseg.models.clip import load_clip
        from ragseg.models.fcclip import load_fcclip

        self.cfg = cfg
        self.fc = cfg.models.fcclip
        self.vocab = vocab
        self.settings = settings(cfg)
        self.geometry = geometry(cfg)
        self.bundle = bundle or load_clip(cfg.models)
        self.model = model or load_fcclip(cfg, self.bundle)
        self.device = self.bundle.device
        self.model_id = self.bundle.model_id
        self.classifier, self.num_templates, overlap = text_classifier(cfg, vocab, self.bundle, self.model)
        self.overlap = torch.from_numpy(overlap.astype(np.int64)).to(self.device)
        self.isthing = [bool(t) for t in vocab.isthing]
        self.ids = [int(i) for i in vocab.ids]
        self.retriever = None
        if self.settings.gamma > 0 or index is not None:
            from ragseg.stages.classify import Retriever

            self.retriever = Retriever(cfg, vocab, index_uri, fallback_index_uri, index=index,
                                       fallback_index=fallback_index)
            dims = self.retriever.dims()
            if dims and dims != {self.bundle.dim}:
                raise UserError(f"fcclip: index dim {sorted(dims)} != the CLIP embedding dim {self.bundle.dim}")

    # --------------------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def prepare(i: int):
            img, hw = model_inputs(batch, i)
            if img.ndim not in (2, 3):
                raise ValueError(f"image must be HxWx3, got shape {img.shape}")
            return img, hw

        outs, errors = map_rows(batch, STAGE, prepare, self.label_images,
                                lambda: {"panoptic_png": np.zeros((0, 0, 3), np.uint8), "segments_info": "[]"}, log)
        res = {k: v for k, v in batch.items() if k not in ("image", FCCLIP_INPUT)}
        for k in OUT_COLUMNS:
            res[k] = object_column([o[k] for o in outs])
        res["error"] = np.array(errors, dtype=object)
        return res

    # --------------------------------------------------------------------------------------------
    def forward(self, images: list[tuple[np.ndarray, tuple[int, int] | None]]):
        """(image, None) or (``fcclip_input``, original (H, W)) per image -> per image (pred_logits,
        pred_masks, dense, image_size) on the device, float32; images of one padded input size share
        forward passes of ``models.fcclip.batch_size``."""
        import torch

        from ragseg.fcclip_inference import network_input
        from ragseg.runtime import autocast

        b = self.bundle
        inputs = [network_input(img, self.geometry, b.mean, b.std, self.device, hw) for img, hw in images]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for r, (x, _) in enumerate(inputs):
            by_shape.setdefault(tuple(x.shape[-2:]), []).append(r)
        out: list = [None] * len(images)
        with torch.inference_mode():
            for idx in by_shape.values():
                for s in range(0, len(idx), self.fc.batch_size):
                    part = idx[s:s + self.fc.batch_size]
                    x = torch.stack([inputs[r][0] for r in part])
                    with autocast(self.device, self.cfg.models.device):
                        logits, masks, dense = self.model(x, self.classifier, self.num_templates)
                    for j, r in enumerate(part):
                        out[r] = (logits[j].float(), masks[j].float(), dense[j].float(), inputs[r][1])
        return out

    def postprocess(self, hw: tuple[int, int], logits, masks, dense, image_size):
        """One image's network outputs -> :class:`ragseg.fcclip_inference.FcclipResult`."""
        import torch

        from ragseg.fcclip_inference import postprocess
        from ragseg.models.clip import pooled_to_embedding

        def head(pooled):
            return pooled_to_embedding(self.bundle.visual, pooled)

        retrieval = self._retrieve if self.retriever is not None else None
        with torch.inference_mode():
            return postprocess(logits, masks, dense, head=head, text_classifier=self.classifier,
                               logit_scale=self.bundle.model.logit_scale, num_templates=self.num_templates,
                               overlap=self.overlap, isthing=self.isthing, image_size=image_size,
                               out_hw=tuple(hw), settings=self.settings, retrieval=retrieval)

    def _retrieve(self, emb):
        import torch

        s_ret, support = self.retriever.scores(emb.float().cpu().numpy())
        return torch.from_numpy(s_ret).to(emb.device), torch.from_numpy(support).to(emb.device)

    def label_images(self, images: list[tuple[np.ndarray, tuple[int, int] | None]]) -> list[dict]:
        """(image, None) or (``fcclip_input``, original (H, W)) per image -> per image
        ``{"panoptic_png", "segments_info"}``."""
        out = []
        for (img, hw), (logits, masks, dense, size) in zip(images, self.forward(images), strict=True):
            res = self.postprocess(hw or img.shape[:2], logits, masks, dense, size)
            out.append(self.outputs(res))
        return out

    def outputs(self, res) -> dict:
        """A :class:`ragseg.fcclip_inference.FcclipResult` -> the stage's output columns."""
        from ragseg.masks import id_to_rgb
        from ragseg.stages.merge import segment_infos

        steps = res.ensemble
        id_map = res.panoptic.id_map.cpu().numpy().astype(np.int32)
        s_iv, s_clip = steps.s_iv.cpu().numpy(), steps.s_clip.cpu().numpy()
        s_ret = res.s_ret.cpu().numpy() if res.s_ret is not None else None

        def sources(seg: dict) -> dict:
            q, c = seg["query"], seg["class_idx"]
            return {"s_ret": _num(s_ret[q, c]) if s_ret is not None else None,
                    "s_clip": _num(s_clip[q, c]), "s_iv": _num(s_iv[q, c])}

        infos = segment_infos(id_map, res.panoptic.segments, self.ids, sources)
        return {"panoptic_png": id_to_rgb(id_map), "segments_info": json.dumps(infos)}
