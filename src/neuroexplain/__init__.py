"""neuroexplain: explain deep models of brain MRI and spatial transcriptomics.

Four published methods form the core: concept saliency maps (Brocki & Chung 2019), simulator
networks (Liu et al., IPMI 2021), spatial activation concept vectors (Wang et al. 2022) and
XNN / SRAE explanation spaces (Qi, Khorram & Li 2017).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuroexplain")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
