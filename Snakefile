# Entry point: the workflow lives in workflow/Snakefile (see its header for the results/ layout).
# Snakemake forgets an included file's default target, so it is named again here.


include: "workflow/Snakefile"


rule default:
    default_target: True
    input:
        rules.all.input,
