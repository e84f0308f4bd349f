"""Turn a ModelConfig into something `from_pretrained` loads fast, and load it.

GGUF files and tiny from-config models are converted once into a cached HF directory
(safetensors + tokenizer), so workers and data actors load in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from pipeline.config import ConfigError, ModelConfig, expand_files, resolve_path
from pipeline.cache import cached_dir, file_identity, stable_hash

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model")


def materialize_model(cfg: ModelConfig) -> str:
    """Return a local HF directory (or a hub id) holding the model and its tokenizer."""
    if cfg.source == "hub":
        return cfg.path
    if cfg.source == "hf_dir":
        path = Path(resolve_path(cfg.path))
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path: '{cfg.path}' is not a Hugging Face model directory (no config.json)")
        check_hf_dir(path, cfg.path)
        return str(path)
    if cfg.source == "gguf":
        gguf = Path(resolve_path(cfg.path))
        if not gguf.is_file():
            raise ConfigError(f"model.path: GGUF file '{cfg.path}' does not exist")
        key = "gguf-" + stable_hash(file_identity(gguf))

        def convert(out: Path) -> None:
            check_gguf(gguf, cfg.path)  # only before converting: the cached copy was checked then
            _convert_gguf(gguf, out)

        return str(cached_dir(cfg.cache_dir, key, convert))
    corpus = expand_files(cfg.tokenizer_corpus, "model.tokenizer_corpus")
    key = "config-" + stable_hash([cfg.architecture, cfg.tokenizer_vocab_size, cfg.init_seed,
                                   [file_identity(p) for p in corpus]])
    return str(cached_dir(cfg.cache_dir, key, lambda out: _build_from_config(cfg, corpus, out)))


def check_hf_dir(path: Path, named: str) -> None:
    """A readable config and complete weight files, checked before any worker loads them (a truncated
    download otherwise fails inside every Ray worker at once, with a deep traceback)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable config.json
        raise ConfigError(f"model.path: '{named}' has an unreadable config.json ({_first_line(exc)})") from None
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise ConfigError(f"model.path: '{named}' holds no weights (*.safetensors or *.bin)")
    for file in (w for w in weights if w.suffix == ".safetensors"):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"model.path: '{named}/{file.name}' is corrupt or truncated ({_first_line(exc)})") from None


def check_gguf(path: Path, named: str) -> None:
    import gguf

    try:
        gguf.GGUFReader(str(path))  # parses the header and maps every tensor: truncation shows here
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model.path: '{named}' is not a readable GGUF file ({_first_line(exc)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_tokenizer(model_ref: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model.path: the tokenizer of '{model_ref}' has no EOS token; packing needs one")
    return tokenizer


def load_causal_lm(model_ref: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_ref, dtype=dtype)


def max_positions(model_ref: str) -> int | None:
    """The longest sequence the model's position embeddings allow, if its config says."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_ref)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def hf_dir_fingerprint(model_ref: str) -> str:
    """Fingerprint of a tokenizer: the content of its files (or the hub id when remote)."""
    path = Path(model_ref)
    if not path.is_dir():
        return stable_hash(["hub", model_ref])
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            digest.update(name.encode())
            digest.update((path / name).read_bytes())
    return digest.hexdigest()[:16]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF once into safetensors. A GGUF-loaded model cannot save_pretrained itself,
    so rebuild a clean model from its config (without quantization_config) and copy the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached safetensors directory (once, ~30 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "transformers_version"})
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=False)
    clean.tie_weights()
    source = loaded.state_dict()
    mismatched = [k for k, v in clean.state_dict().items() if k not in source or not torch.equal(v, source[k])]
    if mismatched:
        raise RuntimeError(f"GGUF conversion of {gguf} lost weights: {mismatched[:5]}")
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "pipeline_source.json").write_text(json.dumps({"gguf": str(gguf)}))


def _build_from_config(cfg: ModelConfig, corpus: list[Path], out: Path) -> None:
    """A tiny model with random weights (seeded) and a byte-level BPE tokenizer trained on `corpus`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = _train_tokenizer(corpus, cfg.tokenizer_vocab_size)
    arch = dict(cfg.architecture)
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **arch)
    torch.manual_seed(cfg.init_seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _train_tokenizer(files: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(p) for p in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=specials[0], eos_token=specials[0],
                                   unk_token=specials[0], pad_token=specials[1])
