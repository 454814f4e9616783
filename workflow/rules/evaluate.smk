# Downstream evaluations of each run's selected checkpoint, one rule per protocol, all written once
# below; each writes a metrics JSON with its provenance. The top-level `protocols:` list chooses which
# ones `all` asks for.

# protocol (the rule and the `mugs` command) → the checkpoint it evaluates, its metrics file, its log.
# knn and linear also evaluate the random-init baseline (workflow/rules/baselines.smk): the same
# command on the checkpoint of `evaluated_checkpoint`, writing into results/{run}/random-init/.
EVALUATIONS = {
    "knn": (
        evaluated_checkpoint,
        run_path("metrics", "{run}", "knn", "{evaluated}"),
        "results/logs/knn-{run}-{evaluated}.log",
    ),
    "linear": (
        evaluated_checkpoint,
        run_path("metrics", "{run}", "linear", "{evaluated}"),
        "results/logs/linear-{run}-{evaluated}.log",
    ),
    "fewshot": (
        run_path("selected"),
        run_path("metrics", "{run}", "fewshot"),
        "results/logs/fewshot-{run}.log",
    ),
}


def evaluation_rule(protocol, checkpoint, metrics, log_file):
    """Define the rule `protocol`, which runs `mugs <protocol>` on `checkpoint`."""

    # A function, not the body of a loop over the protocols: Snakemake evaluates the shell text twice,
    # where the rule is defined (the command that dry runs print, that its code rerun trigger and
    # dvc.yaml read) and again inside the job's run function when the job runs, where a loop variable
    # would hold the last protocol by then; here each rule's run function keeps its own `protocol`.
    # The text is the one each rule had when written out by hand, so nothing reruns.
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
            settings=lambda w: settings(w.run, *RESULT_KEYS[protocol]),
        shell:
            f"mugs {protocol} {{input:q}} --out {{output:q}} --config {{params.config_files:q}}"
            " --run {wildcards.run:q} --no-progress 2>&1 | tee {log:q}"


for protocol, paths in EVALUATIONS.items():
    evaluation_rule(protocol, *paths)
