"""Offline analysis: which final model should the classifier stage keep (issue 20)?

For every existing run of the robustness benchmark (``bench_robustness.py``; run folders
``<work>/<cohort>/classifier_<shape>_<tag>_seed<k>`` with ``logits.tsv``, ``split.tsv``,
``metrics.json``, and the cohort's ``ingest_<shape>/preproc.pt``) the linear reference is
refitted on the run's own split (``fit_linear_reference``, seconds; its AUCs are checked
against the run's ``metrics.json``), and the validation / test AUC of three models are
computed: the stage's trained model (``logits.tsv``: the CNN, or the CNN with a linear path
when the reference fallback chose it), the reference, and their ensemble (each model's
logits divided by its own logit sd on the training subjects, averaged:
``neuroexplain.classifier.train.ensemble_weights``). No training.

Decision rules, each using validation information only, are then scored on the test split:

- ``current``: the trained model (what the stage keeps today);
- ``always``: the ensemble;
- ``separated``: the ensemble unless the paired stratified bootstrap 95 % interval of the
  validation AUC difference (model - reference) lies above 0
  (``neuroexplain.classifier.train.select_final``);
- ``val_argmax``: whichever of model, reference and ensemble has the best validation AUC (ties:
  model, ensemble, reference), the naive selection.

Criterion (issue 20): test AUC >= 0.9 or within 0.03 of the reference's test AUC.

Usage:
    python benchmarks/analyze_selection.py                     # the v2 runs, seeds 0 and 1
    python benchmarks/analyze_selection.py --work results/robustness --tag v2 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
COHORTS = ("small_n60", "demo", "age", "other_unpaired", "small_paired")
RULES = ("current", "always", "separated", "val_argmax")


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y.astype(int), s))


def analyze_run(run: Path, preproc: dict, seed: int) -> dict:
    """Refit the reference on the run's split and score model, reference and ensemble."""
    import pandas as pd

    from neuroexplain.classifier.train import ensemble_weights, select_final
    from neuroexplain.evaluate.quality import fit_linear_reference

    subjects = preproc["subjects"]
    split = pd.read_csv(run / "split.tsv", sep="\t", dtype={"subject": str})
    split = split.set_index("subject").loc[subjects]
    logits = pd.read_csv(run / "logits.tsv", sep="\t", dtype={"subject": str})
    logits = logits.set_index("subject").loc[subjects]
    metrics = json.loads((run / "metrics.json").read_text())
    y = np.asarray(preproc["y"], dtype=np.float64)
    parts = {s: np.flatnonzero(split["split"].to_numpy() == s) for s in ("train", "val", "test")}
    ref_summary, ref_model = fit_linear_reference(preproc["images"], y, parts, seed=seed)
    for s in ("val", "test"):  # the refit is the run's reference
        old = metrics["reference"][s]["auc"]
        if abs(ref_summary[s]["auc"] - old) > 1e-6:
            raise RuntimeError(
                f"{run}: refitted reference {s} AUC {ref_summary[s]['auc']} != {old}"
            )
    lm = logits["logit"].to_numpy(np.float64)
    lr = ref_model.decision_function(preproc["images"])
    tr = parts["train"]
    s_m, s_r = float(np.std(lm[tr])), float(np.std(lr[tr]))
    w_m, w_r = ensemble_weights(s_m, s_r)
    le = w_m * lm + w_r * lr
    # sensitivity: scales from the validation logits instead (no labels either)
    va = parts["val"]
    wv_m, wv_r = ensemble_weights(float(np.std(lm[va])), float(np.std(lr[va])))
    le_val_scaled = wv_m * lm + wv_r * lr
    scores = {"model": lm, "reference": lr, "ensemble": le}
    aucs = {
        k: {s: _auc(y[parts[s]], v[parts[s]]) for s in ("val", "test")} for k, v in scores.items()
    }
    decision = select_final(y[va], lm[va], lr[va], rule="separated", seed=seed)
    order = ("model", "ensemble", "reference")
    argmax = max(order, key=lambda k: (aucs[k]["val"], -order.index(k)))
    picks = {
        "current": "model",
        "always": "ensemble",
        "separated": "ensemble" if decision["choice"] == "ensemble" else "model",
        "val_argmax": argmax,
    }
    ref_test = aucs["reference"]["test"]
    rules = {}
    for rule, pick in picks.items():
        t = aucs[pick]["test"]
        rules[rule] = {"pick": pick, "test_auc": t, "pass": bool(t >= 0.9 or t >= ref_test - 0.03)}
    return {
        "stage_model": metrics.get("model", "cnn"),
        "n": {s: len(v) for s, v in parts.items()},
        "logit_sd_train": {"model": s_m, "reference": s_r},
        "weights": {"model": w_m, "reference": w_r},
        "auc": aucs,
        "ensemble_val_scaled_test_auc": _auc(y[parts["test"]], le_val_scaled[parts["test"]]),
        "val_difference": decision["difference"],
        "rules": rules,
    }


def _table(runs: list[dict]) -> str:
    def f(v: float) -> str:
        return f"{v:.3f}"

    lines = [
        "| cohort | seed | stage model | n val / test | model val / test | reference val / test "
        "| ensemble val / test | val AUC diff (95 % CI) | separated pick | pass cur / alw / sep |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        a, d = r["auc"], r["val_difference"]
        ok = " / ".join("y" if r["rules"][k]["pass"] else "**n**" for k in RULES[:3])
        lines.append(
            f"| {r['cohort']} | {r['seed']} | {r['stage_model']} | {r['n']['val']} / "
            f"{r['n']['test']} | {f(a['model']['val'])} / {f(a['model']['test'])} | "
            f"{f(a['reference']['val'])} / {f(a['reference']['test'])} | "
            f"{f(a['ensemble']['val'])} / {f(a['ensemble']['test'])} | "
            f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | "
            f"{r['rules']['separated']['pick']} | {ok} |"
        )
    lines += ["", "| rule | runs meeting the criterion | mean test AUC |", "| --- | --- | --- |"]
    for rule in RULES:
        n_pass = sum(r["rules"][rule]["pass"] for r in runs)
        mean = np.mean([r["rules"][rule]["test_auc"] for r in runs])
        lines.append(f"| {rule} | {n_pass} / {len(runs)} | {mean:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "results" / "robustness")
    ap.add_argument("--tag", default="v2")
    ap.add_argument("--shape", type=int, default=64)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--cohorts", nargs="*", default=list(COHORTS))
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_analysis.json"
    )
    args = ap.parse_args(argv)

    from neuroexplain.classifier.data import load_preproc_dict
    from neuroexplain.provenance import provenance

    runs = []
    for cohort in args.cohorts:
        preproc = load_preproc_dict(args.work / cohort / f"ingest_{args.shape}" / "preproc.pt")
        preproc["images"] = preproc["images"].numpy()
        for seed in args.seeds:
            run = args.work / cohort / f"classifier_{args.shape}_{args.tag}_seed{seed}"
            res = {
                "cohort": cohort,
                "seed": seed,
                "run": str(run),
                **analyze_run(run, preproc, seed),
            }
            runs.append(res)
            print(cohort, seed, {k: v["test_auc"] for k, v in res["rules"].items()}, flush=True)
        del preproc
    summary = {
        rule: {
            "pass": int(sum(r["rules"][rule]["pass"] for r in runs)),
            "runs": len(runs),
            "mean_test_auc": float(np.mean([r["rules"][rule]["test_auc"] for r in runs])),
        }
        for rule in RULES
    }
    doc = {
        "name": "selection_analysis",
        "criterion": "test AUC >= 0.9 or >= reference test AUC - 0.03",
        "ensemble": "logits / own training-logit sd, averaged, times the sds' geometric mean",
        "summary": summary,
        "runs": runs,
        "provenance": provenance(
            vars(args) | {"work": str(args.work), "out": str(args.out)},
            seed=0,
            command="analyze_selection",
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    md = _table(runs)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
