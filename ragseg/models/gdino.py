"""Grounding DINO through transformers: load the real model, or build a tiny random one for tests.

``load_gdino(models_cfg) -> (model, processor, model_id)``.

Real path: ``models.gdino.model_id`` is a Hugging Face hub id (``IDEA-Research/grounding-dino-base``,
its snapshot downloaded into ``<cache>/hf``), a local directory written by ``save_pretrained``, or the
URI of such a directory on a bucket / web server (``s3://``, ``gs://``, ``http(s)://``...), which is
copied into ``<cache>/gdino/<key>/`` with fsspec first; ``models.weights.mirror`` is tried before any
download (:func:`ragseg.models.weights.resolve_model_dir`). Model and processor are then loaded with
``from_pretrained`` from that local folder.

Tiny path (``model_id: null``): the real :class:`GroundingDinoForObjectDetection` class built from a
:class:`GroundingDinoConfig` with a tiny Swin backbone and a tiny BERT text encoder, random weights
drawn from ``models.gdino.seed``. The tokenizer cannot be downloaded, so a WordPiece vocabulary is
generated (written to the cache dir) with BERT's ids for the tokens Grounding DINO treats as phrase
delimiters (``[CLS]`` 101, ``[SEP]`` 102, ``.`` 1012, ``?`` 1029: they are hard-coded in the model).
"""

from __future__ import annotations

import hashlib
import logging
import os
import string
from typing import Any

from ragseg import io as rio
from ragseg.config import GroundingDinoConfig, ModelsConfig, WeightsConfig
from ragseg.errors import UserError
from ragseg.models.weights import _key, cache_root

log = logging.getLogger(__name__)

# Tokens whose ids Grounding DINO hard-codes (transformers SPECIAL_TOKENS = [101, 102, 1012, 1029]).
_FIXED_TOKENS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}

# Words in the generated vocabulary besides characters (so common class names are not all
# character pieces); anything else still tokenizes through single letters and their '##' forms.
_WORDS = (
    "a an the of and or in on with for to at by from is are this that there photo picture image "
    "person people man woman child boy girl baby face hand head hair arm leg eye body "
    "cat dog horse sheep cow elephant bear zebra giraffe bird fish mouse animal "
    "car truck bus train boat airplane plane bicycle bike motorcycle vehicle wheel road street "
    "house building wall floor ceiling roof window door stairs fence bridge tower sky cloud "
    "tree grass plant flower bush leaf field mountain hill rock stone sand water sea river lake "
    "snow ground dirt earth table chair sofa couch bed desk shelf cabinet lamp light "
    "bottle cup glass bowl plate fork knife spoon food pizza cake apple banana orange "
    "book clock vase box bag umbrella sign pole paper screen monitor tv television laptop phone "
    "keyboard computer kitchen oven sink refrigerator toilet bath mirror curtain rug carpet "
    "pillow blanket towel shirt hat shoe red green blue white black yellow small large big "
    "background thing stuff object other top bottom left right"
).split()

_TINY_DEFAULTS: dict[str, Any] = {
    # GroundingDinoConfig fields
    "d_model": 32,  # must be a multiple of 32 (GroupNorm(32, d_model))
    "encoder_layers": 1,
    "decoder_layers": 2,  # 1 trips transformers' tied-weights check of bbox_embed.1+
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_n_points": 2,
    "decoder_n_points": 2,
    "num_queries": 16,
    "num_feature_levels": 4,
    "max_text_len": 256,
    # sub-configs (merged over the defaults below)
    "backbone": {},
    "text": {},
    # image processor: shortest / longest edge after resize
    "image_size": 96,
    "max_image_size": 128,
}
_TINY_BACKBONE: dict[str, Any] = {
    "embed_dim": 16,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "window_size": 4,
    "image_size": 96,
    "out_indices": [2, 3, 4],
}
_TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
}


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# Tiny model
# ----------------------------------------------------------------------------------------------
def tiny_vocab() -> list[str]:
    """A WordPiece vocabulary with BERT's ids for the delimiter tokens Grounding DINO hard-codes."""
    size = max(_FIXED_TOKENS.values()) + 1
    tokens: list[str | None] = [None] * size
    for tok, i in _FIXED_TOKENS.items():
        tokens[i] = tok
    chars = [c for c in string.punctuation if c not in ".?"] + list(string.digits) + list(string.ascii_lowercase)
    fill = chars + ["##" + c for c in string.digits + string.ascii_lowercase] + ["##" + c for c in chars[:32]]
    seen = set(_FIXED_TOKENS)
    queue = [t for t in dict.fromkeys(fill + _WORDS) if t not in seen]
    slots = [i for i in range(110, size) if tokens[i] is None]  # keep 1..99 [unused] like BERT
    extra = []
    for tok in queue:
        if slots:
            tokens[slots.pop(0)] = tok
        else:
            extra.append(tok)
    out = [t if t is not None else f"[unused{i}]" for i, t in enumerate(tokens)] + extra
    assert len(set(out)) == len(out)
    return out


def _tiny_tokenizer(weights_cfg: WeightsConfig | None):
    from transformers import BertTokenizerFast

    vocab = tiny_vocab()
    text = "\n".join(vocab) + "\n"
    d = os.path.join(cache_root(weights_cfg), "gdino-tiny")
    path = os.path.join(d, f"vocab-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt")
    if not os.path.exists(path):
        rio.write_text_atomic(path, text)
    with open(path, encoding="utf-8") as f:
        mapping = {line.rstrip("\n"): i for i, line in enumerate(f) if line.rstrip("\n")}
    tok = BertTokenizerFast(vocab=mapping, do_lower_case=True)
    if tok.cls_token_id != 101 or tok.convert_tokens_to_ids(".") != 1012:
        raise RuntimeError("tiny Grounding DINO vocabulary has the wrong delimiter ids")
    return tok, len(mapping)


def tiny_settings(gcfg: GroundingDinoConfig) -> dict[str, Any]:
    """Defaults merged with ``gdino.tiny`` (unknown keys are rejected)."""
    over = dict(gcfg.tiny or {})
    from transformers import GroundingDinoConfig as HFConfig

    known = set(_TINY_DEFAULTS) | set(getattr(HFConfig, "__annotations__", {}))
    bad = sorted(set(over) - known)
    if bad:
        raise UserError(f"models.gdino.tiny: unknown keys {bad}")
    s = {**_TINY_DEFAULTS, **over}
    s["backbone"] = {**_TINY_BACKBONE, **(over.get("backbone") or {})}
    s["text"] = {**_TINY_TEXT, **(over.get("text") or {})}
    return s


def build_tiny(gcfg: GroundingDinoConfig, weights_cfg: WeightsConfig | None = None):
    """The real Grounding DINO classes at a tiny size, random weights from ``gcfg.seed``."""
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers import (
        GroundingDinoConfig as HFConfig,
    )

    s = tiny_settings(gcfg)
    tokenizer, vocab_size = _tiny_tokenizer(weights_cfg)
    text_cfg = BertConfig(vocab_size=vocab_size, **s["text"])
    backbone_cfg = SwinConfig(**s["backbone"])
    fields = {k: v for k, v in s.items() if k not in ("backbone", "text", "image_size", "max_image_size")}
    config = HFConfig(backbone_config=backbone_cfg, text_config=text_cfg, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(gcfg.seed)
        model = GroundingDinoForObjectDetection(config)
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": int(s["image_size"]), "longest_edge": int(s["max_image_size"])}
    )
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model_id = f"tiny-gdino:{_key(s, gcfg.seed)}"
    return model, processor, model_id


def base_config():
    """The ``IDEA-Research/grounding-dino-base`` architecture (Swin-B 384 backbone, BERT-base text),
    for construction checks without a download."""
    from transformers import BertConfig, SwinConfig
    from transformers import GroundingDinoConfig as HFConfig

    backbone = SwinConfig(
        image_size=384,
        embed_dim=128,
        depths=[2, 2, 18, 2],
        num_heads=[4, 8, 16, 32],
        window_size=12,
        out_indices=[2, 3, 4],
    )
    return HFConfig(backbone_config=backbone, text_config=BertConfig(), num_queries=900)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_gdino(models_cfg: ModelsConfig):
    """-> ``(model, processor, model_id)``; the model is in eval mode, on the CPU."""
    gcfg = models_cfg.gdino
    wcfg = models_cfg.weights
    if gcfg.model_id is None:
        model, processor, model_id = build_tiny(gcfg, wcfg)
        model.eval()
        return model, processor, model_id

    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    from ragseg.models.weights import resolve_model_dir

    ref = gcfg.model_id
    # a local folder, a folder URI copied into the cache, or a hub id's snapshot (mirror first)
    path = resolve_model_dir(ref, gcfg.revision, wcfg)
    try:
        model = GroundingDinoForObjectDetection.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load Grounding DINO {ref!r}: {e}") from None
    model.eval()
    model_id = ref if gcfg.revision is None else f"{ref}@{gcfg.revision}"
    return model, processor, model_id
