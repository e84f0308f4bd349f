"""patch_norms: tiny models built from config (no downloads), patched in place and compared to the original."""

import copy

import pytest
import torch
import transformers as hf
from torch import nn

from pipeline.models import FusedNorm, NormPatchReport, patch_norms, patch_norms_with_report
from pipeline.noise import NoiseContext, noise_context

VOCAB, HIDDEN = 128, 64
SIZES = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
IDS = torch.tensor([[5, 17, 99, 3, 42, 7], [1, 2, 3, 4, 5, 6]])


def _config(arch: str):
    configs = {
        "gpt2": lambda: hf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0),
        "llama": lambda: hf.LlamaConfig(**SIZES, num_key_value_heads=2),
        "mistral": lambda: hf.MistralConfig(**SIZES, num_key_value_heads=2),
        "qwen2": lambda: hf.Qwen2Config(**SIZES, num_key_value_heads=2),
        "qwen3": lambda: hf.Qwen3Config(**SIZES, num_key_value_heads=2, head_dim=16),
        "gpt_neox": lambda: hf.GPTNeoXConfig(**SIZES),
        "opt": lambda: hf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=128, word_embed_proj_dim=HIDDEN),
        "gemma": lambda: hf.GemmaConfig(**SIZES, num_key_value_heads=2, head_dim=16),
        "bert": lambda: hf.BertConfig(**SIZES),
    }
    return configs[arch]()


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    config = _config(arch)
    model = hf.BertForMaskedLM(config) if arch == "bert" else hf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norm weights and biases, so a wrong form or offset cannot hide
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for param in module.parameters(recurse=False):
                    param.normal_(1.0 if param is getattr(module, "weight", None) else 0.0, 0.3)
    return model.float().eval()


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_same(patched: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(patched, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def _patched(arch: str):
    """(original model, patched copy, report)."""
    original = _model(arch)
    patched = copy.deepcopy(original)
    return original, patched, patch_norms_with_report(patched)


def _norms_in_blocks(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    return [m for m in blocks.modules() if isinstance(m, FusedNorm) or "norm" in type(m).__name__.lower()]


@pytest.mark.parametrize("arch, blocks_attr, replaced, left_outside", [
    ("gpt2", "transformer.h", 5, []),
    ("llama", "model.layers", 5, []),
    ("bert", "bert.encoder.layer", 4, ["bert.embeddings.LayerNorm", "cls.predictions.transform.LayerNorm"]),
])
def test_patch_replaces_block_and_final_norms_and_keeps_the_function(arch, blocks_attr, replaced, left_outside):
    original, patched, report = _patched(arch)
    assert (report.replaced, report.in_blocks, report.blocks, report.final) == (replaced, 4, 2, replaced - 4)
    assert report.left_outside == left_outside
    for name in left_outside:
        assert name in report.summary()
    assert list(patched.state_dict()) == list(original.state_dict())
    norms = _norms_in_blocks(patched, patched.get_submodule(blocks_attr))
    assert len(norms) == 4 and all(isinstance(m, FusedNorm) for m in norms)
    layers = sorted(m.layer for m in patched.modules() if isinstance(m, FusedNorm))
    assert layers == list(range(replaced))
    _assert_same(_logits(patched), _logits(original))


def test_fused_norms_hold_the_original_parameter_objects():
    model = _model("gpt2")
    before = {name: param for name, param in model.named_parameters()}
    ln_1 = model.transformer.h[0].ln_1
    patch_norms(model)
    assert {name: param for name, param in model.named_parameters()} == before  # same objects, same names
    fused = model.transformer.h[0].ln_1
    assert fused.weight is ln_1.weight and fused.bias is ln_1.bias
    assert (fused.kind, fused.eps, fused.weight_offset, fused.training) == ("layer_norm", 1e-5, 0.0, False)
    assert "layer_norm, 64, eps=1e-05" in repr(fused)


@pytest.mark.parametrize("arch, replaced, classes, kind, offset", [
    ("mistral", 5, {"MistralRMSNorm": 5}, "rms_norm", 0.0),
    ("qwen2", 5, {"Qwen2RMSNorm": 5}, "rms_norm", 0.0),
    ("qwen3", 9, {"Qwen3RMSNorm": 9}, "rms_norm", 0.0),  # per-head q_norm/k_norm inside attention too
    ("gpt_neox", 5, {"LayerNorm": 5}, "layer_norm", 0.0),
    ("opt", 5, {"LayerNorm": 5}, "layer_norm", 0.0),
    ("gemma", 5, {"GemmaRMSNorm": 5}, "rms_norm", 1.0),  # (1 + w) weights
])
def test_architecture_coverage(arch, replaced, classes, kind, offset):
    original, patched, report = _patched(arch)
    assert (report.replaced, report.final, report.classes, report.left_outside) == (replaced, 1, classes, [])
    fused = [m for m in patched.modules() if isinstance(m, FusedNorm)]
    assert {(m.kind, m.weight_offset) for m in fused} == {(kind, offset)}
    assert sorted(m.layer for m in fused) == list(range(replaced))
    assert list(patched.state_dict()) == list(original.state_dict())
    _assert_same(_logits(patched), _logits(original))


def test_patching_twice_is_a_no_op():
    model = _model("llama")
    assert patch_norms(model) == 5
    layers = [m.layer for m in model.modules() if isinstance(m, FusedNorm)]
    assert patch_norms(model) == 0 and patch_norms_with_report(model) == NormPatchReport()
    assert [m.layer for m in model.modules() if isinstance(m, FusedNorm)] == layers


class WeirdNorm(nn.Module):
    """Norm-like by name, with a 1-D weight, but no LayerNorm/RMSNorm: must stop the patch."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = 1e-6

    def forward(self, x):
        return self.weight * x / (x.abs().amax(dim=-1, keepdim=True) + self.eps)


def test_an_unknown_norm_in_a_block_stops_the_patch_before_anything_is_replaced():
    model = _model("llama")
    model.model.layers[1].post_attention_layernorm = WeirdNorm(HIDDEN)
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"WeirdNorm at 'model\.layers\.1\.post_attention_layernorm'"):
        patch_norms(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert not any(isinstance(m, FusedNorm) for m in model.modules())


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="found no Transformer block list"):
        patch_norms(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)))


def test_plain_torch_norms_and_weightless_norms():
    """nn.RMSNorm, and a LayerNorm without affine parameters (a ones weight that adds no state)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2, self.proj = nn.RMSNorm(8, eps=1e-5), nn.LayerNorm(8, elementwise_affine=False), \
                nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.norm2(self.norm1(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers, self.norm = nn.ModuleList([Block(), Block()]), nn.LayerNorm(8, bias=False)

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return self.norm(x)

    torch.manual_seed(0)
    original = Net()
    patched = copy.deepcopy(original)
    report = patch_norms_with_report(patched)
    assert (report.replaced, report.in_blocks, report.final) == (5, 4, 1)
    assert report.classes == {"RMSNorm": 2, "LayerNorm": 3}
    assert list(patched.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 8)
    _assert_same(patched(x), original(x))


def _noisy_logits(model, sigma=0.5, tick=3, ids=IDS):
    context = NoiseContext(sigma=sigma, seed=1, tick=tick, sample_ids=torch.tensor([0, 1]))
    with noise_context(context):
        return _logits(model, ids)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_noise_reaches_the_model_in_training_only(arch):
    model = _model(arch)
    clean = _logits(model)
    patch_norms(model)
    model.train()  # dropout is 0 in these configs, so training mode alone changes nothing
    _assert_same(_logits(model), clean)
    noisy = _noisy_logits(model)
    assert not torch.allclose(noisy, clean, rtol=1e-3, atol=1e-3)
    assert torch.equal(_noisy_logits(model), noisy)  # the same context gives bit-identical logits
    assert not torch.allclose(_noisy_logits(model, tick=4), noisy, rtol=1e-3, atol=1e-3)
    model.eval()
    _assert_same(_noisy_logits(model), clean)  # eval is noise-free even under a context


def test_gradients_reach_the_norm_weights():
    model = _model("gemma")
    patch_norms(model)
    model.train()
    context = NoiseContext(sigma=0.1, seed=2, tick=0, sample_ids=torch.tensor([4, 9]))
    with noise_context(context):
        model(input_ids=IDS, labels=IDS).loss.backward()
    fused = [m for m in model.modules() if isinstance(m, FusedNorm)]
    assert len(fused) == 5
    for module in fused:
        assert module.weight.grad is not None and torch.isfinite(module.weight.grad).all()
        assert module.weight.grad.abs().sum() > 0


def test_triton_backend_matches_the_torch_backend_under_noise():
    """The fused norms' GPU path (here in the Triton interpreter) computes what the torch path does."""
    by_backend = {}
    for backend in ("torch", "triton"):
        model = _model("qwen3")  # per-head q/k norms: activations with an extra leading dimension
        patch_norms(model, backend=backend)
        model.train()
        by_backend[backend] = _noisy_logits(model, ids=IDS[:, :3])  # short: the interpreter is slow
    _assert_same(by_backend["triton"], by_backend["torch"])
