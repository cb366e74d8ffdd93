"""Arrow schemas of the files ragseg writes (see ARCHITECTURE.md, "Rows and files")."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FEATURE_COLUMNS = [
    "image_id", "segment_id", "label", "label_source", "score", "box", "area", "mask_rle",
    "embedding", "embed_model", "embed_mode",
]


# A mask as COCO compressed RLE, stored so that pycocotools reads a row's value as is:
# ``pycocotools.mask.decode(row["mask_rle"])`` (``size`` = [height, width], ``counts`` = the RLE bytes).
# Files written before ragseg 0.3 hold the RLE as a JSON string: ragseg.masks.decode_mask reads both.
MASK_TYPE = pa.struct([pa.field("size", pa.list_(pa.int32(), 2)), pa.field("counts", pa.binary())])


def masks_to_arrow(rles) -> pa.StructArray:
    """COCO RLEs (ragseg's JSON strings, or dicts) -> a :data:`MASK_TYPE` array."""
    from ragseg.masks import as_rle

    sizes, counts = [], []
    for r in rles:
        d = as_rle(r)
        sizes.extend((int(d["size"][0]), int(d["size"][1])))
        counts.append(bytes(d["counts"]))
    size_arr = pa.FixedSizeListArray.from_arrays(pa.array(sizes, pa.int32()), 2)
    return pa.StructArray.from_arrays([size_arr, pa.array(counts, pa.binary())], fields=list(MASK_TYPE))


def feature_schema(dim: int) -> pa.Schema:
    """One row per database segment; ``embedding`` is a fixed-size list of float16, L2-normalised."""
    return pa.schema(
        [
            pa.field("image_id", pa.string()),
            pa.field("segment_id", pa.int64()),
            pa.field("label", pa.dictionary(pa.int32(), pa.string())),
            pa.field("label_source", pa.dictionary(pa.int8(), pa.string())),  # gt | detector
            pa.field("score", pa.float32()),
            pa.field("box", pa.list_(pa.float32(), 4)),  # xyxy pixels
            pa.field("area", pa.int64()),
            pa.field("mask_rle", MASK_TYPE),  # COCO RLE: pycocotools.mask.decode(row["mask_rle"])
            pa.field("embedding", pa.list_(pa.float16(), dim)),
            pa.field("embed_model", pa.dictionary(pa.int8(), pa.string())),
            pa.field("embed_mode", pa.dictionary(pa.int8(), pa.string())),
        ]
    )


def embeddings_to_arrow(emb: np.ndarray) -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def arrow_to_embeddings(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Fixed-size-list column -> (N, dim) float32 array (zero-copy where possible)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
