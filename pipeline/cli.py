"""`pipeline` command line: parse arguments into a Config and call exactly one library function.

Subcommands register themselves in COMMANDS, so later ones (tune, submit, jobs, cluster) slot in
as one function each.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import console, runtime, storage
from pipeline.config import Config, ConfigError, TrackingConfig, load_config, reference
from pipeline.locations import anchor_paths

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
    config_epilog(parser)


def config_epilog(parser: argparse.ArgumentParser) -> None:
    """--help ends with the config's sections, generated from the typed config like the README's table."""
    parser.epilog = reference.epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the epilog's columns


def train_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--debug-steps", type=_positive_int, metavar="N",
                        help="smoke run: stop after N ticks (sets train.max_ticks)")
    parser.add_argument("--resume", metavar="CHECKPOINT_OR_RUN_DIR",
                        help="continue from a checkpoint directory, or from the newest valid checkpoint of a run's "
                             "storage directory: tick, weights, optimizer and data position (sets train.resume_from)")


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
                                                      "best first by its sweep.metric, then its confirmation runs")


def tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file with a sweep section (see configs/sweep-*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. sweep.num_samples=8 train.max_ticks=20")
    parser.add_argument("--resume", metavar="SWEEP_DIR",
                        help="continue an interrupted sweep from its directory (printed when it stopped)")
    config_epilog(parser)


def load(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "debug_steps", None) is not None:
        overrides.append(f"train.max_ticks={args.debug_steps}")
    if getattr(args, "resume", None):
        overrides.append(f"train.resume_from={args.resume}")  # a relative path is anchored at the cwd below
    work_dir = os.environ.get("PIPELINE_WORK_DIR")  # set by job specs: storage every node shares
    cfg = anchor_paths(load_config(args.config, overrides), Path.cwd(), Path(work_dir) if work_dir else None)
    storage.configure(cfg.storage)
    storage.check_locations(cfg)  # a missing bucket or refused credentials: one line, before Ray starts
    if work_dir:  # in a Ray job: leave the temporary working directory, which Ray may delete
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        os.chdir(work_dir)
    return cfg


def command_console(args: argparse.Namespace, cfg: Config, worker_lines: bool = True):
    """The console of a long command: ours and errors on it, library output in the full log under
    train.output_dir/logs (on this node's disk when that is object storage)."""
    output = cfg.train.output_dir
    logs = storage.local_cache_root() / "logs" if storage.is_uri(output) else Path(output) / "logs"
    name = f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    return console.session(logs / name, verbose=args.verbose, worker_lines=worker_lines)


@command("prepare", "tokenize the corpus into the packed token cache (needs no tracking server)",
         config_arguments)
def prepare_command(args: argparse.Namespace) -> int:
    from pipeline.data import prepare

    cfg = load(args)
    with command_console(args, cfg):
        _, data = prepare(cfg)
        console.echo(data.summary())
    return 0


@command("train", "fine-tune with Ray Train + DeepSpeed and record the run in MLflow", train_arguments)
def train_command(args: argparse.Namespace) -> int:
    from pipeline.train import run_training

    cfg = load(args)
    with command_console(args, cfg):
        console.echo(run_training(cfg).summary())
    return 0


def _tracking_store(args: argparse.Namespace) -> tuple[str, TrackingConfig]:
    """The store `runs` and `ui` read: the `--config` one's, or the default (MLFLOW_TRACKING_URI wins)."""
    from pipeline.tracking import tracking_uri

    tracking = load_config(args.config).tracking if args.config else TrackingConfig()
    return tracking_uri(tracking.uri), tracking


@command("runs", "list recent MLflow runs", runs_arguments)
def runs_command(args: argparse.Namespace) -> int:
    from pipeline.tracking import RunTarget, format_runs, recent_runs
    from pipeline.tracking.secrets import redact

    uri, tracking = _tracking_store(args)
    experiment = args.experiment or tracking.experiment
    if args.sweep:
        from pipeline.tracking.sweeps import resolve_sweep_id
        from pipeline.tune.summary import collect_trials, format_confirm_table, format_table, sweep_goal

        try:
            parent = resolve_sweep_id(uri, args.sweep)
        except ValueError as exc:
            raise ConfigError(f"--sweep: {exc}") from None
        target = RunTarget(uri, parent)
        goal = sweep_goal(target)  # the metric the sweep optimised orders its tables
        print(f"trials of sweep {parent} in {redact(uri)}")
        print(format_table(collect_trials(target, goal=goal), goal))
        confirmation = collect_trials(target, phase="confirm", goal=goal)
        if confirmation:  # apart: they are not candidates for the best trial
            print(f"\nconfirmation runs (paired by seed)\n{format_confirm_table(confirmation, goal)}")
        return 0
    print(f"runs of experiment '{experiment}' in {redact(uri)}")
    print(format_runs(recent_runs(uri, experiment, args.limit)))
    return 0


def ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="take the tracking store from this config")
    parser.add_argument("--port", type=_positive_int, default=5000)


@command("ui", "browse the MLflow store: mlflow ui, reachable from this machine only (127.0.0.1)", ui_arguments)
def ui_command(args: argparse.Namespace) -> int:
    from pipeline.tracking.secrets import redact

    uri, _ = _tracking_store(args)
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is a server: open {redact(uri)}")
        return 0
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    print(f"MLflow UI for {redact(uri)} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    # exec: the UI takes this process's PID, so whoever started `pipeline ui` can stop it by PID.
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)])


@command("tune", "sweep noise sigma and learning rate (any config paths) with Ray Tune; record it in MLflow",
         tune_arguments)
def tune_command(args: argparse.Namespace) -> int:
    from pipeline.tune import run_sweep, sweep_config

    if bool(args.config) == bool(args.resume):
        raise ConfigError("tune: give either --config (a new sweep) or --resume SWEEP_DIR (continue one)")
    if args.resume and args.overrides:
        raise ConfigError("tune --resume: overrides cannot change a sweep that has started")
    cfg = sweep_config(args.resume) if args.resume else load(args)  # --resume: a path or a URI
    with command_console(args, cfg, worker_lines=False):  # the trials' lines stay in the log
        outcome = run_sweep(resume=args.resume) if args.resume else run_sweep(cfg)
    console.echo(outcome.summary())
    return 130 if outcome.interrupted else 0


def reference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("section", nargs="?", help="one section or sub-section, e.g. train or train.zero (default: all)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--write", metavar="FILE", help="rewrite FILE's generated block (README.md) in place")
    target.add_argument("--check", metavar="FILE", help="exit 1 when FILE's generated block is out of date")


@command("config-reference", "every config field with its default and meaning, generated from the typed config "
         "(the README's table)", reference_arguments)
def reference_command(args: argparse.Namespace) -> int:
    if args.section and (args.write or args.check):
        raise ConfigError("config-reference: --write and --check take the whole reference, not one section")
    if args.write:
        changed = reference.write(Path(args.write))
        print(f"{args.write}: config reference {'rewritten' if changed else 'already up to date'}")
    elif args.check:
        problem = reference.check(Path(args.check))
        if problem:
            print(f"pipeline: {problem}", file=sys.stderr)
            return 1
        print(f"{args.check}: config reference up to date")
    else:
        print(reference.table(args.section))
    return 0


def address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's job API, http://HOST:8265, or its GCS address, HOST:6379 "
                                          "(default: $RAY_ADDRESS)")


def submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="a job spec, e.g. jobs/tiny.yaml")
    address_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides for the job")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")


@command("submit", "submit a job spec to a Ray cluster, stream its logs, exit 0 only if it succeeds",
         submit_arguments)
def submit_command(args: argparse.Namespace) -> int:
    from pipeline.jobs.submit import submit

    job_id, code = submit(Path(args.spec), args.address, args.overrides, wait=not args.no_wait)
    if args.no_wait:
        print(job_id)
    return code


def jobs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "status", "logs", "stop"])
    parser.add_argument("job_id", nargs="?", help="the job (all but list)")
    address_argument(parser)


@command("jobs", "list the cluster's jobs, or show the status or logs of one, or stop it", jobs_arguments)
def jobs_command(args: argparse.Namespace) -> int:
    from pipeline.jobs import submit as jobs

    if args.action == "list":
        print(jobs.list_jobs(args.address))
        return 0
    if not args.job_id:
        raise ConfigError(f"jobs {args.action}: give the job id")
    action = {"status": jobs.job_status, "logs": jobs.job_logs, "stop": jobs.stop_job}[args.action]
    print(action(args.address, args.job_id))
    return 0


def cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", default=".cache/pipeline/cluster", help="where PIDs and logs are kept")
    parser.add_argument("--cpus-per-node", type=_positive_int, default=2)


@command("cluster", "a local development cluster on this machine: a head and one worker node", cluster_arguments)
def cluster_command(args: argparse.Namespace) -> int:
    from pipeline.jobs import cluster

    run_dir = Path(args.run_dir)
    if args.action == "up":
        state = cluster.up(run_dir, args.cpus_per_node)
        print(f"local cluster up: head pid {state.head_pid}, worker pid {state.worker_pid}\n"
              f"  submit with: pipeline submit jobs/tiny.yaml --address {state.address}")
    elif args.action == "down":
        stopped = cluster.down(run_dir)
        print(f"stopped pids {stopped}" if stopped else "no local cluster was running")
    else:
        print(cluster.status(run_dir))
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
    runtime.quiet_ray_environment()  # before any command imports Ray
    parser = build_parser()
    # Dotted overrides may also follow options (`submit SPEC --address URL train.lr=1e-3`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from pipeline.jobs import ClusterError, JobError
        from pipeline.train import TrainingFailed
        from pipeline.train.checkpoints import CheckpointError
        from pipeline.train.resources import ResourcesTimeout

        if isinstance(exc, (JobError, ClusterError, CheckpointError, ResourcesTimeout)):
            print(f"pipeline: {exc}", file=sys.stderr)
            return 1
        log = console.last_log()
        if isinstance(exc, TrainingFailed):
            where = f"full log: {log}" if log else "worker tracebacks are in the log above"
            print(f"pipeline: training failed: {exc} ({where})", file=sys.stderr)
            return 1
        if log is None:
            raise
        print(f"pipeline: {type(exc).__name__}: {exc} (traceback in the full log: {log})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
