"""What a sweep optimises (`sweep.metric` and its mode) and what follows from it: which of two values
is better, the order of the trials tables, and the sign of a confirmation's paired difference.
No Ray, no MLflow.

The convention every report keeps, whatever the mode: a positive gain means the treatment did
better than its baseline (a lower loss, a higher accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pipeline.config import SweepConfig


@dataclass(frozen=True)
class Goal:
    """A metric and whether a smaller (`min`) or larger (`max`) value of it is better."""

    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"

    @classmethod
    def of(cls, sweep: SweepConfig) -> Goal:
        return cls(sweep.metric, sweep.metric_mode)

    @property
    def label(self) -> str:
        """How tables and sentences name it: `eval loss`, `eval accuracy`."""
        return self.metric.replace("_", " ")

    @property
    def best_metric(self) -> str:
        """The parent run's metric for the best trial's value (`best_eval_loss`)."""
        return f"best_{self.metric}"

    def rank_key(self, value: float) -> tuple[bool, float]:
        """Sorts values best first, NaN (no evaluation) last."""
        if math.isnan(value):
            return True, 0.0
        return False, value if self.mode == "min" else -value

    def best(self, values: Iterable[float]) -> float:
        """The best of `values` (NaN ignored; NaN when none is left)."""
        return min(values, key=self.rank_key, default=math.nan)

    def better(self, value: float, than: float) -> bool:
        return self.rank_key(value) < self.rank_key(than)

    def gain(self, baseline: float, treatment: float) -> float:
        """How much better the treatment did than the baseline: positive when it helped."""
        return baseline - treatment if self.mode == "min" else treatment - baseline

    def difference_words(self, baseline: str, treatment: str) -> str:
        """The gain as a subtraction, for the verdict: `zero minus noisy` for a loss."""
        first, second = (baseline, treatment) if self.mode == "min" else (treatment, baseline)
        return f"{first} minus {second}"


LOSS = Goal()  # the default sweep.metric: eval_loss, minimised
