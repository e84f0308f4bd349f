"""The confirmation's statistics: paired differences in the final `sweep.metric` over seeds, their
95% t-interval, the verdict sentence and the paired plot. No Ray, no MLflow.

Sign convention, for every comparison: the difference is the treatment's gain over the baseline at
the same seed, so a positive difference means the treatment (the noise) helped: the baseline's
final eval loss minus the treatment's for a metric to minimise, the treatment's accuracy minus the
baseline's for one to maximise (`Goal.gain`).
Pairing by seed takes out what the seed does to both runs (data order, noise stream); the interval
is over seeds, so it says how much the difference varies from one seed to another.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.tune.goal import Goal

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Comparison:
    """Treatment arm against baseline arm, and how the verdict words either outcome."""

    name: str  # in the metric names: confirm_<name>_diff, ...
    baseline: str  # arm names (pipeline.tune.arms)
    treatment: str
    helped: str  # "<helped> by X ± Y" when the interval is above 0
    hurt: str
    between: str  # "no detectable difference <between>"


COMPARISONS = (
    Comparison("noise", "zero", "noisy", "noise helped", "noise hurt", "between the noisy runs and their σ = 0 twins"),
    Comparison("neftune", "zero", "neftune", "NEFTune helped", "NEFTune hurt",
               "between the NEFTune runs and their σ = 0 twins"),
    Comparison("noise_vs_neftune", "neftune", "noisy", "the noisy config beat NEFTune", "the noisy config lost to NEFTune",
               "between the noisy config and NEFTune"),
)


@dataclass(frozen=True)
class Paired:
    """One comparison's pairs: per seed, the baseline's and the treatment's final value of the metric."""

    comparison: Comparison
    seeds: tuple[int, ...]
    baseline: tuple[float, ...]
    treatment: tuple[float, ...]
    goal: Goal

    def __post_init__(self):
        if not len(self.seeds) == len(self.baseline) == len(self.treatment) >= 2:
            raise ValueError(f"{self.comparison.name}: a paired interval needs at least 2 complete pairs")

    @property
    def diffs(self) -> list[float]:
        return [self.goal.gain(b, t) for b, t in zip(self.baseline, self.treatment)]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def half_width(self) -> float:
        """Half the 95% t-interval of the mean difference: t(0.975, n − 1) · s / √n."""
        from scipy.stats import t

        n = len(self.diffs)
        return float(t.ppf((1 + CONFIDENCE) / 2, n - 1)) * statistics.stdev(self.diffs) / math.sqrt(n)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def outcome(self) -> str:
        """helped | hurt | none (the interval contains 0, both ends included)."""
        if self.low > 0:
            return "helped"
        return "hurt" if self.high < 0 else "none"

    def metrics(self) -> dict[str, float]:
        name = self.comparison.name
        return {f"confirm_{name}_diff": self.mean, f"confirm_{name}_ci_low": self.low,
                f"confirm_{name}_ci_high": self.high, f"confirm_{name}_pairs": len(self.diffs)}

    def sentence(self) -> str:
        c = self.comparison
        detail = (f"(final {self.goal.label}, {self.goal.difference_words(c.baseline, c.treatment)} at the "
                  f"same seed, mean of {len(self.diffs)} pairs, 95% CI [{self.low:.4f}, {self.high:.4f}])")
        if self.outcome == "helped":
            return f"{c.helped} by {self.mean:.4f} ± {self.half_width:.4f} {detail}"
        if self.outcome == "hurt":
            return f"{c.hurt} by {-self.mean:.4f} ± {self.half_width:.4f} {detail}"
        return f"no detectable difference {c.between}: {self.mean:+.4f} ± {self.half_width:.4f} {detail}"


def pair_up(comparison: Comparison, values: dict[tuple[str, int], float], goal: Goal) -> Paired | None:
    """The comparison over every seed at which both arms have a final value of the metric
    ((arm, seed) -> value); None when fewer than 2 seeds do (an arm missing from the plan, or failed runs)."""
    seeds = sorted(seed for arm, seed in values if arm == comparison.treatment
                   and not math.isnan(values[arm, seed]) and not math.isnan(values.get((comparison.baseline, seed), math.nan)))
    if len(seeds) < 2:
        return None
    return Paired(comparison, tuple(seeds), tuple(values[comparison.baseline, s] for s in seeds),
                  tuple(values[comparison.treatment, s] for s in seeds), goal)


def plot_pairs(paired: Paired, path: Path) -> Path:
    """Per seed, the baseline's and the treatment's final value, joined by a line (green where the
    treatment did better); the verdict as title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, goal = paired.comparison, paired.goal
    figure, axes = plt.subplots(figsize=(5, 4))
    for seed, before, after in zip(paired.seeds, paired.baseline, paired.treatment):
        gain = goal.gain(before, after)
        axes.plot([0, 1], [before, after], marker="o", color="tab:green" if gain > 0 else "tab:red",
                  label=f"seed {seed}: {gain:+.4f}")
    axes.set_xticks([0, 1], [c.baseline, c.treatment])
    axes.set(xlim=(-0.4, 1.4), ylabel=f"final {goal.label}")
    difference = goal.difference_words(c.baseline, c.treatment).replace(" minus ", " − ")
    axes.set_title(f"{c.name}: {paired.mean:+.4f} ± {paired.half_width:.4f} (95% CI, {difference})", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
