"""Seconds per training iteration, images per second, peak memory and FLOPs of one Mugs step.

The step is the engine's own ``Trainer.train_step`` on random crops already on the device, so the
figure is the model's cost without the data loader (see ``benchmarks/augment.py`` for that side).

    python benchmarks/train_step.py --arch vit_small --batch 4 --global-size 224 --local-size 96 \\
        --n-local 2 --queue 1024 --group-out-dim 4096 --threads 2

``--without`` measures the step as it was before one of its optimisations (repeatable), for the
before/after figures:

    attention   timm's attention as explicit matrix products instead of fused scaled_dot_product_attention
    adamw       AdamW's per-parameter loop instead of its fused (CUDA) or foreach (CPU) kernels
    clipping    per-tensor gradient clipping as DINO's loop, which reads every norm on the host
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm.layers
import torch
from _common import add_device_arguments, device_name, machine_info, peak_memory_mib, report, synchronize
from torch.utils.flop_counter import FlopCounterMode

from mugs.config import config_from_dict
from mugs.testing.synthetic import SyntheticImages
from mugs.training import engine
from mugs.training.engine import Trainer
from mugs.training.optim import clip_gradients_per_tensor

# Dense peak throughput per device, TFLOP/s, for model FLOPs utilisation.
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.0,
    ("H100", "fp16"): 989.0,
    ("H100", "fp32"): 67.0,  # plain fp32 (no TF32); matmuls may use TF32 when allowed
    ("H200", "bf16"): 989.0,
    ("H200", "fp16"): 989.0,
    ("H200", "fp32"): 67.0,
    ("A100", "bf16"): 312.0,
    ("A100", "fp16"): 312.0,
    ("A100", "fp32"): 19.5,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="images per iteration")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--n-local", type=int, default=2)
    parser.add_argument("--queue", type=int, default=1024, help="InfoNCE queues and neighbour memories")
    parser.add_argument("--group-out-dim", type=int, default=4096)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and teacher")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=("attention", "adamw", "clipping"),
        help="undo one optimisation of the step, for its 'before' figure (repeatable)",
    )
    add_device_arguments(parser, threads=2)
    return parser.parse_args(argv)


def build_trainer(args: argparse.Namespace, output_dir: Path) -> Trainer:
    config = config_from_dict(
        {
            "model": {
                "arch": args.arch,
                "depth": args.depth,
                "patch_size": args.patch_size,
                "group_out_dim": args.group_out_dim,
            },
            "loss": {"instance_queue_size": args.queue, "local_group_queue_size": args.queue},
            "augment": {
                "global_size": args.global_size,
                "local_size": args.local_size,
                "n_local": args.n_local,
            },
            "optim": {"batch_size": args.batch, "epochs": 1, "warmup_epochs": 0, "precision": args.precision},
            # only the training step runs here; keep the linear-probe setting valid for shallow models
            "evaluate": {"linear_n_last_blocks": 1},
            "train": {
                "output_dir": str(output_dir),
                "device": args.device,
                "threads": args.threads,
                "num_workers": 0,
                "compile": args.compile,
            },
        }
    )
    dataset = SyntheticImages(size=args.batch, side=8)
    return Trainer(config, dataset, mean_std=((0.5,) * 3, (0.25,) * 3))


@torch.no_grad()
def clip_with_host_reads(parameters, max_norm: float) -> torch.Tensor:
    """The per-tensor clipping of DINO's training loop: each norm is read on the host, one
    synchronisation per parameter on a GPU (the 'before' of the engine's foreach clipping)."""
    norms = []
    for parameter in parameters:
        if parameter.grad is None:
            continue
        norm = parameter.grad.norm(2)
        norms.append(norm)
        factor = max_norm / (float(norm) + 1e-6)
        if factor < 1:
            parameter.grad.mul_(factor)
    return torch.stack(norms)


def undo_optimisations(trainer: Trainer, without: list[str]) -> None:
    """Put back, on a built trainer, the step's implementation before the named optimisations."""
    if "adamw" in without:
        groups = [
            {key: value for key, value in group.items() if key not in ("foreach", "fused")}
            for group in trainer.optimizer.param_groups
        ]
        trainer.optimizer = torch.optim.AdamW(groups, foreach=False, fused=False)
    if "clipping" in without:
        engine.clip_gradients_per_tensor = clip_with_host_reads


def implementations(trainer: Trainer) -> dict[str, str]:
    """What the built step runs, read off it rather than off the options: attention, AdamW, clipping."""
    attention = [m.fused_attn for m in trainer.student.modules() if hasattr(m, "fused_attn")]
    adamw = trainer.optimizer.defaults
    return {
        "attention": "fused" if all(attention) else "matmul",
        "adamw": "fused" if adamw["fused"] else "foreach" if adamw["foreach"] else "loop",
        "clipping": "foreach"
        if engine.clip_gradients_per_tensor is clip_gradients_per_tensor
        else "host reads",
    }


def random_crops(args: argparse.Namespace, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sizes = [args.global_size] * 4 + [args.local_size] * args.n_local
    crops = [torch.randn(args.batch, 3, s, s, generator=generator).to(device) for s in sizes]
    weak = torch.rand(args.batch, generator=generator) < 0.5
    return crops, weak


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # timm decides per attention module, when it is built
    timm.layers.set_fused_attn("attention" not in args.without)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(args, Path(scratch))
        undo_optimisations(trainer, args.without)
        running = implementations(trainer)
        device = trainer.device
        crops, weak = random_crops(args, device)
        # count FLOPs on the eager modules (a compiled graph hides its operations from the counter)
        compiled = trainer.student_ddp, trainer.teacher_forward
        trainer.student_ddp, trainer.teacher_forward = trainer.student, trainer.teacher
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(crops, weak)
        flops = counter.get_total_flops()
        trainer.student_ddp, trainer.teacher_forward = compiled
        for _ in range(args.warmup):
            trainer.train_step(crops, weak)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            losses = trainer.train_step(crops, weak)
            float(losses["loss"])  # include the step's device work
            synchronize(device)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    name = device_name(device)
    peak = args.peak_tflops
    if peak is None:
        peak = next((v for (gpu, p), v in PEAK_TFLOPS.items() if gpu in name and p == args.precision), None)
    achieved = flops / seconds / 1e12
    result = {
        "arch": args.arch,
        "depth": args.depth,
        "batch": args.batch,
        "crops": f"4x{args.global_size} (2 teacher, 2 student) + {args.n_local}x{args.local_size}",
        "queue": args.queue,
        "group_out_dim": args.group_out_dim,
        "precision": args.precision,
        "compile": args.compile,
        "without": ",".join(args.without) or None,
        **running,
        "seconds_per_iteration": seconds,
        "seconds_min": min(times),
        "images_per_second": args.batch / seconds,
        "peak_memory_mib": peak_memory_mib(device),
        "tflop_per_iteration": flops / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        **machine_info(device),
    }
    report("Mugs training step", result, args.json)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
