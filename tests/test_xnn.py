"""XNN: SRAE losses, training, feature attribution, metrics and the command line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from _toy3d import SIZE, shared_cohort, write_cohort

from neuroexplain.classifier import build_model
from neuroexplain.cli import main
from neuroexplain.xnn import (
    SRAE,
    LayerFeatures,
    SRAEConfig,
    SRAELoss,
    XNNExplainer,
    default_layer,
    explanation_metrics,
    load_srae,
    pull_away_loss,
    r2_score,
    save_srae,
    significant_features,
    sparse_reconstruction_loss,
    train_srae,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ losses


def test_pull_away_term_is_zero_for_orthogonal_features_and_one_for_parallel():
    x = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]])
    w = torch.tensor([0.5, -2.0, 1.0])
    assert float(pull_away_loss(x, w)) == pytest.approx(0.0, abs=1e-7)
    same = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5]])
    assert float(pull_away_loss(same, torch.tensor([1.0, -3.0]))) == pytest.approx(1.0, abs=1e-5)
    # reference: mean over i != j of cos^2 between columns of x * w
    g = torch.Generator().manual_seed(0)
    r = torch.rand(7, 4, generator=g)
    wr = torch.tensor([1.0, -0.5, 2.0, 0.3])
    z = (r * wr).numpy()
    cos = [
        (z[:, i] @ z[:, j] / np.linalg.norm(z[:, i]) / np.linalg.norm(z[:, j])) ** 2
        for i in range(4) for j in range(4) if i != j
    ]  # fmt: skip
    assert float(pull_away_loss(r, wr)) == pytest.approx(np.mean(cos), rel=1e-5)


def test_sparse_reconstruction_loss_formula():
    a = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.5, 0.0]])
    b = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    for q in (0.1, 1.0, 5.0):
        ref = np.mean(np.log(1 + q * (a.numpy() - b.numpy()) ** 2))
        assert float(sparse_reconstruction_loss(a, b, q)) == pytest.approx(ref, rel=1e-6)
    assert float(sparse_reconstruction_loss(a, a)) == 0.0
    # robust: a huge error costs only logarithmically more
    big = sparse_reconstruction_loss(torch.tensor([[100.0]]), torch.zeros(1, 1))
    assert float(big) < 10


def test_srae_loss_combines_the_weighted_terms():
    g = torch.Generator().manual_seed(0)
    x, a, ah = (
        torch.rand(5, 3, generator=g),
        torch.rand(5, 4, generator=g),
        torch.rand(5, 4, generator=g),
    )
    y, yh, w = torch.rand(5, generator=g), torch.rand(5, generator=g), torch.rand(3, generator=g)
    total, parts = SRAELoss(2.0, 0.5, 3.0, q=2.0)(x, yh, ah, y, a, w)
    assert float(parts["pred"]) == pytest.approx(float(((yh - y) ** 2).mean()))
    assert float(parts["rec"]) == pytest.approx(float(sparse_reconstruction_loss(a, ah, 2.0)))
    assert float(parts["pt"]) == pytest.approx(float(pull_away_loss(x, w)))
    assert float(total) == pytest.approx(
        2 * float(parts["pred"]) + 0.5 * float(parts["rec"]) + 3 * float(parts["pt"])
    )


def test_r2_and_significant_features():
    assert r2_score([1, 2, 3], [1, 2, 3]) == 1.0
    assert r2_score([1, 2, 3], [2, 2, 2]) == pytest.approx(0.0)
    assert np.isnan(r2_score([1, 1], [0, 2]))
    c = np.array([[3.0, 1.0, 0.0], [5.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-2.0, -2.0, 0.1]])
    sig = significant_features(c, 0.9)
    assert sig[0].tolist() == [True, True, False]  # 3 < 0.9 * 4 <= 3 + 1
    assert sig[1].tolist() == [True, False, False]  # 5 >= 0.9 * 4.5
    assert sig[2].tolist() == [False, False, False]  # nothing to explain
    assert sig[3].tolist() == [True, True, False]  # negative logit: the negative pushes


# ---------------------------------------------------------------------------------- training


def _toy_activations(n: int, seed: int = 0):
    """32-dim activations from 3 latent factors; the 'logit' is linear in two of them."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    mix = torch.randn(3, 32, generator=torch.Generator().manual_seed(99))
    acts = torch.relu(z @ mix + 0.5) + 0.01 * torch.randn(n, 32, generator=g)
    logits = acts @ torch.linspace(-0.2, 0.3, 32)
    return acts, logits - logits.mean()


def test_srae_is_faithful_on_a_toy_problem_and_deterministic():
    acts, logits = _toy_activations(200)
    test_a, test_l = _toy_activations(100, seed=1)
    test_l = test_l + (logits.mean() - logits.mean())  # same centring constant (zero)
    cfg = SRAEConfig(n_features=4, epochs=400, lr=1e-2, seed=3)
    srae, hist = train_srae(acts, logits, cfg, progress=False)
    with torch.no_grad():
        _, y_hat, _ = srae(test_a)
    assert r2_score(test_l.numpy(), y_hat.numpy()) >= 0.9
    assert hist["total"][-1] < hist["total"][0]
    m = explanation_metrics(srae, test_a, test_l)
    assert m["decision_agreement"] >= 0.9 and m["r2"] >= 0.9
    assert 0 <= m["orthogonality"] <= 1 and 0 < m["sparsity"] <= 4
    again, _ = train_srae(acts, logits, cfg, progress=False)
    for k, v in srae.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_reweighting_retries_when_too_few_features_carry_the_prediction():
    acts, logits = _toy_activations(60)
    cfg = SRAEConfig(n_features=2, epochs=20, min_features=3, max_retries=2, alpha_pt=0.1)
    _, hist = train_srae(acts, logits, cfg, progress=False)
    att = hist["attempts"]
    assert len(att) == 3  # impossible to reach 3 of 2 features: every retry is used
    assert [a["alpha_pt"] for a in att] == pytest.approx([0.1, 1.0, 10.0])
    assert [a["seed"] for a in att] == [0, 1, 2]


def test_usage_balance_loss_penalises_small_shares_and_revives_dead_units():
    from neuroexplain.xnn import usage_balance_loss

    x = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 1.0, 3.0, 0.0]])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # feature 3 is zero: share 0 -> (s0 - 0) / s0 = 1, averaged over 4 features
    assert float(usage_balance_loss(x, w)) == pytest.approx(0.25)
    assert float(usage_balance_loss(x[:, :3], w[:3])) == 0.0  # shares 0.22-0.44 > 0.25 / 3
    assert float(usage_balance_loss(x[:, :1], w[:1])) == 0.0  # one feature: nothing to balance
    # a zero head weight is as unused as a zero feature
    assert float(usage_balance_loss(x[:, :3], torch.tensor([1.0, 1.0, 0.0]))) > 0
    pre = torch.tensor([[0.5, 0.2, 0.1, -2.0], [1.0, 0.3, 0.2, -1.0]], requires_grad=True)
    loss = usage_balance_loss(torch.relu(pre), w, pre)
    assert loss.item() == pytest.approx(0.25 + 1.0)  # + max(0, -max pre) of the dead unit
    loss.backward()
    assert pre.grad[:, 3].abs().sum() > 0  # the dead unit gets a gradient


def test_usage_balance_keeps_every_feature_in_use_and_the_srae_faithful():
    """Without the balance term the pull-away term lets a redundant feature drop out (head
    weight ~0: usage 0, an all-zero map); with it every feature carries part of the logit."""
    acts, logits = _toy_activations(200)
    test_a, test_l = _toy_activations(100, seed=1)
    usage = {}
    for alpha_use in (0.0, 0.3):
        cfg = SRAEConfig(n_features=5, epochs=2000, seed=1, max_retries=0, alpha_use=alpha_use)
        srae, hist = train_srae(acts, logits, cfg, progress=False)
        usage[alpha_use] = np.asarray(hist["attempts"][0]["usage"])
        m = explanation_metrics(srae, test_a, test_l)
        assert m["r2"] >= 0.95 and m["decision_agreement"] >= 0.95, (alpha_use, m)
    assert usage[0.0].min() < 0.05  # a feature unused without the balance term
    assert usage[0.3].min() >= 0.05, usage[0.3]  # every feature used by >= 5 % of samples
    assert "use" in hist and hist["use"][-1] < hist["use"][0] + 1e-9


def test_srae_checkpoint_roundtrip(tmp_path):
    srae = SRAE(10, 3)
    srae.set_stats(torch.rand(20, 10), torch.rand(20))
    cfg = SRAEConfig(n_features=3, epochs=1)
    save_srae(tmp_path / "srae.pt", srae, config=cfg, extra={"layer": "classifier.2"})
    ckpt = torch.load(tmp_path / "srae.pt", weights_only=True)
    assert ckpt["layer"] == "classifier.2"
    back, _ = load_srae(tmp_path / "srae.pt")
    x = torch.rand(4, 10)
    torch.testing.assert_close(back(x)[1], srae.eval()(x)[1])


# ------------------------------------------------------------------------------ attribution


def test_default_layer_and_pooling():
    net = build_model("small", spatial_size=(SIZE,) * 3, channels=(4, 8), hidden=(6,)).eval()
    assert default_layer(net) == "classifier.2"  # the dropout feeding the logit layer
    # a reference-fallback model: its linear path reads the input, the layer stays the CNN's
    fallback = build_model(
        "small", spatial_size=(SIZE,) * 3, channels=(4, 8), hidden=(6,), linear_pool=2
    )
    assert default_layer(fallback.eval()) == "classifier.2"
    x = torch.rand(2, 1, SIZE, SIZE, SIZE)
    assert LayerFeatures(net, "classifier.2")(x).shape == (2, 6)
    assert LayerFeatures(net, "features.1", "avg")(x).shape == (2, 8)
    assert LayerFeatures(net, "features.1", "flatten")(x).shape == (2, 8 * 4**3)
    with pytest.raises(ValueError, match="choose a pooling"):
        LayerFeatures(net, "features.1", "none")(x)


def test_feature_maps_satisfy_ig_completeness():
    torch.manual_seed(0)
    net = build_model("small", spatial_size=(SIZE,) * 3, channels=(4, 8), hidden=(6,)).eval()
    srae = SRAE(6, 3)
    srae.set_stats(torch.rand(10, 6), torch.randn(10))
    srae.eval()
    x = torch.rand(1, 1, SIZE, SIZE, SIZE)
    ex = XNNExplainer(net, srae, layer="classifier.2", method="ig", n_steps=64)
    maps = ex.attribute_all(x)
    assert maps.shape == (1, 3, SIZE, SIZE, SIZE)
    feats = LayerFeatures(net, "classifier.2")
    with torch.no_grad():
        c_x = srae.contributions(feats(x))[0]
        c_0 = srae.contributions(feats(torch.zeros_like(x)))[0]
    for i in range(3):
        assert float(maps[0, i].sum()) == pytest.approx(
            float(c_x[i] - c_0[i]), abs=0.05 * (abs(float(c_x[i] - c_0[i])) + 0.05)
        )
    gx = XNNExplainer(net, srae, layer="classifier.2", method="gradxinput").attribute(x, 1)
    assert gx.shape == x.shape


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def toy():
    return shared_cohort()


def test_cli_xnn_train_and_explain(toy, tmp_path):
    out = tmp_path / "xnn"
    base = ["--preproc", str(toy["preproc"]), "--checkpoint", str(toy["model"])]
    assert main(["xnn-train", *base, "--out", str(out), "--epochs", "300", "-k", "3"]) == 0
    train = json.loads((out / "srae_train.json").read_text())
    assert train["layer"] == "classifier.0"  # no hidden dense layer: the flattened features
    assert train["metrics"]["train"]["r2"] > 0.9
    assert (out / "srae.pt").is_file() and (out / "srae_train_log.tsv").is_file()
    assert (
        main(
            [
                "xnn-explain",
                *base,
                "--srae",
                str(out / "srae.pt"),
                "--out",
                str(out),
                "--subjects",
                "sub-34,sub-35",
                "--method",
                "gradxinput",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "xnn_metrics.json").read_text())
    assert set(metrics["metrics"]) >= {"train", "test"}
    for key in (
        "r2",
        "rmse",
        "decision_agreement",
        "reconstruction_mse",
        "orthogonality",
        "sparsity",
    ):
        assert key in metrics["metrics"]["test"]
    maps = sorted((out / "sub-35").glob("*_map.nii.gz"))
    assert [p.name for p in maps] == [f"sub-35_desc-xnnfeature{i}_map.nii.gz" for i in (1, 2, 3)]
    t1 = nib.load(toy["root"] / "bids" / "sub-35" / "anat" / "sub-35_T1w.nii.gz")
    assert nib.load(maps[0]).shape == t1.shape
    feats = (out / "xnn_features.tsv").read_text().splitlines()
    assert len(feats) == 37 and "xnnfeature1_contribution" in feats[0]
    from neuroexplain.stage import read_maps_manifest

    man = read_maps_manifest(out)  # the folder's maps.json
    assert man.stage == "xnn-explain" and man.primary == [f"xnnfeature{i}" for i in (1, 2, 3)]
    assert set(man.methods.values()) == {"feature-attribution"}
    listed = {f for files in man.files.values() for f in files.values()}
    assert listed == set(out.glob("sub-*/*_map.nii.gz")) and len(listed) == 6
    # an SRAE of another checkpoint is refused
    other = write_cohort(tmp_path / "other", n=6, epochs=1)
    code = main(
        [
            "xnn-explain",
            "--preproc",
            str(toy["preproc"]),
            "--checkpoint",
            str(other["model"]),
            "--srae",
            str(out / "srae.pt"),
            "--out",
            str(tmp_path / "o"),
            "--split",
            str(toy["split"]),
        ]
    )
    assert code == 2
