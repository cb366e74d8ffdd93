"""FC-CLIP's test-time path around the network, step for step, as pure functions (torch on any device;
no Ray, no model objects, no files).

The spec is the official code, read and re-written here (nothing copied): github.com/bytedance/fc-clip
@ 2b0bbe2 ``fcclip/fcclip.py`` (``FCCLIP.forward``'s eval branch and ``panoptic_inference``, which is
Mask2Former's), ``MaskPooling`` / ``get_classification_logits`` of its transformer decoder, and
detectron2 @ 02b5c4e ``ResizeShortestEdge`` + ``ResizeTransform`` (test resize), ``ImageList.from_tensors``
(padding) and ``sem_seg_postprocess`` (crop, then resize to the image). RetCLIP (the paper) changes one
line: the out-of-vocabulary distribution becomes ``s_oov = gamma * s_ret + (1 - gamma) * s_clip``.
``tests/test_fcclip_golden.py`` checks every step against outputs recorded by running the official code
(``tests/fixtures/make_fcclip_golden.py``).

Per image, with Q queries, C vocabulary classes, S >= C synonym rows of the text classifier:

1. **Test input** (:func:`test_shape`, :func:`padded_shape`, :func:`network_input`): the uint8 image
   (H, W) is resized with PIL bilinear so that its shorter side is ``min_size_test`` unless the longer
   one would pass ``max_size_test`` (then the longer one is ``max_size_test``), normalised with CLIP's
   mean / std (x 255) and zero-padded after normalisation at the bottom and right to a multiple of
   ``size_divisibility``: (Hp, Wp). ``image_size`` is the resized (h, w) before padding.
2. **The network** (:class:`ragseg.models.fcclip.FCCLIP`): ``pred_logits`` (Q, C + 1; synonym max,
   void last), ``pred_masks`` (Q, Hp/4, Wp/4) logits, ``dense`` (D', Hp/32, Wp/32) the CLIP map.
3. **Mask pooling, every query** (:func:`mask_pooling`): ``pred_masks`` bilinearly resized to the dense
   grid (``mask_for_pooling``); cells with logit > 0 averaged with equal weight (sum + 1e-8); the CLIP
   head (``trunk.head`` then ``visual.head``) maps the pooled feature to the embedding (a caller's
   ``head``): the retrieval query and the out-of-vocabulary CLIP feature.
4. **Out-of-vocabulary logits** (:func:`classification_logits`): ``min(exp(logit_scale), 100) x cos``
   against every text row, the max over each class's synonym rows, void last; ``s_clip`` = softmax of
   the C class columns.
5. **RetCLIP** (:func:`ensemble`): ``s_oov = gamma * s_ret + (1 - gamma) * s_clip`` on queries with
   retrieval support (a usable neighbour), ``s_clip`` on the others.
6. **Ensemble**: ``s_iv = softmax(pred_logits[:, :C])``; per class ``a = alpha`` if it overlaps FC-CLIP's
   training classes else ``beta``; geometric (FC-CLIP): ``cls = log(s_iv^(1-a) * s_oov^a)``,
   arithmetic: ``log((1-a) * s_iv + a * s_oov)``; ``p_void = softmax(pred_logits)[:, C]``;
   ``probs = [softmax(cls) * (1 - p_void), p_void]``; ``mask_cls = log(probs + 1e-8)``.
7. **Filter** (:func:`keep_queries`): ``scores, labels = softmax(mask_cls).max``; a query is kept when
   its label is not void and its score > ``object_mask_threshold``. No top-k.
8. **Masks of the kept queries** (:func:`image_masks`): bilinear to (Hp, Wp), cropped to ``image_size``,
   bilinear to (H, W) (the official code resizes every query; the kept ones give the same pixels).
9. **Panoptic inference** (:func:`panoptic_inference`): each pixel goes to the kept query with the
   highest ``score x sigmoid(mask)`` (the first one on ties); then, in query order, query k's segment
   is the pixels it won with ``sigmoid >= 0.5``; it is skipped when it won no pixel, its mask has no
   pixel >= 0.5, or won / mask pixels < ``overlap_threshold``; a stuff class already seen paints into
   its first segment; otherwise a new id (1, 2, ...). Pixels of no segment are 0 (void).

Known behaviour kept as is: a query whose grid mask is empty pools a zero feature (FC-CLIP's default,
``ensemble_on_valid_mask`` false); the geometric ensemble is ``log(...) x overlap_mask`` summed over the
two class groups, so a zero probability in either factor makes that class -inf (or NaN through
``-inf x 0``), exactly as the official code does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

POOL_EPS = 1e-8  # MaskPooling's denominator guard
PROB_EPS = 1e-8  # log(probs + eps) before panoptic inference
LOGIT_SCALE_MAX = 100.0  # CLIP's logit scale cap


# ----------------------------------------------------------------------------------------------
# 1. test input
# ----------------------------------------------------------------------------------------------
def test_shape(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: the shorter side becomes ``min_size`` unless
    the longer one would pass ``max_size``; rounded half up."""
    size = float(min_size)
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        s = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * s, neww * s
    return int(newh + 0.5), int(neww + 0.5)


def padded_shape(hw: tuple[int, int], divisibility: int) -> tuple[int, int]:
    """``ImageList.from_tensors`` for one image: each side rounded up to a multiple of ``divisibility``."""
    h, w = hw
    if divisibility > 1:
        h, w = -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility
    return h, w


def resize_uint8(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """detectron2 ``ResizeTransform.apply_image`` on a uint8 image: PIL bilinear to (h, w)."""
    from PIL import Image

    img = np.ascontiguousarray(image)
    if tuple(img.shape[:2]) == tuple(hw):
        return img
    return np.asarray(Image.fromarray(img).resize((int(hw[1]), int(hw[0])), Image.BILINEAR))


@dataclass(frozen=True)
class TestGeometry:
    """FC-CLIP's test-time input rule (``models.fcclip`` ``min_size_test`` / ``max_size_test`` /
    ``size_divisibility``) for one image."""

    min_size: int = 800
    max_size: int = 1333
    divisibility: int = 32

    def sizes(self, hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(image_size = resized (h, w), padded (Hp, Wp)) of an (H, W) image."""
        size = test_shape(int(hw[0]), int(hw[1]), self.min_size, self.max_size)
        return size, padded_shape(size, self.divisibility)


def prepare_image(image: np.ndarray, geometry: TestGeometry, hw: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """The CPU half of the test input: (resized HxWx3 uint8 RGB, image_size, padded). ``hw``: the
    original size when ``image`` is already resized (a CPU task did it): it is then checked, not resized."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"image must be HxWx3, got shape {img.shape}")
    size, padded = geometry.sizes(tuple(hw) if hw is not None else img.shape[:2])
    if hw is not None and tuple(img.shape[:2]) != size:
        raise ValueError(f"prepared input is {img.shape[0]}x{img.shape[1]}, FC-CLIP's test size of a "
                         f"{hw[0]}x{hw[1]} image is {size[0]}x{size[1]}")
    return resize_uint8(np.ascontiguousarray(img[:, :, :3], dtype=np.uint8), size), size, padded


def input_tensor(resized: np.ndarray, padded: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """The device half: resized uint8 -> (3, Hp, Wp) float32 normalised (CLIP's ``mean`` / ``std`` in
    [0, 1]; FC-CLIP's PIXEL_MEAN / PIXEL_STD are them x 255), zero-padded at the bottom and right."""
    x = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).to(device)
    m = torch.tensor([v * 255.0 for v in mean], dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor([v * 255.0 for v in std], dtype=torch.float32, device=x.device).view(-1, 1, 1)
    x = (x - m) / s
    return F.pad(x, (0, padded[1] - resized.shape[1], 0, padded[0] - resized.shape[0]), value=0.0)


def network_input(image: np.ndarray, geometry: TestGeometry, mean: Sequence[float], std: Sequence[float],
                  device: str | torch.device = "cpu", hw: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 RGB -> ((3, Hp, Wp) normalised zero-padded input; image_size (h, w)):
    :func:`prepare_image` then :func:`input_tensor`."""
    resized, size, padded = prepare_image(image, geometry, hw)
    return input_tensor(resized, padded, mean, std, device), size


# ----------------------------------------------------------------------------------------------
# 3-4. mask pooling and classification logits
# ----------------------------------------------------------------------------------------------
def resize_to_grid(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(Q, h, w) mask logits -> (Q, gh, gw), bilinear (align_corners False): ``mask_for_pooling``."""
    if tuple(mask_logits.shape[-2:]) == tuple(grid):
        return mask_logits
    return F.interpolate(mask_logits[None], size=tuple(grid), mode="bilinear", align_corners=False)[0]


def pool_grid(dense: torch.Tensor, mask_for_pooling: torch.Tensor) -> torch.Tensor:
    """FC-CLIP's ``MaskPooling`` on one image: ``dense`` (D', gh, gw), ``mask_for_pooling`` (Q, gh, gw)
    logits -> (Q, D'): the mean of the cells with logit > 0 (a zero vector for an empty grid mask)."""
    m = (mask_for_pooling > 0).to(dense.dtype)
    m = m / (m.sum(dim=(-1, -2), keepdim=True) + POOL_EPS)
    return torch.einsum("chw,qhw->qc", dense, m)


def mask_pooling(dense: torch.Tensor, mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 for every query: (``mask_for_pooling`` (Q, gh, gw), pooled (Q, D'))."""
    mfp = resize_to_grid(mask_logits, tuple(dense.shape[-2:]))
    return mfp, pool_grid(dense, mfp)


def classification_logits(x: torch.Tensor, text_classifier: torch.Tensor, logit_scale: torch.Tensor,
                          num_templates: Sequence[int] | None = None) -> torch.Tensor:
    """``min(exp(logit_scale), 100) * cos(x, rows)`` over the S + 1 text rows (void last), then the max
    over each class's ``num_templates[c]`` synonym rows: (..., D) -> (..., C + 1). ``num_templates``
    None: one row per class. Used by the network's in-vocabulary head and the out-of-vocabulary path."""
    x = F.normalize(x, dim=-1)
    scale = torch.clamp(logit_scale.exp(), max=LOGIT_SCALE_MAX)
    logits = scale * x @ text_classifier.to(x.dtype).T
    if num_templates is None or all(int(n) == 1 for n in num_templates):
        return logits
    if sum(int(n) for n in num_templates) != text_classifier.shape[0] - 1:
        raise ValueError(f"num_templates sum to {sum(num_templates)} rows, the classifier has "
                         f"{text_classifier.shape[0] - 1} (+ void)")
    cols, start = [], 0
    for n in num_templates:
        cols.append(logits[..., start:start + int(n)].max(-1).values)
        start += int(n)
    cols.append(logits[..., -1])
    return torch.stack(cols, dim=-1)


# ----------------------------------------------------------------------------------------------
# 5-7. ensemble and filter
# ----------------------------------------------------------------------------------------------
@dataclass
class EnsembleSteps:
    """Every intermediate of steps 4-6 (float32, on the inputs' device)."""

    s_iv: torch.Tensor  # (Q, C) softmax of the in-vocabulary class logits (void removed first)
    s_clip: torch.Tensor  # (Q, C) softmax of the out-of-vocabulary class logits
    s_oov: torch.Tensor  # (Q, C) RetCLIP's out-of-vocabulary distribution (s_clip when gamma = 0)
    cls_results: torch.Tensor  # (Q, C) fused log-scores
    void_prob: torch.Tensor  # (Q, 1)
    mask_cls_probs: torch.Tensor  # (Q, C + 1)
    mask_cls_results: torch.Tensor  # (Q, C + 1) log(probs + 1e-8)


def ensemble(pred_logits: torch.Tensor, oov_logits: torch.Tensor, overlap: torch.Tensor, alpha: float,
             beta: float, *, s_ret: torch.Tensor | None = None, support: torch.Tensor | None = None,
             gamma: float = 0.0, form: Literal["geometric", "arithmetic"] = "geometric",
             valid: torch.Tensor | None = None) -> EnsembleSteps:
    """Steps 5-6. ``pred_logits`` / ``oov_logits`` (Q, C + 1) with void last; ``overlap`` (C,) 1 where
    the class overlaps FC-CLIP's training classes; ``s_ret`` (Q, C) retrieval distribution and
    ``support`` (Q,) bool (default: rows of ``s_ret`` that sum to > 0); ``valid`` (Q,) 0/1 = FC-CLIP's
    ``ensemble_on_valid_mask`` (alpha and beta times the query's valid-mask flag)."""
    C = pred_logits.shape[-1] - 1
    s_iv = pred_logits[..., :-1].softmax(-1)
    s_clip = oov_logits[..., :-1].softmax(-1)
    s_oov = s_clip
    if s_ret is not None and gamma > 0:
        s_ret = s_ret.to(s_clip)
        if s_ret.shape != s_clip.shape:
            raise ValueError(f"s_ret {tuple(s_ret.shape)} must be (Q, C) = {tuple(s_clip.shape)}")
        if support is None:
            support = s_ret.sum(-1) > 0
        s_oov = torch.where(support.to(torch.bool)[..., None], gamma * s_ret + (1.0 - gamma) * s_clip, s_clip)
    mask = overlap.to(device=pred_logits.device, dtype=torch.long).reshape(C)
    a: float | torch.Tensor = alpha
    b: float | torch.Tensor = beta
    if valid is not None:
        v = valid.to(s_iv.dtype).reshape(-1, 1)
        a = torch.ones_like(s_iv) * alpha * v
        b = torch.ones_like(s_iv) * beta * v
    if form == "geometric":
        seen = (s_iv ** (1 - a) * s_oov ** a).log() * mask
        unseen = (s_iv ** (1 - b) * s_oov ** b).log() * (1 - mask)
    elif form == "arithmetic":
        seen = ((1 - a) * s_iv + a * s_oov).log() * mask
        unseen = ((1 - b) * s_iv + b * s_oov).log() * (1 - mask)
    else:
        raise ValueError(f"unknown ensemble form {form!r}")
    cls_results = seen + unseen
    void_prob = F.softmax(pred_logits, dim=-1)[..., -1:]
    probs = torch.cat([cls_results.softmax(-1) * (1.0 - void_prob), void_prob], dim=-1)
    return EnsembleSteps(s_iv, s_clip, s_oov, cls_results, void_prob, probs, torch.log(probs + PROB_EPS))


def keep_queries(mask_cls_results: torch.Tensor, object_mask_threshold: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 7: (scores (Q,), labels (Q,), keep (Q,) bool) from the (Q, C + 1) log-probabilities."""
    C = mask_cls_results.shape[-1] - 1
    scores, labels = F.softmax(mask_cls_results, dim=-1).max(-1)
    keep = labels.ne(C) & (scores > object_mask_threshold)
    return scores, labels, keep


# ----------------------------------------------------------------------------------------------
# 8-9. masks at image size and panoptic inference
# ----------------------------------------------------------------------------------------------
def image_masks(pred_masks: torch.Tensor, padded: tuple[int, int], image_size: tuple[int, int],
                out_hw: tuple[int, int]) -> torch.Tensor:
    """Step 8: (n, Hp/4, Wp/4) logits -> (n, H, W) logits: bilinear to the padded input, crop to the
    resized image, bilinear to the original size (``sem_seg_postprocess``)."""
    m = F.interpolate(pred_masks[None], size=tuple(padded), mode="bilinear", align_corners=False)
    m = m[:, :, : image_size[0], : image_size[1]]
    if tuple(image_size) == tuple(out_hw):  # bilinear to the same size is the identity: skip the copy
        return m[0]
    return F.interpolate(m, size=tuple(out_hw), mode="bilinear", align_corners=False)[0]


@dataclass
class PanopticResult:
    id_map: torch.Tensor  # (H, W) int32, 0 = void
    segments: list[dict]  # {"id", "class_idx", "isthing", "query", "score"} in id order
    keep: torch.Tensor  # (Q,) bool
    scores: torch.Tensor  # (Q,)
    labels: torch.Tensor  # (Q,)


def panoptic_inference(mask_cls_results: torch.Tensor, pred_masks: torch.Tensor, isthing: Sequence[bool],
                       padded: tuple[int, int], image_size: tuple[int, int], out_hw: tuple[int, int],
                       object_mask_threshold: float, overlap_threshold: float, chunk: int = 16
                       ) -> PanopticResult:
    """Steps 7-9 on one image. ``pred_masks`` (Q, Hp/4, Wp/4) logits of every query; only the kept ones
    are resized, ``chunk`` at a time (the per-pixel argmax runs over chunks with the first-wins rule of
    ``argmax``, so the result equals one pass over all kept queries)."""
    scores, labels, keep = keep_queries(mask_cls_results, object_mask_threshold)
    idx = torch.nonzero(keep).flatten()
    H, W = int(out_hw[0]), int(out_hw[1])
    dev = pred_masks.device
    id_map = torch.zeros((H, W), dtype=torch.int32, device=dev)
    if len(idx) == 0:
        return PanopticResult(id_map, [], keep, scores, labels)
    n = len(idx)
    cur_scores = scores[idx]
    best = torch.full((H, W), -float("inf"), dtype=torch.float32, device=dev)
    owner = torch.zeros((H, W), dtype=torch.long, device=dev)  # argmax_k score_k * sigmoid_k
    owner_fg = torch.zeros((H, W), dtype=torch.bool, device=dev)  # the owner's sigmoid >= 0.5 there
    original = torch.zeros(n, dtype=torch.long, device=dev)  # pixels with sigmoid >= 0.5, per query
    step = max(1, int(chunk))
    for s in range(0, n, step):
        part = idx[s:s + step]
        prob = image_masks(pred_masks[part].float(), padded, image_size, (H, W)).sigmoid_()
        fg = prob >= 0.5
        original[s:s + len(part)] = fg.flatten(1).sum(1)
        v, arg = prob.mul_(cur_scores[s:s + len(part)].view(-1, 1, 1)).max(0)  # score x sigmoid
        better = v > best  # strictly: an earlier query keeps a tie, as one argmax over all would
        best = torch.where(better, v, best)
        owner = torch.where(better, arg + s, owner)
        owner_fg = torch.where(better, fg.gather(0, arg[None])[0], owner_fg)
        del prob, fg
    # per query: pixels won, and pixels won with sigmoid >= 0.5 (its region); regions are disjoint
    won = torch.bincount(owner.flatten(), minlength=n).tolist()
    region = torch.bincount(owner[owner_fg], minlength=n).tolist()
    orig = original.tolist()
    segments: list[dict] = []
    stuff_id: dict[int, int] = {}
    thing = [bool(t) for t in isthing]
    seg_of = torch.zeros(n, dtype=torch.int32, device=dev)  # query -> the segment id it paints (0: none)
    for k in range(n):  # query order, as the official loop
        c = int(labels[idx[k]])
        if won[k] == 0 or orig[k] == 0 or region[k] == 0:
            continue
        if won[k] / orig[k] < overlap_threshold:
            continue
        if not thing[c] and c in stuff_id:
            seg_of[k] = stuff_id[c]
            continue
        sid = len(segments) + 1
        if not thing[c]:
            stuff_id[c] = sid
        seg_of[k] = sid
        segments.append({"id": sid, "class_idx": c, "isthing": thing[c], "query": int(idx[k]),
                         "score": float(scores[idx[k]])})
    id_map = torch.where(owner_fg, seg_of[owner], id_map)
    return PanopticResult(id_map, segments, keep, scores, labels)


# ----------------------------------------------------------------------------------------------
# the whole path after the network
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PostprocessSettings:
    """Everything the path after the network reads from the config (``models.fcclip`` and
    ``label.ensemble``)."""

    alpha: float = 0.4
    beta: float = 0.8
    gamma: float = 0.0
    form: Literal["geometric", "arithmetic"] = "geometric"
    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.8
    ensemble_on_valid_mask: bool = False
    chunk: int = 16


@dataclass
class FcclipResult:
    """The output of :func:`postprocess`: the panoptic result and every intermediate step."""

    panoptic: PanopticResult
    ensemble: EnsembleSteps
    mask_for_pooling: torch.Tensor  # (Q, gh, gw)
    pooled: torch.Tensor  # (Q, D') pre-head
    embeddings: torch.Tensor  # (Q, E) the head's output (not normalised)
    oov_logits: torch.Tensor  # (Q, C + 1)
    s_ret: torch.Tensor | None = None  # (Q, C)
    extras: dict = field(default_factory=dict)


def postprocess(pred_logits: torch.Tensor, pred_masks: torch.Tensor, dense: torch.Tensor, *,
                head: Callable[[torch.Tensor], torch.Tensor], text_classifier: torch.Tensor,
                logit_scale: torch.Tensor, num_templates: Sequence[int] | None, overlap: torch.Tensor,
                isthing: Sequence[bool], image_size: tuple[int, int], out_hw: tuple[int, int],
                settings: PostprocessSettings,
                retrieval: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | torch.Tensor | None = None,
                ) -> FcclipResult:
    """Everything after the network for one image (steps 3-9 of the module docstring).

    ``pred_logits`` (Q, C + 1), ``pred_masks`` (Q, Hp/4, Wp/4), ``dense`` (D', Hp/32, Wp/32): the
    network's outputs for the padded input (float32). ``head``: pooled (Q, D') -> embedding (Q, E), the
    CLIP model's own head (``ragseg.models.clip.pooled_to_embedding``). ``text_classifier`` (S + 1, E)
    normalised rows, void last; ``num_templates`` per class (None: one row each); ``logit_scale``: the
    CLIP model's. ``overlap`` (C,) 0/1; ``isthing`` (C,). ``retrieval``: None (FC-CLIP alone), a (Q, C)
    ``s_ret``, or a callable L2-normalised embeddings (Q, E) -> (s_ret (Q, C), support (Q,)) so that
    retrieval runs for every query before the filter. ``image_size`` / ``out_hw``: the resized and the
    original (H, W).
    """
    padded = (pred_masks.shape[-2] * 4, pred_masks.shape[-1] * 4)
    mfp, pooled = mask_pooling(dense, pred_masks)
    emb = head(pooled).float()
    oov_logits = classification_logits(emb, text_classifier, logit_scale, num_templates)
    s_ret = support = None
    if callable(retrieval):
        s_ret, support = retrieval(F.normalize(emb, dim=-1))
    elif retrieval is not None:
        s_ret = retrieval
    valid = None
    if settings.ensemble_on_valid_mask:
        valid = ((mfp > 0).to(mfp).sum(-1).sum(-1) > 0).to(pred_logits.dtype)
    steps = ensemble(pred_logits, oov_logits, overlap, settings.alpha, settings.beta, s_ret=s_ret,
                     support=support, gamma=settings.gamma, form=settings.form, valid=valid)
    pan = panoptic_inference(steps.mask_cls_results, pred_masks, isthing, padded, image_size, out_hw,
                             settings.object_mask_threshold, settings.overlap_threshold, settings.chunk)
    return FcclipResult(pan, steps, mfp, pooled, emb, oov_logits, s_ret)


# ----------------------------------------------------------------------------------------------
# keys for a database queried by FC-CLIP: a binary mask through the same pooling operator
# ----------------------------------------------------------------------------------------------
def binary_mask_logits(masks: torch.Tensor, image_size: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """(n, H, W) binary masks at the original size -> (n, Hp/4, Wp/4) "logits" in the frame of FC-CLIP's
    ``pred_masks``: the mask as a probability map, resized (bilinear) to the test input, zero-padded,
    averaged over 4 x 4 cells, minus 0.5. Fed to :func:`mask_pooling`, a cell is in the mask where the
    bilinear value on the grid is > 0.5 (probability), the same point as a query's logit > 0."""
    p = F.interpolate(masks.float()[:, None], size=tuple(image_size), mode="bilinear", align_corners=False)
    p = F.pad(p, (0, padded[1] - image_size[1], 0, padded[0] - image_size[0]), value=0.0)
    return F.avg_pool2d(p, 4)[:, 0] - 0.5


def key_pooling(dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """:func:`mask_pooling` for database keys: a key whose grid mask is empty (a segment smaller than
    a cell that covers no cell's sample point) pools the one cell where its map is highest instead of a
    zero vector, so it keeps a position. Returns (n, D')."""
    mfp, pooled = mask_pooling(dense, mask_logits)
    empty = ~(mfp > 0).flatten(1).any(1)
    if bool(empty.any()):
        flat = dense.flatten(1)  # (D', gh * gw)
        cell = mfp[empty].flatten(1).argmax(1)
        pooled[empty] = flat[:, cell].T.to(pooled.dtype)
    return pooled
