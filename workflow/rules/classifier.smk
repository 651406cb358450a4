# The 3D MRI classifier every MRI explanation method explains, its quality gate (every stage that
# explains it waits for results/classifier/quality.json, which is only written when the test AUC
# reaches quality.min_auc; quality.html, the same decision as a table, opens the report), its baseline attribution maps (gradient, gradient x input,
# SmoothGrad, Integrated Gradients, Grad-CAM, occlusion) in each subject's native space, the
# classifier's reliance on each region (region transplants in a paired cohort), and the
# ground-truth evaluation of all maps of the synthetic cohort.


if config["mri"]["activate"] and config["classifier"]["activate"]:

    rule train_classifier:
        input:
            MRI_INGEST["preproc"],
        output:
            model=CLASSIFIER["model"],
            metrics=report(
                CLASSIFIER["metrics"],
                caption="../report/classifier.rst",
                category="MRI classifier",
            ),
            logits=CLASSIFIER["logits"],
            split=CLASSIFIER["split"],
        log:
            "logs/classifier/train_classifier.log",
        benchmark:
            "results/benchmarks/classifier/train_classifier.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: 2
        resources:
            mem_mb=6000,
            runtime=120,
            gpu=gpu,
        params:
            out=out_dir,
            args=train_classifier_args,
        shell:
            "neuroexplain train-classifier --preproc {input:q} --out {params.out:q}"
            " --threads {threads} {params.args} > {log} 2>&1"

    rule classifier_quality:
        input:
            metrics=CLASSIFIER["metrics"],
            ingest=MRI_INGEST["meta"],
        output:
            json=CLASSIFIER["quality"],
            # the report lists categories in lexicographic order: "1. ..." comes first
            table=report(
                CLASSIFIER["quality_table"],
                caption="../report/quality.rst",
                category="1. Classifier quality",
            ),
        log:
            "logs/classifier/classifier_quality.log",
        conda:
            "../envs/neuroexplain.yaml"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=5,
        params:
            min_auc=config["quality"]["min_auc"],
            linear=(
                "--allow-linear-reference"
                if config["quality"]["allow_linear_reference"]
                else "--no-allow-linear-reference"
            ),
        shell:
            "neuroexplain check-classifier --metrics {input.metrics:q} --min-auc {params.min_auc}"
            " {params.linear} --warnings {input.ingest:q} --out {output.json:q}"
            " --table {output.table:q} > {log} 2>&1"

    ALL_TARGETS.extend(
        [
            CLASSIFIER["model"],
            CLASSIFIER["metrics"],
            CLASSIFIER["quality"],
            CLASSIFIER["quality_table"],
        ]
    )


if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["cohort"]["activate"]
    and config["cohort"]["paired"]
    and config["mri"]["regions"]
):

    rule region_reliance:
        input:
            preproc=MRI_INGEST["preproc"],
            model=CLASSIFIER["model"],
            split=CLASSIFIER["split"],
            quality=CLASSIFIER["quality"],
        output:
            table=RELIANCE["table"],
            summary=report(
                RELIANCE["summary"],
                caption="../report/reliance.rst",
                category="MRI classifier",
            ),
            json=RELIANCE["json"],
        log:
            "logs/classifier/region_reliance.log",
        benchmark:
            "results/benchmarks/classifier/region_reliance.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: 1
        resources:
            mem_mb=3000,
            runtime=30,
        params:
            stem=output_stem,
            args=region_reliance_args,
        shell:
            "neuroexplain region-reliance --preproc {input.preproc:q}"
            " --checkpoint {input.model:q} --split {input.split:q} --out {params.stem:q}"
            " --threads {threads} {params.args} > {log} 2>&1"

    ALL_TARGETS.append(RELIANCE["summary"])


if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["saliency"]["activate"]
):

    rule saliency:
        input:
            preproc=MRI_INGEST["preproc"],
            model=CLASSIFIER["model"],
            split=CLASSIFIER["split"],
            quality=CLASSIFIER["quality"],
        output:
            directory(SALIENCY_DIR),
        log:
            "logs/saliency/saliency.log",
        benchmark:
            "results/benchmarks/saliency/saliency.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: branch_threads()
        resources:
            mem_mb=6000,
            runtime=120,
            gpu=gpu,
        params:
            args=saliency_args,
        shell:
            "neuroexplain saliency --preproc {input.preproc:q} --checkpoint {input.model:q}"
            " --split {input.split:q} --out {output:q} --threads {threads} {params.args}"
            " > {log} 2>&1"

    ALL_TARGETS.append(SALIENCY_DIR)


if config["mri"]["activate"] and config["cohort"]["activate"] and MAP_MANIFESTS:

    rule evaluate_maps:
        input:
            unpack(evaluate_maps_input),
        output:
            json=report(
                EVALUATION["json"],
                caption="../report/evaluation.rst",
                category="Evaluation against ground truth",
            ),
            md=report(
                EVALUATION["md"],
                caption="../report/evaluation.rst",
                category="Evaluation against ground truth",
            ),
            subjects=report(
                EVALUATION["subjects"],
                caption="../report/evaluation.rst",
                category="Evaluation against ground truth",
            ),
        log:
            "logs/evaluation/evaluate_maps.log",
        benchmark:
            "results/benchmarks/evaluation/evaluate_maps.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=60,
        params:
            stem=evaluation_stem,
            args=evaluate_maps_args,
        shell:
            "neuroexplain evaluate-maps --cohort {input.cohort:q} --out {params.stem:q}"
            " {params.args} > {log} 2>&1"

    ALL_TARGETS.extend([EVALUATION["json"], EVALUATION["md"]])
