"""End-to-end XNN runs: ``neuroexplain xnn-train`` and ``neuroexplain xnn-explain``.

``run_xnn_train`` extracts a named layer's activations for every subject of ``preproc.pt``,
trains an :class:`~neuroexplain.xnn.srae.SRAE` on the training split against the classifier's
logits, and writes (``out`` = e.g. ``results/xnn``):

- ``srae.pt``: SRAE checkpoint (``weights_only`` loadable) with the layer, pooling, the
  classifier checkpoint's sha256, the training subjects and provenance;
- ``srae_train_log.tsv``: per-epoch losses; ``srae_train.json``: metrics per split.

``run_xnn_explain`` refuses an SRAE trained on another checkpoint, then writes

- ``sub-X/sub-X_desc-xnnfeature<i>_map.nii.gz`` (+ sidecar): attribution of feature ``i``'s
  logit contribution over the input, in the subject's native T1w space;
- ``maps.json``: the maps manifest of the feature maps, kind ``feature-attribution``
  (:func:`neuroexplain.stage.write_maps_manifest`);
- ``xnn_features.tsv``: per subject the features, contributions and significant features;
- ``xnn_metrics.json``: faithfulness (R², RMSE, decision agreement), reconstruction error,
  orthogonality, sparsity per split, and (with a cohort) the harness score of each feature's
  maps; ``xnn.png``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroexplain.errors import InputError
from neuroexplain.settings import SRAEConfig, XNNExplainConfig, XNNTrainConfig
from neuroexplain.stage import (
    harness_means,
    load_mri_context,
    stage_provenance,
    write_maps_manifest,
)

__all__ = ["run_xnn_explain", "run_xnn_train"]

logger = logging.getLogger(__name__)


def _split_metrics(
    srae: Any, acts: torch.Tensor, logits: torch.Tensor, table: Any, coverage: float, q: float
) -> dict[str, Any]:
    from neuroexplain.xnn.explain import explanation_metrics

    out = {}
    splits = [s for s in ("train", "val", "test", "all") if (table["split"] == s).any()]
    for s in splits:
        idx = np.flatnonzero((table["split"] == s).to_numpy())
        out[s] = explanation_metrics(srae, acts[idx], logits[idx], coverage=coverage, q=q)
    return out


def run_xnn_train(
    preproc: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: SRAEConfig | None = None,
    *,
    train_config: XNNTrainConfig | None = None,
    split: str | os.PathLike[str] | None = None,
    train_split: str = "train",
    device: str = "auto",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train an SRAE explanation space of a classifier layer.

    Args:
        preproc: ``preproc.pt`` (or its folder).
        checkpoint: classifier ``model.pt``.
        out: output folder.
        config: the SRAE's options (:class:`~neuroexplain.settings.SRAEConfig`).
        train_config: the explained layer, its pooling and the batch size of the activation
            pass (:class:`~neuroexplain.settings.XNNTrainConfig`).
        split: ``split.tsv`` (default: next to the checkpoint).
        train_split: split(s) the SRAE is fitted on (comma-separated).
        device: device of the classifier (the SRAE trains on the CPU).
        progress: progress bars.

    Returns:
        The ``srae_train.json`` content.
    """
    import pandas as pd

    from neuroexplain.concepts3d.run import context_table, subject_indices
    from neuroexplain.io.atomic import write_json, write_table
    from neuroexplain.utils import seed_everything
    from neuroexplain.xnn.explain import default_layer, extract_activations
    from neuroexplain.xnn.srae import save_srae, train_srae

    cfg = config or SRAEConfig()
    tcfg = train_config or XNNTrainConfig()
    pool = tcfg.pool
    seed_everything(cfg.seed)
    out_dir = Path(out)
    ctx = load_mri_context(preproc, checkpoint, split=split, device=device, strict_split=True)
    table = context_table(ctx)
    try:
        layer = tcfg.layer or default_layer(ctx.model)
        acts, logits = extract_activations(
            ctx.model,
            ctx.preproc["images"],
            layer,
            pool=pool,
            batch_size=tcfg.batch_size,
            device=ctx.device,
            progress=progress,
        )
    except ValueError as exc:
        raise InputError("--layer", str(exc)) from exc
    tr = subject_indices(table, train_split)
    logger.info(
        "SRAE on %s (%s pooling): %d dims, %d training subjects",
        layer,
        pool,
        acts.shape[1],
        len(tr),
    )
    srae, hist = train_srae(acts[tr], logits[tr], cfg, progress=progress)
    metrics = _split_metrics(srae, acts, logits, table, cfg.coverage, cfg.q)
    params = {
        "preproc": str(ctx.preproc_path),
        "checkpoint": str(ctx.checkpoint_path),
        "layer": layer,
        "pool": pool,
        "split": str(ctx.split_path),
        "train_split": train_split,
        "config": cfg.__dict__,
    }
    prov = stage_provenance(params, cfg.seed, [ctx.split_path], "xnn-train")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_srae(
        out_dir / "srae.pt",
        srae,
        config=cfg,
        extra={
            "layer": layer,
            "pool": pool,
            "checkpoint_sha256": ctx.checkpoint_sha256,
            "checkpoint": str(ctx.checkpoint_path),
            "train_subjects": [table["subject"][i] for i in tr],
            "attempts": hist["attempts"],
            "provenance": prov,
        },
    )
    log = pd.DataFrame(
        {
            "epoch": np.arange(1, len(hist["total"]) + 1),
            "loss": hist["total"],
            "pred": hist["pred"],
            "rec": hist["rec"],
            "pt": hist["pt"],
            "use": hist["use"],
        }
    )
    write_table(log, out_dir / "srae_train_log.tsv")
    result = {
        "method": "XNN / SRAE (Qi, Khorram & Li 2017, arXiv:1709.05360)",
        "checkpoint_sha256": ctx.checkpoint_sha256,
        "layer": layer,
        "pool": pool,
        "in_features": int(acts.shape[1]),
        "n_features": cfg.n_features,
        "metrics": metrics,
        "attempts": hist["attempts"],
        "provenance": prov,
    }
    write_json(result, out_dir / "srae_train.json")
    for s, m in metrics.items():
        logger.info(
            "SRAE %s: R2 %.3f, RMSE %.3f, agreement %.3f, sparsity %.2f, |cos| %.3f",
            s,
            m["r2"],
            m["rmse"],
            m["decision_agreement"],
            m["sparsity"],
            m["orthogonality"],
        )
    return result


def run_xnn_explain(
    preproc: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    srae_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: XNNExplainConfig | None = None,
    *,
    split: str | os.PathLike[str] | None = None,
    subjects: str | Sequence[str] | None = "test",
    cohort: str | os.PathLike[str] | None = None,
    regions: Sequence[int] | None = None,
    derivatives: str = "dlmuse",
    device: str = "auto",
    plot: bool = True,
    progress: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Feature maps, per-subject significant features and metrics of a trained SRAE.

    Args:
        preproc: ``preproc.pt``.
        checkpoint: the classifier the SRAE was trained on (checked by sha256).
        srae_path: ``srae.pt`` of :func:`run_xnn_train`.
        out: output folder (maps under ``out/sub-X/``).
        split: ``split.tsv`` (default: next to the checkpoint).
        config: attribution method, IG steps, coverage and batch size
            (:class:`~neuroexplain.settings.XNNExplainConfig`); keyword ``overrides`` replace its
            fields (``method="ig"``).
        subjects: whose maps to write (split names, ids or ``"all"``).
        cohort: synthetic cohort to score the maps with the evaluation harness.
        regions: planted-region labels for the harness (default: planted masks).
        derivatives: dseg derivatives folder of the cohort.
        device: device.
        plot: write ``xnn.png``.
        progress: progress bars.

    Returns:
        The ``xnn_metrics.json`` content.

    Raises:
        InputError: the SRAE was trained on another checkpoint.
    """
    from neuroexplain.concepts3d.run import subject_indices
    from neuroexplain.io.atomic import write_json, write_table
    from neuroexplain.xnn.explain import XNNExplainer

    cfg = XNNExplainConfig.resolve(config, **overrides)
    method, n_steps = cfg.method, cfg.ig_steps
    ld = _load_xnn(
        preproc, checkpoint, srae_path, cfg, split=split, device=device, progress=progress
    )
    ctx, table = ld.ctx, ld.table
    out_dir = Path(out)
    feats = _xnn_features(ld)
    names = feats.names

    idx = subject_indices(table, subjects)
    explainer = XNNExplainer(
        ctx.model,
        ld.srae,
        layer=ld.layer,
        pool=ld.pool,
        method=method,
        n_steps=n_steps,
        internal_batch_size=cfg.batch_size,
    )
    params = {
        "preproc": str(ctx.preproc_path),
        "checkpoint": str(ctx.checkpoint_path),
        "srae": str(srae_path),
        "split": str(ctx.split_path),
        "subjects": subjects if isinstance(subjects, str) else list(subjects or []),
        "method": method,
        "n_steps": n_steps,
        "coverage": ld.coverage,
    }
    prov = stage_provenance(params, ld.seed, [srae_path, ctx.split_path], "xnn-explain")
    sidecars = _xnn_sidecars(ld, names, method, prov)
    examples, written = _xnn_subject_maps(
        ld, feats, explainer, idx, out_dir, sidecars, plot=plot, progress=progress
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(feats.table, out_dir / "xnn_features.tsv")
    write_maps_manifest(
        out_dir,
        "xnn-explain",
        written,
        dict.fromkeys(names, "feature-attribution"),
        provenance=prov,
    )
    result = _xnn_result(ld, feats, method, len(idx), prov)
    if cohort is not None:
        ev = harness_means(
            cohort,
            dict.fromkeys(names, out_dir),
            [table["subject"][i] for i in idx],
            out_dir / "evaluation_xnn",
            regions=regions,
            derivatives=derivatives,
            prov=prov,
        )
        result["evaluation"] = ev
        best = max(ev, key=lambda n: ev[n].get("top5_in_regions", float("-inf")))
        result["best_feature"] = {"feature": best, **ev[best]}
    write_json(result, out_dir / "xnn_metrics.json")
    if plot:
        _plot(feats.table, names, out_dir / "xnn.png", examples)
    return result


@dataclass
class _XNNLoaded:
    """What :func:`run_xnn_explain` loads: context, SRAE and every subject's activations."""

    ctx: Any
    srae: Any
    seed: int
    coverage: float
    q: float
    layer: str
    pool: str
    table: Any
    acts: torch.Tensor
    logits: torch.Tensor


@dataclass
class _XNNFeatures:
    """The SRAE's features of every subject: values, logit contributions, significance."""

    names: list[str]
    metrics: dict[str, Any]
    contrib: torch.Tensor
    table: Any


def _load_xnn(
    preproc: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    srae_path: str | os.PathLike[str],
    cfg: XNNExplainConfig,
    *,
    split: str | os.PathLike[str] | None,
    device: str,
    progress: bool | None,
) -> _XNNLoaded:
    """Load the SRAE and its classifier (refused if another), extract the layer's activations."""
    from neuroexplain.concepts3d.run import context_table
    from neuroexplain.utils import seed_everything
    from neuroexplain.xnn.explain import extract_activations
    from neuroexplain.xnn.srae import load_srae

    srae, sckpt = load_srae(srae_path)
    seed = int(sckpt["config"].get("seed", 0))
    seed_everything(seed)
    ctx = load_mri_context(preproc, checkpoint, split=split, device=device, strict_split=True)
    if sckpt.get("checkpoint_sha256") != ctx.checkpoint_sha256:
        raise InputError(
            srae_path,
            "SRAE was trained on another classifier checkpoint "
            f"(sha256 {str(sckpt.get('checkpoint_sha256'))[:12]}..., in use "
            f"{ctx.checkpoint_sha256[:12]}...); rerun xnn-train",
        )
    coverage = cfg.coverage
    cov = float(coverage if coverage is not None else sckpt["config"].get("coverage", 0.9))
    q = float(sckpt["config"].get("q", 1.0))
    layer, pool = str(sckpt["layer"]), str(sckpt["pool"])
    table = context_table(ctx)
    acts, logits = extract_activations(
        ctx.model,
        ctx.preproc["images"],
        layer,
        pool=pool,
        batch_size=cfg.batch_size,
        device=ctx.device,
        progress=progress,
    )
    if acts.shape[1] != srae.in_features:
        raise InputError(
            srae_path,
            f"SRAE expects {srae.in_features} activations at {layer!r}, "
            f"the classifier gives {acts.shape[1]}",
        )
    return _XNNLoaded(ctx, srae, seed, cov, q, layer, pool, table, acts, logits)


def _xnn_features(ld: _XNNLoaded) -> _XNNFeatures:
    """Metrics per split and the ``xnn_features.tsv`` table of every subject."""
    import pandas as pd

    from neuroexplain.xnn.explain import feature_names
    from neuroexplain.xnn.srae import significant_features

    srae, table, logits = ld.srae, ld.table, ld.logits
    metrics = _split_metrics(srae, ld.acts, logits, table, ld.coverage, ld.q)
    with torch.no_grad():
        x, y_hat, _ = srae(ld.acts)
        contrib = x * srae.weights
    sig = significant_features(contrib.numpy(), ld.coverage)
    names = feature_names(srae.n_features)
    rows = []
    for i in range(len(table)):
        row = {
            "subject": table["subject"][i],
            "split": table["split"][i],
            "y": table["y"][i],
            "logit": float(logits[i]),
            "srae_logit": float(y_hat[i]),
        }
        for j, n in enumerate(names):
            row[f"{n}_value"] = float(x[i, j])
            row[f"{n}_contribution"] = float(contrib[i, j])
        row["significant"] = ",".join(n for j, n in enumerate(names) if sig[i, j])
        row["n_significant"] = int(sig[i].sum())
        rows.append(row)
    return _XNNFeatures(names, metrics, contrib, pd.DataFrame(rows))


def _xnn_sidecars(
    ld: _XNNLoaded, names: list[str], method: str, prov: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]]:
    """Sidecar fields of every feature map, of each feature, and the maps' descriptions."""
    side = {
        "Method": "XNN feature attribution (Qi, Khorram & Li 2017, arXiv:1709.05360)",
        "Layer": ld.layer,
        "Pooling": ld.pool,
        "Attribution": method,
        "CheckpointSha256": ld.ctx.checkpoint_sha256,
        "Provenance": prov,
    }
    weights = ld.srae.weights.detach().numpy()
    method_side = {
        n: {
            "Feature": j + 1,
            "HeadWeight": float(weights[j]),
            "Definition": "attribution of w_i * x_i (logit contribution of feature i)",
        }
        for j, n in enumerate(names)
    }
    descs = {
        n: f"neuroexplain XNN feature {j + 1} ({method}) @ {ld.layer}" for j, n in enumerate(names)
    }
    return side, method_side, descs


def _xnn_subject_maps(
    ld: _XNNLoaded,
    feats: _XNNFeatures,
    explainer: Any,
    idx: np.ndarray,
    out_dir: Path,
    sidecars: tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]],
    *,
    plot: bool,
    progress: bool | None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Path]]]:
    """Write every chosen subject's feature maps; a few diseased examples for the figure and
    ``{subject: {feature: path}}`` of the maps."""
    from tqdm.auto import tqdm

    from neuroexplain.attribution.export import write_subject_maps

    ctx, table, names = ld.ctx, ld.table, feats.names
    side, method_side, descs = sidecars
    examples: list[dict[str, Any]] = []
    written: dict[str, dict[str, Path]] = {}
    for i in tqdm(
        idx.tolist(),
        desc="xnn maps",
        unit="subject",
        disable=None if progress is None else not progress,
    ):
        xi = ctx.preproc["images"][i : i + 1].float().to(ctx.device)
        maps = explainer.attribute_all(xi)[0].cpu()
        written[str(table["subject"][i])] = write_subject_maps(
            {n: maps[j] for j, n in enumerate(names)},
            ctx.preproc,
            i,
            out_dir,
            stage="xnn",
            suffix="map",
            sidecar=side,
            method_sidecars=method_side,
            descriptions=descs,
        )
        if plot and len(examples) < 4 and table["y"][i] == 1:
            top = int(np.argmax(np.abs(feats.contrib[i].numpy())))
            examples.append(
                {
                    "subject": table["subject"][i],
                    "y": table["y"][i],
                    "image": xi[0, 0].cpu().numpy(),
                    "top feature": maps[top].numpy(),
                }
            )
    return examples, written


def _xnn_result(
    ld: _XNNLoaded, feats: _XNNFeatures, method: str, n_maps: int, prov: dict[str, Any]
) -> dict[str, Any]:
    """The ``xnn_metrics.json`` content (without the evaluation)."""
    srae = ld.srae
    return {
        "method": "XNN / SRAE (Qi, Khorram & Li 2017, arXiv:1709.05360)",
        "checkpoint_sha256": ld.ctx.checkpoint_sha256,
        "layer": ld.layer,
        "pool": ld.pool,
        "n_features": srae.n_features,
        "head_weights": srae.weights.detach().numpy().tolist(),
        "head_bias": float(srae.bias.detach()),
        "coverage": ld.coverage,
        "metrics": feats.metrics,
        "maps": {"method": method, "features": feats.names, "subjects": n_maps},
        "provenance": prov,
    }


def _plot(feats: Any, names: list[str], path: Path, examples: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuroexplain.concepts3d.run import plot_maps
    from neuroexplain.io.atomic import atomic_output

    df = feats.sort_values(["y", "logit"]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.08 * len(df) + 3), 3.2))
    bottom_pos = np.zeros(len(df))
    bottom_neg = np.zeros(len(df))
    for n in names:
        c = df[f"{n}_contribution"].to_numpy()
        pos, neg = np.clip(c, 0, None), np.clip(c, None, 0)
        bars = ax.bar(np.arange(len(df)), pos, bottom=bottom_pos, label=n, width=0.9)
        ax.bar(
            np.arange(len(df)),
            neg,
            bottom=bottom_neg,
            color=bars.patches[0].get_facecolor() if bars.patches else None,
            width=0.9,
        )
        bottom_pos += pos
        bottom_neg += neg
    ax.plot(np.arange(len(df)), df["logit"], "k.", ms=3, label="classifier logit")
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_xlabel("subjects (sorted by class, logit)")
    ax.set_ylabel("logit contribution w_i x_i")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    if examples:
        plot_maps(
            examples,
            path.with_name(path.stem + "_maps.png"),
            title="XNN top feature",
            keys=("top feature",),
        )
