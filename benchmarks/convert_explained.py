"""Add the trained CNN as the explained model to a classifier folder of an earlier version.

Folders written before ``classifier.explain`` (v3: final model = the ensemble, trained model = the
CNN) hold the ensemble only. The CNN is recovered exactly from it, without retraining: the
ensemble's state without its linear path, the logit layer divided by the ensemble's model weight.

Usage (the README's v3x run)::

    python benchmarks/convert_explained.py SRC_DIR DST_DIR preproc.pt
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import torch

from neuroexplain.classifier.metrics import binary_metrics
from neuroexplain.classifier.network import load_classifier
from neuroexplain.io.atomic import save_torch


def main(src: Path, dst: Path, preproc: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(src / "model.pt", weights_only=True)
    metrics = json.loads((src / "metrics.json").read_text())
    sel = metrics["final_selection"]
    if not (sel["trained_model"] == "cnn" and sel["choice"] == "ensemble"):
        raise SystemExit(f"{src}: expected an ensemble whose trained model is the CNN")
    w_m = sel["weights"]["model"]
    drop = ("linear_pool", "linear_reference")
    kwargs = {k: v for k, v in ckpt["model_kwargs"].items() if k not in drop}
    state = {k: v.clone() for k, v in ckpt["state_dict"].items() if "linear_path." not in k}
    last = max(k for k in state if k.startswith("classifier.") and k.endswith(".weight"))
    for key in (last, last.removesuffix("weight") + "bias"):
        state[key] = state[key] / w_m
    ckpt["explained"] = {"name": "cnn", "model_kwargs": kwargs, "state_dict": state}
    save_torch(ckpt, dst / "model.pt")

    model, _ = load_classifier(dst / "model.pt", explained=True)
    pre = torch.load(preproc, weights_only=True)
    x = pre["images"].float()
    with torch.no_grad():
        lg = torch.cat([model(x[i : i + 8]).reshape(-1) for i in range(0, len(x), 8)]).numpy()
    table = pd.read_csv(src / "logits.tsv", sep="\t", dtype={"subject": str})
    if list(table["subject"]) != [str(s) for s in pre["subjects"]]:
        raise SystemExit(f"{src}/logits.tsv: subjects differ from {preproc}")
    table["explained_logit"] = lg
    table.to_csv(dst / "logits.tsv", sep="\t", index=False)
    explained: dict = {"model": "cnn"}
    for split in ("train", "val", "test"):
        sel_split = (table["split"] == split).to_numpy()
        explained[split] = binary_metrics(table["y"][sel_split], lg[sel_split])
    # the recovery is exact: the CNN's AUCs as recorded at training
    for split in ("val", "test"):
        print(split, explained[split]["auc"], "recorded", sel["auc"]["cnn"][split])
    metrics["explained"] = explained
    (dst / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for name in ("split.tsv", "train_log.tsv"):
        shutil.copy(src / name, dst / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
