"""``neuroexplain st-concepts`` and ``neuroexplain st-evaluate`` (concept saliency on ST data).

Brocki & Chung (2019), concept saliency maps for a VAE over spatial-transcriptomics spots; see
:mod:`neuroexplain.st.concepts`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from neuroexplain.cli import app
from neuroexplain.cli._common import DeviceOption, parse_named_lists
from neuroexplain.cli._settings import settings_options
from neuroexplain.settings import STConceptsConfig


def _read_h5ad(path: Path):
    import warnings

    import anndata as ad

    from neuroexplain.errors import InputError

    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types for a bad file
        raise InputError(path, f"cannot read as .h5ad: {type(exc).__name__}: {exc}") from exc


def _read_spot_concepts(path: Path) -> dict[str, list[str]]:
    """A two-column table (TSV/CSV): ``spot`` and ``concept`` -> ``{concept: [spots]}``."""
    import pandas as pd

    from neuroexplain.errors import InputError

    if not path.is_file():
        raise InputError(path, "file not found")
    sep = "," if path.suffix == ".csv" else "\t"
    df = pd.read_csv(path, sep=sep, dtype=str)
    if not {"spot", "concept"} <= set(df.columns):
        raise InputError(path, f"expected columns 'spot' and 'concept', got {list(df.columns)}")
    df = df.dropna(subset=["spot", "concept"])
    return {str(c): [str(s) for s in g["spot"]] for c, g in df.groupby("concept", sort=True)}


@app.command("st-concepts")
@settings_options(config=STConceptsConfig)
def st_concepts_cmd(
    config: STConceptsConfig,
    adata_path: Path = typer.Option(
        ..., "--adata", help="Input .h5ad (ingest-st layout: raw counts layer, .obsm['spatial'])."
    ),
    label_key: str = typer.Option(
        ...,
        "--label-key",
        help=".obs column with the layer label (NaN = unlabelled); one concept per layer.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output .h5ad with latent, scores, saliency, ranked genes."
    ),
    figures: Path | None = typer.Option(
        None, "--figures", help="Folder for PNG figures (scores, top-gene heatmap, gene-mode maps)."
    ),
    layer: str = typer.Option("counts", "--layer", help="Layer with raw counts ('X' for .X)."),
    gene_concepts: str = typer.Option(
        "", "--gene-concepts", help="Extra concepts from gene sets: 'name:G1,G2;name2:G3,G4'."
    ),
    spot_concepts: Path | None = typer.Option(
        None,
        "--spot-concepts",
        help="Extra concepts from spot lists: TSV/CSV with columns spot, concept.",
    ),
    genemode_seeds: str = typer.Option(
        "",
        "--genemode-seeds",
        help="Seed genes of the gene-as-image mode, e.g. Penk,Doc2g,Kctd12 ('' = skip).",
    ),
    spot_gene_out: Path | None = typer.Option(
        None,
        "--spot-gene-out",
        help="Write per-concept spots x genes saliency to this .h5ad instead of --out layers.",
    ),
    model_dir: Path | None = typer.Option(
        None, "--model-dir", help="Also save the trained spot VAE here (model.pt)."
    ),
    key: str = typer.Option(
        "concept_saliency", "--key", help="key_added: prefix of every AnnData key written."
    ),
    device: DeviceOption = "auto",
    threads: int = typer.Option(
        1, "--threads", help="CPU threads for torch (0 = torch default; small models: 1 is best)."
    ),
) -> None:
    """Train a spot VAE and compute concept scores and concept saliency maps per layer."""
    import logging

    import torch

    from neuroexplain.errors import InputError
    from neuroexplain.io.atomic import output_group, write_h5ad
    from neuroexplain.io.paths import check_outputs
    from neuroexplain.st import concept_keys as K
    from neuroexplain.st.concepts import (
        concept_saliency,
        genemode,
        spot_gene_saliency,
        spot_labels,
    )
    from neuroexplain.st.vae import SpotVAE, get_counts

    log = logging.getLogger("neuroexplain.cli.st")
    check_outputs(
        [
            (out, "file", "--out"),
            (figures, "folder", "--figures"),
            (model_dir, "folder", "--model-dir"),
            (spot_gene_out, "file", "--spot-gene-out"),
        ]
    )
    if threads > 0:
        torch.set_num_threads(threads)
    cfg, min_spots, seed = config, config.min_spots, config.seed
    layer_arg = None if layer == "X" else layer
    seeds = [s.strip() for s in genemode_seeds.split(",") if s.strip()]
    genes_c = parse_named_lists(gene_concepts, "--gene-concepts")
    spots_c = _read_spot_concepts(spot_concepts) if spot_concepts else None

    adata = _read_h5ad(adata_path)
    # validate everything a user can get wrong before spending time on training
    try:
        get_counts(adata, layer_arg)
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
        spot_labels(adata, label_key, min_spots=min_spots)
        missing = [s for s in seeds if s not in set(map(str, adata.var_names))]
        if missing:
            raise InputError("--genemode-seeds", f"seed genes not in var_names: {missing}")
        if seeds and K.SPATIAL_KEY not in adata.obsm:
            raise InputError(f"adata.obsm[{K.SPATIAL_KEY!r}]", "expected spot coordinates")
        var_names, obs_names = set(map(str, adata.var_names)), set(map(str, adata.obs_names))
        for cname, genes in genes_c.items():
            if not genes or any(g not in var_names for g in genes):
                missing = [g for g in genes if g not in var_names] or genes
                raise InputError(
                    "--gene-concepts", f"{cname}: genes not in var_names: {missing[:5]}"
                )
        for cname, spots in (spots_c or {}).items():
            missing = [sp for sp in spots if sp not in obs_names]
            if missing:
                raise InputError(spot_concepts, f"{cname}: spots not in obs_names: {missing[:5]}")
    except InputError as exc:
        raise InputError(adata_path, str(exc)) from exc

    model = SpotVAE(
        adata,
        n_latent=cfg.n_latent,
        likelihood=cfg.likelihood,  # type: ignore[arg-type]
        layer=layer_arg,
        n_top_genes=cfg.n_top_genes or None,
        seed=seed,
        device=device,
    )
    model.train(max_epochs=cfg.epochs)
    try:
        concept_saliency(
            adata,
            model,
            label_key=label_key,
            method=cfg.method,  # type: ignore[arg-type]
            saliency=cfg.saliency,  # type: ignore[arg-type]
            spot_concepts=spots_c,
            gene_concepts=genes_c or None,
            min_spots=min_spots,
            store_spot_gene=True,
            seed=seed,
            inputs=[adata_path],
            key_added=key,
        )
        if seeds:
            genemode(
                adata,
                seeds,
                layer=layer_arg,
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
            for lk in [k for k in adata.layers.keys() if k.startswith(f"{key}_saliency_")]:
                del adata.layers[lk]
            log.info("wrote spots x genes saliency to %s", spot_gene_out)
        write_h5ad(adata, out)
    log.info("wrote %s", out)


@app.command("st-evaluate")
def st_evaluate_cmd(
    adata_path: Path = typer.Option(..., "--adata", help="Output .h5ad of st-concepts."),
    label_key: str = typer.Option(..., "--label-key", help=".obs column with the layer label."),
    out: Path = typer.Option(..., "--out", help="Metrics JSON."),
    key: str = typer.Option("concept_saliency", "--key", help="key_added used by st-concepts."),
    n_top: int = typer.Option(50, "--n-top", help="Size of the top gene lists compared."),
    markers: str = typer.Option(
        "GCL:Penk,Nrgn;MCL:Doc2g,Cdhr1",
        "--markers",
        help="Known markers 'LAYER:G1,G2;LAYER2:G3' ('' = none).",
    ),
    top_percent: float = typer.Option(
        1.0, "--top-percent", help="A marker passes within this top percentage of ranked genes."
    ),
    cv_folds: int = typer.Option(
        5, "--cv-folds", help="Folds of the cross-validated layer classification."
    ),
    min_spots: int = typer.Option(5, "--min-spots", help="Fewest labelled spots a layer may have."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fold split and classifiers."),
) -> None:
    """Compare concept-saliency gene rankings with Wilcoxon markers; layer accuracy from scores."""
    import logging

    from neuroexplain.errors import InputError
    from neuroexplain.io.atomic import write_json
    from neuroexplain.io.paths import check_output
    from neuroexplain.provenance import provenance
    from neuroexplain.st.evaluate import evaluate_concepts

    check_output(out, "file")
    adata = _read_h5ad(adata_path)
    params = {
        "label_key": label_key,
        "key": key,
        "n_top": n_top,
        "markers": markers,
        "top_percent": top_percent,
        "cv_folds": cv_folds,
        "min_spots": min_spots,
    }
    try:
        metrics = evaluate_concepts(
            adata,
            label_key=label_key,
            key=key,
            n_top=n_top,
            markers=parse_named_lists(
                markers, "--markers", name="LAYER", item="GENE", allow_empty=True
            ),
            top_percent=top_percent,
            cv_folds=cv_folds,
            min_spots=min_spots,
            seed=seed,
        )
    except InputError as exc:
        raise InputError(adata_path, str(exc)) from exc
    metrics["provenance"] = provenance(
        params, seed=seed, inputs=[adata_path], command="st-evaluate"
    )
    write_json(metrics, out)
    logging.getLogger("neuroexplain.cli.st").info(
        "mean top-%d overlap %.3f, CV accuracy %.3f -> %s",
        n_top,
        metrics["mean_overlap"],
        metrics["classification"]["accuracy"],
        out,
    )
