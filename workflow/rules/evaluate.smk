# Downstream evaluations of each run's selected checkpoint, one rule per protocol; each writes a
# metrics JSON with its provenance. The top-level `protocols:` list chooses which ones `all` asks for.


rule knn:
    input:
        "results/{run}/eval/selected.pt",
    output:
        "results/{run}/eval/knn.json",
    log:
        "results/logs/knn-{run}.log",
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
        " > {log:q} 2>&1"


rule linear:
    input:
        "results/{run}/eval/selected.pt",
    output:
        "results/{run}/eval/linear.json",
    log:
        "results/logs/linear-{run}.log",
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
        " > {log:q} 2>&1"


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
        " > {log:q} 2>&1"


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
        " > {log:q} 2>&1"
