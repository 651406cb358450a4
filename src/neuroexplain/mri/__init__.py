"""Brain MRI: BIDS / sample-sheet ingest, model-grid preprocessing, mapping back to native space.

Public entry points (imported lazily by the submodules, so ``import neuroexplain.mri`` is cheap):

- :func:`neuroexplain.mri.ingest.ingest_mri` — the ``neuroexplain ingest-mri`` command.
- :func:`neuroexplain.mri.ingest.load_preproc` — read the cached ``preproc.pt``.
- :func:`neuroexplain.mri.preprocess.to_native` / :func:`~neuroexplain.mri.preprocess.to_model` —
  resample between the model grid and a subject's native grid through world coordinates.
"""

from __future__ import annotations

__all__ = ["bids", "ingest", "preprocess"]
