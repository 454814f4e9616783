"""The image built and run for real: a Debian 12 base made by debootstrap (no registry), envs/Dockerfile built
on it with podman, and the demo's first stages (data, prepare, a short pretraining, kNN) run in it.

Needs root and apt-get (it installs podman, buildah, runc and debootstrap when missing); CI runs as root. The
first run takes ~6 minutes on 2 cores; a rerun with the same lock reuses the base tarball
(~/.cache/mugs-pipeline) and the dependency layer of the kept image ``localhost/mugs-pipeline-test``, and
only reinstalls the package. Containers are removed; those two caches stay (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from mugs.data.sources import FASHION_MNIST_SYSTEM_DIR
from tests.workflow_helpers import RUN, copy_worktree, sh, tiny_params

REPO = Path(__file__).resolve().parents[1]
IMAGE = "localhost/mugs-pipeline-test"
TOOLS = ("podman", "buildah", "runc", "debootstrap")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("apt-get") is None,
        reason="building the image needs root and apt-get (podman, buildah, runc, debootstrap from Debian)",
    ),
]


def runtime_options() -> list[str]:
    """What ``podman run`` needs on a host like this one: runc (crun refuses a hybrid cgroup hierarchy) and
    limits runc may set: the host's hard limit of open files (podman's default is higher) and podman build's
    default process limit (runc fails to set this host's own, higher one)."""
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = [f"nofile={open_files}:{open_files}", "nproc=32768:32768"]
    return ["--runtime", "runc", *(option for limit in limits for option in ("--ulimit", limit))]


def podman_run(*arguments: str) -> list[str]:
    return ["podman", "run", "--rm", *runtime_options(), "--network", "none", *arguments]


def install_missing_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
        for command in ([*apt, "update", "-q"], [*apt, "install", "-y", "-q", *missing]):
            subprocess.run(["nice", *command], check=True, capture_output=True, env=environment, timeout=900)


def image_id(name: str) -> str | None:
    inspect = ["podman", "image", "inspect", "--format", "{{.Id}}", name]
    done = subprocess.run(inspect, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def build_test_image() -> str:
    """The image built from this checkout on the debootstrap base; an earlier build it replaces is removed."""
    install_missing_tools()
    base = sh("bash", REPO / "tools/debian-base.sh", cwd=REPO, timeout=900).stdout.strip()
    earlier = image_id(IMAGE)
    sh("bash", REPO / "tools/build-image.sh", IMAGE, base, cwd=REPO, timeout=1500)
    if earlier not in (None, image_id(IMAGE)):
        # the replaced build and its intermediate layers; ignore layers the new build still shares
        subprocess.run(["podman", "rmi", earlier], capture_output=True)
    return IMAGE


@pytest.fixture(scope="module")
def image() -> str:
    return build_test_image()


def build_digest() -> str:
    return sh("bash", REPO / "envs/build-digest.sh", REPO, cwd=REPO).stdout.strip()


def test_the_image_has_the_locked_environment_and_the_package(image: str) -> None:
    check = "import mugs, timm, torch; print(torch.__version__, timm.__version__, mugs.__file__)"
    versions = sh(*podman_run(image, "python", "-c", check), cwd=REPO).stdout.split()
    assert versions[0].startswith("2.14.1") and versions[2].startswith("/opt/venv/")
    help_text = sh(*podman_run(image, "mugs", "--help"), cwd=REPO).stdout
    assert "pretrain" in help_text and "knn" in help_text
    # the host's extra CA certificates (tools/build-image.sh passes them as EXTRA_CA_CERTS) are trusted
    bundle = sh(*podman_run(image, "cat", "/etc/ssl/certs/ca-certificates.crt"), cwd=REPO).stdout
    for certificate in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        body = "".join(certificate.read_text().split("-----")[2].split())
        assert body in "".join(bundle.split()), f"{certificate} is not trusted in the image"
    # the entrypoint exports the digest of what the image was built from: this checkout
    digest = sh(*podman_run(image, "sh", "-c", "echo $MUGS_CONTAINER_DIGEST"), cwd=REPO).stdout.strip()
    assert digest == build_digest()


@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_the_demos_first_stages_run_in_the_image(image: str, tmp_path: Path) -> None:
    repo = copy_worktree(tmp_path / "repo")
    tiny_params(repo)
    data = str(FASHION_MNIST_SYSTEM_DIR)
    target = f"results/{RUN}/eval/knn.json"
    # Snakemake and every rule's command in the image, on a working copy of this checkout
    command = podman_run("-v", f"{repo}:{repo}", "-w", str(repo), "-v", f"{data}:{data}:ro", image)
    sh(*command, "snakemake", "--profile", "profiles/local", "--cores", "2", target, cwd=repo, timeout=900)

    summary = json.loads((repo / "results/data/summary.json").read_text())
    assert (summary["source"], summary["classes"], summary["bad_files"]) == ("fashion-mnist", 10, 0)
    assert (repo / f"results/{RUN}/pretrain/checkpoints/latest.pt").stat().st_size > 0
    log = (repo / f"results/{RUN}/pretrain/log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in log], "the pretraining logged nothing"
    knn = json.loads((repo / target).read_text())
    assert knn["evaluation"] == "knn"
    assert knn["fine"]["10"]["top1"] > 0.2  # 10 balanced classes: a trained backbone beats chance clearly
    assert knn["provenance"]["container_digest"] == build_digest()
    assert knn["provenance"]["packages"]["torch"] == "2.14.1"  # the image's torch: the lock's
