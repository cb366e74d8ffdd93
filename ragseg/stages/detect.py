"""Detect: Grounding DINO boxes for class-name prompts (Ray Data callable).

In: ``image``, ``labels``, ``error``. Out: ``boxes`` ((n, 4) float32 xyxy pixels, inside the image,
sorted by score desc), ``box_labels`` (list[str], names from the prompt vocabulary) and
``box_scores`` ((n,) float32).

The prompt is Grounding DINO's ``"a . b . c ."`` over the lowercased class names. A vocabulary whose
prompt would exceed the text encoder's token limit is split into chunks; each chunk runs batched over
the batch's images, each box is mapped to the class whose token span it scores highest (or the class
whose name equals the decoded phrase), then the chunks are merged with per-class NMS and capped.
The math is in pure functions below (no model, no Ray).
"""

from __future__ import annotations

import logging
import re
import types
from collections.abc import Sequence

import numpy as np

from ragseg.config import JobConfig
from ragseg.errors import error_text
from ragseg.stages.batch import as_list, as_rgb, errors_of, object_column

log = logging.getLogger(__name__)

STAGE = "detect"


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------
def prompt_name(name: str) -> str:
    """A class name as it appears in the prompt: lowercase, single spaces, no '.' / '?' (they are
    Grounding DINO's phrase delimiters)."""
    return " ".join(re.sub(r"[.?]", " ", str(name).lower()).split())


def unique_names(names: Sequence[str]) -> list[str]:
    """Names in first-seen order, dropping empties and duplicates (by prompt form)."""
    out, seen = [], set()
    for n in names:
        p = prompt_name(n)
        if p and p not in seen:
            seen.add(p)
            out.append(str(n))
    return out


def build_prompt(names: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """``["Cat", "traffic light"]`` -> ``("cat . traffic light .", [(0, 3), (6, 19)])``: the prompt and
    the character span of each name in it."""
    parts, spans, pos = [], [], 0
    for n in names:
        p = prompt_name(n)
        spans.append((pos, pos + len(p)))
        parts.append(p + " .")
        pos += len(p) + 3
    return " ".join(parts), spans


def chunk_names(token_counts: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy split of classes (their token counts, without specials) into chunks whose prompt
    ``[CLS] a . b . [SEP]`` stays within ``max_tokens``. Returns lists of class indices in order; a
    class longer than the limit on its own gets its own chunk."""
    budget = max_tokens - 2  # [CLS] and [SEP]
    chunks: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, c in enumerate(token_counts):
        cost = int(c) + 1  # the name and its " ."
        if cur and used + cost > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += cost
    if cur:
        chunks.append(cur)
    return chunks


def token_spans(offsets: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]],
                limit: int | None = None) -> list[tuple[int, int]]:
    """Token index range ``[start, end)`` of each character span, from a tokenizer's offset mapping
    (special tokens have offsets ``(0, 0)``); ranges are clipped at ``limit`` tokens (empty if the
    name was cut off)."""
    n = len(offsets) if limit is None else min(len(offsets), limit)
    out = []
    for a, b in char_spans:
        idx = [t for t in range(n) if offsets[t][1] > offsets[t][0] and offsets[t][0] >= a and offsets[t][1] <= b]
        out.append((idx[0], idx[-1] + 1) if idx else (0, 0))
    return out


def span_scores(probs: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """(k, T) per-token probabilities of k boxes -> (k, C) score of each class = max over its span."""
    probs = np.asarray(probs, dtype=np.float32)
    out = np.zeros((probs.shape[0], len(spans)), dtype=np.float32)
    for c, (a, b) in enumerate(spans):
        if b > a:
            out[:, c] = probs[:, a:b].max(axis=1)
    return out


def assign_classes(phrases: Sequence[str], probs: np.ndarray, spans: Sequence[tuple[int, int]],
                   names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Map each box to a class of ``names``: the class whose prompt form equals the decoded phrase
    when there is one, else the class whose token span scores highest. Returns (class index, that
    class's span score) per box."""
    scores = span_scores(probs, spans)
    lookup = {prompt_name(n): i for i, n in enumerate(names)}
    idx = np.zeros(len(phrases), dtype=np.int64)
    for k, ph in enumerate(phrases):
        exact = lookup.get(prompt_name(ph.replace("[SEP]", "").replace("[CLS]", "")))
        idx[k] = exact if exact is not None else int(np.argmax(scores[k])) if scores.shape[1] else 0
    sc = scores[np.arange(len(idx)), idx] if len(idx) and scores.shape[1] else np.zeros(len(idx), np.float32)
    return idx, sc.astype(np.float32)


def merge_detections(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, image_hw: tuple[int, int],
                     nms_iou: float, max_boxes: int, min_size: float = 1.0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip boxes to the image, drop ones thinner than ``min_size`` pixels, per-class NMS, sort by score
    desc, keep ``max_boxes``. Returns (boxes (n,4) float32, scores (n,) float32, classes (n,) int64)."""
    import torch
    from torchvision.ops import batched_nms

    h, w = image_hw
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    c = np.asarray(classes, dtype=np.int64).reshape(-1)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    ok = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size) & np.isfinite(s)
    b, s, c = b[ok], s[ok], c[ok]
    if len(b) == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    # stable order first (score desc, then input order) so ties resolve the same way every run
    order = np.lexsort((np.arange(len(s)), -s))
    b, s, c = b[order], s[order], c[order]
    keep = batched_nms(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(c), float(nms_iou)).numpy()
    keep = np.sort(keep)[:max_boxes]  # already score-sorted input: sorting indices keeps score order
    return b[keep], s[keep], c[keep]


# ----------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------
class Detect:
    """Ray Data callable: Grounding DINO boxes for each image's class names (or a fixed ``vocab``)."""

    def __init__(self, cfg: JobConfig, vocab: list[str] | None = None):
        from ragseg.models.gdino import load_gdino
        from ragseg.runtime import select_device

        self.cfg = cfg
        self.gcfg = cfg.models.gdino
        self.device = select_device(cfg.models.device)
        self.model, self.processor, self.model_id = load_gdino(cfg.models)
        self.model.to(self.device)
        self.tokenizer = self.processor.tokenizer
        self.max_tokens = min(int(self.gcfg.max_text_tokens), int(self.model.config.max_text_len))
        self.vocab = unique_names(vocab) if vocab is not None else None
        self._plans: dict[tuple[str, ...], list[dict]] = {}

    # -- prompt plans ---------------------------------------------------------------------------
    def count_tokens(self, name: str) -> int:
        return len(self.tokenizer(prompt_name(name), add_special_tokens=False)["input_ids"])

    def plan(self, names: Sequence[str]) -> list[dict]:
        """Chunks of a vocabulary: ``{"names", "prompt", "spans"}`` each, cached per vocabulary."""
        key = tuple(names)
        if key in self._plans:
            return self._plans[key]
        counts = [self.count_tokens(n) for n in names]
        plans = []
        for idx in chunk_names(counts, self.max_tokens):
            sub = [names[i] for i in idx]
            prompt, char_spans = build_prompt(sub)
            enc = self.tokenizer(prompt, return_offsets_mapping=True)
            spans = token_spans(enc["offset_mapping"], char_spans, limit=self.max_tokens)
            plans.append({"index": idx, "names": sub, "prompt": prompt, "spans": spans,
                          "tokens": len(enc["input_ids"])})
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[key] = plans
        return plans

    # -- model ----------------------------------------------------------------------------------
    def _run_chunk(self, images: list[np.ndarray], chunk: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One prompt chunk over some images -> per image (boxes, scores, class index in the chunk)."""
        import torch

        from ragseg.runtime import autocast

        g = self.gcfg
        # the image processor (torchvision backend) resizes and normalises on the model's device: the
        # actor's host only hands over the decoded uint8 arrays
        inputs = self.processor(images=images, text=[chunk["prompt"]] * len(images), return_tensors="pt",
                                truncation=True, max_length=self.max_tokens, device=self.device)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode(), autocast(self.device, self.cfg.models.device):
            out = self.model(**inputs)
        input_ids = inputs["input_ids"].cpu()
        raw = types.SimpleNamespace(logits=out.logits.float().cpu(), pred_boxes=out.pred_boxes.float().cpu(),
                                    input_ids=input_ids)
        sizes = [(int(im.shape[0]), int(im.shape[1])) for im in images]
        results = self.processor.post_process_grounded_object_detection(
            raw, input_ids=input_ids, threshold=g.box_threshold, text_threshold=g.text_threshold,
            target_sizes=sizes)
        probs_all = torch.sigmoid(raw.logits)
        res = []
        for i, r in enumerate(results):
            keep = probs_all[i].max(dim=-1).values > g.box_threshold  # the same filter as post-processing
            probs = probs_all[i][keep].numpy()
            phrases = list(r["text_labels"])
            cls, sc = assign_classes(phrases, probs, chunk["spans"], chunk["names"])
            boxes = r["boxes"].numpy().astype(np.float32)
            ok = sc > g.box_threshold if g.box_threshold > 0 else np.ones(len(sc), bool)
            res.append((boxes[ok], sc[ok], cls[ok]))
        return res

    def detect_images(self, images: list[np.ndarray], names: list[str]) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Images sharing one vocabulary -> per image (boxes, scores, labels), merged over chunks."""
        g = self.gcfg
        per: list[list] = [[] for _ in images]
        for chunk in self.plan(names):
            for s in range(0, len(images), g.batch_size):
                part = images[s:s + g.batch_size]
                for j, (b, sc, c) in enumerate(self._run_chunk(part, chunk)):
                    glob = np.asarray(chunk["index"], dtype=np.int64)[c] if len(c) else np.zeros(0, np.int64)
                    per[s + j].append((b, sc, glob))
        out = []
        for img, parts in zip(images, per):
            b = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 4), np.float32)
            sc = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
            c = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
            mb, ms, mc = merge_detections(b, sc, c, img.shape[:2], g.nms_iou, g.max_boxes)
            out.append((mb, ms, [names[int(k)] for k in mc]))
        return out

    # -- batch ----------------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image"]) if "image" in batch else len(batch.get("error", []))
        errors = errors_of(batch, n)
        boxes: list = [np.zeros((0, 4), np.float32) for _ in range(n)]
        labels: list = [[] for _ in range(n)]
        scores: list = [np.zeros(0, np.float32) for _ in range(n)]

        groups: dict[tuple[str, ...], list[int]] = {}
        images: dict[int, np.ndarray] = {}
        for i in range(n):
            if errors[i]:
                continue
            try:
                images[i] = as_rgb(batch["image"][i])
                names = self.vocab if self.vocab is not None else unique_names(
                    [str(x) for x in as_list(batch["labels"][i] if "labels" in batch else None)])
            except Exception as e:  # noqa: BLE001 - one bad row never stops the batch
                errors[i] = error_text(STAGE, e)
                continue
            if names:
                groups.setdefault(tuple(names), []).append(i)

        for names, rows in groups.items():
            try:
                results = self.detect_images([images[i] for i in rows], list(names))
            except Exception:  # noqa: BLE001 - isolate the failing row(s)
                results = []
                for i in rows:
                    try:
                        results.append(self.detect_images([images[i]], list(names))[0])
                    except Exception as e:  # noqa: BLE001
                        log.warning("detect failed on a row: %s", e)
                        errors[i] = error_text(STAGE, e)
                        results.append(None)
            for i, r in zip(rows, results):
                if r is not None:
                    boxes[i], scores[i], labels[i] = r

        out = dict(batch)
        out["boxes"] = object_column(boxes)
        out["box_labels"] = object_column(labels)
        out["box_scores"] = object_column(scores)
        out["error"] = np.array(errors, dtype=object)
        return out

