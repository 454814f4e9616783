# Downstream evaluations of each run's selected checkpoint, one rule per protocol, all written once
# below; each writes a metrics JSON with its provenance. The top-level `protocols:` list chooses which
# ones `all` asks for.

# protocol (the rule and the `mugs` command) → the checkpoint it evaluates, its metrics file, its log.
# knn and linear also evaluate the random-init baseline (workflow/rules/baselines.smk): the same
# command on the checkpoint of `evaluated_checkpoint`, writing into results/{run}/random-init/.
EVALUATIONS = {
    "knn": (
        evaluated_checkpoint,
        "results/{run}/{evaluated}/knn.json",
        "results/logs/knn-{run}-{evaluated}.log",
    ),
    "linear": (
        evaluated_checkpoint,
        "results/{run}/{evaluated}/linear.json",
        "results/logs/linear-{run}-{evaluated}.log",
    ),
    "fewshot": (
        "results/{run}/eval/selected.pt",
        "results/{run}/eval/fewshot.json",
        "results/logs/fewshot-{run}.log",
    ),
    "finetune": (
        "results/{run}/eval/selected.pt",
        "results/{run}/eval/finetune.json",
        "results/logs/finetune-{run}.log",
    ),
}

for protocol, (checkpoint, metrics, log_file) in EVALUATIONS.items():

    # the command is an f-string, so that its text (Snakemake's rerun trigger on code) and the
    # params are what they were with a rule written per protocol; `keys=` binds this protocol's
    # settings, which a lambda would otherwise read from the loop's last protocol
    rule:
        name:
            protocol
        input:
            checkpoint,
        output:
            metrics,
        log:
            log_file,
        conda:
            "../../envs/mugs.yaml"
        threads: rule_threads(protocol)
        resources:
            **rule_resources(protocol),
        params:
            config_files=lambda w: RUN_FILES[w.run],
            settings=lambda w, keys=PROTOCOL_SETTINGS[protocol]: settings(w.run, *keys),
        shell:
            f"mugs {protocol} {{input:q}} --out {{output:q}} --config {{params.config_files:q}}"
            " --run {wildcards.run:q} --no-progress 2>&1 | tee {log:q}"
