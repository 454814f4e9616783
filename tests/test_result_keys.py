"""The one table of what each stage's result depends on (mugs/result_keys.py): the workflow's rerun
triggers, the generated dvc.yaml's params and the pretraining resume check all follow it."""

from __future__ import annotations

import copy

import pytest
import yaml
from workflow_helpers import PROTOCOLS, REPO, copy_worktree

from mugs.config import Config
from mugs.dvc_stages import snakemake_jobs, stage_name
from mugs.result_keys import RESULT_KEYS, flatten
from mugs.training.checkpoint import incompatible_keys

SCHEMA = Config().to_dict()

# written out, not derived from the table: the keys a resumed pretraining run must not see changed
SECTIONS = ("model", "loss", "augment", "optim")
PRETRAINING = {key for key in flatten(SCHEMA) if key.split(".")[0] in SECTIONS} | {
    "data.source",
    "data.classes",
    "data.max_per_class",
    "data.val_fraction",
    "data.split_seed",
    "data.on_bad_image",
    "data.train_subset",
    "train.seed",
    "train.init_from",
}


def _changed(values: dict, dotted: str) -> dict:
    changed = copy.deepcopy(values)
    *sections, last = dotted.split(".")
    place = changed
    for section in sections:
        place = place[section]
    place[last] = ["changed", place[last]]
    return changed


def test_the_resume_check_refuses_exactly_the_keys_pretraining_depends_on() -> None:
    refused = set()
    for key in flatten(SCHEMA):
        found = incompatible_keys(SCHEMA, _changed(SCHEMA, key))
        assert found in ([], [key]), key
        refused.update(found)
    assert refused == PRETRAINING


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> list:
    tree = copy_worktree(tmp_path_factory.mktemp("result-keys") / "repo")
    return snakemake_jobs(tree / "Snakefile", tree / "params.yaml", tree)


def test_each_rule_reruns_on_its_table_entry_and_dvc_tracks_the_same_keys(jobs: list) -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    checked = set()
    for job in jobs:
        if job.rule not in RESULT_KEYS:
            continue
        assert sorted(job.settings) == sorted(RESULT_KEYS[job.rule]), job.rule
        run = job.wildcards.get("run")
        tracked = set(stages[stage_name(job)]["params"]) - {f"runs.{run}"}
        assert tracked == set(RESULT_KEYS[job.rule]), stage_name(job)
        checked.add(job.rule)
    # params.yaml runs no fine-tuning
    assert checked == {"prepare", "pretrain", "select", *PROTOCOLS, "random_init", "raw_pixel_knn"}


def test_the_table_names_only_keys_of_the_schema() -> None:
    keys = flatten(SCHEMA)
    sections = {key.split(".")[0] for key in keys}
    for stage, entries in RESULT_KEYS.items():
        for entry in entries:
            assert entry in keys or entry in sections, f"{stage}: {entry}"
