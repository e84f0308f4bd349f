"""The typed configuration: one frozen pydantic tree, loaded from YAML plus dotted overrides.

Every entrypoint turns (YAML file, ["train.lr=3e-4", ...]) into a `Config` before Ray starts,
so a typo or a bad value fails in one line that names the field, not deep inside a worker.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.raw_config import ConfigError, apply_overrides, read_yaml

# The sweep's sections live in a module of their own; `pipeline.config` still offers the whole tree.
from pipeline.config.sweep import ConfirmConfig, SchedulerConfig, SearchDimension, SweepConfig  # noqa: F401

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str | None) -> bool:
    """`s3://bucket/key`, `gs://...`: a location in object storage rather than a local path."""
    return bool(path) and bool(_URI.match(path))


class _Section(BaseModel):
    # extra="forbid" turns an unknown key into an error that names it; frozen keeps workers honest.
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraConfig(_Section):
    """LoRA adapters (peft) on the model's Linear layers; the base weights stay frozen. Set any field
    (`model.lora.r=16`) to switch LoRA on."""

    r: int = Field(8, ge=1)  # the adapters' rank
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / r
    # Dropout on the adapters' input. It draws from torch's RNG, per rank: a run with dropout > 0 is
    # not the same run on 1 and N workers (the rest of the run is).
    dropout: float = Field(0.0, ge=0, lt=1)
    # Linear layers by name, matched as peft matches them (the module's name or its last parts, e.g.
    # q_proj); all-linear: every Linear layer but the output head.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Modules trained in full beside the adapters (e.g. lm_head) and saved with them.
    modules_to_save: list[str] = []
    # Also train the fused norms' weights (saved with the adapter); frozen by default.
    train_norms: bool = False


class ModelConfig(_Section):
    """Where the model and its tokenizer come from."""

    source: Literal["hf_dir", "hub", "gguf", "config"]
    # hf_dir: a directory; hub: a repo id; gguf: a .gguf file. `package:NAME/rel/path` points inside
    # an installed Python package without importing it.
    path: str | None = None
    # source=config: Hugging Face config kwargs, including model_type (a tiny model built from scratch).
    architecture: dict[str, Any] | None = None
    # source=config: text files (a glob) a byte-level BPE tokenizer is trained on.
    tokenizer_corpus: str | None = None
    tokenizer_vocab_size: int = Field(512, ge=64)
    init_seed: int = 0
    cache_dir: str = ".cache/pipeline/models"
    # The attention kernel transformers uses; None keeps the model's default (sdpa where it has one).
    # flash_attention_2 needs a GPU and the flash-attn package.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    lora: LoraConfig | None = None  # None: full fine-tuning

    @model_validator(mode="after")
    def _check_source_fields(self) -> ModelConfig:
        if self.source == "config":
            if not self.architecture or "model_type" not in self.architecture:
                raise ValueError("architecture must be given, with a model_type, when source is 'config'")
            if not self.tokenizer_corpus:
                raise ValueError("tokenizer_corpus must be given when source is 'config'")
        elif not self.path:
            raise ValueError(f"path must be given when source is '{self.source}'")
        return self


class SplitConfig(_Section):
    """Which documents are held out for evaluation. The split is by document, never inside one."""

    # hash: a stable hash of the document text decides (eval_fraction of documents go to eval).
    # path_number: the first number that `path_pattern` captures in the file name decides
    #              (documents whose number >= eval_from go to eval), e.g. the year of a speech.
    # path_hash: a stable hash of the file name decides, so a file is all train or all eval.
    rule: Literal["hash", "path_number", "path_hash"] = "hash"
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    path_pattern: str = r"^(\d+)"
    eval_from: float | None = None

    @model_validator(mode="after")
    def _check_rule_fields(self) -> SplitConfig:
        if self.rule == "path_number" and self.eval_from is None:
            raise ValueError("eval_from must be given when rule is 'path_number'")
        return self


class FieldNames(_Section):
    """Where the instruction-tuning formats find their parts in a record."""

    messages: str = "messages"  # chat: a list of {role, content}
    instruction: str = "instruction"  # instruction (alpaca-style): instruction, optional input, output
    input: str = "input"
    output: str = "output"
    prompt: str = "prompt"  # prompt_completion
    completion: str = "completion"


TEXT_FORMATS = ("text", "jsonl", "parquet", "hf")
EXAMPLE_FORMATS = ("chat", "instruction", "prompt_completion")


class DataConfig(_Section):
    path: str
    # text/jsonl/parquet/hf: raw text (`text_field` of each record) for plain causal-LM training.
    # chat/instruction/prompt_completion: prompt and response examples; the loss is on responses.
    format: Literal["text", "jsonl", "parquet", "hf", "chat", "instruction", "prompt_completion"] = "text"
    # The files an example format reads; auto: .parquet files, an HF save_to_disk directory (.arrow),
    # else JSON lines.
    file_type: Literal["auto", "jsonl", "parquet", "hf"] = "auto"
    text_field: str = "text"
    fields: FieldNames = FieldNames()
    # A Jinja chat template for `chat`, used instead of the tokenizer's own (needed when it has none);
    # the exported model carries it.
    chat_template: str | None = None
    # `instruction` prompts: {instruction}, and {input} which becomes "### Input:\n<input>\n\n" (or
    # nothing when the record has no input).
    prompt_template: str = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
    train_on_prompt: bool = False  # also train on prompt tokens (system/user turns, instructions)
    # document: examples packed into seq_len blocks, attention and positions restarting at each one;
    # naive: concatenated, attention crossing examples; none: one example per block, padded.
    # Default: document for the example formats; raw text is always packed naively.
    packing: Literal["document", "naive", "none"] | None = None
    # An example longer than seq_len: skipped and counted as a bad record (too_long), or cut to its
    # first seq_len tokens (if that leaves no response token it is a bad record, no_response_left).
    too_long: Literal["skip", "truncate"] = "skip"
    seq_len: int = Field(256, ge=8)
    split: SplitConfig = SplitConfig()
    cache_dir: str = ".cache/pipeline/data"
    tokenize_actors: int = Field(2, ge=1)
    tokenize_batch_size: int = Field(64, ge=1)
    # A bad record (invalid JSON or UTF-8, empty, no text field, oversized, unreadable file): skip it
    # and count it by reason, or stop at the first one, naming its file and line.
    on_bad_record: Literal["skip", "fail"] = "skip"
    # Larger documents are bad records: one is nearly always a broken export (a whole corpus on one
    # line, a binary blob), and it would dominate the packed blocks.
    max_document_bytes: int = Field(8 << 20, ge=1)
    # The unit of parallel reading: small files are grouped up to this size, a larger JSONL file is
    # cut into pieces of it. It bounds a reader's memory, not the result: the blocks are the same.
    chunk_bytes: int = Field(32 << 20, ge=1024)  # at most: smaller when the corpus needs more chunks to keep actors busy
    # On every cache hit, hash each token file against meta.json (sizes are always checked, from one
    # listing). Turn off for very large caches whose reading would cost more than it protects.
    verify_checksums: bool = True

    @model_validator(mode="after")
    def _check_packing(self) -> DataConfig:
        if self.format in TEXT_FORMATS and self.packing not in (None, "naive"):
            raise ValueError(f"packing: '{self.packing}' is for the example formats ({', '.join(EXAMPLE_FORMATS)}); "
                             f"raw text is packed naively")
        if "{instruction}" not in self.prompt_template:
            raise ValueError("prompt_template: it must contain {instruction}")
        return self

    @property
    def has_examples(self) -> bool:
        """Prompt/response examples (the loss on responses only), rather than raw text."""
        return self.format in EXAMPLE_FORMATS

    @property
    def packing_mode(self) -> str:
        return self.packing or ("document" if self.has_examples else "naive")


class ZeroConfig(_Section):
    """DeepSpeed ZeRO settings beyond the stage (`train.zero_stage`); each maps onto the generated
    `zero_optimization` section. None keeps DeepSpeed's default."""

    # Optimizer state (ZeRO >= 1) and parameters (ZeRO-3) moved off the GPU, to CPU memory or NVMe.
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None  # a local directory on every node, for nvme offload
    overlap_comm: bool | None = None  # overlap gradient reduction with the backward pass
    reduce_bucket_size: int | None = Field(None, ge=1)  # elements per gradient reduction
    allgather_bucket_size: int | None = Field(None, ge=1)  # elements per parameter all-gather (ZeRO 1-2)
    # ZeRO-3: gather the 16-bit weights when saving (a consolidated model without zero_to_fp32).
    gather_16bit_weights_on_model_save: bool = False


class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1)
    # When set, Ray Train may run (and restart after losing a node) with any worker count from this
    # up to num_workers; the run stays the same run (global_batch_size is then required).
    min_workers: int | None = Field(None, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    # Further Ray resources each worker reserves (custom resources, accelerator types); not CPU/GPU.
    resources_per_worker: dict[str, float] = {}
    # Torch intra-op threads per worker; None shares this machine's cores evenly between workers.
    threads_per_worker: int | None = Field(None, ge=1)
    zero_stage: int = Field(2, ge=0, le=3)
    zero: ZeroConfig = ZeroConfig()
    # Recompute each block's activations in the backward pass: less memory for ~30% more compute.
    gradient_checkpointing: bool = False
    # Merged over the generated DeepSpeed config last: any DeepSpeed setting without a field here.
    deepspeed: dict[str, Any] = {}
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    micro_batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)
    # Samples per optimizer step over all workers. When set, grad_accum follows from it (it must be
    # divisible by num_workers x micro_batch_size), so it stays fixed when the worker count changes.
    global_batch_size: int | None = Field(None, ge=1)
    max_ticks: int = Field(50, ge=1)
    lr: float = Field(5e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_ticks: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    shuffle: bool = True
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # ticks; 0 = only before and after training
    eval_batches: int = Field(8, ge=1)  # micro batches per worker per evaluation (bounds eval cost)
    checkpoint_every: int = Field(0, ge=0)  # ticks; 0 = only the final checkpoint
    keep_checkpoints: int = Field(2, ge=1)  # the newest K; a corrupt newest one falls back to the next
    # Worker-group restarts from the last checkpoint after a worker dies (preemption, OOM kill);
    # -1 = unlimited. 0 fails the run on the first loss, which is what local iteration wants.
    max_failures: int = Field(0, ge=-1)
    log_every: int = Field(1, ge=1)
    output_dir: str = "outputs"
    # How long a run waits for the cluster to provide its workers (e.g. while an autoscaler adds GPU
    # nodes), saying what it waits for, before it fails.
    resources_timeout_s: float = Field(900, gt=0)
    # The exported model's safetensors shards, in MiB: the export holds about one shard in memory.
    export_shard_mb: int = Field(2000, ge=1)
    resume_from: str | None = None  # a checkpoint directory (`pipeline train --resume`)

    @model_validator(mode="after")
    def _check_zero(self) -> TrainConfig:
        if {"CPU", "GPU"} & set(self.resources_per_worker):
            raise ValueError("resources_per_worker: CPU and GPU come from train.cpus_per_worker and train.use_gpu")
        zero = self.zero
        if zero.offload_params != "none" and self.zero_stage != 3:
            raise ValueError(f"zero: offload_params needs zero_stage 3 (it is {self.zero_stage})")
        if zero.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("zero: offload_optimizer needs zero_stage 1, 2 or 3")
        if "nvme" in (zero.offload_optimizer, zero.offload_params) and not zero.nvme_path:
            raise ValueError("zero: nvme offload needs nvme_path, a local directory on every node")
        if (zero.offload_optimizer, zero.offload_params) != ("none", "none") and not self.use_gpu:
            raise ValueError("zero: offload moves GPU state to CPU or NVMe; with use_gpu false it is in CPU memory already")
        if zero.gather_16bit_weights_on_model_save and self.zero_stage != 3:
            raise ValueError("zero: gather_16bit_weights_on_model_save is a ZeRO-3 setting")
        return self

    @model_validator(mode="after")
    def _check_global_batch(self) -> TrainConfig:
        if self.min_workers is not None:
            if self.min_workers > self.num_workers:
                raise ValueError(f"min_workers: {self.min_workers} is more than num_workers ({self.num_workers})")
            if self.global_batch_size is None:
                raise ValueError("min_workers: set global_batch_size too, so that the global batch stays the same "
                                 "whatever the number of workers")
            for workers in range(self.min_workers, self.num_workers + 1):
                if self.global_batch_size % (workers * self.micro_batch_size):
                    raise ValueError(f"global_batch_size: {self.global_batch_size} is not divisible by {workers} workers "
                                     f"x micro_batch_size {self.micro_batch_size}, a worker count min_workers allows")
        if self.global_batch_size is not None:
            per_step = self.num_workers * self.micro_batch_size
            if self.global_batch_size % per_step:
                raise ValueError(f"global_batch_size: {self.global_batch_size} is not divisible by num_workers x "
                                 f"micro_batch_size ({self.num_workers} x {self.micro_batch_size} = {per_step})")
            if self.grad_accum != 1 and self.grad_accum != self.global_batch_size // per_step:
                raise ValueError(f"grad_accum: {self.grad_accum} contradicts global_batch_size "
                                 f"{self.global_batch_size}; set only one of them")
        return self

    @property
    def accum_steps(self) -> int:
        """Micro batches per worker per optimizer step."""
        if self.global_batch_size is None:
            return self.grad_accum
        return self.global_batch_size // (self.num_workers * self.micro_batch_size)

    @property
    def samples_per_tick(self) -> int:
        return self.micro_batch_size * self.accum_steps * self.num_workers


class NoiseConfig(_Section):
    """Training noise at one or two sites: σ_t·ε inside every fused norm, σ_t = sigma·(1+tick)^(−decay),
    and NEFTune's uniform noise on the input embedding. Both are drawn from Philox keyed by (seed, tick,
    layer) and positions, so they are the same on any number of workers and after a resume."""

    # Where noise goes. norm: the fused norms only (sigma); embedding: the input embedding only
    # (neftune_alpha), and then sigma must be 0; both: each site with its own setting.
    site: Literal["norm", "embedding", "both"] = "norm"
    sigma: float = Field(0.0, ge=0)  # the norms' σ (site norm or both); 0 = off
    decay: float = Field(0.0, ge=0)  # of σ only: neftune_alpha stays constant
    seed: int = Field(0, ge=0)
    # NEFTune's α (site embedding or both; ignored for site norm): uniform noise in [−α, α)/√(L·d) on the
    # input embedding's output while training, d the hidden size and L the token's own example length
    # (each packed example its own; padding gets none and counts in no L; raw text, packed naively:
    # the block length). 5 is the paper's usual value; 0 = off.
    neftune_alpha: float = Field(5.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check_site(self) -> NoiseConfig:
        if self.site == "embedding" and self.sigma > 0:
            raise ValueError(f"sigma: {self.sigma:g} would be ignored: site 'embedding' puts noise on the input "
                             f"embedding only (neftune_alpha); set site 'both' to keep the norms' noise, or sigma 0")
        return self

    @property
    def embedding_alpha(self) -> float:
        """NEFTune's α where site puts noise on the embedding, else 0 (sigma is 0 where it puts none on norms)."""
        return self.neftune_alpha if self.site in ("embedding", "both") else 0.0


class KernelConfig(_Section):
    """Which implementation of the fused norm runs: Triton on GPUs, the torch path on CPUs."""

    backend: Literal["auto", "triton", "torch"] = "auto"


class TrackingConfig(_Section):
    uri: str | None = None  # MLFLOW_TRACKING_URI overrides it; None = sqlite under ./mlruns
    experiment: str = "finetune"
    run_name: str | None = None
    log_model: bool = True
    max_new_tokens: int = Field(32, ge=1)
    # Example formats: at every evaluation, this many held-out prompts are answered greedily and
    # logged as a table (tick, prompt, reference, generation). 0 turns it off.
    sample_prompts: int = Field(3, ge=0, le=8)
    # A tracking server that does not answer within this many seconds at start fails the run at once.
    connect_timeout_s: float = Field(10.0, gt=0)
    # At the end of training, how long buffered metrics (from a tracking outage) may take to reach
    # the server before they are written to a file beside the checkpoints instead.
    flush_timeout_s: float = Field(120.0, ge=0)


class StorageConfig(_Section):
    """Object storage (`s3://`, `gs://` locations). Credentials never go here: they come from the
    standard chains (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)."""

    # An S3-compatible store (MinIO, Ceph, R2...); None: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, or AWS itself.
    endpoint_url: str | None = None
    region: str | None = None  # None: AWS_DEFAULT_REGION, AWS_REGION, or us-east-1
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1)  # per request, with the SDK's backoff: bounds every wait on storage


class RayConfig(_Section):
    address: str | None = None  # None starts a local Ray (dashboard on 127.0.0.1)
    num_cpus: int | None = Field(None, ge=1)
    # Custom resources a local Ray declares (e.g. {"fake_gpu": 4} to test packing without GPUs).
    resources: dict[str, float] = {}


class Config(_Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    noise: NoiseConfig = NoiseConfig()
    kernel: KernelConfig = KernelConfig()
    sweep: SweepConfig = SweepConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    def with_overrides(self, overrides: list[str]) -> Config:
        return _validate(apply_overrides(self.model_dump(mode="python"), overrides))


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML file, apply `a.b=value` overrides, validate. Raises ConfigError naming the field."""
    return _validate(apply_overrides(read_yaml(Path(path)), overrides or []))


def _validate(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("config error: " + "; ".join(describe_error(e) for e in exc.errors())) from None


def describe_error(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    # A cross-field check names its field first ("grad_accum: ..."): attach it to the section's path.
    named = re.match(r"(\w+): ", message)
    if error["type"] == "value_error" and named:
        return f"{field}.{named.group(1)}: {message[named.end():]}"
    if error["type"] == "extra_forbidden":
        return f"{field}: unknown field"
    if error["type"] == "missing":
        return f"{field}: required field is missing"
    return f"{field}: {message} (got {error.get('input')!r})"


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
