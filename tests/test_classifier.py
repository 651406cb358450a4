"""Classifier networks, split, metrics, training determinism, checkpoints and the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from neuroexplain.classifier import (
    SmallCNN3D,
    binary_metrics,
    build_model,
    default_target_layer,
    get_layer,
    layer_names,
    load_classifier,
    make_split,
    read_split,
    train_classifier,
)
from neuroexplain.cli import main
from neuroexplain.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy_preproc(n: int = 24, size: int = 16, seed: int = 0) -> dict:
    """Separable toy data: positives have a bright cube in one corner."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2), np.float32)
    images = rng.normal(0.3, 0.1, size=(n, 1, size, size, size)).astype(np.float32)
    images[y == 1, :, 2:7, 2:7, 2:7] += 1.0
    return {
        "images": torch.tensor(images),
        "y": torch.tensor(y),
        "subjects": [f"sub-{i:02d}" for i in range(n)],
        "label": ["disease" if v else "control" for v in y],
        "positive_class": "disease",
        "model_affines": torch.tensor(np.stack([np.diag([3.0, 3.0, 3.0, 1.0])] * n)),
        # the remaining ingest-mri fields (no native images needed for training)
        "dseg": None,
        "native_affines": torch.tensor(np.stack([np.eye(4)] * n)),
        "native_shapes": torch.tensor([[size, size, size]] * n),
        "t1_paths": [""] * n,
        "dseg_paths": [""] * n,
        "dseg_names": {},
        "params": {},
    }


# ------------------------------------------------------------------------------------ networks


def test_small_network_matches_the_paper_layout():
    net = build_model("small", spatial_size=(64, 64, 64))
    assert isinstance(net, SmallCNN3D)
    assert net.flatten_size == 1024  # 16 channels x 4³ after four poolings
    assert net.classifier[0].in_features == 1024 and net.classifier[0].out_features == 64
    assert net.classifier[-1].out_features == 1
    convs = [m for m in net.features.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 16]
    assert all(c.kernel_size == (3, 3, 3) for c in convs)
    names = layer_names(net)
    for name in ("features.0", "features.3", "features.3.conv", "features.3.adn", "classifier.0"):
        assert name in names
    assert isinstance(get_layer(net, "features.2.adn.N"), torch.nn.BatchNorm3d)
    with pytest.raises(KeyError, match="no layer named"):
        get_layer(net, "features.9")


def test_flatten_size_follows_the_input_shape():
    net = build_model("small", spatial_size=(32, 48, 40)).eval()
    assert net.flatten_size == 16 * 2 * 3 * 2
    assert net(torch.zeros(2, 1, 32, 48, 40)).shape == (2, 1)
    with pytest.raises(ValueError, match="spatial shape"):
        net(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="too small"):
        build_model("small", spatial_size=(8, 8, 8))


def test_monai_network_by_name():
    net = build_model("densenet121", spatial_size=(32, 32, 32)).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1)
    assert default_target_layer("densenet121") in layer_names(net)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg99")


# ------------------------------------------------------------------------------ split, metrics


def test_split_is_stratified_disjoint_and_seeded():
    subjects = [f"sub-{i:03d}" for i in range(100)]
    y = np.array([1] * 50 + [0] * 50)
    df = make_split(subjects, y, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert df["subject"].tolist() == subjects
    counts = df.groupby(["split", "y"]).size()
    for split, n in (("test", 10), ("val", 10), ("train", 30)):
        assert counts[(split, 0)] == n and counts[(split, 1)] == n
    again = make_split(subjects, y, val_fraction=0.2, test_fraction=0.2, seed=3)
    other = make_split(subjects, y, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert again["split"].tolist() == df["split"].tolist()
    assert other["split"].tolist() != df["split"].tolist()


def test_grouped_split_keeps_each_source_anatomy_in_one_split():
    # paired cohort: a control and a diseased version of each of 50 source subjects
    subjects = [f"sub-{i:03d}{t}" for i in range(50) for t in ("ctl", "dis")]
    groups = [s[:-3] for s in subjects]
    y = np.array([0.0, 1.0] * 50)
    df = make_split(subjects, y, val_fraction=0.2, test_fraction=0.2, seed=1, groups=groups)
    per_group = df.assign(group=groups).groupby("group")["split"].nunique()
    assert (per_group == 1).all()  # no anatomy in two splits
    counts = df.groupby(["split", "y"]).size()
    for split, n in (("test", 10), ("val", 10), ("train", 30)):
        assert counts[(split, 0)] == n and counts[(split, 1)] == n  # still balanced
    ungrouped = make_split(subjects, y, val_fraction=0.2, test_fraction=0.2, seed=1)
    leaks = ungrouped.assign(group=groups).groupby("group")["split"].nunique()
    assert (leaks > 1).any()  # what the groups prevent
    # singleton groups reproduce the plain stratified split exactly
    alone = make_split(subjects, y, val_fraction=0.2, test_fraction=0.2, seed=1, groups=subjects)
    assert alone["split"].tolist() == ungrouped["split"].tolist()


def test_standardization_is_fitted_on_training_images_and_travels_with_the_model(tmp_path):
    pre = _toy_preproc(n=16)
    pre["images"][:, :, 0, 0, 0] = 5.0  # a constant voxel: sd 0, must not blow up
    train_classifier(
        pre,
        tmp_path,
        epochs=1,
        batch_size=4,
        augment=False,
        flip=False,  # with flips the mirrored training images count too
        progress=False,
        standardize=True,
    )
    split = pd.read_csv(tmp_path / "split.tsv", sep="\t")
    train = pre["images"][np.flatnonzero(split["split"].to_numpy() == "train")].double()
    model, ckpt = load_classifier(tmp_path / "model.pt")
    assert ckpt["model_kwargs"]["standardize"] is True
    norm = model.input_norm
    np.testing.assert_allclose(norm.mean[0].numpy(), train.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        norm.scale[0].numpy(), (1 / (train.std(0) + 0.05)).numpy(), rtol=1e-5
    )
    assert float(norm.scale[0, 0, 0, 0, 0]) == pytest.approx(20.0)
    # the checkpoint's network applies it: same logits as logits.tsv, and they depend on it
    logits = pd.read_csv(tmp_path / "logits.tsv", sep="\t")["logit"].to_numpy()
    with torch.no_grad():
        np.testing.assert_allclose(model(pre["images"])[:, 0].numpy(), logits, atol=1e-5)
        norm.mean.zero_()
        assert not np.allclose(model(pre["images"])[:, 0].numpy(), logits, atol=1e-3)
    assert "features.3" in ckpt["layer_names"]  # explainers' layer names are unchanged


def test_binary_metrics_by_hand():
    y = [0, 0, 0, 1, 1, 1, 1]
    logits = [-2.0, 0.5, -1.0, 2.0, 1.0, -0.5, 3.0]
    m = binary_metrics(y, logits)
    # predictions: 0 1 0 | 1 1 0 1 -> tn 2, fp 1, fn 1, tp 3
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    # AUC = fraction of (pos, neg) pairs ranked correctly: 11 of 12
    assert m["auc"] == pytest.approx(11 / 12)
    assert binary_metrics([1, 1], [0.3, 0.4])["auc"] is None


# ---------------------------------------------------------------------------- training, ckpts


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_is_deterministic_and_writes_every_output(tmp_path):
    pre = _toy_preproc()
    kw = {"epochs": 2, "batch_size": 4, "seed": 7, "patience": 0, "progress": False}
    m1 = train_classifier(pre, tmp_path / "a", **kw)
    train_classifier(pre, tmp_path / "b", **kw)
    for name in ("model.pt", "metrics.json", "logits.tsv", "split.tsv", "train_log.tsv"):
        assert (tmp_path / "a" / name).is_file()
    a, b = _state(tmp_path / "a" / "model.pt"), _state(tmp_path / "b" / "model.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (tmp_path / "a" / "logits.tsv").read_bytes() == (
        tmp_path / "b" / "logits.tsv"
    ).read_bytes()

    # checkpoint content
    assert a["arch"] == "small" and a["input_shape"] == [1, 16, 16, 16] and a["seed"] == 7
    assert "features.3" in a["layer_names"] and a["best_metric"]["name"] == "val_loss"
    assert 1 <= a["epoch"] <= 2 and a["version"]
    # outputs
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert {"train", "val", "test"} <= set(metrics)
    assert metrics["test"]["n"] == 4 and len(metrics["test"]["confusion_matrix"]) == 2
    assert metrics == json.loads(json.dumps(m1, default=float))  # returned == written
    logits = pd.read_csv(tmp_path / "a" / "logits.tsv", sep="\t")
    columns = ["subject", "split", "y", "label", "logit", "prob"]
    # the explained model's logits too when it is not the final model (classifier.explain)
    columns += ["explained_logit"] if "explained" in m1 else []
    assert list(logits.columns) == columns
    assert np.allclose(logits["prob"], 1 / (1 + np.exp(-logits["logit"])))
    log = pd.read_csv(tmp_path / "a" / "train_log.tsv", sep="\t")
    assert log["epoch"].tolist() == [1, 2]
    split = read_split(tmp_path / "a" / "split.tsv", pre["subjects"])
    assert (split["split"] == logits["split"]).all()


def test_checkpoint_reload_and_mismatch_errors(tmp_path):
    pre = _toy_preproc(n=12)
    train_classifier(pre, tmp_path, epochs=1, batch_size=4, augment=False, progress=False)
    model, ckpt = load_classifier(tmp_path / "model.pt", input_shape=[1, 16, 16, 16])
    assert not model.training
    x = pre["images"][:3]
    logits = pd.read_csv(tmp_path / "logits.tsv", sep="\t")["logit"].to_numpy()[:3]
    with torch.no_grad():
        assert np.allclose(model(x)[:, 0].numpy(), logits, atol=1e-5)
    with pytest.raises(InputError, match="trained on inputs of shape"):
        load_classifier(tmp_path / "model.pt", input_shape=[1, 32, 32, 32])
    with pytest.raises(InputError, match="expected a 'densenet121' classifier"):
        load_classifier(tmp_path / "model.pt", arch="densenet121")
    # weights of another network under this architecture's name
    ckpt["state_dict"] = build_model("small", spatial_size=(32, 32, 32)).state_dict()
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(InputError, match="weights do not fit"):
        load_classifier(tmp_path / "other.pt")
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="expected a neuroexplain-classifier"):
        load_classifier(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable torch checkpoint"):
        load_classifier(tmp_path / "junk.pt")


def test_learns_a_separable_toy_task(tmp_path):
    pre = _toy_preproc(n=40, seed=1)
    m = train_classifier(
        pre,
        tmp_path,
        epochs=8,
        batch_size=4,
        lr=3e-3,
        augment=False,
        seed=0,
        progress=False,
        patience=0,
    )
    assert m["test"]["auc"] >= 0.9


def test_cli_train_classifier(tmp_path):
    torch.save(_toy_preproc(n=12), tmp_path / "preproc.pt")
    out = tmp_path / "clf"
    rc = main(
        [
            "train-classifier",
            "--preproc",
            str(tmp_path / "preproc.pt"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--no-augment",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    assert (out / "model.pt").is_file() and (out / "split.tsv").is_file()
    # reuse of the split; bad options are one-line user errors (exit 2)
    rc = main(
        [
            "train-classifier",
            "--preproc",
            str(tmp_path / "preproc.pt"),
            "--out",
            str(tmp_path / "clf2"),
            "--epochs",
            "1",
            "--split",
            str(out / "split.tsv"),
        ]
    )
    assert rc == 0
    assert (tmp_path / "clf2" / "split.tsv").read_text() == (out / "split.tsv").read_text()
    assert (
        main(
            [
                "train-classifier",
                "--preproc",
                str(tmp_path / "preproc.pt"),
                "--out",
                str(tmp_path / "x"),
                "--arch",
                "nope",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train-classifier",
                "--preproc",
                str(tmp_path / "missing.pt"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train-classifier",
                "--preproc",
                str(tmp_path / "preproc.pt"),
                "--out",
                str(tmp_path / "x"),
                "--val-fraction",
                "0.7",
                "--test-fraction",
                "0.5",
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists() or not (tmp_path / "x" / "model.pt").exists()


def test_batch_augmentation_is_seeded_and_light():
    from neuroexplain.classifier.augment import BatchAugment

    x = torch.zeros(6, 1, 16, 16, 16)
    x[:, :, 4:12, 5:11, 6:10] = 1.0
    x[:, :, 4:6] += 0.5  # asymmetric along axis 0
    assert torch.allclose(
        BatchAugment(rotate_deg=0, translate_vox=0, scale=0, intensity=0)(x), x, atol=1e-5
    )
    flips = BatchAugment(rotate_deg=0, translate_vox=0, scale=0, intensity=0, flip_axis=0, seed=1)(
        x
    )
    flipped = [bool(torch.allclose(f, x[0].flip(1), atol=1e-5)) for f in flips]
    kept = [bool(torch.allclose(f, x[0], atol=1e-5)) for f in flips]
    assert all(a != b for a, b in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)
    a = BatchAugment(seed=3, rotate_deg=5, scale=0.05)(x)
    kw = {"rotate_deg": 5, "scale": 0.05}
    assert torch.equal(a, BatchAugment(seed=3, **kw)(x))
    assert not torch.equal(a, BatchAugment(seed=4, **kw)(x))
    assert (a[:, :, 14:, 14:, 14:] == 0).all()  # background stays 0
    a = BatchAugment(seed=3, intensity=0, **kw)(x)
    # light: mass and centre of mass barely move
    grid = torch.arange(16.0)
    com = lambda v: (v.sum((0, 2, 3)) * grid).sum() / v.sum()  # noqa: E731
    for v, v0 in zip(a, x, strict=True):
        assert abs(float(v.sum() / v0.sum()) - 1) < 0.35
        assert abs(float(com(v) - com(v0))) < 3.0


def test_default_augmentation_shifts_whole_voxels():
    from neuroexplain.classifier.augment import BatchAugment

    x = torch.rand(4, 1, 12, 12, 12)
    out = BatchAugment(intensity=0, seed=0)(x)
    for v, v0 in zip(out, x, strict=True):
        # the output is the input moved by whole voxels: every interior value is an input value
        inner = v[0, 3:-3, 3:-3, 3:-3].flatten()
        nearest = (inner[:, None] - v0.flatten()[None, :]).abs().min(1).values
        assert (nearest < 1e-5).all()


def test_elastic_augmentation_is_a_bounded_smooth_seeded_warp():
    import torch.nn.functional as F

    from neuroexplain.classifier.augment import BatchAugment

    kw = {"rotate_deg": 0, "translate_vox": 0, "scale": 0, "intensity": 0, "prob": 1.0}
    aug = BatchAugment(elastic_vox=1.5, seed=5, **kw)
    disp = aug.random_displacement(4, (20, 20, 20))
    peaks = disp.abs().amax(dim=(1, 2, 3, 4))
    assert disp.shape == (4, 3, 20, 20, 20) and (peaks <= 1.5 + 1e-6).all() and peaks.min() > 0
    # smooth: piecewise linear between 6 lattice points, so neighbouring voxels differ by at
    # most 2 * peak * (6 - 1) / (20 - 1)
    step = (disp[:, :, 1:] - disp[:, :, :-1]).abs().amax(dim=(1, 2, 3, 4))
    assert (step <= 2 * peaks * 5 / 19 + 1e-6).all()
    # the warp pulls each voxel from x + u(x): a linear ramp along axis 2 moves by u there
    ramp = torch.arange(20.0).view(1, 1, 1, 1, 20).expand(4, 1, 20, 20, 20).contiguous()

    class Recording(BatchAugment):
        def random_displacement(self, b, spatial):
            self.last = super().random_displacement(b, spatial)
            return self.last

    rec = Recording(elastic_vox=1.5, seed=5, **kw)
    out = rec(ramp)
    d = rec.last
    inner = (slice(None), 0, slice(3, -3), slice(3, -3), slice(3, -3))
    assert torch.allclose(out[inner], (ramp[:, 0] + d[:, 2])[inner[0:1] + inner[2:]], atol=1e-3)
    assert torch.equal(out, BatchAugment(elastic_vox=1.5, seed=5, **kw)(ramp))
    assert not torch.equal(out, BatchAugment(elastic_vox=1.5, seed=6, **kw)(ramp))
    # off (prob 0 or amplitude 0): the input comes back
    x = F.avg_pool3d(torch.rand(2, 1, 20, 20, 20), 3, 1, 1)
    off = BatchAugment(elastic_vox=1.5, seed=5, **{**kw, "prob": 0.0})(x)
    assert torch.allclose(off, x, atol=1e-5)


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    """kill -9 mid-training, rerun the same command: it resumes and ends bitwise identical."""
    import os
    import signal
    import subprocess
    import sys
    import time

    torch.save(_toy_preproc(n=40, size=24, seed=3), tmp_path / "preproc.pt")

    def cmd(out):
        return [
            sys.executable, "-m", "neuroexplain", "train-classifier",
            "--preproc", str(tmp_path / "preproc.pt"), "--out", str(out),
            "--epochs", "8", "--patience", "0", "--batch-size", "4", "--threads", "1",
        ]  # fmt: skip

    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), check=True, env=env, capture_output=True)
    assert not (ref / "train_state.pt").exists()  # removed once the outputs are written

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "train_state.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists()  # killed before the end
    killed_at = _state(out / "train_state.pt")["epoch"]
    assert 1 <= killed_at < 8

    done = subprocess.run(cmd(out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"after epoch {killed_at}" in done.stderr  # it really resumed
    a, b = _state(ref / "model.pt"), _state(out / "model.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (ref / "logits.tsv").read_bytes() == (out / "logits.tsv").read_bytes()
    log_a = pd.read_csv(ref / "train_log.tsv", sep="\t").drop(columns="seconds")
    log_b = pd.read_csv(out / "train_log.tsv", sep="\t").drop(columns="seconds")
    pd.testing.assert_frame_equal(log_a, log_b)


def test_training_that_cannot_fit_in_memory_is_refused_up_front(tmp_path, monkeypatch):
    torch.save(_toy_preproc(n=12), tmp_path / "preproc.pt")
    monkeypatch.setenv("NEUROEXPLAIN_MEMORY_LIMIT_MB", "1")
    out = tmp_path / "clf"
    args = ["train-classifier", "--preproc", str(tmp_path / "preproc.pt"), "--out", str(out)]
    assert main(args) == 2
    assert not out.exists()  # nothing written
    monkeypatch.setenv("NEUROEXPLAIN_MEMORY_LIMIT_MB", "100000")
    assert main([*args, "--epochs", "1", "--no-augment"]) == 0


def test_cosine_schedule_warms_up_decays_and_is_logged(tmp_path):
    from neuroexplain.classifier.train import TrainConfig, lr_at

    cfg = TrainConfig(lr=1e-2, epochs=5, lr_schedule="cosine")
    rates = [lr_at(cfg, s, 4) for s in range(20)]
    assert rates[0] == pytest.approx(1e-3)  # warm-up starts at lr / 10
    assert rates[4] == pytest.approx(1e-2)  # peak after the first epoch
    assert all(a >= b for a, b in itertools.pairwise(rates[4:]))  # then decays
    assert rates[-1] < 1e-3 and lr_at(cfg, 20, 4) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainConfig(lr=1e-2), 17, 4) == 1e-2
    with pytest.raises(InputError, match="--lr-schedule"):
        TrainConfig(lr_schedule="step")

    pre = _toy_preproc(n=24, seed=2)
    train_classifier(
        pre, tmp_path, epochs=3, batch_size=4, lr=1e-2, lr_schedule="cosine",
        augment=False, seed=0, progress=False, patience=0,
    )  # fmt: skip
    log = pd.read_csv(tmp_path / "train_log.tsv", sep="\t")
    # the rate of each epoch's last step: full after the warm-up epoch, then decaying
    assert log["lr"].iloc[0] < 1e-2 and log["lr"].iloc[1] > log["lr"].iloc[2]


def _weak_linear_preproc(n: int = 48, size: int = 16, seed: int = 3) -> dict:
    """A distributed, weak voxel-wise signal: easy for a linear model, not for 1 tiny step."""
    pre = _toy_preproc(n=n, size=size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    y = pre["y"].numpy()
    images = rng.normal(0.3, 0.1, size=(n, 1, size, size, size)).astype(np.float32)
    pattern = (rng.random((size, size, size)) < 0.15).astype(np.float32) * 0.06
    images[y == 1, 0] += pattern
    pre["images"] = torch.tensor(images)
    return pre


@pytest.mark.parametrize("fallback", [False, True])
def test_reference_ensemble_is_one_module_combining_the_two_logits(tmp_path, fallback):
    """The final model = w_m * trained + w_r * reference, as saved, reloaded and recorded."""
    from neuroexplain.classifier.train import ensemble_weights
    from neuroexplain.evaluate.quality import fit_linear_reference

    pre = _weak_linear_preproc()
    common = dict(epochs=1, batch_size=8, lr=1e-7, augment=False, progress=False, seed=0)
    never = train_classifier(
        pre, tmp_path / "never", reference_fallback=fallback, reference_ensemble="never", **common
    )
    ens = train_classifier(
        pre, tmp_path / "ens", reference_fallback=fallback, reference_ensemble="always", **common
    )
    trained = "cnn+linear" if fallback else "cnn"
    assert never["model"] == trained and ens["model"] == "ensemble"
    sel = ens["final_selection"]
    assert sel["choice"] == "ensemble" and sel["trained_model"] == trained
    assert sel["val_difference"] is not None and sel["max_abs_logit_diff"] < 1e-4
    # the ensemble's logits are the combination of the trained model's and the reference's
    split = pd.read_csv(tmp_path / "ens" / "split.tsv", sep="\t")
    parts = {s: np.flatnonzero(split["split"].to_numpy() == s) for s in ("train", "val", "test")}
    _, ref_model = fit_linear_reference(pre["images"], pre["y"].numpy(), parts, seed=0)
    lr = ref_model.decision_function(pre["images"])
    lm = pd.read_csv(tmp_path / "never" / "logits.tsv", sep="\t")["logit"].to_numpy()
    w_m, w_r = ensemble_weights(np.std(lm[parts["train"]]), np.std(lr[parts["train"]]))
    assert sel["weights"] == pytest.approx({"model": w_m, "reference": w_r}, rel=1e-4)
    le = pd.read_csv(tmp_path / "ens" / "logits.tsv", sep="\t")["logit"].to_numpy()
    np.testing.assert_allclose(le, w_m * lm + w_r * lr, rtol=1e-4, atol=1e-4)
    assert ens["test"]["auc"] == sel["auc"]["ensemble"]["test"]
    assert sel["auc"]["trained"]["val"] == never["val"]["auc"]
    assert sel["auc"]["reference"]["test"] == ens["reference"]["test"]["auc"]
    # one module, rebuilt by the checkpoint loader (weights_only), with the same logits
    raw = torch.load(tmp_path / "ens" / "model.pt", weights_only=True)
    assert raw["model_kwargs"]["linear_reference"] is True
    model, _ = load_classifier(tmp_path / "ens" / "model.pt")
    with torch.no_grad():
        again = model(pre["images"])[:, 0].double().numpy()
    np.testing.assert_allclose(again, le, rtol=1e-4, atol=1e-4)
    # classifier.explain: trained (default): the explanation stages load the trained model,
    # its logits and metrics are recorded beside the ensemble's, and the gate judges it
    _check_explained_is_the_trained_model(tmp_path / "ens", pre, lm, never, trained)


def _check_explained_is_the_trained_model(run, pre, lm, never, trained):
    from neuroexplain.evaluate.quality import check_classifier_quality
    from neuroexplain.simulator.train import read_logits
    from neuroexplain.stage import load_mri_context

    logits = pd.read_csv(run / "logits.tsv", sep="\t")
    np.testing.assert_allclose(logits["explained_logit"].to_numpy(), lm, rtol=1e-4, atol=1e-4)
    assert np.allclose(read_logits(run / "logits.tsv")["logit"].to_numpy(), lm, atol=1e-4)
    model, ckpt = load_classifier(run / "model.pt", explained=True)
    assert ckpt["explained_model"] == trained
    with torch.no_grad():
        np.testing.assert_allclose(model(pre["images"])[:, 0].numpy(), lm, rtol=1e-4, atol=1e-4)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["explained"]["model"] == trained
    assert metrics["explained"]["val"]["auc"] == never["val"]["auc"]
    assert metrics["final_selection"]["explained"] == trained
    summary = check_classifier_quality(metrics, 0.0, source=run / "metrics.json")
    assert summary["auc"] == metrics["explained"]["test"]["auc"] and summary["model"] == trained
    torch.save(pre, run / "preproc.pt")
    ctx = load_mri_context(run / "preproc.pt", run / "model.pt")
    assert ctx.checkpoint["explained_model"] == trained
    with torch.no_grad():
        np.testing.assert_allclose(ctx.model(pre["images"])[:, 0].numpy(), lm, atol=1e-4)


def test_explain_final_keeps_one_model_in_the_checkpoint(tmp_path):
    pre = _weak_linear_preproc()
    common = dict(epochs=1, batch_size=8, lr=1e-7, augment=False, progress=False, seed=0)
    m = train_classifier(pre, tmp_path, reference_ensemble="always", explain="final", **common)
    assert m["model"] == "ensemble" and "explained" not in m
    assert m["final_selection"]["explained"] == "ensemble"
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "explained" not in raw
    assert "explained_logit" not in pd.read_csv(tmp_path / "logits.tsv", sep="\t").columns
    _, ckpt = load_classifier(tmp_path / "model.pt", explained=True)
    assert ckpt["explained_model"] == "final"


def test_select_final_keeps_the_model_only_when_validation_separates_it():
    from neuroexplain.classifier.train import ensemble_weights, select_final

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(20), np.ones(20)]
    perfect = y * 4 + rng.normal(0, 0.1, 40)
    weak = y * 0.3 + rng.normal(0, 1, 40)
    close = y * 4 + rng.normal(0, 1.5, 40)
    # clearly better on validation: the model alone
    sep = select_final(y, perfect, weak, rule="separated")
    assert sep["choice"] == "model" and sep["difference"]["low"] > 0
    # indistinguishable on validation: the ensemble
    tie = select_final(y, close, perfect, rule="separated")
    assert tie["choice"] == "ensemble" and tie["difference"]["low"] <= 0
    # the reference clearly better: the ensemble too
    assert select_final(y, weak, perfect, rule="separated")["choice"] == "ensemble"
    assert select_final(y, perfect, weak, rule="always")["choice"] == "ensemble"
    assert select_final(y, weak, perfect, rule="never")["choice"] == "model"
    with pytest.raises(ValueError, match="unknown final-model rule"):
        select_final(y, weak, perfect, rule="best")
    # scale-free: rescaling one model's logits does not change the ensemble's ranking
    w1 = ensemble_weights(np.std(close), np.std(weak))
    w2 = ensemble_weights(np.std(10 * close), np.std(weak))
    np.testing.assert_allclose(
        np.argsort(w1[0] * close + w1[1] * weak), np.argsort(w2[0] * 10 * close + w2[1] * weak)
    )


def test_reference_mode_linear_path_is_the_linear_reference(tmp_path, monkeypatch):
    from neuroexplain.classifier import save_classifier
    from neuroexplain.evaluate import quality

    monkeypatch.setattr(quality, "MAX_REFERENCE_VOXELS", 1000)  # 17³ (odd) pooled by 2 to 8³
    pre = _weak_linear_preproc(n=40, size=17)
    x, y = pre["images"], pre["y"].numpy()
    parts = {"train": np.arange(24), "val": np.arange(24, 32), "test": np.arange(32, 40)}
    ref, ref_model = quality.fit_linear_reference(x, y, parts, seed=0)
    assert ref["pool"] == 2 and 0 < ref["n_features"] <= 8**3
    kwargs = dict(channels=(4, 8), hidden=(6,), linear_pool=2, linear_reference=True)
    model = build_model("small", spatial_size=(17,) * 3, standardize=True, **kwargs)
    model.input_norm.fit(torch.cat([x[:24], x[:24].flip(2)]), eps=0.05)
    model.linear_path.set_reference(ref_model, model.input_norm)
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.zero_()
        logits = model.eval()(x)[:, 0].double().numpy()
    want = ref_model.estimator.decision_function(ref_model.features(x))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    for split in ("train", "val", "test"):
        assert binary_metrics(y[parts[split]], logits[parts[split]])["auc"] == ref[split]["auc"]
    # differentiable: image gradients flow through the inverse standardisation, pool and linear
    xg = x[:2].clone().requires_grad_(True)
    model(xg).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    # a checkpoint rebuilds the reference mode; one written without the flag loads as before
    for name, ref_mode in (("new.pt", True), ("old.pt", False)):
        kw = {**kwargs, "standardize": True}
        if not ref_mode:
            del kw["linear_reference"]
            model = build_model("small", spatial_size=(17,) * 3, **kw).eval()
        save_classifier(
            tmp_path / name, model, arch="small", model_kwargs=kw, input_shape=[1, 17, 17, 17],
            config={}, epoch=0, seed=0, best_metric={},
        )  # fmt: skip
        back, _ = load_classifier(tmp_path / name)
        assert back.linear_path.reference is ref_mode
        assert ("linear_path.feature_sd" in back.state_dict()) is ref_mode
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x))


def test_reference_fallback_gives_the_cnn_a_reference_initialised_linear_path(tmp_path):
    pre = _weak_linear_preproc()
    common = dict(epochs=1, batch_size=8, lr=1e-7, augment=False, progress=False, seed=0)
    common["reference_ensemble"] = "never"  # the phases' own model (the ensemble: below)
    metrics = train_classifier(pre, tmp_path / "fb", reference_fallback=True, **common)
    ref_val = metrics["reference"]["val"]["auc"]
    assert ref_val >= 0.9  # the data hold a linear signal
    cnn, linear = metrics["phases"]
    assert cnn["name"] == "cnn" and cnn["val_auc"] < ref_val - 0.03  # a CNN that learned nothing
    # the linear phase starts as the reference itself: its C, its val AUC, its logits
    init = linear["linear_init"]
    assert linear["name"] == "cnn+linear" and init["source"] == "linear_reference"
    assert init["C"] == metrics["reference"]["C"] and init["val_auc"] == ref_val
    assert init["max_abs_logit_diff"] < 1e-4
    log = pd.read_csv(tmp_path / "fb" / "train_log.tsv", sep="\t")
    epoch0 = log[(log["phase"] == "cnn+linear") & (log["epoch"] == 0)]
    assert epoch0["val_auc"].tolist() == [ref_val]
    # a later epoch replaces it only with a strictly higher val AUC (not a lower loss at a tie)
    later = log[(log["phase"] == "cnn+linear") & (log["epoch"] > 0)]
    assert later["val_auc"].max() <= ref_val and linear["best_epoch"] == 0
    assert metrics["model"] == "cnn+linear" and linear["val_auc"] >= ref_val
    assert metrics["val"]["auc"] >= ref_val
    # kept at its epoch 0, the model is the linear reference itself, and metrics.json says so
    assert metrics["trained_is_linear_reference"] is True
    # ... and its CNN path carries none of the logit (its logit layer is still zero)
    assert metrics["cnn_logit_share"] == 0.0
    sd = metrics["final_selection"]["logit_sd_train"]
    assert sd["cnn_path"] == 0.0 and sd["linear_path"] > 0
    # the checkpoint rebuilds the model with its linear path and gives the logits written
    model, ckpt = load_classifier(tmp_path / "fb" / "model.pt")
    assert ckpt["model_kwargs"]["linear_pool"] == metrics["reference"]["pool"]
    assert ckpt["model_kwargs"]["linear_reference"] is True and model.linear_path.reference
    logits = pd.read_csv(tmp_path / "fb" / "logits.tsv", sep="\t")["logit"].to_numpy()
    with torch.no_grad():
        again = model(pre["images"])[:, 0].numpy()
    np.testing.assert_allclose(again, logits, rtol=1e-4, atol=1e-4)
    assert set(pd.read_csv(tmp_path / "fb" / "train_log.tsv", sep="\t")["phase"]) == {
        "cnn",
        "cnn+linear",
    }
    # deterministic: the same seed gives the same model
    again = train_classifier(pre, tmp_path / "again", reference_fallback=True, **common)
    assert (tmp_path / "fb" / "logits.tsv").read_bytes() == (
        tmp_path / "again" / "logits.tsv"
    ).read_bytes()
    assert again["phases"][1]["linear_init"] == init and again["val"] == metrics["val"]
    # off: the CNN alone, whatever its AUC
    off = train_classifier(pre, tmp_path / "off", reference_fallback=False, **common)
    assert [p["name"] for p in off["phases"]] == ["cnn"] and off["model"] == "cnn"
    assert not (tmp_path / "fb" / "train_state_linear.pt").exists()
