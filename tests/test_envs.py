"""The pinned environment and the images: the lock is current with pyproject.toml, and the conda environment,
the Apptainer definition, the Dockerfile and their build script agree with it about every version.

Here the recipes are parsed and checked, the build digest script is run, and Snakemake runs a rule through a
stand-in ``apptainer`` that records the command it was given; tests/test_container.py builds the Dockerfile
with podman and runs the pipeline in the image.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from mugs.config import load_config
from mugs.launch.slurm import container_python

REPO = Path(__file__).resolve().parents[1]
ENVS = REPO / "envs"
LOCK = ENVS / "requirements.lock"
# every file that names a version of something the images or the conda environment install
RECIPES = (
    "envs/Dockerfile",
    "envs/mugs.def",
    "envs/install.sh",
    "envs/mugs.yaml",
    "envs/mugs.post-deploy.sh",
)
DEF_SECTIONS = {
    "arguments", "setup", "files", "environment", "post", "runscript", "startscript", "test", "labels",
    "help",
}  # fmt: skip
DOCKER_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
    "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)")


# ------------------------------------------------------------------------------------------------ parsers
def parse_requirements(text: str) -> tuple[list[str], dict[str, Version]]:
    """Option lines (``--index-url ...``) and ``{canonical name: pinned version}`` of a requirements file."""
    options, pins = [], {}
    for raw in text.splitlines():
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier  # a lock pins every package to exactly one version
        assert specifier.operator == "==", line
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{name} is pinned twice"
        pins[name] = Version(specifier.version)
    return options, pins


def unsatisfied(requirements: list[str], pins: dict[str, Version]) -> list[str]:
    """The requirements (PEP 508 strings) that ``pins`` leaves out or pins outside their specifier."""
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        version = pins.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{text}: not in the lock")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{text}: the lock has {version}")
    return problems


def version_disagreements(texts: dict[str, str], pins: dict[str, Version]) -> list[str]:
    """Every ``name==version`` in ``texts`` (file name -> content) that is not the pinned version."""
    problems = []
    for file_name, text in texts.items():
        for name, version in PIN.findall(text):
            pinned = pins.get(canonicalize_name(name))
            if pinned is None:
                problems.append(f"{file_name}: {name}=={version} is not pinned in the lock")
            elif Version(version) != pinned:
                problems.append(f"{file_name}: {name}=={version} but the lock has {pinned}")
    return problems


def parse_definition(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """An Apptainer definition file: its header (``Bootstrap:``, ``From:``) and ``{section: body lines}``."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("%"):
            name = line[1:].split()[0]
            assert name in DEF_SECTIONS, f"line {number}: unknown section %{name}"
            assert name not in sections, f"line {number}: %{name} twice"
            current = sections[name] = []
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, colon, value = line.partition(":")
            assert colon and key.strip() and value.strip(), (
                f"line {number}: not a header `Key: value`: {line}"
            )
            header[key.strip()] = value.strip()
    return header, sections


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of each instruction, continuation lines joined, comments dropped."""
    instructions = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        assert keyword.upper() in DOCKER_INSTRUCTIONS, f"unknown instruction {keyword}"
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerfile_arguments(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """``{name: default}`` of the Dockerfile's ``ARG`` instructions."""
    words = [word for keyword, text in instructions if keyword == "ARG" for word in shlex.split(text)]
    return dict(word.partition("=")[::2] for word in words)


def definition_arguments(sections: dict[str, list[str]]) -> dict[str, str]:
    """``{name: default}`` of an Apptainer definition's ``%arguments``."""
    return dict(line.strip().partition("=")[::2] for line in sections["arguments"] if line.strip())


def shell_value(script: str, variable: str) -> str:
    match = re.search(rf"^{variable}=(\S+)$", script, re.MULTILINE)
    assert match, f"{variable}= not found"
    return match.group(1)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lock() -> tuple[list[str], dict[str, Version]]:
    return parse_requirements(LOCK.read_text())


@pytest.fixture(scope="module")
def lock_python() -> str:
    return re.search(r"--python-version (\S+)", LOCK.read_text()).group(1)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile((ENVS / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def definition() -> tuple[dict[str, str], dict[str, list[str]]]:
    return parse_definition((ENVS / "mugs.def").read_text())


# --------------------------------------------------------------------------------------------------- lock
def test_lock_satisfies_every_requirement_of_pyproject(lock: tuple[list[str], dict[str, Version]]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in ("workflow", "dev"):
        requirements += project["optional-dependencies"][extra]
    problems = unsatisfied(requirements, lock[1])
    assert not problems, "envs/requirements.lock is out of date; run tools/lock.sh:\n" + "\n".join(problems)


def test_the_currency_check_names_a_missing_or_outdated_pin() -> None:
    pins = {"torch": Version("2.3.1"), "numpy": Version("2.4.6")}
    assert unsatisfied(["torch>=2.4", "numpy>=1.24", "Pillow>=10"], pins) == [
        "torch>=2.4: the lock has 2.3.1",
        "Pillow>=10: not in the lock",
    ]


def test_lock_holds_the_constrained_torch_pair(lock: tuple[list[str], dict[str, Version]]) -> None:
    _, constraints = parse_requirements((ENVS / "constraints.txt").read_text())
    assert constraints == {"torch": Version("2.14.1"), "torchvision": Version("0.29.1")}
    assert {name: lock[1][name] for name in constraints} == constraints
    # PyPI's Linux torch is the CUDA build: its CUDA libraries are locked with it
    assert lock[1]["cuda-toolkit"].release[:2] == (13, 0)
    assert "nvidia-cudnn-cu13" in lock[1] and "nvidia-nccl-cu13" in lock[1]
    assert lock[0][0] == "--index-url https://pypi.org/simple"  # installers of the lock use its indexes


def test_lock_tool_writes_the_locks_python_version(lock_python: str) -> None:
    script = (REPO / "tools/lock.sh").read_text()
    assert shell_value(script, "PYTHON_VERSION") == lock_python == "3.11"
    assert "--output-file envs/requirements.lock" in script and "--constraint envs/constraints.txt" in script


# ----------------------------------------------------------------------------------------- conda and recipes
def test_conda_env_installs_exactly_the_lock(
    lock: tuple[list[str], dict[str, Version]], lock_python: str
) -> None:
    env = yaml.safe_load((ENVS / "mugs.yaml").read_text())
    dependencies = env["dependencies"]
    assert f"python={lock_python}" in dependencies
    (pip,) = [entry["pip"] for entry in dependencies if isinstance(entry, dict)]
    assert parse_requirements("\n".join(pip)) == lock
    # the environment's provenance is the hash of the lock it was made from
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert env["variables"]["MUGS_CONTAINER_DIGEST"] == f"lock-sha256:{digest}"


def test_recipes_name_only_locked_versions(lock: tuple[list[str], dict[str, Version]]) -> None:
    _, build_tools = parse_requirements((ENVS / "build-requirements.txt").read_text())
    assert build_tools.keys() == {"uv"} and not build_tools.keys() & lock[1].keys()
    texts = {name: (REPO / name).read_text() for name in RECIPES}
    assert "torch==2.14.1" in texts["envs/mugs.yaml"]
    assert not version_disagreements(texts, {**lock[1], **build_tools})


def test_a_recipe_with_another_version_is_reported(lock: tuple[list[str], dict[str, Version]]) -> None:
    texts = {"Dockerfile": "RUN pip install torch==2.13.0 timm==1.0.31 left-pad==1.0"}
    assert version_disagreements(texts, lock[1]) == [
        "Dockerfile: torch==2.13.0 but the lock has 2.14.1",
        "Dockerfile: left-pad==1.0 is not pinned in the lock",
    ]


def test_apptainer_definition_parses(definition: tuple[dict[str, str], dict[str, list[str]]]) -> None:
    header, sections = definition
    assert header["Bootstrap"] == "docker" and header["From"] == "{{ BASE_IMAGE }}"
    assert {"arguments", "files", "post", "environment", "runscript", "test"} <= sections.keys()
    for line in filter(str.strip, sections["files"]):
        source, destination = line.split()
        assert (REPO / source).exists(), f"%files copies {source}, which is not in the repository"
        assert destination.startswith("/opt/mugs/src/")
    post = [line.strip() for line in sections["post"] if line.strip()]
    # every build argument reaches install.sh, which reads it from the environment
    arguments = definition_arguments(sections)
    exported = " ".join(line.rstrip("\\") for line in post if not line.startswith("bash "))
    assert exported.startswith("export ")
    assert all(f"{name}='{{{{ {name} }}}}'" in exported for name in arguments if name != "BASE_IMAGE")
    assert [line for line in post if line.startswith("bash ")] == [
        "bash /opt/mugs/src/envs/install.sh environment /opt/mugs/src/envs/requirements.lock",
        "bash /opt/mugs/src/envs/install.sh package /opt/mugs/src",
    ]
    assert [line.strip() for line in sections["runscript"] if line.strip()] == ['exec mugs "$@"']


def test_dockerfile_parses(dockerfile: list[tuple[str, str]]) -> None:
    keywords = [keyword for keyword, _ in dockerfile]
    assert keywords[:2] == ["ARG", "FROM"] and keywords.count("FROM") == 1
    assert dockerfile[1][1] == "${BASE_IMAGE}"
    ignored = (ENVS / "Dockerfile.dockerignore").read_text().splitlines()
    for keyword, arguments in dockerfile:
        if keyword == "COPY":
            *sources, destination = arguments.split()
            assert destination.startswith("/opt/mugs/src/")
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert f"!{source.rstrip('/')}" in ignored or f"!{source.rstrip('/')}/" in ignored, source
        if keyword in ("ENTRYPOINT", "CMD"):
            assert all(isinstance(word, str) for word in json.loads(arguments))
    runs = [arguments for keyword, arguments in dockerfile if keyword == "RUN"]
    assert runs == [
        "bash /opt/mugs/src/envs/install.sh environment /opt/mugs/src/envs/requirements.lock",
        "bash /opt/mugs/src/envs/install.sh package /opt/mugs/src",
    ]


def test_both_images_are_built_alike(
    dockerfile: list[tuple[str, str]],
    definition: tuple[dict[str, str], dict[str, list[str]]],
    lock: tuple[list[str], dict[str, Version]],
    lock_python: str,
) -> None:
    _, sections = definition
    # both take the same build arguments with the same defaults
    docker_arguments = dockerfile_arguments(dockerfile)
    assert definition_arguments(sections) == docker_arguments
    # the default base image's CUDA is the one the locked torch was built with
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-rockylinux\d+", docker_arguments["BASE_IMAGE"])
    assert cuda and tuple(map(int, cuda.groups())) == lock[1]["cuda-toolkit"].release[:2]
    # the lock's Python, never a downloaded one
    assert docker_arguments["PYTHON"] == f"python{lock_python}"
    # the same files go into both images
    def_files = {line.split()[0] for line in sections["files"] if line.strip()}
    copied = set()
    for keyword, arguments in dockerfile:
        if keyword == "COPY":
            copied.update(arguments.split()[:-1])
    assert def_files == copied
    # both put the locked interpreter first on PATH and ask for the same GPU architectures
    environment = "\n".join(sections["environment"])
    env = " ".join(arguments for keyword, arguments in dockerfile if keyword == "ENV")
    assert "export PATH=/opt/venv/bin:$PATH" in environment and "PATH=/opt/venv/bin:$PATH" in env
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in environment and 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in env
    (entrypoint,) = [arguments for keyword, arguments in dockerfile if keyword == "ENTRYPOINT"]
    assert "/opt/mugs/build-digest" in environment and "/opt/mugs/build-digest" in entrypoint
    install = (ENVS / "install.sh").read_text()
    assert shell_value(install, "PYTHON") == "${PYTHON:-" + docker_arguments["PYTHON"] + "}"
    assert '"$UV" venv --python "$PYTHON" --python-preference only-system' in install
    assert "UV_PYTHON_DOWNLOADS=never" in install
    assert '"$UV" pip sync --python /opt/venv/bin/python "$2"' in install


def test_the_launcher_runs_the_images_python(tmp_path: Path) -> None:
    config = load_config(REPO / "params.yaml", run="mugs")
    config.launch.container = str(tmp_path / "mugs.sif")
    config.launch.gpus_per_node = 8
    command = shlex.split(container_python(config))
    assert command[:3] == ["apptainer", "exec", "--nv"]
    # `python` is looked up on the image's PATH, which starts with the locked /opt/venv
    assert command[-2:] == [str(tmp_path / "mugs.sif"), "python"]


def test_the_launcher_runs_the_images_python_with_podman(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "params.yaml", run="mugs")
    config.launch.container = "localhost/mugs-pipeline"
    config.launch.container_runtime = "podman"
    config.launch.container_bind = ["extra", "/data:/mnt/data:ro"]
    config.launch.container_options = ["--runtime", "runc"]
    command = shlex.split(container_python(config))
    assert command[:3] == ["podman", "run", "--rm"]
    # the job's environment, network and hostname reach the ranks in the container
    pairs = set(itertools.pairwise(command))
    assert {("--env", "SLURM_*"), ("--env", "SUBMITIT_*"), ("--network", "host"), ("--uts", "host")} <= pairs
    volumes = [value for option, value in pairs if option == "--volume"]
    # podman needs absolute paths on both sides; relative ones are the submitting directory's
    assert f"{tmp_path}/extra:{tmp_path}/extra" in volumes and "/data:/mnt/data:ro" in volumes
    assert f"{tmp_path}/results/mugs/pretrain:{tmp_path}/results/mugs/pretrain" in volumes
    assert ("--workdir", str(tmp_path)) in pairs and f"{tmp_path}:{tmp_path}" in volumes
    assert "--device" not in command
    assert command[-4:] == ["--runtime", "runc", "localhost/mugs-pipeline", "python"]
    config.launch.gpus_per_node = 8
    with_gpus = shlex.split(container_python(config))
    assert ("--device", "nvidia.com/gpu=all") in set(itertools.pairwise(with_gpus))


# ------------------------------------------------------------------------------------------- build digest
def test_build_digest_hashes_the_lock_pyproject_and_the_package_sources(tmp_path: Path) -> None:
    files = {
        "envs/requirements.lock": b"torch==2.14.1\n",
        "pyproject.toml": b"[project]\n",
        "mugs/__init__.py": b"x = 1\n",
        "mugs/b/z.py": b"",
        "mugs/a.py": b"y = 2\n",
        "mugs/notes.txt": b"not hashed",
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)

    def digest() -> str:
        done = subprocess.run(["bash", ENVS / "build-digest.sh", tmp_path], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    order = ["envs/requirements.lock", "pyproject.toml", "mugs/__init__.py", "mugs/a.py", "mugs/b/z.py"]
    listing = "".join(f"{hashlib.sha256(files[name]).hexdigest()}  {name}\n" for name in order)
    assert digest() == f"build-sha256:{hashlib.sha256(listing.encode()).hexdigest()}"
    (tmp_path / "mugs/a.py").write_bytes(b"y = 3\n")
    assert digest() != f"build-sha256:{hashlib.sha256(listing.encode()).hexdigest()}"


# -------------------------------------------------------------------------------------------------- Snakemake
RULE_IMAGES = """
import json
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DeploymentMethod, DeploymentSettings, ResourceSettings
for launcher in ("local", "slurm"):
    with SnakemakeApi() as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(config={"launcher": launcher, "container_image": "img.sif"}),
            deployment_settings=DeploymentSettings(deployment_method={DeploymentMethod.APPTAINER}),
            snakefile=Path("Snakefile"),
        )
        print(json.dumps([launcher, {rule.name: rule.container_img for rule in workflow._workflow.rules}]))
"""


def test_every_rule_runs_in_the_image_but_the_slurm_submitters() -> None:
    done = subprocess.run([sys.executable, "-c", RULE_IMAGES], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    images = dict(json.loads(line) for line in done.stdout.splitlines() if line.startswith("["))
    assert set(images["local"].values()) == {"img.sif"}
    # sbatch is on the host, not in the image: the rules that submit a long job (pretraining and
    # fine-tuning, both through the one launcher) stay outside, their jobs run in the image
    assert (images["slurm"].pop("pretrain"), images["slurm"].pop("finetune")) == (None, None)
    assert set(images["slurm"].values()) == {"img.sif"}


# records its arguments and makes the rule's output instead of running the command in an image
FAKE_APPTAINER = """#!/bin/sh
[ "$1" = --version ] && { echo "apptainer version 1.3.6"; exit 0; }
printf '%s\\n' "$@" > "$(dirname "$0")/call.txt"
mkdir -p data/fashion-mnist
"""


def test_snakemake_sdm_apptainer_runs_the_rule_in_the_configured_image(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for name in ("Snakefile", "params.yaml", "workflow", "envs"):
        os.symlink(REPO / name, work / name)
    fake = tmp_path / "bin" / "apptainer"
    fake.parent.mkdir()
    fake.write_text(FAKE_APPTAINER)
    fake.chmod(0o755)
    path = os.pathsep.join([str(fake.parent), str(Path(sys.executable).parent), os.environ["PATH"]])
    command = ["snakemake", "--sdm", "apptainer", "--config", "container_image=/images/mugs.sif"]
    done = subprocess.run(
        [*command, "--cores", "1", "--", "data/fashion-mnist"],
        cwd=work,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    call = (fake.parent / "call.txt").read_text().splitlines()
    assert call[:3] == ["exec", "--home", str(work)]
    assert call[-4:-1] == ["/images/mugs.sif", "bash", "-c"]
    assert "mugs demo-data --config params.yaml --run mugs > results/logs/demo_data.log" in call[-1]
