# Mugs pretraining and evaluation: prepare → pretrain → select → evaluate → report.
# `snakemake --profile slurm all` on a cluster, `snakemake --profile profiles/local all` on a laptop.
from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "params.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
