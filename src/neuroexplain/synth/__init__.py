"""Synthetic data with exact ground truth: planted disease effects in real brain MRI.

* :mod:`neuroexplain.synth.fields` -- smooth deformation fields with exact grid Jacobians,
  calibration of a planted volume change, inversion, label carrying.
* :mod:`neuroexplain.synth.cohort` -- ``make_cohort``: a BIDS cohort with a disease effect planted
  in a seeded subset of subjects and its Jacobian ground truth (``neuroexplain make-cohort``).
"""

from __future__ import annotations

__all__ = ["make_cohort", "plant_subject"]


def __getattr__(name: str):  # lazy: importing the package stays cheap
    if name in __all__:
        from neuroexplain.synth import cohort

        return getattr(cohort, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
