"""What a sweep trial costs besides its training: the tiny sweep (`configs/sweep-tiny.yaml`), trials
one at a time, no early stopping, as a whole `pipeline tune` process; per trial its wall seconds,
its training seconds (the sum of its tick times) and the rest, the fixed cost, with where it goes.

Per trial, from its MLflow child run: the wall is the time from its run's creation to the next
trial's (so it includes the run's end, Tune's bookkeeping and the next trial driver's process start,
which a sweep pays once per trial); training is Σ tokens_per_tick / tokens_per_s over its ticks;
the start-up parts are the `startup.*_s` metrics rank 0 logs (`pipeline.train.startup`, timed in the
trial's own processes); "between trials" is from the last tick's metrics to the next run's creation.
The last trial has no next one, so it counts in the whole-process figures only.

`--against REF` measures a git ref (its tree from `git archive`) in the same run, alternating with
this tree, as the baseline; a tree without the `startup.*` metrics shows wall, training and fixed cost.

    .venv/bin/python bench/trial_cost.py [--trials 4] [--rounds 1] [--against REF]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runtime
from pipeline.config import load_config
from pipeline.locations import location_overrides

REPO = Path(__file__).resolve().parents[1]
runtime.quiet_ray_environment()  # an entry point: before anything imports Ray
PARTS = ["MLflow run", "trainer", "worker group", "worker process", "model", "DeepSpeed", "tracking", "first eval"]


def overrides(root: Path, trials: int) -> list[str]:
    cfg = load_config(REPO / "configs" / "sweep-tiny.yaml")
    return [*location_overrides(root), f"sweep.num_samples={trials}", "sweep.max_concurrent_trials=1",
            "tracking.log_model=false", "sweep.name=bench",
            f"sweep.scheduler.grace_period={cfg.train.max_ticks}"]  # ASHA's first rung at the end: no trial stopped


def run_sweep_process(tree: Path, root: Path, trials: int) -> dict:
    """One `pipeline tune` process on `tree`'s code; its wall and what MLflow recorded of its trials."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--config", str(REPO / "configs" / "sweep-tiny.yaml"),
                           *overrides(root, trials)], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"})
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-4000:])
    return {"started": started, "ended": ended, "trials": read_trials(root)}


def read_trials(root: Path) -> list[dict]:
    from pipeline.tracking.store import client_for
    from pipeline.tracking.sweeps import ROLE_TAG

    cfg = load_config(REPO / "configs" / "sweep-tiny.yaml")
    tokens_per_tick = cfg.train.samples_per_tick * (cfg.data.seq_len - 1)
    client = client_for(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'",
                              order_by=["attributes.start_time ASC"])
    trials = []
    for run in runs:
        ticks = client.get_metric_history(run.info.run_id, "tokens_per_s")
        last_tick = max(m.timestamp for m in client.get_metric_history(run.info.run_id, "tick")) / 1000
        parts = {key[len("startup."):-2]: value for key, value in run.data.metrics.items()
                 if key.startswith("startup.") and key != "startup.total_s"}
        trials.append({"start": run.info.start_time / 1000, "end": run.info.end_time / 1000, "last_tick": last_tick,
                       "training": sum(tokens_per_tick / m.value for m in ticks), "parts": parts})
    return trials


def per_trial(sweep: dict) -> list[dict]:
    """Every trial but the last: wall = creation of its run to the next one's."""
    trials = sweep["trials"]
    out = []
    for trial, following in itertools.pairwise(trials):
        wall = following["start"] - trial["start"]
        out.append({**trial, "wall": wall, "fixed": wall - trial["training"], "between": following["start"] - trial["last_tick"]})
    return out


def tree_of(ref: str, directory: Path) -> Path:
    """The files of git `ref`, without touching the repository's worktrees."""
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
    directory.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    return directory


def summarize(name: str, sweeps: list[dict]) -> dict:
    trials = [t for sweep in sweeps for t in per_trial(sweep)]
    mean = lambda key: statistics.mean(t[key] for t in trials)  # noqa: E731
    result = {"wall": mean("wall"), "training": mean("training"), "fixed": mean("fixed"), "between": mean("between")}
    print(f"\n{name}: {len(trials)} trials measured (each but the last of {len(sweeps)} sweep(s))")
    for index, t in enumerate(trials):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in t["parts"].items())
        print(f"  trial {index}: wall {t['wall']:.1f} s, training {t['training']:.2f} s, fixed {t['fixed']:.1f} s"
              + (f" | start-up: {parts}; ticks to the next trial's run {t['between']:.1f} s" if parts else ""))
    print(f"  mean per trial: wall {result['wall']:.1f} s, training {result['training']:.2f} s, "
          f"fixed {result['fixed']:.1f} s ({result['fixed'] / result['wall']:.0%} of the wall)")
    if all(t["parts"] for t in trials):
        names = [p.replace(" ", "_").lower() for p in PARTS]
        means = {n: statistics.mean(t["parts"].get(n, 0.0) for t in trials) for n in names}
        counted = sum(v for k, v in means.items() if k != "mlflow_run")  # the MLflow run is made before the trial's wall begins
        print("  fixed cost, by part: " + ", ".join(f"{k} {v:.1f} s" for k, v in means.items())
              + f"; from the last tick to the next trial's run {result['between']:.1f} s (the run's end, Tune, "
              f"the next driver's start and its MLflow run); ticks' evals and reports "
              f"{result['fixed'] - counted - result['between']:.1f} s")
        result["parts"] = means
    for sweep in sweeps:
        first, last = sweep["trials"][0], sweep["trials"][-1]
        print(f"  whole process {sweep['ended'] - sweep['started']:.1f} s: before the first trial's run "
              f"{first['start'] - sweep['started']:.1f} s (imports, Ray, data, Tune), {len(sweep['trials'])} trials "
              f"{last['end'] - first['start']:.1f} s, after the last {sweep['ended'] - last['end']:.1f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--against", metavar="REF", help="a git ref measured in the same run as the baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trial-cost-") as tmp:
        tmp = Path(tmp)
        trees = {"this tree": REPO}
        if args.against:
            trees = {f"baseline ({args.against})": tree_of(args.against, tmp / "baseline"), **trees}
        sweeps = {name: [] for name in trees}
        for round_index in range(args.rounds):  # alternating, so both see the same machine
            for name, tree in trees.items():
                sweeps[name].append(run_sweep_process(tree, tmp / f"{round_index}-{len(sweeps[name])}-{name[:4]}", args.trials))
        results = {name: summarize(name, runs) for name, runs in sweeps.items()}
    if args.against:
        before, after = results.values()
        print(f"\nfixed cost per trial: {before['fixed']:.1f} s -> {after['fixed']:.1f} s "
              f"({after['fixed'] / before['fixed']:.2f}x; target <= 0.50x); wall per trial {before['wall']:.1f} s -> "
              f"{after['wall']:.1f} s; training {before['training']:.2f} s -> {after['training']:.2f} s")


if __name__ == "__main__":
    main()
