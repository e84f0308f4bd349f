"""Classification micro batches: the attention mask keeps padding out (a padded example's logits are
its logits alone), the loss is summed over targets, and predictions keep only scored tokens."""

import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from pipeline.data.blocks import PackPlan
from pipeline.train.classify import attention_mask, class_labels, classifier_inputs, predictions, summed_loss, targets
from pipeline.train.source import MicroBatch

IGNORE = -100


def padded_batch(examples: list[list[int]], labels: list[list[int]], seq_len: int) -> MicroBatch:
    """Blocks as the reader builds them for one example per block (positions restart at the padding)."""
    plan = PackPlan.next_fit([len(e) for e in examples], seq_len, one_per_block=True)
    assert plan.blocks == len(examples)
    ids = torch.zeros(len(examples), seq_len, dtype=torch.int64)
    tags = torch.full((len(examples), seq_len), IGNORE, dtype=torch.int64)
    positions = torch.zeros(len(examples), seq_len, dtype=torch.int64)
    for row, (example, label) in enumerate(zip(examples, labels)):
        n = len(example)
        ids[row, :n], tags[row, :n] = torch.tensor(example), torch.tensor(label)
        positions[row] = torch.cat([torch.arange(n), torch.arange(seq_len - n)])
    return MicroBatch(ids, torch.arange(len(examples)), tags, positions)


def tiny(head):
    torch.manual_seed(0)
    return head(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=32, num_labels=3)).eval()


def test_padding_is_masked_and_the_sequence_class_is_read_off_the_first_token():
    batch = padded_batch([[1, 7, 8, 2], [1, 9, 2]], [[2, IGNORE, IGNORE, IGNORE], [0, IGNORE, IGNORE]], seq_len=8)
    assert attention_mask(batch).tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    model = tiny(BertForSequenceClassification)
    with torch.no_grad():
        logits = model(**classifier_inputs(batch, torch.device("cpu"))).logits
        alone = model(input_ids=torch.tensor([[1, 9, 2]])).logits
        hidden = model.bert(**classifier_inputs(batch, torch.device("cpu"))).last_hidden_state
        hidden_alone = model.bert(input_ids=torch.tensor([[1, 9, 2]])).last_hidden_state
        unmasked = model.bert(input_ids=batch.input_ids).last_hidden_state
    assert torch.allclose(logits[1], alone[0], atol=1e-6)
    assert torch.allclose(hidden[1, :3], hidden_alone[0], atol=1e-5)
    assert not torch.allclose(unmasked[1, :3], hidden_alone[0], atol=1e-2)  # without the mask the padding is attended to
    labels = class_labels(batch, "sequence_classification")
    assert labels.tolist() == [2, 0] and targets(batch, "sequence_classification") == 2
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    assert torch.allclose(summed_loss(logits, labels), expected)


def test_token_predictions_keep_the_scored_tokens_of_each_sentence():
    batch = padded_batch([[1, 7, 8, 2], [1, 9, 2]], [[IGNORE, 0, IGNORE, IGNORE], [IGNORE, 1, IGNORE]], seq_len=6)
    model = tiny(BertForTokenClassification)
    with torch.no_grad():
        logits = model(**classifier_inputs(batch, torch.device("cpu"))).logits
    labels = class_labels(batch, "token_classification")
    true, predicted = predictions(logits, labels, "token_classification")
    assert true == [[0], [1]] and predicted == [[int(logits[0, 1].argmax())], [int(logits[1, 1].argmax())]]
    assert targets(batch, "token_classification") == 2
    per_token = torch.nn.functional.cross_entropy(logits[:, 1], torch.tensor([0, 1]), reduction="sum")
    assert torch.allclose(summed_loss(logits, labels), per_token)
