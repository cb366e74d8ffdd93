"""FC-CLIP, inference only, in plain PyTorch (no detectron2, no compiled deformable-attention op).

Written from the published architecture (Yu et al., "Convolutions Die Hard: Open-Vocabulary
Segmentation with Single Frozen Convolutional CLIP", github.com/bytedance/fc-clip) and its eval config
``configs/coco/panoptic-segmentation/fcclip/fcclip_convnext_large_eval_ade20k.yaml`` (+ bases):

- **Backbone**: the frozen open_clip ConvNeXt (``convnext_large_d_320`` / ``laion2b_s29b_b131k_ft_soup``),
  the very model :func:`ragseg.models.clip.load_clip` gives the Embed stage. One trunk pass
  (:meth:`FCCLIP.trunk`) yields ``res2..res5`` (the four stage outputs, strides 4..32) for the head and
  ``trunk.norm_pre(res5)`` = ``trunk.forward_features`` (:func:`ragseg.models.clip.dense_features`),
  the dense map that mask pooling reads.
- **Pixel decoder** (:class:`MSDeformAttnPixelDecoder`): 1x1 conv + GroupNorm projections of res3..res5,
  ``enc_layers`` multi-scale deformable-attention encoder layers (sampling through transformers'
  pure-PyTorch ``multi_scale_deformable_attention``, sine position encoding from transformers'
  Mask2Former), one FPN level for res2 (lateral 1x1 + 3x3 output conv, GroupNorm) and a 1x1
  ``mask_features`` conv (stride 4).
- **Transformer decoder** (:class:`MaskedTransformerDecoder`): ``dec_layers - 1`` layers of masked
  cross-attention -> self-attention -> FFN (post-norm) over the three decoder scales in turn,
  ``num_queries`` learned queries. Per query: mask = ``mask_embed(q) . mask_features``; class embedding =
  ``class_embed(q + proj(mask-pooled mask_features))``, matched (cosine x ``exp(logit_scale)`` capped at
  100) against the vocabulary's text embeddings plus FC-CLIP's learned, normalised ``void_embedding``:
  ``pred_logits`` has C + 1 columns, the last is void. That is s_iv for any vocabulary.

Parameter names are those of the official checkpoint (modules are named like FC-CLIP's, so
``load_state_dict(strict=True)`` maps 1:1): ``backbone.clip_model.*`` (the whole open_clip model),
``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``, ``void_embedding.weight`` and the
criterion's ``criterion.empty_weight`` buffer. ``tests/fixtures/fcclip_convnext_large_keys.json`` lists
them (made by ``tests/fixtures/make_fcclip_keys.py``).

Checkpoints load only from ``.safetensors`` (:func:`load_fcclip`); ``ragseg convert-weights`` makes
one from the official detectron2 ``.pth`` (:func:`convert_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ragseg.config import FcclipConfig, JobConfig, ModelsConfig
from ragseg.errors import UserError
from ragseg.fcclip_inference import TestGeometry, classification_logits

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parents[1] / "data"
CLASSES_FILE = DATA / "fcclip_coco_panoptic_classes.json"  # FC-CLIP's 133 training classes
ADE_CLASSES_FILE = DATA / "fcclip_ade20k_150_classes.json"  # FC-CLIP's ADE20k-150 evaluation names
# official checkpoint (README of github.com/bytedance/fc-clip, "FC-CLIP (ConvNeXt-Large)", COCO panoptic)
OFFICIAL_CHECKPOINT = "https://drive.google.com/file/d/1-91PIns86vyNaL3CzMmDD39zKGnPMtvj/view?usp=sharing"
# FC-CLIP's prompt templates (fcclip/fcclip.py VILD_PROMPT): its text classifier averages them per name
VILD_TEMPLATES = [
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene", "There is the {} in the scene",
    "a photo of a {} in the scene", "a photo of a small {}.", "a photo of a medium {}.", "a photo of a large {}.",
    "This is a photo of a small {}.", "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.", "There is a large {} in the scene.",
]


# ----------------------------------------------------------------------------------------------
# Class names: FC-CLIP's synonym lists, its training classes and the category-overlap rule
# ----------------------------------------------------------------------------------------------
def coco_categories() -> list[dict[str, Any]]:
    """FC-CLIP's 133 COCO panoptic training classes: ``{"id", "name", "isthing", "synonyms"}`` (``synonyms``:
    the names FC-CLIP embeds for the class)."""
    return json.loads(CLASSES_FILE.read_text())["categories"]


def ade20k_categories() -> list[dict[str, Any]]:
    """FC-CLIP's ADE20k-150 classes, same fields (``synonyms`` = its prompt-engineered names)."""
    return json.loads(ADE_CLASSES_FILE.read_text())["categories"]


def trained_class_names() -> list[str]:
    """The names FC-CLIP was trained with (every synonym of its COCO classes): a test class whose names
    share one with this set "overlaps" the training classes (FC-CLIP's category_overlapping_mask)."""
    out: list[str] = []
    for c in coco_categories():
        for n in c["synonyms"]:
            if n not in out:
                out.append(n)
    return out


def split_names(name: str) -> list[str]:
    """FC-CLIP's reading of a class name: comma-separated synonyms (``"road, route"`` -> two names)."""
    return [p for p in name.replace(", ", ",").split(",") if p]


def class_name_lists(vocab, mode: str = "fcclip") -> list[list[str]]:
    """Per vocabulary class, the names the text classifier embeds (its logit is the max over them).
    ``mode="fcclip"``: a class named like an FC-CLIP ADE20k-150 or COCO class (its ``name`` or its
    first synonym, case-insensitive; ADE20k first) gets FC-CLIP's list; ``"vocab"`` (and the other
    classes): the vocabulary name split at commas, then its synonyms."""
    table: dict[str, list[str]] = {}
    if mode == "fcclip":
        for cats in (ade20k_categories(), coco_categories()):
            for c in cats:
                for key in (c["name"], c["synonyms"][0]):
                    table.setdefault(key.strip().lower(), list(c["synonyms"]))
    out = []
    for name in vocab.names:
        hit = table.get(name.strip().lower())
        if hit is None:
            hit = list(dict.fromkeys(split_names(name) + list(vocab.synonyms.get(name, []))))
        out.append(hit)
    return out


def overlap_mask(name_lists: list[list[str]], trained: list[str] | None = None):
    """(C,) bool: classes with a name in ``trained`` (default :func:`trained_class_names`), exact strings,
    as FC-CLIP's ``prepare_class_names_from_metadata``."""
    import numpy as np

    train = set(trained or trained_class_names())
    return np.array([not train.isdisjoint(names) for names in name_lists], dtype=bool)


# ----------------------------------------------------------------------------------------------
# Building blocks (names follow FC-CLIP / Mask2Former so the checkpoint maps 1:1)
# ----------------------------------------------------------------------------------------------
def test_geometry(fc: FcclipConfig) -> TestGeometry:
    """FC-CLIP's test input rule from ``models.fcclip`` (min/max_size_test, size_divisibility)."""
    return TestGeometry(fc.min_size_test, fc.max_size_test, fc.size_divisibility)


class ConvNorm(nn.Conv2d):
    """detectron2's ``Conv2d``: a conv whose norm (GroupNorm(32)) is a child named ``norm``; no bias
    when normed; optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, norm: bool, relu: bool):
        super().__init__(cin, cout, kernel, padding=kernel // 2, bias=not norm)
        self.norm = nn.GroupNorm(32, cout) if norm else None
        self.relu = relu

    def forward(self, x):
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


def sine_position(x, num_feats: int):
    """Normalised sine position encoding of a (B, C, H, W) map (transformers' Mask2Former version of
    DETR's ``PositionEmbeddingSine(normalize=True)``), float32, (B, 2 * num_feats, H, W)."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding

    pe = Mask2FormerSinePositionEmbedding.build_sine_position_embedding
    return pe(x.shape, x.device, torch.float32, num_feats, True, 2 * math.pi, 10000, None)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), sampling in pure PyTorch."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        if d_model % n_heads:
            raise UserError(f"models.fcclip: conv_dim {d_model} is not divisible by nheads {n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        for lin in (self.attention_weights,):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, value_in, shapes: list[tuple[int, int]]):
        from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

        n, lq, d = query.shape
        h, lv, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).view(n, value_in.shape[1], h, d // h)
        offsets = self.sampling_offsets(query).view(n, lq, h, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, h, lv * p).softmax(-1).view(n, lq, h, lv, p)
        norm = torch.tensor([[w, hh] for hh, w in shapes], dtype=query.dtype, device=query.device)
        loc = reference_points[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
        return self.output_proj(multi_scale_deformable_attention(value, shapes, loc, weights))


class DeformEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, ref, shapes):
        src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformEncoder(nn.Module):
    def __init__(self, layer_args: tuple, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DeformEncoderLayer(*layer_args) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes, device):
        """Cell centres of every level in [0, 1] (no padding: valid ratios are 1), (1, L, n_levels, 2)."""
        refs = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device) / h,
                                    torch.linspace(0.5, w - 0.5, w, device=device) / w, indexing="ij")
            refs.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
        ref = torch.cat(refs, 0)[None]
        return ref[:, :, None].expand(-1, -1, len(shapes), -1)

    def forward(self, src, pos, shapes):
        ref = self.reference_points(shapes, src.device)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes)
        return src


class DeformEncoderOnly(nn.Module):
    def __init__(self, d_model: int, nhead: int, num_layers: int, d_ffn: int, n_levels: int, n_points: int):
        super().__init__()
        self.encoder = DeformEncoder((d_model, d_ffn, n_levels, nhead, n_points), num_layers)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        for name, p in self.named_parameters():
            if p.dim() > 1 and "sampling_offsets" not in name and "attention_weights" not in name:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.level_embed)


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder; ``in_channels`` of res2..res5 (strides 4, 8, 16, 32)."""

    def __init__(self, in_channels: list[int], fc: FcclipConfig):
        super().__init__()
        d = fc.conv_dim
        # from low to high resolution: res5, res4, res3
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in in_channels[1:][::-1])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.transformer = DeformEncoderOnly(d, fc.nheads, fc.enc_layers, fc.enc_dim_feedforward, 3,
                                             fc.enc_n_points)
        self.mask_features = nn.Conv2d(d, fc.mask_dim, kernel_size=1)
        # one extra FPN level: log2(stride 8) - log2(common stride 4)
        self.adapter_1 = ConvNorm(in_channels[0], d, 1, norm=True, relu=False)
        self.layer_1 = ConvNorm(d, d, 3, norm=True, relu=True)
        self.num_pos_feats = d // 2

    def forward(self, feats: list) -> tuple[Any, list]:
        """res2..res5 -> (mask_features (B, mask_dim, H/4, W/4), [3 maps: strides 32, 16, 8])."""
        with torch.autocast(device_type=feats[0].device.type, enabled=False):  # fp32, as FC-CLIP
            srcs, pos, shapes = [], [], []
            for i, x in enumerate(feats[1:][::-1]):
                x = x.float()
                s = self.input_proj[i](x)
                shapes.append((int(s.shape[-2]), int(s.shape[-1])))
                srcs.append(s.flatten(2).transpose(1, 2))
                pe = sine_position(x, self.num_pos_feats).flatten(2).transpose(1, 2)
                pos.append(pe + self.transformer.level_embed[i].view(1, 1, -1))
            y = self.transformer.encoder(torch.cat(srcs, 1), torch.cat(pos, 1), shapes)
            b = y.shape[0]
            outs = [z.transpose(1, 2).reshape(b, -1, h, w)
                    for z, (h, w) in zip(y.split([h * w for h, w in shapes], dim=1), shapes, strict=True)]
            lat = self.adapter_1(feats[0].float())
            top = self.layer_1(lat + F.interpolate(outs[-1], size=lat.shape[-2:], mode="bilinear",
                                                   align_corners=False))
            return self.mask_features(top), outs


class SelfAttentionLayer(nn.Module):
    def __init__(self, d: int, nhead: int, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d)
        self.pre_norm = pre_norm

    def forward(self, tgt, query_pos):
        x = self.norm(tgt) if self.pre_norm else tgt
        q = x + query_pos
        out = tgt + self.self_attn(q, q, value=x)[0]
        return out if self.pre_norm else self.norm(out)


class CrossAttentionLayer(nn.Module):
    def __init__(self, d: int, nhead: int, pre_norm: bool):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d)
        self.pre_norm = pre_norm

    def forward(self, tgt, memory, attn_mask, pos, query_pos):
        x = self.norm(tgt) if self.pre_norm else tgt
        out = tgt + self.multihead_attn(query=x + query_pos, key=memory + pos, value=memory,
                                        attn_mask=attn_mask)[0]
        return out if self.pre_norm else self.norm(out)


class FFNLayer(nn.Module):
    def __init__(self, d: int, d_ffn: int, pre_norm: bool):
        super().__init__()
        self.linear1 = nn.Linear(d, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d)
        self.norm = nn.LayerNorm(d)
        self.pre_norm = pre_norm

    def forward(self, tgt):
        x = self.norm(tgt) if self.pre_norm else tgt
        out = tgt + self.linear2(F.relu(self.linear1(x)))
        return out if self.pre_norm else self.norm(out)


class MLP(nn.Module):
    def __init__(self, din: int, dh: int, dout: int, num_layers: int):
        super().__init__()
        dims = [din] + [dh] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [dout], strict=True))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def mask_pool_logits(features, mask_logits):
    """FC-CLIP's MaskPooling: average of ``features`` (B, C, H, W) over each mask logit > 0
    (``mask_logits`` (B, Q, H, W), same H, W) -> (B, Q, C)."""
    m = (mask_logits > 0).to(features.dtype)
    m = m / (m.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bqhw->bqc", features, m)


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention decoder with FC-CLIP's class head."""

    num_feature_levels = 3

    def __init__(self, in_channels: int, fc: FcclipConfig, clip_dim: int):
        super().__init__()
        d = fc.hidden_dim
        self.num_heads = fc.nheads
        self.num_layers = fc.dec_layers - 1  # the first prediction is on the learned queries
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, fc.nheads, fc.pre_norm) for _ in range(self.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, fc.nheads, fc.pre_norm) for _ in range(self.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(d, fc.dim_feedforward, fc.pre_norm) for _ in range(self.num_layers))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(fc.num_queries, d)
        self.query_embed = nn.Embedding(fc.num_queries, d)
        self.level_embed = nn.Embedding(self.num_feature_levels, d)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, d, kernel_size=1) if in_channels != d else nn.Sequential()
            for _ in range(self.num_feature_levels))
        self.mask_embed = MLP(d, d, fc.mask_dim, 3)
        self._mask_pooling_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.class_embed = MLP(d, d, clip_dim, 3)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.num_pos_feats = d // 2

    def heads(self, output, mask_features, target_size, text_classifier, num_templates, with_class: bool):
        """Prediction heads on the (Q, B, d) queries: class logits (or None), mask logits, attention mask."""
        dec = self.decoder_norm(output).transpose(0, 1)  # (B, Q, d)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(dec), mask_features)
        logits = None
        if with_class:
            pooled = self._mask_pooling_proj(mask_pool_logits(mask_features, masks))
            logits = classification_logits(self.class_embed(pooled + dec), text_classifier, self.logit_scale,
                                           num_templates)
        attn = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        attn = (attn.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5)
        return logits, masks, attn.detach()

    def forward(self, feats: list, mask_features, text_classifier, num_templates=None):
        """``feats``: 3 maps (strides 32, 16, 8); ``text_classifier`` (S + 1, D) with void last and
        ``num_templates`` synonym rows per class (None: one each). Returns last-layer (logits (B, Q, C + 1),
        masks (B, Q, h, w))."""
        src, pos, sizes = [], [], []
        for i, x in enumerate(feats):
            sizes.append(tuple(x.shape[-2:]))
            pos.append(sine_position(x, self.num_pos_feats).to(x.dtype).flatten(2).permute(2, 0, 1))
            s = self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))
        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        last = self.num_layers == 0
        logits, masks, attn = self.heads(output, mask_features, sizes[0], text_classifier, num_templates, last)
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            attn[torch.where(attn.sum(-1) == attn.shape[-1])] = False
            output = self.transformer_cross_attention_layers[i](output, src[lvl], attn, pos[lvl], query_embed)
            output = self.transformer_self_attention_layers[i](output, query_embed)
            output = self.transformer_ffn_layers[i](output)
            last = i == self.num_layers - 1
            logits, masks, attn = self.heads(output, mask_features, sizes[(i + 1) % self.num_feature_levels],
                                             text_classifier, num_templates, last)
        return logits, masks


class FCCLIPHead(nn.Module):
    def __init__(self, in_channels: list[int], fc: FcclipConfig, clip_dim: int):
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, fc)
        self.predictor = MaskedTransformerDecoder(fc.conv_dim, fc, clip_dim)


class _Backbone(nn.Module):
    def __init__(self, clip_model):
        super().__init__()
        self.clip_model = clip_model


class _Criterion(nn.Module):
    """Only the training loss's class-weight buffer, which the official checkpoint holds."""

    def __init__(self, num_classes: int, eos_coef: float = 0.1):
        super().__init__()
        w = torch.ones(num_classes + 1)
        w[-1] = eos_coef
        self.register_buffer("empty_weight", w)


class FCCLIP(nn.Module):
    """The whole model (state-dict names = the official checkpoint's). ``clip_model`` is an open_clip
    model with a timm ConvNeXt trunk (shared with the Embed stage's loader)."""

    def __init__(self, clip_model, fc: FcclipConfig):
        super().__init__()
        trunk = clip_model.visual.trunk
        channels = [int(i["num_chs"]) for i in trunk.feature_info]
        if len(channels) != 4:
            raise UserError(f"FC-CLIP needs a 4-stage ConvNeXt trunk, got feature_info {trunk.feature_info}")
        clip_dim = int(clip_model.text_projection.shape[-1])
        self.backbone = _Backbone(clip_model)
        self.sem_seg_head = FCCLIPHead(channels, fc, clip_dim)
        self.void_embedding = nn.Embedding(1, clip_dim)
        self.criterion = _Criterion(fc.num_classes)

    @property
    def visual(self):
        return self.backbone.clip_model.visual

    def trunk(self, x) -> tuple[list, Any]:
        """One pass of the CLIP trunk: ([res2, res3, res4, res5], dense) with dense =
        ``norm_pre(res5)`` = ``trunk.forward_features(x)`` (the map mask pooling reads)."""
        t = self.visual.trunk
        x = t.stem(x)
        feats = []
        for stage in t.stages:
            x = stage(x)
            feats.append(x)
        return feats, t.norm_pre(x)

    def text_classifier(self, text_emb):
        """(C, D) normalised class text embeddings -> (C + 1, D) with the normalised void embedding last."""
        return torch.cat([text_emb, F.normalize(self.void_embedding.weight, dim=-1).to(text_emb.dtype)], 0)

    def forward(self, x, text_classifier, num_templates=None):
        """(B, 3, H, W) normalised (H, W multiples of 32) -> (pred_logits (B, Q, C + 1), pred_masks
        (B, Q, H/4, W/4) logits, dense (B, C', H/32, W/32)). ``text_classifier`` (S + 1, D): the classes'
        synonym rows and the void row (:meth:`text_classifier`); ``num_templates``: rows per class (the
        logit of a class is the max over its rows, FC-CLIP's synonym max), None for one row each."""
        feats, dense = self.trunk(x)
        mask_features, ms = self.sem_seg_head.pixel_decoder(feats)
        logits, masks = self.sem_seg_head.predictor(ms, mask_features.to(ms[0].dtype), text_classifier,
                                                    num_templates)
        return logits, masks, dense


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def build_fcclip(clip_model, fc: FcclipConfig) -> FCCLIP:
    """The architecture with random head weights (seeded with ``fc.seed``) around ``clip_model``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fc.seed)
        return FCCLIP(clip_model, fc)


def load_fcclip(cfg: JobConfig | ModelsConfig, bundle=None) -> FCCLIP:
    """The configured FC-CLIP in eval mode on the CLIP bundle's device. The checkpoint (when set)
    holds every parameter, the CLIP backbone's included (FC-CLIP keeps it frozen), and is loaded
    strictly from a ``.safetensors`` file."""
    from ragseg.models import weights
    from ragseg.models.clip import has_dense_trunk, load_clip

    mcfg = cfg.models if isinstance(cfg, JobConfig) else cfg
    fc = mcfg.fcclip
    bundle = bundle or load_clip(mcfg)
    if not has_dense_trunk(bundle.visual):
        raise UserError(f"label.proposals=fcclip needs a CLIP ConvNeXt trunk (open_clip timm model, e.g. "
                        f"convnext_large_d_320); {bundle.model_id} has none")
    model = build_fcclip(bundle.model, fc)
    if fc.checkpoint:
        path = weights.resolve(fc.checkpoint, fc.sha256, mcfg.weights, what="FC-CLIP checkpoint")
        load_safetensors_into(model, path, fc.checkpoint)
    model = model.to(bundle.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_safetensors_into(model: nn.Module, path: str, ref: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not str(path).endswith(".safetensors"):
        raise UserError(f"FC-CLIP checkpoint {ref}: label jobs load only .safetensors files; convert the "
                        f"official .pth once with `ragseg convert-weights {ref} OUT.safetensors`")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"FC-CLIP checkpoint {ref}: not a readable safetensors file ({e})") from None
    check_state_dict(model, sd, ref)
    model.load_state_dict(sd, strict=True)


def check_state_dict(model: nn.Module, sd: dict, ref: str) -> None:
    """Raise one clear line when ``sd`` misses, adds or reshapes any entry of ``model.state_dict()``."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shape = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or shape:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                extra = f" {want[keys[0]]} != {have[keys[0]]}" if what == "shape mismatch" else ""
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]}{extra})")
        raise UserError(f"FC-CLIP checkpoint {ref} does not match models.fcclip / models.clip: "
                        + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# convert-weights
# ----------------------------------------------------------------------------------------------
def _allowed_globals() -> list:
    """The only non-tensor types a detectron2 checkpoint holds besides dicts and Python scalars:
    numpy arrays (model-zoo conversions store weights as ndarrays) and their dtypes."""
    import numpy as np

    out: list = [np.ndarray, np.dtype]
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover
        from numpy.core.multiarray import _reconstruct, scalar
    out += [_reconstruct, scalar]
    out += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")]
    # the pickles name numpy.core.multiarray (numpy < 2 writers): map that name to the same function
    out.append((_reconstruct, "numpy.core.multiarray._reconstruct"))
    out.append((scalar, "numpy.core.multiarray.scalar"))
    return out


def convert_checkpoint(src: str, out: str, sha256: str | None = None, cfg: ModelsConfig | None = None) -> dict:
    """Load a (detectron2) FC-CLIP ``.pth`` once with ``weights_only=True`` and an explicit allow-list
    of the types it holds (:func:`_allowed_globals`), take its ``model`` state dict (numpy arrays
    become tensors; non-tensor entries are refused), and write ``out`` as safetensors. Returns a
    summary (tensor count, parameters, sha256 of ``out``)."""
    import pickle

    import numpy as np
    from safetensors.torch import save_file

    from ragseg import io
    from ragseg.models import weights

    mcfg = cfg or ModelsConfig()
    path = weights.resolve(src, sha256, mcfg.weights, what="checkpoint to convert")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = " ".join(str(e).split())[:300]
        raise UserError(f"{src}: holds a type outside the allow-list (tensors, numpy arrays, dicts, "
                        f"scalars), refused: {first}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line
        from ragseg.errors import describe

        raise UserError(f"{src}: cannot be read as a PyTorch checkpoint ({describe(e, 200)})") from None
    sd = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"{src}: expected a state dict (or {{'model': state_dict}}), got {type(obj).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, torch.Tensor):
            raise UserError(f"{src}: state-dict entry {k!r} is a {type(v).__name__}, not a tensor")
        tensors[str(k)] = v.detach().contiguous().clone()
    tmp = Path(out).with_name(f".tmp-{Path(out).name}") if "://" not in out else None
    if tmp is not None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"source": src, "format": "ragseg-fcclip"})
        tmp.replace(out)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            local = str(Path(d) / "w.safetensors")
            save_file(tensors, local, metadata={"source": src, "format": "ragseg-fcclip"})
            io.write_bytes_atomic(out, Path(local).read_bytes())
    summary = {"out": out, "tensors": len(tensors),
               "parameters": int(sum(t.numel() for t in tensors.values()))}
    if tmp is not None:
        summary["sha256"] = weights.file_sha256(out)
    return summary
