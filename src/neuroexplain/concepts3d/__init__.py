"""Concept-based explanations of 3D MRI classifiers: TCAV and spatial concept vectors (SACV).

- :mod:`~neuroexplain.concepts3d.activations`: layer activations / gradients by dotted name;
- :mod:`~neuroexplain.concepts3d.concepts`: user-defined concepts (subjects, dseg regions);
- :mod:`~neuroexplain.concepts3d.tcav`: CAVs, TCAV scores, t-tests (Kim et al. 2018);
- :mod:`~neuroexplain.concepts3d.sacv`: spatial activation concept vectors, relevance and
  contribution maps (Wang, Lee & Qi 2022);
- :mod:`~neuroexplain.concepts3d.store`: the CAV cache tied to a checkpoint;
- :mod:`~neuroexplain.concepts3d.run`: end-to-end runs behind ``neuroexplain tcav`` / ``sacv``.
"""

from __future__ import annotations

from neuroexplain.concepts3d.activations import (
    LayerHooks,
    get_module,
    layer_activations,
    layer_gradients,
)
from neuroexplain.concepts3d.concepts import (
    Concept,
    ConceptSpec,
    build_concept,
    load_concept_config,
    random_concepts,
)
from neuroexplain.concepts3d.sacv import SACV, spatial_vectors, train_sacv
from neuroexplain.concepts3d.store import CAVStore, StaleCacheError
from neuroexplain.concepts3d.tcav import CAV, TCAV, tcav_score, tcav_significance, train_cav

__all__ = [
    "CAV",
    "SACV",
    "TCAV",
    "CAVStore",
    "Concept",
    "ConceptSpec",
    "LayerHooks",
    "StaleCacheError",
    "build_concept",
    "get_module",
    "layer_activations",
    "layer_gradients",
    "load_concept_config",
    "random_concepts",
    "spatial_vectors",
    "tcav_score",
    "tcav_significance",
    "train_cav",
    "train_sacv",
]
