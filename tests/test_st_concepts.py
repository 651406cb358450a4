"""Concept saliency maps on spatial transcriptomics (Brocki & Chung 2019): SpotVAE, concept
vectors, batched saliency vs Captum, gene-as-image mode, evaluation and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from neuroexplain.errors import InputError
from neuroexplain.st import concept_keys as K
from neuroexplain.st.concepts import (
    ConceptSaliency,
    ConceptScorer,
    concept_saliency,
    genemode,
    ranked_genes,
    spot_gene_saliency,
)
from neuroexplain.st.evaluate import evaluate_concepts
from neuroexplain.st.vae import SpotVAE, gene_images, rasterise_spots

LABEL = "layer_short"


def _mob_adata(mob_root: Path) -> ad.AnnData:
    """The ingest-st layout built directly from the shared MOB tables (no ingest dependency)."""
    counts = pd.read_csv(mob_root / "mob_rep11_counts.csv.gz", index_col=0)
    spots = pd.read_csv(mob_root / "mob_rep11_spots.csv", index_col=0).loc[counts.index]
    x = sp.csr_matrix(counts.to_numpy(dtype=np.float32))
    adata = ad.AnnData(
        X=x.copy(),
        obs=pd.DataFrame({LABEL: pd.Categorical(spots[LABEL])}, index=counts.index.astype(str)),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.layers["counts"] = x
    adata.obsm["spatial"] = spots[["x", "y"]].to_numpy(dtype=float)
    adata.obs["labelled"] = adata.obs[LABEL].notna().to_numpy()
    return adata


@pytest.fixture(scope="module")
def mob_full(mob_root: Path) -> ad.AnnData:
    return _mob_adata(mob_root)


@pytest.fixture(scope="module")
def mob_small(mob_full: ad.AnnData) -> ad.AnnData:
    """All spots, ~600 genes (the markers and the most expressed genes): fast to train."""
    total = np.asarray(mob_full.layers["counts"].sum(0)).ravel()
    keep = set(np.argsort(-total)[:590].tolist())
    keep |= {mob_full.var_names.get_loc(g) for g in ("Penk", "Nrgn", "Doc2g", "Cdhr1", "Kctd12")}
    return mob_full[:, sorted(keep)].copy()


def _tiny_model(adata: ad.AnnData, seed: int = 0, epochs: int = 8) -> SpotVAE:
    model = SpotVAE(adata, n_latent=6, n_hidden=32, n_top_genes=200, seed=seed, device="cpu")
    return model.train(max_epochs=epochs, kl_warmup_epochs=4, progress=False)


@pytest.fixture(scope="module")
def tiny_model(mob_small: ad.AnnData) -> SpotVAE:
    return _tiny_model(mob_small)


# ----------------------------------------------------------------------------- saliency maths


def test_linear_encoder_gradient_is_analytic() -> None:
    """mu = W x + b  =>  d<v_c, mu>/dx = W^T v_c at every spot; IG from 0 = x * W^T v_c."""
    torch.manual_seed(0)
    enc = nn.Linear(7, 3)
    v = torch.randn(4, 3)
    scorer = ConceptScorer(enc, v).eval()
    x = torch.rand(5, 7)
    expected = (v @ enc.weight).detach()  # (C, G)
    expl = ConceptSaliency(scorer)
    grad = expl.attribute(x, method="gradient")
    assert grad.shape == (4, 5, 7)
    torch.testing.assert_close(grad, expected[:, None, :].expand(4, 5, 7))
    ig = expl.attribute(x, method="ig", n_steps=8)
    torch.testing.assert_close(ig, expected[:, None, :] * x[None], atol=1e-6, rtol=1e-5)
    sg = expl.attribute(x, method="smoothgrad", nt_samples=4, stdevs=0.3)
    torch.testing.assert_close(sg, expected[:, None, :].expand(4, 5, 7))
    # completeness of IG: sum of attributions = s(x) - s(0)
    torch.testing.assert_close(
        ig.sum(-1).T, scorer(x) - scorer(torch.zeros_like(x)), atol=1e-5, rtol=1e-5
    )


def test_batched_saliency_matches_captum(mob_small: ad.AnnData, tiny_model: SpotVAE) -> None:
    from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

    lat = tiny_model.get_latent_representation()
    v = np.stack([lat[:40].mean(0) - lat[40:].mean(0), lat[:, ::-1].std(0), -lat[5]])
    scorer = ConceptScorer(tiny_model.posterior_mean(), v).eval()
    x = torch.from_numpy(tiny_model.get_normalized_input())[:60]
    expl = ConceptSaliency(scorer)
    grad = expl.attribute(x, method="gradient", batch_size=25)  # chunked on purpose
    gxi = expl.attribute(x, method="grad_x_input")
    ig = expl.attribute(x, method="ig", n_steps=16)
    for c in range(3):
        ref = Saliency(scorer).attribute(x, target=c, abs=False)
        torch.testing.assert_close(grad[c], ref, atol=1e-6, rtol=1e-5)
        ref = InputXGradient(scorer).attribute(x, target=c)
        torch.testing.assert_close(gxi[c], ref, atol=1e-6, rtol=1e-5)
        ref = IntegratedGradients(scorer).attribute(x, target=c, n_steps=16)
        torch.testing.assert_close(ig[c], ref, atol=1e-5, rtol=1e-4)
    # SmoothGrad: same RNG state -> same noise as Captum's NoiseTunnel
    torch.manual_seed(7)
    sg = expl.attribute(x, method="smoothgrad", nt_samples=5, stdevs=0.4)
    for c in range(3):
        torch.manual_seed(7)
        ref = NoiseTunnel(Saliency(scorer)).attribute(
            x, target=c, nt_type="smoothgrad", nt_samples=5, stdevs=0.4, abs=False
        )
        torch.testing.assert_close(sg[c], ref, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- AnnData outputs


def test_concept_saliency_outputs(mob_small: ad.AnnData, tiny_model: SpotVAE, tmp_path) -> None:
    import scanpy as sc

    adata = mob_small.copy()
    first_gcl = [str(s) for s in adata.obs_names[adata.obs[LABEL] == "GCL"][:10]]
    out = concept_saliency(
        adata,
        tiny_model,
        label_key=LABEL,
        saliency="grad_x_input",
        spot_concepts={"my spots": first_gcl},
        gene_concepts={"penk/nrgn": ["Penk", "Nrgn"]},
        key_added="cs",
    )
    assert out is None
    names = ["EPL", "GCL", "GL", "MCL", "ONL", "my spots", "penk/nrgn"]
    uns = adata.uns["cs"]
    assert list(uns["concepts"]) == names
    n, g, c = adata.n_obs, adata.n_vars, len(names)
    assert adata.obsm["X_cs"].shape == (n, 6)
    assert adata.obsm["cs_scores"].shape == (n, c)
    assert adata.varm["cs_saliency"].shape == (g, c)
    assert adata.varm["cs_saliency_abs"].shape == (g, c)
    inp = adata.var["cs_input"].to_numpy()
    assert inp.sum() == 200
    assert np.all(adata.varm["cs_saliency"][~inp] == 0)  # not a model input -> zero gradient
    assert np.all(adata.varm["cs_saliency_abs"][inp].sum(0) > 0)
    for name in names:
        assert adata.layers[K.spot_gene_layer_key("cs", name)].shape == (n, g)
    assert "cs_saliency_penk_nrgn" in adata.layers  # "/" sanitised for HDF5
    # the attribute concept vector is the difference of mean latents (independent check)
    lat = adata.obsm["X_cs"]
    lab = adata.obs[LABEL]
    gcl = (lab == "GCL").to_numpy()
    other = (lab.notna() & (lab != "GCL")).to_numpy()
    np.testing.assert_allclose(
        uns["concept_vectors"][1], lat[gcl].mean(0) - lat[other].mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(adata.obsm["cs_scores"], lat @ uns["concept_vectors"].T, rtol=1e-5)
    # aggregated saliency = mean over the concept's spots of the spot x gene layer
    layer = adata.layers[K.spot_gene_layer_key("cs", "GCL")]
    np.testing.assert_allclose(adata.varm["cs_saliency"][:, 1], layer[gcl].mean(0), rtol=1e-5)
    tab = ranked_genes(adata, "GCL", key="cs")
    assert np.all(np.diff(tab["saliency"].to_numpy()) <= 0) and len(tab) == 200
    assert uns["params"]["seed"] == 0 and uns["params"]["version"]
    # h5ad round trip opens in scanpy
    path = tmp_path / "out.h5ad"
    adata.write_h5ad(path)
    back = sc.read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["cs_scores"], adata.obsm["cs_scores"])
    assert list(back.uns["cs"]["ranked_genes"]["GCL"]["names"]) == list(tab["names"])
    compact = spot_gene_saliency(adata, key="cs")
    assert compact.shape == (n, 200) and "GCL" in compact.layers


def test_top_gene_heatmap_is_capped(
    mob_small: ad.AnnData, tiny_model: SpotVAE, tmp_path, caplog
) -> None:
    """The heatmap grows with concepts x layers: past its cap it shows the first ones, loudly."""
    from PIL import Image

    from neuroexplain.st.plotting import plot_top_gene_heatmap

    adata = mob_small.copy()
    concept_saliency(adata, tiny_model, label_key=LABEL, key_added="cs")
    full = plot_top_gene_heatmap(adata, tmp_path / "full.png", label_key=LABEL, key="cs")
    with caplog.at_level("WARNING"):
        capped = plot_top_gene_heatmap(
            adata, tmp_path / "capped.png", label_key=LABEL, key="cs", max_concepts=2
        )
    assert "the top-gene heatmap shows the first 2 of 5 layer concepts (capped.png)" in caplog.text
    w_full, h_full = Image.open(full).size
    w, h = Image.open(capped).size
    assert h < h_full / 2 and w < w_full


def test_probe_concepts_and_copy(mob_small: ad.AnnData, tiny_model: SpotVAE) -> None:
    adata = mob_small.copy()
    res = concept_saliency(adata, tiny_model, label_key=LABEL, method="probe", copy=True)
    assert res is not None and K.scores_key(K.DEFAULT_KEY) in res.obsm
    assert K.scores_key(K.DEFAULT_KEY) not in adata.obsm  # copy=True leaves the input alone
    # a probe direction separates its layer: the layer's mean score is the highest
    s = res.obsm[K.scores_key(K.DEFAULT_KEY)]
    lab = res.obs[LABEL]
    for j, layer in enumerate(np.asarray(res.uns[K.DEFAULT_KEY]["concepts"])):
        means = [s[(lab == other).to_numpy(), j].mean() for other in lab.cat.categories]
        assert lab.cat.categories[int(np.argmax(means))] == layer


def test_user_concepts_without_labels(mob_small: ad.AnnData, tiny_model: SpotVAE) -> None:
    adata = mob_small.copy()
    concept_saliency(
        adata, tiny_model, label_key=None, gene_concepts={"gcl genes": ["Penk", "Nrgn"]}
    )
    uns = adata.uns[K.DEFAULT_KEY]
    assert list(uns["concepts"]) == ["gcl genes"] and list(uns["concept_source"]) == ["genes"]
    spots = set(np.asarray(uns["concept_spots"]["gcl_genes"]))
    assert len(spots) == round(0.25 * adata.n_obs)
    # the spots carrying a Penk/Nrgn concept are mostly granule-cell-layer spots
    frac_gcl = np.mean(adata.obs.loc[sorted(spots), LABEL].astype(str) == "GCL")
    assert frac_gcl > 0.5
    with pytest.raises(InputError, match="no concepts"):
        concept_saliency(adata, tiny_model, label_key=None)


def test_determinism_same_seed(mob_small: ad.AnnData) -> None:
    runs = []
    for _ in range(2):
        adata = mob_small.copy()
        model = _tiny_model(adata, seed=3, epochs=4)
        concept_saliency(adata, model, label_key=LABEL, saliency="smoothgrad", nt_samples=3, seed=3)
        runs.append((model, adata))
    (m1, a1), (m2, a2) = runs
    for (k1, t1), (k2, t2) in zip(
        m1.module.state_dict().items(), m2.module.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(t1, t2)
    key = K.DEFAULT_KEY
    outputs = [
        ("obsm", K.latent_key(key)),
        ("obsm", K.scores_key(key)),
        ("varm", K.saliency_key(key)),
        ("varm", K.saliency_abs_key(key)),
    ]
    for slot, name in outputs:
        np.testing.assert_array_equal(getattr(a1, slot)[name], getattr(a2, slot)[name])
    other = _tiny_model(mob_small.copy(), seed=4, epochs=4)
    assert not torch.equal(other.module.mu.weight, m1.module.mu.weight)


def test_save_load_roundtrip(mob_small: ad.AnnData, tiny_model: SpotVAE, tmp_path) -> None:
    path = tiny_model.save(tmp_path / "model")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["var_names"] == list(mob_small.var_names) and ckpt["seed"] == 0
    assert ckpt["config"]["n_latent"] == 6 and ckpt["version"]
    loaded = SpotVAE.load(tmp_path / "model", mob_small, device="cpu")
    assert loaded.input_genes == tiny_model.input_genes
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), tiny_model.get_latent_representation()
    )
    swapped = mob_small[:, list(mob_small.var_names[::-1])].copy()
    with pytest.raises(InputError, match="var_names differ"):
        SpotVAE.load(tmp_path / "model", swapped)
    with pytest.raises(InputError, match=f"expected {mob_small.n_vars} genes"):
        SpotVAE.load(tmp_path / "model", mob_small[:, :100].copy())
    with pytest.raises(InputError, match="var_names"):
        tiny_model.get_latent_representation(swapped)


def test_bad_inputs(mob_small: ad.AnnData, tiny_model: SpotVAE) -> None:
    with pytest.raises(InputError, match="label key not found"):
        concept_saliency(mob_small.copy(), tiny_model, label_key="nope")
    few = mob_small.copy()
    lab = few.obs[LABEL].astype(object)
    mcl = np.flatnonzero((lab == "MCL").to_numpy())
    lab.iloc[mcl[3:]] = None
    few.obs[LABEL] = pd.Categorical(lab)
    few.obs["labelled"] = few.obs[LABEL].notna().to_numpy()
    with pytest.raises(InputError, match=r"too few labelled spots.*MCL"):
        concept_saliency(few, tiny_model, label_key=LABEL)
    with pytest.raises(InputError, match="NotAGene"):
        genemode(mob_small.copy(), ["Penk", "NotAGene"])
    with pytest.raises(InputError, match="counts"):
        SpotVAE(ad.AnnData(np.ones((4, 3), dtype=np.float32)), layer="counts")


# ----------------------------------------------------------------------------- gene-as-image mode


def test_rasterise_and_gene_images() -> None:
    coords = np.array([[10.02, 5.0], [11.0, 5.03], [10.0, 7.97], [12.04, 6.0], [12.0, 6.01]])
    rows, cols, shape = rasterise_spots(coords, spacing=1.0)
    np.testing.assert_array_equal(cols, [0, 1, 0, 2, 2])
    np.testing.assert_array_equal(rows, [0, 0, 3, 1, 1])
    assert shape == (4, 3)
    expr = np.array([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    img = gene_images(expr, rows, cols, shape)
    assert img.shape == (2, 1, 8, 8)  # padded to a multiple of 4, at least 8
    assert img[0, 0, 3, 0] == 1.0 and img[0, 0, 0, 1] == 0.5
    assert img[0, 0, 1, 2] == 0.25  # two spots on one pixel are averaged: (2 + 0) / 2 / 4
    assert np.all(img[1] == 0)
    # automatic spacing = median nearest-neighbour distance
    grid = np.stack(np.meshgrid(np.arange(4) * 2.5, np.arange(3) * 2.5), -1).reshape(-1, 2)
    r, c, s = rasterise_spots(grid)
    assert s == (3, 4) and len(set(zip(r.tolist(), c.tolist(), strict=True))) == 12


def test_genemode_smoke(mob_small: ad.AnnData) -> None:
    adata = mob_small.copy()
    genemode(
        adata,
        ["Penk", "Kctd12"],
        n_top_genes=120,
        n_similar=8,
        max_epochs=2,
        device="cpu",
        progress=False,
        key_added="gm",
    )
    maps = adata.obsm["gm_genemode"]
    assert maps.shape == (adata.n_obs, 2) and np.all(np.isfinite(maps))
    assert np.abs(maps).sum() > 0
    cg = adata.uns["gm"]["genemode"]["concept_genes"]
    assert cg["Penk"][0] == "Penk" and len(cg["Penk"]) == 8


# ----------------------------------------------------------------------------- evaluation, CLI


def test_evaluation_against_wilcoxon_reference(mob_small: ad.AnnData, tiny_model) -> None:
    """If the saliency ranking *is* the Wilcoxon ranking, overlap and Spearman must be 1."""
    from neuroexplain.st.concepts import spot_labels
    from neuroexplain.st.evaluate import wilcoxon_ranking

    adata = mob_small.copy()
    concept_saliency(adata, tiny_model, label_key=LABEL)
    key = K.DEFAULT_KEY
    wil = wilcoxon_ranking(
        adata,
        spot_labels(adata, LABEL),
        adata.var[K.input_var_key(key)].to_numpy(),
        layer="counts",
        target_sum=1e4,
    )
    for layer, df in wil.items():
        adata.uns[key]["ranked_genes"][layer]["names"] = df["names"].to_numpy().astype(str)
        adata.uns[key]["ranked_genes"][layer]["saliency"] = df["scores"].to_numpy()
    res = evaluate_concepts(adata, label_key=LABEL, markers={"GCL": ["Penk", "Nope"]})
    assert res["mean_overlap"] == 1.0
    assert all(abs(v["spearman"] - 1.0) < 1e-9 for v in res["layers"].values())
    penk = res["markers"]["GCL"]["Penk"]
    assert penk["rank"] == penk["wilcoxon_rank"]
    assert res["markers"]["GCL"]["Nope"]["rank"] is None
    clf = res["classification"]
    assert 0.0 <= clf["accuracy"] <= 1.0 and clf["n_folds"] == 5 and clf["n_spots"] == 260


def test_cli_st_concepts_and_evaluate(mob_small: ad.AnnData, tmp_path) -> None:
    from neuroexplain.cli import main

    src = tmp_path / "in.h5ad"
    mob_small.write_h5ad(src)
    out, figs, metrics = tmp_path / "out.h5ad", tmp_path / "figs", tmp_path / "m.json"
    common = ["--adata", str(src), "--label-key", LABEL, "--seed", "0", "--n-latent", "4"]
    args = ["st-concepts", *common, "--out", str(out), "--figures", str(figs),
            "--n-top-genes", "150", "--epochs", "3", "--genemode-seeds", "Penk,Doc2g",
            "--genemode-epochs", "1", "--genemode-n-genes", "80", "--device", "cpu",
            "--spot-gene-out", str(tmp_path / "sg.h5ad"),
            "--model-dir", str(tmp_path / "m")]  # fmt: skip
    assert main(args) == 0
    res = ad.read_h5ad(out)
    assert res.obsm["concept_saliency_genemode"].shape == (res.n_obs, 2)
    assert not any(k.startswith("concept_saliency_saliency_") for k in res.layers)
    assert ad.read_h5ad(tmp_path / "sg.h5ad").shape == (res.n_obs, 150)
    assert (tmp_path / "m" / "model.pt").is_file()
    pngs = sorted(p.name for p in figs.glob("*.png"))
    assert pngs == [
        "concept_saliency_genemode.png",
        "concept_saliency_scores.png",
        "concept_saliency_top_genes.png",
    ]
    ev = ["st-evaluate", "--adata", str(out), "--label-key", LABEL, "--out", str(metrics)]
    assert main(ev) == 0
    m = json.loads(metrics.read_text())
    assert set(m["layers"]) == {"EPL", "GCL", "GL", "MCL", "ONL"}
    assert 0 <= m["mean_overlap"] <= 1 and m["provenance"]["command"] == "st-evaluate"
    assert set(m["genemode"]) == {"Penk", "Doc2g"}
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temporaries


def test_cli_bad_input_exit_code(mob_small: ad.AnnData, tmp_path, capsys) -> None:
    from neuroexplain.cli import main

    src = tmp_path / "in.h5ad"
    mob_small.write_h5ad(src)
    base = ["st-concepts", "--adata", str(src), "--out", str(tmp_path / "o.h5ad")]
    assert main([*base, "--label-key", "nope"]) == 2
    assert "label key not found" in capsys.readouterr().err
    assert main([*base, "--label-key", LABEL, "--genemode-seeds", "Penk,Xyz1"]) == 2
    err = capsys.readouterr().err
    assert "Xyz1" in err and str(src) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.h5ad").exists()


# ------------------------------------------------------------------------ targeted gene panels

#: a MERFISH / osmFISH-style panel of the MOB data: four Wilcoxon markers per layer (from the
#: full data) and thirteen highly expressed housekeeping genes, 33 genes in all
PANEL = {
    "GCL": ["Penk", "Nrgn", "Pcp4", "Gpsm1"],
    "MCL": ["Doc2g", "Cdhr1", "Slc17a7", "Reln"],
    "EPL": ["Slc6a11", "Rasl10b", "Slc1a3", "Tspan7"],
    "GL": ["Nrsn1", "Calb2", "Zic2", "Gria1"],
    "ONL": ["Fabp7", "Omp", "Scd1", "Apod"],
}
HOUSEKEEPING = ["Actb", "Eef1a1", "Calm1", "Calm2", "Hspa8", "Tmsb4x", "Atp5b", "Ckb", "Glul",
                "Snap25", "Itm2b", "Tuba1a", "Mbp"]  # fmt: skip


def test_top_k_is_at_least_the_top_gene() -> None:
    from neuroexplain.st.evaluate import top_k

    assert top_k(33, 1.0) == 1  # 0.33 genes asked: the top gene
    assert top_k(33, 10.0) == 4 and top_k(33, 100.0) == 33 and top_k(33, 300.0) == 33
    assert top_k(15000, 1.0) == 150 and top_k(2000, 1.0) == 20  # large panels: as before
    assert top_k(1234, 1.0) == 13 and top_k(0, 1.0) == 0


def test_small_panel_end_to_end(mob_full: ad.AnnData, tmp_path) -> None:
    """A 33-gene panel: st-concepts (tiny epochs) and st-evaluate. At the default 1 % the marker
    check asks for the top gene (not for less than one gene, which always failed); top lists
    are capped at a quarter of the panel."""
    from neuroexplain.cli import main

    genes = [g for layer in PANEL.values() for g in layer] + HOUSEKEEPING
    panel = mob_full[:, genes].copy()
    assert panel.n_vars == 33
    src, out = tmp_path / "panel.h5ad", tmp_path / "out.h5ad"
    panel.write_h5ad(src)
    args = ["st-concepts", "--adata", str(src), "--label-key", LABEL, "--out", str(out),
            "--seed", "0", "--n-latent", "4", "--epochs", "30", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    res = ad.read_h5ad(out)
    assert int(res.var[K.input_var_key(K.DEFAULT_KEY)].sum()) == 33  # every panel gene is input
    markers = ";".join(f"{layer}:{','.join(g)}" for layer, g in PANEL.items())
    found = {}
    for pct in (1.0, 10.0):
        metrics = tmp_path / f"m{pct:g}.json"
        ev = ["st-evaluate", "--adata", str(out), "--label-key", LABEL, "--out", str(metrics),
              "--markers", markers, "--top-percent", str(pct)]  # fmt: skip
        assert main(ev) == 0
        m = json.loads(metrics.read_text())
        assert m["n_genes_ranked"] == 33 and m["small_panel"]
        assert m["n_top"] == 50 and m["n_top_used"] == 8
        assert m["overlap_chance"] == pytest.approx(8 / 33)
        assert all(len(v["top_saliency"]) == 8 for v in m["layers"].values())
        assert m["top_k"] == {1.0: 1, 10.0: 4}[pct]
        for layer, entry in m["markers"].items():
            for e in entry.values():
                assert e["in_top"] == (e["rank"] <= m["top_k"])
            assert m["checks"][f"{layer}_marker_in_top_{pct:g}pct"] == any(
                e["in_top"] for e in entry.values()
            )
        found[pct] = {k.split("_")[0] for k, v in m["checks"].items() if "marker" in k and v}
        assert m["classification"]["accuracy"] > m["classification"]["chance"]
    # the checks can pass on a panel now (measured: GCL, ONL at the top gene; GCL, MCL, EPL, ONL
    # within the top 4); a wider top passes at least where a narrow one does
    assert found[1.0] and found[1.0] <= found[10.0] and len(found[10.0]) >= 3, found


# ----------------------------------------------------------------------------- acceptance on MOB


@pytest.mark.slow
def test_marker_recovery_on_mob(mob_full: ad.AnnData) -> None:
    """Acceptance: top-50 overlap with Wilcoxon >= 50 % on average; Penk/Nrgn in the GCL top 1 %,
    Doc2g/Cdhr1 in the MCL top 1 % (default model and saliency of ``st-concepts``)."""
    adata = mob_full.copy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI default: small model, shared machine
    try:
        model = SpotVAE(adata, n_latent=16, n_top_genes=2000, seed=0, device="cpu")
        model.train(progress=False)
        concept_saliency(adata, model, label_key=LABEL, store_spot_gene=False)
    finally:
        torch.set_num_threads(threads)
    res = evaluate_concepts(adata, label_key=LABEL)
    assert res["mean_overlap"] >= 0.5, res["mean_overlap"]
    assert any(e["in_top"] for e in res["markers"]["GCL"].values()), res["markers"]["GCL"]
    assert any(e["in_top"] for e in res["markers"]["MCL"].values()), res["markers"]["MCL"]
    assert res["classification"]["accuracy"] > 2 * res["classification"]["chance"]
