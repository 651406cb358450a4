"""Stage runner of ``neuroexplain st-concepts``: load -> train and explain -> write.

Brocki & Chung (2019), concept saliency maps for a VAE over spatial-transcriptomics spots (see
:mod:`neuroexplain.st.concepts`). The command (:mod:`neuroexplain.cli.st`) only parses its
options and calls :func:`run_st_concepts`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroexplain.errors import InputError

__all__ = [
    "check_st_concepts_outputs",
    "read_h5ad_input",
    "read_spot_concepts",
    "run_st_concepts",
]

PathArg = str | os.PathLike[str]

# the name the messages of ``st-concepts`` have always carried (``neuroexplain.cli.st: ...``)
logger = logging.getLogger("neuroexplain.cli.st")


def read_h5ad_input(path: PathArg, *, skip_layers: str | None = None) -> Any:
    """Read an input ``.h5ad``; a missing or unreadable file is an :class:`InputError`.

    Args:
        path: the file.
        skip_layers: leave out the ``.layers`` whose names start with this prefix (e.g. the
            spots x genes saliency layers, hundreds of MB, that the evaluation does not read);
            ``None`` reads everything.
    """
    import warnings

    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if skip_layers is None:
                return ad.read_h5ad(path)
            return _read_h5ad_without(path, skip_layers)
    except Exception as exc:  # h5py / anndata raise many types for a bad file
        raise InputError(path, f"cannot read as .h5ad: {type(exc).__name__}: {exc}") from exc


def _read_h5ad_without(path: Path, prefix: str) -> Any:
    """``anndata.read_h5ad`` without the ``.layers`` named ``prefix...`` (never decompressed)."""
    import h5py
    from anndata.experimental import read_dispatched
    from anndata.io import read_elem

    def callback(func: Any, elem_name: str, elem: Any, iospec: Any) -> Any:
        if elem_name == "/layers":
            return {k: read_elem(elem[k]) for k in elem.keys() if not k.startswith(prefix)}
        return func(elem)

    with h5py.File(path, "r") as f:
        return read_dispatched(f, callback)


def read_spot_concepts(path: PathArg) -> dict[str, list[str]]:
    """A two-column table (TSV/CSV): ``spot`` and ``concept`` -> ``{concept: [spots]}``."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    sep = "," if path.suffix == ".csv" else "\t"
    df = pd.read_csv(path, sep=sep, dtype=str)
    if not {"spot", "concept"} <= set(df.columns):
        raise InputError(path, f"expected columns 'spot' and 'concept', got {list(df.columns)}")
    df = df.dropna(subset=["spot", "concept"])
    return {str(c): [str(s) for s in g["spot"]] for c, g in df.groupby("concept", sort=True)}


def check_st_concepts_outputs(
    out: PathArg,
    *,
    figures: PathArg | None = None,
    model_dir: PathArg | None = None,
    spot_gene_out: PathArg | None = None,
) -> None:
    """Refuse unusable outputs of ``st-concepts`` before any work (no side effect)."""
    from neuroexplain.io.paths import check_outputs

    check_outputs(
        [
            (out, "file", "--out"),
            (figures, "folder", "--figures"),
            (model_dir, "folder", "--model-dir"),
            (spot_gene_out, "file", "--spot-gene-out"),
        ]
    )


@dataclass
class _STInputs:
    """What :func:`run_st_concepts` loads and checks before training."""

    adata: Any
    layer: str | None
    seeds: list[str]
    genes_c: dict[str, list[str]]
    spots_c: dict[str, list[str]] | None


def _check_concept_inputs(
    adata: Any,
    label_key: str,
    cfg: Any,
    inp: _STInputs,
    spot_concepts: PathArg | None,
) -> None:
    """Everything a user can get wrong, checked before spending time on training."""
    from neuroexplain.st import concept_keys as K
    from neuroexplain.st.concepts import spot_labels
    from neuroexplain.st.vae import get_counts

    seeds, genes_c, spots_c = inp.seeds, inp.genes_c, inp.spots_c
    get_counts(adata, inp.layer)
    # bound the work by the number of concepts before anything grows with it (every concept
    # keeps a spots x genes saliency layer; a column of 244 categories needed 21.6 GB)
    n_layers = len(spot_labels(adata, label_key, min_spots=1).cat.categories)
    n_concepts = n_layers + len(genes_c) + len(spots_c or {})
    if n_concepts > cfg.max_concepts:
        extra = n_concepts - n_layers
        raise InputError(
            f"adata.obs[{label_key!r}]",
            f"{n_layers} categories make {n_concepts} concepts"
            + (f" (with {extra} gene / spot concepts)" if extra else "")
            + f", more than --max-concepts {cfg.max_concepts} (each keeps a spots x genes "
            "saliency layer); raise --max-concepts or choose a --label-key with fewer "
            "categories",
        )
    spot_labels(adata, label_key, min_spots=cfg.min_spots)
    missing = [s for s in seeds if s not in set(map(str, adata.var_names))]
    if missing:
        raise InputError("--genemode-seeds", f"seed genes not in var_names: {missing}")
    if seeds and K.SPATIAL_KEY not in adata.obsm:
        raise InputError(f"adata.obsm[{K.SPATIAL_KEY!r}]", "expected spot coordinates")
    var_names, obs_names = set(map(str, adata.var_names)), set(map(str, adata.obs_names))
    for cname, genes in genes_c.items():
        if not genes or any(g not in var_names for g in genes):
            missing = [g for g in genes if g not in var_names] or genes
            raise InputError("--gene-concepts", f"{cname}: genes not in var_names: {missing[:5]}")
    for cname, spots in (spots_c or {}).items():
        missing = [sp for sp in spots if sp not in obs_names]
        if missing:
            raise InputError(spot_concepts, f"{cname}: spots not in obs_names: {missing[:5]}")


def _load_st_inputs(
    adata_path: PathArg,
    label_key: str,
    cfg: Any,
    *,
    layer: str,
    gene_concepts: Mapping[str, Sequence[str]] | None,
    spot_concepts: PathArg | None,
    genemode_seeds: Sequence[str],
) -> _STInputs:
    """Read the spot concepts and the AnnData and check them (errors name ``adata_path``)."""
    seeds = [s.strip() for s in genemode_seeds if s.strip()]
    genes_c = {k: list(v) for k, v in (gene_concepts or {}).items()}
    spots_c = read_spot_concepts(spot_concepts) if spot_concepts else None
    adata = read_h5ad_input(adata_path)
    inp = _STInputs(adata, None if layer == "X" else layer, seeds, genes_c, spots_c)
    try:
        _check_concept_inputs(adata, label_key, cfg, inp, spot_concepts)
    except InputError as exc:
        raise InputError(adata_path, str(exc)) from exc
    return inp


def _train_and_explain(
    adata_path: PathArg,
    label_key: str,
    cfg: Any,
    inp: _STInputs,
    *,
    key: str,
    device: str,
    spot_gene_out: PathArg | None = None,
) -> Any:
    """Train the spot VAE; concept scores and saliency (and the gene mode) into the AnnData."""
    from neuroexplain.st.concepts import concept_saliency, genemode
    from neuroexplain.st.vae import SpotVAE

    adata, seed = inp.adata, cfg.seed
    model = SpotVAE(
        adata,
        n_latent=cfg.n_latent,
        likelihood=cfg.likelihood,  # type: ignore[arg-type]
        layer=inp.layer,
        n_top_genes=cfg.n_top_genes or None,
        seed=seed,
        device=device,
    )
    model.train(max_epochs=cfg.epochs, max_steps=cfg.max_steps or None)
    try:
        concept_saliency(
            adata,
            model,
            label_key=label_key,
            method=cfg.method,  # type: ignore[arg-type]
            saliency=cfg.saliency,  # type: ignore[arg-type]
            spot_concepts=inp.spots_c,
            gene_concepts=inp.genes_c or None,
            min_spots=cfg.min_spots,
            store_spot_gene=True,
            # asked for in a file of their own: always; in --out: within the size limit
            max_spot_gene_mb=None if spot_gene_out else (cfg.spot_gene_max_mb or None),
            seed=seed,
            inputs=[adata_path],
            key_added=key,
        )
        if inp.seeds:
            genemode(
                adata,
                inp.seeds,
                layer=inp.layer,
                n_top_genes=cfg.genemode_n_genes or None,
                max_epochs=cfg.genemode_epochs,
                saliency=cfg.saliency,  # type: ignore[arg-type]
                seed=seed,
                device=device,
                inputs=[adata_path],
                key_added=key,
            )
    except InputError as exc:
        raise InputError(adata_path, str(exc)) from exc
    return model


def _write_st_outputs(
    adata: Any,
    model: Any,
    out: PathArg,
    *,
    label_key: str,
    key: str,
    figures: PathArg | None,
    spot_gene_out: PathArg | None,
    model_dir: PathArg | None,
) -> None:
    """Write the model, figures, spots x genes saliency and the AnnData: all or nothing."""
    from neuroexplain.io.atomic import output_group, write_h5ad
    from neuroexplain.st.concepts import drop_spot_gene_layers, spot_gene_saliency

    # only once every check passed; all or nothing (a full disk half-way removes them again)
    with output_group(model_dir, figures):
        if model_dir is not None:
            model.save(model_dir)
        if figures is not None:
            from neuroexplain.st.plotting import save_figures

            save_figures(adata, figures, label_key=label_key, key=key)
        if spot_gene_out is not None:
            sg = spot_gene_saliency(adata, key=key)
            write_h5ad(sg, spot_gene_out)
            drop_spot_gene_layers(adata, key=key)
            logger.info("wrote spots x genes saliency to %s", spot_gene_out)
        write_h5ad(adata, out)
    logger.info("wrote %s", out)


def run_st_concepts(
    adata_path: PathArg,
    label_key: str,
    out: PathArg,
    *,
    config: Any,
    figures: PathArg | None = None,
    layer: str = "counts",
    gene_concepts: Mapping[str, Sequence[str]] | None = None,
    spot_concepts: PathArg | None = None,
    genemode_seeds: Sequence[str] = (),
    spot_gene_out: PathArg | None = None,
    model_dir: PathArg | None = None,
    key: str = "concept_saliency",
    device: str = "auto",
    threads: int = 1,
) -> None:
    """Train a spot VAE and compute concept scores and concept saliency maps per layer.

    Args:
        adata_path: input ``.h5ad`` (ingest-st layout: raw counts layer, ``.obsm['spatial']``).
        label_key: ``.obs`` column with the layer label (NaN = unlabelled); a concept per layer.
        out: output ``.h5ad`` with latent, scores, saliency and ranked genes.
        config: the stage's :class:`~neuroexplain.settings.STConceptsConfig`.
        figures: folder for PNG figures (``None``: none).
        layer: layer with raw counts (``"X"`` for ``.X``).
        gene_concepts: extra concepts from gene sets ``{name: [genes]}``.
        spot_concepts: TSV/CSV of extra concepts from spot lists (columns spot, concept).
        genemode_seeds: seed genes of the gene-as-image mode (empty: skipped).
        spot_gene_out: write the per-concept spots x genes saliency here instead of ``out``.
        model_dir: also save the trained spot VAE here (``model.pt``).
        key: ``key_added``, prefix of every AnnData key written.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: CPU threads for torch (0: torch's default).
    """
    import torch

    check_st_concepts_outputs(
        out, figures=figures, model_dir=model_dir, spot_gene_out=spot_gene_out
    )
    if threads > 0:
        torch.set_num_threads(threads)
    inp = _load_st_inputs(
        adata_path,
        label_key,
        config,
        layer=layer,
        gene_concepts=gene_concepts,
        spot_concepts=spot_concepts,
        genemode_seeds=genemode_seeds,
    )
    model = _train_and_explain(
        adata_path, label_key, config, inp, key=key, device=device, spot_gene_out=spot_gene_out
    )
    _write_st_outputs(
        inp.adata,
        model,
        out,
        label_key=label_key,
        key=key,
        figures=figures,
        spot_gene_out=spot_gene_out,
        model_dir=model_dir,
    )
