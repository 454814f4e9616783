"""DVC's view of the workflow: ``dvc.yaml`` generated from the Snakemake DAG, so the two never drift.

Each Snakemake job of target ``all`` becomes one DVC stage (``rule`` or ``rule-run``) whose command is
the job's own ``mugs`` command, whose deps are the job's inputs, whose params are the dotted keys
the rule declares in its ``settings`` parameter (plus the run's own ``runs.<run>`` overrides), and
whose outs are the job's outputs (the data's fingerprint, ``data_state``, is an always-changed stage
without deps: DVC never hashes the raw images). Metrics files are declared as ``metrics`` and the
report's curves as ``plots``, both cached: ``results/`` is ignored by git, so the DVC cache and remote
are what keep earlier commits' values for ``dvc metrics diff``/``dvc plots diff`` and what ``dvc pull``
restores. A pretraining run directory is a persistent output, so ``dvc repro`` resumes it instead of
deleting it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Rules DVC does not run: `all` is only a target, and the demo data are tracked by data.dvc.
SKIPPED_RULES = frozenset({"all", "demo_data"})
# Rules whose output marker stands for a directory that must survive reruns (resumable checkpoints).
PERSISTENT_RULES = frozenset({"pretrain"})
# Rules that must run at every `dvc repro` (DVC has no other way to notice a change inside a directory
# without hashing it): the data's stat-pass fingerprint, which rewrites its output only when the data
# changed. Its input (the data root, for the demo's ordering in Snakemake) is no dep, so DVC never
# hashes the raw images; its output, a few hundred bytes, persists between runs and is cached, so that
# `dvc pull` restores it with the manifests it describes.
ALWAYS_CHANGED_RULES = frozenset({"data_state"})
# Rules whose JSON outputs are metrics.
METRICS_RULES = frozenset({"select", "knn", "linear", "fewshot", "finetune", "raw_pixel_knn"})
# CSV outputs that DVC draws as plots: (rule, folder name) → plot properties (columns of the CSV).
PLOTS = {("report", "curves"): {"x": "step", "y": "loss"}}
# a rule's output copied into its log (`2>&1 | tee LOG`): DVC shows the output and keeps no log
_LOG_REDIRECT = re.compile(r"\s*2>&1\s*\|\s*tee\s+\S+\s*$")


@dataclass(frozen=True)
class JobView:
    """What a DVC stage needs to know about one Snakemake job."""

    rule: str
    wildcards: dict[str, str]
    inputs: list[str]
    outputs: list[str]
    settings: dict[str, Any]
    command: str


def snakemake_jobs(snakefile: Path, configfile: Path, workdir: Path) -> list[JobView]:
    """The jobs of target ``all``, as Snakemake builds them (every job, as with ``--forceall``)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[configfile]),
            snakefile=snakefile,
            workdir=workdir,
        )
        dag_api = workflow_api.dag(DAGSettings(targets={"all"}, forceall=True))
        workflow = dag_api.workflow_api._workflow
        dag_api._check()
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        views = []
        for job in workflow.dag.jobs:
            if job.rule.name in SKIPPED_RULES:
                continue
            params = dict(job.params)
            views.append(
                JobView(
                    rule=job.rule.name,
                    wildcards=dict(job.wildcards),
                    inputs=[str(f) for f in job.input],
                    outputs=[str(f) for f in job.output],
                    settings=json.loads(params.get("settings", "{}")),
                    command=_LOG_REDIRECT.sub("", job.format_wildcards(job.rule.shellcmd)).strip(),
                )
            )
    return sorted(views, key=lambda v: (v.rule, sorted(v.wildcards.items())))


def _has_key(values: dict[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def stage_name(job: JobView) -> str:
    """``rule``, ``rule-run``, or ``rule-run-random-init`` for an evaluation of the random-init baseline
    (a trained run's evaluations, ``evaluated=eval``, keep the short name)."""
    parts = [job.rule, job.wildcards.get("run"), job.wildcards.get("evaluated")]
    return "-".join(part for part in parts if part and part != "eval")


def build_stage(job: JobView, params_file: str, params_values: dict[str, Any]) -> dict[str, Any]:
    """One DVC stage for ``job``; every param key listed must exist in the parameter file."""
    stage: dict[str, Any] = {"cmd": job.command}
    if job.rule in ALWAYS_CHANGED_RULES:
        stage["always_changed"] = True
        stage["outs"] = [{output: {"persist": True}} for output in job.outputs]
        return stage
    if job.inputs:
        stage["deps"] = sorted(set(job.inputs))
    keys = sorted(job.settings)
    missing = [key for key in keys if not _has_key(params_values, key)]
    if missing:
        raise ValueError(
            f"{params_file} lacks {', '.join(missing)} (rule {job.rule}); DVC tracks only keys written in "
            "the file, so write them out (`mugs presets NAME` prints every value)"
        )
    run = job.wildcards.get("run")
    if run and _has_key(params_values, f"runs.{run}"):
        keys.append(f"runs.{run}")
    if keys:
        stage["params"] = [{params_file: keys}] if params_file != "params.yaml" else keys
    outs: list[Any] = []
    metrics: list[Any] = []
    plots: list[Any] = []
    for output in job.outputs:
        name = Path(output).name
        if job.rule in PERSISTENT_RULES:
            outs.append({str(Path(output).parent): {"persist": True}})
        elif name.endswith(".csv") and (job.rule, Path(output).parent.name) in PLOTS:
            plots.append({output: PLOTS[(job.rule, Path(output).parent.name)]})
        elif job.rule in METRICS_RULES and name.endswith(".json"):
            metrics.append(output)
        else:
            outs.append(output)
    for key, value in (("outs", outs), ("metrics", metrics), ("plots", plots)):
        if value:
            stage[key] = value
    return stage


def render_dvc_yaml(jobs: list[JobView], params_file: str, params_values: dict[str, Any]) -> str:
    stages = {stage_name(job): build_stage(job, params_file, params_values) for job in jobs}
    header = (
        "# Generated from the Snakefile by `mugs dvc-yaml`; do not edit by hand.\n"
        "# tests/test_workflow.py fails when this file and the Snakefile disagree.\n"
    )
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=100)


def generate(root: Path, params_file: str = "params.yaml") -> str:
    """The ``dvc.yaml`` text for the workflow in ``root``."""
    root = root.resolve()
    params_values = yaml.safe_load((root / params_file).read_text())
    jobs = snakemake_jobs(root / "Snakefile", root / params_file, root)
    return render_dvc_yaml(jobs, params_file, params_values)
