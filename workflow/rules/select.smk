# Checkpoint selection: kNN on the validation split (never test) over the checkpoints a run kept.


rule select:
    input:
        "results/{run}/pretrain/DONE",
    output:
        selection="results/{run}/eval/selection.json",
        checkpoint="results/{run}/eval/selected.pt",
    log:
        "results/logs/select-{run}.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("select")
    resources:
        **rule_resources("select"),
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(
            w.run,
            "evaluate.network",
            "evaluate.selection_policy",
            "evaluate.selection_k",
            "evaluate.knn_temperature",
        ),
    shell:
        "mugs select results/{wildcards.run}/pretrain --out-dir results/{wildcards.run}/eval"
        " --config {params.config_files} --run {wildcards.run} --no-progress > {log} 2>&1"
