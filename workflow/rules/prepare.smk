# Data: the demo copies Debian's Fashion-MNIST files into data.root; `prepare` validates, hashes
# and indexes whatever data.root holds.


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


rule prepare:
    input:
        DATA.root,
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
