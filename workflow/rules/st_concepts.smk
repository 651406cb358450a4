# Concept saliency maps (Brocki & Chung 2019) on the ingested spatial transcriptomics: a spot VAE,
# one concept vector per labelled layer, saliency of each concept score w.r.t. the genes, and the
# evaluation against scanpy's Wilcoxon markers.


if config["st"]["activate"] and config["st_concepts"]["activate"]:

    rule st_concepts:
        input:
            ST_H5AD,
        output:
            adata=ST_CONCEPTS["adata"],
            figures=report(
                directory(ST_CONCEPTS["figures"]),
                patterns=["{name}.png"],
                caption="../report/st_concepts.rst",
                category="Spatial transcriptomics",
            ),
            model=directory(ST_CONCEPTS["model"]),
        log:
            "logs/st_concepts/st_concepts.log",
        benchmark:
            "results/benchmarks/st_concepts/st_concepts.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            args=st_concepts_args,
        shell:
            "neuroexplain st-concepts --adata {input:q} --out {output.adata:q}"
            " --figures {output.figures:q} --model-dir {output.model:q}"
            " --threads {threads} {params.args} > {log} 2>&1"

    rule st_evaluate:
        input:
            ST_CONCEPTS["adata"],
        output:
            report(
                ST_CONCEPTS["metrics"],
                caption="../report/st_evaluate.rst",
                category="Spatial transcriptomics",
            ),
        log:
            "logs/st_concepts/st_evaluate.log",
        conda:
            "../envs/neuroexplain.yaml"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=20,
        params:
            args=st_evaluate_args,
        shell:
            "neuroexplain st-evaluate --adata {input:q} --out {output:q} {params.args}"
            " > {log} 2>&1"

    ALL_TARGETS.extend([ST_CONCEPTS["adata"], ST_CONCEPTS["metrics"]])
