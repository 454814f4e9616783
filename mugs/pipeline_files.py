"""The files the pipeline reads that are generated from the configuration, each by one command:
``params.yaml``'s configuration sections (``mugs presets demo --write-params params.yaml``) and the JSON
schema Snakemake validates it with (``mugs schema``). Tests hold the committed files to these."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from mugs.config import CONFIG, RUN_NAME, config_from_dict

SCHEMA_PATH = Path("workflow/schemas/config.schema.yaml")
# each run of a pipeline file writes its own directory
PIPELINE_OUTPUT_DIR = "results/{run}/pretrain"
SEQUENCE = "tag:yaml.org,2002:seq"
NUMERIC_TEXT = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


class _FlowLists(yaml.SafeDumper):
    """Sections as blocks, lists on one line (``knn_k: [10, 20, 100, 200]``)."""


_FlowLists.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, True)
)


def params_text(current: str, preset: str) -> str:
    """``current`` (a pipeline file's text) with its configuration sections replaced by ``preset``'s
    resolved values; its header comment and everything from the first pipeline key on are kept."""
    values = config_from_dict({"preset": preset}).to_dict()
    values["train"]["output_dir"] = PIPELINE_OUTPUT_DIR
    lines = current.splitlines(keepends=True)
    tops = [(i, match[1]) for i, line in enumerate(lines) if (match := re.match(r"(\w+):", line))]
    start = next((i for i, key in tops if key in values), len(lines))
    end = next((i for i, key in tops if i > start and key not in values), len(lines))
    while end > start and (lines[end - 1].startswith("#") or not lines[end - 1].strip()):
        end -= 1  # the comment above the first pipeline key belongs to it
    sections = yaml.dump(values, Dumper=_FlowLists, sort_keys=False, width=110)
    return "".join(lines[:start]) + sections + "".join(lines[end:])


def _number_or_text(schema: Any) -> None:
    """Let every number also be numeric text, as YAML 1.1 (Snakemake's loader) reads "1e-3"; the
    configuration converts it and checks its range."""
    if isinstance(schema, list):
        for item in schema:
            _number_or_text(item)
    elif isinstance(schema, dict):
        for value in schema.values():
            _number_or_text(value)
        if schema.get("type") == "number":
            number = {key: schema.pop(key) for key in list(schema) if key not in ("default", "description")}
            schema["anyOf"] = [
                number,
                {"type": "string", "pattern": r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"},
            ]


def _without_titles(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: _without_titles(value) for key, value in schema.items() if key != "title"}
    return [_without_titles(item) for item in schema] if isinstance(schema, list) else schema


def schema() -> dict[str, Any]:
    """The JSON schema of a pipeline file: the configuration's sections (from the typed fields, with
    their ranges and descriptions) and the pipeline's own keys."""
    config = _without_titles(CONFIG.json_schema())
    _number_or_text(config)
    sections = config.pop("properties")
    run = {"type": ["object", "null"], "properties": copy.deepcopy(sections), "additionalProperties": False}
    resource = {key: {"type": "integer", "minimum": 1} for key in ("runtime", "mem_mb", "cpus_per_task")}
    resource |= {"gpu": {"type": "integer", "minimum": 0}}
    resource |= {key: {"type": "string"} for key in ("slurm_partition", "slurm_account", "slurm_extra")}
    sections["train"] = {
        "allOf": [
            sections["train"],
            {
                "properties": {
                    "output_dir": {
                        "pattern": r"\{run\}",
                        "description": f"has {{run}}, replaced by the run's name ({PIPELINE_OUTPUT_DIR})",
                    }
                }
            },
        ]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": "The pipeline's parameter file (params.yaml); generated from mugs/config.py by "
        "`mugs schema`: edit the configuration, not this file.",
        "type": "object",
        "properties": {
            **sections,
            "runs": {
                "description": "named runs, each a set of overrides on top of the shared values",
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": f"^{RUN_NAME}$"},
                "additionalProperties": run,
            },
            "protocols": {
                "description": "the evaluations `all` runs for every run",
                "type": "array",
                "minItems": 1,
                "uniqueItems": True,
                "items": {"enum": ["knn", "linear", "fewshot", "finetune"]},
            },
            "resources": {
                "description": "per-rule cluster resources; `default` applies to every rule",
                "type": "object",
                "additionalProperties": {"type": "object", "properties": resource},
            },
            "progress_every": {
                "description": "seconds between the plain progress lines of each job (default 10)",
                "type": "number",
                "exclusiveMinimum": 0,
            },
            "launcher": {
                "description": "set by a Snakemake profile to override launch.launcher",
                "enum": ["local", "slurm"],
            },
            "container_image": {
                "description": "the Apptainer image of every rule under `snakemake --sdm apptainer`: a local "
                ".sif path or a docker:// / oras:// URI (default mugs.sif, built with `apptainer build "
                "mugs.sif envs/mugs.def`)",
                "type": "string",
                "minLength": 1,
            },
        },
        "required": ["data", "runs", "protocols"],
        "additionalProperties": False,
        "$defs": config["$defs"],
    }


def schema_text() -> str:
    return "# Generated by `mugs schema` from mugs/config.py: do not edit.\n" + yaml.safe_dump(
        schema(), sort_keys=False, width=110, allow_unicode=True
    )
