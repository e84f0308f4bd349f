"""`pipeline` command line: parse arguments into a Config and call exactly one library function.

Subcommands register themselves in COMMANDS, so later ones (tune, submit, jobs, cluster) slot in
as one function each.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from pipeline import runtime  # noqa: F401  (sets Ray's logging environment before Ray is imported)
from pipeline.config import Config, ConfigError, TrackingConfig, load_config

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, arguments, run)
        return run

    return register


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.lr=3e-4 data.seq_len=512")


def train_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--debug-steps", type=_positive_int, metavar="N",
                        help="smoke run: stop after N ticks (sets train.max_ticks)")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue from a checkpoint directory: tick, weights, optimizer and data position "
                             "(sets train.resume_from)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def runs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="take the tracking store and experiment from this config")
    parser.add_argument("--experiment", "-e", help="experiment name (default: the config's, or 'finetune')")
    parser.add_argument("--limit", "-n", type=int, default=20)


def load(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "debug_steps", None) is not None:
        overrides.append(f"train.max_ticks={args.debug_steps}")
    if getattr(args, "resume", None):
        overrides.append(f"train.resume_from={Path(args.resume).resolve()}")
    return load_config(args.config, overrides)


@command("prepare", "tokenize and pack the corpus into the parquet cache", config_arguments)
def prepare_command(args: argparse.Namespace) -> int:
    from pipeline.train import prepare

    cfg = load(args)
    _, data = prepare(cfg)
    print(data.summary())
    return 0


@command("train", "fine-tune with Ray Train + DeepSpeed and record the run in MLflow", train_arguments)
def train_command(args: argparse.Namespace) -> int:
    from pipeline.train import run_training

    outcome = run_training(load(args))
    print(outcome.summary())
    return 0


@command("runs", "list recent MLflow runs", runs_arguments)
def runs_command(args: argparse.Namespace) -> int:
    from pipeline.tracking import format_runs, recent_runs, tracking_uri

    tracking = load_config(args.config).tracking if args.config else TrackingConfig()
    uri, experiment = tracking_uri(tracking.uri), args.experiment or tracking.experiment
    print(f"runs of experiment '{experiment}' in {uri}")
    print(format_runs(recent_runs(uri, experiment, args.limit)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments, run) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        arguments(child)
        child.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from pipeline.train import TrainingFailed

        if not isinstance(exc, TrainingFailed):
            raise
        print(f"pipeline: training failed: {exc} (worker tracebacks are in the log above)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
