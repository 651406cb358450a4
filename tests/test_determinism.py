"""Same inputs, same options, same seed -> bitwise-identical outputs on CPU, with provenance.

Each test runs a small configuration of the real commands twice, in the same folder (so the
paths recorded in the provenance are the same), keeps the sha256 of every file of the first run,
removes the outputs and compares the second run file by file: NIfTI maps (and their gzip headers,
which must carry no timestamp), ``.h5ad`` files, checkpoints, tables and JSON sidecars. Summary
JSONs that report wall-clock timings (``saliency.json``) are the only files left out.

Provenance (seed, config hash, package version, input checksums) must be in every JSON sidecar,
every command summary, every checkpoint and in ``.uns[key]["params"]`` of every ``.h5ad``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from neuroexplain import __version__
from neuroexplain.cli import main

#: summaries that report run times (not part of the reproducible output)
TIMED = {"saliency.json"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): _sha(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in TIMED
    }


def run_twice(out: Path, run: Callable[[], None]) -> dict[str, str]:
    """Run, hash every file under ``out``, delete it, run again; assert identical bytes."""
    run()
    first = _digest(out)
    assert first, "the run wrote nothing"
    shutil.rmtree(out)
    run()
    second = _digest(out)
    assert sorted(second) == sorted(first), "the two runs wrote different files"
    differ = sorted(k for k in first if first[k] != second[k])
    assert not differ, f"files differ between two identical runs: {differ}"
    return second


def _find_provenance(obj: Any) -> list[dict[str, Any]]:
    """Every dict in ``obj`` (nested) that looks like a provenance block."""
    found = []
    if isinstance(obj, dict):
        if {"seed", "config_hash", "version", "inputs"} <= set(obj):
            found.append(obj)
        for v in obj.values():
            found += _find_provenance(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            found += _find_provenance(v)
    return found


def assert_provenance(obj: Any, where: str, *, seed: int | None = 0, inputs: bool = True) -> None:
    blocks = _find_provenance(obj)
    assert blocks, f"{where}: no provenance block (seed, config_hash, version, inputs)"
    prov = blocks[0]
    assert prov["version"] == __version__, where
    assert isinstance(prov["config_hash"], str) and len(prov["config_hash"]) == 16, where
    if seed is not None:
        assert prov["seed"] == seed, where
    sums = [str(s) for s in prov["inputs"]["sha256"]]  # .h5ad stores lists as arrays
    assert len(sums) == len(prov["inputs"]["paths"]), where
    if inputs:
        assert sums and all(len(s) == 64 for s in sums), f"{where}: no input checksums"
        for path, digest in zip(prov["inputs"]["paths"], sums, strict=True):
            if Path(path).is_file():  # inputs of the run that are still there
                assert _sha(Path(path)) == digest, f"{where}: wrong checksum of {path}"


def check_niftis_and_sidecars(root: Path, *, derived: list[str]) -> int:
    """gzip headers without mtime; every sidecar carries provenance; maps under ``derived``
    folders all have a sidecar. Returns the number of NIfTI files checked."""
    niftis = sorted(root.rglob("*.nii.gz"))
    for p in niftis:
        head = p.read_bytes()[:10]
        assert head[:2] == b"\x1f\x8b" and head[4:8] == b"\0\0\0\0", f"{p}: gzip mtime is set"
        side = p.with_name(p.name.removesuffix(".nii.gz") + ".json")
        if any(part in p.parts for part in derived):
            assert side.is_file(), f"{p}: no JSON sidecar"
        if side.is_file():
            assert_provenance(json.loads(side.read_text()), str(side))
    return len(niftis)


# ------------------------------------------------------------------------------------ MRI


def test_cohort_and_ingest_are_bitwise_reproducible(ixi_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def run() -> None:
        code = main(
            ["make-cohort", "--bids", str(ixi_root), "--out", str(out / "cohort"), "--limit", "2"]
        )
        assert code == 0
        code = main(
            [
                "ingest-mri", "--bids", str(out / "cohort"), "--out", str(out / "ingest"),
                "--shape", "32", "--label-column", "diagnosis", "--align", "labels",
            ]
        )  # fmt: skip
        assert code == 0

    files = run_twice(out, run)
    assert "ingest/preproc.pt" in files and "cohort/participants.tsv" in files
    n = check_niftis_and_sidecars(out / "cohort", derived=["groundtruth"])
    assert n >= 2 * 6  # T1w, dseg and four ground-truth maps per subject
    assert_provenance(json.loads((out / "cohort" / "cohort.json").read_text()), "cohort.json")
    ingest = json.loads((out / "ingest" / "ingest.json").read_text())
    assert_provenance(ingest, "ingest.json", seed=None)  # deterministic: no seed to record
    pre = torch.load(out / "ingest" / "preproc.pt", weights_only=True)
    assert pre["params"], "preproc.pt records its parameters"


# ------------------------------------------------------------------- saliency and simulator


def test_saliency_and_simulator_maps_are_bitwise_reproducible(tmp_path: Path) -> None:
    """A tiny classifier trained here, its saliency maps, a simulator trained against it and the
    simulated disease maps: identical bytes from two runs."""
    from _toy3d import MODEL_KW, SIZE, make_preproc, split_table, train_toy

    from neuroexplain.classifier import save_classifier

    inputs = tmp_path / "in"
    pre = make_preproc(inputs / "bids", n=10, seed=0)
    torch.save(pre, inputs / "preproc.pt")
    out = tmp_path / "out"
    clf, sal, sim = out / "classifier", out / "saliency", out / "simulator"

    def run() -> None:
        net = train_toy(pre, seed=0, epochs=15)  # trained here, seeded
        clf.mkdir(parents=True)
        save_classifier(
            clf / "model.pt", net, arch="small", model_kwargs=MODEL_KW,
            input_shape=[1, SIZE, SIZE, SIZE], config={"epochs": 15}, epoch=15, seed=0,
            best_metric={"name": "none", "value": 0.0},
        )  # fmt: skip
        with torch.no_grad():
            logits = net(pre["images"])[:, 0].numpy()
        # two validation subjects: the simulator's objective is measured on them
        split = ["val" if i in (4, 5) else s for i, s in enumerate(split_table(10))]
        table = pd.DataFrame(
            {"subject": pre["subjects"], "split": split, "y": pre["y"].numpy(), "logit": logits}
        )
        table[["subject", "split", "y"]].to_csv(clf / "split.tsv", sep="\t", index=False)
        table.to_csv(clf / "logits.tsv", sep="\t", index=False)
        common = ["--preproc", str(inputs / "preproc.pt"), "--device", "cpu"]
        code = main(
            [
                "saliency", *common, "--checkpoint", str(clf / "model.pt"), "--out", str(sal),
                "--methods", "gradient,smoothgrad,ig,gradcam", "--layer", "features.1",
                "--ig-steps", "4", "--smoothgrad-samples", "3",
            ]
        )  # fmt: skip
        assert code == 0
        code = main(
            [
                "train-simulator", *common, "--classifier", str(clf / "model.pt"),
                "--logits", str(clf / "logits.tsv"), "--out", str(sim / "model.pt"),
                "--epochs", "2", "--max-epochs", "3", "--batch-size", "2", "--channels", "4,8",
                "--experts", "2", "--downsample", "1", "--all-subjects",
            ]
        )  # fmt: skip
        assert code == 0
        code = main(
            [
                "simulate", *common, "--simulator", str(sim / "model.pt"),
                "--classifier", str(clf / "model.pt"), "--out", str(sim),
                "--regions", "A=10", "--regions", "B=20",
            ]
        )  # fmt: skip
        assert code == 0

    files = run_twice(out, run)
    maps = [f for f in files if f.endswith(".nii.gz")]
    assert any(f.startswith("saliency/") and "gradcam" in f for f in maps), maps
    assert any(f.startswith("simulator/") and "logjacobian" in f for f in maps), maps
    assert {
        "classifier/model.pt",
        "simulator/model.pt",
        "simulator/train_log.tsv",
        "simulator/train_summary.json",
    } <= set(files)
    n = check_niftis_and_sidecars(out, derived=["saliency", "simulator"])
    assert n == len(maps)
    for name in ("simulator/simulate.json", "simulator/train_summary.json"):
        assert_provenance(json.loads((out / name).read_text()), name)
    ckpt = torch.load(sim / "model.pt", weights_only=True)
    assert_provenance(ckpt["provenance"], "simulator/model.pt")
    assert ckpt["summary"]["objective"]["measured_on"] == "val" and len(ckpt["val_subjects"]) == 2
    assert_provenance(json.loads((sal / "saliency.json").read_text()), "saliency.json")


# ------------------------------------------------------------------------------------ ST


def test_st_ingest_and_concepts_are_bitwise_reproducible(mob_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    mob = out / "mob.h5ad"

    def run() -> None:
        code = main(
            [
                "ingest-st", "--counts", str(mob_root / "mob_rep11_counts.csv.gz"),
                "--spots", str(mob_root / "mob_rep11_spots.csv"), "--label-key", "layer_short",
                "--out", str(mob),
            ]
        )  # fmt: skip
        assert code == 0
        code = main(
            [
                "st-concepts", "--adata", str(mob), "--label-key", "layer_short",
                "--out", str(out / "concepts.h5ad"), "--model-dir", str(out / "model"),
                "--epochs", "3", "--n-top-genes", "200", "--n-latent", "4",
                "--saliency", "smoothgrad", "--genemode-seeds", "", "--device", "cpu",
            ]
        )  # fmt: skip
        assert code == 0

    files = run_twice(out, run)
    assert {"mob.h5ad", "concepts.h5ad", "model/model.pt"} <= set(files)
    ingested = ad.read_h5ad(mob)
    for key in ingested.uns:
        if isinstance(ingested.uns[key], dict):
            assert_provenance(ingested.uns[key]["params"], f"mob.h5ad uns[{key!r}]", seed=None)
    result = ad.read_h5ad(out / "concepts.h5ad")
    params = result.uns["concept_saliency"]["params"]
    assert_provenance(params, "concepts.h5ad uns['concept_saliency']['params']")
    assert params["inputs"]["paths"] == [str(mob)]
    assert np.isfinite(result.obsm[next(k for k in result.obsm if k != "spatial")]).all()
    model = torch.load(out / "model" / "model.pt", weights_only=True)
    assert model["seed"] == 0 and model["version"] == __version__
