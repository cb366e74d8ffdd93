"""The configured mask model's batch runner, by family (kept apart from ``sam.py``, which both
runners import)."""

from __future__ import annotations

from ragseg.config import ModelsConfig


def load_mask_model(models_cfg: ModelsConfig, device: str):
    """The configured mask model's batch runner: ``ragseg.models.sam_batch.SamBatch`` (segment_anything)
    or ``ragseg.models.sam2_batch.Sam2Batch`` (SAM 2.1)."""
    if models_cfg.sam.family == "sam2":
        from ragseg.models.sam2_batch import Sam2Batch

        return Sam2Batch(models_cfg, device)
    from ragseg.models.sam_batch import SamBatch

    return SamBatch(models_cfg, device)
