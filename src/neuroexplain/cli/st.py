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
    from neuroexplain.st.run import check_st_concepts_outputs, run_st_concepts

    # the outputs first, then the option syntax (the order of the messages of a bad call)
    check_st_concepts_outputs(
        out, figures=figures, model_dir=model_dir, spot_gene_out=spot_gene_out
    )
    run_st_concepts(
        adata_path,
        label_key,
        out,
        config=config,
        figures=figures,
        layer=layer,
        gene_concepts=parse_named_lists(gene_concepts, "--gene-concepts"),
        spot_concepts=spot_concepts,
        genemode_seeds=genemode_seeds.split(","),
        spot_gene_out=spot_gene_out,
        model_dir=model_dir,
        key=key,
        device=device,
        threads=threads,
    )


@app.command("st-evaluate")
def st_evaluate_cmd(
    adata_path: Path = typer.Option(..., "--adata", help="Output .h5ad of st-concepts."),
    label_key: str = typer.Option(..., "--label-key", help=".obs column with the layer label."),
    out: Path = typer.Option(..., "--out", help="Metrics JSON."),
    key: str = typer.Option("concept_saliency", "--key", help="key_added used by st-concepts."),
    n_top: int = typer.Option(
        50,
        "--n-top",
        help="Size of the top gene lists compared (at most a quarter of the input genes).",
    ),
    markers: str = typer.Option(
        "GCL:Penk,Nrgn;MCL:Doc2g,Cdhr1",
        "--markers",
        help="Known markers 'LAYER:G1,G2;LAYER2:G3' ('' = none).",
    ),
    top_percent: float = typer.Option(
        1.0,
        "--top-percent",
        help="A marker passes within this top percentage of ranked genes (at least the top "
        "gene: rank <= max(1, ceil(n_genes * pct / 100))).",
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
    from neuroexplain.st import concept_keys as K
    from neuroexplain.st.evaluate import evaluate_concepts
    from neuroexplain.st.run import read_h5ad_input

    check_output(out, "file")
    # the spots x genes saliency layers (hundreds of MB at 10,000 spots) are not needed here
    adata = read_h5ad_input(adata_path, skip_layers=K.spot_gene_layer_prefix(key))
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
        "mean top-%d overlap %.3f (chance %.3f), markers within the top %d of %d genes: %s, "
        "CV accuracy %.3f -> %s",
        metrics["n_top_used"],
        metrics["mean_overlap"],
        metrics["overlap_chance"],
        metrics["top_k"],
        metrics["n_genes_ranked"],
        ", ".join(k for k, v in metrics["checks"].items() if "marker" in k and v) or "none",
        metrics["classification"]["accuracy"],
        out,
    )
