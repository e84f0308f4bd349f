"""What a sweep's runs tell: the trials tables (search, confirmation), the best trial, CSV and plots.
Whether noise helped is the confirmation's paired verdict (pipeline.tune.confirm): search trials
differ in more than σ (lr, ticks before ASHA stopped them), so comparing two of them says little."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.tracking import RunTarget
from pipeline.tracking.store import STOPPED_TAG, client_for
from pipeline.tracking.sweeps import ARM_TAG, SEED_TAG, TRIAL_TAG, child_runs, phase_of

COLUMNS = ["trial_id", "run_id", "status", "stopped_by", "sigma", "alpha", "lr", "ticks", "eval_loss", "best_eval_loss"]
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
    eval_loss: float  # the last evaluation of the trial (at its last tick)
    best_eval_loss: float
    loss_curve: list[tuple[int, float]]  # training loss by tick
    arm: str = ""  # confirmation runs only: the arm, the seed k, and the seeds it set
    seed: int = 0
    train_seed: int = 0
    noise_seed: int = 0


def settings(trial: Trial) -> str:
    """The searched settings as a reader wants them: σ, NEFTune's α where it is on, lr."""
    alpha = f", NEFTune α={trial.alpha:.3g}" if trial.alpha else ""
    return f"σ={trial.sigma:.3g}{alpha}, lr={trial.lr:.3g}"


def collect_trials(parent: RunTarget, phase: str = "search") -> list[Trial]:
    """The sweep's child runs of one phase (search or confirm), lowest final eval loss first."""
    client = client_for(parent.uri)
    trials = []
    for run in child_runs(parent):
        if phase_of(run) != phase:
            continue
        run_id = run.info.run_id
        params, tags = run.data.params, run.data.tags
        evals = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval_loss"))
        losses = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        trials.append(Trial(
            trial_id=run.data.tags.get(TRIAL_TAG, ""), run_id=run_id, status=run.info.status,
            stopped_by=run.data.tags.get(STOPPED_TAG, ""), sigma=float(run.data.params.get("noise.sigma", 0.0)),
            alpha=float(params.get("noise.neftune_alpha", 0.0)) if params.get("noise.site") in ("embedding", "both") else 0.0,
            lr=float(run.data.params.get("train.lr", "nan")), ticks=max((s for s, _ in losses), default=0),
            eval_loss=evals[-1][1] if evals else math.nan,
            best_eval_loss=min((v for _, v in evals), default=math.nan), loss_curve=losses,
            arm=tags.get(ARM_TAG, ""), seed=int(tags.get(SEED_TAG, 0)), train_seed=int(params.get("train.seed", 0)),
            noise_seed=int(params.get("noise.seed", 0))))
    return sorted(trials, key=lambda t: (math.isnan(t.eval_loss), t.eval_loss))


def best_trial(trials: list[Trial]) -> Trial:
    """The search trial with the lowest final eval loss: the one whose model the sweep registers."""
    finished = [t for t in trials if not math.isnan(t.eval_loss)]
    if not finished:
        raise RuntimeError("no trial of the sweep reported an eval loss")
    return finished[0]


def write_csv(trials: list[Trial], path: Path, columns: list[str] = COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for t in trials:
            writer.writerow([getattr(t, column) for column in columns])
    return path


def write_plots(trials: list[Trial], out_dir: Path) -> list[Path]:
    """eval loss vs σ (σ = 0 drawn at the left edge), eval loss vs lr, and every trial's loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [t for t in trials if not math.isnan(t.eval_loss)]
    positive = [t.sigma for t in scored if t.sigma > 0]
    zero_x = min(positive) / 3 if positive else 1e-4  # where σ = 0 is drawn on the log axis
    paths = []
    for name, xs, label in (
            ("eval_loss_vs_sigma.png", [t.sigma if t.sigma > 0 else zero_x for t in scored], "noise σ (σ = 0 at left)"),
            ("eval_loss_vs_lr.png", [t.lr for t in scored], "learning rate")):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        axes.scatter(xs, [t.eval_loss for t in scored],
                     c=["tab:red" if t.sigma == 0 else "tab:blue" for t in scored])
        axes.set(xscale="log", xlabel=label, ylabel="final eval loss")
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


def format_table(trials: list[Trial]) -> str:
    header = f"{'trial':14} {'status':9} {'stopped':8} {'sigma':>9} {'alpha':>6} {'lr':>9} {'ticks':>5} {'eval loss':>10}"
    lines = [header, "-" * len(header)]
    for t in trials:
        lines.append(f"{t.trial_id[:14]:14} {t.status:9} {t.stopped_by:8} {t.sigma:>9.2e} {t.alpha:>6.2f} {t.lr:>9.2e} "
                     f"{t.ticks:>5} {t.eval_loss:>10.4f}")
    return "\n".join(lines)


def format_confirm_table(runs: list[Trial]) -> str:
    """The confirmation runs by seed, each seed's arms together."""
    header = (f"{'arm':8} {'seed':>4} {'train.seed':>10} {'status':9} {'sigma':>9} {'alpha':>6} {'lr':>9} {'ticks':>5} "
              f"{'eval loss':>10}")
    lines = [header, "-" * len(header)]
    for t in sorted(runs, key=lambda t: (t.seed, t.arm)):
        lines.append(f"{t.arm:8} {t.seed:>4} {t.train_seed:>10} {t.status:9} {t.sigma:>9.2e} {t.alpha:>6.2f} {t.lr:>9.2e} "
                     f"{t.ticks:>5} {t.eval_loss:>10.4f}")
    return "\n".join(lines)
