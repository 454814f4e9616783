# The report: training curves, kNN per kept checkpoint, every run's accuracies side by side with the
# baselines', a t-SNE of test features and last-block attention maps; a summary table in markdown and
# JSON.

REPORT = "results/report"


rule report:
    input:
        done=expand(run_path("done"), run=RUNS),
        selections=expand(run_path("selection"), run=RUNS),
        metrics=[path for run in RUNS for path in evaluation_outputs(run)],
        baselines=[path for _, _, files in baselines() for path in files],
    output:
        summary=f"{REPORT}/summary.md",
        table=f"{REPORT}/summary.json",
        curves=report(
            f"{REPORT}/curves.png",
            caption="../report/curves.rst",
            category="Training",
        ),
        knn=report(
            f"{REPORT}/knn_checkpoints.png",
            caption="../report/knn_checkpoints.rst",
            category="Selection",
        ),
        accuracy=report(
            f"{REPORT}/accuracy.png",
            caption="../report/accuracy.rst",
            category="Evaluation",
        ),
        tsne=report(
            f"{REPORT}/tsne.png", caption="../report/tsne.rst", category="Features"
        ),
        attention=report(
            expand(f"{REPORT}/attention-{{run}}.png", run=RUNS),
            caption="../report/attention.rst",
            category="Features",
        ),
        plots=expand(f"{REPORT}/curves/{{run}}.csv", run=RUNS),
        curves_json=expand(f"{REPORT}/curves/{{run}}.json", run=RUNS),
    log:
        "results/logs/report.log",
    conda:
        "../../envs/mugs.yaml"
    threads: rule_threads("report")
    resources:
        **rule_resources("report"),
    params:
        # lists, so that `:q` quotes each path on its own
        runs=lambda w, input: [os.path.dirname(done) for done in input.done],
        names=RUNS,
        eval_dirs=lambda w, input: [os.path.dirname(s) for s in input.selections],
        out=lambda w, output: os.path.dirname(output.summary),
        baseline_names=[name for name, _, _ in baselines()],
        baseline_dirs=[directory for _, directory, _ in baselines()],
    shell:
        "mugs report --runs {params.runs:q} --names {params.names:q} --eval-dirs {params.eval_dirs:q}"
        " --baseline-names {params.baseline_names:q} --baseline-dirs {params.baseline_dirs:q}"
        " --out {params.out:q} --no-progress 2>&1 | tee {log:q}"
