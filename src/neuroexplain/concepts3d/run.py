"""End-to-end TCAV and SACV runs on an ingested cohort and a trained classifier.

These functions are what ``neuroexplain tcav`` and ``neuroexplain sacv`` call. Inputs: the
``preproc.pt`` of ``neuroexplain ingest-mri``, a classifier checkpoint (``model.pt``) with its
``split.tsv``, and a concept configuration (:mod:`neuroexplain.concepts3d.concepts`).
Concept and random examples come from the non-test subjects (configurable); the class inputs
whose gradients are tested, and the subjects whose maps are written, from the test split.

Outputs (``out`` = e.g. ``results/concepts3d``):

- ``tcav.json`` / ``tcav.tsv``: one row per concept x layer: the permutation test of the
  concept's mean-difference effect behind the verdict (``effect``, ``effect_z``, ``p_value`` raw
  and ``p_adjusted`` corrected for the concept x layer tests, with their Monte Carlo intervals,
  the direction test ``p_direction``), TCAV sign-count and magnitude scores (mean, sd, per run)
  against random-vs-random scores (``p_value_sign_count``), effect sizes, CAV held-out accuracy
  and the verdict (significant / not significant / inconclusive, with its reason); ``tcav.png``;
- ``sub-X/sub-X_desc-sacvrelevance_map.nii.gz`` and ``..._desc-sacvcontribution_map.nii.gz`` in
  the subject's native T1w space (+ JSON sidecars); ``sacv_scores.tsv``, ``sacv.json``,
  ``sacv.png`` and ``sacv_maps.json``, the maps manifest of the two maps
  (:func:`neuroexplain.stage.write_maps_manifest`; ``sacv<label>_maps.json`` with a
  ``desc_label``);
- ``cavs.pt``: the concept vectors, tied to the checkpoint's sha256 (see
  :class:`~neuroexplain.concepts3d.store.CAVStore`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroexplain.errors import InputError
from neuroexplain.settings import SACVConfig, TCAVConfig
from neuroexplain.stage import (
    MRIContext,
    harness_means,
    load_mri_context,
    stage_provenance,
    write_maps_manifest,
)

__all__ = [
    "class_indices",
    "context_table",
    "run_sacv",
    "run_tcav",
    "sacv_manifest_name",
    "subject_indices",
]

logger = logging.getLogger(__name__)


def context_table(ctx: MRIContext, participants: str | os.PathLike[str] | None = None) -> Any:
    """:func:`~neuroexplain.concepts3d.concepts.subject_table` of a run's cohort and split."""
    from neuroexplain.concepts3d.concepts import subject_table

    return subject_table(ctx.preproc, split=ctx.split, participants=participants)


def subject_indices(table: Any, spec: str | Sequence[str] | None) -> np.ndarray:
    """Preproc indices of the subjects selected by ``spec``
    (:func:`neuroexplain.stage.select_subjects`).

    Args:
        table: :func:`~neuroexplain.concepts3d.concepts.subject_table`.
        spec: ``"all"`` / ``None``; split names (``"test"``, ``"val,test"``); or subject ids
            (comma-separated string or a sequence).

    Raises:
        InputError: unknown subjects or an empty selection.
    """
    from neuroexplain.stage import select_subjects

    known = not (table["split"] == "all").all()  # "all": no split.tsv was found
    splits = table["split"].tolist() if known else None
    rows = select_subjects(spec, table["subject"].tolist(), splits)
    return table["index"].to_numpy()[rows].astype(int)


def class_indices(table: Any, split: str | Sequence[str] | None, target_class: int) -> np.ndarray:
    """Indices of the subjects of class ``target_class`` (``y``) in ``split``."""
    idx = subject_indices(table, split)
    y = table["y"].to_numpy()[idx]
    out = idx[y == float(target_class)]
    if len(out) == 0:
        raise InputError("--class-split", f"no subjects of class y={target_class} in {split!r}")
    return out


def _class_sign(target_class: int) -> float:
    if target_class not in (0, 1):
        raise InputError("--target-class", f"expected 0 or 1, got {target_class}")
    return 1.0 if target_class == 1 else -1.0


@dataclass
class _ConceptRun:
    """What a concept run has loaded: the context, the subject table, the sign, the cache."""

    ctx: MRIContext
    table: Any
    sign: float
    store: Any


@dataclass
class _ConceptSources:
    """The inputs :func:`run_tcav` and :func:`run_sacv` load (their arguments)."""

    preproc: str | os.PathLike[str]
    checkpoint: str | os.PathLike[str]
    concepts: str | os.PathLike[str]
    split: str | os.PathLike[str] | None
    participants: str | os.PathLike[str] | None
    device: str
    cache: str | os.PathLike[str] | None

    def load(self) -> tuple[MRIContext, Any]:
        """The MRI stage context (:func:`~neuroexplain.stage.load_mri_context`, the split
        checked) and the concept configuration."""
        from neuroexplain.concepts3d.concepts import load_concept_config

        ctx = load_mri_context(
            self.preproc, self.checkpoint, split=self.split, device=self.device, strict_split=True
        )
        return ctx, load_concept_config(self.concepts)

    def cav_store(self, ctx: MRIContext, out_dir: Path) -> Any:
        """The CAV cache (default ``out_dir/cavs.pt``), tied to the checkpoint's hash."""
        from neuroexplain.concepts3d.store import CAVStore

        path = Path(self.cache) if self.cache else out_dir / "cavs.pt"
        return CAVStore(path, ctx.checkpoint_sha256)


# ----------------------------------------------------------------------------------- TCAV


def run_tcav(
    preproc: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    concepts: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TCAVConfig | None = None,
    *,
    split: str | os.PathLike[str] | None = None,
    participants: str | os.PathLike[str] | None = None,
    class_split: str = "test",
    target_class: int = 1,
    target: int = 0,
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    plot: bool = True,
    progress: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """TCAV of every configured concept at every layer, tested against random-vs-random CAVs.

    Args:
        preproc: ``preproc.pt`` (or its folder).
        checkpoint: classifier ``model.pt``.
        concepts: concept configuration (YAML / JSON).
        out: output folder.
        config: layers, random sets, significance and CAV classifier
            (:class:`~neuroexplain.settings.TCAVConfig`; ``n_random`` / ``random_size``
            ``None``: the concept file's); keyword ``overrides`` replace its fields
            (``layers="features.0"``).
        split: ``split.tsv`` (default: next to the checkpoint).
        participants: table of selector columns (default: the config's ``participants``).
        class_split: split(s) whose subjects of ``target_class`` are the class inputs.
        target_class: 1 (positive class, e.g. disease) or 0.
        target: logit index of the network.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        cache: CAV cache file (default ``out/cavs.pt``).
        plot: write ``tcav.png``.
        progress: progress bars (``None``: on a terminal).

    Returns:
        The ``tcav.json`` content.
    """
    from neuroexplain.utils import seed_everything

    tc = TCAVConfig.resolve(config, **overrides)
    seed_everything(tc.seed)
    out_dir = Path(out)
    src = _ConceptSources(preproc, checkpoint, concepts, split, participants, device, cache)
    run = _load_tcav(
        src, out_dir, tc, class_split=class_split, target_class=target_class, progress=progress
    )
    inputs = run.ctx.preproc["images"][run.cls_idx].float()
    sets, plans, examples = _tcav_concept_sets(run, tc)
    grads = run.tcav.class_gradients(inputs, target=target, sign=run.sign)
    scores = run.tcav.interpret(inputs, sets, target=target, sign=run.sign, grads=grads)
    rows = _tcav_rows(run, tc, scores, plans, examples, grads)
    result = _tcav_result(
        run,
        tc,
        rows,
        plans,
        concepts,
        class_split=class_split,
        target_class=target_class,
        target=target,
    )
    _write_tcav(run, result, out_dir, alpha=tc.alpha, correction=tc.correction, plot=plot)
    return result


@dataclass
class _TCAVRun(_ConceptRun):
    """What :func:`run_tcav` loads before building the concept and random sets."""

    cfg: Any
    layers: list[str]
    n_sets: int
    tcav: Any
    cls_idx: np.ndarray


def _load_tcav(
    src: _ConceptSources,
    out_dir: Path,
    tc: TCAVConfig,
    *,
    class_split: str,
    target_class: int,
    progress: bool | None,
) -> _TCAVRun:
    """Load the cohort, classifier and concepts; set up TCAV; choose the class inputs."""
    from neuroexplain.classifier.network import default_target_layer
    from neuroexplain.concepts3d.tcav import TCAV

    ctx, cfg = src.load()
    table = context_table(ctx, src.participants or cfg.participants)
    sign = _class_sign(target_class)
    layer_list = list(tc.layers or [default_target_layer(ctx.arch)])
    n_sets = int(tc.n_random or cfg.n_random)
    if n_sets < 2:
        raise InputError("--n-random", f"expected >= 2 random sets, got {n_sets}")
    store = src.cav_store(ctx, out_dir)
    try:
        tcav = TCAV(
            ctx.model,
            layer_list,
            batch_size=tc.batch_size,
            device=ctx.device,
            seed=tc.seed,
            classifier=tc.classifier,
            C=tc.C,
            test_fraction=tc.test_fraction,
            store=store,
            progress=progress,
        )
    except ValueError as exc:
        raise InputError("--layers", str(exc)) from exc
    cls_idx = class_indices(table, class_split, target_class)
    return _TCAVRun(ctx, table, sign, store, cfg, layer_list, n_sets, tcav, cls_idx)


def _tcav_concept_sets(
    run: _TCAVRun, tc: TCAVConfig
) -> tuple[list[list[Any]], dict[str, dict[str, Any]], dict[str, tuple[Any, Any]]]:
    """Per concept: its examples and random sets as activations, the plan written, and
    ``{concept: (concept examples, whole random pool)}`` (activations cached, no volumes) for
    the permutation test."""
    from neuroexplain.concepts3d.concepts import (
        build_concept,
        concept_pool,
        random_concepts,
        spec_dict,
    )
    from neuroexplain.concepts3d.tcav import _seed_of
    from neuroexplain.utils import release_memory

    ctx, cfg, table, tcav, n_sets = run.ctx, run.cfg, run.table, run.tcav, run.n_sets
    sets: list[list[Any]] = []
    plans: dict[str, dict[str, Any]] = {}
    examples: dict[str, tuple[Any, Any]] = {}
    for spec in cfg.concepts:
        conc_idx, pool_idx = concept_pool(table, spec, cfg.split)
        concept = build_concept(ctx.preproc, conc_idx, spec)
        pool = build_concept(ctx.preproc, pool_idx, spec, name=f"{spec.name}:pool")
        # default: a third of the pool, so set 0 and the sets drawn from the other two thirds
        # are disjoint and still differ from one another
        size = int(tc.random_size or cfg.random_size or min(len(concept), max(2, len(pool) // 3)))
        if 2 * size > len(pool):
            logger.warning(
                "concept %s: random pool of %d examples is small for random sets of %d; "
                "they overlap heavily and the t-test loses its meaning",
                spec.name,
                len(pool),
                size,
            )
        # the random sets are drawn from the pool's examples without their volumes: the pool's
        # activations cover them, and copies of the pool's volumes per set would hold
        # n_sets x size volumes (~1.4 GB for 51 sets of 26 at 64³)
        randoms = random_concepts(
            tcav.detach_inputs([pool], compute=False)[0],
            n_sets + 1,
            size,
            seed=_seed_of(tc.seed, spec.name),
            prefix=f"{spec.name}:random",
        )
        need = tc.test == "permutation" or any(
            not tcav._cached(layer, c, r)
            for c, r in _tcav_pairs(concept, randoms)
            for layer in run.layers
        )
        # activations now, volumes dropped: memory stays at one concept's examples (the pool's
        # activations cover its random sets; the light concepts keep their cache keys)
        n_pool = len(pool)
        pool, concept, *randoms = tcav.detach_inputs([pool, concept, *randoms], compute=need)
        release_memory()
        examples[spec.name] = (concept, pool)
        sets += _tcav_pairs(concept, randoms)
        plans[spec.name] = {
            "spec": spec_dict(spec),
            "examples": [table["subject"][i] for i in conc_idx],
            "pool": [table["subject"][i] for i in pool_idx],
            "random_size": size,
            "randoms": [r.name for r in randoms],
        }
        logger.info(
            "concept %s: %d examples, random pool %d, %d random sets of %d",
            spec.name,
            len(concept),
            n_pool,
            n_sets + 1,
            size,
        )
    return sets, plans, examples


def _tcav_rows(
    run: _TCAVRun,
    tc: TCAVConfig,
    scores: Any,
    plans: dict[str, dict[str, Any]],
    examples: dict[str, tuple[Any, Any]],
    grads: dict[str, Any],
) -> list[dict[str, Any]]:
    """One ``tcav.tsv`` row per concept x layer: the permutation test of the concept's
    mean-difference effect (the verdict's, ``test: permutation``) and the sign counts against
    the random-vs-random null."""
    from neuroexplain.concepts3d.tcav import (
        _seed_of,
        apply_correction,
        permutation_test,
        summarize_experiment,
    )

    rows = []
    for name, plan in plans.items():
        acts = {}
        if tc.test == "permutation":
            concept, pool = examples[name]
            acts = {"concept": run.tcav.activations(concept), "pool": run.tcav.activations(pool)}
        for layer in run.layers:
            perm = None
            if acts:
                perm = permutation_test(
                    acts["concept"][layer],
                    acts["pool"][layer],
                    grads[layer],
                    n_permutations=tc.n_permutations,
                    seed=_seed_of(tc.seed, name, layer, "permutation"),
                )
            row = summarize_experiment(
                scores,
                name,
                plan["randoms"],
                layer,
                alpha=tc.alpha,
                min_accuracy=tc.min_accuracy,
                test=tc.test,
                permutation=perm,
            )
            row.update(
                n_examples=len(plan["examples"]),
                n_pool=len(plan["pool"]),
                random_size=plan["random_size"],
                n_random_sets=run.n_sets,
            )
            rows.append(row)
    apply_correction(rows, method=tc.correction, alpha=tc.alpha)
    return rows


def _tcav_result(
    run: _TCAVRun,
    tc: TCAVConfig,
    rows: list[dict[str, Any]],
    plans: dict[str, dict[str, Any]],
    concepts: str | os.PathLike[str],
    *,
    class_split: str,
    target_class: int,
    target: int,
) -> dict[str, Any]:
    """The ``tcav.json`` content, with its provenance."""
    ctx = run.ctx
    params = {
        "preproc": str(ctx.preproc_path),
        "checkpoint": str(ctx.checkpoint_path),
        "concepts": str(concepts),
        "layers": run.layers,
        "split": str(ctx.split_path),
        "class_split": class_split,
        "target_class": target_class,
        "target": target,
        "n_random": run.n_sets,
        "alpha": tc.alpha,
        "test": tc.test,
        "n_permutations": tc.n_permutations,
        "correction": tc.correction,
        "min_accuracy": tc.min_accuracy,
        "classifier": tc.classifier,
        "C": tc.C,
        "test_fraction": tc.test_fraction,
    }
    prov = stage_provenance(params, tc.seed, [concepts, ctx.split_path], "tcav")
    return {
        "method": "TCAV (Kim et al. 2018, arXiv:1711.11279)",
        "checkpoint_sha256": ctx.checkpoint_sha256,
        "class": {
            "target_class": target_class,
            "logit_sign": run.sign,
            "positive_class": ctx.preproc.get("positive_class"),
            "subjects": [run.table["subject"][i] for i in run.cls_idx],
        },
        "results": rows,
        "concepts": plans,
        "cache": run.store.path.name if run.store.path is not None else None,
        "provenance": prov,
    }


def _write_tcav(
    run: _TCAVRun,
    result: dict[str, Any],
    out_dir: Path,
    *,
    alpha: float,
    correction: str,
    plot: bool,
) -> None:
    """Write ``tcav.json``, ``tcav.tsv``, the CAV cache and ``tcav.png``; log the rows."""
    import pandas as pd

    from neuroexplain.io.atomic import write_json, write_table

    rows, prov = result["results"], result["provenance"]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, out_dir / "tcav.json")
    # run statistics: returned and logged, not written (same inputs -> identical files)
    result["cache_stats"] = _cache_stats(run.store)
    flat = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows])
    write_table(flat, out_dir / "tcav.tsv")
    run.store.save(provenance=prov)
    if plot:
        plot_tcav(rows, out_dir / "tcav.png", alpha=alpha, correction=correction)
    for r in rows:
        logger.info(
            "TCAV %-24s %-14s score %.2f ± %.2f  random %.2f ± %.2f  magnitude %.2f vs %.2f  "
            "p=%.3g (%s %.3g)  acc %.2f: %s (%s)",
            r["concept"],
            r["layer"],
            r["tcav_score"],
            _z(r["tcav_score_sd"]),
            r["random_score"],
            _z(r["random_score_sd"]),
            r["tcav_magnitude"],
            r["random_magnitude"],
            r["p_value"],
            r["correction"],
            r["p_adjusted"],
            r["cav_accuracy"],
            r["verdict"],
            r["verdict_reason"],
        )


def _tcav_pairs(concept: Any, randoms: Sequence[Any]) -> list[list[Any]]:
    """``[concept, random_i]`` and the null ``[random_0, random_i]`` for ``i >= 1``."""
    return [[concept, r] for r in randoms[1:]] + [[randoms[0], r] for r in randoms[1:]]


def _cache_stats(store: Any) -> dict[str, Any]:
    stats = {
        "path": str(store.path),
        "entries": len(store),
        "hits": store.hits,
        "invalidated": store.invalidated,
    }
    logger.info(
        "concept cache %s: %d entries, %d served from the cache%s",
        stats["path"],
        stats["entries"],
        stats["hits"],
        " (a stale cache of another checkpoint was discarded)" if store.invalidated else "",
    )
    return stats


def _z(v: float) -> float:
    return 0.0 if v is None or not np.isfinite(v) else float(v)


def plot_tcav(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    alpha: float = 0.01,
    correction: str = "none",
) -> Path:
    """Bar plot of TCAV scores (concept x layer) against random-vs-random scores.

    ``*`` marks a significant verdict, ``?`` an inconclusive one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuroexplain.io.atomic import atomic_output

    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * n + 2), 3.6))
    x = np.arange(n)
    ax.bar(
        x - 0.18,
        [r["tcav_score"] for r in rows],
        0.36,
        yerr=[_z(r["tcav_score_sd"]) for r in rows],
        label="concept",
        color="tab:blue",
    )
    ax.bar(
        x + 0.18,
        [r["random_score"] for r in rows],
        0.36,
        yerr=[_z(r["random_score_sd"]) for r in rows],
        label="random",
        color="0.7",
    )
    for i, r in enumerate(rows):
        mark = {"significant": "*", "inconclusive": "?"}.get(
            r.get("verdict", "significant" if r["significant"] else "")
        )
        if mark:
            ax.text(
                i - 0.18,
                min(1.02, r["tcav_score"] + _z(r["tcav_score_sd"]) + 0.03),
                mark,
                ha="center",
            )
    ax.set_xticks(x, [f"{r['concept']}\n{r['layer']}" for r in rows], fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("TCAV score")
    adj = "" if correction == "none" else f", {correction}-adjusted"
    ax.set_title(f"TCAV (* p{adj} < {alpha:g} vs random; ? inconclusive)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------- SACV


def sacv_manifest_name(desc_label: str = "") -> str:
    """File name of the maps manifest of a SACV run (several labels can share a folder)."""
    return f"sacv{desc_label}_maps.json"


def run_sacv(
    preproc: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    concepts: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: SACVConfig | None = None,
    *,
    concept: str | None = None,
    split: str | os.PathLike[str] | None = None,
    participants: str | os.PathLike[str] | None = None,
    subjects: str | Sequence[str] | None = "test",
    target_class: int = 1,
    target: int = 0,
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    desc_label: str = "",
    cohort: str | os.PathLike[str] | None = None,
    regions: Sequence[int] | None = None,
    derivatives: str = "dlmuse",
    plot: bool = True,
    progress: bool | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a SACV for one concept at one layer and write per-subject maps and scores.

    Args:
        preproc: ``preproc.pt`` (or its folder).
        checkpoint: classifier ``model.pt``.
        concepts: concept configuration.
        out: output folder (maps under ``out/sub-X/``).
        config: layer, training examples, relevance map and classifier
            (:class:`~neuroexplain.settings.SACVConfig`); keyword ``overrides`` replace its
            fields (``layer="features.1"``).
        concept: concept name (default: the first in the configuration).
        split: ``split.tsv`` (default: next to the checkpoint).
        participants: selector table (default: the config's).
        subjects: whose maps to write: split names, ids or ``"all"``.
        target_class: the class whose logit the contribution maps explain (1 or 0).
        target: logit index.
        device: device.
        cache: CAV cache file (default ``out/cavs.pt``).
        desc_label: appended to the ``desc`` entity (``desc-sacvrelevance<label>``) so several
            concepts / layers can share ``out``.
        cohort: synthetic cohort (ground truth) to score the maps with the evaluation harness.
        regions: planted-region labels for the harness (default: the cohort's planted masks).
        derivatives: dseg derivatives folder of the cohort.
        plot: write ``sacv.png``.
        progress: progress bars.

    Returns:
        The ``sacv.json`` content.
    """
    import pandas as pd

    from neuroexplain.io.atomic import write_json, write_table
    from neuroexplain.utils import seed_everything

    sc = SACVConfig.resolve(config, **overrides)
    if desc_label and not desc_label.isalnum():
        raise InputError("--desc-label", f"expected an alphanumeric label, got {desc_label!r}")
    seed_everything(sc.seed)
    out_dir = Path(out)
    src = _ConceptSources(preproc, checkpoint, concepts, split, participants, device, cache)
    run = _load_sacv(
        src,
        out_dir,
        sc,
        concept=concept,
        subjects=subjects,
        target_class=target_class,
        progress=progress,
    )
    m_rel, m_con = f"sacvrelevance{desc_label}", f"sacvcontribution{desc_label}"
    params = _sacv_params(run, sc, concepts, subjects, target_class, target)
    prov = stage_provenance(params, sc.seed, [concepts, run.ctx.split_path], "sacv")
    rows, examples, written = _sacv_subject_maps(
        run,
        out_dir,
        _sacv_sidecars(run, sc, prov, m_rel, m_con),
        (m_rel, m_con),
        target=target,
        target_class=target_class,
        plot=plot,
        progress=progress,
    )
    df = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(df, out_dir / f"sacv{desc_label}_scores.tsv")
    write_maps_manifest(
        out_dir,
        "sacv",
        written,
        {m_rel: "concept-relevance", m_con: "concept-contribution"},
        provenance=prov,
        name=sacv_manifest_name(desc_label),
    )
    result = _sacv_result(run, df, m_rel, m_con, prov)
    if cohort is not None:
        result["evaluation"] = harness_means(
            cohort,
            {m_rel: out_dir, m_con: out_dir},
            list(df["subject"]),
            out_dir / f"evaluation_sacv{desc_label}",
            regions=regions,
            derivatives=derivatives,
            prov=prov,
        )
    write_json(result, out_dir / f"sacv{desc_label}.json")
    run.store.save(provenance=prov)
    result["cache_stats"] = _cache_stats(run.store)
    if plot and examples:
        title = f"SACV {run.spec.name} @ {run.layer}"
        plot_maps(examples, out_dir / f"sacv{desc_label}.png", title=title)
    return result


@dataclass
class _SACVRun(_ConceptRun):
    """What :func:`run_sacv` loads and trains before writing maps."""

    spec: Any
    layer: str
    concept: Any
    pool: Any
    cav: Any
    explainer: Any
    idx: np.ndarray


def _load_sacv(
    src: _ConceptSources,
    out_dir: Path,
    sc: SACVConfig,
    *,
    concept: str | None,
    subjects: str | Sequence[str] | None,
    target_class: int,
    progress: bool | None,
) -> _SACVRun:
    """Load the cohort, classifier and concept; train the SACV; choose the subjects."""
    from neuroexplain.classifier.network import default_target_layer
    from neuroexplain.concepts3d.concepts import (
        build_concept,
        concept_pool,
        with_positions,
    )
    from neuroexplain.concepts3d.sacv import SACV, train_sacv

    ctx, cfg = src.load()
    spec = cfg.get(concept) if concept else cfg.concepts[0]
    table = context_table(ctx, src.participants or cfg.participants)
    sign = _class_sign(target_class)
    layer = sc.layer or default_target_layer(ctx.arch)
    store = src.cav_store(ctx, out_dir)

    conc_idx, pool_idx = concept_pool(table, spec, cfg.split)
    c = build_concept(ctx.preproc, conc_idx, spec, transform=sc.transform)
    r = build_concept(ctx.preproc, pool_idx, spec, name=f"{spec.name}:pool", transform=sc.transform)
    r = with_positions(r, ctx.preproc, pool_idx, sc.negatives)
    try:
        cav = train_sacv(
            ctx.model,
            layer,
            c,
            r,
            min_overlap=sc.min_overlap,
            max_samples=sc.max_samples,
            seed=sc.seed,
            test_fraction=sc.test_fraction,
            classifier=sc.classifier,
            C=sc.C,
            batch_size=sc.batch_size,
            device=ctx.device,
            store=store,
            progress=progress,
        )
    except ValueError as exc:
        raise InputError("--layer", str(exc)) from exc
    try:
        explainer = SACV(
            ctx.model,
            layer,
            cav,
            relevance=sc.relevance,
            batch_size=sc.batch_size,
            device=ctx.device,
        )
    except ValueError as exc:
        raise InputError("--relevance", str(exc)) from exc
    idx = subject_indices(table, subjects)
    return _SACVRun(ctx, table, sign, store, spec, layer, c, r, cav, explainer, idx)


def _sacv_sidecars(
    run: _SACVRun, sc: SACVConfig, prov: dict[str, Any], m_rel: str, m_con: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]]:
    """Sidecar fields of every SACV map, of each of the two maps, and their descriptions."""
    spec, layer = run.spec, run.layer
    side = {
        "Method": "SACV (Wang, Lee & Qi 2022, arXiv:2205.11511)",
        "Concept": spec.name,
        "Layer": layer,
        "CheckpointSha256": run.ctx.checkpoint_sha256,
        "SACVAccuracy": run.cav.accuracy,
        "Provenance": prov,
    }
    method_side = {
        m_rel: {
            "Definition": {
                "raw": "R(p) = <v, a(p)>",
                "signed": "R(p) = <v, a(p)> + b/|w| (distance from the SACV decision boundary)",
                "positive": "R(p) = max(0, <v, a(p)> + b/|w|)",
            }[sc.relevance]
            + " at the layer, trilinear to the model grid",
            "RelevanceMode": sc.relevance,
        },
        m_con: {
            "Definition": "S(p) = <v, d(sign*logit)/d a(p)> at the layer, trilinear to "
            "the model grid",
            "LogitSign": run.sign,
        },
    }
    descs = {
        m_rel: f"neuroexplain SACV relevance {spec.name} @ {layer}",
        m_con: f"neuroexplain SACV contribution {spec.name} @ {layer}",
    }
    return side, method_side, descs


def _sacv_subject_maps(
    run: _SACVRun,
    out_dir: Path,
    sidecars: tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]],
    names: tuple[str, str],
    *,
    target: int,
    target_class: int,
    plot: bool,
    progress: bool | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Path]]]:
    """Explain every chosen subject and write its maps; score rows, a few plot examples and
    ``{subject: {method: path}}`` of the maps."""
    from tqdm.auto import tqdm

    from neuroexplain.attribution.export import write_subject_maps

    side, method_side, descs = sidecars
    m_rel, m_con = names
    table, sign = run.table, run.sign
    rows = []
    examples: list[dict[str, Any]] = []
    written: dict[str, dict[str, Path]] = {}
    for i in tqdm(
        run.idx.tolist(),
        desc="sacv maps",
        unit="subject",
        disable=None if progress is None else not progress,
    ):
        x = run.ctx.preproc["images"][i : i + 1].float()
        res = run.explainer.explain(x, target, sign=sign)
        maps = {m_rel: res["relevance"][0, 0], m_con: res["contribution"][0, 0]}
        written[str(table["subject"][i])] = write_subject_maps(
            maps,
            run.ctx.preproc,
            i,
            out_dir,
            stage="concepts3d",
            suffix="map",
            sidecar=side,
            method_sidecars=method_side,
            descriptions=descs,
        )
        rows.append(
            {
                "subject": table["subject"][i],
                "split": table["split"][i],
                "y": table["y"][i],
                "logit": float(res["logit"][0]) * sign,
                "spatial_contribution": float(res["spatial_contribution"][0]),
                "concept_presence": float(res["concept_presence"][0]),
                "directional_derivative": float(res["directional_derivative"][0]),
            }
        )
        if plot and len(examples) < 4 and table["y"][i] == target_class:
            examples.append(
                {
                    "subject": table["subject"][i],
                    "y": table["y"][i],
                    "image": x[0, 0].numpy(),
                    "relevance": maps[m_rel].numpy(),
                    "contribution": maps[m_con].numpy(),
                }
            )
    return rows, examples, written


def _sacv_result(
    run: _SACVRun, df: Any, m_rel: str, m_con: str, prov: dict[str, Any]
) -> dict[str, Any]:
    """The ``sacv.json`` content (without the evaluation)."""
    from neuroexplain.concepts3d.concepts import spec_dict

    by_class = {
        str(int(k)): {
            c_: float(v)
            for c_, v in g[["spatial_contribution", "concept_presence", "directional_derivative"]]
            .mean()
            .items()
        }
        for k, g in df.groupby("y")
    }
    return {
        "method": "SACV (Wang, Lee & Qi 2022, arXiv:2205.11511)",
        "checkpoint_sha256": run.ctx.checkpoint_sha256,
        "concept": run.spec.name,
        "spec": spec_dict(run.spec),
        "layer": run.layer,
        "sacv_accuracy": run.cav.accuracy,
        "n_train_positions": run.cav.n_train,
        "n_test_positions": run.cav.n_test,
        "examples": len(run.concept),
        "pool": len(run.pool),
        "maps": {"relevance": m_rel, "contribution": m_con},
        "mean_scores_by_class": by_class,
        "n_subjects": len(df),
        "cache": run.store.path.name if run.store.path is not None else None,
        "provenance": prov,
    }


def _sacv_params(
    run: _SACVRun,
    sc: SACVConfig,
    concepts: str | os.PathLike[str],
    subjects: str | Sequence[str] | None,
    target_class: int,
    target: int,
) -> dict[str, Any]:
    """The parameters of a SACV run, for its provenance."""
    return {
        "preproc": str(run.ctx.preproc_path),
        "checkpoint": str(run.ctx.checkpoint_path),
        "concepts": str(concepts),
        "concept": run.spec.name,
        "layer": run.layer,
        "split": str(run.ctx.split_path),
        "subjects": subjects if isinstance(subjects, str) else list(subjects or []),
        "target_class": target_class,
        "target": target,
        "transform": sc.transform,
        "negatives": sc.negatives,
        "relevance": sc.relevance,
        "min_overlap": sc.min_overlap,
        "max_samples": sc.max_samples,
        "classifier": sc.classifier,
        "C": sc.C,
        "test_fraction": sc.test_fraction,
    }


def plot_maps(
    examples: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    keys: Sequence[str] = ("relevance", "contribution"),
) -> Path:
    """Axial slices through the maximum of ``|first map|`` for a few subjects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuroexplain.io.atomic import atomic_output

    n = len(examples)
    cols = 1 + len(keys)
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.4 * n), squeeze=False)
    for row, ex in enumerate(examples):
        first = np.abs(ex[keys[0]]) * (ex["image"] > 0)
        z = int(np.unravel_index(np.argmax(first), first.shape)[2])
        axes[row, 0].imshow(ex["image"][:, :, z].T, cmap="gray", origin="lower")
        axes[row, 0].set_ylabel(f"{ex['subject']}\ny={ex['y']:g}", fontsize=7)
        for k, key in enumerate(keys, start=1):
            m = ex[key][:, :, z].T
            lim = float(np.abs(ex[key]).max()) or 1.0
            axes[row, k].imshow(ex["image"][:, :, z].T, cmap="gray", origin="lower")
            axes[row, k].imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6, origin="lower")
            if row == 0:
                axes[row, k].set_title(key, fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
