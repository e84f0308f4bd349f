"""DeepSpeed config and the learning-rate schedule, generated from the typed TrainConfig."""

from __future__ import annotations

import math

from pipeline.config import TrainConfig
from pipeline.raw_config import overlay


def uses_bf16(cfg: TrainConfig) -> bool:
    # bf16 on CPUs without AVX-512 BF16 is several times slower than fp32, so CPU defaults to fp32.
    return cfg.precision == "bf16" or (cfg.precision == "auto" and cfg.use_gpu)


def deepspeed_config(cfg: TrainConfig) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.accum_steps,
        "train_batch_size": cfg.samples_per_tick,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": uses_bf16(cfg)},
        "steps_per_print": 10**9,  # progress is ours; keep DeepSpeed's periodic prints out of the log
        "wall_clock_breakdown": False,
    }
    config["zero_optimization"].update(_zero_settings(cfg))
    if cfg.use_gpu:
        # Fused GPU AdamW. On CPU the engine gets a torch.optim.AdamW object instead: DeepSpeed's CPU
        # Adam ops are compiled on first use (~1.5 min each) for no gain at these sizes.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas),
                                                          "weight_decay": cfg.weight_decay}}
    return overlay(config, cfg.deepspeed)  # train.deepspeed wins over every generated setting


def _zero_settings(cfg: TrainConfig) -> dict:
    zero = cfg.zero
    settings: dict = {}
    for key, value in (("overlap_comm", zero.overlap_comm), ("reduce_bucket_size", zero.reduce_bucket_size),
                       ("allgather_bucket_size", zero.allgather_bucket_size)):
        if value is not None:
            settings[key] = value
    for key, device in (("offload_optimizer", zero.offload_optimizer), ("offload_param", zero.offload_params)):
        if device != "none":
            settings[key] = {"device": device, "pin_memory": True,
                             **({"nvme_path": zero.nvme_path} if device == "nvme" else {})}
    if zero.gather_16bit_weights_on_model_save:
        settings["stage3_gather_16bit_weights_on_model_save"] = True
    return settings


def lr_multiplier(cfg: TrainConfig, total_ticks: int):
    """Multiplier of lr for the optimizer step taken at `tick` (0-based): linear warmup to lr, then
    cosine down to exactly min_lr_ratio * lr at the last step (tick total_ticks - 1)."""

    def multiplier(tick: int) -> float:
        if tick < cfg.warmup_ticks:
            return (tick + 1) / (cfg.warmup_ticks + 1)
        span = max(1, total_ticks - 1 - cfg.warmup_ticks)
        progress = min(1.0, (tick - cfg.warmup_ticks) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
