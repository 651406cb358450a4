"""3D MRI classifiers (MONAI-based) and their checkpoints."""

from __future__ import annotations

from neuroexplain.models.classifier import (
    ARCHITECTURES,
    SmallCNN3D,
    build_model,
    default_target_layer,
    get_layer,
    layer_names,
    load_classifier,
    save_classifier,
)

__all__ = [
    "ARCHITECTURES",
    "SmallCNN3D",
    "build_model",
    "default_target_layer",
    "get_layer",
    "layer_names",
    "load_classifier",
    "save_classifier",
]
