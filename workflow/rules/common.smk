# Shared helpers: the runs, their resolved settings, and per-rule cluster resources.
import json
import os
import sys

from mugs.config import (
    RUN_NAME,
    ConfigError,
    files_shaping_run,
    for_job,
    load_config,
    read_yaml,
)
from mugs.data.sources import DataError
from mugs.data.state import refresh_data_state, state_path
from mugs.result_keys import RESULT_KEYS
from mugs.rundir import WorkflowRun

# The parameter files in the order Snakemake merges them (params.yaml, then each --configfile on
# top), relative so that commands (and the dvc.yaml generated from them) do not depend on where the
# checkout lives: Snakemake makes configfiles given on its command line absolute. The `mugs`
# commands read them too, so a --configfile that adds a run or changes a value reaches the jobs.
_COMMAND_LINE_FILES = [os.path.relpath(p) for p in workflow.config_settings.configfiles]
_WORKFLOW_FILES = (
    []
    if getattr(workflow.config_settings, "replace_workflow_config", False)
    else [os.path.relpath(p) for p in workflow.configfiles]
)
PARAMS = [
    p for p in _WORKFLOW_FILES if p not in _COMMAND_LINE_FILES
] + _COMMAND_LINE_FILES
# the runs in the order the files define them (Snakemake's merged config puts a --configfile's runs
# first), so that the first run, whose settings the data rules read, stays the first when a file
# adds a run; then any run given only with --config, which load_config below rejects by name
RUNS = list(
    dict.fromkeys(
        [
            run
            for path in PARAMS
            for run in read_yaml(path).get("runs") or {}
            if run in config["runs"]
        ]
        + list(config["runs"])
    )
)
LAUNCHER = config.get("launcher", config.get("launch", {}).get("launcher", "local"))

# Validate every run's settings before anything is scheduled: errors name the file and the key. The
# schema has checked each value; this checks the rules between them, and stops with the one line (an
# exception raised here would print its frames after it).
try:
    RUN_CONFIGS = {run: load_config(PARAMS, run=run) for run in RUNS}
except ConfigError as error:
    sys.exit(f"Error in the configuration: {error}")
# what each run's commands read (`--config {params.config_files}`): the files that shape it
RUN_FILES = {run: files_shaping_run(PARAMS, run) for run in RUNS}
DATA = RUN_CONFIGS[RUNS[0]].data  # data.* is shared by every run
# fine-tuning's launcher: launch.jobs.finetune.launcher, else launch.launcher (`--config launcher=` sets both)
FINETUNE_LAUNCHER = config.get(
    "launcher", for_job(RUN_CONFIGS[RUNS[0]], "finetune").launch.launcher
)
PREPARED = DATA.prepared_dir
# The data's fingerprint (prepare's input), refreshed here by a stat pass: rewritten only when an image
# was modified, added or removed. Only in the main process: cluster jobs parse this file again. A root
# that does not exist yet is the demo's, which rule data_state fingerprints once demo_data made it.
DATA_STATE = str(state_path(DATA))
if workflow.is_main_process and os.path.exists(DATA.root):
    try:
        refresh_data_state(DATA)
    except DataError as error:
        sys.exit(f"Error in the data (data.root): {error}")


# Plain progress lines (position, rate, time left) every `progress_every` seconds in each job's log,
# which the rules also `tee` to the terminal. The `mugs` commands read it from the environment (the
# local jobs inherit it, `envvars` passes it to cluster jobs): no result depends on it, so changing it
# reruns nothing.
os.environ["MUGS_PROGRESS_EVERY"] = str(config.get("progress_every", 10))


envvars:
    "MUGS_PROGRESS_EVERY",


wildcard_constraints:
    run=RUN_NAME,
    evaluated="eval|random-init",


def run_path(what, run="{run}", *args):
    """The path `what` of run `run` in the workflow's layout (mugs.rundir.WorkflowRun's attribute,
    or its method called with `args`), as text; `run` defaults to the rules' `{run}` wildcard.
    """
    value = getattr(WorkflowRun(run), what)
    return str(value(*args) if callable(value) else value)


# What the knn and linear rules evaluate: a run's selected checkpoint (results/{run}/eval/) or the
# same networks at their random initialisation (results/{run}/random-init/, a baseline).
EVALUATED_CHECKPOINTS = {
    "eval": run_path("selected"),
    "random-init": run_path("random_init_checkpoint"),
}
BASELINE_PROTOCOLS = {"random-init": ("knn", "linear"), "raw-pixels": ("knn",)}
RAW_PIXELS = "results/baselines/raw-pixels"


def evaluated_checkpoint(wildcards):
    return EVALUATED_CHECKPOINTS[wildcards.evaluated].format(run=wildcards.run)


def baselines():
    """(name in the report, metrics directory, metrics files) of every baseline `all` asks for: each
    run's random initialisation and the raw pixels, with the protocols they have among `protocols:`.
    """
    chosen = [
        (f"{run} at random init", run_path("random_init", run), "random-init")
        for run in RUNS
    ] + [("raw pixels", RAW_PIXELS, "raw-pixels")]
    listed = []
    for name, directory, kind in chosen:
        files = [
            f"{directory}/{protocol}.json"
            for protocol in BASELINE_PROTOCOLS[kind]
            if protocol in config["protocols"]
        ]
        if files:
            listed.append((name, directory, files))
    return listed


def run_config(run):
    return RUN_CONFIGS[run]


def pretrain_dir(run):
    return RUN_CONFIGS[run].train.output_dir


def settings(run, *keys):
    """The resolved values of dotted ``keys`` for ``run`` (None: the data rules' run); a rule reruns
    when one of them changes."""
    values = RUN_CONFIGS[run or RUNS[0]].to_dict()
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


def evaluation_outputs(run):
    return [run_path("metrics", run, protocol) for protocol in config["protocols"]]


for _run, _config in RUN_CONFIGS.items():
    if _config.train.output_dir != run_path("pretrain_dir", _run):
        raise ValueError(
            f"{' + '.join(PARAMS)}: run {_run!r} has train.output_dir={_config.train.output_dir!r}; the workflow "
            f"expects {run_path('pretrain_dir')} (write `output_dir: {run_path('pretrain_dir')}` under train:)"
        )
