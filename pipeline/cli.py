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
    parser.add_argument("--sweep", metavar="ID", help="list the trials of one sweep (parent run id or a prefix), "
                                                      "best eval loss first")


def tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file with a sweep section (see configs/sweep-*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. sweep.num_samples=8 train.max_ticks=20")
    parser.add_argument("--resume", metavar="SWEEP_DIR",
                        help="continue an interrupted sweep from its directory (printed when it stopped)")


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
    from pipeline.tracking import RunTarget, format_runs, recent_runs, tracking_uri

    tracking = load_config(args.config).tracking if args.config else TrackingConfig()
    uri, experiment = tracking_uri(tracking.uri), args.experiment or tracking.experiment
    if args.sweep:
        from pipeline.tracking.sweeps import resolve_sweep_id
        from pipeline.tune.summary import collect_trials, format_table

        try:
            parent = resolve_sweep_id(uri, args.sweep)
        except ValueError as exc:
            raise ConfigError(f"--sweep: {exc}") from None
        print(f"trials of sweep {parent} in {uri}")
        print(format_table(collect_trials(RunTarget(uri, parent))))
        return 0
    print(f"runs of experiment '{experiment}' in {uri}")
    print(format_runs(recent_runs(uri, experiment, args.limit)))
    return 0


@command("tune", "sweep noise sigma and learning rate (any config paths) with Ray Tune; record it in MLflow",
         tune_arguments)
def tune_command(args: argparse.Namespace) -> int:
    from pipeline.tune import run_sweep

    if bool(args.config) == bool(args.resume):
        raise ConfigError("tune: give either --config (a new sweep) or --resume SWEEP_DIR (continue one)")
    if args.resume and args.overrides:
        raise ConfigError("tune --resume: overrides cannot change a sweep that has started")
    outcome = run_sweep(load(args)) if args.config else run_sweep(resume=Path(args.resume))
    print(outcome.summary())
    return 130 if outcome.interrupted else 0


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
