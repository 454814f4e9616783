# Downstream evaluations of each run's selected checkpoint, one rule per protocol; each writes a
# metrics JSON with its provenance. The top-level `protocols:` list chooses which ones `all` asks for.


# knn and linear also evaluate the random-init baseline (workflow/rules/baselines.smk): the same
# command on the checkpoint of `evaluated_checkpoint`, writing into results/{run}/random-init/.
rule knn:
    input:
        evaluated_checkpoint,
    output:
        "results/{run}/{evaluated}/knn.json",
    log:
        "results/logs/knn-{run}-{evaluated}.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("knn")
    resources:
        **rule_resources("knn"),
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(w.run, *PROTOCOL_SETTINGS["knn"]),
    shell:
        "mugs knn {input:q} --out {output:q} --config {params.config_files:q} --run {wildcards.run:q} --no-progress"
        " 2>&1 | tee {log:q}"


rule linear:
    input:
        evaluated_checkpoint,
    output:
        "results/{run}/{evaluated}/linear.json",
    log:
        "results/logs/linear-{run}-{evaluated}.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("linear")
    resources:
        **rule_resources("linear"),
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(w.run, *PROTOCOL_SETTINGS["linear"]),
    shell:
        "mugs linear {input:q} --out {output:q} --config {params.config_files:q} --run {wildcards.run:q} --no-progress"
        " 2>&1 | tee {log:q}"


rule fewshot:
    input:
        "results/{run}/eval/selected.pt",
    output:
        "results/{run}/eval/fewshot.json",
    log:
        "results/logs/fewshot-{run}.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("fewshot")
    resources:
        **rule_resources("fewshot"),
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(w.run, *PROTOCOL_SETTINGS["fewshot"]),
    shell:
        "mugs fewshot {input:q} --out {output:q} --config {params.config_files:q} --run {wildcards.run:q} --no-progress"
        " 2>&1 | tee {log:q}"


rule finetune:
    input:
        "results/{run}/eval/selected.pt",
    output:
        "results/{run}/eval/finetune.json",
    log:
        "results/logs/finetune-{run}.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("finetune")
    resources:
        **rule_resources("finetune"),
    params:
        config_files=lambda w: RUN_FILES[w.run],
        settings=lambda w: settings(w.run, *PROTOCOL_SETTINGS["finetune"]),
    shell:
        "mugs finetune {input:q} --out {output:q} --config {params.config_files:q} --run {wildcards.run:q} --no-progress"
        " 2>&1 | tee {log:q}"
