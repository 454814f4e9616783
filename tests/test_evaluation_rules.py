"""The evaluation rules, written once for every protocol (workflow/rules/evaluate.smk), each run their
own command: ``mugs knn`` for the knn rule, ``mugs finetune`` for the finetune rule, and so on.

Snakemake evaluates a rule's shell text twice: where the rule is defined (what a dry run prints) and
again inside the job's run function when the job runs. Rules defined in a loop that reads the loop
variable at run time print the right commands and then all run the last protocol's; so besides the
dry run, the jobs are run for real and their metrics files must say which evaluation wrote them.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from workflow_helpers import RUN, copy_worktree, sh, tiny_params

from mugs.testing.workflow import planned_jobs

PROTOCOLS = ("knn", "linear", "fewshot", "finetune")
# the tiny pipeline's fine-tuning cut to one short epoch, as its other evaluations are
TINY_FINETUNE = {"epochs": 1, "batch_size": 32, "warmup_epochs": 0}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the working tree with the tiny parameters and every protocol on."""
    repo = copy_worktree(tmp_path_factory.mktemp("evaluation-rules") / "repo")
    tiny_params(repo, protocols=list(PROTOCOLS), finetune=TINY_FINETUNE)
    return repo


def _shell_commands(snakemake_output: str) -> dict[str, list[str]]:
    """Rule → the shell commands Snakemake printed (``-p``) for its jobs."""
    commands: dict[str, list[str]] = {}
    rule = None
    for line in snakemake_output.splitlines():
        if match := re.fullmatch(r"(?:local)?rule (\w+):", line):
            rule = match[1]
        elif line.startswith("Shell command: ") and rule is not None:
            commands.setdefault(rule, []).append(line.removeprefix("Shell command: "))
    return commands


def _assert_own_command(rule: str, command: str) -> str:
    """``command`` runs ``mugs <rule>`` and writes ``<rule>.json``; returns that output path."""
    words = shlex.split(command)
    assert words[:2] == ["mugs", rule], command
    output = words[words.index("--out") + 1]
    assert Path(output).name == f"{rule}.json", command
    return output


def test_a_dry_run_plans_each_protocol_with_its_own_command_and_output(repo: Path) -> None:
    done = sh("snakemake", "--profile", "profiles/local", "-n", "-p", "all", cwd=repo)
    output = done.stdout + done.stderr
    commands = _shell_commands(output)
    # the run's selected checkpoint under every protocol, its random initialisation under knn and linear
    expected = {
        "knn": {f"results/{RUN}/eval/knn.json", f"results/{RUN}/random-init/knn.json"},
        "linear": {f"results/{RUN}/eval/linear.json", f"results/{RUN}/random-init/linear.json"},
        "fewshot": {f"results/{RUN}/eval/fewshot.json"},
        "finetune": {f"results/{RUN}/eval/finetune.json"},
    }
    for rule, outputs in expected.items():
        assert planned_jobs(output)[rule] == len(outputs)
        assert {_assert_own_command(rule, command) for command in commands[rule]} == outputs


@pytest.mark.slow
def test_each_protocol_rule_runs_its_own_command(repo: Path) -> None:
    # the prepared splits first: in the DAG the evaluations read them through pretraining, left out here
    sh("snakemake", "--profile", "profiles/local", "results/data", cwd=repo)
    # the networks at their random initialisation stand for the selected checkpoint: the evaluations
    # read it as they read select's pick, without pretraining first
    selected = f"results/{RUN}/eval/selected.pt"
    sh("mugs", "init-checkpoint", "--out", selected, "--config", "params.yaml", "--run", RUN, cwd=repo)
    metrics = [f"results/{RUN}/eval/{protocol}.json" for protocol in PROTOCOLS]
    done = sh(
        "snakemake", "--profile", "profiles/local", "--allowed-rules", *PROTOCOLS, "--", *metrics, cwd=repo
    )
    commands = _shell_commands(done.stdout + done.stderr)
    for protocol, path in zip(PROTOCOLS, metrics, strict=True):
        assert [_assert_own_command(protocol, command) for command in commands[protocol]] == [path]
        written = json.loads((repo / path).read_text())["evaluation"]
        assert written == protocol, f"the {protocol} rule wrote {written} metrics"
