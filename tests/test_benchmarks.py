"""The benchmark scripts run (tiny, on CPU) and report their figures, so they cannot rot unnoticed.

The pipeline benchmark runs on a two-job workflow made here: the project's own dry run takes longer
and would plan against whatever results/ holds.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_runs_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    step = json.loads((tmp_path / "step-vit_tiny-fp32.json").read_text())
    assert step["seconds_per_iteration"] > 0 and step["tflop_per_iteration"] > 0
    assert step["images_per_second"] == pytest.approx(step["batch"] / step["seconds_per_iteration"])
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert (knn["bank"], knn["queries"], knn["dim"]) == (2000, 200, 64)
    assert "queries_per_second" in (tmp_path / "knn.txt").read_text()
    features = json.loads((tmp_path / "features-vit_tiny.json").read_text())
    assert (features["images"], features["image_size"], features["feature_dim"]) == (16, 32, 192)
    probe = json.loads((tmp_path / "probe-vit_tiny.json").read_text())
    assert (probe["image_size"], probe["batches"], probe["heads"]) == (32, 4, 14)
    finetune = json.loads((tmp_path / "finetune-vit_tiny.json").read_text())
    assert (finetune["batch"], finetune["depth"]) == (2, 1) and finetune["images_per_second"] > 0
    for without in ("attention", "adamw", "clipping"):
        before = json.loads((tmp_path / f"step-vit_tiny-fp32-without-{without}.json").read_text())
        assert before["without"] == without and before["seconds_per_iteration"] > 0
    augment = json.loads((tmp_path / "augment-paper.json").read_text())
    assert augment["batch"] == step["batch"] and augment["step_seconds"] == step["seconds_per_iteration"]
    assert augment["loader_workers"] == 1 and isinstance(augment["loader_keeps_up"], bool)
    device = json.loads((tmp_path / "augment-paper-device.json").read_text())
    assert (augment["backend"], device["backend"]) == ("cpu", "device")
    assert device["device_ms_per_batch"] > 0 and device["per_process_cpu_ms_per_image"] > 0
    for backend in ("cpu", "device"):
        loop = json.loads((tmp_path / f"loop-vit_tiny-{backend}.json").read_text())
        assert (loop["backend"], loop["num_workers"], loop["arch"]) == (backend, 1, "vit_tiny")
        assert loop["source"].startswith("4 JPEGs") and 0 < loop["data_fraction"] < 1


def run_benchmark(script: str, args: str, json_path: Path) -> dict:
    """Run ``benchmarks/script`` with the command-line ``args``; its figures from ``--json``."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *shlex.split(args), "--json", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(json_path.read_text())


def assert_machine(figures: dict) -> None:
    assert figures["cores"] >= 1 and figures["cpu_model"] and figures["torch"] and figures["device"]
    assert figures["code"] == str(ROOT / "mugs")


def test_train_step_without_its_optimisations(tmp_path: Path) -> None:
    args = (
        "--arch vit_tiny --depth 1 --patch-size 8 --batch 2 --global-size 32 --local-size 16 --queue 64"
        " --group-out-dim 64 --warmup 0 --iters 1 --without attention --without adamw --without clipping"
    )
    before = run_benchmark("train_step.py", args, tmp_path / "before.json")
    assert before["without"] == "attention,adamw,clipping" and before["seconds_per_iteration"] > 0
    # read off the built step: the options must change what runs, not just the label
    assert (before["attention"], before["adamw"], before["clipping"]) == ("matmul", "loop", "host reads")
    after = run_benchmark("train_step.py", args.split(" --without")[0], tmp_path / "after.json")
    assert (after["attention"], after["adamw"], after["clipping"]) == ("fused", "foreach", "foreach")
    assert after["without"] is None
    assert_machine(before)


def test_the_clipping_before_clips_as_the_engine_does() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_step import clip_with_host_reads
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from mugs.training.optim import clip_gradients_per_tensor

    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 7, generator=generator) * scale for scale in (0.1, 1.0, 10.0)]
    loop = [torch.nn.Parameter(torch.zeros(5, 7)) for _ in grads]
    foreach = [torch.nn.Parameter(torch.zeros(5, 7)) for _ in grads]
    for a, b, g in zip(loop, foreach, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    assert torch.allclose(clip_with_host_reads(loop, 3.0), clip_gradients_per_tensor(foreach, 3.0))
    for a, b in zip(loop, foreach, strict=True):
        assert torch.allclose(a.grad, b.grad)
    assert loop[2].grad.norm() == pytest.approx(3.0, rel=1e-5) and torch.equal(loop[0].grad, grads[0])


def test_a_copied_tree_measures_its_own_code(tmp_path: Path) -> None:
    # a before/after comparison runs the same script from two trees; each must import its own mugs
    for folder in ("benchmarks", "mugs"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    figures_path = tmp_path / "knn.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/knn.py",
            "--bank",
            "200",
            "--queries",
            "20",
            "--dim",
            "8",
            "--classes",
            "4",
            "--json",
            str(figures_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(figures_path.read_text())
    assert figures["code"] == str(tmp_path / "mugs") and figures["git"] is None  # not a git checkout


def test_augment_demo_rates_and_workers_for_a_step(tmp_path: Path) -> None:
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"seconds_per_iteration": 0.5, "batch": 4}))
    args = (
        f"--setting demo --images 12 --batches 2 --repeats 2 --workers 1 --step-json {shlex.quote(str(step))}"
    )
    figures = run_benchmark("augment.py", args, tmp_path / "augment.json")
    assert figures["crops"] == "4x28 (2 teacher, 2 student) + 2x14"
    assert figures["source"] == "12 grayscale 28x28 images from an IDX array"
    assert figures["batch"] == 4 and figures["loader_workers"] == 1
    rate = figures["per_process_images_per_second"]
    assert rate > 0 and figures["loader_images_per_second"] > 0
    assert figures["per_process_ms_per_image"] == pytest.approx(1000 / rate)
    assert figures["images_per_second_needed"] == pytest.approx(8.0)  # 4 images in 0.5 s
    assert figures["workers_needed"] == math.ceil(8.0 / rate)
    assert figures["loader_keeps_up"] == (figures["loader_images_per_second"] >= 8.0)
    # uint8 crops (4 × 3 × 28² + 2 × 3 × 14² bytes), boxes, flags, labels and erasing noise; not float32
    uint8_crops = 4 * 3 * 28 * 28 + 2 * 3 * 14 * 14
    assert uint8_crops < figures["loader_bytes_per_image"] < 2 * uint8_crops
    assert figures["loader_bytes_per_second_needed"] == pytest.approx(8.0 * figures["loader_bytes_per_image"])
    assert_machine(figures)


def test_augment_paper_reads_prepared_jpegs(tmp_path: Path) -> None:
    args = "--setting paper --images 3 --batch 1 --batches 2 --repeats 1 --breakdown 3"
    figures = run_benchmark("augment.py", args, tmp_path / "augment.json")
    profiled = [value for key, value in figures.items() if key.startswith("profiled_ms_per_image_in_")]
    assert len(profiled) == 3 and profiled == sorted(profiled, reverse=True) and profiled[-1] > 0
    assert figures["crops"] == "4x224 (2 teacher, 2 student) + 10x96"
    assert figures["source"].startswith("3 JPEGs 500x375 (")
    assert figures["per_process_images_per_second"] > 0
    assert figures["loader_images_per_second"] is None and "workers_needed" not in figures


def test_memory_times_every_call_at_the_given_sizes(tmp_path: Path) -> None:
    args = "--size 256 --batch 8 --memory-dim 32 --queue-dim 16 --n-local 3 --warmup 1 --iters 2"
    figures = run_benchmark("memory.py", args, tmp_path / "memory.json")
    for key in ("retrieve_batch_ms", "retrieve_step_ms", "memory_enqueue_ms", "queue_enqueue_ms"):
        assert figures[key] > 0, key
    assert figures["retrieve_step_queries"] == (2 + 4 + 3) * 8
    # search keys and values 256 x 32, queue 16 x 256, two int64 pointers
    assert figures["buffers_mib"] * 2**20 == 2 * 256 * 32 * 4 + 16 * 256 * 4 + 2 * 8
    assert figures["peak_memory_mib"] > figures["buffers_mib"]
    assert figures["peak_memory_kind"] == "process RSS"
    assert_machine(figures)


@pytest.fixture
def tiny_workflow(tmp_path: Path) -> Path:
    """A two-job Snakemake workflow with a local profile, and a DVC project whose one stage never ran."""
    root = tmp_path / "workflow"
    (root / "profiles/local").mkdir(parents=True)
    (root / "profiles/local/config.yaml").write_text("cores: 1\n")
    (root / "Snakefile").write_text(
        'rule all:\n    input: "b.txt"\n\n\nrule make:\n    output: "b.txt"\n    shell: "echo b > {output}"\n'
    )
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: echo b > b.txt\n    outs:\n    - b.txt\n")
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True, timeout=60)
    return root


def test_pipeline_counts_jobs_and_changed_stages_without_running_them(
    tiny_workflow: Path, tmp_path: Path
) -> None:
    args = f"--root {shlex.quote(str(tiny_workflow))} --repeats 1"
    figures = run_benchmark("pipeline.py", args, tmp_path / "pipeline.json")
    assert figures["snakemake_jobs"] == 2 and figures["snakemake_jobs_by_rule"] == "make 1, all 1"
    assert figures["dvc_lock"] is False and figures["dvc_clean"] is False
    assert figures["dvc_changed_stages"] == 1
    assert figures["snakemake_dry_run_seconds"] > 0 and figures["dvc_status_seconds"] > 0
    assert not (tiny_workflow / "b.txt").exists()
    assert_machine(figures)


def test_knn_reports_the_search_it_timed(tmp_path: Path) -> None:
    args = "--bank 500 --queries 50 --dim 16 --classes 5 --chunk-size 16 --bank-chunk-size 128 --threads 1"
    figures = run_benchmark("knn.py", args, tmp_path / "knn.json")
    assert (figures["bank"], figures["queries"], figures["dim"], figures["classes"]) == (500, 50, 16, 5)
    assert figures["ks"] == [10, 20, 100, 200] and figures["threads"] == 1
    assert (figures["chunk_size"], figures["bank_chunk_size"]) == (16, 128)
    assert figures["queries_per_second"] == pytest.approx(50 / figures["seconds"])
    assert figures["bank_mib"] * 2**20 == 500 * 16 * 4
    assert figures["top1_at_20"] * 50 == pytest.approx(round(figures["top1_at_20"] * 50))  # of 50 queries
    assert figures["chance_top1"] == 0.2
    assert figures["peak_memory_mib"] >= 0 and figures["peak_memory_kind"] == "process RSS above baseline"
    assert_machine(figures)


def test_prepare_decodes_every_file_cold_and_none_warm(tmp_path: Path) -> None:
    figures = run_benchmark("prepare.py", "--images 20 --classes 2 --workers 1", tmp_path / "prepare.json")
    assert (figures["images"], figures["classes"], figures["workers"]) == (20, 2, 1)
    assert (figures["cold_decoded"], figures["cold_cached"]) == (20, 0)
    assert (figures["warm_decoded"], figures["warm_cached"]) == (0, 20)
    assert figures["cold_files_per_second"] == pytest.approx(20 / figures["cold_seconds"])
    assert figures["warm_files_per_second"] == pytest.approx(20 / figures["warm_seconds"])
    assert 1 < figures["kib_per_image"] < 10  # 64x64 JPEGs at quality 90
    assert_machine(figures)


def test_features_extracts_every_image_without_a_cache(tmp_path: Path) -> None:
    args = (
        "--arch vit_tiny --depth 1 --patch-size 8 --image-size 32 --images 16 --batch-size 8 "
        "--workers 1 --threads 1"
    )
    figures = run_benchmark("features.py", args, tmp_path / "features.json")
    assert (figures["arch"], figures["depth"], figures["patch_size"], figures["image_size"]) == (
        "vit_tiny",
        1,
        8,
        32,
    )
    assert figures["source"].startswith("16 JPEGs 500x375 (")
    assert (figures["images"], figures["batch_size"], figures["loader_workers"]) == (16, 8, 1)
    assert figures["feature_dim"] == 192 and figures["features_mib"] * 2**20 == 16 * 192 * 4
    assert figures["images_per_second"] == pytest.approx(16 / figures["seconds"])
    before = figures["first_batch_seconds"] + figures["after_last_batch_seconds"]
    assert 0 < before < figures["seconds"]
    # the second batch of 8 images came after the first, within the rest of the call
    rest = figures["seconds"] - before
    assert figures["after_first_batch_images_per_second"] == pytest.approx(8 / rest)
    assert figures["peak_memory_mib"] >= 0 and figures["peak_memory_kind"] == "process RSS above baseline"
    assert_machine(figures)


@pytest.mark.slow
def test_cpu_script_quick_runs_every_benchmark(tiny_workflow: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PIPELINE_ROOT": str(tiny_workflow)}
    done = subprocess.run(
        ["bash", "benchmarks/cpu.sh", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    names = ("step-cpu", "loop-target", "loop-demo", "augment-paper", "augment-demo", "memory-cpu")
    names += ("knn", "features-cpu", "probe-cpu", "prepare", "pipeline")
    for name in names:
        assert json.loads((out / f"{name}.json").read_text())["torch"], name
        assert (out / f"{name}.txt").read_text().strip(), name
    loop_demo = json.loads((out / "loop-demo.json").read_text())
    assert (loop_demo["setting"], loop_demo["depth"], loop_demo["batch"]) == ("demo", 1, 8)
    assert json.loads((out / "prepare.json").read_text())["cold_decoded"] == 50
    probe = json.loads((out / "probe-cpu.json").read_text())
    assert (probe["batches"], probe["heads"], probe["feature_dim"]) == (4, 14, 4 * 192)
    assert probe["images_per_second"] > 0 and 0 < probe["heads_ms_per_batch"] < probe["ms_per_batch"]
    assert not (out / "failures.txt").exists()


@pytest.mark.slow
def test_dataset_scale_times_every_stage_on_a_tiny_tree(tmp_path: Path) -> None:
    args = "--images 12 --classes 3 --rows 500 --manifest-classes 10 --imagenet 1200"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/dataset_scale.py",
            *shlex.split(args),
            "--json",
            str(tmp_path / "s.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads((tmp_path / "s.json").read_text())
    assert (figures["prepare_cold_decoded"], figures["prepare_warm_decoded"]) == (12, 0)
    assert 50 < figures["kb_per_image"] < 200 and figures["prepare_imported_torch"] is False
    assert figures["prepare_cold_cpu_ms_per_image"] == pytest.approx(
        1000 * figures["prepare_cold_cpu_seconds"] / 12
    )
    assert figures["prepare_warm_imagenet_cpu_seconds"] == pytest.approx(
        100 * figures["prepare_warm_cpu_seconds"]
    )
    assert figures["snakemake_dry_run_seconds"] > 0 and figures["dvc_status_seconds"] > 0
    assert figures["versioning_command"] is None
    assert figures["dataset_rows"] == 500 and figures["dataset_resting_mb"] >= 0
    assert_machine(figures)
