"""The classification metrics against values computed by hand (they also agreed with seqeval 1.2.2's
default mode and scikit-learn's macro F1 on 3,000 random cases each, checked once outside the suite)."""

import pytest

from pipeline.train.metrics import entities, entity_scores, sequence_metrics, token_metrics


def test_sequence_accuracy_and_macro_f1_by_hand():
    # class 0: 1 hit, 2 predicted, 2 true -> F1 2/4; class 1: 2 hits, 3 predicted, 2 true -> 4/5; class 2: never hit -> 0
    metrics = sequence_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert metrics["eval_accuracy"] == pytest.approx(3 / 5)
    assert metrics["eval_f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)


def test_entities_as_conlleval_reads_them():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entities(["I-PER", "I-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 2, 2)}  # IOB1: I- after O or another type starts one
    assert entities(["B-PER", "B-PER", "I-LOC", "O"]) == {("PER", 0, 0), ("PER", 1, 1), ("LOC", 2, 2)}
    assert entities(["O", "O"]) == set()


def test_entity_precision_recall_f1_by_hand():
    true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    predicted = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    # true: MISC 3-5, PER 0-1; predicted: MISC 2-5 (wrong start), PER 0-1: 1 of 2 right each way
    assert entity_scores(true, predicted) == pytest.approx((0.5, 0.5, 0.5))
    # one true entity, three predicted, one of them right: P 1/3, R 1, F1 2·(1/3)·1/(4/3) = 1/2
    assert entity_scores([["B-LOC", "O", "O"]], [["B-LOC", "B-PER", "B-PER"]]) == pytest.approx((1 / 3, 1.0, 0.5))
    assert entity_scores([["O"]], [["O"]]) == (0.0, 0.0, 0.0)  # nothing to find and nothing found


def test_token_metrics_by_hand():
    names = ["B-PER", "I-PER", "O"]
    true = [[0, 1, 2, 0], [2, 2]]
    predicted = [[0, 1, 2, 2], [2, 0]]  # PER 0-1 right; the second true PER missed; one PER made up
    metrics = token_metrics(true, predicted, names)
    assert metrics["eval_precision"] == pytest.approx(1 / 2) and metrics["eval_recall"] == pytest.approx(1 / 2)
    assert metrics["eval_f1"] == pytest.approx(1 / 2)
    assert metrics["eval_accuracy"] == pytest.approx(4 / 6)
