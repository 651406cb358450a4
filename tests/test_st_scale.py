"""The spatial-transcriptomics stage at scale (issue 22): sparse counts stay sparse, training and
saliency densify one block of spots over the input genes only, epochs of bounded size, and the
results do not depend on whether the counts arrive sparse or dense."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from neuroexplain.errors import InputError
from neuroexplain.st import concept_keys as K
from neuroexplain.st.concepts import concept_saliency
from neuroexplain.st.vae import CountBatches, SpotVAE, fit_vae, log_normalise, rasterise_spots


def _toy(n: int = 240, g: int = 120, seed: int = 0, dense: bool = False) -> ad.AnnData:
    """Three layers with their own marker genes, Poisson counts, ~70 % zeros."""
    rng = np.random.default_rng(seed)
    layer = np.repeat(np.array(["A", "B", "C"]), -(-n // 3))[:n]
    rate = rng.gamma(0.3, 2.0, size=(3, g))
    for k in range(3):
        rate[k, k * 10 : k * 10 + 10] += 6.0
    counts = rng.poisson(rate[pd.Categorical(layer).codes]).astype(np.float32)
    x = counts if dense else sp.csr_matrix(counts)
    adata = ad.AnnData(
        X=x.copy(),
        obs=pd.DataFrame({"layer": pd.Categorical(layer)}, index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(g)]),
    )
    adata.layers["counts"] = x
    adata.obsm["spatial"] = np.c_[np.arange(n) % 20, np.arange(n) // 20].astype(float)
    return adata


def test_count_batches_match_log_normalise() -> None:
    adata = _toy()
    counts = adata.layers["counts"]
    gi = np.arange(0, 120, 3)
    rows = np.array([5, 0, 77, 239])
    for source in (counts, counts.toarray()):
        data = CountBatches(source, gi)
        x, c, lf = data.take(rows)
        np.testing.assert_array_equal(x.numpy(), log_normalise(counts, gi)[rows])
        np.testing.assert_array_equal(c.numpy(), counts[rows][:, gi].toarray())
        torch.testing.assert_close(lf, torch.lgamma(c + 1.0), rtol=0, atol=0)
    # a CSR with duplicate entries (summed, as toarray() does) and unsorted column indices
    data, indices = [], []
    for r in range(counts.shape[0]):
        row = counts[r]
        half = row.data // 2
        data += [(row.data - half)[::-1], half[::-1]]
        indices += [row.indices[::-1], row.indices[::-1]]
    dup = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), 2 * counts.indptr), shape=counts.shape
    )
    assert not dup.has_canonical_format and dup.nnz == 2 * counts.nnz
    x, c, lf = CountBatches(dup, gi).take(rows)
    np.testing.assert_array_equal(x.numpy(), log_normalise(counts, gi)[rows])
    np.testing.assert_array_equal(c.numpy(), counts[rows][:, gi].toarray())
    np.testing.assert_array_equal(CountBatches(dup, gi).normalised(rows), x.numpy())
    sparse_log = log_normalise(counts, gi, sparse_out=True)
    assert sp.issparse(sparse_log)
    np.testing.assert_array_equal(sparse_log.toarray(), log_normalise(counts, gi))


def test_training_and_saliency_never_densify_all_spots_or_genes(monkeypatch) -> None:
    """Every densification is one block of spots over the input genes, never spots x all genes."""
    adata = _toy(n=300)
    shapes: list[tuple[int, int]] = []
    orig = sp.csr_matrix.toarray

    def spy(self, *args, **kwargs):
        shapes.append(self.shape)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", spy)
    gather = CountBatches._sparse_rows

    def rows_spy(self, idx, *datas):
        out = gather(self, idx, *datas)
        shapes.extend(o.shape for o in out)
        return out

    monkeypatch.setattr(CountBatches, "_sparse_rows", rows_spy)
    model = SpotVAE(adata, n_latent=4, n_hidden=16, n_top_genes=40, device="cpu")
    model.train(max_epochs=2, batch_size=32, kl_warmup_epochs=1, progress=False)
    train_shapes = list(shapes)
    assert train_shapes and all(s[1] == 40 for s in train_shapes)
    assert max(s[0] for s in train_shapes) <= 32  # batches of 32, the held-out 30 spots
    shapes.clear()
    model.get_latent_representation(batch_size=64)
    assert shapes and all(s[0] <= 64 and s[1] == 40 for s in shapes)


def test_sparse_and_dense_counts_give_identical_results() -> None:
    out = []
    for dense in (False, True):
        adata = _toy(dense=dense)
        model = SpotVAE(adata, n_latent=4, n_hidden=16, n_top_genes=50, device="cpu")
        model.train(max_epochs=3, kl_warmup_epochs=2, progress=False)
        concept_saliency(adata, model, label_key="layer", min_spots=5)
        out.append((model, adata))
    (m1, a1), (m2, a2) = out
    np.testing.assert_array_equal(m1.gene_index, m2.gene_index)
    assert m1.history == m2.history
    for k in a1.varm:
        np.testing.assert_array_equal(a1.varm[k], a2.varm[k])
    np.testing.assert_array_equal(a1.obsm["X_concept_saliency"], a2.obsm["X_concept_saliency"])


def test_streamed_saliency_equals_one_block(monkeypatch) -> None:
    """Blocks of a few spots aggregate to the same per-gene saliency as one block (to rounding)."""
    import neuroexplain.st.concepts as C

    adata = _toy()
    model = SpotVAE(adata, n_latent=4, n_hidden=16, n_top_genes=50, device="cpu")
    model.train(max_epochs=2, kl_warmup_epochs=1, progress=False)
    one = adata.copy()
    concept_saliency(one, model, label_key="layer", min_spots=5)
    monkeypatch.setattr(C, "_auto_batch", lambda *a, **k: 7)
    many = adata.copy()
    concept_saliency(many, model, label_key="layer", min_spots=5)
    for k in one.varm:
        np.testing.assert_allclose(one.varm[k], many.varm[k], rtol=1e-5, atol=1e-7)
    key = K.spot_gene_layer_key(K.DEFAULT_KEY, "A")
    np.testing.assert_allclose(one.layers[key], many.layers[key], rtol=1e-5, atol=1e-7)


def test_spot_gene_layers_skipped_beyond_budget() -> None:
    adata = _toy()
    model = SpotVAE(adata, n_latent=4, n_hidden=16, n_top_genes=50, device="cpu")
    model.train(max_epochs=1, kl_warmup_epochs=1, progress=False)
    concept_saliency(adata, model, label_key="layer", min_spots=5, max_spot_gene_mb=0.01)
    assert not any(k.startswith("concept_saliency_saliency_") for k in adata.layers)
    assert adata.uns[K.DEFAULT_KEY]["spot_gene_layers"] is False
    assert np.isfinite(adata.varm[K.saliency_key(K.DEFAULT_KEY)]).all()


def _fit(n: int, epoch_samples: int | None, max_epochs: int = 3, max_steps: int | None = None):
    torch.manual_seed(0)
    module = nn.Linear(5, 4)
    x = torch.randn(n, 5)

    def nll(batch, eps):
        (xb,) = batch
        out = module(xb)
        mu, logvar = out[:, :2], out[:, 2:].clamp(-5, 5)
        return ((xb[:, :2] - mu) ** 2).sum(1), mu, logvar

    return fit_vae(
        module,
        (x,),
        nll,
        n_latent=2,
        seed=0,
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        batch_size=16,
        kl_warmup_epochs=1,
        epoch_samples=epoch_samples,
        max_steps=max_steps,
        progress=False,
    )


def test_epoch_samples_bounds_the_steps_and_leaves_small_data_unchanged() -> None:
    # small data: a cap at or above the training set changes nothing
    full = _fit(100, None)
    capped = _fit(100, 90)
    assert full[0] == capped[0] and full[2]["steps"] == capped[2]["steps"] == 3 * 6
    # large data: rounds of 32 samples = 2 steps each, whatever n
    for n in (1000, 5000):
        hist, _, params = _fit(n, 32, max_epochs=4)
        assert params["steps"] == 8 and len(hist["train"]) == 4


def test_max_steps_ends_training_mid_round() -> None:
    # 100 samples: 90 train = 6 steps an epoch; a budget of 10 = one full epoch and 4 steps
    hist, kept, params = _fit(100, None, max_epochs=5, max_steps=10)
    assert params["steps"] == 10 and params["max_steps"] == 10 and len(hist["train"]) == 2
    assert 1 <= kept <= 2
    # a budget beyond the epochs changes nothing
    assert _fit(100, None, max_epochs=3, max_steps=1000)[0] == _fit(100, None)[0]
    with pytest.raises(InputError, match="max_steps"):
        _fit(100, None, max_steps=0)


def test_rasterise_max_side_coarsens_large_grids() -> None:
    xy = np.c_[np.arange(1000) % 50, np.arange(1000) // 50].astype(float) * 3.0
    rows, cols, shape = rasterise_spots(xy)
    assert shape == (20, 50)
    rows, cols, shape = rasterise_spots(xy, max_side=16)
    assert max(shape) <= 16 and rows.max() < shape[0] and cols.max() < shape[1]
    same = rasterise_spots(xy, max_side=64)
    assert same[2] == (20, 50)


@pytest.mark.parametrize("n", [5])
def test_tiny_inputs_still_train(n: int) -> None:
    adata = _toy(n=n, g=20)
    model = SpotVAE(adata, n_latent=2, n_hidden=8, n_top_genes=None, device="cpu")
    model.train(max_epochs=2, kl_warmup_epochs=1, progress=False)
    assert model.get_latent_representation().shape == (n, 2)


def test_read_without_saliency_layers_keeps_the_rest(tmp_path) -> None:
    from neuroexplain.io.atomic import write_h5ad
    from neuroexplain.st.run import read_h5ad_input

    adata = _toy()
    model = SpotVAE(adata, n_latent=4, n_hidden=16, n_top_genes=50, device="cpu")
    model.train(max_epochs=1, kl_warmup_epochs=1, progress=False)
    concept_saliency(adata, model, label_key="layer", min_spots=5)
    path = write_h5ad(adata, tmp_path / "c.h5ad")
    full = read_h5ad_input(path)
    part = read_h5ad_input(path, skip_layers=K.spot_gene_layer_prefix(K.DEFAULT_KEY))
    skipped = {K.spot_gene_layer_key(K.DEFAULT_KEY, c) for c in "ABC"}
    assert skipped <= set(full.layers) and set(part.layers) == set(full.layers) - skipped
    assert (part.layers["counts"] != full.layers["counts"]).nnz == 0
    assert set(part.obsm) == set(full.obsm) and set(part.varm) == set(full.varm)
    assert set(part.uns[K.DEFAULT_KEY]) == set(full.uns[K.DEFAULT_KEY])
    pd.testing.assert_frame_equal(part.obs, full.obs)
    np.testing.assert_array_equal(
        part.varm[K.saliency_key(K.DEFAULT_KEY)], full.varm[K.saliency_key(K.DEFAULT_KEY)]
    )
    with pytest.raises(InputError, match="cannot read"):
        (tmp_path / "bad.h5ad").write_text("not hdf5")
        read_h5ad_input(tmp_path / "bad.h5ad", skip_layers="x")
