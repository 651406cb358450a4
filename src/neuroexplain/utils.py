"""Device, seeding and small shared helpers."""

from __future__ import annotations

import logging
import os
import random

import numpy as np

__all__ = ["amp_enabled", "resolve_device", "seed_everything"]

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto"):
    """Resolve ``"auto"`` once: CUDA if available (e.g. a Slurm job with ``--gpus``), else CPU.

    Returns:
        A ``torch.device``.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    logger.info("using device %s", dev)
    return dev


def amp_enabled(device) -> bool:
    """Mixed precision only on CUDA; CPU runs stay in float32 (and bitwise reproducible)."""
    return getattr(device, "type", str(device)) == "cuda"


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (via MONAI's ``set_determinism``) for reproducible runs.

    On CPU, the same seed and config give bitwise-identical outputs; deterministic algorithms are
    requested from torch (``warn_only`` so CUDA ops without a deterministic kernel still run).
    """
    import torch
    from monai.utils import set_determinism

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - libraries still draw from the global RNG
    torch.manual_seed(seed)
    set_determinism(seed=seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
