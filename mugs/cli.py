"""The ``mugs`` command line: thin wrappers that parse arguments and call the package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="YAML config (a `preset:` key selects a preset)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one value, e.g. --set optim.epochs=10 (repeatable)",
    )
    parser.add_argument("--preset", help="start from a named preset (see `mugs presets`)")
    parser.add_argument("--run", help="one of the named runs of a pipeline parameter file (its `runs:` key)")


def _load(args: argparse.Namespace):
    from mugs.config import config_from_dict, load_config

    overrides = list(args.overrides)
    if args.config is None:
        return config_from_dict({"preset": args.preset} if args.preset else {}, overrides)
    if args.preset:
        overrides.insert(0, f"preset={args.preset}")
    return load_config(args.config, overrides, run=args.run)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mugs.training.pretrain import run_pretraining, set_aside_if_changed

    config = _load(args)
    if args.output_dir:
        config.train.output_dir = str(args.output_dir)
    if args.restart_if_changed:
        moved = set_aside_if_changed(config)
        if moved:
            console.print(f"settings changed since the last checkpoint: earlier run moved to {moved}")
    result = run_pretraining(config, progress=not args.no_progress)
    console.print(
        f"pretraining {result.status} at global iteration {result.global_iteration}: {result.checkpoint}"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mugs.data.prepare import run_prepare

    summary = run_prepare(_load(args).data, progress=not args.no_progress)
    console.print(
        f"prepared {summary.source} into {summary.prepared_dir}: "
        + ", ".join(f"{split} {count}" for split, count in summary.counts.items())
        + f"; {summary.bad_files} bad files skipped"
    )
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from mugs.data.sources import install_demo_data

    dest = args.dest or Path(_load(args).data.root)
    install_demo_data(dest)
    console.print(f"Fashion-MNIST demo data in {dest}")
    return 0


def cmd_import_official(args: argparse.Namespace) -> int:
    from mugs.interop import import_official_checkpoint

    out = import_official_checkpoint(args.path, args.out, trust_pickle=args.trust_pickle, arch=args.arch)
    console.print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mugs.interop import export_backbone

    out = export_backbone(args.checkpoint, args.out, network=args.network)
    console.print(f"wrote {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    import yaml

    from mugs.config import PRESETS, config_from_dict

    if args.name:
        print(yaml.safe_dump(config_from_dict({"preset": args.name}).to_dict(), sort_keys=False), end="")
    else:
        print("\n".join(PRESETS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mugs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="pretrain in this process (CPU or one GPU)")
    _add_config_arguments(pretrain)
    pretrain.add_argument("--output-dir", type=Path, help="overrides train.output_dir")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    prepare.set_defaults(handler=cmd_prepare)

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

    export = commands.add_parser("export", help="write a backbone alone, in timm's naming")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--network", choices=("teacher", "student"), default="teacher")
    export.set_defaults(handler=cmd_export)

    presets = commands.add_parser("presets", help="list presets, or print one resolved")
    presets.add_argument("name", nargs="?")
    presets.set_defaults(handler=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mugs.config import ConfigError
    from mugs.data.sources import DataError
    from mugs.training.engine import CollapseError, NonFiniteLossError

    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2
    except (NonFiniteLossError, CollapseError) as error:
        console.print(f"[bold red]stopped:[/] {error}")
        return 3


if __name__ == "__main__":
    sys.exit(main())
