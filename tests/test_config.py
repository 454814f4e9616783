"""Layered parameter files (later files merged over earlier ones, as Snakemake merges --configfile),
the range of every value and the rules between values."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from mugs.config import (
    CONFIG,
    PRESETS,
    RUN_NAME,
    ConfigError,
    ConfigWarning,
    check_run_name,
    config_from_dict,
    files_shaping_run,
    load_config,
    parse_override,
    read_yaml,
)
from mugs.pipeline_files import NUMERIC_TEXT, SCHEMA_PATH, params_text, schema_text

REPO = Path(__file__).resolve().parents[1]

BASE = """
optim: {epochs: 3, warmup_epochs: 1, lr: 0.0005}
data: {train_subset: 6400}
train: {output_dir: "results/{run}/pretrain"}
runs:
  demo: {}
  small-lr: {optim: {lr: 0.0001}}
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(BASE)
    return path


def test_a_later_file_changes_one_value_and_keeps_its_neighbours(base: Path, tmp_path: Path) -> None:
    (tmp_path / "more.yaml").write_text("optim: {epochs: 6}\n")
    config = load_config([base, tmp_path / "more.yaml"], run="demo")
    assert (config.optim.epochs, config.optim.lr, config.data.train_subset) == (6, 0.0005, 6400)


def test_a_later_file_adds_a_run_on_top_of_the_shared_values(base: Path, tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text("runs:\n  long: {optim: {epochs: 6}, data: {train_subset: null}}\n")
    files = [base, tmp_path / "long.yaml"]
    long = load_config(files, run="long")
    assert (long.optim.epochs, long.optim.lr, long.data.train_subset) == (6, 0.0005, None)
    assert load_config(files, run="small-lr").optim.lr == 0.0001  # the earlier runs are still there
    assert long.train.output_dir == "results/long/pretrain"


def test_errors_name_every_file(base: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("runs:\n  bad: {optim: {lr: fast}}\n")
    message = r"params\.yaml \+ .*bad\.yaml: optim\.lr: expected float, got 'fast'"
    with pytest.raises(ConfigError, match=message):
        load_config([base, tmp_path / "bad.yaml"], run="bad")


def test_files_shaping_a_run_leave_out_files_that_only_add_other_runs(base: Path, tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text("runs:\n  long: {optim: {epochs: 6}}\n")
    (tmp_path / "lr.yaml").write_text("optim: {lr: 0.001}\n")
    files = [base, tmp_path / "long.yaml", tmp_path / "lr.yaml"]
    assert files_shaping_run(files, "demo") == [str(base), str(tmp_path / "lr.yaml")]
    assert files_shaping_run(files, "long") == [str(p) for p in files]
    # the left-out file cannot change the run: same settings with and without it
    assert load_config(files, run="demo") == load_config(files_shaping_run(files, "demo"), run="demo")


def _numbers(schema: object) -> list[dict]:
    """Every integer or number in a JSON schema: alone, in a union, or as a list or tuple element
    (the values of a free mapping, sbatch options, aside)."""
    if isinstance(schema, list):
        return [number for item in schema for number in _numbers(item)]
    if not isinstance(schema, dict):
        return []
    found = [schema] if schema.get("type") in ("integer", "number") else []
    inner = [value for key, value in schema.items() if key != "additionalProperties"]
    return found + _numbers(inner)


def test_every_numeric_key_has_a_range() -> None:
    sections = CONFIG.json_schema()["$defs"].values()
    keys = {
        f"{kind['title']}.{name}": value for kind in sections for name, value in kind["properties"].items()
    }
    bounds = {"minimum", "exclusiveMinimum"}
    unbounded = {key for key, value in keys.items() for number in _numbers(value) if not bounds & set(number)}
    assert len(keys) > 100 and unbounded == set()


@pytest.mark.parametrize(
    ("key", "inside", "outside"),
    [
        ("optim.min_lr", 0.0, -1e-9),
        ("optim.momentum_teacher", 1.0, 1.0001),
        ("optim.weight_decay", 0.0, -0.01),
        ("optim.clip_grad", 0.0, -1.0),
        ("model.drop_path_rate", 0.99, 1.0),
        ("data.train_subset", 6400, 0),
        ("train.max_iterations", 1, 0),
        ("train.checkpoint_every", 0, -1),
        ("train.keep_every_epochs", 0, -1),
        ("loss.instance_temp", 1e-6, 0.0),
        ("finetune.label_smoothing", 0.0, 1.0),
        ("evaluate.fewshot_fractions", [1.0], [0.5, 0.0]),
        ("optim.lr", 1.0, float("inf")),
    ],
)
def test_ranges_accept_their_bounds_and_refuse_beyond(key: str, inside, outside) -> None:
    section, name = key.split(".")
    value = config_from_dict({"preset": "demo", section: {name: inside}})
    assert getattr(getattr(value, section), name) == inside
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}\b.*{re.escape(str(outside).strip('[]'))}"):
        config_from_dict({"preset": "demo", section: {name: outside}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"data": {"train_subset": 31}},
            r"data\.train_subset=31 .* one global batch \(optim\.batch_size=32\)",
        ),
        ({"augment": {"local_scale": [0.3, 0.2]}}, r"augment\.local_scale=\[0\.3, 0\.2\]"),
        ({"finetune": {"warmup_epochs": 3}}, r"finetune\.warmup_epochs=3 exceeds finetune\.epochs=2"),
        ({"loss": {"local_group_knn_top_n": 5000}}, r"local_group_knn_top_n=5000 exceeds .*queue_size=1024"),
        (
            {"data": {"classes": ["Trouser", "Sock"]}},
            r"data\.classes \['Sock'\] are not Fashion-MNIST classes",
        ),
        (
            {"launch": {"launcher": "slurm", "nodes": 2, "tasks_per_node": 3}},
            r"optim\.batch_size=32 does not divide by the world size 6 "
            r"\(launch\.nodes=2 × launch\.tasks_per_node=3\)",
        ),
        (
            {"launch": {"launcher": "slurm", "gpus_per_node": 2}},
            r"launch\.tasks_per_node=1 must equal launch\.gpus_per_node=2: one rank per GPU",
        ),
    ],
)
def test_impossible_combinations_are_errors_naming_the_keys(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"preset": "demo", **values})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"augment": {"local_size": 35}}, r"augment\.local_size=35 exceeds augment\.global_size=28"),
        ({"optim": {"min_lr": 2e-3}}, r"optim\.min_lr=0\.002 exceeds optim\.lr=0\.001"),
        (
            {"optim": {"clip_grad_late_epoch": 5}},
            r"optim\.clip_grad_late_epoch=5 lies beyond optim\.epochs=3",
        ),
        (
            {"loss": {"group_warmup_teacher_temp_epochs": 4}},
            r"group_warmup_teacher_temp_epochs=4 lies beyond",
        ),
    ],
)
def test_odd_combinations_are_warnings(values: dict, message: str) -> None:
    with pytest.warns(ConfigWarning, match=message):
        config_from_dict({"preset": "demo", **values})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in PRESETS:  # the published settings and the demo are not odd
            config_from_dict({"preset": name})


def test_a_preset_lies_under_the_files_and_the_overrides_on_top(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("preset: vit_base_400ep\noptim: {epochs: 60, lr: 0.002}\n")
    config = load_config(path, ["optim.lr=0.003"], preset="demo")
    assert (config.model.arch, config.optim.batch_size) == ("vit_tiny", 32)  # demo, not the file's preset
    assert (config.optim.epochs, config.optim.lr) == (60, 0.003)
    assert load_config(path).model.arch == "vit_base"  # without --preset, the file's own


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=[1,", r"--set optim\.lr: the value '\[1,' is not valid YAML at line 1, column 4"),
        ("optim..lr=1", r"'optim\.\.lr=1' is not of the form section\.key=value"),
    ],
)
def test_malformed_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_override(override)


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "broken.yaml")
    assert re.fullmatch(r".*broken\.yaml: not valid YAML at line 3, column 1: .+", str(error.value))


def test_params_yaml_holds_every_key_with_the_demo_presets_values() -> None:
    # DVC tracks only the keys the file spells out, so a key left out could change unnoticed
    written = (REPO / "params.yaml").read_text()
    stale = "params.yaml is stale: run `mugs presets demo --write-params params.yaml`"
    assert params_text(written, "demo") == written, stale
    demo = config_from_dict({"preset": "demo"}).to_dict()
    assert {
        section: set(values) for section, values in read_yaml(REPO / "params.yaml").items() if section in demo
    } == {section: set(values) for section, values in demo.items()}


def test_the_committed_schema_is_what_the_configuration_generates() -> None:
    assert (REPO / SCHEMA_PATH).read_text() == schema_text(), "the schema is stale: run `mugs schema`"


def test_the_schema_takes_the_numeric_text_the_configuration_takes() -> None:
    for text in ("1e-3", "2.5E+4", ".5", "3"):
        assert re.match(NUMERIC_TEXT, text) and config_from_dict({"optim": {"lr": text}}).optim.lr == float(
            text
        )
    for text in ("fast", "nan", "inf"):
        assert not re.match(NUMERIC_TEXT, text)


def test_run_is_substituted_after_the_overrides(base: Path) -> None:
    """``--set train.output_dir=…/{run}`` is the file's value's equal (it made a directory named {run})."""
    config = load_config(
        base, ["train.output_dir=elsewhere/{run}", "evaluate.cache_dir=cache/{run}"], run="demo"
    )
    assert (config.train.output_dir, config.evaluate.cache_dir) == ("elsewhere/demo", "cache/demo")
    assert load_config(base, run="small-lr").train.output_dir == "results/small-lr/pretrain"


def test_one_rule_for_run_names(base: Path, capsys: pytest.CaptureFixture) -> None:
    """`mugs pretrain --run` refuses what the workflow's schema and wildcard refuse, naming the run."""
    from mugs.cli import main

    schema = read_yaml(Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml")
    assert schema["properties"]["runs"]["propertyNames"]["pattern"] == f"^{RUN_NAME}$"
    assert check_run_name("small-lr_2") == "small-lr_2"
    base.write_text(BASE + "  'a;b': {}\n")
    assert main(["pretrain", "--config", str(base), "--run", "a;b", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "run name 'a;b' may hold only letters, digits" in err and RUN_NAME in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
