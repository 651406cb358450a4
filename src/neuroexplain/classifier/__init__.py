"""The 3D MRI classifier: its networks, data and split, metrics, augmentation and training.

- :mod:`~neuroexplain.classifier.network`: the networks (MONAI blocks, dotted layer names) and
  their checkpoints (:func:`~neuroexplain.classifier.network.save_classifier`,
  :func:`~neuroexplain.classifier.network.load_classifier`);
- :mod:`~neuroexplain.classifier.data`: ``preproc.pt`` loading and the subject split
  (``split.tsv``) the explanation stages also read;
- :mod:`~neuroexplain.classifier.metrics`: binary metrics and a model's logits;
- :mod:`~neuroexplain.classifier.augment`: the batched training augmentation;
- :mod:`~neuroexplain.classifier.train`: the training loop (``neuroexplain train-classifier``),
  its phases, model selection and resumable state.

The names below are imported from their submodule on first use, so importing one submodule
(e.g. the split I/O) does not import the networks.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule defining it
_EXPORTS = {
    "ARCHITECTURES": "network",
    "SmallCNN3D": "network",
    "build_model": "network",
    "default_target_layer": "network",
    "get_layer": "network",
    "layer_names": "network",
    "load_classifier": "network",
    "save_classifier": "network",
    "SPLITS": "data",
    "load_preproc_dict": "data",
    "make_split": "data",
    "read_split": "data",
    "binary_metrics": "metrics",
    "predict_logits": "metrics",
    "BatchAugment": "augment",
    "TrainConfig": "train",
    "train_classifier": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
