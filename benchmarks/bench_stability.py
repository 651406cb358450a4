"""Benchmark: do the concept explanations of one classifier give the same answer for every seed?

Issue 23's seed-stability check of TCAV, SACV and XNN. For each seed of ``--seeds`` the concept
stage of the workflow runs on one trained classifier with the workflow's own arguments
(``config/config.yaml``, built as ``workflow/rules/common.smk`` builds them: ``tcav_args``,
``sacv_args``, ``xnn_train_args``, ``xnn_explain_args``); only ``--seed`` changes (``xnn-explain``
has no seed: it follows its SRAE). Outputs go to ``<work>/seed<k>/`` (``concepts3d/tcav``,
``concepts3d/sacv/<concept>``, ``xnn_model``, ``xnn``, ``logs/``); a step whose result file
exists is skipped, so a rerun resumes. Then the seeds are compared:

- TCAV: per concept x layer the verdict, TCAV score and p-values of each seed; criterion: the
  verdicts are identical across seeds for every concept (and layer).
- SACV: for each map type written (``desc-sacvrelevance<concept>``,
  ``desc-sacvcontribution<concept>``), the NCC (Pearson r, inside the native brain mask
  dseg > 0) of the same subject's maps between every pair of seeds; mean and min over subjects;
  criterion: mean NCC >= 0.9 for every map type and seed pair.
- XNN: per seed, per-feature usage (fraction of the subjects of ``--xnn-split`` for which the
  feature is significant, ``srae_train.json``), R² and decision agreement; criterion: every
  feature used by >= 5 % of the subjects, R² >= 0.95 and agreement >= 0.95 in every seed. Beside
  it, the correspondence of features between seeds: |r| of the per-subject logit contributions
  (``xnn_features.tsv``) of features matched one to one (Hungarian assignment).

Writes ``benchmarks/results/stability.json`` and ``stability.md`` (``--out``).

Usage (the defaults are the demo classifier of ``bench_robustness.py --cohorts demo --tag v2``,
its ingest and cohort under ``results/robustness/demo``)::

    python benchmarks/bench_stability.py
    python benchmarks/bench_stability.py \\
        --classifier results/robustness/demo/classifier_64_v1_seed0 \\
        --out benchmarks/results/stability_v1.json      # another classifier
    python benchmarks/bench_stability.py --compare-only  # re-read <work>, run nothing
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["compare_sacv", "compare_tcav", "compare_xnn", "main"]

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "results" / "robustness" / "demo"
#: criteria of issue 23
MIN_NCC = 0.9
MIN_USAGE = 0.05
MIN_R2 = 0.95
MIN_AGREEMENT = 0.95


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("neuroexplain")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "neuroexplain"]


def _run(args: list[str], log: Path) -> float:
    """Run ``neuroexplain ARGS`` with its output in ``log``; returns the wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        fh.write("# neuroexplain " + shlex.join(args) + "\n")
        fh.flush()
        proc = subprocess.run([*_cli(), *args], stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"neuroexplain {args[0]} failed (log {log}): {' | '.join(tail)}")
    return round(time.perf_counter() - t0, 1)


# ------------------------------------------------------- the workflow's arguments (common.smk)


def _args(*pairs: tuple[str, Any]) -> list[str]:
    """``--option value`` pairs (a list value repeats the option); None skips it."""
    out: list[str] = []
    for option, value in pairs:
        if value is None:
            continue
        for v in value if isinstance(value, list | tuple) else [value]:
            out += [option, str(v)]
    return out


def stage_args(
    config: Mapping[str, Any], seed: int, sacv_concepts: Sequence[str]
) -> dict[str, Any]:
    """The options the workflow gives tcav / sacv / xnn-train / xnn-explain, with ``seed``.

    Mirrors ``tcav_args``, ``sacv_args``, ``xnn_train_args`` and ``xnn_explain_args`` of
    ``workflow/rules/common.smk``; ``sacv`` holds one argument list per concept.
    """
    c3d, xnn = config["concepts3d"], config["xnn"]
    subjects = config["evaluation"]["subjects"]
    return {
        "tcav": _args(
            ("--layers", ",".join(c3d["tcav_layers"]) or None),
            ("--class-split", subjects),
            ("--n-random", c3d["n_random"]),
            ("--alpha", c3d["alpha"]),
            ("--correction", c3d["correction"]),
            ("--min-accuracy", c3d["min_accuracy"]),
            ("--seed", seed),
        ),
        "sacv": {
            concept: _args(
                ("--concept", concept),
                ("--desc-label", concept),
                ("--layer", c3d["sacv_layer"] or None),
                ("--subjects", subjects),
                ("--transform", c3d["sacv_transform"]),
                ("--negatives", c3d["sacv_negatives"]),
                ("--relevance", c3d["sacv_relevance"]),
                ("--seed", seed),
            )
            for concept in sacv_concepts
        },
        "xnn_train": _args(
            ("--layer", xnn["layer"] or None),
            ("--pool", xnn["pool"]),
            ("--n-features", xnn["n_features"]),
            ("--hidden", xnn["hidden"]),
            ("--epochs", xnn["epochs"]),
            ("--lr", xnn["lr"]),
            ("--coverage", xnn["coverage"]),
            ("--seed", seed),
        ),
        "xnn_explain": _args(
            ("--subjects", subjects),
            ("--method", xnn["method"]),
            ("--ig-steps", xnn["ig_steps"]),
        ),
    }


def seed_dirs(work: Path, seed: int, concepts: Sequence[str]) -> dict[str, Any]:
    base = work / f"seed{seed}"
    return {
        "base": base,
        "tcav": base / "concepts3d" / "tcav",
        "sacv": {c: base / "concepts3d" / "sacv" / c for c in concepts},
        "xnn_model": base / "xnn_model",
        "xnn": base / "xnn",
        "logs": base / "logs",
    }


def run_seed(
    seed: int,
    *,
    preproc: Path,
    classifier: Path,
    concepts_file: Path,
    participants: Path | None,
    config: Mapping[str, Any],
    sacv_concepts: Sequence[str],
    work: Path,
    threads: int,
) -> dict[str, float | None]:
    """Run (or resume) TCAV, SACV per concept, xnn-train and xnn-explain for one seed.

    Returns the wall seconds of each step, also those of an earlier run kept in
    ``<work>/seed<k>/seconds.json`` (None: run outside this script).
    """
    d = seed_dirs(work, seed, sacv_concepts)
    a = stage_args(config, seed, sacv_concepts)
    model, split = str(classifier / "model.pt"), str(classifier / "split.tsv")
    common = ["--preproc", str(preproc), "--checkpoint", model, "--split", split]
    common += ["--threads", str(threads)]
    part = ["--participants", str(participants)] if participants else []
    concepts = ["--concepts", str(concepts_file)]
    record = d["base"] / "seconds.json"  # wall seconds of the steps run so far (kept on resume)
    seconds: dict[str, float | None] = json.loads(record.read_text()) if record.is_file() else {}
    steps: list[tuple[str, Path, list[str]]] = [
        ("tcav", d["tcav"] / "tcav.json",
         ["tcav", *common, *concepts, "--out", str(d["tcav"]),
          "--cache", str(d["tcav"] / "cavs.pt"), *part, *a["tcav"]]),
    ]  # fmt: skip
    for c in sacv_concepts:
        out = d["sacv"][c]
        sacv = ["sacv", *common, *concepts, "--out", str(out), *part, *a["sacv"][c]]
        steps.append((f"sacv_{c}", out / f"sacv{c}.json", sacv))
    srae = d["xnn_model"] / "srae.pt"
    steps += [
        ("xnn_train", d["xnn_model"] / "srae_train.json",
         ["xnn-train", *common, "--out", str(d["xnn_model"]), *a["xnn_train"]]),
        ("xnn_explain", d["xnn"] / "xnn_metrics.json",
         ["xnn-explain", *common, "--srae", str(srae), "--out", str(d["xnn"]),
          *a["xnn_explain"]]),
    ]  # fmt: skip
    for name, done, args in steps:
        if done.is_file():
            seconds.setdefault(name, None)
            continue
        seconds[name] = _run(args, d["logs"] / f"{name}.log")
        record.write_text(json.dumps(seconds, indent=2) + "\n")
    return seconds


# ----------------------------------------------------------------------------- comparisons


def _num(v: Any) -> float | None:
    """A JSON-safe float: None for missing / NaN / inf."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def compare_tcav(results: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Verdicts, scores and p-values of every concept x layer across seeds.

    Args:
        results: seed -> the ``results`` rows of that seed's ``tcav.json``.

    Returns:
        ``{"rows": [{"concept", "layer", "verdicts": {seed: verdict}, "tcav_score",
        "random_score", "effect", "effect_z", "p_value", "p_adjusted", "p_direction",
        "cav_accuracy" (each {seed: value}), "identical"}],
        "concepts": {concept: {"identical", "verdicts": {layer: [verdict per seed]}}},
        "criterion_met"}``. A concept x layer missing in a seed counts as verdict ``None``
        (not identical).
    """
    seeds = sorted(results)
    by_seed = {s: {(r["concept"], r["layer"]): r for r in results[s]} for s in seeds}
    keys = sorted({k for rows in by_seed.values() for k in rows})
    rows = []
    concepts: dict[str, dict[str, Any]] = {}
    for concept, layer in keys:
        per = {s: by_seed[s].get((concept, layer)) for s in seeds}
        verdicts = {s: (r or {}).get("verdict") for s, r in per.items()}
        identical = len(set(verdicts.values())) == 1 and None not in verdicts.values()
        row = {"concept": concept, "layer": layer, "verdicts": verdicts, "identical": identical}
        for field in ("tcav_score", "random_score", "effect", "effect_z", "p_value",
                      "p_adjusted", "p_direction", "cav_accuracy"):  # fmt: skip
            row[field] = {s: _num((r or {}).get(field)) for s, r in per.items()}
        rows.append(row)
        c = concepts.setdefault(concept, {"identical": True, "verdicts": {}})
        c["identical"] = c["identical"] and identical
        c["verdicts"][layer] = [verdicts[s] for s in seeds]
    return {
        "seeds": seeds,
        "rows": rows,
        "concepts": concepts,
        "n_identical": sum(c["identical"] for c in concepts.values()),
        "criterion_met": bool(concepts) and all(c["identical"] for c in concepts.values()),
    }


def _subject_key(name: str) -> str:
    return name[4:] if name.startswith("sub-") else name


def find_maps(folder: Path) -> dict[str, dict[str, Path]]:
    """``desc -> subject -> path`` of every ``sub-*/sub-*_desc-<desc>_map.nii.gz`` in a folder."""
    found: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.glob("sub-*/sub-*_desc-*_map.nii.gz")):
        stem = p.name[: -len("_map.nii.gz")]
        sub, _, desc = stem.partition("_desc-")
        found.setdefault(desc, {})[_subject_key(sub)] = p
    return found


def compare_sacv(
    maps: Mapping[int, Mapping[str, Mapping[str, Path]]],
    masks: Mapping[str, Path] | None = None,
    *,
    min_ncc: float = MIN_NCC,
) -> dict[str, Any]:
    """NCC of the same subject's map between every pair of seeds, per map type.

    Args:
        maps: seed -> map type (``desc``) -> subject -> NIfTI path (:func:`find_maps`).
        masks: subject -> native dseg; the NCC is taken where dseg > 0 (brain). None or a
            missing subject: over the whole volume.
        min_ncc: criterion on the mean NCC over subjects of each map type and seed pair.

    Returns:
        ``{"maps": {desc: {"pairs": [{"seeds": [a, b], "n", "mean", "min", "n_below"}],
        "subjects": {subject: {"a-b": ncc}}, "mean", "min", "criterion_met"}},
        "criterion_met"}``; a map type missing in a seed, or a subject missing in one seed
        (only the subjects of every seed are compared), is reported in ``missing``.
    """
    import nibabel as nib

    from neuroexplain.evaluate.harness import ncc

    seeds = sorted(maps)
    descs = sorted({d for m in maps.values() for d in m})
    masks = masks or {}
    out: dict[str, Any] = {}
    for desc in descs:
        have = [s for s in seeds if desc in maps[s]]
        res: dict[str, Any] = {"seeds": have, "missing_seeds": [s for s in seeds if s not in have]}
        subjects = sorted(set.intersection(*(set(maps[s][desc]) for s in have)))
        res["missing_subjects"] = sorted(
            set.union(*(set(maps[s][desc]) for s in have)) - set(subjects)
        )
        per_subject: dict[str, dict[str, float | None]] = {}
        pairs = list(itertools.combinations(have, 2))
        values: dict[tuple[int, int], list[float]] = {p: [] for p in pairs}
        for sub in subjects:
            vols = {s: nib.load(maps[s][desc][sub]).get_fdata(dtype=np.float32) for s in have}
            mask = None
            if sub in masks:
                mask = np.asarray(nib.load(masks[sub]).dataobj) > 0
                if mask.shape != next(iter(vols.values())).shape or not mask.any():
                    mask = None
            per_subject[sub] = {}
            for a, b in pairs:
                r = ncc(vols[a], vols[b], mask)
                per_subject[sub][f"{a}-{b}"] = _num(r)
                values[(a, b)].append(r)
        pair_rows = []
        for (a, b), v in values.items():
            arr = np.asarray(v, dtype=np.float64)
            ok = arr[np.isfinite(arr)]
            pair_rows.append(
                {
                    "seeds": [a, b],
                    "n": len(arr),
                    "n_undefined": int((~np.isfinite(arr)).sum()),
                    "mean": _num(ok.mean()) if len(ok) else None,
                    "min": _num(ok.min()) if len(ok) else None,
                    "n_below": int((ok < min_ncc).sum()),
                }
            )
        means = [p["mean"] for p in pair_rows]
        mins = [p["min"] for p in pair_rows]
        res.update(
            pairs=pair_rows,
            subjects=per_subject,
            mean=_num(np.mean(means)) if means and None not in means else None,
            lowest_pair_mean=min(means) if means and None not in means else None,
            min=min(mins) if mins and None not in mins else None,
            criterion_met=bool(pair_rows)
            and not res["missing_seeds"]
            and all(m is not None and m >= min_ncc for m in means),
        )
        out[desc] = res
    return {
        "seeds": seeds,
        "min_ncc": min_ncc,
        "mask": "native dseg > 0" if masks else "whole volume",
        "maps": out,
        "criterion_met": bool(out) and all(r["criterion_met"] for r in out.values()),
    }


def _match_features(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """One-to-one matching of the columns of ``a`` and ``b`` by |Pearson r| (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    k = a.shape[1]
    r = np.zeros((k, b.shape[1]))
    for i in range(k):
        for j in range(b.shape[1]):
            sa, sb = a[:, i].std(), b[:, j].std()
            r[i, j] = 0.0 if sa == 0 or sb == 0 else abs(np.corrcoef(a[:, i], b[:, j])[0, 1])
    rows, cols = linear_sum_assignment(-r)
    matched = [float(r[i, j]) for i, j in zip(rows, cols, strict=True)]
    return {
        "match": {int(i) + 1: int(j) + 1 for i, j in zip(rows, cols, strict=True)},
        "abs_r": matched,
        "mean_abs_r": _num(np.mean(matched)) if matched else None,
    }


def compare_xnn(
    train: Mapping[int, Mapping[str, Any]],
    features: Mapping[int, Any] | None = None,
    *,
    split: str = "test",
    min_usage: float = MIN_USAGE,
    min_r2: float = MIN_R2,
    min_agreement: float = MIN_AGREEMENT,
) -> dict[str, Any]:
    """Feature usage, faithfulness and cross-seed feature correspondence of the SRAEs.

    Args:
        train: seed -> ``srae_train.json`` (``metrics[split]`` with ``feature_usage``, ``r2``,
            ``decision_agreement``; ``attempts``).
        features: seed -> ``xnn_features.tsv`` as a DataFrame (``split``,
            ``xnnfeature<i>_contribution``), for the correspondence (optional).
        split: the split judged.
        min_usage, min_r2, min_agreement: the criteria.

    Returns:
        ``{"seeds": {seed: {"usage", "r2", "decision_agreement", "unused" (features below
        min_usage, 1-based), "attempts", "criterion_met"}}, "pairs": [...], "criterion_met"}``.
    """
    per: dict[int, dict[str, Any]] = {}
    for s in sorted(train):
        m = (train[s].get("metrics") or {}).get(split)
        if m is None:
            per[s] = {"error": f"no {split!r} metrics", "criterion_met": False}
            continue
        usage = [float(u) for u in m["feature_usage"]]
        unused = [i + 1 for i, u in enumerate(usage) if u < min_usage]
        r2, agree = _num(m.get("r2")), _num(m.get("decision_agreement"))
        per[s] = {
            "n": m.get("n"),
            "n_features": len(usage),
            "usage": usage,
            "min_usage": min(usage) if usage else None,
            "unused": unused,
            "r2": r2,
            "decision_agreement": agree,
            "sparsity": _num(m.get("sparsity")),
            "attempts": [
                {k: a.get(k) for k in ("attempt", "alpha_pt", "seed", "features_used")}
                for a in train[s].get("attempts", [])
            ],
            "usage_met": not unused,
            "r2_met": r2 is not None and r2 >= min_r2,
            "agreement_met": agree is not None and agree >= min_agreement,
        }
        per[s]["criterion_met"] = (
            per[s]["usage_met"] and per[s]["r2_met"] and per[s]["agreement_met"]
        )
    pairs = []
    if features:
        mats = {}
        for s, df in features.items():
            sel = df[df["split"] == split] if split != "all" else df
            cols = sorted(
                (c for c in df.columns if c.endswith("_contribution")),
                key=lambda c: int(c[len("xnnfeature") : -len("_contribution")]),
            )
            mats[s] = (list(sel["subject"]), sel[cols].to_numpy(dtype=np.float64))
        for a, b in itertools.combinations(sorted(mats), 2):
            if mats[a][0] != mats[b][0]:
                pairs.append({"seeds": [a, b], "error": "different subjects"})
                continue
            pairs.append({"seeds": [a, b], **_match_features(mats[a][1], mats[b][1])})
    return {
        "split": split,
        "min_usage": min_usage,
        "min_r2": min_r2,
        "min_agreement": min_agreement,
        "seeds": per,
        "pairs": pairs,
        "criterion_met": bool(per) and all(p["criterion_met"] for p in per.values()),
    }


# -------------------------------------------------------------------------------- tables


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _p(v: float | None) -> str:
    return "–" if v is None else f"{v:.2g}"


def _yes(v: bool) -> str:
    return "**yes**" if v else "no"


def markdown(doc: dict[str, Any]) -> str:
    tcav, sacv, xnn = doc["tcav"], doc["sacv"], doc["xnn"]
    seeds = doc["seeds"]
    lines = [
        f"Seed stability of the concept explanations (seeds {', '.join(map(str, seeds))}; "
        f"classifier `{doc['classifier']}`).",
        "",
        "| criterion | target | measured | criterion met |",
        "| --- | --- | --- | --- |",
    ]
    n_c = len(tcav["concepts"])
    lines.append(
        f"| TCAV verdicts | identical for every concept and layer | {tcav['n_identical']} of "
        f"{n_c} concepts identical | {_yes(tcav['criterion_met'])} |"
    )
    for desc, r in sacv["maps"].items():
        lines.append(
            f"| SACV `{desc}` | mean NCC between seeds ≥ {sacv['min_ncc']} | mean "
            f"{_f(r['mean'])}, lowest pair mean {_f(r['lowest_pair_mean'])}, lowest subject "
            f"{_f(r['min'])} | {_yes(r['criterion_met'])} |"
        )
    if not sacv["maps"]:
        lines.append("| SACV | mean NCC ≥ 0.9 | no maps | no |")
    xs = xnn["seeds"].values()
    usage = [p["min_usage"] for p in xs if p.get("min_usage") is not None]
    r2 = [p["r2"] for p in xs if p.get("r2") is not None]
    ag = [p["decision_agreement"] for p in xs if p.get("decision_agreement") is not None]
    lines.append(
        f"| XNN ({xnn['split']}) | every feature used by ≥ {xnn['min_usage']:.0%} of subjects, "
        f"R² and decision agreement ≥ {xnn['min_r2']} | lowest usage "
        f"{_f(min(usage, default=None), 2)}, R² ≥ {_f(min(r2, default=None))}, agreement ≥ "
        f"{_f(min(ag, default=None))} | {_yes(xnn['criterion_met'])} |"
    )
    lines += ["", "TCAV (verdict / sign-count score / effect z / corrected p per seed):", ""]
    head = " | ".join(f"seed {s}" for s in seeds)
    lines += [f"| concept | layer | {head} | identical |", "|" + " --- |" * (3 + len(seeds))]
    for r in tcav["rows"]:
        cells = " | ".join(
            f"{r['verdicts'].get(s) or '–'} / {_f(r['tcav_score'].get(s), 2)} / "
            f"{_f(r.get('effect_z', {}).get(s), 2)} / {_p(r['p_adjusted'].get(s))}"
            for s in seeds
        )
        lines.append(f"| {r['concept']} | {r['layer']} | {cells} | {_yes(r['identical'])} |")
    lines += ["", f"SACV NCC between seeds ({sacv['mask']}):", ""]
    lines += ["| map | seeds | subjects | mean NCC | min NCC | below 0.9 |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for desc, r in sacv["maps"].items():
        for p in r["pairs"]:
            lines.append(
                f"| {desc} | {p['seeds'][0]}–{p['seeds'][1]} | {p['n']} | {_f(p['mean'])} | "
                f"{_f(p['min'])} | {p['n_below']} |"
            )
    lines += ["", f"XNN ({xnn['split']} split; usage = fraction of subjects):", ""]
    lines += ["| seed | usage per feature | unused | R² | agreement | attempts | met |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    for s, p in xnn["seeds"].items():
        if "error" in p:
            lines.append(f"| {s} | error: {p['error']} | | | | | no |")
            continue
        lines.append(
            f"| {s} | {' '.join(_f(u, 2) for u in p['usage'])} | "
            f"{', '.join(map(str, p['unused'])) or '–'} | {_f(p['r2'])} | "
            f"{_f(p['decision_agreement'])} | {len(p['attempts'])} | {_yes(p['criterion_met'])} |"
        )
    if xnn["pairs"]:
        lines += ["", "XNN feature correspondence (|r| of matched per-subject contributions):", ""]
        lines += ["| seeds | match (a→b) | abs r | mean |", "| --- | --- | --- | --- |"]
        for p in xnn["pairs"]:
            if "error" in p:
                lines.append(f"| {p['seeds'][0]}–{p['seeds'][1]} | {p['error']} | | |")
                continue
            match = ", ".join(f"{a}→{b}" for a, b in p["match"].items())
            lines.append(
                f"| {p['seeds'][0]}–{p['seeds'][1]} | {match} | "
                f"{' '.join(_f(v, 2) for v in p['abs_r'])} | {_f(p['mean_abs_r'])} |"
            )
    t = doc.get("seconds") or {}
    if t:
        lines += ["", "Wall seconds per step (– = reused):", ""]
        steps = sorted({k for v in t.values() for k in v})
        lines += [f"| seed | {' | '.join(steps)} |", "|" + " --- |" * (1 + len(steps))]
        for s, v in t.items():
            lines.append(f"| {s} | {' | '.join(_f(v.get(k), 0) for k in steps)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def _native_masks(preproc: Path) -> dict[str, Path]:
    """subject -> native dseg path of ``preproc.pt`` (the brain masks of the SACV NCC)."""
    import torch

    pre = torch.load(preproc, weights_only=True, mmap=True)
    paths = pre.get("dseg_paths") or []
    return {
        _subject_key(str(s)): Path(p)
        for s, p in zip(pre["subjects"], paths, strict=False)
        if p and Path(p).is_file()
    }


def compare(
    work: Path,
    seeds: Sequence[int],
    sacv_concepts: Sequence[str],
    *,
    preproc: Path | None,
    xnn_split: str,
    mask: bool = True,
) -> dict[str, Any]:
    """Read every seed's outputs under ``work`` and compare them (TCAV, SACV, XNN)."""
    import pandas as pd

    dirs = {s: seed_dirs(work, s, sacv_concepts) for s in seeds}
    tcav = compare_tcav(
        {s: json.loads((d["tcav"] / "tcav.json").read_text())["results"] for s, d in dirs.items()}
    )
    maps: dict[int, dict[str, dict[str, Path]]] = {}
    for s, d in dirs.items():
        maps[s] = {}
        for c in sacv_concepts:
            maps[s].update(find_maps(d["sacv"][c]))
    masks = _native_masks(preproc) if mask and preproc is not None else None
    sacv = compare_sacv(maps, masks)
    train = {
        s: json.loads((d["xnn_model"] / "srae_train.json").read_text()) for s, d in dirs.items()
    }
    feats = {
        s: pd.read_csv(d["xnn"] / "xnn_features.tsv", sep="\t")
        for s, d in dirs.items()
        if (d["xnn"] / "xnn_features.tsv").is_file()
    }
    xnn = compare_xnn(train, feats if len(feats) == len(dirs) else None, split=xnn_split)
    return {"tcav": tcav, "sacv": sacv, "xnn": xnn}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--classifier",
        type=Path,
        default=DEMO / "classifier_64_v2_seed0",
        help="classifier run folder with model.pt and split.tsv (train-classifier --out); "
        "default: the demo cohort's of bench_robustness.py --tag v2, seed 0 (%(default)s)",
    )
    ap.add_argument(
        "--preproc",
        type=Path,
        default=DEMO / "ingest_64" / "preproc.pt",
        help="preproc.pt of the ingest the classifier was trained on (%(default)s)",
    )
    ap.add_argument(
        "--participants",
        default=str(DEMO / "cohort" / "participants.tsv"),
        help="participants.tsv with the concepts' selector columns (diagnosis); the workflow "
        "passes the cohort's; '' for none (%(default)s)",
    )
    ap.add_argument(
        "--concepts",
        type=Path,
        default=ROOT / "config" / "concepts3d.yaml",
        help="concept definitions of TCAV / SACV (the workflow's default: the demo concepts)",
    )
    ap.add_argument(
        "--config",
        type=Path,
        default=ROOT / "config" / "config.yaml",
        help="workflow config whose concepts3d / xnn / evaluation settings give the arguments",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: 0 1 2")
    ap.add_argument(
        "--sacv-concepts",
        nargs="*",
        default=None,
        help="concepts that get SACV maps (default: concepts3d.sacv_concepts of --config)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder of the per-seed outputs (default: CLASSIFIER/stability); reused on rerun",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--xnn-split",
        default=None,
        help="split whose XNN usage / R² / agreement is judged (default: evaluation.subjects "
        "of --config, the split the maps explain)",
    )
    ap.add_argument(
        "--no-mask",
        action="store_true",
        help="SACV NCC over the whole native volume instead of the brain (dseg > 0)",
    )
    ap.add_argument(
        "--compare-only", action="store_true", help="run nothing; compare the outputs in --work"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "stability.json",
        help="result JSON (the Markdown table goes beside it, .md)",
    )
    args = ap.parse_args(argv)

    from neuroexplain.io.atomic import write_json
    from neuroexplain.provenance import provenance

    participants = Path(args.participants) if args.participants else None
    needed = [args.classifier / "model.pt", args.classifier / "split.tsv", args.preproc]
    for p in [*needed, args.concepts, args.config, *([participants] if participants else [])]:
        if not p.is_file():
            print(f"missing {p}", file=sys.stderr)
            return 2
    config = yaml.safe_load(args.config.read_text())
    sacv_concepts = (
        args.sacv_concepts
        if args.sacv_concepts is not None
        else list(config["concepts3d"]["sacv_concepts"])
    )
    xnn_split = args.xnn_split or config["evaluation"]["subjects"]
    work = args.work or args.classifier / "stability"
    seconds: dict[int, dict[str, float | None]] = {}
    if not args.compare_only:
        for seed in args.seeds:
            try:
                seconds[seed] = run_seed(
                    seed,
                    preproc=args.preproc,
                    classifier=args.classifier,
                    concepts_file=args.concepts,
                    participants=participants,
                    config=config,
                    sacv_concepts=sacv_concepts,
                    work=work,
                    threads=args.threads,
                )
            except RuntimeError as exc:
                print(f"seed {seed}: {exc}", file=sys.stderr, flush=True)
                return 1
            print(f"seed {seed}: seconds {seconds[seed]}", flush=True)
    try:
        res = compare(
            work,
            args.seeds,
            sacv_concepts,
            preproc=args.preproc,
            xnn_split=xnn_split,
            mask=not args.no_mask,
        )
    except FileNotFoundError as exc:
        print(f"a seed's outputs are missing (run without --compare-only): {exc}", file=sys.stderr)
        return 1
    params = {
        "classifier": str(args.classifier),
        "preproc": str(args.preproc),
        "participants": str(participants) if participants else None,
        "concepts": str(args.concepts),
        "config": str(args.config),
        "seeds": args.seeds,
        "sacv_concepts": sacv_concepts,
        "xnn_split": xnn_split,
        "work": str(work),
        "threads": args.threads,
        "args_seed0": stage_args(config, 0, sacv_concepts),
    }
    doc = {
        "name": "stability",
        "classifier": str(args.classifier),
        "seeds": args.seeds,
        "criteria": {
            "tcav": "identical verdicts for every concept x layer across seeds",
            "sacv": f"mean NCC between seeds >= {MIN_NCC} per map type and seed pair",
            "xnn": f"every feature used by >= {MIN_USAGE} of the {xnn_split} subjects, R² >= "
            f"{MIN_R2}, decision agreement >= {MIN_AGREEMENT}, every seed",
        },
        "criterion_met": {k: res[k]["criterion_met"] for k in ("tcav", "sacv", "xnn")},
        **res,
        "seconds": {str(s): v for s, v in seconds.items()},
        "machine": platform.platform(),
        "provenance": provenance(
            params,
            seed=args.seeds[0],
            inputs=[args.classifier / "model.pt", args.concepts],
            command="bench_stability",
        ),
    }
    write_json(doc, args.out)
    md = markdown(doc)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
