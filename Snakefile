# Mugs pretraining and evaluation: prepare → pretrain → select → evaluate → report, with baselines
# (random initialisation, raw pixels) evaluated beside every run.
# `snakemake --profile slurm all` on a cluster, `snakemake --profile profiles/local all` on a laptop.
from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "params.yaml"


# The schema is generated from mugs/config.py (`mugs schema`); its defaults are the published recipe's, not
# this file's preset, so they are not filled in.
validate(config, "workflow/schemas/config.schema.yaml", set_default=False)

# The image every rule runs in with `--sdm apptainer` (build it: apptainer build mugs.sif envs/mugs.def);
# `--config container_image=docker://...` or a path picks another. Without --sdm apptainer it is unused.
CONTAINER_IMAGE = config.get("container_image", "mugs.sif")


container: CONTAINER_IMAGE


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/report.smk"


# Every evaluation output is named here, not only the report: Snakemake treats a missing file whose
# consumers' outputs are up to date as a removed intermediate and would not rebuild it.
rule all:
    default_target: True
    input:
        expand(rules.select.output, run=RUNS),
        rules.report.input.metrics,
        rules.report.input.baselines,
        rules.report.output,
