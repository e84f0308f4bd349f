"""The baseline for bench/train_step.py: a bare torchrun DDP loop (gloo) over the same HF model,
batch shape, optimizer and clipping as the pipeline. Launched by train_step.py with torchrun."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main(model_dir: str, micro_batch: int, seq_len: int, steps: int, warmup: int, out: str) -> None:
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(rank)
    times = []
    for step in range(warmup + steps):
        input_ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=generator)
        started = time.perf_counter()
        loss = ddp(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach().clone()
        dist.all_reduce(reported)  # the pipeline also averages the loss over ranks every tick
        if step >= warmup:
            times.append(time.perf_counter() - started)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"median_s": statistics.median(times), "times": times}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    model_dir, micro, seq, steps, warmup, out = sys.argv[1:7]
    main(model_dir, int(micro), int(seq), int(steps), int(warmup), out)
