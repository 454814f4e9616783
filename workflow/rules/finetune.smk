# Fine-tuning is a long job: it goes through the pretraining launcher (here on N processes, or one
# SLURM job that requeues itself and resumes exactly), with launch.jobs.finetune's settings over
# launch's. With the SLURM launcher the rule runs on the host, which submits (and reattaches to) the
# job, as the pretrain rule does; its state lives in results/{run}/eval/finetune/.
rule finetune:
    input:
        run_path("selected"),
    output:
        run_path("metrics", "{run}", "finetune"),
    log:
        "results/logs/finetune-{run}.log",
    localrule: FINETUNE_LAUNCHER == "slurm"
    conda:
        "../../envs/mugs.yaml"
    container:
        None if FINETUNE_LAUNCHER == "slurm" else CONTAINER_IMAGE
    threads: rule_threads("finetune")
    resources:
        **({} if FINETUNE_LAUNCHER == "slurm" else rule_resources("finetune")),
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(w.run, *RESULT_KEYS["finetune"]),
        launcher=FINETUNE_LAUNCHER,
    shell:
        "mugs finetune {input:q} --out {output:q} --config {params.config_files:q} --run {wildcards.run:q}"
        " --launcher {params.launcher:q} --no-progress 2>&1 | tee {log:q}"
