"""Every key of the schema changed in turn, on a finished pipeline's recorded state: exactly the stages
that mugs/result_keys.py says depend on the key see their parameters change, under Snakemake (its
params rerun trigger) and DVC (``dvc status``), and the resume check refuses exactly the pretraining
keys. A rule whose rerun parameters miss a key of its table entry, or name one it does not depend on,
fails here.
"""

from __future__ import annotations

import contextlib
import copy
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
from workflow_helpers import copy_worktree, read_params, update_params, write_params

from mugs.config import Config
from mugs.dvc_stages import JobView, render_dvc_yaml, snakemake_jobs, stage_name
from mugs.result_keys import RESULT_KEYS, depends_on, pretraining_keys
from mugs.training.checkpoint import incompatible_keys

PROTOCOLS = ["knn", "linear", "fewshot", "finetune"]
# another valid value where the rules below would give an invalid one
CHANGED_BY_HAND: dict[str, Any] = {
    # the augment sizes stay multiples of model.patch_size (7), and the local crops the smaller
    "model.patch_size": 14,
    "augment.global_size": 35,
    "augment.local_size": 21,
    "augment.rand_augment": "rand-m7-mstd0.5-inc1",
    "finetune.rand_augment": "rand-m7-mstd0.5-inc1",
    "evaluate.linear_n_last_blocks": 3,  # at most model.depth
    "data.classes": ["Sneaker", "Bag"],
    "launch.jobs": {"finetune": {"nprocs": 2}},  # per job kind, launch's own keys
}
# the workflow fixes where a run's pretraining goes: another value is refused, naming the key
FIXED_BY_THE_WORKFLOW = "train.output_dir"


def schema_keys() -> dict[str, Any]:
    """Every ``section.key`` of the Config dataclasses, with its type."""
    keys = {}
    for section, section_type in typing.get_type_hints(Config).items():
        for name, annotation in typing.get_type_hints(section_type).items():
            keys[f"{section}.{name}"] = annotation
    return keys


def _another_value(key: str, value: Any, annotation: Any) -> Any:
    """A valid value of ``key`` other than ``value``."""
    if key in CHANGED_BY_HAND:
        return CHANGED_BY_HAND[key]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    choices = [
        arg for option in options if typing.get_origin(option) is Literal for arg in typing.get_args(option)
    ]
    if isinstance(value, bool):
        return not value
    if value in choices:
        others = [choice for choice in choices if choice != value]
        # the only literal of an `int | "auto"` key: a number is the other value
        return others[0] if others else 1
    if value is None:
        present = next(option for option in options if option is not type(None))
        return _another_value(key, {int: 0, float: 0.0, str: ""}[present], present)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.1
    if isinstance(value, str):
        return f"{value}-changed" if value else "changed"
    if isinstance(value, dict):
        return {**value, "changed": "yes"}
    if typing.get_origin(annotation) is tuple:  # a (low, high) pair
        return [value[0] / 2, *value[1:]]
    return value[:-1] if len(value) > 1 else [*value, "changed"]


def _with(values: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(values)
    section, name = key.split(".")
    changed[section][name] = value
    return changed


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the working tree with every protocol on, its outputs in place (empty files: only the
    recorded parameters matter here) and committed by ``dvc commit``, so that dvc.lock records the
    parameters as a finished run would."""
    from dvc.repo import Repo

    repo = copy_worktree(tmp_path_factory.mktemp("result-keys-changes") / "repo")
    update_params(repo, {"protocols": PROTOCOLS})
    write_params(repo, read_params(repo))  # the file as the test rewrites it, without comments
    jobs = snakemake_jobs(repo / "Snakefile", repo / "params.yaml", repo)
    (repo / "dvc.yaml").write_text(render_dvc_yaml(jobs, "params.yaml", read_params(repo)))
    # the data root is a tree that the parse-time stat pass accepts under either data.source (it opens
    # no image); every other file can be empty
    image = repo / read_params(repo)["data"]["root"] / "train" / "class" / "0.png"
    image.parent.mkdir(parents=True)
    image.touch()
    for job in jobs:
        for path in map(Path, job.inputs + job.outputs):
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            if not (repo / path).exists():
                (repo / path).write_text("{}")
    with contextlib.chdir(repo), Repo(repo) as dvc:  # DVC reads paths from the working directory
        dvc.commit(force=True)
    return repo


def _snakemake_jobs(repo: Path) -> dict[str, JobView]:
    """Stage name → the job as Snakemake builds it from ``repo``'s params.yaml; its ``settings`` are
    what the params rerun trigger compares with those recorded for the output."""
    return {stage_name(job): job for job in snakemake_jobs(repo / "Snakefile", repo / "params.yaml", repo)}


def _dvc_changed_params(repo: Path) -> dict[str, list[str]]:
    """Stage name → the params entries (keys or whole sections) ``dvc status`` finds modified."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(repo) as dvc:
        return {
            stage.name: [entry for entries in dep.status().values() for entry in entries]
            for stage in dvc.index.stages
            for dep in stage.deps
            if isinstance(dep, ParamsDependency)
        }


def _changes(values: dict[str, Any]) -> dict[str, Any]:
    """Every key of the schema → another valid value (a key the file leaves out has its default)."""
    defaults = Config().to_dict()
    changes = {}
    for key, annotation in schema_keys().items():
        section, name = key.split(".")
        changes[key] = _another_value(key, values[section].get(name, defaults[section][name]), annotation)
    return changes


def test_each_key_changes_exactly_the_stages_that_depend_on_it(finished: Path) -> None:
    values = read_params(finished)
    changes = _changes(values)
    recorded = _snakemake_jobs(finished)
    assert not any(_dvc_changed_params(finished).values()), "dvc status before any change"
    # DVC names each params entry it finds modified, so one status with every key changed at once
    # says, key by key, which stages track it (an entry naming a section tracks each of its keys)
    everything = values
    for key, value in changes.items():
        everything = _with(everything, key, value)
    write_params(finished, everything)
    dvc_entries = _dvc_changed_params(finished)
    found, expected = {}, {}
    for key, value in changes.items():
        changed = _with(values, key, value)
        write_params(finished, changed)
        if key == FIXED_BY_THE_WORKFLOW:
            with pytest.raises(Exception, match=f"{key}="):
                _snakemake_jobs(finished)
            continue
        current = _snakemake_jobs(finished)
        assert current.keys() == recorded.keys(), key
        snakemake = sorted(
            stage for stage, job in current.items() if job.settings != recorded[stage].settings
        )
        dvc = sorted(stage for stage, entries in dvc_entries.items() if depends_on(key, tuple(entries)))
        found[key] = (snakemake, dvc, incompatible_keys(values, changed) == [key])
        dependent = sorted(
            stage for stage, job in recorded.items() if depends_on(key, RESULT_KEYS.get(job.rule, ()))
        )
        expected[key] = (dependent, dependent, depends_on(key, pretraining_keys()))
    write_params(finished, values)
    wrong = [
        f"{key}: (snakemake, dvc, resume refused) {found[key]}, expected {expected[key]}"
        for key in found
        if found[key] != expected[key]
    ]
    assert not wrong, "\n".join(wrong)
    assert found.keys() == changes.keys() - {FIXED_BY_THE_WORKFLOW}
