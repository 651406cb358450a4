"""Training of the 3D MRI classifier: split, loop, early stopping, checkpoints and metrics."""

from __future__ import annotations

from neuroexplain.train.classifier import (
    SPLITS,
    TrainConfig,
    binary_metrics,
    load_preproc_dict,
    make_split,
    predict_logits,
    read_split,
    train_classifier,
)

__all__ = [
    "SPLITS",
    "TrainConfig",
    "binary_metrics",
    "load_preproc_dict",
    "make_split",
    "predict_logits",
    "read_split",
    "train_classifier",
]
