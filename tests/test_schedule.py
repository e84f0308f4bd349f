import math

import pytest

from pipeline.config import TrainConfig
from pipeline.train.clock import TickClock
from pipeline.train.schedule import deepspeed_config, lr_multiplier


def test_warmup_then_cosine_ends_exactly_at_min_lr():
    cfg = TrainConfig(warmup_ticks=2, min_lr_ratio=0.1, max_ticks=7)
    multiplier = lr_multiplier(cfg, cfg.max_ticks)
    values = [multiplier(tick) for tick in range(cfg.max_ticks)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[-1] == pytest.approx(0.1)  # the last optimizer step uses min_lr_ratio x lr
    assert values[2:] == sorted(values[2:], reverse=True)
    assert values[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_deepspeed_config_follows_the_typed_config():
    cpu = deepspeed_config(TrainConfig(micro_batch_size=3, grad_accum=2, num_workers=2, zero_stage=3, grad_clip=0.5))
    assert cpu["train_batch_size"] == 12 and cpu["gradient_accumulation_steps"] == 2
    assert cpu["zero_optimization"]["stage"] == 3 and cpu["gradient_clipping"] == 0.5
    assert cpu["bf16"]["enabled"] is False and "optimizer" not in cpu  # fp32 and a torch AdamW on CPU
    gpu = deepspeed_config(TrainConfig(use_gpu=True, lr=2e-4))
    assert gpu["bf16"]["enabled"] is True and gpu["optimizer"]["params"]["lr"] == 2e-4
    assert deepspeed_config(TrainConfig(use_gpu=True, precision="fp32"))["bf16"]["enabled"] is False


def test_tick_advances_once_per_accumulated_step_and_round_trips():
    clock = TickClock()
    completed = [clock.micro_step_done(grad_accum=3) for _ in range(7)]
    assert completed == [False, False, True, False, False, True, False]
    assert clock.tick == 2 and clock.micro_step == 1
    restored = TickClock()
    restored.load_state_dict(clock.state_dict())
    assert restored == clock
