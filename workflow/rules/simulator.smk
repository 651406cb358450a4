# The simulator network (Liu et al. 2021): a conditional warping U-Net trained against the frozen
# classifier to inject the disease into healthy images and remove it from diseased ones; the
# Jacobian of its deformation, in each subject's native space, is the explanation.


if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["simulator"]["activate"]
):

    rule train_simulator:
        input:
            preproc=MRI_INGEST["preproc"],
            model=CLASSIFIER["model"],
            logits=CLASSIFIER["logits"],
            split=CLASSIFIER["split"],
            quality=CLASSIFIER["quality"],
        output:
            model=SIMULATOR["model"],
            train_log=SIMULATOR["train_log"],
            summary=report(
                SIMULATOR["train_summary"],
                caption="../report/simulator_training.rst",
                category="MRI simulator",
            ),
        log:
            "logs/simulator/train_simulator.log",
        benchmark:
            "results/benchmarks/simulator/train_simulator.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: branch_threads()
        resources:
            mem_mb=8000,
            runtime=240,
            gpu=gpu,
        params:
            args=train_simulator_args,
        shell:
            "neuroexplain train-simulator --preproc {input.preproc:q} --classifier {input.model:q}"
            " --logits {input.logits:q} --split {input.split:q} --out {output.model:q}"
            " --threads {threads} {params.args} > {log} 2>&1"

    rule simulate:
        input:
            preproc=MRI_INGEST["preproc"],
            simulator=SIMULATOR["model"],
            model=CLASSIFIER["model"],
            split=CLASSIFIER["split"],
            quality=CLASSIFIER["quality"],
        output:
            report(
                directory(SIMULATOR["maps"]),
                patterns=["{name,[^/]+}.json", "{name,[^/]+}.tsv"],
                caption="../report/simulator.rst",
                category="MRI simulator",
            ),
        log:
            "logs/simulator/simulate.log",
        benchmark:
            "results/benchmarks/simulator/simulate.tsv"
        conda:
            "../envs/neuroexplain.yaml"
        threads: branch_threads()
        resources:
            mem_mb=6000,
            runtime=60,
            gpu=gpu,
        params:
            args=simulate_args,
        shell:
            "neuroexplain simulate --preproc {input.preproc:q} --simulator {input.simulator:q}"
            " --classifier {input.model:q} --split {input.split:q} --out {output:q}"
            " --threads {threads} {params.args} > {log} 2>&1"

    ALL_TARGETS.extend([SIMULATOR["model"], SIMULATOR["maps"]])
