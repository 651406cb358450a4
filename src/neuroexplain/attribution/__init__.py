"""Attribution maps of the MRI classifier: Captum / MONAI baselines and native-space export."""

from __future__ import annotations

from neuroexplain.attribution.baselines import (
    DEFAULT_PARAMS,
    METHODS,
    BaselineExplainer,
    attribute_baselines,
)

__all__ = ["DEFAULT_PARAMS", "METHODS", "BaselineExplainer", "attribute_baselines"]
