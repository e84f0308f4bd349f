"""The confirmation's statistics: paired differences in final eval loss over seeds, their 95%
t-interval, the verdict sentence and the paired plot. No Ray, no MLflow.

Sign convention, for every comparison: difference = baseline's final eval loss minus the
treatment's at the same seed, so a positive difference means the treatment (the noise) helped.
Pairing by seed takes out what the seed does to both runs (data order, noise stream); the interval
is over seeds, so it says how much the difference varies from one seed to another.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

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
    """One comparison's pairs: per seed, the baseline's and the treatment's final eval loss."""

    comparison: Comparison
    seeds: tuple[int, ...]
    baseline: tuple[float, ...]
    treatment: tuple[float, ...]

    def __post_init__(self):
        if not len(self.seeds) == len(self.baseline) == len(self.treatment) >= 2:
            raise ValueError(f"{self.comparison.name}: a paired interval needs at least 2 complete pairs")

    @property
    def diffs(self) -> list[float]:
        return [b - t for b, t in zip(self.baseline, self.treatment)]

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
        detail = (f"(final eval loss, {c.baseline} minus {c.treatment} at the same seed, mean of {len(self.diffs)} "
                  f"pairs, 95% CI [{self.low:.4f}, {self.high:.4f}])")
        if self.outcome == "helped":
            return f"{c.helped} by {self.mean:.4f} ± {self.half_width:.4f} {detail}"
        if self.outcome == "hurt":
            return f"{c.hurt} by {-self.mean:.4f} ± {self.half_width:.4f} {detail}"
        return f"no detectable difference {c.between}: {self.mean:+.4f} ± {self.half_width:.4f} {detail}"


def pair_up(comparison: Comparison, losses: dict[tuple[str, int], float]) -> Paired | None:
    """The comparison over every seed at which both arms have a final eval loss ((arm, seed) -> loss);
    None when fewer than 2 seeds do (an arm missing from the plan, or failed runs)."""
    seeds = sorted(seed for arm, seed in losses if arm == comparison.treatment
                   and not math.isnan(losses[arm, seed]) and not math.isnan(losses.get((comparison.baseline, seed), math.nan)))
    if len(seeds) < 2:
        return None
    return Paired(comparison, tuple(seeds), tuple(losses[comparison.baseline, s] for s in seeds),
                  tuple(losses[comparison.treatment, s] for s in seeds))


def plot_pairs(paired: Paired, path: Path) -> Path:
    """Per seed, the baseline's and the treatment's final eval loss, joined by a line; the verdict as title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = paired.comparison
    figure, axes = plt.subplots(figsize=(5, 4))
    for seed, before, after in zip(paired.seeds, paired.baseline, paired.treatment):
        axes.plot([0, 1], [before, after], marker="o", color="tab:green" if before > after else "tab:red",
                  label=f"seed {seed}: {before - after:+.4f}")
    axes.set_xticks([0, 1], [c.baseline, c.treatment])
    axes.set(xlim=(-0.4, 1.4), ylabel="final eval loss")
    axes.set_title(f"{c.name}: {paired.mean:+.4f} ± {paired.half_width:.4f} (95% CI, {c.baseline} − {c.treatment})",
                   fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
