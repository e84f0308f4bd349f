"""What a sweep's runs tell: the trials tables (search, confirmation), the best trial, CSV and plots,
all by the sweep's metric (`sweep.metric`, eval loss by default; pipeline.tune.goal). Whether
noise helped is the confirmation's paired verdict (pipeline.tune.confirm): search trials
differ in more than σ (lr, ticks before ASHA stopped them), so comparing two of them says little."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import SweepConfig
from pipeline.tracking import RunTarget
from pipeline.tracking.store import STOPPED_TAG, client_for
from pipeline.tracking.sweeps import ARM_TAG, SEED_TAG, TRIAL_TAG, child_runs, phase_of
from pipeline.tune.goal import LOSS, Goal

# "value" and "best_value" are written under the metric's own names (eval_loss, best_eval_loss).
COLUMNS = ["trial_id", "run_id", "status", "stopped_by", "sigma", "alpha", "lr", "ticks", "value", "best_value"]
CONFIRM_COLUMNS = ["arm", "seed", "train_seed", "noise_seed", *COLUMNS]


@dataclass(frozen=True)
class Trial:
    trial_id: str
    run_id: str
    status: str
    stopped_by: str
    sigma: float
    alpha: float  # NEFTune's α where noise.site puts noise on the embedding, else 0
    lr: float
    ticks: int
    value: float  # the sweep's metric at the trial's last evaluation (at its last tick)
    best_value: float  # its best over the trial's evaluations
    loss_curve: list[tuple[int, float]]  # training loss by tick
    arm: str = ""  # confirmation runs only: the arm, the seed k, and the seeds it set
    seed: int = 0
    train_seed: int = 0
    noise_seed: int = 0


def settings(trial: Trial) -> str:
    """The searched settings as a reader wants them: σ, NEFTune's α where it is on, lr."""
    alpha = f", NEFTune α={trial.alpha:.3g}" if trial.alpha else ""
    return f"σ={trial.sigma:.3g}{alpha}, lr={trial.lr:.3g}"


def sweep_goal(parent: RunTarget) -> Goal:
    """The goal a sweep's parent run was started with (its config's `sweep.metric` and
    `sweep.mode` params); a sweep from before the metric could be chosen optimised eval loss."""
    params = client_for(parent.uri).get_run(parent.run_id).data.params
    if "sweep.metric" not in params:
        return LOSS
    mode = params.get("sweep.mode")
    return Goal.of(SweepConfig(metric=params["sweep.metric"], mode=None if mode in (None, "None") else mode))


def collect_trials(parent: RunTarget, phase: str = "search", goal: Goal | None = None) -> list[Trial]:
    """The sweep's child runs of one phase (search or confirm), the best final value of `goal`
    first (None: the sweep's own, from its parent run)."""
    goal = goal or sweep_goal(parent)
    client = client_for(parent.uri)
    trials = []
    for run in child_runs(parent):
        if phase_of(run) != phase:
            continue
        run_id = run.info.run_id
        params, tags = run.data.params, run.data.tags
        evals = sorted((m.step, m.value) for m in client.get_metric_history(run_id, goal.metric))
        losses = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        trials.append(Trial(
            trial_id=run.data.tags.get(TRIAL_TAG, ""), run_id=run_id, status=run.info.status,
            stopped_by=run.data.tags.get(STOPPED_TAG, ""), sigma=float(run.data.params.get("noise.sigma", 0.0)),
            alpha=float(params.get("noise.neftune_alpha", 0.0)) if params.get("noise.site") in ("embedding", "both") else 0.0,
            lr=float(run.data.params.get("train.lr", "nan")), ticks=max((s for s, _ in losses), default=0),
            value=evals[-1][1] if evals else math.nan, best_value=goal.best(v for _, v in evals), loss_curve=losses,
            arm=tags.get(ARM_TAG, ""), seed=int(tags.get(SEED_TAG, 0)), train_seed=int(params.get("train.seed", 0)),
            noise_seed=int(params.get("noise.seed", 0))))
    return sorted(trials, key=lambda t: goal.rank_key(t.value))


def best_trial(trials: list[Trial], goal: Goal) -> Trial:
    """The search trial with the best final value (`trials` best first, as `collect_trials` gives
    them): the one whose model the sweep registers."""
    finished = [t for t in trials if not math.isnan(t.value)]
    if not finished:
        raise RuntimeError(f"no trial of the sweep reported {goal.metric}")
    return finished[0]


def write_csv(trials: list[Trial], path: Path, goal: Goal, columns: list[str] = COLUMNS) -> Path:
    names = {"value": goal.metric, "best_value": goal.best_metric}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([names.get(column, column) for column in columns])
        for t in trials:
            writer.writerow([getattr(t, column) for column in columns])
    return path


def write_plots(trials: list[Trial], out_dir: Path, goal: Goal) -> list[Path]:
    """The metric vs σ (σ = 0 drawn at the left edge), the metric vs lr, and every trial's loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [t for t in trials if not math.isnan(t.value)]
    positive = [t.sigma for t in scored if t.sigma > 0]
    zero_x = min(positive) / 3 if positive else 1e-4  # where σ = 0 is drawn on the log axis
    paths = []
    for name, xs, label in (
            (f"{goal.metric}_vs_sigma.png", [t.sigma if t.sigma > 0 else zero_x for t in scored],
             "noise σ (σ = 0 at left)"),
            (f"{goal.metric}_vs_lr.png", [t.lr for t in scored], "learning rate")):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        axes.scatter(xs, [t.value for t in scored],
                     c=["tab:red" if t.sigma == 0 else "tab:blue" for t in scored])
        axes.set(xscale="log", xlabel=label, ylabel=f"final {goal.label}")
        figure.tight_layout()
        paths.append(out_dir / name)
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 4))
    for t in trials:
        if t.loss_curve:
            axes.plot(*zip(*t.loss_curve), label=f"σ={t.sigma:.2g} lr={t.lr:.2g}")
    axes.set(xlabel="tick", ylabel="training loss", title="learning curves")
    axes.legend(fontsize=6)
    figure.tight_layout()
    paths.append(out_dir / "learning_curves.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    return paths


def format_table(trials: list[Trial], goal: Goal) -> str:
    """The search trials in the given order (best first from `collect_trials`), the metric last."""
    width = max(10, len(goal.label))
    header = (f"{'trial':14} {'status':9} {'stopped':8} {'sigma':>9} {'alpha':>6} {'lr':>9} {'ticks':>5} "
              f"{goal.label:>{width}}")
    lines = [header, "-" * len(header)]
    for t in trials:
        lines.append(f"{t.trial_id[:14]:14} {t.status:9} {t.stopped_by:8} {t.sigma:>9.2e} {t.alpha:>6.2f} {t.lr:>9.2e} "
                     f"{t.ticks:>5} {t.value:>{width}.4f}")
    return "\n".join(lines)


def format_confirm_table(runs: list[Trial], goal: Goal) -> str:
    """The confirmation runs by seed, each seed's arms together."""
    width = max(10, len(goal.label))
    header = (f"{'arm':8} {'seed':>4} {'train.seed':>10} {'status':9} {'sigma':>9} {'alpha':>6} {'lr':>9} {'ticks':>5} "
              f"{goal.label:>{width}}")
    lines = [header, "-" * len(header)]
    for t in sorted(runs, key=lambda t: (t.seed, t.arm)):
        lines.append(f"{t.arm:8} {t.seed:>4} {t.train_seed:>10} {t.status:9} {t.sigma:>9.2e} {t.alpha:>6.2f} {t.lr:>9.2e} "
                     f"{t.ticks:>5} {t.value:>{width}.4f}")
    return "\n".join(lines)
