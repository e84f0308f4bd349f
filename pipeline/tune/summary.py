"""What a finished sweep tells: the trials table, best trial, σ > 0 against σ = 0, CSV and plots."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.tracking import RunTarget
from pipeline.tracking.store import STOPPED_TAG, client_for
from pipeline.tracking.sweeps import TRIAL_TAG, child_runs

COLUMNS = ["trial_id", "run_id", "status", "stopped_by", "sigma", "lr", "ticks", "eval_loss", "best_eval_loss"]


@dataclass(frozen=True)
class Trial:
    trial_id: str
    run_id: str
    status: str
    stopped_by: str
    sigma: float
    lr: float
    ticks: int
    eval_loss: float  # the last evaluation of the trial (at its last tick)
    best_eval_loss: float
    loss_curve: list[tuple[int, float]]  # training loss by tick


def collect_trials(parent: RunTarget) -> list[Trial]:
    client = client_for(parent.uri)
    trials = []
    for run in child_runs(parent):
        run_id = run.info.run_id
        evals = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval_loss"))
        losses = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        trials.append(Trial(
            trial_id=run.data.tags.get(TRIAL_TAG, ""), run_id=run_id, status=run.info.status,
            stopped_by=run.data.tags.get(STOPPED_TAG, ""), sigma=float(run.data.params.get("noise.sigma", 0.0)),
            lr=float(run.data.params.get("train.lr", "nan")), ticks=max((s for s, _ in losses), default=0),
            eval_loss=evals[-1][1] if evals else math.nan,
            best_eval_loss=min((v for _, v in evals), default=math.nan), loss_curve=losses))
    return sorted(trials, key=lambda t: (math.isnan(t.eval_loss), t.eval_loss))


@dataclass(frozen=True)
class Verdict:
    """Best σ > 0 trial against the σ = 0 trial, each at its last evaluation (lower is better)."""

    best: Trial
    zero: Trial | None
    best_noisy: Trial | None

    @property
    def noise_gain(self) -> float | None:
        """σ = 0 eval loss minus the best σ > 0 eval loss: positive means noise helped."""
        if self.zero is None or self.best_noisy is None:
            return None
        return self.zero.eval_loss - self.best_noisy.eval_loss

    def sentence(self) -> str:
        if self.noise_gain is None:
            return "no comparison: the sweep lacks a σ = 0 trial or a σ > 0 trial"
        zero, noisy = self.zero, self.best_noisy
        caveat = "" if zero.ticks == noisy.ticks else (
            f" (careful: σ = 0 ran {zero.ticks} ticks and the best σ > 0 trial {noisy.ticks}; ASHA stopped one early)")
        verb = "beat" if self.noise_gain > 0 else "did not beat"
        return (f"best σ > 0 (σ={noisy.sigma:.3g}, lr={noisy.lr:.3g}: eval loss {noisy.eval_loss:.4f}) {verb} "
                f"σ = 0 (lr={zero.lr:.3g}: {zero.eval_loss:.4f}) by {self.noise_gain:+.4f}{caveat}")


def verdict(trials: list[Trial]) -> Verdict:
    finished = [t for t in trials if not math.isnan(t.eval_loss)]
    if not finished:
        raise RuntimeError("no trial of the sweep reported an eval loss")
    zeros = [t for t in finished if t.sigma == 0.0]
    noisy = [t for t in finished if t.sigma > 0.0]
    return Verdict(best=finished[0], zero=zeros[0] if zeros else None, best_noisy=noisy[0] if noisy else None)


def write_csv(trials: list[Trial], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for t in trials:
            writer.writerow([getattr(t, column) for column in COLUMNS])
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
    header = f"{'trial':14} {'status':9} {'stopped':8} {'sigma':>9} {'lr':>9} {'ticks':>5} {'eval loss':>10}"
    lines = [header, "-" * len(header)]
    for t in trials:
        lines.append(f"{t.trial_id[:14]:14} {t.status:9} {t.stopped_by:8} {t.sigma:>9.2e} {t.lr:>9.2e} "
                     f"{t.ticks:>5} {t.eval_loss:>10.4f}")
    return "\n".join(lines)
