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

import torch
import torch.nn.functional as F

from pipeline.data.blocks import IGNORE
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
