# Data: the demo copies Debian's Fashion-MNIST files into data.root; `prepare` validates, hashes
# and indexes whatever data.root holds, which may be a read-only directory anywhere (nothing is written
# beside it).
#
# What `prepare` reads is the data's state (mugs/data/state.py): a fingerprint of a stat pass over the
# files it would read, rewritten only when that differs. common.smk refreshes it while Snakemake parses
# (Snakemake sees only a directory's own mtime, which a change inside a class folder leaves alone);
# `data_state` makes it when the data only appear during the run (the demo), and in DVC it is an
# always-changed stage, so `dvc repro` refreshes it too and never hashes the raw files.


if DATA.source == "fashion-mnist":

    rule demo_data:
        output:
            directory(DATA.root),
        log:
            "results/logs/demo_data.log",
        localrule: True
        conda:
            "../../envs/mugs.yaml"
        params:
            config_files=RUN_FILES[RUNS[0]],
            run=RUNS[0],
        shell:
            "mugs demo-data --config {params.config_files:q} --run {params.run:q} > {log:q} 2>&1"


rule data_state:
    input:
        # only so that the demo's data come first: when and how it changed is what the output records
        ancient(DATA.root),
    output:
        DATA_STATE,
    log:
        "results/logs/data_state.log",
    localrule: True
    conda:
        "../../envs/mugs.yaml"
    params:
        config_files=RUN_FILES[RUNS[0]],
        run=RUNS[0],
    shell:
        "mugs data-state --config {params.config_files:q} --run {params.run:q} 2>&1 | tee {log:q}"


rule prepare:
    input:
        DATA_STATE,
    output:
        directory(PREPARED),
    log:
        "results/logs/prepare.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("prepare")
    resources:
        **rule_resources("prepare"),
    params:
        config_files=RUN_FILES[RUNS[0]],
        run=RUNS[0],
        settings=settings(None, *RESULT_KEYS["prepare"]),
    shell:
        "mugs prepare --config {params.config_files:q} --run {params.run:q} --no-progress 2>&1 | tee {log:q}"
