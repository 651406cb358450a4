"""Which planted regions does the classifier use? Region transplants in a paired cohort.

A map of a classifier is judged against the planted ground truth, but a classifier need not use
every planted region: trained on a homogeneous effect it may separate the classes with the two
strongest regions and ignore the rest. A faithful explanation then shows the ignored regions
faintly or not at all, and the ground truth alone would call that a miss. This module measures
the classifier's reliance on each region directly, without any attribution method.

In a paired cohort (``make-cohort --paired``) the control and the diseased version of one
anatomy differ only by the planted deformation. For each region (label group of the control's
and the diseased version's label maps, dilated by ``dilate`` voxels to take in the deformation
around it) two hybrids are scored:

- ``inject``: the control with the diseased image inside the region; ``delta_inject`` =
  ``logit(hybrid) - logit(control)``;
- ``remove``: the diseased image with the control inside the region; ``delta_remove`` =
  ``logit(hybrid) - logit(diseased)``.

``share_inject = delta_inject / gap`` and ``share_remove = -delta_remove / gap``, with ``gap =
logit(diseased) - logit(control)``, are the fractions of the pair's logit gap that the region
alone carries: near 1 for a region the decision rests on, near 0 for one it ignores. Shares of
several regions need not add up to 1 (the network is not additive).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError

__all__ = ["paired_indices", "region_reliance", "run_region_reliance", "summarize_reliance"]

logger = logging.getLogger(__name__)
COMMAND = "region-reliance"


def paired_indices(
    groups: Sequence[str], y: Sequence[float], among: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """``(control, diseased)`` index pairs: groups with exactly one subject of each class.

    Args:
        groups: group (source anatomy) of every subject.
        y: class label of every subject (1 = diseased).
        among: only these subject indices (default: all).

    Example:
        >>> paired_indices(["a", "a", "b", "c", "c"], [0, 1, 0, 1, 0])
        [(0, 1), (4, 3)]
    """
    idx = range(len(groups)) if among is None else among
    members: dict[str, list[int]] = {}
    for i in idx:
        members.setdefault(str(groups[i]), []).append(int(i))
    pairs = []
    for g in sorted(members, key=lambda k: members[k][0]):
        m = members[g]
        ctl = [i for i in m if float(y[i]) == 0]
        dis = [i for i in m if float(y[i]) == 1]
        if len(m) == 2 and len(ctl) == 1 and len(dis) == 1:
            pairs.append((ctl[0], dis[0]))
    return pairs


def region_reliance(
    model: Any,
    images: Any,
    dseg: Any,
    pairs: Sequence[tuple[int, int]],
    regions: Mapping[str, Sequence[int]],
    *,
    names: Sequence[str] | None = None,
    dilate: int = 2,
    target: int = 0,
    batch_size: int = 8,
) -> Any:
    """Logit changes of the region transplants of every pair (see the module notes).

    Args:
        model: the classifier (put in eval mode; no gradients are taken).
        images: ``(N, C, X, Y, Z)`` model-space images (tensor).
        dseg: ``(N, 1, X, Y, Z)`` model-space label maps.
        pairs: ``(control, diseased)`` indices.
        regions: region name -> label indices.
        names: subject ids (default: the indices).
        dilate: dilation of each region mask in voxels.
        target: logit index.
        batch_size: hybrids per forward pass.

    Returns:
        DataFrame, one row per pair and region: ``control, diseased, region, n_voxels,
        logit_control, logit_diseased, delta_inject, delta_remove, share_inject, share_remove``.
    """
    import pandas as pd
    import torch
    from scipy import ndimage

    if not pairs:
        raise ValueError("expected at least one (control, diseased) pair")
    if not regions:
        raise ValueError("expected at least one region")
    model.eval()
    dev = next(model.parameters()).device
    struct = ndimage.generate_binary_structure(3, 1)

    def logits(batch: list[Any]) -> list[float]:
        out = []
        with torch.no_grad():
            for s in range(0, len(batch), batch_size):
                x = torch.stack(batch[s : s + batch_size]).to(dev)
                out += model(x)[:, target].float().cpu().tolist()
        return out

    rows = []
    for c, d in pairs:
        xc, xd = images[c], images[d]
        lab_c, lab_d = dseg[c, 0].cpu().numpy(), dseg[d, 0].cpu().numpy()
        masks = {}
        for name, labels in regions.items():
            m = np.isin(lab_c, labels) | np.isin(lab_d, labels)
            if dilate > 0 and m.any():
                m = ndimage.binary_dilation(m, struct, iterations=int(dilate))
            masks[name] = torch.from_numpy(m)[None].to(xc.dtype)
        batch = [xc, xd]
        for m in masks.values():
            batch += [xc * (1 - m) + xd * m, xd * (1 - m) + xc * m]
        out = logits(batch)
        lc, ld = out[0], out[1]
        gap = ld - lc
        for k, (name, m) in enumerate(masks.items()):
            inj, rem = out[2 + 2 * k] - lc, out[3 + 2 * k] - ld
            rows.append(
                {
                    "control": names[c] if names is not None else c,
                    "diseased": names[d] if names is not None else d,
                    "region": name,
                    "n_voxels": int(m.sum().item()),
                    "logit_control": lc,
                    "logit_diseased": ld,
                    "delta_inject": inj,
                    "delta_remove": rem,
                    "share_inject": inj / gap if gap != 0 else float("nan"),
                    "share_remove": -rem / gap if gap != 0 else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def summarize_reliance(table: Any) -> Any:
    """Per region: number of pairs, mean and sd of the deltas and shares, in region order."""
    import pandas as pd

    cols = ["delta_inject", "delta_remove", "share_inject", "share_remove"]
    order = list(dict.fromkeys(table["region"]))
    g = table.groupby("region", sort=False)[cols]
    out = pd.concat([g.count()["delta_inject"].rename("n"), g.mean(), g.std(ddof=1)], axis=1)
    out.columns = ["n", *(f"{c}_mean" for c in cols), *(f"{c}_sd" for c in cols)]
    return out.loc[order].reset_index()


def run_region_reliance(
    preproc: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    regions: Mapping[str, Sequence[int]],
    *,
    subjects: str | Sequence[str] = "test",
    split: str | os.PathLike[str] | None = None,
    dilate: int = 2,
    target: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Region transplants of the paired subjects, written as ``<out>.tsv`` (per pair and region),
    ``<out>_summary.tsv`` and ``<out>.json`` (summary and provenance).

    Raises:
        InputError: no pairs among the chosen subjects (the cohort is not paired), no regions,
            or a region that is empty in every subject.
    """
    from neuroexplain import __version__
    from neuroexplain.io.atomic import write_json, write_table
    from neuroexplain.provenance import provenance
    from neuroexplain.stage import load_mri_context
    from neuroexplain.utils import check_region_labels

    if not regions:
        raise InputError("--regions", "expected at least one NAME=LABEL,LABEL region")
    if dilate < 0:
        raise InputError("--dilate", f"expected a dilation >= 0 voxels, got {dilate}")
    ctx = load_mri_context(preproc, checkpoint, split=split, device=device, labelled=True)
    data = ctx.preproc
    if data.get("dseg") is None:
        raise InputError(preproc, "has no label maps (dseg): ingest with --derivatives")
    idx = ctx.select(subjects)
    groups = data.get("groups") or data["subjects"]
    pairs = paired_indices(groups, data["y"].tolist(), among=idx)
    if not pairs:
        raise InputError(
            preproc,
            "no control/diseased pairs of one anatomy among the chosen subjects; region "
            "transplants need a paired cohort (make-cohort --paired)",
        )
    dseg = data["dseg"]
    empty = [
        n for n, labs in regions.items()
        if not any(np.isin(dseg[i, 0].numpy(), labs).any() for p in pairs for i in p)
    ]  # fmt: skip
    if empty:
        raise InputError(preproc, f"regions {empty} are empty in every chosen subject's dseg")
    chosen = [i for p in pairs for i in p]
    notes = check_region_labels(
        regions,
        [np.unique(dseg[i, 0].numpy()) for i in chosen],
        where=f"{Path(preproc).name}, model grid",
        subjects=[str(data["subjects"][i]) for i in chosen],
    )
    logger.info("region transplants: %d pairs x %d regions", len(pairs), len(regions))
    table = region_reliance(
        ctx.model,
        data["images"],
        dseg,
        pairs,
        regions,
        names=data["subjects"],
        dilate=dilate,
        target=target,
    )
    summary = summarize_reliance(table)
    stem = Path(out)
    stem = stem.with_suffix("") if stem.suffix in (".tsv", ".json") else stem
    params = {
        "regions": {k: [int(v) for v in labs] for k, labs in regions.items()},
        "subjects": subjects if isinstance(subjects, str) else list(subjects),
        "dilate": int(dilate),
        "target": int(target),
        "checkpoint": str(checkpoint),
        "preproc": str(preproc),
        "version": __version__,
    }
    result = {
        **provenance(params, inputs=[preproc, checkpoint], command=COMMAND),
        "checkpoint_sha256": ctx.checkpoint_sha256,
        "n_pairs": len(pairs),
        "warnings": notes,
        "summary": summary.to_dict(orient="records"),
        "columns": {
            "share_inject": "logit change of the control with the diseased region / logit gap",
            "share_remove": "logit change of the diseased with the control region / -logit gap",
        },
    }
    write_table(table, stem.with_suffix(".tsv"))
    write_table(summary, stem.parent / f"{stem.name}_summary.tsv")
    write_json(result, stem.with_suffix(".json"))
    for r in summary.itertuples():
        logger.info(
            "%-20s share inject %.3f, remove %.3f (n=%d)",
            r.region, r.share_inject_mean, r.share_remove_mean, r.n,
        )  # fmt: skip
    return result
