"""Evaluation metrics of the classification tasks, from true and predicted class ids.

- Sequence classification: accuracy, and macro-F1 (each class's F1 averaged with equal weight over
  the classes that occur among the true or the predicted labels, as scikit-learn's
  `f1_score(average="macro")`; a class with no true and no predicted example is not counted, one
  never predicted correctly scores 0).
- Token classification: entity-level precision, recall and F1, micro-averaged over all entities, as
  seqeval's default mode (the conlleval script's definition) counts them: an entity is a maximal run
  of tags `B-X`/`I-X` (`E-X`, `S-X` too) of one type, where an `I-X` after `O` or after another type
  also starts one (so IOB1 and IOB2 both read right), and a predicted entity counts only when its type,
  start and end all match a true one. Token accuracy is over every scored token (those whose label is
  not -100), `O` included. Sentences are scored separately: no entity crosses from one to the next.

seqeval itself (1.2.2, an sdist last released in 2020, pulling scikit-learn) is not a dependency;
`tests/test_metrics.py` checks these definitions against hand-computed values.
"""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(true: Sequence[int], predicted: Sequence[int]) -> float:
    return sum(t == p for t, p in zip(true, predicted)) / len(true) if len(true) else 0.0


def macro_f1(true: Sequence[int], predicted: Sequence[int]) -> float:
    classes = sorted(set(true) | set(predicted))
    scores = []
    for label in classes:
        hits = sum(t == p == label for t, p in zip(true, predicted))
        scores.append(_f1(hits, sum(p == label for p in predicted), sum(t == label for t in true)))
    return sum(scores) / len(scores) if scores else 0.0


def _f1(hits: int, predicted: int, true: int) -> float:
    return 2 * hits / (predicted + true) if predicted + true else 0.0


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) of every entity in one sentence's tags, as conlleval finds them."""
    found, begin = set(), 0
    previous, previous_type = "O", ""
    for index, tag in enumerate([*tags, "O"]):
        prefix, kind = _split(tag)
        if _chunk_ends(previous, prefix, previous_type, kind):
            found.add((previous_type, begin, index - 1))
        if _chunk_starts(previous, prefix, previous_type, kind):
            begin = index
        previous, previous_type = prefix, kind
    return found


def _split(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; a bare prefix has the type "_" (as seqeval reads tags)."""
    if tag == "O":
        return "O", ""
    return tag[0], tag[1:].split("-", 1)[-1] or "_"


def _chunk_ends(previous: str, prefix: str, previous_type: str, kind: str) -> bool:
    return (previous in ("E", "S") or (previous in ("B", "I") and prefix in ("B", "S", "O"))
            or (previous != "O" and previous_type != kind))


def _chunk_starts(previous: str, prefix: str, previous_type: str, kind: str) -> bool:
    return (prefix in ("B", "S") or (previous in ("E", "S", "O") and prefix in ("E", "I"))
            or (prefix != "O" and previous_type != kind))


def entity_scores(true: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> tuple[float, float, float]:
    """(precision, recall, F1) over the entities of all sentences."""
    hits = found = wanted = 0
    for true_tags, predicted_tags in zip(true, predicted):
        gold, guessed = entities(true_tags), entities(predicted_tags)
        hits, found, wanted = hits + len(gold & guessed), found + len(guessed), wanted + len(gold)
    precision = hits / found if found else 0.0
    recall = hits / wanted if wanted else 0.0
    return precision, recall, _f1(hits, found, wanted)


def sequence_metrics(true: Sequence[int], predicted: Sequence[int]) -> dict[str, float]:
    """One class per example."""
    return {"eval_accuracy": accuracy(true, predicted), "eval_f1": macro_f1(true, predicted)}


def token_metrics(true: Sequence[Sequence[int]], predicted: Sequence[Sequence[int]],
                  names: Sequence[str]) -> dict[str, float]:
    """A tag per scored token, one list per sentence; `names` turns ids into tags."""
    true_tags = [[names[i] for i in sentence] for sentence in true]
    predicted_tags = [[names[i] for i in sentence] for sentence in predicted]
    precision, recall, f1 = entity_scores(true_tags, predicted_tags)
    flat_true = [i for sentence in true for i in sentence]
    flat_predicted = [i for sentence in predicted for i in sentence]
    return {"eval_precision": precision, "eval_recall": recall, "eval_f1": f1,
            "eval_accuracy": accuracy(flat_true, flat_predicted)}
