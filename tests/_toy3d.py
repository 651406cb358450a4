"""A tiny synthetic 3D cohort and classifier for the concept / XNN tests.

16³ volumes: a spherical "brain" (dseg label 1) holding two bright blobs, region A (label 10)
and region B (label 20). In diseased subjects blob A is smaller ("atrophy"); blob B varies at
random in both classes. Native T1w files share the model grid (identity mapping), so maps written
in native space can be compared voxel by voxel.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from neuroexplain.classifier import build_model, save_classifier

SIZE = 16
CENTRE_A = (4.5, 5.0, 8.0)
CENTRE_B = (11.0, 10.5, 8.0)
MODEL_KW = {"channels": [4, 8], "hidden": [], "dropout": 0.0}


def _ball(centre, radius):
    g = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1).astype(float)
    return ((g - np.asarray(centre)) ** 2).sum(-1) <= radius**2


def make_volume(rng, disease: bool):
    brain = _ball((7.5, 7.5, 7.5), 7.2)
    ra = rng.uniform(1.3, 1.8) if disease else rng.uniform(2.6, 3.1)
    rb = rng.uniform(1.5, 3.0)
    a = _ball(CENTRE_A, ra) & brain
    b = _ball(CENTRE_B, rb) & brain
    img = np.where(brain, 0.4, 0.0) + rng.normal(0, 0.03, (SIZE,) * 3) * brain
    img[a] = 1.0
    img[b] = 0.9
    dseg = np.zeros((SIZE,) * 3, np.int16)
    dseg[brain] = 1
    dseg[a] = 10
    dseg[b] = 20
    return img.astype(np.float32), dseg


def make_preproc(root: Path, n: int = 24, seed: int = 0) -> dict:
    """Write native T1w / dseg files under ``root`` and return a preproc.pt dict."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -15.0
    imgs, segs, t1s, dsegs, subs, ys, labels = [], [], [], [], [], [], []
    for i in range(n):
        disease = i % 2 == 1
        img, dseg = make_volume(rng, disease)
        sub = f"sub-{i:02d}"
        anat = root / sub / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        t1 = nib.Nifti1Image(img, affine)
        t1.set_sform(affine, code=1)
        t1.set_qform(affine, code=1)
        nib.save(t1, anat / f"{sub}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(dseg, affine), anat / f"{sub}_dseg.nii.gz")
        imgs.append(img)
        segs.append(dseg)
        t1s.append(str(anat / f"{sub}_T1w.nii.gz"))
        dsegs.append(str(anat / f"{sub}_dseg.nii.gz"))
        subs.append(sub)
        ys.append(float(disease))
        labels.append("disease" if disease else "control")
    return {
        "images": torch.tensor(np.stack(imgs)[:, None]),
        "dseg": torch.tensor(np.stack(segs)[:, None]),
        "subjects": subs,
        "y": torch.tensor(ys, dtype=torch.float32),
        "label": labels,
        "positive_class": "disease",
        "model_affines": torch.tensor(np.stack([affine] * n)),
        "native_affines": torch.tensor(np.stack([affine] * n)),
        "native_shapes": torch.tensor([[SIZE] * 3] * n),
        "t1_paths": t1s,
        "dseg_paths": dsegs,
        "dseg_names": {1: "brain", 10: "region A", 20: "region B"},
        "params": {},
    }


def split_table(n: int) -> list[str]:
    """train for the first 2/3 of the subjects, test for the rest (both classes in each)."""
    return ["train" if i < (2 * n) // 3 else "test" for i in range(n)]


def train_toy(pre: dict, seed: int = 0, epochs: int = 40):
    """A 2-block small CNN trained to tell the classes apart (a few seconds on one core)."""
    torch.manual_seed(seed)
    net = build_model("small", spatial_size=(SIZE,) * 3, **MODEL_KW)
    x, y = pre["images"], pre["y"]
    train = torch.tensor([s == "train" for s in split_table(len(y))])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[train])[:, 0], y[train])
        loss.backward()
        opt.step()
    return net.eval()


def write_cohort(root: Path, n: int = 24, seed: int = 0, epochs: int = 40) -> dict[str, Path]:
    """preproc.pt, model.pt, split.tsv, participants.tsv under ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    pre = make_preproc(root / "bids", n, seed)
    torch.save(pre, root / "preproc.pt")
    net = train_toy(pre, seed, epochs)
    save_classifier(
        root / "model.pt",
        net,
        arch="small",
        model_kwargs=MODEL_KW,
        input_shape=[1, SIZE, SIZE, SIZE],
        config={},
        epoch=epochs,
        seed=seed,
        best_metric={"name": "none", "value": 0.0},
    )
    split = split_table(n)
    lines = ["subject\tsplit\ty"] + [
        f"{s}\t{sp}\t{int(y)}"
        for s, sp, y in zip(pre["subjects"], split, pre["y"].tolist(), strict=True)
    ]
    (root / "split.tsv").write_text("\n".join(lines) + "\n")
    part = ["participant_id\tdiagnosis"] + [
        f"{s}\t{lab}" for s, lab in zip(pre["subjects"], pre["label"], strict=True)
    ]
    (root / "participants.tsv").write_text("\n".join(part) + "\n")
    return {
        "root": root,
        "preproc": root / "preproc.pt",
        "model": root / "model.pt",
        "split": root / "split.tsv",
        "participants": root / "participants.tsv",
    }


@cache
def shared_cohort(n: int = 36, seed: int = 0, epochs: int = 40) -> dict[str, Path]:
    """:func:`write_cohort` once per test session (removed at exit), with ``concepts.yaml``."""
    root = Path(tempfile.mkdtemp(prefix="neuroexplain-toy3d-"))
    atexit.register(shutil.rmtree, root, True)
    paths = write_cohort(root / "cohort", n=n, seed=seed, epochs=epochs)
    (root / "cohort" / "concepts.yaml").write_text(CONCEPTS_YAML)
    paths["concepts"] = root / "cohort" / "concepts.yaml"
    return paths


CONCEPTS_YAML = """\
participants: participants.tsv
n_random: 10
concepts:
  atrophyA:
    where: {diagnosis: disease}
    random: {diagnosis: control}
    region: [10]
    dilate: 1
  regionB:
    where: {diagnosis: disease}
    random: {diagnosis: control}
    region: [20]
    dilate: 1
"""
