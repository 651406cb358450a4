"""``neuroexplain saliency``: baseline maps for chosen subjects, written in native space.

For each selected subject, every requested baseline method (:mod:`.baselines`) explains the
classifier's positive-class logit on the model grid; the maps are mapped to the subject's native
T1w grid and written as ``<out>/sub-X/sub-X_desc-<method>_saliency.nii.gz`` + JSON sidecar
(:func:`.export.write_subject_maps`). ``<out>/saliency.json`` lists the maps, the parameters,
the checkpoint hash, timings and provenance; ``<out>/maps.json`` is the stage's maps manifest
(:func:`neuroexplain.stage.write_maps_manifest`: methods, kind ``saliency``, files). The
methods and their parameters are a :class:`~neuroexplain.settings.SaliencyConfig` (the
command's options and the workflow's ``saliency`` section).

Example:
    >>> run_saliency("preproc.pt", "model.pt", "results/saliency",
    ...              methods=["ig", "gradcam"], ig_steps=32)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuroexplain.errors import InputError
from neuroexplain.settings import SaliencyConfig

__all__ = ["run_saliency", "select_subjects"]

logger = logging.getLogger(__name__)


def select_subjects(
    spec: str | Sequence[str],
    subjects: Sequence[str],
    *,
    split: str | os.PathLike[str] | None = None,
) -> list[int]:
    """Indices of the subjects chosen by ``spec`` (:func:`neuroexplain.stage.select_subjects`).

    Args:
        spec: split names (``"test"``, ``"val,test"``: rows of ``split``), ``"all"``, or ids
            (comma-separated string or a sequence; ``sub-`` prefix optional).
        subjects: the ``preproc.pt`` subject ids.
        split: the classifier's ``split.tsv`` (needed for a split name).

    Raises:
        InputError: unknown subjects, a split name without a split file, or an empty selection.
    """
    from neuroexplain.classifier.data import read_split
    from neuroexplain.stage import select_subjects as select
    from neuroexplain.stage import subject_splits

    splits = subject_splits(read_split(split) if split is not None else None, subjects)
    return select(spec, subjects, splits, split_source=split)


def run_saliency(
    preproc: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: SaliencyConfig | None = None,
    *,
    subjects: str | Sequence[str] = "test",
    split: str | os.PathLike[str] | None = None,
    target: int = 0,
    device: str = "auto",
    progress: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Compute and write baseline attribution maps in native space.

    Args:
        preproc: ``preproc.pt`` of ``neuroexplain ingest-mri``.
        checkpoint: ``model.pt`` of ``neuroexplain train-classifier``.
        out: output folder (``results/saliency``).
        config: the methods and their parameters (:class:`~neuroexplain.settings.SaliencyConfig`;
            default: its defaults, the workflow's); keyword ``overrides`` replace its fields
            (``methods=["ig"], ig_steps=32``).
        subjects: ``"test"`` (default; uses ``split`` or ``split.tsv`` next to the checkpoint),
            ``"all"`` or subject ids.
        split: the ``split.tsv`` for split names (default: next to the checkpoint).
        target: logit index to explain.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: progress bar (``None``: only on a terminal).

    Returns:
        The ``saliency.json`` content (maps written per subject and method, timings, provenance).

    Raises:
        InputError: an unknown method or Grad-CAM layer, unreadable inputs or a bad selection.
    """
    from tqdm.auto import tqdm

    from neuroexplain.attribution.baselines import BaselineExplainer
    from neuroexplain.attribution.export import write_subject_maps
    from neuroexplain.classifier import default_target_layer
    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance
    from neuroexplain.stage import load_mri_context, preproc_subset, write_maps_manifest
    from neuroexplain.utils import release_memory

    cfg = SaliencyConfig.resolve(config, **overrides)
    methods = list(cfg.methods)
    all_params = cfg.method_params()
    params = {m: {} if m == "gradcam" else all_params[m] for m in methods}
    ctx = load_mri_context(preproc, checkpoint, split=split, device=device, labelled=True)
    data, model, ckpt = ctx.preproc, ctx.model, ctx.checkpoint
    layer = None
    if "gradcam" in methods:
        layer = cfg.layer or default_target_layer(ckpt["arch"])
        names = set(ckpt.get("layer_names", []))
        if names and layer not in names:
            top = sorted(n for n in names if n.count(".") <= 1)[:20]
            raise InputError(
                "--layer", f"no layer {layer!r} in the {ckpt['arch']} model; try {top}"
            )
    idx = ctx.select(subjects)
    # the loop reads the chosen subjects only: keep theirs, free the rest of the cohort's
    # volumes and label maps (most of preproc.pt when a split is explained)
    data = ctx.preproc = preproc_subset(data, idx)
    n_subjects = len(idx)
    del idx

    explainers = {
        m: BaselineExplainer(model, m, layer=layer if m == "gradcam" else None, **params[m])
        for m in methods
    }
    ck_sha = ctx.checkpoint_sha256
    run_params = {
        "methods": methods,
        "subjects": subjects if isinstance(subjects, str) else list(subjects),
        "layer": layer,
        "target": int(target),
        "method_params": {m: explainers[m].params for m in methods},
        "checkpoint": str(checkpoint),
        "preproc": str(preproc),
    }
    prov = provenance(
        run_params,
        seed=cfg.seed,
        inputs=[checkpoint, preproc],
        command="saliency",
    )
    common = {
        "Target": f"logit {target} ({ckpt.get('positive_class') or 'positive class'})",
        "Checkpoint": str(checkpoint),
        "CheckpointSHA256": ck_sha,
        "Architecture": ckpt["arch"],
        "provenance": prov,
    }
    out = Path(out)
    timings = dict.fromkeys(methods, 0.0)
    written: dict[str, dict[str, str]] = {}
    disable = None if progress is None else not progress
    for i in tqdm(range(n_subjects), desc="saliency", unit="subject", disable=disable):
        x = data["images"][i : i + 1].to(ctx.device)
        maps = {}
        for m in methods:
            t0 = time.perf_counter()
            maps[m] = explainers[m].attribute(x, target=target)[0].sum(0).cpu().numpy()
            timings[m] += time.perf_counter() - t0
            # the method's activations and gradients are freed: give the heap back, so the
            # peak stays at one method's working set instead of growing per subject and method
            release_memory()
        paths = write_subject_maps(
            maps,
            data,
            i,
            out,
            stage="saliency",
            sidecar=common,
            method_sidecars={
                m: {"Parameters": explainers[m].params, "Reference": _REFERENCES[m]}
                for m in methods
            },
            descriptions={
                m: f"neuroexplain saliency: {_LONG[m]} of logit {target}" for m in methods
            },
        )
        written[str(data["subjects"][i])] = {m: str(p) for m, p in paths.items()}
        del x, maps
        release_memory()
        logger.debug("subject %s done", data["subjects"][i])
    n = max(n_subjects, 1)
    summary = {
        "maps": written,
        "seconds_per_subject": {m: round(t / n, 3) for m, t in timings.items()},
        "checkpoint_sha256": ck_sha,
        "provenance": prov,
    }
    write_json(summary, out / "saliency.json")
    write_maps_manifest(
        out, "saliency", written, dict.fromkeys(methods, "saliency"), provenance=prov
    )
    logger.info(
        "wrote %d maps for %d subjects to %s (s/subject: %s)",
        len(methods) * n_subjects,
        n_subjects,
        out,
        ", ".join(f"{m} {t / n:.1f}" for m, t in timings.items()),
    )
    return summary


_LONG = {
    "gradient": "vanilla gradient",
    "gradxinput": "gradient x input",
    "smoothgrad": "SmoothGrad",
    "ig": "integrated gradients",
    "gradcam": "Grad-CAM",
    "occlusion": "occlusion sensitivity",
}

_REFERENCES = {
    "gradient": "Simonyan et al. 2014, arXiv:1312.6034 (Captum Saliency)",
    "gradxinput": "Shrikumar et al. 2016, arXiv:1605.01713 (Captum InputXGradient)",
    "smoothgrad": "Smilkov et al. 2017, arXiv:1706.03825 (Captum NoiseTunnel)",
    "ig": "Sundararajan et al. 2017, arXiv:1703.01365 (Captum IntegratedGradients)",
    "gradcam": "Selvaraju et al. 2017, arXiv:1610.02391 (MONAI GradCAM)",
    "occlusion": "Zeiler & Fergus 2014, arXiv:1311.2901 (MONAI OcclusionSensitivity)",
}
