"""A classification micro batch as the encoder takes it, its summed loss, and its predictions.

Blocks of a labelled format hold one example each, padded (`pipeline.data.blocks`): the example is
the block's first segment of position ids, so the attention mask is 1 there and 0 on the padding,
and the positions are the model's own 0..L-1 (the example starts the block). A sequence's class
sits on its first token ([CLS]); a word's tag on its scored sub-word tokens, -100 elsewhere.

The loss is summed over the micro batch's targets (examples, or scored tokens) and divided by the
tick's share per micro step, as the causal-LM loop does with tokens, so a tick trains the same on 1
or N workers. The heads' own mean losses would weight a rank's examples by its batch instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.blocks import IGNORE
from pipeline.train.metrics import sequence_metrics, token_metrics
from pipeline.train.source import MicroBatch


def attention_mask(batch: MicroBatch) -> torch.Tensor:
    """1 on each block's example, 0 on its padding (a segment of its own, where positions restart)."""
    segment = torch.cumsum(batch.position_ids == 0, dim=1) - 1
    return (segment == 0).to(torch.int64)


def class_labels(batch: MicroBatch, task: str) -> torch.Tensor:
    """[micro] for a sequence's class, [micro, L] for tags (-100 where not scored)."""
    return batch.labels[:, 0] if task == "sequence_classification" else batch.labels


def classifier_inputs(batch: MicroBatch, device: torch.device) -> dict[str, torch.Tensor]:
    return {"input_ids": batch.input_ids.to(device), "attention_mask": attention_mask(batch).to(device)}


def targets(batch: MicroBatch, task: str) -> int:
    """What the loss is over: examples, or scored tokens."""
    return int((class_labels(batch, task) != IGNORE).sum())


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the targets, in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=IGNORE, reduction="sum")


def predictions(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[list, list]:
    """(true, predicted) ids: one per example, or one list per sentence of its scored tokens."""
    predicted = logits.argmax(dim=-1).cpu()
    labels = labels.cpu()
    if task == "sequence_classification":
        return labels.tolist(), predicted.tolist()
    scored = labels != IGNORE
    return ([row[mask].tolist() for row, mask in zip(labels, scored)],
            [row[mask].tolist() for row, mask in zip(predicted, scored)])


def majority_accuracy(true: list) -> float:
    """The accuracy of always answering the most frequent true class (tag, for tokens): the baseline a
    classifier has to beat on these labels."""
    flat = [label for item in true for label in (item if isinstance(item, list) else [item])]
    return max(Counter(flat).values()) / len(flat) if flat else 0.0


@dataclass(frozen=True)
class Classification:
    """The loop's `Objective` for a classification task: cross-entropy over the examples' classes or the
    scored tokens' tags, and at every evaluation the eval loss, the task's metrics over the predictions
    of all ranks (gathered, so every rank and world size computes the same numbers) and the majority-class
    accuracy of the evaluated labels beside them. No perplexity: it means nothing for a classifier."""

    task: str
    label_names: tuple[str, ...]

    def targets(self, batch: MicroBatch) -> int:
        return targets(batch, self.task)

    def loss(self, engine, batch: MicroBatch, device: torch.device, per_micro: torch.Tensor) -> torch.Tensor:
        logits = engine(**classifier_inputs(batch, device)).logits
        return summed_loss(logits, class_labels(batch, self.task)) / per_micro.to(logits.device)

    def evaluate(self, engine, batches: list[MicroBatch], device: torch.device) -> dict[str, float]:
        import torch.distributed as dist

        totals = torch.zeros(2, dtype=torch.float64, device=device)
        true, predicted = [], []
        for batch in batches:
            labels = class_labels(batch, self.task)
            logits = engine(**classifier_inputs(batch, device)).logits
            totals[0] += summed_loss(logits, labels).double()
            totals[1] += targets(batch, self.task)
            batch_true, batch_predicted = predictions(logits, labels, self.task)
            true += batch_true
            predicted += batch_predicted
        dist.all_reduce(totals)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (true, predicted))  # small: one id per example or scored token
        true = [item for rank_true, _ in gathered for item in rank_true]
        predicted = [item for _, rank_predicted in gathered for item in rank_predicted]
        scores = (sequence_metrics(true, predicted) if self.task == "sequence_classification"
                  else token_metrics(true, predicted, self.label_names))
        return {"eval_loss": float(totals[0] / totals[1]), **scores, "eval_majority_accuracy": majority_accuracy(true)}

    def describe(self, metrics: dict[str, float]) -> str:
        figures = ([f"accuracy {metrics['eval_accuracy']:.4f}", f"macro-F1 {metrics['eval_f1']:.4f}"]
                   if self.task == "sequence_classification" else
                   [f"entity F1 {metrics['eval_f1']:.4f} (precision {metrics['eval_precision']:.4f}, "
                    f"recall {metrics['eval_recall']:.4f})", f"token accuracy {metrics['eval_accuracy']:.4f}"])
        return ", ".join([f"eval loss {metrics['eval_loss']:.4f}", *figures,
                          f"majority class {metrics['eval_majority_accuracy']:.4f}"])


def summary_lines(metrics: dict[str, float]) -> list[str]:
    """The train summary's figures of a classifier: before training (the untrained head) and after,
    with the majority-class accuracy of the eval labels beside the accuracy."""
    def before_after(name: str, key: str) -> str:
        return f"{name:<10} before {metrics[key + '_start']:.4f}  after {metrics[key]:.4f}"

    token = "eval_precision" in metrics
    return [before_after("eval loss", "eval_loss"),
            before_after("token acc" if token else "accuracy", "eval_accuracy")
            + f"  (majority class {metrics['eval_majority_accuracy']:.4f})",
            before_after("entity F1" if token else "macro-F1", "eval_f1")]
