"""The workflow (Snakefile, workflow/rules, the DVC stages generated from it) on this machine.

Fast checks run in a copy of the working tree: the committed dvc.yaml is what ``mugs dvc-yaml`` generates,
``snakemake --lint`` and snakefmt are clean, and a bad parameter file stops Snakemake at parse time with
a message that names the key. The slow ones run the whole tiny pipeline (4 s of pretraining) twice, in
two fresh clones of one test repository, at the same time: once with ``snakemake --profile
profiles/local all`` and once with ``dvc repro``; then they check what reruns after a parameter change,
DVC push/pull into a third clone, and that both tools produced the same metrics.
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from workflow_helpers import (
    BASELINE_METRICS,
    PROGRESS_EVERY_S,
    PROTOCOLS,
    REPO,
    RUN,
    assert_outputs,
    clone,
    comparable_metrics,
    copy_worktree,
    file_sha256,
    git_commit,
    read_params,
    sh,
    tiny_params,
    tool_env,
    tree_hashes,
    update_params,
    write_params,
)

from mugs.config import load_config, merge_values
from mugs.testing.workflow import planned_jobs

PIPELINE_TIMEOUT_S = 600
# the stage that fingerprints the data at every `dvc repro`: `dvc status` always lists it as changed
DATA_STATE_STAGE = "data_state"
ALL_AFTER_PRETRAIN = {"pretrain", "select", *PROTOCOLS, "report", "all"}


# --- fast checks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worktree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untouched copy of the working tree (Snakemake writes .snakemake/ wherever it runs)."""
    return copy_worktree(tmp_path_factory.mktemp("worktree") / "repo")


@pytest.fixture
def params_file(worktree: Path) -> Iterator[Path]:
    """The copy's params.yaml, restored after the test."""
    original = (worktree / "params.yaml").read_text()
    yield worktree / "params.yaml"
    (worktree / "params.yaml").write_text(original)


def test_committed_dvc_yaml_is_what_the_snakefile_generates(worktree: Path) -> None:
    committed = REPO / "dvc.yaml"
    if not committed.is_file():
        pytest.fail("dvc.yaml is not in the repository: run `mugs dvc-yaml` and commit it")
    sh("mugs", "dvc-yaml", cwd=worktree)
    generated = (worktree / "dvc.yaml").read_text()
    diff = "".join(
        difflib.unified_diff(
            committed.read_text().splitlines(True), generated.splitlines(True), "committed", "generated"
        )
    )
    assert not diff, f"dvc.yaml differs from `mugs dvc-yaml`; run it and commit the result:\n{diff}"
    # machine-independent: a clone elsewhere must generate the same file
    assert str(worktree) not in generated and str(REPO) not in generated

    stages = yaml.safe_load(generated)["stages"]
    runs = list(read_params(worktree)["runs"])
    protocols = read_params(worktree)["protocols"]
    expected = {DATA_STATE_STAGE, "prepare", "report", "raw_pixel_knn"} | {
        f"{rule}-{run}" for run in runs for rule in ("pretrain", "select", "random_init", *protocols)
    }
    # the random-init baseline of each run, evaluated by the same knn and linear commands
    expected |= {f"{protocol}-{run}-random-init" for run in runs for protocol in ("knn", "linear")}
    assert set(stages) == expected
    for run in runs:
        # a resumable run directory survives `dvc repro`; its parameters are every pretraining key
        assert stages[f"pretrain-{run}"]["outs"] == [{f"results/{run}/pretrain": {"persist": True}}]
        pretrain_params = set(stages[f"pretrain-{run}"]["params"])
        assert {"model", "loss", "augment", "optim", f"runs.{run}"} <= pretrain_params
        for protocol in protocols:
            stage = stages[f"{protocol}-{run}"]
            assert stage["metrics"] == [f"results/{run}/eval/{protocol}.json"]
            assert stage["deps"] == [f"results/{run}/eval/selected.pt"]
            evaluation_keys = ("evaluate.", "finetune", "train.seed", "runs.")
            assert all(key.startswith(evaluation_keys) for key in stage["params"])
        assert stages[f"select-{run}"]["metrics"] == [f"results/{run}/eval/selection.json"]
        assert stages[f"random_init-{run}"]["outs"] == [f"results/{run}/random-init/checkpoint.pt"]
        # its evaluations read the prepared splits, as a trained run's do through pretraining
        assert stages[f"random_init-{run}"]["deps"] == ["results/data"]
        assert "train.seed" in stages[f"random_init-{run}"]["params"]
        assert "optim" not in stages[f"random_init-{run}"]["params"]  # training settings change nothing
        knn = stages[f"knn-{run}-random-init"]
        assert knn["deps"] == [f"results/{run}/random-init/checkpoint.pt"]
        assert knn["cmd"].startswith(f"mugs knn results/{run}/random-init/checkpoint.pt --out ")
        assert knn["params"] == stages[f"knn-{run}"]["params"]
    assert stages["raw_pixel_knn"]["deps"] == ["results/data"]
    assert stages["raw_pixel_knn"]["metrics"] == ["results/baselines/raw-pixels/knn.json"]
    # prepare reads the data's fingerprint, refreshed at every `dvc repro`; no stage hashes the raw data
    assert stages[DATA_STATE_STAGE] == {
        "cmd": f"mugs data-state --config params.yaml --run {runs[0]}",
        "always_changed": True,
        "outs": [{"results/data.state.json": {"persist": True}}],
    }
    assert stages["prepare"]["deps"] == ["results/data.state.json"]
    root = read_params(worktree)["data"]["root"]
    assert not any(root in stage.get("deps", []) for stage in stages.values())
    plots = [next(iter(plot)) for plot in stages["report"]["plots"]]
    assert plots == [f"results/report/curves/{run}.csv" for run in runs]


def test_snakemake_lint_reports_nothing(worktree: Path) -> None:
    done = sh("snakemake", "--lint", cwd=worktree)
    output = done.stdout + done.stderr
    assert "Lints for" not in output, output
    assert "Congratulations, your workflow is in a good condition!" in output


def test_snakefmt_is_clean() -> None:
    done = sh("snakefmt", "--check", "Snakefile", "workflow", cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _dry_run_fails(worktree: Path, params_file: Path, values: dict) -> str:
    write_params(worktree, values)
    done = sh("snakemake", "-n", "all", cwd=worktree, check=False)
    assert done.returncode != 0, f"snakemake accepted {params_file.read_text()}"
    assert not (worktree / "results").exists()
    return done.stdout + done.stderr


def test_schema_rejects_an_unknown_top_level_key(worktree: Path, params_file: Path) -> None:
    output = _dry_run_fails(worktree, params_file, {**read_params(worktree), "evalute": {"knn_k": [10]}})
    assert "Error validating config file" in output
    assert "'evalute' was unexpected" in output


def test_schema_rejects_an_output_dir_without_run(worktree: Path, params_file: Path) -> None:
    values = read_params(worktree)
    values["train"]["output_dir"] = "results/pretrain"
    output = _dry_run_fails(worktree, params_file, values)
    assert "'results/pretrain' does not match" in output
    assert "['train']['output_dir']" in output


def test_schema_rejects_an_unknown_protocol(worktree: Path, params_file: Path) -> None:
    output = _dry_run_fails(worktree, params_file, {**read_params(worktree), "protocols": ["knn", "kmeans"]})
    assert "'kmeans' is not one of" in output


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("optim", "lr", "abc", "On instance['optim']['lr']:\n    'abc'"),
        ("optim", "lrate", 0.1, "'lrate' was unexpected"),
        ("evaluate", "knn_k", "ten", "On instance['evaluate']['knn_k']"),
    ],
)
def test_a_bad_value_fails_at_parse_time_naming_the_key(
    worktree: Path, params_file: Path, section: str, key: str, value: object, message: str
) -> None:
    values = read_params(worktree)
    values[section][key] = value
    output = _dry_run_fails(worktree, params_file, values)
    assert "Error validating config file" in output
    assert message in output


def test_a_bad_value_in_a_named_run_is_named(worktree: Path, params_file: Path) -> None:
    values = read_params(worktree)
    values["runs"]["group-only"] = {"loss": {"instance_weight": "none"}}
    output = _dry_run_fails(worktree, params_file, values)
    assert "On instance['runs']['group-only']['loss']['instance_weight']" in output


def test_the_long_demo_file_adds_one_run_that_every_command_reads(worktree: Path) -> None:
    done = sh("snakemake", "-n", "-p", "all", "--configfile", "configs/demo-long.yaml", cwd=worktree)
    output = done.stdout + done.stderr
    layered = "--config params.yaml configs/demo-long.yaml"
    assert f"mugs pretrain {layered} --run mugs_long" in output
    # the demo run's commands are as before: the file adds a run and changes nothing of the others
    assert "mugs pretrain --config params.yaml --run mugs " in output
    knn_output = "results/mugs_long/eval/knn.json"
    assert f"mugs knn results/mugs_long/eval/selected.pt --out {knn_output} {layered}" in output
    assert planned_jobs(output)["pretrain"] == 2  # the demo run and the long one
    long_run = load_config(["params.yaml", "configs/demo-long.yaml"], run="mugs_long")
    demo_run = load_config("params.yaml", run="mugs")
    assert (long_run.optim.epochs, long_run.data.train_subset) == (6, None)
    assert long_run.model == demo_run.model and long_run.loss == demo_run.loss


@pytest.mark.parametrize(
    ("values", "named"),
    [
        # the schema: a wrong type (in a run's overrides) and an out-of-range value
        ("runs: {other: {optim: {lr: fast}}}", "On instance['runs']['other']['optim']['lr']:\n    'fast'"),
        ("optim: {momentum_teacher: 2}", "On instance['optim']['momentum_teacher']:\n    2"),
        # the configuration: a rule between keys
        ("optim: {warmup_epochs: 5}", "params.yaml + extra.yaml: optim.warmup_epochs=5 exceeds optim.epochs"),
    ],
    ids=["type", "range", "rule"],
)
def test_a_bad_configfile_stops_snakemake_naming_the_key(worktree: Path, values: str, named: str) -> None:
    (worktree / "extra.yaml").write_text(values)
    done = sh("snakemake", "-n", "all", "--configfile", "extra.yaml", cwd=worktree, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and named in output
    assert "Traceback" not in output and 'File "' not in output  # the message alone, no frames
    assert "Job stats" not in output and not (worktree / "results").exists()  # before any job


# A --configfile path that runs `touch` twice wherever a rule or a DVC stage hands it to the shell unquoted.
HOSTILE_CONFIGFILE = "tmp/my dir/x;touch INJECTED;$(touch INJECTED2).yaml"


def _injected(root: Path) -> list[str]:
    return sorted(str(path) for path in root.rglob("INJECTED*"))


def _prepared_per_class(repo: Path) -> int:
    return json.loads((repo / "results/data/summary.json").read_text())["settings"]["max_per_class"]


@pytest.mark.slow
def test_a_configfile_path_with_shell_metacharacters_is_read_and_never_executed(tmp_path: Path) -> None:
    repo = copy_worktree(tmp_path / "repo")
    hostile = repo / HOSTILE_CONFIGFILE
    hostile.parent.mkdir(parents=True)
    # a whole parameter file, as DVC reads its keys; 20 images per class keep the data stages cheap
    values = merge_values(read_params(repo), {"data": {"max_per_class": 20}})
    hostile.write_text(yaml.safe_dump(values, sort_keys=False))

    # the target comes first: --configfile takes every word after it
    done = sh(
        "snakemake",
        "results/data",
        "--profile",
        "profiles/local",
        "--configfile",
        HOSTILE_CONFIGFILE,
        cwd=repo,
    )
    command = f"mugs prepare --config params.yaml {shlex.quote(HOSTILE_CONFIGFILE)} --run"
    assert command in done.stdout + done.stderr
    assert _prepared_per_class(repo) == 20  # the jobs read the file
    assert _injected(tmp_path) == []

    sh("mugs", "dvc-yaml", "--params", HOSTILE_CONFIGFILE, cwd=repo)
    shutil.rmtree(repo / "results/data")
    sh("dvc", "repro", "--single-item", "prepare", cwd=repo)
    assert _prepared_per_class(repo) == 20
    assert _injected(tmp_path) == []


# --- the tiny pipeline under Snakemake and DVC ---------------------------------------------------------


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A test repository with the tiny params (and its dvc.yaml) committed, and a DVC remote holding
    the demo data; returns (repository, remote)."""
    base = tmp_path_factory.mktemp("workflow")
    repo = copy_worktree(base / "origin")
    remote = base / "dvc-remote"
    tiny_params(repo)
    sh("mugs", "dvc-yaml", cwd=repo)
    sh("mugs", "demo-data", "--config", "params.yaml", "--run", RUN, cwd=repo)
    # the tracked hash stays as committed when the demo files are the same; `dvc add` caches them
    sh("dvc", "add", "-q", "data", cwd=repo)
    git_commit(repo, "tiny pipeline")
    sh("dvc", "remote", "add", "--local", "-d", "-f", "tests", remote, cwd=repo)
    sh("dvc", "push", "-q", "data.dvc", cwd=repo)
    return repo, remote


def _start(command: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, cwd=cwd, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen[str], what: str) -> str:
    try:
        output, _ = process.communicate(timeout=PIPELINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{what} took over {PIPELINE_TIMEOUT_S} s:\n{output[-6000:]}")
    assert process.returncode == 0, f"{what} failed ({process.returncode}):\n{output[-8000:]}"
    return output


@pytest.fixture(scope="module")
def pipelines(origin: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two fresh clones of ``origin``, one run by Snakemake and one by DVC, side by side (each job is
    single-threaded, so together they use the 2 cores)."""
    repo, remote = origin
    base = tmp_path_factory.mktemp("clones")
    snakemake_clone = clone(repo, base / "snakemake")
    dvc_clone = clone(repo, base / "dvc", dvc_remote=remote)
    sh("dvc", "pull", "-q", "data.dvc", cwd=dvc_clone)
    # --config replaces the profile's: launcher=local kept; frequent progress lines for the tiny jobs
    snakemake = _start(
        [
            "snakemake",
            "--profile",
            "profiles/local",
            "all",
            "--config",
            "launcher=local",
            f"progress_every={PROGRESS_EVERY_S}",
        ],
        snakemake_clone,
    )
    dvc = _start(["dvc", "repro"], dvc_clone)
    snakemake_log = _finish(snakemake, "snakemake --profile profiles/local all")
    dvc_log = _finish(dvc, "dvc repro")
    (base / "snakemake.log").write_text(snakemake_log)
    (base / "dvc.log").write_text(dvc_log)
    return {"snakemake": snakemake_clone, "dvc": dvc_clone, "snakemake_log": base / "snakemake.log"}


def _plan(repo: Path) -> dict[str, int]:
    done = sh("snakemake", "--profile", "profiles/local", "-n", "all", cwd=repo)
    return planned_jobs(done.stdout + done.stderr)


def _dvc_status(repo: Path) -> dict:
    """What ``dvc status`` finds changed, besides the data's fingerprint, which it always lists."""
    status = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout)
    assert status.get(DATA_STATE_STAGE) == ["always changed"]
    return {stage: change for stage, change in status.items() if stage != DATA_STATE_STAGE}


def _rules_run(snakemake_output: str) -> list[str]:
    return re.findall(r"^(?:local)?rule (\w+):$", snakemake_output, re.MULTILINE)


def _stages_run(dvc_output: str) -> list[str]:
    """The stages ``dvc repro`` ran, after the data's fingerprint, which it runs every time."""
    stages = re.findall(r"Running stage '([^']+)'", dvc_output)
    assert stages[:1] == [DATA_STATE_STAGE], dvc_output[-3000:]
    return stages[1:]


@pytest.mark.slow
def test_snakemake_runs_the_whole_pipeline(pipelines: dict[str, Path]) -> None:
    repo = pipelines["snakemake"]
    assert_outputs(repo)
    log = pipelines["snakemake_log"].read_text()
    # the demo data come from the workflow itself on a fresh clone
    assert re.search(r"rule demo_data:", log)
    assert (repo / "data/fashion-mnist").is_dir()


# what `tee` copies from each job's log to Snakemake's output (the terminal of `make demo`)
PRETRAIN_PROGRESS = re.compile(
    # the loss and learning rate of the latest log line join the description once there is one
    rf"^\[pretrain {RUN}\] pretrain(?: loss \S+ lr \S+)?: (\d+)/16 iterations \(\d+%\), "
    r"[\d.e+]+ iterations/s, \d+:\d\d:\d\d left$",
    re.MULTILINE,
)


@pytest.mark.slow
def test_progress_lines_reach_the_terminal_while_the_jobs_run(pipelines: dict[str, Path]) -> None:
    output = pipelines["snakemake_log"].read_text()
    progress = list(PRETRAIN_PROGRESS.finditer(output))
    assert progress, output[-6000:]
    positions = [int(match[1]) for match in progress]
    assert positions == sorted(positions) and positions[-1] < 16
    # printed while pretraining ran: before Snakemake reports the job finished
    assert progress[0].start() < output.index("(Rule: pretrain)")
    # which job extracts which features first depends on the order of the jobs (the others read the cache)
    assert re.search(rf"^\[\w+ {RUN}\] features \w+ \(teacher\): \d+/\d+ images", output, re.MULTILINE)
    assert re.search(rf"^\[linear {RUN}\] linear probes.*: 2/2 epochs", output, re.MULTILINE)
    # the job logs hold the same lines, as plain text
    logs = pipelines["snakemake"] / "results/logs"
    assert PRETRAIN_PROGRESS.search((logs / f"pretrain-{RUN}.log").read_text())
    assert all("\x1b" not in log.read_text() for log in logs.glob("*.log"))


@pytest.mark.slow
def test_snakemake_second_run_has_nothing_to_do(pipelines: dict[str, Path]) -> None:
    assert _plan(pipelines["snakemake"]) == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("section", "update", "rerun"),
    [
        # the run's and its random init's kNN, and the raw pixels'
        ("evaluate", {"knn_k": [5, 20]}, {"knn": 2, "raw_pixel_knn": 1}),
        ("evaluate", {"linear_epochs": 3}, {"linear": 2}),
        ("evaluate", {"fewshot_c": [0.5]}, {"fewshot": 1}),
        # the networks' construction: the baseline's checkpoint and its evaluations
        (
            "train",
            {"seed": 1},
            {"pretrain": 1, "select": 1, "random_init": 1, "knn": 2, "linear": 2, "fewshot": 1},
        ),
    ],
)
def test_snakemake_reruns_only_the_evaluation_whose_parameter_changed(
    pipelines: dict[str, Path], section: str, update: dict, rerun: dict[str, int]
) -> None:
    repo = pipelines["snakemake"]
    before = update_params(repo, {section: update})
    try:
        assert _plan(repo) == {**rerun, "report": 1, "all": 1}
    finally:
        write_params(repo, before)


@pytest.mark.slow
def test_snakemake_reruns_pretraining_and_everything_after_it(pipelines: dict[str, Path]) -> None:
    repo = pipelines["snakemake"]
    before = update_params(repo, {"optim": {"lr": 0.002}})
    try:
        assert _plan(repo) == dict.fromkeys(ALL_AFTER_PRETRAIN, 1)
    finally:
        write_params(repo, before)


@pytest.mark.slow
def test_a_configfile_that_adds_a_run_leaves_the_finished_run_alone(pipelines: dict[str, Path]) -> None:
    repo = pipelines["snakemake"]
    (repo / "second.yaml").write_text("runs:\n  second: {optim: {lr: 0.002}}\n")
    try:
        done = sh(
            "snakemake", "--profile", "profiles/local", "-n", "all", "--configfile", "second.yaml", cwd=repo
        )
        planned = planned_jobs(done.stdout + done.stderr)
    finally:
        (repo / "second.yaml").unlink()
    # only the new run's jobs, its random-init baseline and the report that compares the two: nothing
    # of the finished run
    assert planned == {**dict.fromkeys(ALL_AFTER_PRETRAIN, 1), "random_init": 1, "knn": 2, "linear": 2}
    assert "--run second" in done.stdout and f"--run {RUN}" not in done.stdout


@pytest.mark.slow
def test_snakemake_all_rebuilds_a_deleted_evaluation_without_pretraining_again(
    pipelines: dict[str, Path],
) -> None:
    repo = pipelines["snakemake"]
    knn = repo / "results" / RUN / "eval" / "knn.json"
    metrics = comparable_metrics(knn)
    pretrained = sorted(path for path in (repo / "results" / RUN / "pretrain").rglob("*") if path.is_file())
    before = {path: (path.stat().st_mtime_ns, file_sha256(path)) for path in pretrained}
    knn.unlink()

    assert _plan(repo) == {"knn": 1, "report": 1, "all": 1}
    done = sh("snakemake", "--profile", "profiles/local", "all", cwd=repo)
    assert _rules_run(done.stdout + done.stderr) == ["knn", "report", "all"]
    assert comparable_metrics(knn) == metrics
    assert {path: (path.stat().st_mtime_ns, file_sha256(path)) for path in pretrained} == before


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_pipeline(pipelines: dict[str, Path]) -> None:
    repo = pipelines["dvc"]
    assert_outputs(repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


@pytest.mark.slow
def test_dvc_second_repro_runs_nothing(pipelines: dict[str, Path]) -> None:
    repo = pipelines["dvc"]
    output = sh("dvc", "repro", cwd=repo).stdout
    assert _stages_run(output) == []
    assert "Stage 'prepare' didn't change, skipping" in output
    assert _dvc_status(repo) == {}


@pytest.mark.slow
def test_dvc_metrics_show_reads_every_metrics_file(pipelines: dict[str, Path]) -> None:
    repo = pipelines["dvc"]
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    metrics = next(iter(shown.values()))["data"]
    eval_dir = f"results/{RUN}/eval"
    trained = {f"{eval_dir}/{name}.json" for name in ("selection", *PROTOCOLS)}
    assert set(metrics) == trained | set(BASELINE_METRICS)
    knn = json.loads((repo / eval_dir / "knn.json").read_text())
    assert metrics[f"{eval_dir}/knn.json"]["data"]["fine"]["10"]["top1"] == knn["fine"]["10"]["top1"]


@pytest.mark.slow
def test_snakemake_and_dvc_write_the_same_metrics(pipelines: dict[str, Path]) -> None:
    eval_dir = Path("results", RUN, "eval")
    paths = [eval_dir / f"{name}.json" for name in ("selection", *PROTOCOLS)]
    paths += [Path(path) for path in BASELINE_METRICS]
    for path in paths:
        by_snakemake = comparable_metrics(pipelines["snakemake"] / path)
        by_dvc = comparable_metrics(pipelines["dvc"] / path)
        assert by_snakemake == by_dvc, f"{path} differs between the Snakemake and the DVC run"


@pytest.mark.slow
def test_dvc_push_then_pull_in_a_fresh_clone_restores_every_output(
    pipelines: dict[str, Path], origin: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, (_, remote) = pipelines["dvc"], origin
    git_commit(repo, "dvc repro")
    sh("dvc", "push", "-q", cwd=repo)
    fresh = clone(repo, tmp_path / "fresh", dvc_remote=remote)
    sh("dvc", "pull", "-q", cwd=fresh)

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    # the data's fingerprint, prepare, pretrain, select (checkpoint + selection), evaluations, random-init
    # checkpoint, baseline metrics, report (7 files + 2 per run)
    assert len(outs) == 1 + 1 + 1 + 2 + len(PROTOCOLS) + 1 + len(BASELINE_METRICS) + 9
    for path in outs:
        assert (fresh / path).exists(), f"dvc pull did not restore {path}"
        assert tree_hashes(fresh / path) == tree_hashes(repo / path), f"{path} differs after dvc pull"
    assert _dvc_status(fresh) == {}


@pytest.mark.slow
def test_dvc_reruns_only_the_evaluation_whose_parameter_changed(pipelines: dict[str, Path]) -> None:
    repo = pipelines["dvc"]
    before = update_params(repo, {"optim": {"lr": 0.002}})
    # pretraining is the only stage whose own inputs changed; everything after it follows from its outs
    assert set(_dvc_status(repo)) == {f"pretrain-{RUN}"}
    write_params(repo, before)
    assert _dvc_status(repo) == {}

    update_params(repo, {"evaluate": {"knn_k": [5, 20]}})
    knn_stages = {f"knn-{RUN}", f"knn-{RUN}-random-init", "raw_pixel_knn"}
    assert set(_dvc_status(repo)) == knn_stages
    output = sh("dvc", "repro", cwd=repo).stdout
    *evaluations, report = _stages_run(output)
    assert sorted(evaluations) == sorted(knn_stages) and report == "report"
    knn = json.loads((repo / "results" / RUN / "eval" / "knn.json").read_text())
    assert set(knn["fine"]) == {"5", "20"}
    assert _dvc_status(repo) == {}
