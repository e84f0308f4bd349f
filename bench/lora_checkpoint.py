"""LoRA against full fine-tuning of SmolLM2-135M: the checkpoint's size, what trains, the time per tick.

Each variant trains two ticks of configs/demo.yaml in this process (one rank, no Ray for training:
`pipeline.train.local`), writes its final checkpoint, and is timed in process (build the engine to
the checkpoint written) and, once more each, as a whole process (interpreter and imports included).

    .venv/bin/python bench/lora_checkpoint.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runtime
from pipeline.config import load_config
from pipeline.locations import location_overrides

REPO = Path(__file__).resolve().parents[1]
runtime.quiet_ray_environment()  # an entry point: before anything imports Ray
VARIANTS = {"full fine-tuning": ["model.lora=null"],
            "LoRA r=8, all linear layers": ["model.lora.r=8", "model.lora.alpha=16"]}


def config(tmp: Path, *overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", [
        *location_overrides(tmp), "model.cache_dir=.cache/pipeline/models", "data.cache_dir=.cache/pipeline/data",
        "train.num_workers=1", "train.micro_batch_size=2", "train.max_ticks=2", "train.eval_batches=1",
        "tracking.log_model=false", *overrides])


def train(tmp: Path, overrides: list[str]) -> tuple[float, int, int]:
    """(seconds, checkpoint bytes, trainable parameters) of one in-process run."""
    from pipeline.data import prepare
    from pipeline.models.lora import parameter_counts
    from pipeline.train.local import train_in_process
    from pipeline.train.rank import WorkerPlan, build_model

    cfg = config(tmp, *overrides)
    model_ref, data = prepare(cfg)
    started = time.perf_counter()
    reporter = train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / "run")))
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in Path(reporter.checkpoints[-1]).rglob("*") if p.is_file())
    trainable, _ = parameter_counts(build_model(cfg, model_ref)[0])
    return seconds, size, trainable


def whole_process(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import lora_checkpoint as b; "
                f"b.train(Path({tmp!r}), {overrides!r})")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    import ray

    rows = {}
    for name, overrides in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            rows[name] = train(Path(tmp), overrides)
    ray.shutdown()
    whole = {name: whole_process(overrides) for name, overrides in VARIANTS.items()}
    full_seconds, full_size, _ = rows["full fine-tuning"]
    print(f"{'variant':30} {'trainable':>12} {'checkpoint':>12} {'x full':>7} {'in process':>11} {'whole':>8}")
    for name, (seconds, size, trainable) in rows.items():
        print(f"{name:30} {trainable:>12,} {size / 2**20:>9.1f} MiB {size / full_size:>6.3f}x "
              f"{seconds:>9.1f} s {whole[name]:>6.1f} s")
    print(f"in-process time, LoRA against full: {rows[list(VARIANTS)[1]][0] / full_seconds:.2f}x; "
          f"whole process: {whole[list(VARIANTS)[1]] / whole['full fine-tuning']:.2f}x")


if __name__ == "__main__":
    main()
