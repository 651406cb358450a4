"""TCAV and spatial concept vectors (SACV) on toy 3D networks and synthetic activations."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from _toy3d import CONCEPTS_YAML, SIZE, shared_cohort
from torch import nn

from neuroexplain.classifier import build_model
from neuroexplain.cli import main
from neuroexplain.concepts3d import (
    CAV,
    SACV,
    TCAV,
    CAVStore,
    Concept,
    StaleCacheError,
    layer_activations,
    layer_gradients,
    load_concept_config,
    random_concepts,
    spatial_vectors,
    tcav_score,
    tcav_significance,
    train_cav,
)
from neuroexplain.concepts3d.concepts import build_concept, region_mask
from neuroexplain.concepts3d.sacv import layer_mask, upsample
from neuroexplain.concepts3d.tcav import (
    adjust_p_values,
    apply_correction,
    effect_sizes,
    summarize_experiment,
)
from neuroexplain.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ hooks


def test_hooks_by_dotted_name_match_a_manual_forward():
    torch.manual_seed(0)
    net = build_model("small", spatial_size=(SIZE,) * 3, channels=(4, 8)).eval()
    x = torch.rand(3, 1, SIZE, SIZE, SIZE)
    acts = layer_activations(
        net, x, ["features.0", "features.1.conv", "classifier.1"], batch_size=2
    )
    with torch.no_grad():
        f0 = net.features[0](x)
        conv1 = net.features[1].conv(f0)
        h = net.classifier[1](net.classifier[0](net.features(x).flatten(1)))
    assert acts["features.0"].shape == (3, 4, 8, 8, 8)
    torch.testing.assert_close(acts["features.0"], f0)
    torch.testing.assert_close(acts["features.1.conv"], conv1)
    torch.testing.assert_close(acts["classifier.1"], h)
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed
    with pytest.raises(ValueError, match=r"no layer named 'features\.9'"):
        layer_activations(net, x, ["features.9"])


def test_layer_gradients_of_the_logit_are_the_head_weights():
    """logit = W relu(h) + b, so d logit / d relu(h) = W for every input (sign flips it)."""
    torch.manual_seed(1)
    net = build_model("small", spatial_size=(SIZE,) * 3, channels=(4, 8), hidden=(6,)).eval()
    x = torch.rand(4, 1, SIZE, SIZE, SIZE)
    _, grads, logits = layer_gradients(net, x, "classifier.1", batch_size=3)
    w = net.classifier[3].weight.detach()[0]
    torch.testing.assert_close(grads, w.expand(4, -1))
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x)[:, 0])
    _, g_neg, l_neg = layer_gradients(net, x, "classifier.1", sign=-1.0)
    torch.testing.assert_close(g_neg, -grads)
    torch.testing.assert_close(l_neg, -logits)


def test_layer_gradients_from_the_layer_equal_those_of_the_whole_graph():
    """The graph starts at the layer (no memory for the layers before it): activations,
    gradients and logits are bit for bit those of a backward pass through the whole network,
    and the model's parameters and hooks are left as they were."""
    from neuroexplain.concepts3d.activations import LayerHooks

    torch.manual_seed(2)
    net = build_model("small", spatial_size=(SIZE,) * 3, channels=(4, 8)).eval()
    net.features[0].conv.bias.requires_grad_(False)  # a frozen parameter stays frozen
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.rand(5, 1, SIZE, SIZE, SIZE)
    for layer in ("features.0", "features.1", "classifier.1"):
        acts, grads, logits = [], [], []
        with torch.enable_grad(), LayerHooks(net, [layer], keep_graph=True) as hooks:
            for xb in x.split(2):
                out = -net(xb)[:, 0]
                (g,) = torch.autograd.grad(out.sum(), hooks.outputs[layer])
                acts.append(hooks.outputs[layer].detach())
                grads.append(g)
                logits.append(out.detach())
        got = layer_gradients(net, x, layer, sign=-1.0, batch_size=2)
        for a, b in zip(got, (torch.cat(acts), torch.cat(grads), torch.cat(logits)), strict=True):
            assert torch.equal(a, b), layer
        assert [p.requires_grad for p in net.parameters()] == flags
        assert not any(m._forward_hooks for m in net.modules())


# ------------------------------------------------------------------------------------- CAVs


def test_cav_on_separable_activations_is_accurate_and_aligned():
    rng = np.random.default_rng(0)
    e0 = np.zeros(40)
    e0[0] = 1.0
    pos = rng.normal(size=(30, 40)) + 4 * e0
    neg = rng.normal(size=(30, 40))
    res = train_cav(pos, neg, seed=0)
    assert res["accuracy"] >= 0.95
    assert res["n_test"] > 0
    assert float(res["vector"].norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(res["vector"][0]) > 0.8
    # the decision function separates the classes in activation units
    dec = torch.from_numpy(np.r_[pos, neg].astype(np.float32)) @ res["weights"] + res["intercept"]
    assert (dec[:30] > 0).float().mean() >= 0.95 and (dec[30:] < 0).float().mean() >= 0.95


def test_cav_span_reduction_matches_full_space_fit():
    """More dimensions than examples: fitting in the span of the rows is exact."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    pos = rng.normal(size=(12, 300)) + 0.3
    neg = rng.normal(size=(12, 300))
    res = train_cav(pos, neg, seed=0, test_fraction=0.0)
    x = np.r_[pos, neg]
    y = np.r_[np.ones(12), np.zeros(12)]
    scale = x.std()
    ref = LogisticRegression(
        C=1.0,
        class_weight="balanced",
        solver="liblinear",
        intercept_scaling=10.0,
        max_iter=5000,
        tol=1e-8,
    ).fit(x / scale, y)
    v = ref.coef_[0] / np.linalg.norm(ref.coef_[0])
    assert float(np.dot(v, res["vector"].numpy())) > 0.999


def test_tcav_score_of_a_concept_along_the_gradient_is_one():
    rng = np.random.default_rng(0)
    u = rng.normal(size=16)
    grads = torch.from_numpy(np.tile(u, (10, 1)) + 0.1 * rng.normal(size=(10, 16)))
    pos = rng.normal(size=(25, 16)) + 3 * u / np.linalg.norm(u)
    neg = rng.normal(size=(25, 16))
    v = train_cav(pos, neg, seed=0)["vector"]
    sc = tcav_score(grads.float(), v)
    assert sc["sign_count"] == 1.0
    assert sc["magnitude"] == pytest.approx(1.0)
    assert tcav_score(grads.float(), -v)["sign_count"] == 0.0


def test_significance_edge_cases():
    assert tcav_significance([1.0] * 5, [1.0] * 5) == 1.0
    assert tcav_significance([1.0] * 5, [0.0] * 5) == 0.0
    assert tcav_significance([0.9, 1.0, 1.0, 0.95], [0.1, 0.6, 0.3, 0.8]) < 0.05
    assert np.isnan(tcav_significance([1.0], [0.0, 1.0]))
    # Mann-Whitney: constant but different groups give its smallest p, not 0
    assert 0 < tcav_significance([1.0] * 10, [0.0] * 10, "mannwhitney") < 1e-3
    assert tcav_significance([1.0] * 5, [1.0] * 5, "mannwhitney") == 1.0
    # one outlying run does not decide it (it would with a t-test of a tight group)
    a, b = [0.5, 0.52, 0.48, 0.51, 0.49, 0.5], [0.5, 0.51, 0.49, 0.5, 0.52, 0.48]
    assert tcav_significance(a, b, "mannwhitney") > 0.5
    with pytest.raises(ValueError, match="unknown test"):
        tcav_significance(a, b, "ks")


def test_effect_sizes_and_p_value_corrections():
    e = effect_sizes([1.0, 1.0, 0.9], [0.2, 0.4, 0.9])
    assert e["score_difference"] == pytest.approx(0.9666667 - 0.5)
    assert e["rank_biserial"] == pytest.approx(8 / 9)  # 8 wins, 1 tie, no loss of 9 pairs
    assert np.isnan(effect_sizes([1.0, 1.0], [0.0, 0.0])["cohens_d"])  # no spread
    p = [0.01, 0.04, 0.03, float("nan"), 0.2]
    assert np.allclose(adjust_p_values(p, "bonferroni")[[0, 1, 2, 4]], [0.04, 0.16, 0.12, 0.8])
    # Holm: sorted 0.01*4, 0.03*3, 0.04*2, 0.2*1 made monotone
    assert np.allclose(adjust_p_values(p, "holm")[[0, 1, 2, 4]], [0.04, 0.09, 0.09, 0.2])
    # Benjamini-Hochberg: p * m / rank, monotone from the top
    assert np.allclose(adjust_p_values(p, "bh")[[0, 1, 2, 4]], [0.04, 0.0533333, 0.0533333, 0.2])
    assert np.isnan(adjust_p_values(p, "holm")[3])
    assert np.allclose(adjust_p_values(p, "none")[[0, 4]], [0.01, 0.2])
    assert adjust_p_values([0.9, 0.8], "bonferroni").max() == 1.0
    with pytest.raises(ValueError, match="unknown correction"):
        adjust_p_values(p, "fdr")


def test_a_concept_whose_cavs_do_not_classify_is_never_significant():
    """Parallel CAVs of a fixed meaningless concept give constant scores (tiny p); the held-out
    accuracy check keeps them from being called significant."""
    randoms = [f"r{i}" for i in range(6)]
    scores = {}
    for i, r in enumerate(randoms[1:]):
        scores[f"c-{r}"] = {"l": {"sign_count": 0.0, "magnitude": 0.0, "accuracy": 0.5}}
        scores[f"good-{r}"] = {"l": {"sign_count": 1.0, "magnitude": 1.0, "accuracy": 0.9}}
        scores[f"r0-{r}"] = {"l": {"sign_count": [0.2, 0.5, 0.4, 0.3, 0.6][i], "magnitude": 0.5,
                                   "accuracy": 0.5}}  # fmt: skip
    bad = summarize_experiment(scores, "c", randoms, "l", alpha=0.01)
    assert bad["p_value"] < 0.01 and not bad["cav_valid"] and not bad["significant"]
    assert bad["verdict"] == "inconclusive" and "CAV accuracy 0.50" in bad["verdict_reason"]
    assert summarize_experiment(scores, "c", randoms, "l", min_accuracy=0)["significant"]
    good = summarize_experiment(scores, "good", randoms, "l", alpha=0.01)
    assert good["cav_valid"] and good["significant"] and good["cav_accuracy"] == 0.9
    assert good["verdict"] == "significant" and good["p_adjusted"] == good["p_value"]
    assert good["rank_biserial"] == 1.0 and good["score_difference"] == pytest.approx(0.6)
    # the family of two tests: the adjusted p-values are larger, the raw ones are kept
    rows = apply_correction([bad, good], method="bonferroni", alpha=0.01)
    assert rows[1]["p_adjusted"] == pytest.approx(2 * rows[1]["p_value"])
    assert rows[1]["n_tests"] == 2 and rows[1]["correction"] == "bonferroni"
    assert rows[1]["verdict"] == "significant" and rows[0]["verdict"] == "inconclusive"
    mw = summarize_experiment(scores, "good", randoms, "l", alpha=0.01, test="mannwhitney")
    # 5 vs 5 runs: Mann-Whitney's smallest p (~0.008) passes alone; after Bonferroni x 2 not
    # even the best possible outcome would pass: too few random sets to answer, inconclusive
    assert mw["verdict"] == "significant"
    (mw,) = apply_correction([mw], method="bonferroni", alpha=0.01)
    assert mw["verdict"] == "significant"
    mw2 = apply_correction([dict(mw), dict(mw)], method="bonferroni", alpha=0.01)
    assert mw2[0]["verdict"] == "inconclusive" and mw2[0]["p_adjusted"] > 0.01
    assert "would give p_adjusted" in mw2[0]["verdict_reason"]


def test_a_test_without_power_is_inconclusive_not_a_negative():
    """Random CAVs scoring ~1 (derivatives sharing a sign for nearly any direction): a concept at
    1.0 in every run cannot be told from them, so the verdict is inconclusive; against random
    scores that are all-or-nothing coin flips the same concept is significant."""
    randoms = [f"r{i}" for i in range(21)]
    scores = {}
    for i, r in enumerate(randoms[1:]):
        scores[f"c-{r}"] = {"l": {"sign_count": 1.0, "magnitude": 0.99, "accuracy": 0.9}}
        scores[f"r0-{r}"] = {
            "l": {"sign_count": 0.9 if i == 3 else 1.0, "magnitude": 0.9, "accuracy": 0.5}
        }
        scores[f"coin-{r}"] = {
            "l": {"sign_count": float(i % 2), "magnitude": float(i % 2), "accuracy": 0.5}
        }
    row = summarize_experiment(scores, "c", randoms, "l", test="mannwhitney")
    assert row["p_best"] == row["p_value"] > 0.01
    assert row["verdict"] == "inconclusive" and "even a concept at 1" in row["verdict_reason"]
    assert not row["significant"]
    # the magnitude score, reported beside the sign count, still tells them apart
    assert row["tcav_magnitude"] == pytest.approx(0.99)
    assert row["random_magnitude"] == pytest.approx(0.9)
    assert row["p_value_magnitude"] < 1e-6
    assert len(row["magnitudes"]) == len(row["random_magnitudes"]) == 20
    flips = {k.replace("coin-", "r0-"): v for k, v in scores.items() if k.startswith("coin-")}
    flips.update({k: v for k, v in scores.items() if k.startswith("c-")})
    sig = summarize_experiment(flips, "c", randoms, "l", test="mannwhitney")
    assert sig["verdict"] == "significant" and sig["rank_biserial"] == 0.5


def test_random_sets_are_seeded_and_disjoint_from_the_first():
    pool = _concept("p", torch.zeros(30, 1, 2, 2, 2))
    sets = random_concepts(pool, 6, 8, seed=1)
    first = set(sets[0].ids)
    assert all(len(r) == 8 and not first & set(r.ids) for r in sets[1:])
    assert len({tuple(r.ids) for r in sets[1:]}) > 1
    assert [r.ids for r in random_concepts(pool, 6, 8, seed=1)] == [r.ids for r in sets]
    small = random_concepts(pool, 3, 20, seed=1)  # too small to be disjoint: falls back
    assert all(len(r) == 20 for r in small)


def test_random_sets_of_a_detached_pool_are_the_same_sets_without_volumes():
    """run_tcav draws the random sets from the pool detached from its volumes: the same
    examples (ids, keys) and activations as sets copied out of the real pool, no memory."""
    from neuroexplain.concepts3d.concepts import is_placeholder

    torch.manual_seed(3)
    net = build_model("small", spatial_size=(SIZE,) * 3, channels=(4, 8)).eval()
    pool = _concept("pool", torch.rand(12, 1, SIZE, SIZE, SIZE))
    copied = random_concepts(pool, 4, 5, seed=2)
    tcav = TCAV(net, ["features.1"], batch_size=4)
    (ghost,) = tcav.detach_inputs([pool])  # caches the pool's activations
    light = random_concepts(ghost, 4, 5, seed=2)
    assert [(r.name, r.ids, r.key) for r in light] == [(r.name, r.ids, r.key) for r in copied]
    assert all(is_placeholder(r.inputs) and r.inputs.shape == c.inputs.shape
               for r, c in zip(light, copied, strict=True))  # fmt: skip
    assert not any(is_placeholder(c.inputs) for c in copied)
    # the copied sets, detached after the pool (as before): the same activations
    old = TCAV(net, ["features.1"], batch_size=4)
    _, *old_sets = old.detach_inputs([pool, *copied])
    for r, c in zip(light, old_sets, strict=True):
        assert torch.equal(tcav.activations(r)["features.1"], old.activations(c)["features.1"])
    # a detached concept whose activations were never computed is an error, not zeros
    other = tcav.detach_inputs(
        [_concept("other", torch.rand(3, 1, SIZE, SIZE, SIZE))], compute=False
    )
    with pytest.raises(ValueError, match="detached from its volumes"):
        tcav.activations(other[0])


class _BlobNet(nn.Module):
    """conv (identity-like) -> ReLU -> logit = sum of activations in the left half - right half."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 2, 1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight[:] = torch.tensor([1.0, 0.5]).reshape(2, 1, 1, 1, 1)
            self.features[0].bias.zero_()
        w = torch.zeros(2, 8, 8, 8)
        w[:, :4] = 1.0
        w[:, 4:] = -1.0
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.features(x) * self.w).flatten(1).sum(1, keepdim=True) / 100


def _concept(name, x):
    return Concept(name, x, [f"{name}{i}" for i in range(len(x))])


def test_tcav_end_to_end_on_a_toy_net_concept_vs_random():
    """A concept that raises activations where the logit weight is positive: TCAV 1, p < 0.01;
    a 'concept' drawn from the random distribution itself is not significant."""
    g = torch.Generator().manual_seed(0)
    net = _BlobNet().eval()
    blob = torch.zeros(1, 1, 8, 8, 8)
    blob[..., 1:3, 2:6, 2:6] = 1.0
    concept = _concept("blob", torch.rand(16, 1, 8, 8, 8, generator=g) * 0.5 + blob)
    pool = _concept("pool", torch.rand(80, 1, 8, 8, 8, generator=g) * 0.5)
    fake = _concept("fake", torch.rand(16, 1, 8, 8, 8, generator=g) * 0.5)
    randoms = random_concepts(pool, 21, 16, seed=0)
    sets = (
        [[concept, r] for r in randoms[1:]]
        + [[fake, r] for r in randoms[1:]]
        + [[randoms[0], r] for r in randoms[1:]]
    )
    inputs = torch.rand(12, 1, 8, 8, 8, generator=g)
    tcav = TCAV(net, ["features.1"], seed=0)
    scores = tcav.interpret(inputs, sets, target=0)
    names = [r.name for r in randoms]
    real = summarize_experiment(scores, "blob", names, "features.1")
    null = summarize_experiment(scores, "fake", names, "features.1")
    assert real["tcav_score"] == 1.0
    assert real["cav_accuracy"] >= 0.9
    assert real["p_value"] < 0.01 and real["significant"]
    assert null["p_value"] > 0.05 and not null["significant"]
    assert real["verdict"] == "significant" and null["verdict"] != "significant"
    for test in ("mannwhitney", "welch"):
        rows = [
            summarize_experiment(scores, c, names, "features.1", test=test)
            for c in ("blob", "fake")
        ]
        real_t, null_t = apply_correction(rows, method="holm", alpha=0.01)
        assert real_t["verdict"] == "significant" and real_t["rank_biserial"] > 0.4
        assert null_t["verdict"] != "significant"
    assert null["cav_accuracy"] < 0.8

    # the memory-light path: activations cached up front, volumes dropped, same scores
    light_tcav = TCAV(net, ["features.1"], seed=0)
    light = light_tcav.detach_inputs([concept, fake, *randoms])
    assert all(c.inputs.untyped_storage().nbytes() <= 4 for c in light)  # no volumes kept
    assert [(c.name, c.ids, c.key) for c in light] == [
        (c.name, c.ids, c.key) for c in [concept, fake, *randoms]
    ]
    lc, lf, *lr = light
    light_sets = (
        [[lc, r] for r in lr[1:]] + [[lf, r] for r in lr[1:]] + [[lr[0], r] for r in lr[1:]]
    )
    assert light_tcav.interpret(inputs, light_sets, target=0) == scores


# ------------------------------------------------------------------------------------- SACV


def test_spatial_vectors_are_channels_last_per_position():
    acts = torch.arange(2 * 3 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2, 2)
    v = spatial_vectors(acts)
    assert v.shape == (16, 3)
    row = 1 * 8 + 1 * 4 + 0 * 2 + 1  # (b=1, x=1, y=0, z=1)
    torch.testing.assert_close(v[row], acts[1, :, 1, 0, 1])
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[1, 1, 0, 1] = True
    torch.testing.assert_close(spatial_vectors(acts, mask), acts[1, :, 1, 0, 1][None])


def test_sacv_trains_on_true_position_vectors_not_scrambled_ones():
    """Concept positions carry channel pattern (+1, -1, 0, 0); the original notebook's reshape
    without transposing mixes channels of different positions and loses the concept."""
    g = torch.Generator().manual_seed(0)
    b, c, s = 12, 4, 6
    acts = torch.randn(b, c, s, s, s, generator=g) * 0.3
    region = torch.zeros(b, s, s, s, dtype=torch.bool)
    region[:, 1:3, 1:4, 2:5] = True
    pattern = torch.tensor([1.0, -1.0, 0.0, 0.0]).reshape(1, c, 1, 1, 1)
    concept_acts = acts + pattern * region[:, None]
    pos = spatial_vectors(concept_acts, region)
    neg = spatial_vectors(acts, region)
    res = train_cav(pos, neg, seed=0)
    assert res["accuracy"] > 0.95
    assert float(res["vector"] @ torch.tensor([1.0, -1.0, 0, 0]) / 2**0.5) > 0.9
    # the buggy flattening (channels-first reshape) of the same positions
    scrambled_pos = concept_acts.reshape(-1, c)[region.reshape(-1)]
    scrambled_neg = acts.reshape(-1, c)[region.reshape(-1)]
    bad = train_cav(scrambled_pos, scrambled_neg, seed=0)
    assert bad["accuracy"] < 0.8


def _toy_sacv_net():
    torch.manual_seed(0)
    return build_model("small", spatial_size=(SIZE,) * 3, channels=(4, 8), hidden=()).eval()


def test_sacv_maps_shapes_and_definitions():
    net = _toy_sacv_net()
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    cav = CAV("c", "r", "features.1", v, v * 2, -0.5, 1.0, 10, 2, kind="sacv")
    x = torch.rand(2, 1, SIZE, SIZE, SIZE, generator=g)
    out = SACV(net, "features.1", cav, relevance="raw").explain(x, target=0)
    assert out["relevance"].shape == (2, 1, SIZE, SIZE, SIZE)
    assert out["contribution"].shape == (2, 1, SIZE, SIZE, SIZE)
    assert out["relevance_layer"].shape == (2, 4, 4, 4)
    acts, grads, _ = layer_gradients(net, x, "features.1")
    torch.testing.assert_close(out["relevance_layer"][1, 2, 0, 3], acts[1, :, 2, 0, 3] @ v)
    torch.testing.assert_close(out["contribution_layer"][0, 1, 3, 2], grads[0, :, 1, 3, 2] @ v)
    # the contribution summed over positions is the TCAV directional derivative of v at all p
    torch.testing.assert_close(out["directional_derivative"], torch.einsum("bcxyz,c->b", grads, v))
    # a constant layer map upsamples to the same constant
    torch.testing.assert_close(
        upsample(torch.ones(1, 4, 4, 4), (SIZE,) * 3), torch.ones(1, 1, SIZE, SIZE, SIZE)
    )
    rel, con = SACV(net, "features.1", cav, relevance="raw").attribute(x)
    torch.testing.assert_close(rel, out["relevance"])
    # default: distance from the decision boundary along v (w = 2 v, b = -0.5), negatives dropped
    pos = SACV(net, "features.1", cav).explain(x)["relevance_layer"]
    torch.testing.assert_close(pos, (out["projection_layer"] - 0.25).clamp(min=0))
    hi = CAV("c", "r", "features.1", v, v * 2, 100.0, 1.0, 10, 2, kind="sacv")
    signed = SACV(net, "features.1", hi, relevance="signed").explain(x)["relevance_layer"]
    torch.testing.assert_close(signed, out["projection_layer"] + 50.0)
    torch.testing.assert_close(con, out["contribution"])
    with pytest.raises(ValueError, match="spatial CAV"):
        SACV(net, "features.1", CAV("c", "r", "features.1", v, v, 0.0, 1.0, 1, 1, kind="tcav"))


def test_layer_mask_keeps_region_cells():
    m = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    m[..., :2, :2, :2] = True
    lm = layer_mask(m, (4, 4, 4))
    assert lm.shape == (1, 4, 4, 4)
    assert lm[0, 0, 0, 0] and lm.sum() == 1
    tiny = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    tiny[..., 5, 5, 5] = True  # 1/8 of a cell: below min_overlap, kept as the best cell
    assert layer_mask(tiny, (4, 4, 4)).sum() == 1


# ----------------------------------------------------------------------------------- cache


def test_cache_is_tied_to_the_checkpoint_hash(tmp_path, caplog):
    a, b = "a" * 64, "b" * 64
    store = CAVStore(tmp_path / "cavs.pt", a)
    store.put("k", {"vector": torch.ones(3), "accuracy": 0.9})
    store.save(provenance={"torch": torch.__version__})
    again = CAVStore(tmp_path / "cavs.pt", a)
    assert "k" in again and again.get("k")["accuracy"] == 0.9 and not again.invalidated
    with caplog.at_level(logging.WARNING):
        other = CAVStore(tmp_path / "cavs.pt", b)
    assert len(other) == 0 and other.invalidated
    assert "discarding" in caplog.text
    with pytest.raises(StaleCacheError, match=r"not the one in use"):
        CAVStore(tmp_path / "cavs.pt", b, strict=True)


def test_tcav_uses_the_store_and_recomputes_for_a_new_checkpoint(tmp_path):
    net = _BlobNet().eval()
    g = torch.Generator().manual_seed(1)
    c = _concept("c", torch.rand(6, 1, 8, 8, 8, generator=g) + 0.5)
    r = _concept("r", torch.rand(6, 1, 8, 8, 8, generator=g))
    store = CAVStore(tmp_path / "cavs.pt", "a" * 64)
    first = TCAV(net, ["features.1"], store=store).compute_cavs([[c, r]])
    store.save()
    store2 = CAVStore(tmp_path / "cavs.pt", "a" * 64)
    tc2 = TCAV(net, ["features.1"], store=store2)
    second = tc2.compute_cavs([[c, r]])
    assert store2.hits == 1 and not tc2._acts  # served from the cache, no activations computed
    torch.testing.assert_close(
        first["c-r"]["features.1"].vector, second["c-r"]["features.1"].vector
    )
    store3 = CAVStore(tmp_path / "cavs.pt", "b" * 64)
    tc3 = TCAV(net, ["features.1"], store=store3)
    tc3.compute_cavs([[c, r]])
    assert store3.invalidated and store3.hits == 0 and tc3._acts


# -------------------------------------------------------------------------------- concepts


def test_concept_config_and_region_examples(tmp_path):
    from _toy3d import make_preproc

    pre = make_preproc(tmp_path / "bids", n=4)
    (tmp_path / "participants.tsv").write_text("participant_id\tdiagnosis\n")
    (tmp_path / "c.yaml").write_text(CONCEPTS_YAML)
    cfg = load_concept_config(tmp_path / "c.yaml")
    assert [c.name for c in cfg.concepts] == ["atrophyA", "regionB"]
    spec = cfg.get("atrophyA")
    images = pre["images"].clone()
    ex = build_concept(pre, [0, 1], spec)
    assert torch.equal(pre["images"], images)  # blanked a copy, not the cohort's volumes
    mask = region_mask(pre["dseg"][1, 0].numpy(), [10], 1)
    assert ex.masks is not None and torch.equal(ex.masks[1, 0], torch.from_numpy(mask))
    assert float(ex.inputs[1, 0][~torch.from_numpy(mask)].abs().max()) == 0.0
    assert torch.equal(
        ex.inputs[1, 0][torch.from_numpy(mask)], pre["images"][1, 0][torch.from_numpy(mask)]
    )
    whole = build_concept(pre, [0, 1], spec, transform="none")
    assert torch.equal(whole.inputs, pre["images"][[0, 1]]) and whole.ids != ex.ids
    (tmp_path / "bad.yaml").write_text("concepts:\n  x:\n    where: {a: 1}\n    colour: red\n")
    with pytest.raises(InputError, match="unknown keys"):
        load_concept_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("concepts:\n  x:\n    region: [3]\n")
    with pytest.raises(InputError, match="'where'"):
        load_concept_config(tmp_path / "bad2.yaml")


# ---------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def toy():
    return shared_cohort()


def test_cli_tcav_planted_concept_is_significant_unrelated_is_not(toy, tmp_path):
    from neuroexplain.concepts3d.run import run_tcav

    out = tmp_path / "c3d"
    args = ["tcav", "--preproc", str(toy["preproc"]), "--checkpoint", str(toy["model"]),
            "--concepts", str(toy["concepts"]), "--out", str(out),
            "--layers", "features.0"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "tcav.json").read_text())
    rows = {r["concept"]: r for r in res["results"]}
    assert rows["atrophyA"]["p_value"] < 0.01 and rows["atrophyA"]["cav_accuracy"] >= 0.8
    assert rows["atrophyA"]["significant"] and rows["atrophyA"]["verdict"] == "significant"
    assert rows["atrophyA"]["p_adjusted"] >= rows["atrophyA"]["p_value"]
    assert rows["atrophyA"]["correction"] == "holm" and rows["atrophyA"]["n_tests"] == 2
    assert rows["regionB"]["p_value"] > 0.05 and not rows["regionB"]["significant"]
    assert rows["regionB"]["verdict"] in ("not significant", "inconclusive")
    assert res["provenance"]["params"]["test"] == "permutation"
    assert rows["atrophyA"]["effect_z"] > 3 and rows["atrophyA"]["p_adjusted_high"] < 0.01
    assert rows["regionB"]["verdict"] == "inconclusive"  # the layer does not tell it from random
    assert len(rows["atrophyA"]["scores"]) == 10
    test_split = {f"sub-{i:02d}" for i in range(24, 36)}
    assert res["class"]["subjects"] and set(res["class"]["subjects"]) <= test_split
    assert (out / "tcav.tsv").is_file() and (out / "tcav.png").is_file()
    tsv = (out / "tcav.tsv").read_text().splitlines()[0].split("\t")
    assert {"p_value", "p_adjusted", "verdict", "tcav_magnitude", "random_magnitude"} <= set(tsv)
    # a second run takes every CAV from the cache and writes the identical file
    n_cached = len(torch.load(out / "cavs.pt", weights_only=True)["entries"])
    again = run_tcav(
        toy["preproc"], toy["model"], toy["concepts"], out, layers="features.0", plot=False
    )
    assert again["cache_stats"]["entries"] == n_cached  # nothing new was computed
    assert again["cache_stats"]["hits"] >= n_cached > 0
    assert json.loads((out / "tcav.json").read_text()) == res
    # a fresh run (no cache) with the same seed gives the same result
    fresh = tmp_path / "fresh"
    run_tcav(toy["preproc"], toy["model"], toy["concepts"], fresh, layers="features.0", plot=False)
    assert (fresh / "tcav.json").read_text() == (out / "tcav.json").read_text()


def test_cli_sacv_writes_native_maps_that_find_the_concept_region(toy, tmp_path):
    from neuroexplain.evaluate.harness import topk_fraction

    out = tmp_path / "c3d"
    args = ["sacv", "--preproc", str(toy["preproc"]), "--checkpoint", str(toy["model"]),
            "--concepts", str(toy["concepts"]), "--out", str(out), "--layer", "features.1",
            "--concept", "atrophyA"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "sacv.json").read_text())
    assert res["sacv_accuracy"] >= 0.8
    pre = torch.load(toy["preproc"], weights_only=True)
    fractions, chance = [], []
    for i in range(24, 36):  # the test split
        sub = f"sub-{i:02d}"
        rel = out / sub / f"{sub}_desc-sacvrelevance_map.nii.gz"
        con = out / sub / f"{sub}_desc-sacvcontribution_map.nii.gz"
        assert rel.is_file() and con.is_file()
        if i % 2:  # diseased: the relevance map should find the (shrunk) region A
            d = pre["dseg"][i, 0].numpy()
            fractions.append(topk_fraction(nib.load(rel).get_fdata(), d == 10, d > 0, 5))
            chance.append((d == 10).sum() / (d > 0).sum())
    assert np.mean(fractions) > 5 * np.mean(chance)
    img = nib.load(out / "sub-25" / "sub-25_desc-sacvrelevance_map.nii.gz")
    t1 = nib.load(toy["root"] / "bids" / "sub-25" / "anat" / "sub-25_T1w.nii.gz")
    assert img.shape == t1.shape and np.allclose(img.affine, t1.affine)
    side = json.loads((out / "sub-25" / "sub-25_desc-sacvrelevance_map.json").read_text())
    assert side["CheckpointSha256"] == res["checkpoint_sha256"]
    scores = (out / "sacv_scores.tsv").read_text().splitlines()
    assert len(scores) == 13 and "spatial_contribution" in scores[0]
    # the maps manifest (sacv_maps.json: several concepts can share a folder) lists every map
    from neuroexplain.stage import read_maps_manifest

    man = read_maps_manifest(out / "sacv_maps.json")
    assert man.stage == "sacv" and man.methods == {
        "sacvrelevance": "concept-relevance",
        "sacvcontribution": "concept-contribution",
    }
    listed = {f for files in man.files.values() for f in files.values()}
    assert listed == set(out.glob("sub-*/*_map.nii.gz")) and len(listed) == 24
    assert main([*args[:-2], "--concept", "nonexistent"]) == 2
