"""Helpers for Ray Data numpy batches shared by every stage: per-row list cells, the ``error``
column, object columns of ragged values, and the row contract (:func:`map_rows`: skip errored rows,
fill empty outputs, mark a failing row alone), which every model and CPU stage runs through; only
DecodeImages (its read errors name the URI) and Detect (rows grouped by their prompt vocabulary before
the batched pass) keep their own loop over the same contract."""

from __future__ import annotations

import numpy as np


def batch_len(batch: dict[str, np.ndarray]) -> int:
    for v in batch.values():
        return len(v)
    return 0


def as_list(value) -> list:
    """A per-row list cell (list, numpy array, None) -> python list."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def as_rgb(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[2] < 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    img = img[:, :, :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def errors_of(batch: dict, n: int) -> list[str]:
    err = batch.get("error")
    if err is None:
        return [""] * n
    return ["" if e is None else str(e) for e in as_list(err)]


FCCLIP_INPUT = "fcclip_input"  # FcclipPrep's column: the image at FC-CLIP's test size (uint8, unpadded)


def model_inputs(batch: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Row ``i``'s image for a model stage: (``fcclip_input``, the original (H, W)) when FC-CLIP's CPU
    task prepared it, else (``image``, None)."""
    if FCCLIP_INPUT in batch:
        return np.asarray(batch[FCCLIP_INPUT][i]), (int(batch["height"][i]), int(batch["width"][i]))
    img = np.asarray(batch["image"][i])
    if img.dtype == object:  # a column built from equal-shape images nests one level deeper
        img = np.asarray(img.tolist(), dtype=np.uint8)
    return img, None


def object_column(values: list) -> np.ndarray:
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


def map_rows(batch: dict[str, np.ndarray], stage: str, prepare, run=None, empty=None, log=None
             ) -> tuple[list, list[str]]:
    """The row contract every stage follows, in one place. Rows whose ``error`` is set are skipped;
    ``prepare(i)`` makes row ``i``'s input (an exception marks that row alone, ``"<stage>: <Type>:
    <msg>"``; None: nothing to compute); ``run(inputs) -> outputs`` computes every prepared row at
    once, and row by row when that fails, so a failing row is marked alone (:func:`run_batched`;
    None: the prepared value is the output). Returns (one output per row, ``empty()`` for skipped,
    empty or failed rows; the ``error`` column as a list)."""
    from ragseg.errors import error_text

    n = batch_len(batch)
    errors = errors_of(batch, n)
    prepared: dict = {}
    for i in range(n):
        if errors[i]:
            continue
        try:
            x = prepare(i)
        except Exception as e:  # noqa: BLE001 - one bad row never stops the batch
            errors[i] = error_text(stage, e)
            continue
        if x is not None:
            prepared[i] = x
    done = run_batched(prepared, run, errors, stage, log) if run is not None else prepared
    return [done[i] if (i in done and not errors[i]) else empty() for i in range(n)], errors


def run_batched(prepared: dict, fn, errors: list[str], stage: str, log=None) -> dict:
    """``fn(list of prepared inputs) -> list of outputs`` over every prepared row at once; when the
    batched call fails, row by row, so one bad row errors alone (``errors[i]`` set). Returns
    ``{row index: output}`` for the rows that succeeded."""
    from ragseg.errors import error_text

    out: dict = {}
    if not prepared:
        return out
    try:
        for i, o in zip(prepared, fn(list(prepared.values())), strict=True):
            out[i] = o
    except Exception as batch_exc:  # noqa: BLE001 - one bad row never stops the batch
        if len(prepared) == 1:
            errors[next(iter(prepared))] = error_text(stage, batch_exc)
            return out
        if log is not None:
            log.warning("%s: batched pass failed (%s); retrying row by row", stage, batch_exc)
        for i, x in prepared.items():
            try:
                out[i] = fn([x])[0]
            except Exception as e:  # noqa: BLE001
                errors[i] = error_text(stage, e)
    return out
