"""User-defined concepts for 3D MRI: example sets of volumes built from a ``preproc.pt`` cohort.

A **concept** (Kim et al. 2018, TCAV) is a set of example inputs that share a property the user
names; it is compared with **random** example sets. On an MRI cohort a concept is defined in a
YAML / JSON file by

- which subjects show it: ``where`` (a selector on ``participants.tsv`` columns, the ingest
  label ``label`` / ``y`` or the ``split``) or an explicit ``subjects`` list;
- optionally a **region** of the dseg label map (``region: [labels]``), which turns each subject
  into a patch example: ``transform: mask`` keeps the image inside the region dilated by
  ``dilate`` voxels and zeroes the rest; ``transform: box`` keeps a box around the region
  (``margin`` voxels); ``transform: none`` keeps the whole image (the region then only marks the
  positions SACV learns from);
- the **random pool** the random sets are drawn from (``random``: a selector; default every
  eligible subject that is not a concept example), transformed like the concept (same region),
  so a concept vector contrasts the concept with the same kind of patch, not with "a patch".

Nothing here knows which regions a cohort's disease affects: concepts are configuration.

Example config::

    split: [train, val]        # subjects that may serve as examples (split.tsv); default: not test
    participants: participants.tsv   # optional: columns for the selectors
    n_random: 50               # random sets per concept (TCAV test)
    random_size: null          # examples per random set; default min(concept size, pool // 3)
    concepts:
      atrophy_region_a:
        where: {diagnosis: disease}
        random: {diagnosis: control}
        region: [17, 53]
        transform: mask
        dilate: 2
      big_effect:
        where: {effect_magnitude: {min: 0.25}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroexplain.errors import InputError
from neuroexplain.settings import SACV_NEGATIVES, SACV_TRANSFORMS

__all__ = [
    "POSITIONS",
    "TRANSFORMS",
    "Concept",
    "ConceptConfig",
    "ConceptSpec",
    "build_concept",
    "concept_pool",
    "is_placeholder",
    "load_concept_config",
    "random_concepts",
    "region_mask",
    "select",
    "spec_dict",
    "subject_table",
    "with_positions",
]

logger = logging.getLogger(__name__)

TRANSFORMS = SACV_TRANSFORMS


def is_placeholder(inputs: torch.Tensor) -> bool:
    """``inputs`` is a broadcast placeholder: its elements take less memory than they would
    on their own (an ``expand``-ed tensor, e.g. the volumes of a detached concept)."""
    n = inputs.numel()
    return n > 1 and inputs.untyped_storage().nbytes() < n * inputs.element_size()


@dataclass
class Concept:
    """A set of example volumes (Captum's ``Concept``, holding tensors instead of an iterator).

    Attributes:
        name: concept name (``"random_3"`` for random sets).
        inputs: ``(n, C, X, Y, Z)`` example volumes on the model grid.
        ids: one identifier per example (subject id + transform key); the activation cache and
            the CAV cache key on them.
        masks: ``(n, 1, X, Y, Z)`` bool region masks (positions SACV learns from) or ``None``
            (every position).
        key: stable hash of ``ids`` (and so of the examples' definition).
    """

    name: str
    inputs: torch.Tensor
    ids: list[str]
    masks: torch.Tensor | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if self.inputs.ndim != 5:
            raise ValueError(f"expected inputs (n, C, X, Y, Z), got {tuple(self.inputs.shape)}")
        if len(self.ids) != self.inputs.shape[0]:
            raise ValueError(f"expected {self.inputs.shape[0]} ids, got {len(self.ids)}")
        want = (self.inputs.shape[0], 1, *self.inputs.shape[2:])
        if self.masks is not None and tuple(self.masks.shape) != want:
            raise ValueError(
                f"expected masks (n, 1, X, Y, Z) = {want}, got {tuple(self.masks.shape)}"
            )
        if not self.key:
            self.key = _hash(self.ids)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: Sequence[int], name: str) -> Concept:
        """The examples ``index`` as a new concept called ``name``.

        The volumes are copied, except those of a concept detached from its volumes (a
        broadcast placeholder, :meth:`~neuroexplain.concepts3d.tcav.TCAV.detach_inputs`): its
        subsets are placeholders too, costing no memory.
        """
        idx = torch.as_tensor(list(index), dtype=torch.long)
        if is_placeholder(self.inputs):
            inputs = self.inputs[:1].expand(len(idx), *self.inputs.shape[1:])
        else:
            inputs = self.inputs[idx]
        return Concept(
            name=name,
            inputs=inputs,
            ids=[self.ids[i] for i in idx.tolist()],
            masks=None if self.masks is None else self.masks[idx],
        )


@dataclass
class ConceptSpec:
    """One concept of the configuration (see the module docstring for the keys)."""

    name: str
    where: dict[str, Any] | None = None
    subjects: list[str] | None = None
    random: dict[str, Any] | None = None
    region: list[int] | None = None
    transform: str = "mask"
    dilate: int = 2
    margin: int = 4
    size: int | None = None

    def transform_key(self, transform: str | None = None) -> str:
        """Identifier of how a subject is turned into an example (region, transform, sizes)."""
        t = transform or self.transform
        if not self.region or t == "none":
            return "whole" if not self.region else f"whole:r{_hash(sorted(self.region))[:8]}"
        return f"{t}:r{_hash(sorted(self.region))[:8]}:d{self.dilate}:m{self.margin}"


@dataclass
class ConceptConfig:
    """The whole concept configuration file."""

    concepts: list[ConceptSpec]
    split: list[str] | None = None
    participants: str | None = None
    n_random: int = 50
    random_size: int | None = None
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> ConceptSpec:
        """The concept called ``name``."""
        for c in self.concepts:
            if c.name == name:
                return c
        raise InputError(
            self.source or "concepts",
            f"no concept named {name!r}; defined: {[c.name for c in self.concepts]}",
        )


_SPEC_KEYS = {f for f in ConceptSpec.__dataclass_fields__ if f != "name"}
_TOP_KEYS = {"concepts", "split", "participants", "n_random", "random_size"}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_concept_config(path: str | os.PathLike[str]) -> ConceptConfig:
    """Read and validate a concept configuration (YAML or JSON).

    Returns:
        The :class:`ConceptConfig`.

    Raises:
        InputError: missing / unreadable file, a YAML syntax error or duplicate key (with its
            line), unknown keys, bad values (naming the concept).
    """
    from neuroexplain.io.config import read_yaml

    p = Path(path)
    # a duplicate concept name or a syntax error: one line with the file and the line number
    raw = read_yaml(p, what="concept configuration")
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("concepts"), dict)
        or not raw["concepts"]
    ):
        raise InputError(p, "expected a mapping with a non-empty 'concepts' mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise InputError(p, f"unknown keys {unknown}; expected some of {sorted(_TOP_KEYS)}")
    specs = []
    for name, body in raw["concepts"].items():
        specs.append(_spec(p, str(name), body or {}))
    split = raw.get("split")
    if isinstance(split, str):
        split = [s.strip() for s in split.split(",") if s.strip()]
    n_random = raw.get("n_random", 50)
    if not isinstance(n_random, int) or n_random < 2:
        raise InputError(p, f"n_random: expected an integer >= 2, got {n_random!r}")
    rsize = raw.get("random_size")
    if rsize is not None and (not isinstance(rsize, int) or rsize < 2):
        raise InputError(p, f"random_size: expected an integer >= 2 or null, got {rsize!r}")
    part = raw.get("participants")
    if part is not None and not Path(part).is_absolute():
        part = str((p.parent / part).resolve()) if (p.parent / part).exists() else str(part)
    return ConceptConfig(
        concepts=specs,
        split=split,
        participants=part,
        n_random=n_random,
        random_size=rsize,
        source=str(p),
        raw=raw,
    )


def _spec(path: Path, name: str, body: Any) -> ConceptSpec:
    where = f"concept {name!r}"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(path, f"{where}: names must be alphanumeric (with _ or -)")
    if not isinstance(body, dict):
        raise InputError(path, f"{where}: expected a mapping, got {type(body).__name__}")
    unknown = sorted(set(body) - _SPEC_KEYS)
    if unknown:
        raise InputError(
            path, f"{where}: unknown keys {unknown}; expected some of {sorted(_SPEC_KEYS)}"
        )
    if body.get("where") is None and body.get("subjects") is None:
        raise InputError(path, f"{where}: expected 'where' (a selector) or 'subjects' (a list)")
    for key in ("where", "random"):
        if body.get(key) is not None and not isinstance(body[key], dict):
            raise InputError(path, f"{where}: '{key}' must be a mapping column -> value(s)")
    region = body.get("region")
    if region is not None:
        if isinstance(region, int):
            region = [region]
        if (
            not isinstance(region, list)
            or not region
            or not all(isinstance(r, int) and r > 0 for r in region)
        ):
            raise InputError(path, f"{where}: region must be a list of positive label indices")
    transform = body.get("transform", "mask")
    if transform not in TRANSFORMS:
        raise InputError(path, f"{where}: transform must be one of {TRANSFORMS}, got {transform!r}")
    for key in ("dilate", "margin"):
        v = body.get(key, 0)
        if not isinstance(v, int) or v < 0:
            raise InputError(path, f"{where}: {key} must be a non-negative integer, got {v!r}")
    size = body.get("size")
    if size is not None and (not isinstance(size, int) or size < 2):
        raise InputError(path, f"{where}: size must be an integer >= 2")
    subjects = body.get("subjects")
    if subjects is not None:
        subjects = [_full(s) for s in subjects]
    return ConceptSpec(
        name=name,
        where=body.get("where"),
        subjects=subjects,
        random=body.get("random"),
        region=region,
        transform=transform,
        dilate=int(body.get("dilate", 2)),
        margin=int(body.get("margin", 4)),
        size=size,
    )


def _full(s: Any) -> str:
    s = str(s).strip()
    return s if s.startswith("sub-") else f"sub-{s}"


# ------------------------------------------------------------------------------- subjects


def subject_table(
    preproc: Mapping[str, Any],
    *,
    split: Any = None,
    participants: str | os.PathLike[str] | None = None,
) -> Any:
    """One row per subject of ``preproc``: ``subject, index, label, y, split`` + participants.

    Args:
        preproc: the ``preproc.pt`` dict (``subjects``, ``label``, ``y``).
        split: a ``split.tsv`` DataFrame (``subject``, ``split``) or ``None`` (split ``"all"``).
        participants: a ``participants.tsv`` whose columns become selector columns.

    Returns:
        pandas DataFrame indexed ``0..N-1`` in preproc order.
    """
    import pandas as pd

    subs = [_full(s) for s in preproc["subjects"]]
    y = np.asarray(torch.as_tensor(preproc["y"]).float().numpy(), dtype=np.float64)
    labels = [str(v) for v in preproc.get("label", [""] * len(subs))]
    df = pd.DataFrame({"subject": subs, "index": np.arange(len(subs)), "label": labels, "y": y})
    if split is not None:
        sp = dict(zip([_full(s) for s in split["subject"]], split["split"], strict=True))
        df["split"] = [sp.get(s, "") for s in subs]
    else:
        df["split"] = "all"
    if participants is not None:
        p = Path(participants)
        if not p.is_file():
            raise InputError(p, "participants table not found")
        part = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
        if "participant_id" not in part.columns:
            raise InputError(p, f"expected a participant_id column, got {list(part.columns)}")
        part["participant_id"] = [_full(s) for s in part["participant_id"]]
        extra = [c for c in part.columns if c != "participant_id" and c not in df.columns]
        df = df.merge(
            part[["participant_id", *extra]],
            how="left",
            left_on="subject",
            right_on="participant_id",
        ).drop(columns="participant_id")
    return df


def select(table: Any, where: Mapping[str, Any] | None, *, source: str = "concepts") -> np.ndarray:
    """Boolean row mask of ``table`` matching a selector.

    A selector maps a column to a value, a list of values, or ``{min: a, max: b}`` (numeric,
    inclusive). All conditions must hold. ``None`` selects every row.

    Raises:
        InputError: an unknown column.
    """
    keep = np.ones(len(table), dtype=bool)
    for col, cond in (where or {}).items():
        if col not in table.columns:
            raise InputError(
                source,
                f"selector column {col!r} not found; available: "
                f"{[c for c in table.columns if c != 'index']} "
                "(give a participants table for more)",
            )
        values = table[col]
        if isinstance(cond, dict):
            num = np.asarray(_to_numeric(values), dtype=np.float64)
            ok = np.isfinite(num)
            if "min" in cond:
                ok &= num >= float(cond["min"])
            if "max" in cond:
                ok &= num <= float(cond["max"])
            keep &= ok
        else:
            allowed = cond if isinstance(cond, list) else [cond]
            keep &= np.asarray([_matches(v, allowed) for v in values], dtype=bool)
    return keep


def _to_numeric(values: Any) -> Any:
    import pandas as pd

    return pd.to_numeric(values, errors="coerce")


def _matches(value: Any, allowed: list[Any]) -> bool:
    for a in allowed:
        if str(value) == str(a):
            return True
        try:
            if float(value) == float(a):
                return True
        except (TypeError, ValueError):
            pass
    return False


def concept_pool(
    table: Any, spec: ConceptSpec, split: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Preproc indices of a concept's examples and of its random pool.

    Args:
        table: :func:`subject_table`.
        spec: the concept.
        split: splits examples may come from (``None``: every split but ``test``).

    Returns:
        ``(concept_indices, pool_indices)``, disjoint, sorted.

    Raises:
        InputError: fewer than 2 concept examples or 2 random examples.
    """
    eligible = _eligible(table, split)
    if spec.subjects is not None:
        chosen = np.isin(table["subject"].to_numpy(), spec.subjects)
    else:
        chosen = select(table, spec.where, source=f"concept {spec.name!r}")
    conc = np.flatnonzero(chosen & eligible)
    pool = np.flatnonzero(
        select(table, spec.random, source=f"concept {spec.name!r}") & eligible & ~chosen
    )
    if spec.size is not None and len(conc) > spec.size:
        conc = conc[: spec.size]
    if len(conc) < 2:
        raise InputError(
            f"concept {spec.name!r}", f"expected at least 2 example subjects, found {len(conc)}"
        )
    if len(pool) < 2:
        raise InputError(
            f"concept {spec.name!r}",
            f"expected at least 2 subjects in the random pool, found {len(pool)}",
        )
    return conc, pool


def _eligible(table: Any, split: Sequence[str] | None) -> np.ndarray:
    sp = table["split"].to_numpy()
    if split is None:
        return sp != "test"
    return np.isin(sp, list(split))


# ------------------------------------------------------------------------------- examples


def _ball(radius: int) -> np.ndarray:
    r = int(radius)
    g = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (g**2).sum(0) <= r * r


def region_mask(dseg: np.ndarray, labels: Sequence[int], dilate: int = 0) -> np.ndarray:
    """Boolean mask of the voxels whose label is in ``labels``, dilated by a ball.

    Args:
        dseg: ``(X, Y, Z)`` integer labels.
        labels: label indices.
        dilate: ball radius in voxels (0 = no dilation).

    Returns:
        ``(X, Y, Z)`` bool.
    """
    from scipy.ndimage import binary_dilation

    m = np.isin(np.asarray(dseg), np.asarray(list(labels), dtype=np.int64))
    if dilate > 0 and m.any():
        m = binary_dilation(m, structure=_ball(dilate))
    return m


def _box(mask: np.ndarray, margin: int) -> np.ndarray:
    out = np.zeros_like(mask, dtype=bool)
    if not mask.any():
        return out
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return out


def build_concept(
    preproc: Mapping[str, Any],
    indices: Sequence[int],
    spec: ConceptSpec,
    *,
    name: str | None = None,
    transform: str | None = None,
) -> Concept:
    """Turn subjects of ``preproc`` into concept examples as ``spec`` says.

    Args:
        preproc: ``preproc.pt`` dict (``images`` ``(N, 1, X, Y, Z)``, ``dseg``, ``subjects``).
        indices: subject indices.
        spec: the concept (region, transform, dilation, margin).
        name: concept name (default ``spec.name``).
        transform: override ``spec.transform`` (SACV uses ``"none"``: whole images).

    Returns:
        A :class:`Concept` whose ``masks`` are the dilated region (``None`` without a region).

    Raises:
        InputError: a region is requested but the preproc has no dseg, or a subject's region is
            empty.
    """
    t = transform or spec.transform
    idx = [int(i) for i in indices]
    images = preproc["images"][idx].float()
    subs = [_full(preproc["subjects"][i]) for i in idx]
    tkey = spec.transform_key(t)
    ids = [f"{s}|{tkey}" for s in subs]
    if not spec.region:
        return Concept(name or spec.name, images, ids, None)
    if preproc.get("dseg") is None:
        raise InputError(f"concept {spec.name!r}", "a region needs dseg label maps in preproc.pt")
    dseg = preproc["dseg"][idx].numpy()
    masks = np.zeros((len(idx), 1, *images.shape[2:]), dtype=bool)
    # indexing with a list copied the volumes: blank them in place, no second copy
    out = images
    for j in range(len(idx)):
        m = region_mask(dseg[j, 0], spec.region, spec.dilate)
        if not m.any():
            raise InputError(
                f"concept {spec.name!r}", f"region {spec.region} is empty in {subs[j]}"
            )
        masks[j, 0] = m
        if t == "mask":
            out[j, 0][torch.from_numpy(~m)] = 0.0
        elif t == "box":
            out[j, 0][torch.from_numpy(~_box(m, spec.margin))] = 0.0
    return Concept(name or spec.name, out, ids, torch.from_numpy(masks))


POSITIONS = SACV_NEGATIVES


def with_positions(
    concept: Concept, preproc: Mapping[str, Any], indices: Sequence[int], positions: str
) -> Concept:
    """The same examples with other SACV training positions.

    Args:
        concept: examples of ``indices`` built by :func:`build_concept`.
        preproc: the ``preproc.pt`` dict.
        indices: the subjects of the examples.
        positions: ``"region"`` (keep the region masks), ``"brain"`` (every position inside
            ``dseg > 0``) or ``"all"`` (every position).

    Returns:
        A :class:`Concept` with the new masks; its ids (and so its cache key) record the choice.
    """
    if positions not in POSITIONS:
        raise InputError("--negatives", f"expected one of {POSITIONS}, got {positions!r}")
    if positions == "region" and concept.masks is not None:
        return concept
    masks = None
    if positions == "brain":
        if preproc.get("dseg") is None:
            raise InputError("--negatives", "'brain' positions need dseg label maps in preproc.pt")
        masks = preproc["dseg"][[int(i) for i in indices]] > 0
    return Concept(
        concept.name, concept.inputs, [f"{i}|pos:{positions}" for i in concept.ids], masks
    )


def random_concepts(
    pool: Concept,
    n_sets: int,
    size: int,
    *,
    seed: int,
    prefix: str = "random",
    disjoint_first: bool = True,
) -> list[Concept]:
    """``n_sets`` random subsets of ``size`` examples of ``pool`` (seeded, without replacement
    within a set).

    Args:
        pool: the random pool.
        n_sets: number of sets.
        size: examples per set (at most the pool size).
        seed: seed of the draw.
        prefix: name prefix.
        disjoint_first: draw sets ``1 ..`` from the pool *minus* set 0, so the random-vs-random
            CAVs (set 0 against set ``i``) never see one example in both classes (shared
            examples bias their held-out accuracy below chance). Falls back to the whole pool,
            with a warning, when the rest of the pool is smaller than ``size``.

    Returns:
        Concepts named ``f"{prefix}_{i}"``, ``i = 0 .. n_sets - 1``.
    """
    size = min(int(size), len(pool))
    rng = np.random.default_rng(seed)
    first = np.sort(rng.choice(len(pool), size=size, replace=False))
    rest = np.setdiff1d(np.arange(len(pool)), first)
    if disjoint_first and len(rest) < size:
        logger.warning(
            "random pool of %d is too small for disjoint random sets of %d; "
            "random sets may share examples",
            len(pool),
            size,
        )
        disjoint_first = False
    source = rest if disjoint_first else np.arange(len(pool))
    out = [pool.subset(first, f"{prefix}_0")]
    for i in range(1, n_sets):
        pick = np.sort(source[rng.choice(len(source), size=size, replace=False)])
        out.append(pool.subset(pick, f"{prefix}_{i}"))
    return out


def spec_dict(spec: ConceptSpec) -> dict[str, Any]:
    """The spec as a plain dict (for provenance)."""
    return asdict(spec)
