"""Baselines for bench/train_step.py: a bare DDP loop and the DeepSpeed engine the pipeline builds,
launched with torchrun (2 processes, gloo, no Ray), and the stock loop a user would write instead
(`stock`: the model's own HF norms, AdamW handed to deepspeed.initialize, ZeRO-2, clipping 1.0, as
in Ray's deepspeed_finetune example), which train_step.py runs inside Ray Train. Same HF model,
batch shape and gradient clipping as the pipeline; the loss is averaged over ranks every step, as
the pipeline does.

    torchrun --nproc_per_node 2 bench/torchrun_loop.py {ddp|deepspeed|stock} MODEL_DIR MICRO SEQ STEPS WARMUP OUT
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(mode: str, model, micro_batch: int):
    """Returns step(input_ids) -> loss for the chosen loop."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)

        def ddp_step(input_ids):
            loss = ddp(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return ddp_step
    import deepspeed

    from pipeline.config import TrainConfig
    from pipeline.train.schedule import deepspeed_config

    if mode == "stock":
        config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}, "steps_per_print": 10**9}
    else:
        config = deepspeed_config(TrainConfig(micro_batch_size=micro_batch, zero_stage=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config=config)

    def deepspeed_step(input_ids):
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        return loss

    return deepspeed_step


def timed_steps(mode: str, model_dir: str, micro_batch: int, seq_len: int, steps: int, warmup: int) -> list[float]:
    """Seconds of each step after warm-up, on an initialized process group."""
    from transformers import AutoModelForCausalLM

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    step = build(mode, model, micro_batch)
    generator = torch.Generator().manual_seed(rank)
    times = []
    for index in range(warmup + steps):
        input_ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len), generator=generator)
        started = time.perf_counter()
        reported = step(input_ids).detach().clone()
        dist.all_reduce(reported)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def main(mode: str, model_dir: str, micro_batch: int, seq_len: int, steps: int, warmup: int, out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    times = timed_steps(mode, model_dir, micro_batch, seq_len, steps, warmup)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"median_s": statistics.median(times), "times": times}))
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, model_dir, micro, seq, steps, warmup, out = sys.argv[1:8]
    main(mode, model_dir, int(micro), int(seq), int(steps), int(warmup), out)
