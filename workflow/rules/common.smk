# Shared helpers: the runs, their resolved settings, and per-rule cluster resources.
import json
import os

from mugs.config import load_config

# relative, so that commands (and the dvc.yaml generated from them) do not depend on where the
# checkout lives: Snakemake makes configfiles given on its command line absolute
PARAMS = (
    os.path.relpath(workflow.configfiles[0]) if workflow.configfiles else "params.yaml"
)
RUNS = list(config["runs"])
LAUNCHER = config.get("launcher", config.get("launch", {}).get("launcher", "local"))

# Validate every run's settings before anything is scheduled: errors name the file and the key.
RUN_CONFIGS = {run: load_config(PARAMS, run=run) for run in RUNS}
DATA = next(iter(RUN_CONFIGS.values())).data
PREPARED = DATA.prepared_dir


def run_config(run):
    return RUN_CONFIGS[run]


def pretrain_dir(run):
    return RUN_CONFIGS[run].train.output_dir


def settings(run, *keys):
    """The resolved values of dotted ``keys`` for ``run``: a rule reruns when one of them changes."""
    values = (
        RUN_CONFIGS[run].to_dict()
        if run
        else next(iter(RUN_CONFIGS.values())).to_dict()
    )
    picked = {}
    for key in keys:
        value = values
        for part in key.split("."):
            value = value[part]
        picked[key] = value
    return json.dumps(picked, sort_keys=True)


def rule_threads(rule_name):
    """Threads (torch intra-op threads) as cpus_per_task says; Snakemake caps them at --cores."""
    return int(rule_resources(rule_name).get("cpus_per_task", 1))


def rule_resources(rule_name):
    """``resources.default`` updated with ``resources.<rule>`` from the parameter file."""
    table = config.get("resources", {})
    return {**table.get("default", {}), **table.get(rule_name, {})}


PROTOCOL_SETTINGS = {
    "knn": (
        "evaluate.network",
        "evaluate.knn_k",
        "evaluate.knn_temperature",
        "evaluate.knn_split",
    ),
    "linear": (
        "evaluate.network",
        "evaluate.linear_n_last_blocks",
        "evaluate.linear_avgpool",
        "evaluate.linear_epochs",
        "evaluate.linear_batch_size",
        "evaluate.linear_lrs",
        "evaluate.linear_weight_decays",
        "evaluate.linear_seed",
    ),
    "fewshot": (
        "evaluate.network",
        "evaluate.fewshot_fractions",
        "evaluate.fewshot_seed",
        "evaluate.fewshot_c",
        "evaluate.fewshot_max_iter",
    ),
    "finetune": ("finetune",),
}


def evaluation_outputs(run):
    return [f"results/{run}/eval/{protocol}.json" for protocol in config["protocols"]]


for _run, _config in RUN_CONFIGS.items():
    if _config.train.output_dir != f"results/{_run}/pretrain":
        raise ValueError(
            f"{PARAMS}: run {_run!r} has train.output_dir={_config.train.output_dir!r}; the workflow "
            "expects results/{run}/pretrain (write `output_dir: results/{run}/pretrain` under train:)"
        )
