"""The ``mugs`` command line: thin wrappers that parse arguments and call the package.

Exit codes: 0 done; 2 bad input (a value, path or file, named in one line; --debug adds the
traceback); 3 pretraining stopped on a non-finite loss or a collapse; 1 the SLURM job failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from mugs.files import atomic_write_text, check_output

if TYPE_CHECKING:
    from mugs.config import Config
    from mugs.launch.jobs import LongJob
    from mugs.training.engine import TrainResult

console = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line naming the argument (exit code 2), without the usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        nargs="+",
        action="extend",
        help="YAML config (a `preset:` key selects a preset); with several, later files are merged over "
        "earlier ones",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one value, e.g. --set optim.epochs=10 (repeatable)",
    )
    parser.add_argument(
        "--preset",
        help="start from a named preset (see `mugs presets`): its values lie underneath the --config "
        "files (replacing their `preset:` key), and --set values go on top of both",
    )
    parser.add_argument("--run", help="one of the named runs of a pipeline parameter file (its `runs:` key)")


def _load(args: argparse.Namespace):
    from mugs.config import ConfigError, config_from_dict, load_config

    if args.config is None:
        if args.run is not None:
            raise ConfigError(f"--run {args.run} needs the pipeline parameter file (--config params.yaml)")
        return config_from_dict({}, args.overrides, preset=args.preset)
    return load_config(args.config, args.overrides, run=args.run, preset=args.preset)


def _check_checkpoint(path: Path, network: str) -> None:
    """Refuse, before any data are read, a checkpoint that cannot be read, is not one of ours, or
    whose ``network`` weights do not fit the architecture it records."""
    from mugs.evaluation.features import load_backbone
    from mugs.interop import read_checkpoint

    load_backbone(read_checkpoint(path, network), network, source=path)


def _check_evaluation(args: argparse.Namespace, network: str) -> None:
    """The checks before an evaluation of ``args.checkpoint`` that writes ``args.out``."""
    check_output(args.out, [args.checkpoint])
    _check_checkpoint(args.checkpoint, network)


def _launch(config: Config, job: LongJob, args: argparse.Namespace) -> TrainResult | int:
    """Run ``job`` through the launcher ``--launcher`` or ``launch.launcher`` names (its kind's
    ``launch.jobs`` settings on top); an exit code when it did not finish or stop by itself."""
    if args.launcher:
        config.launch.launcher = args.launcher
    from mugs.config import for_job

    launch = for_job(config, job.kind).launch
    if launch.launcher == "slurm":
        from mugs.launch.slurm import SlurmJobError, StoppedWaiting, launch_slurm

        try:
            result = launch_slurm(config, job=job, progress=not args.no_progress)
        except SlurmJobError as error:
            console.print(f"[bold red]SLURM:[/] {error}")
            return 1
        except StoppedWaiting as stopped:
            console.print(str(stopped), soft_wrap=True)
            return 128 + int(stopped.received)
    else:
        from mugs.launch.local import launch_local

        nprocs = args.nprocs if args.nprocs is not None else launch.nprocs
        result = launch_local(config, nprocs, job=job, progress=not args.no_progress)
    if result.stopped_by is not None:
        from mugs.launch.signals import stopped_by_signal

        message, code = stopped_by_signal(result)
        console.print(message)
        return code
    return result


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mugs.training.pretrain import set_aside_if_changed

    config = _load(args)
    if args.output_dir:
        config.train.output_dir = str(args.output_dir)
    check_output(config.train.output_dir, directory=True)
    if args.restart_if_changed:
        from mugs.launch.slurm import recorded_active_job

        job = recorded_active_job(Path(config.train.output_dir))
        if job is not None:
            console.print(
                f"[bold red]error:[/] SLURM job {job} of {config.train.output_dir} is still pending or "
                f"running: wait for it, or cancel it (scancel {job}) before restarting with other settings"
            )
            return 2
        moved = set_aside_if_changed(config)
        if moved:
            console.print(f"settings changed since the last checkpoint: earlier run moved to {moved}")
    from mugs.launch.jobs import Pretraining

    result = _launch(config, Pretraining(), args)
    if isinstance(result, int):
        return result
    console.print(
        f"pretraining {result.status} at global iteration {result.global_iteration}: {result.checkpoint}"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mugs.data.prepare import run_prepare

    data = _load(args).data
    check_output(data.prepared_dir, directory=True)
    summary = run_prepare(data, progress=not args.no_progress)
    console.print(
        f"prepared {summary.source} into {summary.prepared_dir}: "
        + ", ".join(f"{split} {count}" for split, count in summary.counts.items())
        + f"; {summary.bad_files} bad files skipped"
    )
    return 0


def cmd_data_state(args: argparse.Namespace) -> int:
    from mugs.data.state import refresh_data_state, state_path

    data = _load(args).data
    changed = refresh_data_state(data)
    console.print(f"{state_path(data)}: {'rewritten, the data changed' if changed else 'unchanged'}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from mugs.data.sources import install_demo_data

    dest = check_output(args.dest or Path(_load(args).data.root), directory=True)
    install_demo_data(dest)
    console.print(f"Fashion-MNIST demo data in {dest}")
    return 0


def cmd_import_official(args: argparse.Namespace) -> int:
    from mugs.interop import import_official_checkpoint

    out = import_official_checkpoint(args.path, args.out, trust_pickle=args.trust_pickle, arch=args.arch)
    console.print(f"wrote {out}")
    return 0


def cmd_reproduce_paper(args: argparse.Namespace) -> int:
    from mugs.reproduce import reproduce_paper

    table = reproduce_paper(args.spec, device=args.device, progress=not args.no_progress)
    console.print(table, highlight=False, soft_wrap=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mugs.interop import export_backbone

    out = export_backbone(args.checkpoint, args.out, network=args.network)
    console.print(f"wrote {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    import yaml

    from mugs.config import PRESETS, ConfigError, config_from_dict

    if args.write_params:
        from mugs.pipeline_files import params_text

        if not args.name:
            raise ConfigError("--write-params needs a preset: mugs presets demo --write-params params.yaml")
        return _write_generated(
            Path(args.write_params),
            params_text(Path(args.write_params).read_text(), args.name),
            args.check,
            f"mugs presets {args.name} --write-params {args.write_params}",
        )
    if args.name:
        print(yaml.safe_dump(config_from_dict({"preset": args.name}).to_dict(), sort_keys=False), end="")
    else:
        print("\n".join(PRESETS))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from mugs.pipeline_files import SCHEMA_PATH, schema_text

    return _write_generated(SCHEMA_PATH, schema_text(), args.check, "mugs schema")


def _write_generated(target: Path, text: str, check: bool, command: str) -> int:
    """Write a generated file, or with ``check`` say whether the committed one is current (exit 1 if not)."""
    if check:
        if not target.exists() or target.read_text() != text:
            console.print(f"{target} is not what `{command}` generates: run it")
            return 1
        console.print(f"{target} is current")
        return 0
    atomic_write_text(target, text)
    console.print(f"wrote {target}")
    return 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from mugs.dvc_stages import generate

    text = generate(Path.cwd(), args.params)
    target = Path("dvc.yaml")
    if args.check:
        if not target.exists() or target.read_text() != text:
            console.print("dvc.yaml is not what the Snakefile generates: run `mugs dvc-yaml`")
            return 1
        console.print("dvc.yaml is current")
        return 0
    atomic_write_text(target, text)
    console.print(f"wrote {target}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from mugs.launch.jobs import Finetuning

    config = _load(args)
    _check_evaluation(args, config.finetune.checkpoint_key)
    result = _launch(config, Finetuning(str(args.checkpoint), str(args.out)), args)
    if isinstance(result, int):
        return result
    metrics = json.loads(args.out.read_text())
    coarse = f", coarse {metrics['coarse']['top1']:.4f}" if "coarse" in metrics else ""
    console.print(
        f"fine-tuned: best val epoch {metrics['best_epoch']}, test top-1 {metrics['fine']['top1']:.4f}"
        f"{coarse} → {args.out}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mugs.report import run_report

    # one config for every run when given (e.g. params.yaml); otherwise each run's own config.yaml
    config = _load(args) if args.config is not None or args.preset else None
    check_output(args.out, args.runs, directory=True)
    written = run_report(
        args.runs,
        args.out,
        names=args.names,
        eval_dirs=args.eval_dirs,
        baselines=dict(zip(args.baseline_names or [], args.baseline_dirs or [], strict=True)),
        config=config,
        overrides=args.overrides,
        knn_k=args.knn_k,
        tsne_samples=args.tsne_samples,
        attention_images=args.attention_images,
        device=args.device,
        progress=not args.no_progress,
    )
    console.print(f"report of {len(args.runs)} run(s) in {args.out}: {written['summary.md']}")
    return 0


def _positive_seconds(text: str) -> float:
    seconds = float(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return seconds


def _add_progress_lines_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress-every",
        type=_positive_seconds,
        metavar="SECONDS",
        default=os.environ.get("MUGS_PROGRESS_EVERY"),
        help="print a plain progress line (position, rate, time left) every SECONDS, for log files "
        "(default: $MUGS_PROGRESS_EVERY, which the workflow sets; unset: none)",
    )


def _use_progress_lines(args: argparse.Namespace) -> None:
    """Plain progress lines, labelled with the command and its run, when --progress-every asks for them."""
    if getattr(args, "progress_every", None) is not None:
        from mugs.progress import use_plain_lines

        use_plain_lines(args.progress_every, " ".join(filter(None, (args.command, args.run))))


def _add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: evaluate.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_progress_lines_argument(parser)


def cmd_features(args: argparse.Namespace) -> int:
    from mugs.evaluation.features import evaluation_features

    config = _load(args)
    check_output(config.evaluate.cache_dir, directory=True)
    _check_checkpoint(args.checkpoint, config.evaluate.network)
    progress = not args.no_progress
    sets = evaluation_features(
        args.checkpoint, config, args.split, linear=args.linear, device=args.device, progress=progress
    )
    for split, features in zip(args.split, sets, strict=True):
        console.print(f"{split}: {tuple(features.features.shape)} features in {config.evaluate.cache_dir}")
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    from mugs.evaluation.knn import run_knn

    config = _load(args)
    _check_evaluation(args, config.evaluate.network)
    metrics = run_knn(
        args.checkpoint,
        config,
        args.out,
        split=args.split,
        device=args.device,
        progress=not args.no_progress,
    )
    k = "20" if "20" in metrics["fine"] else max(metrics["fine"], key=int)
    coarse = f", coarse {metrics['coarse'][k]['top1']:.4f}" if "coarse" in metrics else ""
    console.print(
        f"kNN on {metrics['split']} (k={k}): top-1 {metrics['fine'][k]['top1']:.4f}{coarse} → {args.out}"
    )
    return 0


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    from mugs.evaluation.baselines import random_init_checkpoint

    config = _load(args)
    check_output(args.out)
    out = random_init_checkpoint(config, args.out)
    console.print(f"wrote the random initialisation of the run's networks to {out}")
    return 0


def cmd_raw_pixel_knn(args: argparse.Namespace) -> int:
    from mugs.evaluation.baselines import run_raw_pixel_knn

    config = _load(args)
    check_output(args.out)
    metrics = run_raw_pixel_knn(config, args.out, split=args.split, progress=not args.no_progress)
    k = "20" if "20" in metrics["fine"] else max(metrics["fine"], key=int)
    coarse = f", coarse {metrics['coarse'][k]['top1']:.4f}" if "coarse" in metrics else ""
    console.print(
        f"raw-pixel kNN on {metrics['split']} (k={k}): top-1 {metrics['fine'][k]['top1']:.4f}{coarse}"
        f" → {args.out}"
    )
    return 0


def cmd_linear(args: argparse.Namespace) -> int:
    from mugs.evaluation.linear import run_linear

    config = _load(args)
    _check_evaluation(args, config.evaluate.network)
    metrics = run_linear(args.checkpoint, config, args.out, device=args.device, progress=not args.no_progress)
    chosen, test = metrics["selected"], metrics["test"]
    coarse = f", coarse {test['coarse_top1']:.4f}" if "coarse_top1" in test else ""
    console.print(
        f"linear probe lr {chosen['lr']:g} wd {chosen['weight_decay']:g} (val {chosen['val_top1']:.4f}): "
        f"test top-1 {test['top1']:.4f}{coarse} → {args.out}"
    )
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    from mugs.evaluation.fewshot import run_fewshot

    config = _load(args)
    _check_evaluation(args, config.evaluate.network)
    metrics = run_fewshot(
        args.checkpoint, config, args.out, device=args.device, progress=not args.no_progress
    )
    for fraction, entry in metrics["fractions"].items():
        console.print(
            f"{float(fraction):.0%} labels ({entry['labelled_images']}): test top-1 {entry['test_top1']:.4f}"
        )
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from mugs.selection import candidate_checkpoints, select_checkpoint

    config = _load(args)
    check_output(args.out_dir or args.run_dir, directory=True)
    for _epoch, checkpoint in candidate_checkpoints(args.run_dir):
        _check_checkpoint(checkpoint, config.evaluate.network)
    result = select_checkpoint(
        args.run_dir,
        config,
        policy=args.policy,
        device=args.device,
        progress=not args.no_progress,
        out_dir=args.out_dir,
    )
    console.print(f"selected {result['selected']['path']}: {result['reason']}")
    return 0


def _add_launcher_arguments(command: argparse.ArgumentParser, settings: str) -> None:
    command.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        help=f"overrides launch.launcher: here, or one SLURM job through submitit ({settings}* settings)",
    )
    command.add_argument("--nprocs", type=_at_least(1), help="local processes (overrides launch.nprocs)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mugs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error too")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="pretrain here (N processes) or as a SLURM job")
    _add_config_arguments(pretrain)
    pretrain.add_argument("--output-dir", type=Path, help="overrides train.output_dir")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_progress_lines_argument(pretrain)
    _add_launcher_arguments(pretrain, "launch.")
    pretrain.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="if the run directory holds a run with other settings, move it aside and start afresh "
        "(what the workflow does) instead of refusing to resume",
    )
    pretrain.set_defaults(handler=cmd_pretrain)

    prepare = commands.add_parser("prepare", help="scan, validate and index the dataset (data.* keys)")
    _add_config_arguments(prepare)
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_progress_lines_argument(prepare)
    prepare.set_defaults(handler=cmd_prepare)

    state = commands.add_parser(
        "data-state",
        help="fingerprint data.root by a stat pass (no file is read); rewrite <data.prepared_dir>.state.json "
        "only when it differs (prepare's input in the workflow)",
    )
    _add_config_arguments(state)
    state.set_defaults(handler=cmd_data_state)

    demo = commands.add_parser("demo-data", help="copy Debian's Fashion-MNIST files into data.root")
    _add_config_arguments(demo)
    demo.add_argument("--dest", type=Path, help="target directory (default: data.root)")
    demo.set_defaults(handler=cmd_demo_data)

    importer = commands.add_parser("import-official", help="convert an authors' released checkpoint")
    importer.add_argument("path", type=Path)
    importer.add_argument("out", type=Path)
    importer.add_argument(
        "--arch", help="vit_small / vit_base / vit_large (inferred from the weights if omitted)"
    )
    importer.add_argument(
        "--trust-pickle",
        action="store_true",
        help="the file is trusted: allow unpickling its `args` object (old releases need it)",
    )
    importer.set_defaults(handler=cmd_import_official)

    reproduce = commands.add_parser(
        "reproduce-paper",
        help="import the authors' released checkpoints and evaluate them with the paper's protocols",
    )
    reproduce.add_argument("spec", type=Path, help="e.g. configs/reproduce-paper.yaml")
    reproduce.add_argument("--device", help="cpu / cuda (default: evaluate.device)")
    reproduce.add_argument("--no-progress", action="store_true")
    reproduce.set_defaults(handler=cmd_reproduce_paper)

    export = commands.add_parser("export", help="write a backbone alone, in timm's naming")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--network", choices=("teacher", "student"), default="teacher")
    export.set_defaults(handler=cmd_export)

    dvc = commands.add_parser("dvc-yaml", help="write dvc.yaml from the Snakefile's DAG (repo root)")
    dvc.add_argument("--params", default="params.yaml", help="the parameter file")
    dvc.add_argument("--check", action="store_true", help="only check that dvc.yaml is current")
    dvc.set_defaults(handler=cmd_dvc_yaml)

    finetune = commands.add_parser("finetune", help="fine-tune a checkpoint's backbone end to end")
    finetune.add_argument("checkpoint", type=Path)
    finetune.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    _add_config_arguments(finetune)
    finetune.add_argument("--no-progress", action="store_true", help="no per-epoch lines")
    _add_launcher_arguments(finetune, "launch.jobs.finetune, then launch.")
    finetune.set_defaults(handler=cmd_finetune)

    report = commands.add_parser("report", help="plots and a summary table of one or more runs")
    report.add_argument("--runs", nargs="+", type=Path, required=True, help="pretraining run directories")
    report.add_argument("--out", type=Path, required=True, help="directory for the figures and tables")
    report.add_argument("--names", nargs="+", help="a label per run (default: the directory names)")
    report.add_argument(
        "--eval-dirs", nargs="+", type=Path, help="each run's metrics JSON directory (default: RUN/eval)"
    )
    report.add_argument("--baseline-names", nargs="+", help="a label per baseline (e.g. 'raw pixels')")
    report.add_argument(
        "--baseline-dirs", nargs="+", type=Path, help="each baseline's metrics JSON directory, in that order"
    )
    report.add_argument("--knn-k", type=_at_least(1), default=20, help="the kNN k shown (default 20)")
    report.add_argument("--tsne-samples", type=_at_least(0), default=2000, help="test images in the t-SNE")
    report.add_argument("--attention-images", type=_at_least(0), default=4, help="images with attention maps")
    report.add_argument("--device", help="for feature extraction (default: evaluate.device)")
    _add_config_arguments(report)
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    report.set_defaults(handler=cmd_report)

    features = commands.add_parser("features", help="extract and cache frozen features of a checkpoint")
    features.add_argument("checkpoint", type=Path)
    features.add_argument(
        "--split", nargs="+", default=["train", "val", "test"], help="splits to extract (default: all three)"
    )
    features.add_argument(
        "--linear",
        action="store_true",
        help="the linear probe's features (last n CLS, avgpool) instead of kNN's",
    )
    _add_evaluation_arguments(features)

    knn = commands.add_parser("knn", help="weighted kNN accuracy of a checkpoint's frozen features")
    knn.add_argument("checkpoint", type=Path)
    knn.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    knn.add_argument("--split", choices=("val", "test"), help="query split (default: evaluate.knn_split)")
    _add_evaluation_arguments(knn)

    linear = commands.add_parser("linear", help="linear-probe sweep on frozen features, selected on val")
    linear.add_argument("checkpoint", type=Path)
    linear.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    _add_evaluation_arguments(linear)

    fewshot = commands.add_parser("fewshot", help="logistic regression on 1 %% / 10 %% of the labels")
    fewshot.add_argument("checkpoint", type=Path)
    fewshot.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    _add_evaluation_arguments(fewshot)

    init = commands.add_parser(
        "init-checkpoint", help="a checkpoint of the networks as pretraining initialises them (train.seed)"
    )
    init.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    _add_config_arguments(init)
    init.set_defaults(handler=cmd_init_checkpoint)

    pixels = commands.add_parser("raw-pixel-knn", help="weighted kNN accuracy of the raw pixels (a baseline)")
    pixels.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    pixels.add_argument("--split", choices=("val", "test"), help="query split (default: evaluate.knn_split)")
    _add_config_arguments(pixels)
    pixels.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_progress_lines_argument(pixels)
    pixels.set_defaults(handler=cmd_raw_pixel_knn)

    select = commands.add_parser("select", help="score a run's kept checkpoints on val and pick one")
    select.add_argument("run_dir", type=Path, help="the pretraining run (train.output_dir)")
    select.add_argument("--policy", choices=("best_knn", "last"), help="default: evaluate.selection_policy")
    select.add_argument(
        "--out-dir", type=Path, help="where selection.json and selected.pt go (default: RUN_DIR)"
    )
    _add_evaluation_arguments(select)

    for sub, handler in (
        (features, cmd_features),
        (knn, cmd_knn),
        (linear, cmd_linear),
        (fewshot, cmd_fewshot),
        (select, cmd_select),
    ):
        sub.set_defaults(handler=handler)

    presets = commands.add_parser("presets", help="list presets, or print one resolved")
    presets.add_argument("name", nargs="?")
    presets.add_argument(
        "--write-params",
        metavar="PATH",
        help="replace the configuration sections of the pipeline file PATH with the preset's values "
        "(its comments, runs, protocols and resources stay)",
    )
    presets.add_argument("--check", action="store_true", help="with --write-params: exit 1 if PATH is stale")
    presets.set_defaults(handler=cmd_presets)
    schema = commands.add_parser(
        "schema", help="write the pipeline file's JSON schema from the configuration"
    )
    schema.add_argument("--check", action="store_true", help="exit 1 if the committed schema is stale")
    schema.set_defaults(handler=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mugs.config import ConfigError
    from mugs.data.sources import DataError
    from mugs.training.checkpoint import MissingCheckpointError
    from mugs.training.engine import CollapseError, NonFiniteLossError
    from mugs.training.run_lock import RunLockedError

    args = build_parser().parse_args(argv)
    _use_progress_lines(args)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ConfigError, DataError, OSError, ValueError, RunLockedError, MissingCheckpointError) as error:
        return _report(error, "error", 2, debug=args.debug)
    except (NonFiniteLossError, CollapseError) as error:
        return _report(error, "stopped", 3, debug=args.debug)


def _report(error: Exception, label: str, code: int, *, debug: bool) -> int:
    """One line naming what went wrong (after the traceback with ``--debug``); returns the exit code."""
    if debug:
        traceback.print_exc()
    # soft_wrap: the line stays one line however narrow the terminal
    console.print(f"[bold red]{label}:[/] {escape(str(error))}", soft_wrap=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
