# Baselines that say what pretraining added, on the same splits and evaluation settings as the runs:
# each run's networks at their random initialisation (seeded by train.seed, as pretraining starts),
# evaluated by the knn and linear rules exactly as a trained checkpoint, and the raw pixels under the
# same kNN vote. Each reruns only when the settings it reads change.


rule random_init:
    # the networks do not read the data, but their evaluations do: as a trained run's through
    # pretraining, they wait for (and rerun after) the prepared splits
    input:
        PREPARED,
    output:
        run_path("random_init_checkpoint"),
    log:
        "results/logs/random_init-{run}.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("random_init")
    resources:
        **rule_resources("random_init"),
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(w.run, *RESULT_KEYS["random_init"]),
    shell:
        "mugs init-checkpoint --out {output:q} --config {params.config_files:q} --run {wildcards.run:q}"
        " 2>&1 | tee {log:q}"


rule raw_pixel_knn:
    input:
        PREPARED,
    output:
        f"{RAW_PIXELS}/knn.json",
    log:
        "results/logs/raw_pixel_knn.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("raw_pixel_knn")
    resources:
        **rule_resources("raw_pixel_knn"),
    params:
        config_files=RUN_FILES[RUNS[0]],
        run=RUNS[0],
        settings=settings(None, *RESULT_KEYS["raw_pixel_knn"]),
    shell:
        "mugs raw-pixel-knn --out {output:q} --config {params.config_files:q} --run {params.run:q}"
        " --no-progress 2>&1 | tee {log:q}"
