"""What a rank's model learns, as the loop sees it: a micro batch's loss, its target count, the
evaluation and how its figures read. The causal LM's is here; the classification tasks' is
`classify.Classification`.

Every loss is a sum over the micro batch's targets divided by the tick's share of targets per micro
step (`per_micro`): DeepSpeed's mean over micro steps and ranks then gives the tick's mean per target,
the same however the tick's samples are spread over ranks.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from pipeline.config import Config
from pipeline.train.source import MicroBatch


class Objective(Protocol):
    def targets(self, batch: MicroBatch) -> int:
        """What the loss is over in `batch`: target tokens, examples or scored tokens."""

    def loss(self, engine, batch: MicroBatch, device: torch.device, per_micro: torch.Tensor) -> torch.Tensor:
        """The summed loss of `batch` over `per_micro`, through the engine's forward."""

    def evaluate(self, engine, batches: list[MicroBatch], device: torch.device) -> dict[str, float]:
        """The eval metrics over every rank's share of the eval subset (the same on every rank); called
        in eval mode, without gradients or noise."""

    def describe(self, metrics: dict[str, float]) -> str:
        """The eval figures of the rank-0 line: `eval loss 2.1, perplexity 8.2`."""


class CausalLM:
    """The next token, with the loss on the batch's labels (every token of raw text, responses only
    for examples)."""

    def targets(self, batch: MicroBatch) -> int:
        return batch.targets

    def loss(self, engine, batch: MicroBatch, device: torch.device, per_micro: torch.Tensor) -> torch.Tensor:
        return engine(**batch.model_inputs(device), num_items_in_batch=per_micro).loss

    def evaluate(self, engine, batches: list[MicroBatch], device: torch.device) -> dict[str, float]:
        """Mean loss per target token (responses only, for examples) over the run's fixed eval subset,
        summed across all ranks."""
        import torch.distributed as dist

        totals = torch.zeros(2, dtype=torch.float64, device=device)
        summed = torch.tensor(1.0)  # the loss comes back as a sum over the batch's target tokens
        for batch in batches:
            totals[0] += engine(**batch.model_inputs(device), num_items_in_batch=summed).loss.double()
            totals[1] += batch.targets
        dist.all_reduce(totals)
        loss = float(totals[0] / totals[1])
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}"


def objective_for(config: Config, label_names: tuple[str, ...]) -> Objective:
    """`model.task`'s objective; `label_names`: the prepared data's classes, in id order."""
    if config.model.task == "causal_lm":
        return CausalLM()
    from pipeline.train.classify import Classification

    return Classification(config.model.task, label_names)
