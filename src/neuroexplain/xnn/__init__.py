"""XNN: an explanation space of a 3D classifier learned by a Sparse Reconstruction Autoencoder.

Qi, Khorram & Li 2017, "Embedding Deep Networks into Visual Explanations" (arXiv:1709.05360).

- :mod:`~neuroexplain.xnn.srae`: the SRAE, its losses, training, checkpoints;
- :mod:`~neuroexplain.xnn.explain`: layer features, feature attribution maps, metrics;
- :mod:`~neuroexplain.xnn.run`: ``neuroexplain xnn-train`` / ``xnn-explain``.
"""

from __future__ import annotations

from neuroexplain.xnn.explain import (
    LayerFeatures,
    XNNExplainer,
    default_layer,
    explanation_metrics,
    extract_activations,
)
from neuroexplain.xnn.srae import (
    SRAE,
    SRAEConfig,
    SRAELoss,
    load_srae,
    pull_away_loss,
    r2_score,
    save_srae,
    significant_features,
    sparse_reconstruction_loss,
    train_srae,
    usage_balance_loss,
)

__all__ = [
    "SRAE",
    "LayerFeatures",
    "SRAEConfig",
    "SRAELoss",
    "XNNExplainer",
    "default_layer",
    "explanation_metrics",
    "extract_activations",
    "load_srae",
    "pull_away_loss",
    "r2_score",
    "save_srae",
    "significant_features",
    "sparse_reconstruction_loss",
    "train_srae",
    "usage_balance_loss",
]
