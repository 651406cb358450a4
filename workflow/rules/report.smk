# Figures of the report (`snakemake --report results/report.html`): every registered MRI map and
# the cohort's ground truth over the native T1w of a few diseased subjects, and the mean
# log-Jacobian per region. The other stages mark their own tables and figures for the report.


if (
    config["mri"]["activate"]
    and config["figures"]["activate"]
    and (config["cohort"]["activate"] or MAP_MANIFESTS)
):

    rule figures:
        input:
            unpack(figures_input),
        output:
            **figures_regions_output(),
            maps=report(
                directory(FIGURES["maps"]),
                patterns=["{method}.png"],
                caption="../report/figures_maps.rst",
                category="Figures",
                subcategory="Maps on the native T1w",
                labels={"method": "{method}"},
            ),
        log:
            "logs/figures/figures.log",
        benchmark:
            "results/benchmarks/figures/figures.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            args=figures_args,
        shell:
            "neuroexplain figures --subjects {input.subjects:q} --out {output.maps:q}"
            " {params.args} > {log} 2>&1"

    ALL_TARGETS.append(FIGURES["maps"])
    ALL_TARGETS.extend(str(path) for path in figures_regions_output().values())
