# Pretraining runs on the submitting host (a local rule): with `launch.launcher: slurm` it submits
# one multi-node job through submitit and waits for it without holding an allocation itself.
# The checkpoint directory is not an output, so a rerun resumes instead of starting over; a
# parameter change sets the earlier run aside (`--restart-if-changed`) and trains afresh.


rule pretrain:
    input:
        PREPARED,
    output:
        run_path("done"),
    log:
        "results/logs/pretrain-{run}.log",
    localrule: True
    conda:
        "../../envs/mugs.yaml"
    # with the SLURM launcher it runs on the host, which has sbatch (the image has not); the job itself
    # runs in launch.container
    container:
        None if LAUNCHER == "slurm" else CONTAINER_IMAGE
    threads: rule_threads("pretrain")
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(w.run, *RESULT_KEYS["pretrain"]),
        launcher=LAUNCHER,
    shell:
        "mugs pretrain --config {params.config_files:q} --run {wildcards.run:q} --launcher {params.launcher:q}"
        " --restart-if-changed --no-progress 2>&1 | tee {log:q}"
