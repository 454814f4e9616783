# Checkpoint selection: kNN on the validation split (never test) over the checkpoints a run kept.


rule select:
    input:
        run_path("done"),
    output:
        selection=run_path("selection"),
        checkpoint=run_path("selected"),
    log:
        "results/logs/select-{run}.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("select")
    resources:
        **rule_resources("select"),
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(w.run, *RESULT_KEYS["select"]),
        pretrain_dir=lambda w: pretrain_dir(w.run),
        eval_dir=lambda w, output: os.path.dirname(output.selection),
    shell:
        "mugs select {params.pretrain_dir:q} --out-dir {params.eval_dir:q}"
        " --config {params.config_files:q} --run {wildcards.run:q} --no-progress 2>&1 | tee {log:q}"
