"""Plumbing shared by the stage runners (saliency, simulator, TCAV, SACV, XNN).

One owner for what the MRI stages do around their methods: their inputs (the **MRI stage
context**, :func:`load_mri_context`: ``preproc.pt``, the classifier and its ``split.tsv``,
loaded once, and the explained subjects chosen with :func:`select_subjects`), the provenance
block of their outputs, the scoring of their maps with the evaluation harness
(:mod:`neuroexplain.evaluate.harness`), and the **maps manifest** every stage that writes
per-subject NIfTI maps leaves in its output folder.

A maps manifest (:func:`write_maps_manifest`, read back with :func:`read_maps_manifest`) is a
small JSON file naming the stage, and for each method (in the stage's order) its name, its kind
(:data:`MAP_KINDS`), whether it is one of the stage's primary explanations (the ones
``evaluate-maps`` and ``figures`` take from the manifest) and, per subject, the map's path
relative to the manifest's folder::

    {"format": "neuroexplain-maps", "version": 1, "stage": "saliency",
     "methods": [{"name": "ig", "kind": "saliency", "primary": true,
                  "files": {"sub-01": "sub-01/sub-01_desc-ig_saliency.nii.gz"}}],
     "subjects": ["sub-01"], "provenance": {...}}

Consumers read the methods and files from it instead of rebuilding the stage's method names
(``evaluate-maps --manifest``, ``figures --manifest``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroexplain.errors import InputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MANIFEST_FORMAT",
    "MAP_KINDS",
    "SPLIT_NAMES",
    "MRIContext",
    "MapFiles",
    "MapsManifest",
    "harness_means",
    "load_mri_context",
    "manifest_maps",
    "preproc_subset",
    "read_maps_manifest",
    "select_subjects",
    "stage_provenance",
    "subject_splits",
    "write_maps_manifest",
]

logger = logging.getLogger(__name__)

#: ``format`` entry of every maps manifest
MANIFEST_FORMAT = "neuroexplain-maps"
#: version of the manifest layout written by :func:`write_maps_manifest`
MANIFEST_VERSION = 1
#: what a method's maps are: attribution of the logit (baselines), disease log-Jacobian
#: (simulator), SACV concept relevance / contribution, attribution of an XNN feature
MAP_KINDS = (
    "saliency",
    "log-jacobian",
    "concept-relevance",
    "concept-contribution",
    "feature-attribution",
)


def stage_provenance(
    params: dict[str, Any], seed: int | None, inputs: Sequence[Any], command: str
) -> dict[str, Any]:
    """:func:`neuroexplain.provenance.provenance` of a stage run; ``None`` inputs are skipped.

    Args:
        params: the run's parameters.
        seed: its random seed.
        inputs: input files (``None`` where an optional input, e.g. ``split.tsv``, is absent).
        command: the ``neuroexplain`` subcommand.

    Returns:
        The provenance block.
    """
    from neuroexplain.provenance import provenance

    return provenance(params, seed=seed, inputs=[str(p) for p in inputs if p], command=command)


def harness_means(
    cohort: Any,
    maps: dict[str, Any],
    subjects: list[str],
    stem: Path,
    *,
    regions: Sequence[int] | None,
    derivatives: str,
    prov: dict[str, Any],
) -> dict[str, dict[str, float]]:
    """Score maps with the evaluation harness, write its tables at ``stem``, return the means.

    Args:
        cohort: synthetic cohort (ground truth) of :func:`neuroexplain.synth.make_cohort`.
        maps: ``{method: folder or template}`` of the maps.
        subjects: the subjects scored.
        stem: output stem of :func:`~neuroexplain.evaluate.harness.write_evaluation`.
        regions: planted-region labels (``None``: the cohort's planted masks).
        derivatives: dseg derivatives folder of the cohort.
        prov: provenance block written with the tables.

    Returns:
        ``{method: {metric: mean over subjects}}``.
    """
    from neuroexplain.evaluate.harness import evaluate_maps, summarize, write_evaluation

    df = evaluate_maps(
        cohort, maps, subjects, regions=regions, derivatives=derivatives, progress=False
    )
    write_evaluation(df, stem, provenance=prov)
    table = summarize(df)
    out: dict[str, dict[str, float]] = {}
    for m in table.index:
        out[m] = {
            met: float(table.loc[m, (met, "mean")])
            for met in sorted({c[0] for c in table.columns if c[0] != "n_subjects"})
        }
    return out


# ------------------------------------------------------------------------ subject selection

#: split names of ``split.tsv`` a ``--subjects`` value can name (as ``classifier.SPLITS``)
SPLIT_NAMES = ("train", "val", "test")


def select_subjects(
    spec: str | Sequence[str] | None,
    subjects: Sequence[str],
    splits: Sequence[str | None] | None = None,
    *,
    split_source: str | os.PathLike[str] | None = None,
    among: str = "the preprocessed data",
) -> list[int]:
    """Indices of the subjects a ``--subjects`` value chooses (the one rule of every stage).

    Args:
        spec: ``None`` / ``"all"`` (every subject); split names, one or several
            (``"test"``, ``"val,test"``: the subjects of those splits, in ``subjects`` order);
            or subject ids (comma-separated string or a sequence, ``sub-`` prefix optional, in
            the given order).
        subjects: the ids to choose from (e.g. ``preproc.pt``'s, in its order).
        splits: each subject's split (``None`` / ``""`` where ``split.tsv`` does not list it),
            or ``None`` when no ``split.tsv`` is known.
        split_source: the ``split.tsv``, named when a split selects nobody.
        among: what ``subjects`` are, for the error messages.

    Returns:
        Indices into ``subjects``.

    Raises:
        InputError: split names without a ``split.tsv``, unknown subjects, or an empty selection.

    Example:
        >>> select_subjects("test", ["sub-a", "sub-b"], ["train", "test"])
        [1]
        >>> select_subjects("b,sub-a", ["sub-a", "sub-b"])
        [1, 0]
    """
    subs = [str(s) for s in subjects]
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(len(subs)))
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise InputError("--subjects", "expected a split name, 'all' or subject ids, got nothing")
    if all(s in SPLIT_NAMES for s in items):
        if splits is None:
            raise InputError(
                "--subjects", f"selecting the {spec!r} split needs a split.tsv (--split)"
            )
        idx = [i for i, sp in enumerate(splits) if sp in items]
        if not idx:
            raise InputError(
                split_source or "--subjects",
                f"no subjects of the {spec!r} split are in {among}",
            )
        return idx
    known = {_subject_id(s): i for i, s in enumerate(subs)}
    known.update({s: i for i, s in enumerate(subs)})
    missing = [s for s in items if s not in known and _subject_id(s) not in known]
    if missing:
        raise InputError("--subjects", f"subjects not in {among}: {missing[:5]}")
    return [known[s] if s in known else known[_subject_id(s)] for s in items]


def subject_splits(split: Any, subjects: Sequence[str]) -> list[str | None] | None:
    """Each subject's split in a ``split.tsv`` DataFrame (``None`` where it is not listed), or
    ``None`` without a split: the ``splits`` of :func:`select_subjects`."""
    if split is None:
        return None
    by_subject = dict(zip(split["subject"], split["split"], strict=True))
    return [by_subject.get(str(s)) for s in subjects]


# ------------------------------------------------------------------------ MRI stage context


def preproc_subset(preproc: Mapping[str, Any], indices: Sequence[int]) -> dict[str, Any]:
    """A ``preproc.pt`` dict restricted to the subjects ``indices``, in that order.

    The per-subject fields (:data:`neuroexplain.mri.ingest.PER_SUBJECT_KEYS`, defined with the
    file's format) are indexed (tensors and arrays copied, so the full cohort's volumes can be
    freed), the others kept as they are; subject ``j`` of the subset is subject ``indices[j]``
    of ``preproc``, with the same values.

    Args:
        preproc: the ``preproc.pt`` dict.
        indices: subject indices into it.

    Returns:
        A new dict.
    """
    import numpy as np
    import torch

    from neuroexplain.mri.ingest import PER_SUBJECT_KEYS

    idx = [int(i) for i in indices]
    out = dict(preproc)
    for key in PER_SUBJECT_KEYS:
        value = preproc.get(key)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            out[key] = value[torch.as_tensor(idx, dtype=torch.long)]
        elif isinstance(value, np.ndarray):
            out[key] = value[np.asarray(idx, dtype=np.intp)]
        else:
            out[key] = [value[i] for i in idx]
    return out


@dataclass
class MRIContext:
    """The inputs of an MRI stage run, loaded once by :func:`load_mri_context`.

    The split is read on first use (:attr:`split`), so a runner that does not choose subjects by
    split never reads it.

    Attributes:
        preproc: the ``preproc.pt`` dict.
        preproc_path: its path (``preproc.pt`` inside the folder when a folder was given).
        model: the classifier in eval mode on ``device``.
        checkpoint: the checkpoint dict.
        checkpoint_path: ``model.pt`` path.
        split_path: the ``split.tsv`` used for split names, or ``None`` (none given or found).
        device: torch device.
        strict_split: the split was checked to list every subject (:func:`load_mri_context`).
    """

    preproc: dict[str, Any]
    preproc_path: Path
    model: torch.nn.Module
    checkpoint: dict[str, Any]
    checkpoint_path: Path
    split_path: Path | None
    device: torch.device
    strict_split: bool = False

    @property
    def arch(self) -> str:
        """The classifier's architecture (``"small"`` when the checkpoint names none)."""
        return str(self.checkpoint.get("arch", "small"))

    @property
    def subjects(self) -> list[Any]:
        """The ``preproc.pt`` subject ids, in its order."""
        return self.preproc["subjects"]

    @cached_property
    def checkpoint_sha256(self) -> str:
        """sha256 of ``model.pt``."""
        from neuroexplain.provenance import sha256_file

        return sha256_file(self.checkpoint_path)

    @cached_property
    def split(self) -> Any:
        """The ``split.tsv`` DataFrame, or ``None`` without one."""
        from neuroexplain.classifier.data import read_split

        if self.split_path is None:
            return None
        listed = [str(s) for s in self.subjects] if self.strict_split else None
        return read_split(self.split_path, listed)

    def select(self, spec: str | Sequence[str] | None) -> list[int]:
        """Indices of the subjects ``spec`` chooses (:func:`select_subjects`, with the split)."""
        splits = subject_splits(self.split, self.subjects)
        return select_subjects(spec, self.subjects, splits, split_source=self.split_path)


def load_mri_context(
    preproc: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    *,
    split: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    labelled: bool = False,
    strict_split: bool = False,
) -> MRIContext:
    """Load ``preproc.pt``, the classifier (on the data's input shape) and find the split.

    The classifier is the model the explanation stages explain
    (:func:`~neuroexplain.classifier.network.load_classifier` with ``explained=True``: the
    trained model when the final one is its ensemble with the linear reference, config
    ``classifier.explain``); ``checkpoint["explained_model"]`` names it.

    Args:
        preproc: ``preproc.pt`` of ``neuroexplain ingest-mri``.
        checkpoint: ``model.pt`` of ``neuroexplain train-classifier``.
        split: the ``split.tsv`` for split names (default: ``split.tsv`` next to the checkpoint).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a resolved ``torch.device``.
        labelled: load with :func:`neuroexplain.classifier.data.load_preproc_dict` (binary
            labels required, float32 images), not :func:`neuroexplain.mri.ingest.load_preproc`.
        strict_split: a given ``split`` must exist and list every subject (read now); without
            one and none next to the checkpoint, a warning. Otherwise a split file that does not
            exist is not used (a split name then asks for one), and it is read on first use.

    Raises:
        InputError: unreadable inputs, a checkpoint trained on another input shape, or (strict)
            a split that is missing or does not list the cohort's subjects.
    """
    import torch

    from neuroexplain.classifier.network import load_classifier
    from neuroexplain.utils import resolve_device

    if labelled:
        from neuroexplain.classifier.data import load_preproc_dict as load
    else:
        from neuroexplain.mri.ingest import load_preproc as load
    pre = load(preproc)
    pre_path = Path(preproc)
    pre_path = pre_path / "preproc.pt" if pre_path.is_dir() else pre_path
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    ckpt_path = Path(checkpoint)
    # the model the explanation stages explain (config classifier.explain)
    model, ckpt = load_classifier(
        ckpt_path, input_shape=list(pre["images"].shape[1:]), map_location=dev, explained=True
    )
    split_path: Path | None = Path(split) if split is not None else ckpt_path.parent / "split.tsv"
    if not split_path.is_file() and not (strict_split and split is not None):
        if strict_split:
            logger.warning(
                "no split.tsv given or next to %s: every subject counts as 'all'", ckpt_path
            )
        split_path = None
    ctx = MRIContext(pre, pre_path, model, ckpt, ckpt_path, split_path, dev, strict_split)
    if strict_split:
        _ = ctx.split  # a bad split fails here, before the work
    return ctx


# --------------------------------------------------------------------------- maps manifest


def _subject_id(subject: str) -> str:
    s = str(subject).strip()
    return s if s.startswith("sub-") else f"sub-{s}"


def write_maps_manifest(
    out_dir: str | os.PathLike[str],
    stage: str,
    written: Mapping[str, Mapping[str, str | os.PathLike[str]]],
    kinds: Mapping[str, str],
    *,
    provenance: Mapping[str, Any] | None = None,
    primary: Collection[str] | None = None,
    name: str = "maps.json",
) -> Path:
    """Write the maps manifest of a stage run into its output folder (atomically).

    Args:
        out_dir: the stage's output folder; the manifest's paths are relative to it.
        stage: the stage (``neuroexplain`` subcommand) that wrote the maps, e.g. ``"saliency"``.
        written: ``{subject: {method: path}}`` of every map written (e.g. what
            :func:`neuroexplain.attribution.export.write_subject_maps` returns per subject).
        kinds: ``{method: kind}`` (:data:`MAP_KINDS`), in the stage's method order; every
            method of ``written`` must be here.
        provenance: the run's provenance block.
        primary: the methods that are the stage's explanations (default: all); the others
            (e.g. the simulator's per-direction maps) are listed but not taken by default.
        name: file name of the manifest inside ``out_dir``.

    Returns:
        The manifest's path.

    Raises:
        ValueError: a method without a kind, an unknown kind, a map outside ``out_dir`` or a
            map that does not exist (a bug of the stage, not of its input).

    Example:
        >>> write_maps_manifest("results/saliency", "saliency",
        ...                     {"sub-01": {"ig": "results/saliency/sub-01/..."}},
        ...                     {"ig": "saliency"})  # doctest: +SKIP
    """
    from neuroexplain.io.atomic import write_json

    out = Path(out_dir)
    bad = sorted({k for k in kinds.values() if k not in MAP_KINDS})
    if bad:
        raise ValueError(f"expected map kinds from {MAP_KINDS}, got {bad}")
    files: dict[str, dict[str, str]] = {m: {} for m in kinds}
    for subject, maps in written.items():
        sub = _subject_id(subject)
        for method, path in maps.items():
            if method not in files:
                raise ValueError(f"map of method {method!r} written without a kind")
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"map {p} of {method!r} for {sub} does not exist")
            try:
                rel = p.relative_to(out)
            except ValueError:
                rel = Path(os.path.relpath(p, out))
            if rel.parts and rel.parts[0] == "..":
                raise ValueError(f"map {p} is outside the stage folder {out}")
            files[method][sub] = rel.as_posix()
    keep = set(kinds) if primary is None else set(primary)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "stage": stage,
        "methods": [
            {"name": m, "kind": kinds[m], "primary": m in keep, "files": files[m]} for m in kinds
        ],
        "subjects": sorted({_subject_id(s) for s in written}),
        "provenance": dict(provenance or {}),
    }
    path = write_json(manifest, out / name)
    logger.debug("wrote the maps manifest of %s (%d methods) to %s", stage, len(kinds), path)
    return path


class MapFiles(dict[str, Path]):
    """``{subject: map path}`` of one method, read from a manifest (named in errors)."""

    def __init__(self, files: Mapping[str, Path], manifest: Path, method: str) -> None:
        super().__init__(files)
        self.manifest = manifest
        self.method = method

    def __str__(self) -> str:  # recorded as the manifest in provenance and errors
        return str(self.manifest)

    def path(self, subject: str) -> Path:
        """The map of ``subject`` (``sub-`` prefix optional).

        Raises:
            InputError: the manifest lists no map of this method for the subject.
        """
        sub = _subject_id(subject)
        if sub not in self:
            raise InputError(
                self.manifest, f"lists no map of {self.method!r} for {sub} (stage run on it?)"
            )
        return self[sub]


@dataclass(frozen=True)
class MapsManifest:
    """A maps manifest read by :func:`read_maps_manifest` (paths resolved against its folder).

    Attributes:
        path: the manifest file.
        stage: the stage that wrote it.
        methods: ``{method: kind}`` in the stage's order.
        primary: the primary methods, in order.
        files: ``{method: MapFiles}``.
        provenance: the stage run's provenance block.
    """

    path: Path
    stage: str
    methods: dict[str, str]
    primary: list[str]
    files: dict[str, MapFiles]
    provenance: dict[str, Any] = field(default_factory=dict)

    def maps(self, *, primary_only: bool = True) -> dict[str, MapFiles]:
        """``{method: MapFiles}`` of the primary methods (or of all)."""
        names = self.primary if primary_only else list(self.methods)
        return {m: self.files[m] for m in names}


def read_maps_manifest(path: str | os.PathLike[str]) -> MapsManifest:
    """Read and check a maps manifest; every map it lists must exist.

    Args:
        path: the manifest (``maps.json``), or a stage folder holding exactly one
            (``maps.json`` or ``*_maps.json``).

    Raises:
        InputError: a missing or malformed manifest, or a map it lists that does not exist
            (one line naming the manifest and the problem).
    """
    p = Path(path)
    if p.is_dir():
        hits = sorted(p.glob("maps.json")) or sorted(p.glob("*_maps.json"))
        if len(hits) != 1:
            found = "none" if not hits else ", ".join(h.name for h in hits)
            raise InputError(p, f"expected one maps manifest (maps.json) in it, got {found}")
        p = hits[0]
    if not p.is_file():
        raise InputError(p, "maps manifest not found (did the stage finish?)")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(p, f"not a readable JSON maps manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InputError(p, f"expected a maps manifest (format {MANIFEST_FORMAT!r}), got {got!r}")
    if data.get("version") != MANIFEST_VERSION:
        raise InputError(
            p, f"expected manifest version {MANIFEST_VERSION}, got {data.get('version')!r}"
        )
    entries = data.get("methods")
    if not isinstance(entries, list) or not entries:
        raise InputError(p, "expected a non-empty list of methods")
    folder = p.parent
    methods: dict[str, str] = {}
    primary: list[str] = []
    files: dict[str, MapFiles] = {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(p, f"method {k + 1}: expected an object with a name")
        name = entry["name"]
        kind, listed = entry.get("kind"), entry.get("files")
        if kind not in MAP_KINDS:
            raise InputError(p, f"method {name!r}: expected a kind from {MAP_KINDS}, got {kind!r}")
        if name in methods:
            raise InputError(p, f"method {name!r} listed twice")
        if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
            raise InputError(p, f"method {name!r}: expected files as {{subject: relative path}}")
        resolved = {_subject_id(s): folder / rel for s, rel in listed.items()}
        missing = [str(f) for f in resolved.values() if not f.is_file()]
        if missing:
            raise InputError(p, f"lists {len(missing)} missing maps of {name!r}, e.g. {missing[0]}")
        methods[name] = kind
        if entry.get("primary", True):
            primary.append(name)
        files[name] = MapFiles(resolved, p, name)
    return MapsManifest(
        p, str(data.get("stage", "")), methods, primary, files, dict(data.get("provenance") or {})
    )


def manifest_maps(
    manifests: Sequence[str | os.PathLike[str]] | None,
) -> tuple[dict[str, MapFiles], dict[str, str]]:
    """The primary methods of several manifests, in order, and their kinds.

    Returns:
        ``({method: MapFiles}, {method: kind})``.

    Raises:
        InputError: a bad manifest (:func:`read_maps_manifest`) or a method in two manifests.
    """
    maps: dict[str, MapFiles] = {}
    kinds: dict[str, str] = {}
    for path in manifests or []:
        man = read_maps_manifest(path)
        for method, files in man.maps().items():
            if method in maps:
                raise InputError(man.path, f"method {method!r} is also in {maps[method].manifest}")
            maps[method] = files
            kinds[method] = man.methods[method]
    return maps, kinds
