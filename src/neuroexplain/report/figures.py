"""Report figures of the MRI explanation maps (``neuroexplain figures``).

Two kinds of PNG figures, both from files the earlier stages wrote (nothing is recomputed from
the models):

* **Map overlays** -- one figure per method (``<out>/<method>.png``): for a few diseased
  subjects of the evaluated split (one row each), orthogonal slices (nilearn ``plot_stat_map``)
  of the method's map over the subject's **native** T1w, the image the map was written on (no
  resampling by the reader; the maps come out of the stages in native space). Every method is
  cut at the same world coordinates per subject: the voxel of largest ``|log J|`` of the ground
  truth when the synthetic cohort is known, else the centroid of the first label of the first
  region. Colours are scaled per panel to the 99.5th percentile of ``|map|`` in the brain, and
  voxels below ``threshold_fraction`` of it are transparent. Signed maps use a diverging scale
  symmetric around 0 (red > 0, blue < 0), non-negative maps a sequential one (dark red to
  yellow). The ground truth of the cohort
  (``groundtruth.png``) comes first.
* **Region bars** (``regions_figure``): mean log-Jacobian per region (dseg labels) and subject,
  averaged over the diseased and the healthy subjects of the split, for the cohort's ground truth
  and each log-Jacobian map (the simulator's disease maps), with one dot per subject. The long
  table behind it is written next to the PNG (``.tsv``).

Sign convention of every log-Jacobian (ground truth and simulator): ``log J > 0`` where the
disease **expands** tissue (enlarged ventricles), ``< 0`` where it **shrinks** it (atrophy), on
the diseased image's grid; red is positive, blue negative. Attribution maps are signed as their
method defines them (positive = evidence for the explained logit of the disease class).

Example:
    >>> make_figures("results/ingest/mri/subjects.tsv", "results/figures/maps",
    ...              cohort="results/cohort", maps={"ig": "results/saliency"},
    ...              split="results/classifier/split.tsv")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError

__all__ = [
    "GROUND_TRUTH",
    "cut_coords",
    "make_figures",
    "pick_subjects",
    "plot_method_maps",
    "plot_region_bars",
    "read_subjects",
    "region_table",
]

logger = logging.getLogger(__name__)

#: name of the cohort's ground truth among the methods (``groundtruth.png``)
GROUND_TRUTH = "groundtruth"

_CONVENTION = (
    "log-Jacobian maps (ground truth, simulator): > 0 tissue expanded by the disease, < 0 shrunk, "
    "on the diseased image's grid; red positive, blue negative. Attribution maps: signed as their "
    "method defines them (positive = evidence for the disease logit)."
)


def _full_id(s: Any) -> str:
    s = str(s).strip()
    return s if s.startswith("sub-") else f"sub-{s}"


# -------------------------------------------------------------------------------- subjects


def read_subjects(
    subjects: str | os.PathLike[str],
    *,
    split: str | os.PathLike[str] | None = None,
    split_name: str = "test",
) -> Any:
    """The ingest's subject table, optionally restricted to one split.

    Args:
        subjects: ``subjects.tsv`` of ``neuroexplain ingest-mri`` (columns ``participant_id``,
            ``t1``, ``dseg``, ``label``, ``y``).
        split: ``split.tsv`` of ``neuroexplain train-classifier`` (``subject``, ``split``), or
            ``None`` for every subject.
        split_name: the split kept (``test``, ``val``, ``train``) or ``all``.

    Returns:
        DataFrame with columns ``subject`` (``sub-...``), ``t1``, ``dseg``, ``label``, ``y``
        (float, NaN when unlabelled), sorted by ``subject``.

    Raises:
        InputError: a missing or malformed table, or a split with none of the subjects.
    """
    import pandas as pd

    p = Path(subjects)
    if not p.is_file():
        raise InputError(p, "subject table not found (subjects.tsv of ingest-mri)")
    df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False)
    need = {"participant_id", "t1"}
    if not need <= set(df.columns):
        raise InputError(p, f"expected columns {sorted(need)}, got {list(df.columns)}")
    out = pd.DataFrame(
        {
            "subject": [_full_id(s) for s in df["participant_id"]],
            "t1": df["t1"],
            "dseg": df["dseg"] if "dseg" in df.columns else "",
            "label": df["label"] if "label" in df.columns else "",
            "y": pd.to_numeric(df["y"], errors="coerce") if "y" in df.columns else np.nan,
        }
    )
    if split is not None and split_name != "all":
        from neuroexplain.evaluate.harness import parse_subjects

        keep = set(parse_subjects(str(split), split=split_name) or [])
        out = out[out["subject"].isin(keep)]
        if out.empty:
            raise InputError(split, f"none of the subjects of {p} is in split {split_name!r}")
    return out.sort_values("subject").reset_index(drop=True)


def pick_subjects(table: Any, n: int) -> list[str]:
    """The first ``n`` diseased subjects (``y == 1``) by id; all subjects when none is diseased.

    Raises:
        InputError: ``n < 1``.
    """
    if n < 1:
        raise InputError("--n-subjects", f"expected >= 1, got {n}")
    diseased = table.loc[table["y"] == 1, "subject"].tolist()
    if not diseased:
        logger.warning("no diseased subject (y = 1) in the selection: showing the first %d", n)
        diseased = table["subject"].tolist()
    return diseased[:n]


def _path(text: str, table_path: Any, what: str) -> Path:
    p = Path(text)
    if not text or not p.is_file():
        raise InputError(table_path, f"{what} {text!r} not found")
    return p


# ------------------------------------------------------------------------------ map figures


def cut_coords(
    affine: np.ndarray,
    values: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    region: Sequence[int] | None = None,
) -> tuple[float, float, float] | None:
    """World (RAS mm) point where the orthogonal slices cross.

    Args:
        affine: ``(4, 4)`` voxel-to-world affine of the native grid.
        values: ``(X, Y, Z)`` map whose largest ``|value|`` voxel is taken (the ground truth).
        labels: ``(X, Y, Z)`` dseg, used when ``values`` is ``None`` or all zero.
        region: labels whose first entry's centroid is taken from ``labels``.

    Returns:
        ``(x, y, z)`` in mm, or ``None`` (let nilearn choose) when neither applies.
    """
    ijk: np.ndarray | None = None
    if values is not None and np.any(values):
        ijk = np.asarray(np.unravel_index(int(np.argmax(np.abs(values))), values.shape), float)
    elif labels is not None and region:
        mask = labels == int(region[0])
        if mask.any():
            ijk = np.argwhere(mask).mean(axis=0)
    if ijk is None:
        return None
    xyz = np.asarray(affine, dtype=np.float64) @ np.append(ijk, 1.0)
    return (float(xyz[0]), float(xyz[1]), float(xyz[2]))


def _agg_figure(nrows: int, width: float, row_height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, row_height * nrows))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, 1, squeeze=False).ravel())
    return fig, axes


def _save_png(fig: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    from neuroexplain.io.atomic import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return Path(path)


def plot_method_maps(
    method: str,
    panels: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    threshold_fraction: float = 0.1,
    dpi: int = 100,
) -> Path:
    """One method's maps over the native T1w of a few subjects, one row of orthogonal slices each.

    Args:
        method: method name (figure title).
        panels: per subject ``{"title": str, "t1": path, "map": path, "dseg": path or "",
            "cut": (x, y, z) mm or None}``; the map must lie on the T1w's grid.
        path: PNG to write.
        threshold_fraction: voxels with ``|map|`` below this fraction of the colour limit are not
            drawn (0 draws every non-zero voxel).
        dpi: resolution.

    Returns:
        ``path``.

    Raises:
        InputError: an unreadable map or T1w, or a map not on its T1w's grid.
    """
    import nibabel as nib
    from nilearn.plotting import plot_stat_map

    from neuroexplain.io.nifti import check_same_grid, load_labels, load_map, load_volume

    if not panels:
        raise ValueError("expected at least one subject panel")
    if not 0 <= threshold_fraction < 1:
        raise InputError("--threshold", f"expected a fraction in [0, 1), got {threshold_fraction}")
    fig, axes = _agg_figure(len(panels), 9.0, 2.9)
    fig.set_facecolor("black")
    for ax, panel in zip(axes, panels, strict=True):
        t1_img, _ = load_volume(panel["t1"])
        img, data = load_map(panel["map"])
        check_same_grid(img, t1_img, panel["map"], panel["t1"])
        if panel.get("dseg"):
            _, labels = load_labels(panel["dseg"], t1_img, like_path=panel["t1"])
            inside = np.abs(data[labels > 0])
        else:
            inside = np.abs(data[data != 0])
        vmax = float(np.percentile(inside, 99.5)) if inside.size else 0.0
        if not vmax > 0:
            vmax = float(np.abs(data).max()) or 1.0
        # signed maps: diverging, symmetric around 0 (red > 0, blue < 0); non-negative maps
        # (Grad-CAM, SACV relevance, |ground truth|): a sequential scale from 0
        signed = bool((data < 0).any())
        stat = nib.Nifti1Image(data, img.affine, img.header)
        plot_stat_map(
            stat,
            bg_img=t1_img,
            cut_coords=panel.get("cut"),
            display_mode="ortho",
            figure=fig,
            axes=ax,
            title=str(panel["title"]),
            threshold=threshold_fraction * vmax if threshold_fraction > 0 else 1e-6,
            vmax=vmax,
            cmap="RdBu_r" if signed else "hot",
            symmetric_cbar=signed,
            black_bg=True,
            colorbar=True,
            draw_cross=True,
            annotate=True,
        )
    fig.suptitle(method, color="white", fontsize=11)
    out = _save_png(fig, path, dpi)
    fig.clear()
    return out


# ----------------------------------------------------------------------------- region bars


def region_table(
    table: Any,
    sources: Mapping[str, str | os.PathLike[str]],
    regions: Mapping[str, Sequence[int]],
    *,
    cohort: str | os.PathLike[str] | None = None,
    derivatives: str = "dlmuse",
    table_path: Any = "subjects.tsv",
) -> Any:
    """Mean log-Jacobian per subject, source and region, on each subject's native dseg.

    Args:
        table: :func:`read_subjects` rows (needs ``dseg`` paths).
        sources: ``{method: folder or {subject} template}`` of log-Jacobian maps (see
            :func:`neuroexplain.evaluate.harness.resolve_map`).
        regions: ``{name: [dseg labels]}``.
        cohort: the synthetic cohort; adds the ground truth as source :data:`GROUND_TRUTH`.
        derivatives: dseg derivatives folder of the cohort.
        table_path: named in errors about the table's paths.

    Returns:
        Long DataFrame ``subject, y, source, region, labels, n_voxels, mean_logjacobian``.

    Raises:
        InputError: no source or region, a subject without dseg, a missing map, or a map on
            another grid than the dseg.
    """
    import pandas as pd

    from neuroexplain.evaluate.harness import ground_truth_paths, resolve_map
    from neuroexplain.io.nifti import load_labels, load_map
    from neuroexplain.simulator.maps import region_means
    from neuroexplain.utils import check_region_labels

    if not regions:
        raise InputError("--regions", "expected at least one NAME=LABEL[,LABEL] region")
    srcs: dict[str, Any] = {}
    if cohort is not None:
        srcs[GROUND_TRUTH] = None
    srcs.update(sources)
    if not srcs:
        raise InputError("--regions-figure", "needs --cohort or --logjacobian-maps to plot")
    rows = []
    present: dict[str, np.ndarray] = {}  # each subject's labels, for the --regions check
    for rec in table.itertuples(index=False):
        dseg = _path(rec.dseg, table_path, f"dseg of {rec.subject}")
        for source, spec in srcs.items():
            if source == GROUND_TRUTH:
                path = ground_truth_paths(cohort, rec.subject, derivatives=derivatives)[
                    "logjacobian"
                ]
            else:
                path = resolve_map(spec, rec.subject, source)
            img, values = load_map(path)
            _, labels = load_labels(dseg, img, like_path=path)
            if rec.subject not in present:
                present[rec.subject] = np.unique(labels)
            for name, (mean, n) in region_means(values, labels, regions).items():
                rows.append(
                    {
                        "subject": rec.subject,
                        "y": rec.y,
                        "source": source,
                        "region": name,
                        "labels": ",".join(str(v) for v in regions[name]),
                        "n_voxels": n,
                        "mean_logjacobian": mean,
                    }
                )
    check_region_labels(  # a label no subject has would only give empty bars
        regions, list(present.values()), where=f"dseg of {table_path}", subjects=list(present)
    )
    return pd.DataFrame(rows)


def _group_name(y: float) -> str:
    if y == 1:
        return "diseased"
    if y == 0:
        return "healthy"
    return "unlabelled"


def plot_region_bars(df: Any, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Bars of the mean log-Jacobian per region and source, one panel per group.

    Args:
        df: :func:`region_table` output.
        path: PNG to write.
        dpi: resolution.

    Returns:
        ``path``. Bars: mean over subjects; error bars: sd; dots: subjects.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if df.empty:
        raise ValueError("expected a non-empty region table")
    data = df.assign(group=[_group_name(v) for v in df["y"]])
    groups = [g for g in ("diseased", "healthy", "unlabelled") if g in set(data["group"])]
    regions = list(dict.fromkeys(data["region"]))
    sources = list(dict.fromkeys(data["source"]))
    width = 0.8 / len(sources)
    fig = Figure(
        figsize=(max(4.0, 1.3 * len(regions) * max(1, len(sources)) / 2 + 2.5) * len(groups), 3.8),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(groups), sharey=True, squeeze=False).ravel())
    colors = {s: f"C{i}" for i, s in enumerate(sources)}
    for ax, group in zip(axes, groups, strict=True):
        sub = data[data["group"] == group]
        for k, source in enumerate(sources):
            x0 = np.arange(len(regions)) + (k - (len(sources) - 1) / 2) * width
            means, sds = [], []
            for j, region in enumerate(regions):
                vals = sub.loc[
                    (sub["source"] == source) & (sub["region"] == region), "mean_logjacobian"
                ].to_numpy(dtype=np.float64)
                vals = vals[np.isfinite(vals)]
                means.append(float(vals.mean()) if vals.size else np.nan)
                sds.append(float(vals.std(ddof=1)) if vals.size > 1 else 0.0)
                ax.plot(
                    np.full(vals.size, x0[j]),
                    vals,
                    "o",
                    ms=3,
                    color="black",
                    alpha=0.6,
                    zorder=3,
                )
            ax.bar(x0, means, width, yerr=sds, color=colors[source], label=source, capsize=3)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xticks(np.arange(len(regions)), regions, fontsize=8)
        n = sub["subject"].nunique()
        ax.set_title(f"{group} subjects (n = {n})", fontsize=9)
    axes[0].set_ylabel("mean log-Jacobian in region\n(> 0 expanded, < 0 shrunk)", fontsize=8)
    axes[-1].legend(fontsize=7, loc="best")
    return _save_png(fig, path, dpi)


# --------------------------------------------------------------------------------- the run


def _cohort_magnitudes(cohort: Path | None) -> dict[str, str]:
    import pandas as pd

    if cohort is None:
        return {}
    tsv = Path(cohort) / "participants.tsv"
    if not tsv.is_file():
        raise InputError(tsv, "participants.tsv not found (is this a make-cohort output?)")
    df = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    if "participant_id" not in df.columns or "effect_magnitude" not in df.columns:
        return {}
    return {
        _full_id(s): m for s, m in zip(df["participant_id"], df["effect_magnitude"], strict=True)
    }


def _subject_panels(
    table: Any,
    shown: Sequence[str],
    methods: Mapping[str, Any],
    *,
    subjects: str | os.PathLike[str],
    cohort_dir: Path | None,
    derivatives: str,
    first_region: Sequence[int] | None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The panels of each method's figure (one per shown subject) and the subjects' cut points.

    The cut point of a subject is the voxel of largest ``|log J|`` of the cohort's ground truth,
    else the centroid of ``first_region`` in its dseg, else ``None`` (nilearn's default).

    Returns:
        ``({method: [panel, ...]}, {subject: cut coordinates in mm or None})``; a panel holds
        ``title``, ``t1``, ``map``, ``dseg`` and ``cut``.
    """
    from neuroexplain.evaluate.harness import ground_truth_paths, resolve_map
    from neuroexplain.io.nifti import load_labels, load_map, load_volume

    rows = table.set_index("subject")
    magnitude = _cohort_magnitudes(cohort_dir)
    panels: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    cuts: dict[str, Any] = {}
    for sub in shown:
        rec = rows.loc[sub]
        t1 = _path(rec["t1"], subjects, f"T1w of {sub}")
        dseg = str(_path(rec["dseg"], subjects, f"dseg of {sub}")) if rec["dseg"] else ""
        gt = (
            ground_truth_paths(cohort_dir, sub, derivatives=derivatives)["logjacobian"]
            if cohort_dir is not None
            else None
        )
        t1_img, _ = load_volume(t1)
        if gt is not None:
            _, values = load_map(gt)
            cut = cut_coords(t1_img.affine, values=values)
        elif dseg:
            _, labels = load_labels(dseg, t1_img, like_path=t1)
            cut = cut_coords(t1_img.affine, labels=labels, region=first_region)
        else:
            cut = None
        cuts[sub] = list(cut) if cut is not None else None
        label = rec["label"] or ("disease" if rec["y"] == 1 else "")
        mag = magnitude.get(sub, "")
        title = f"{sub}  {label}" + (
            f"  (effect {float(mag):.2f})" if mag not in ("", None) else ""
        )
        for method, spec in methods.items():
            path = gt if method == GROUND_TRUTH else resolve_map(spec, sub, method)
            panels[method].append(
                {"title": title, "t1": str(t1), "map": str(path), "dseg": dseg, "cut": cut}
            )
    return panels, cuts


def _write_method_figures(
    panels: Mapping[str, list[dict[str, Any]]], out_dir: Path, *, threshold_fraction: float
) -> dict[str, Any]:
    """Write ``out_dir/<method>.png`` per method; returns ``{method: {"png", "maps"}}``."""
    figures: dict[str, Any] = {}
    for method, method_panels in panels.items():
        png = plot_method_maps(
            method, method_panels, out_dir / f"{method}.png", threshold_fraction=threshold_fraction
        )
        figures[method] = {"png": png.name, "maps": [p["map"] for p in method_panels]}
        logger.info("wrote %s", png)
    return figures


def _write_region_figure(df: Any, fig_path: Path) -> dict[str, str]:
    """Write the region bar figure ``fig_path`` and its table (same stem, ``.tsv``)."""
    from neuroexplain.io.atomic import write_table

    tsv = fig_path.with_suffix(".tsv")
    write_table(df, tsv)
    plot_region_bars(df, fig_path)
    logger.info("wrote %s", fig_path)
    return {"png": str(fig_path), "table": str(tsv)}


def make_figures(
    subjects: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    cohort: str | os.PathLike[str] | None = None,
    maps: Mapping[str, str | os.PathLike[str]] | None = None,
    logjacobian_maps: Sequence[str] = (),
    split: str | os.PathLike[str] | None = None,
    split_name: str = "test",
    n_subjects: int = 3,
    regions: Mapping[str, Sequence[int]] | None = None,
    regions_figure: str | os.PathLike[str] | None = None,
    derivatives: str = "dlmuse",
    threshold_fraction: float = 0.1,
) -> dict[str, Any]:
    """Write the report's MRI figures.

    Writes ``out/<method>.png`` per method (``groundtruth.png`` first when ``cohort`` is given),
    ``out/figures.json`` (figures, subjects, cut points, provenance) and, with
    ``regions_figure``, that PNG plus its table (same stem, ``.tsv``).

    Args:
        subjects: ``subjects.tsv`` of ``neuroexplain ingest-mri`` (native T1w and dseg paths).
        out: output folder of the map figures.
        cohort: synthetic cohort (``make-cohort`` output): its ground truth is shown first and
            sets the cut points.
        maps: ``{method: folder or {subject} template}`` of per-subject native-space maps (as
            for ``neuroexplain evaluate-maps``).
        logjacobian_maps: methods of ``maps`` whose maps are log-Jacobians (bar figure sources).
        split: ``split.tsv``; subjects are taken from its ``split_name`` rows.
        split_name: ``test``, ``val``, ``train`` or ``all``.
        n_subjects: diseased subjects shown per method.
        regions: ``{name: [dseg labels]}`` of the bar figure (the first region's first label
            also sets the cut point without a cohort).
        regions_figure: PNG path of the bar figure (``None``: skip it).
        derivatives: dseg derivatives folder of the cohort.
        threshold_fraction: see :func:`plot_method_maps`.

    Returns:
        The ``figures.json`` content.

    Raises:
        InputError: bad inputs (missing files, maps on another grid, nothing to plot).
    """
    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    maps = dict(maps or {})
    regions = {k: list(v) for k, v in (regions or {}).items()}
    unknown = [m for m in logjacobian_maps if m not in maps]
    if unknown:
        raise InputError("--logjacobian-maps", f"methods {unknown} are not among --maps")
    if GROUND_TRUTH in maps:
        raise InputError("--maps", f"method name {GROUND_TRUTH!r} is reserved for the cohort")
    if cohort is None and not maps:
        raise InputError("--maps", "nothing to plot: give --cohort and/or --maps")
    cohort_dir = Path(cohort) if cohort is not None else None
    table = read_subjects(subjects, split=split, split_name=split_name)
    shown = pick_subjects(table, n_subjects)

    methods: dict[str, Any] = ({GROUND_TRUTH: None} if cohort_dir is not None else {}) | maps
    panels, cuts = _subject_panels(
        table,
        shown,
        methods,
        subjects=subjects,
        cohort_dir=cohort_dir,
        derivatives=derivatives,
        first_region=next(iter(regions.values()), None),
    )

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _write_method_figures(panels, out_dir, threshold_fraction=threshold_fraction)

    params = {
        "subjects": str(subjects),
        "cohort": str(cohort) if cohort is not None else None,
        "maps": {k: str(v) for k, v in maps.items()},
        "logjacobian_maps": list(logjacobian_maps),
        "split": str(split) if split is not None else None,
        "split_name": split_name,
        "n_subjects": n_subjects,
        "regions": regions,
        "derivatives": derivatives,
        "threshold_fraction": threshold_fraction,
    }
    prov = provenance(params, inputs=[subjects, *([split] if split else [])], command="figures")
    summary: dict[str, Any] = {
        "subjects": shown,
        "cut_coords_mm": cuts,
        "figures": figures,
        "convention": _CONVENTION,
        "provenance": prov,
    }
    if regions_figure is not None:
        df = region_table(
            table,
            {m: maps[m] for m in logjacobian_maps},
            regions,
            cohort=cohort_dir,
            derivatives=derivatives,
            table_path=subjects,
        )
        summary["regions_figure"] = _write_region_figure(df, Path(regions_figure))
    write_json(summary, out_dir / "figures.json")
    return summary
