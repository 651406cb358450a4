"""On-disk cache of concept vectors, tied to the classifier checkpoint they were computed from.

Concept activation vectors (CAVs, SACVs), their held-out accuracies and the examples they were
trained on are only valid for the network whose activations they live in. A :class:`CAVStore`
records the sha256 of the checkpoint file; opened with a different checkpoint it **discards**
its entries (and says so in a warning, and in ``store.invalidated``) instead of silently reusing
them. Entries are keyed by the layer, the example sets (hashes of their ids) and the training
parameters, so changing a concept's definition or the CAV options also recomputes.

The file is a plain dict readable with ``torch.load(path, weights_only=True)``.

Example:
    >>> store = CAVStore("results/concepts3d/cavs.pt", sha256_file("model.pt"))  # doctest: +SKIP
    >>> entry = store.get(key) or store.put(key, train_cav(...))  # doctest: +SKIP
    >>> store.save()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from neuroexplain.errors import InputError

__all__ = ["STORE_FORMAT", "CAVStore", "StaleCacheError"]

logger = logging.getLogger(__name__)

STORE_FORMAT = "neuroexplain-cavs/1"


class StaleCacheError(InputError):
    """A cache was computed for another checkpoint than the one in use."""


class CAVStore:
    """Concept-vector cache bound to one checkpoint (see the module docstring).

    Args:
        path: the cache file (``.pt``); need not exist.
        checkpoint_sha256: sha256 of the classifier checkpoint in use.
        strict: raise :class:`StaleCacheError` on a cache of another checkpoint instead of
            discarding it.

    Attributes:
        invalidated: ``True`` when an existing cache was discarded (other checkpoint, other
            format or unreadable).
        hits: entries served from the cache since opening.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None, checkpoint_sha256: str, *, strict: bool = False
    ) -> None:
        if not checkpoint_sha256 or len(checkpoint_sha256) != 64:
            raise ValueError(f"expected a sha256 hex digest, got {checkpoint_sha256!r}")
        self.path = Path(path) if path is not None else None
        self.checkpoint_sha256 = checkpoint_sha256
        self.entries: dict[str, dict[str, Any]] = {}
        self.invalidated = False
        self.hits = 0
        self._dirty = False
        if self.path is not None and self.path.is_file():
            self._load(strict)

    def _load(self, strict: bool) -> None:
        assert self.path is not None
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            logger.warning("ignoring unreadable concept cache %s (%s)", self.path, exc)
            self.invalidated = True
            return
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
            logger.warning("ignoring %s: not a %s cache", self.path, STORE_FORMAT)
            self.invalidated = True
            return
        cached = str(data.get("checkpoint_sha256", ""))
        if cached != self.checkpoint_sha256:
            msg = (
                f"concept cache was computed for checkpoint sha256 {cached[:12]}..., "
                f"not the one in use ({self.checkpoint_sha256[:12]}...)"
            )
            if strict:
                raise StaleCacheError(self.path, msg)
            logger.warning("%s: %s; discarding it and recomputing", self.path, msg)
            self.invalidated = True
            self._dirty = True  # the stale file is replaced on save
            return
        self.entries = dict(data.get("entries", {}))
        logger.info("loaded %d cached concept vectors from %s", len(self.entries), self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached entry for ``key`` or ``None``."""
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Store ``entry`` (tensors, numbers, strings, lists) under ``key``; returns it."""
        self.entries[key] = entry
        self._dirty = True
        return entry

    def save(self, *, provenance: dict[str, Any] | None = None) -> Path | None:
        """Write the cache atomically (only if something changed); returns the path."""
        from neuroexplain.io.atomic import save_torch

        if self.path is None or not self._dirty:
            return self.path
        data = {
            "format": STORE_FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "entries": self.entries,
            # JSON round trip: plain types only (torch.__version__ is a str subclass that
            # weights_only loading rejects)
            "provenance": json.loads(json.dumps(provenance or {}, default=str)),
        }
        save_torch(data, self.path)  # fixed archive name: same bytes
        self._dirty = False
        return self.path
