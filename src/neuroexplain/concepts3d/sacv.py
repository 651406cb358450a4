"""Spatial Activation Concept Vectors (SACV): where in a 3D volume a concept lives and counts.

Wang, Lee & Qi 2022, "Exploring Concept Contribution Spatially: Hidden Layer Interpretation with
Spatial Activation Concept Vector" (arXiv:2205.11511). Instead of one vector per volume (TCAV),
every spatial position ``p`` of a convolutional layer's output ``a`` ``(C, X', Y', Z')`` gives one
activation vector ``a(p)`` ``(C,)``; a linear classifier trained on the positions of concept
examples vs those of random examples yields the SACV ``v`` ``(C,)``. For an input volume:

- **relevance** ``R(p) = <v, a(p)>``: how strongly the concept is present at ``p``. The raw
  projection has an arbitrary offset (ReLU activations are non-negative, so background and
  anti-concept positions can project far from zero); by default the map is measured from the
  SACV classifier's decision boundary, ``R(p) + b / ||w||`` (> 0 where the classifier says
  "concept"), and its negative part is dropped (``relevance="positive"``); ``"signed"`` keeps it,
  ``"raw"`` gives ``<v, a(p)>`` as is;
- **contribution** ``S(p) = <v, d logit / d a(p)>``: how moving the activation at ``p`` along the
  concept changes the class logit (the per-position directional derivative of TCAV);
- both maps ``(X', Y', Z')`` are upsampled (trilinear) to the input grid ``(X, Y, Z)``;
- a scalar **spatial contribution score** per volume: the presence-weighted mean contribution
  ``sum_p P(p) S(p) / sum_p P(p)`` with ``P(p) = sigmoid(w . a(p) + b)`` the SACV classifier's
  probability that the concept is present at ``p``.

The per-position vectors are taken **channels-last**: ``(B, C, X', Y', Z') -> (B, X', Y', Z', C)
-> (B * X' * Y' * Z', C)``. Reshaping the channels-first tensor directly (as the original
notebook did) mixes channels of different positions into scrambled vectors
(:func:`spatial_vectors` is tested against that).

Example:
    >>> cav = train_sacv(model, "features.2", concept, random)  # doctest: +SKIP
    >>> rel, con = SACV(model, "features.2", cav).attribute(x, target=0)  # (B, 1, X, Y, Z) each
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuroexplain.concepts3d.activations import get_module, layer_activations, layer_gradients
from neuroexplain.concepts3d.concepts import Concept
from neuroexplain.concepts3d.store import CAVStore
from neuroexplain.concepts3d.tcav import CAV, _seed_of, train_cav
from neuroexplain.settings import SACV_RELEVANCE

__all__ = [
    "RELEVANCE_MODES",
    "SACV",
    "layer_mask",
    "spatial_groups",
    "spatial_vectors",
    "train_sacv",
    "upsample",
]

logger = logging.getLogger(__name__)

RELEVANCE_MODES = SACV_RELEVANCE


def spatial_vectors(acts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One activation vector per spatial position.

    Args:
        acts: ``(B, C, X, Y, Z)`` layer activations (any number of spatial dims).
        mask: ``(B, X, Y, Z)`` bool: keep only these positions (``None``: all).

    Returns:
        ``(N, C)`` with ``N = B * X * Y * Z`` (or the number of masked positions), rows in
        ``(b, x, y, z)`` C order; row ``(b, x, y, z)`` is ``acts[b, :, x, y, z]``.
    """
    if acts.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial) activations, got {tuple(acts.shape)}")
    v = acts.movedim(1, -1)  # (B, X, Y, Z, C): channels last before flattening positions
    if mask is None:
        return v.reshape(-1, acts.shape[1])
    if tuple(mask.shape) != (acts.shape[0], *acts.shape[2:]):
        raise ValueError(
            f"expected mask {(acts.shape[0], *acts.shape[2:])}, got {tuple(mask.shape)}"
        )
    return v[mask.bool()]


def spatial_groups(shape: Sequence[int], mask: torch.Tensor | None = None) -> np.ndarray:
    """Volume index ``b`` of each row of :func:`spatial_vectors` (for grouped hold-out)."""
    b = int(shape[0])
    spatial = tuple(shape[2:])
    idx = torch.arange(b).reshape(b, *([1] * len(spatial))).expand(b, *spatial)
    return (idx.reshape(-1) if mask is None else idx[mask.bool()]).numpy()


def layer_mask(
    masks: torch.Tensor, layer_shape: Sequence[int], *, min_overlap: float = 0.2
) -> torch.Tensor:
    """Region masks on the input grid -> positions of a layer's grid that lie in the region.

    A position belongs to the region when at least ``min_overlap`` of its cell (the input voxels
    it covers after area averaging) is in the mask; a volume whose region covers no cell that
    much keeps its cell(s) of maximal overlap.

    Args:
        masks: ``(B, 1, X, Y, Z)`` bool on the input grid.
        layer_shape: ``(X', Y', Z')`` of the layer.
        min_overlap: fraction of a cell that must be in the region.

    Returns:
        ``(B, X', Y', Z')`` bool.
    """
    frac = F.adaptive_avg_pool3d(masks.float(), tuple(int(s) for s in layer_shape))[:, 0]
    out = frac >= min_overlap
    for b in range(out.shape[0]):
        if not out[b].any() and frac[b].max() > 0:
            out[b] = frac[b] == frac[b].max()
    return out


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, X', Y', Z')`` layer maps -> ``(B, 1, X, Y, Z)``, trilinear (align_corners False)."""
    return F.interpolate(
        maps[:, None].float(),
        size=tuple(int(s) for s in size),
        mode="trilinear",
        align_corners=False,
    )


def train_sacv(
    model: nn.Module,
    layer: str,
    concept: Concept,
    random: Concept,
    *,
    min_overlap: float = 0.2,
    max_samples: int = 50000,
    seed: int = 0,
    test_fraction: float = 0.33,
    classifier: str = "logistic",
    C: float = 1.0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    store: CAVStore | None = None,
    progress: bool | None = False,
) -> CAV:
    """Train a spatial activation concept vector at ``layer``.

    Positive samples are the positions of the concept's examples inside their region masks
    (all positions when the concept has no region); negatives are the random examples' positions
    inside *their* region masks. The accuracy is measured on held-out **volumes**.

    Args:
        model: the network.
        layer: dotted name of a convolutional layer (output ``(B, C, X', Y', Z')``).
        concept: concept examples (usually whole images, ``transform="none"``).
        random: random examples, built the same way.
        min_overlap: see :func:`layer_mask`.
        max_samples: at most this many training positions (random subsample, seeded).
        seed: seed of the hold-out split and classifier.
        test_fraction: fraction of volumes held out per class.
        classifier: ``"logistic"`` or ``"sgd"``.
        C: inverse regularisation strength.
        batch_size: volumes per forward pass.
        device: where to run.
        store: CAV cache tied to the checkpoint.
        progress: progress bars.

    Returns:
        A :class:`~neuroexplain.concepts3d.tcav.CAV` of ``kind="sacv"`` with ``(C,)`` vectors.
    """
    key = (
        f"sacv|{layer}|{concept.key}|{random.key}|{classifier}:C{C:g}:t{test_fraction:g}"
        f":s{seed}:o{min_overlap:g}:n{max_samples}"
    )
    if store is not None and (entry := store.get(key)) is not None:
        return CAV.from_entry({**entry, "concept": concept.name, "random": random.name})
    acts_c = layer_activations(
        model, concept.inputs, [layer], batch_size=batch_size, device=device, progress=progress
    )[layer]
    acts_r = layer_activations(
        model, random.inputs, [layer], batch_size=batch_size, device=device, progress=progress
    )[layer]
    if acts_c.ndim < 3:
        raise ValueError(
            f"SACV needs a spatial layer (B, C, X, Y, Z); {layer!r} gives {tuple(acts_c.shape)}"
        )
    mc = (
        None
        if concept.masks is None
        else layer_mask(concept.masks, acts_c.shape[2:], min_overlap=min_overlap)
    )
    mr = (
        None
        if random.masks is None
        else layer_mask(random.masks, acts_r.shape[2:], min_overlap=min_overlap)
    )
    pos, neg = spatial_vectors(acts_c, mc), spatial_vectors(acts_r, mr)
    gp = [concept.ids[i] for i in spatial_groups(acts_c.shape, mc)]
    gn = [random.ids[i] for i in spatial_groups(acts_r.shape, mr)]
    res = train_cav(
        pos,
        neg,
        pos_groups=gp,
        neg_groups=gn,
        seed=_seed_of(seed, concept.key, random.key, layer, "sacv"),
        test_fraction=test_fraction,
        classifier=classifier,
        C=C,
        max_samples=max_samples,
    )
    cav = CAV(concept=concept.name, random=random.name, layer=layer, kind="sacv", **res)
    logger.info(
        "SACV %s @ %s: %d positive / %d random positions, held-out accuracy %.3f",
        concept.name,
        layer,
        len(pos),
        len(neg),
        cav.accuracy,
    )
    if store is not None:
        store.put(key, cav.to_entry())
    return cav


class SACV:
    """Relevance and contribution maps of a spatial concept vector (Captum-style explainer).

    Args:
        model: network mapping ``(B, C, X, Y, Z)`` to ``(B, K)`` logits.
        layer: dotted name of the layer the SACV was trained at.
        cav: the SACV (``kind="sacv"``, ``(C',)`` vector).
        relevance: ``"positive"`` (default), ``"signed"`` or ``"raw"`` (see the module docstring).
        batch_size: volumes per pass.
        device: where to run (default: the model's device).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        cav: CAV,
        *,
        relevance: str = "positive",
        batch_size: int = 4,
        device: str | torch.device | None = None,
    ) -> None:
        get_module(model, layer)
        if cav.kind != "sacv":
            raise ValueError(f"expected a spatial CAV (kind 'sacv'), got kind {cav.kind!r}")
        if relevance not in RELEVANCE_MODES:
            raise ValueError(f"unknown relevance mode {relevance!r}; expected {RELEVANCE_MODES}")
        self.relevance = relevance
        self.model = model.eval()
        self.layer = layer
        self.cav = cav
        self.batch_size = int(batch_size)
        self.device = device

    def explain(
        self, inputs: torch.Tensor, target: int = 0, *, sign: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Layer-grid maps, input-grid maps and per-volume scores.

        Args:
            inputs: ``(B, C, X, Y, Z)`` volumes.
            target: logit index.
            sign: ``-1`` for the other class of a single-logit network.

        Returns:
            ``relevance`` / ``contribution`` ``(B, 1, X, Y, Z)`` (upsampled),
            ``relevance_layer`` / ``contribution_layer`` / ``presence_layer`` and
            ``projection_layer`` (the raw ``<v, a(p)>``), each ``(B, X', Y', Z')``,
            ``logit`` ``(B,)``, and the scores ``spatial_contribution`` (presence-weighted mean
            of ``S``), ``concept_presence`` (mean ``P``) and ``directional_derivative``
            (``sum_p S(p)``), each ``(B,)``.
        """
        if inputs.ndim != 5:
            raise ValueError(f"expected inputs (B, C, X, Y, Z), got {tuple(inputs.shape)}")
        acts, grads, logits = layer_gradients(
            self.model,
            inputs,
            self.layer,
            target=target,
            sign=sign,
            batch_size=self.batch_size,
            device=self.device,
        )
        if acts.ndim < 3 or acts.shape[1] != self.cav.vector.numel():
            raise ValueError(
                f"layer {self.layer!r} gives activations {tuple(acts.shape)}, "
                f"the SACV has {self.cav.vector.numel()} channels"
            )
        v = self.cav.vector.float()
        w = self.cav.weights.float()
        raw = torch.einsum("bc...,c->b...", acts, v)
        wn = float(w.norm())
        signed = raw + (self.cav.intercept / wn if wn > 0 else 0.0)
        rel = {"raw": raw, "signed": signed, "positive": signed.clamp(min=0)}[self.relevance]
        con = torch.einsum("bc...,c->b...", grads, v)
        pres = torch.sigmoid(torch.einsum("bc...,c->b...", acts, w) + self.cav.intercept)
        dims = tuple(range(1, rel.ndim))
        size = inputs.shape[2:]
        return {
            "relevance": upsample(rel, size),
            "contribution": upsample(con, size),
            "relevance_layer": rel,
            "projection_layer": raw,
            "contribution_layer": con,
            "presence_layer": pres,
            "logit": logits,
            "spatial_contribution": (pres * con).sum(dims) / pres.sum(dims).clamp(min=1e-12),
            "concept_presence": pres.mean(dims),
            "directional_derivative": con.sum(dims),
        }

    def attribute(
        self, inputs: torch.Tensor, target: int = 0, *, sign: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, X, Y, Z)`` -> ``(relevance, contribution)``, each ``(B, 1, X, Y, Z)``."""
        out = self.explain(inputs, target, sign=sign)
        return out["relevance"], out["contribution"]

    def score(self, inputs: torch.Tensor, target: int = 0, *, sign: float = 1.0) -> torch.Tensor:
        """Spatial contribution score ``(B,)`` (see :meth:`explain`)."""
        return self.explain(inputs, target, sign=sign)["spatial_contribution"]
