# Data: fetch the public demo data (only when data.mirror lacks them), plant the synthetic
# disease cohort, and ingest MRI and spatial transcriptomics into the model-ready formats.


rule fetch_ixi:
    output:
        directory(IXI_RESOURCE),
    log:
        "logs/fetch/ixi.log",
    conda:
        "../envs/neuroexplain.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    params:
        args=fetch_ixi_args,
    shell:
        "neuroexplain fetch-data ixi --out {output:q} {params.args} > {log} 2>&1"


rule fetch_mob:
    output:
        counts=MOB_RESOURCE["counts"],
        spots=MOB_RESOURCE["spots"],
    log:
        "logs/fetch/mob.log",
    conda:
        "../envs/neuroexplain.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        out=out_dir,
    shell:
        "neuroexplain fetch-data mob --out {params.out:q} > {log} 2>&1"


if config["mri"]["activate"] and config["cohort"]["activate"]:

    rule make_cohort:
        input:
            bids=cohort_input,
        output:
            directory(COHORT_DIR),
        log:
            "logs/cohort/make_cohort.log",
        benchmark:
            "results/benchmarks/cohort/make_cohort.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: 2
        resources:
            mem_mb=4000,
            runtime=60,
        params:
            args=make_cohort_args,
        shell:
            "neuroexplain make-cohort --bids {input.bids:q} --out {output:q} {params.args}"
            " --workers {threads} > {log} 2>&1"


if config["mri"]["activate"]:

    rule ingest_mri:
        input:
            unpack(ingest_mri_input),
        output:
            preproc=MRI_INGEST["preproc"],
            subjects=MRI_INGEST["subjects"],
            meta=MRI_INGEST["meta"],
        log:
            "logs/ingest/mri.log",
        benchmark:
            "results/benchmarks/ingest/mri.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: 2
        resources:
            mem_mb=4000,
            runtime=60,
        params:
            out=out_dir,
            args=ingest_mri_args,
        shell:
            "neuroexplain ingest-mri --out {params.out:q} {params.args}"
            " --workers {threads} > {log} 2>&1"

    ALL_TARGETS.extend(MRI_INGEST.values())
    if config["cohort"]["activate"]:
        ALL_TARGETS.append(COHORT_DIR)


if config["st"]["activate"]:

    rule ingest_st:
        input:
            unpack(ingest_st_input),
        output:
            "results/ingest/st/{st_name}.h5ad",
        log:
            "logs/ingest/st_{st_name}.log",
        benchmark:
            "results/benchmarks/ingest/st_{st_name}.tsv"
        wildcard_constraints:
            st_name=config["st"]["name"],
        conda:
            "../envs/neuroexplain.yaml"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            args=ingest_st_args,
        shell:
            "neuroexplain ingest-st --out {output:q} {params.args} > {log} 2>&1"

    ALL_TARGETS.append(ST_H5AD)
