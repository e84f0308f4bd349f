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


def test_zero_settings_and_extra_deepspeed_keys_reach_the_generated_config():
    cfg = TrainConfig(use_gpu=True, zero_stage=3, deepspeed={"zero_optimization": {"sub_group_size": 1000},
                                                             "gradient_clipping": 0.3, "flops_profiler": {"enabled": True}},
                      zero={"offload_optimizer": "cpu", "offload_params": "nvme", "nvme_path": "/local/nvme",
                            "overlap_comm": True, "reduce_bucket_size": 5e8, "gather_16bit_weights_on_model_save": True})
    zero = deepspeed_config(cfg)["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 5e8
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/local/nvme"}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["sub_group_size"] == 1000  # train.deepspeed is merged in, key by key
    merged = deepspeed_config(cfg)
    assert merged["gradient_clipping"] == 0.3 and merged["flops_profiler"] == {"enabled": True}  # and wins
    assert "overlap_comm" not in deepspeed_config(TrainConfig())["zero_optimization"]  # unset: DeepSpeed's default


@pytest.mark.parametrize("settings, message", [
    ({"zero_stage": 2, "use_gpu": True, "zero": {"offload_params": "cpu"}}, "offload_params needs zero_stage 3"),
    ({"zero_stage": 0, "use_gpu": True, "zero": {"offload_optimizer": "cpu"}}, "offload_optimizer needs zero_stage 1"),
    ({"zero_stage": 3, "use_gpu": True, "zero": {"offload_params": "nvme"}}, "nvme offload needs nvme_path"),
    ({"zero_stage": 2, "zero": {"offload_optimizer": "cpu"}}, "with use_gpu false it is in CPU memory already"),
    ({"zero_stage": 2, "zero": {"gather_16bit_weights_on_model_save": True}}, "is a ZeRO-3 setting"),
])
def test_zero_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_tick_advances_once_per_accumulated_step_and_round_trips():
    clock = TickClock()
    completed = [clock.micro_step_done(grad_accum=3) for _ in range(7)]
    assert completed == [False, False, True, False, False, True, False]
    assert clock.tick == 2 and clock.micro_step == 1
    restored = TickClock()
    restored.load_state_dict(clock.state_dict())
    assert restored == clock
