# Concepts of the MRI classifier: TCAV scores of user-defined concepts against random concepts
# (Kim et al. 2018), and spatial activation concept vectors (SACV, Wang et al. 2022) whose
# relevance / contribution maps are written in each subject's native space.


if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["concepts3d"]["activate"]
):

    rule tcav:
        input:
            unpack(concepts3d_input),
        output:
            json=report(
                CONCEPTS3D["tcav"],
                caption="../report/tcav.rst",
                category="MRI concepts",
                subcategory="TCAV",
            ),
            table=report(
                CONCEPTS3D["tcav_table"],
                caption="../report/tcav.rst",
                category="MRI concepts",
                subcategory="TCAV",
            ),
            figure=report(
                CONCEPTS3D["tcav_figure"],
                caption="../report/tcav.rst",
                category="MRI concepts",
                subcategory="TCAV",
            ),
            cache=CONCEPTS3D["tcav_cache"],
        log:
            "logs/concepts3d/tcav.log",
        benchmark:
            "results/benchmarks/concepts3d/tcav.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: branch_threads()
        resources:
            mem_mb=6000,
            runtime=60,
            gpu=gpu,
        params:
            out=out_dir,
            participants=participants_args,
            args=tcav_args,
        shell:
            "neuroexplain tcav --preproc {input.preproc:q} --checkpoint {input.model:q}"
            " --split {input.split:q} --concepts {input.concepts:q} --out {params.out:q}"
            " --cache {output.cache:q} --threads {threads} {params.participants}"
            " {params.args} > {log} 2>&1"

    rule sacv:
        input:
            unpack(concepts3d_input),
        output:
            report(
                directory(CONCEPTS3D["sacv"]),
                patterns=["{name,[^/]+}.json", "{name,[^/]+}.tsv", "{name,[^/]+}.png"],
                caption="../report/sacv.rst",
                category="MRI concepts",
                subcategory="SACV {concept}",
            ),
        log:
            "logs/concepts3d/sacv_{concept}.log",
        benchmark:
            "results/benchmarks/concepts3d/sacv_{concept}.tsv"
        wildcard_constraints:
            concept="[A-Za-z0-9]+",
        conda:
            "../envs/neuroexplain.yaml"
        threads: branch_threads()
        resources:
            mem_mb=6000,
            runtime=60,
            gpu=gpu,
        params:
            participants=participants_args,
            args=sacv_args,
        shell:
            "neuroexplain sacv --preproc {input.preproc:q} --checkpoint {input.model:q}"
            " --split {input.split:q} --concepts {input.concepts:q} --out {output:q}"
            " --threads {threads} {params.participants} {params.args} > {log} 2>&1"

    ALL_TARGETS.extend([CONCEPTS3D["tcav"], CONCEPTS3D["tcav_table"]])
    ALL_TARGETS.extend(
        expand(CONCEPTS3D["sacv"], concept=config["concepts3d"]["sacv_concepts"])
    )


if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["xnn"]["activate"]
):

    rule xnn_train:
        input:
            preproc=MRI_INGEST["preproc"],
            model=CLASSIFIER["model"],
            split=CLASSIFIER["split"],
            quality=CLASSIFIER["quality"],
        output:
            model=XNN["model"],
            metrics=report(
                XNN["train"],
                caption="../report/xnn_train.rst",
                category="MRI XNN",
            ),
            train_log=XNN["train_log"],
        log:
            "logs/xnn/xnn_train.log",
        benchmark:
            "results/benchmarks/xnn/xnn_train.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: branch_threads()
        resources:
            mem_mb=6000,
            runtime=60,
            gpu=gpu,
        params:
            out=out_dir,
            args=xnn_train_args,
        shell:
            "neuroexplain xnn-train --preproc {input.preproc:q} --checkpoint {input.model:q}"
            " --split {input.split:q} --out {params.out:q} --threads {threads}"
            " {params.args} > {log} 2>&1"

    rule xnn_explain:
        input:
            preproc=MRI_INGEST["preproc"],
            model=CLASSIFIER["model"],
            split=CLASSIFIER["split"],
            quality=CLASSIFIER["quality"],
            srae=XNN["model"],
        output:
            report(
                directory(XNN["maps"]),
                patterns=["{name,[^/]+}.json", "{name,[^/]+}.tsv", "{name,[^/]+}.png"],
                caption="../report/xnn_explain.rst",
                category="MRI XNN",
            ),
        log:
            "logs/xnn/xnn_explain.log",
        benchmark:
            "results/benchmarks/xnn/xnn_explain.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: branch_threads()
        resources:
            mem_mb=6000,
            runtime=60,
            gpu=gpu,
        params:
            args=xnn_explain_args,
        shell:
            "neuroexplain xnn-explain --preproc {input.preproc:q} --checkpoint {input.model:q}"
            " --split {input.split:q} --srae {input.srae:q} --out {output:q}"
            " --threads {threads} {params.args} > {log} 2>&1"

    ALL_TARGETS.extend([XNN["model"], XNN["train"], XNN["maps"]])
