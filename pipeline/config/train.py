"""The `train:` section: workers and their resources, DeepSpeed ZeRO, batch, schedule, checkpoints."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.section import Section


class ZeroConfig(Section):
    """DeepSpeed ZeRO settings beyond the stage (`train.zero_stage`); each maps onto the generated
    `zero_optimization` section. None keeps DeepSpeed's default."""

    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Move the optimizer state (stage >= 1) off the GPU, to CPU memory or NVMe (GPU runs only)."""
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    """Move the parameters (stage 3) off the GPU, to CPU memory or NVMe (GPU runs only)."""
    nvme_path: str | None = None
    """For `nvme` offload: a local directory on every node."""
    overlap_comm: bool | None = None
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int | None = Field(None, ge=1)
    """Elements per gradient reduction."""
    allgather_bucket_size: int | None = Field(None, ge=1)
    """Elements per parameter all-gather (ZeRO 1-2)."""
    gather_16bit_weights_on_model_save: bool = False
    """ZeRO-3: gather the 16-bit weights when saving (a consolidated model without zero_to_fp32)."""


class TrainConfig(Section):
    """Ray Train workers and their resources, DeepSpeed, the batch, the optimizer and its schedule,
    evaluation, checkpoints and the exported model."""

    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one process each)."""
    min_workers: int | None = Field(None, ge=1)
    """A worker range: Ray Train starts (and restarts after losing a node) with any count from this to
    `num_workers` that fits. Needs `global_batch_size`, so that every count trains the same run."""
    use_gpu: bool = False
    """nccl and a GPU per worker; CPU workers use gloo."""
    cpus_per_worker: float = Field(0.5, gt=0)
    """Ray CPU request per worker; below 1 so that two workers (and a sweep's trial drivers) fit a
    2-core machine."""
    resources_per_worker: dict[str, float] = {}
    """Further Ray resources each worker reserves (custom resources, `accelerator_type:...`); CPU and
    GPU come from `cpus_per_worker` and `use_gpu`."""
    threads_per_worker: int | None = Field(None, ge=1)
    """Torch intra-op threads per worker; none shares this machine's cores evenly between its workers."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage."""
    zero: ZeroConfig = ZeroConfig()
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory for more compute
    (SmolLM2 4 × 256: 0.73x peak memory, 1.42x time; the same losses, noise included)."""
    deepspeed: dict[str, Any] = {}
    """Merged over the generated DeepSpeed config last: any DeepSpeed setting without a field here."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 on GPU, fp32 on CPU."""
    micro_batch_size: int = Field(2, ge=1)
    """Samples per worker per micro step; the global batch is micro × accumulation × workers."""
    grad_accum: int = Field(1, ge=1)
    """Micro steps accumulated per optimizer step (follows from `global_batch_size` when that is set)."""
    global_batch_size: int | None = Field(None, ge=1)
    """Samples per optimizer step (tick) over all workers. When set, accumulation follows from it (it
    must be divisible by `num_workers` × `micro_batch_size`), so it stays fixed when the worker count
    changes."""
    max_ticks: int = Field(50, ge=1)
    """Optimizer steps (ticks) to train."""
    lr: float = Field(5e-5, gt=0)
    """AdamW's peak learning rate, after a linear warmup; then cosine to `min_lr_ratio` × `lr`."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Where the cosine schedule ends, as a fraction of `lr`."""
    warmup_ticks: int = Field(5, ge=0)
    """Ticks of linear warmup to `lr`."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas."""
    grad_clip: float = Field(1.0, ge=0)
    """The gradient norm is clipped to this."""
    shuffle: bool = True
    """A fresh permutation of the training blocks every epoch, keyed by (`seed`, epoch); the same on
    any number of workers (see "Sample order")."""
    seed: int = 0
    """Keys the sample order and seeds torch's RNG on every rank (LoRA's adapter init, its dropout)."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every N ticks; 0: only before and after training."""
    eval_batches: int = Field(8, ge=1)
    """Micro batches per worker per evaluation (bounds its cost): the eval split's first
    `eval_batches` × micro batch × workers blocks, split between the ranks."""
    checkpoint_every: int = Field(0, ge=0)
    """Checkpoint every N ticks; 0: only the final checkpoint."""
    keep_checkpoints: int = Field(2, ge=1)
    """Keep the newest K checkpoints; a corrupt newest one falls back to the next."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts from the last checkpoint after a worker dies (preemption, OOM kill); -1:
    unlimited (the cluster job specs use 3). 0 fails the run on the first loss, which is what local
    iteration wants."""
    log_every: int = Field(1, ge=1)
    """Console and MLflow metrics every N ticks."""
    output_dir: str = "outputs"
    """Ray Train storage (`outputs/ray/`) and exported models (`outputs/<run>/model`); local or a URI
    (required by Ray Train on more than one node, unless shared)."""
    resources_timeout_s: float = Field(900, gt=0)
    """How long a run waits for its workers' resources (e.g. while an autoscaler adds GPU nodes),
    saying every 30 s what it waits for, before it fails in one line."""
    export_shard_mb: int = Field(2000, ge=1)
    """The exported model's safetensors shards, in MiB; the export, a Ray task that declares the memory
    it needs, holds about one shard."""
    resume_from: str | None = None
    """A checkpoint directory, or a run's storage directory (its newest valid checkpoint), local or a
    URI, to continue from (`pipeline train --resume DIR`): tick, weights, optimizer and scheduler. The
    data position follows from the tick (nothing is replayed), and a checkpoint from another number of
    workers is converted (see "Sample order")."""

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
