"""``snakemake --profile slurm all`` (the repository's own profile) against the real two-node test cluster.

The tiny pipeline of tests/test_workflow.py, with ``launch.launcher: slurm`` on 2 nodes × 1 task: every
rule but ``pretrain`` must run as its own SLURM job through snakemake's slurm executor, and ``pretrain``
on the submitting host, launching one 2-node job through submitit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from workflow_helpers import PROTOCOLS, RUN, assert_outputs, copy_worktree, sh, tiny_params, tool_env

if TYPE_CHECKING:  # conftest is pytest's to import; importing it again would make a second module
    from tests.integration.conftest import SlurmCluster

pytestmark = pytest.mark.slurm

WORKFLOW_TIMEOUT_S = 420
# one job per rule, plus the baselines: the random init's checkpoint, its knn and linear, raw pixels
SLURM_RULES = ["prepare", "select", *PROTOCOLS, "report", "random_init", "knn", "linear", "raw_pixel_knn"]
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
SACCT_FIELDS = ("JobID", "JobName", "State", "AllocNodes", "NodeList", "WorkDir")


def _cluster_env(cluster: SlurmCluster) -> dict[str, str]:
    """The tools' environment plus what the cluster adds (SLURM_CONF)."""
    return tool_env(**{key: value for key, value in cluster.env.items() if os.environ.get(key) != value})


def _sacct(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    line = cluster.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", ",".join(SACCT_FIELDS)).strip()
    return dict(zip(SACCT_FIELDS, line.splitlines()[-1].split("|"), strict=True))


@pytest.fixture(scope="module")
def slurm_workflow(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the repository with the tiny params on the cluster, run once; returns (repo, log)."""
    base = tmp_path_factory.mktemp("slurm-workflow")
    base.chmod(0o755)
    repo = copy_worktree(base / "repo")
    tiny_params(
        repo,
        launch={
            "launcher": "slurm",
            "nodes": 2,
            "tasks_per_node": 1,
            "cpus_per_task": 1,
            "partition": "cpu",
            # over 10 min: submitit takes any signal within 10 min of the limit for a time-out
            "timeout_min": 30,
            "signal_delay_s": 30,
            "poll_seconds": 1.0,
        },
        # what the test nodes have (2 CPUs each); the profile's defaults ask for more
        resources={"default": {"slurm_partition": "cpu", "runtime": 10, "mem_mb": 1000, "cpus_per_task": 1}},
    )
    command = [
        "snakemake",
        "all",
        "--profile",
        "slurm",
        # the plugin waits 40 s before its first status check by default: most of this test's jobs last 10 s
        "--slurm-init-seconds-before-status-checks",
        "2",
    ]
    done = subprocess.run(
        command,
        cwd=repo,
        env=_cluster_env(slurm_cluster),
        capture_output=True,
        text=True,
        timeout=WORKFLOW_TIMEOUT_S,
    )
    log = done.stdout + done.stderr
    (base / "snakemake.log").write_text(log)
    assert done.returncode == 0, f"snakemake --profile slurm all failed ({done.returncode}):\n{log[-10000:]}"
    return repo, log


def test_every_expected_output(slurm_workflow: tuple[Path, str]) -> None:
    repo, _ = slurm_workflow
    assert_outputs(repo)


def test_every_rule_but_pretrain_runs_as_its_own_slurm_job(
    slurm_workflow: tuple[Path, str], slurm_cluster: SlurmCluster
) -> None:
    repo, log = slurm_workflow
    # the plugin logs each job under <slurm-logdir>/<rule>/<wildcards>/<job id>.log
    submitted = {
        job_id: Path(path).relative_to(repo / "results/logs/slurm").parts[0].removeprefix("rule_")
        for job_id, path in SUBMITTED.findall(log)
    }
    assert sorted(submitted.values()) == sorted(SLURM_RULES)
    for job_id, rule in submitted.items():
        record = _sacct(slurm_cluster, job_id)
        assert record["State"] == "COMPLETED", f"{rule}: {record}"
        assert record["AllocNodes"] == "1"
        assert Path(record["WorkDir"]) == repo
    assert re.search(r"localrule pretrain:", log)


def test_pretraining_is_one_two_node_submitit_job(
    slurm_workflow: tuple[Path, str], slurm_cluster: SlurmCluster
) -> None:
    repo, _ = slurm_workflow
    run_dir = repo / "results" / RUN / "pretrain"
    record = json.loads((run_dir / "slurm" / "job.json").read_text())
    assert record["tasks"] == 2 and record["earlier_job_ids"] == []
    job = _sacct(slurm_cluster, record["job_id"])
    assert job["JobName"] == "mugs-pretrain"
    assert job["State"] == "COMPLETED"
    assert job["AllocNodes"] == "2"
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    assert checkpoint["world_size"] == 2
    assert checkpoint["global_iteration"] == 2 * checkpoint["iterations_per_epoch"]


def test_a_second_run_has_nothing_to_do(
    slurm_workflow: tuple[Path, str], slurm_cluster: SlurmCluster
) -> None:
    repo, _ = slurm_workflow
    done = sh("snakemake", "all", "--profile", "slurm", "-n", cwd=repo, env=_cluster_env(slurm_cluster))
    assert "Nothing to be done" in done.stdout + done.stderr
