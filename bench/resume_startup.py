"""Resume start-up at tick 10 against tick 1,000 on the same data: the sample order is addressed by
tick, so a resume starts reading at its tick instead of replaying what was trained before it.

Two tiny runs (in this process, without Ray: `pipeline.train.local`) write a checkpoint at tick 10
and at tick 1,000; each is then resumed for one more tick and timed, in process (build the engine,
load the checkpoint, the first tick) and as a whole process (interpreter and imports included).

    .venv/bin/python bench/resume_startup.py
"""

from __future__ import annotations

import statistics
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
REPEATS = 3


def config(tmp: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        *location_overrides(tmp), "train.num_workers=1", "train.micro_batch_size=8", "train.eval_every=0",
        "train.eval_batches=1", "noise.sigma=0.1", *overrides])


def resume(tmp: Path, checkpoint: str, tick: int) -> tuple[float, int]:
    """Seconds to resume `checkpoint` and train one tick, and the samples it read."""
    from pipeline.data import prepare
    from pipeline.train.local import train_in_process
    from pipeline.train.rank import WorkerPlan

    cfg = config(tmp, f"train.max_ticks={tick + 1}", f"train.resume_from={checkpoint}")
    model_ref, data = prepare(cfg)  # a cache hit: no Ray
    started = time.perf_counter()
    reporter = train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / f"resumed-{tick}-{time.time_ns()}")))
    return time.perf_counter() - started, reporter.samples_read


def whole_process(tmp: Path, checkpoint: str, tick: int) -> float:
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import resume_startup as r; from pathlib import Path; "
            f"r.resume(Path({str(tmp)!r}), {checkpoint!r}, {tick})")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    from pipeline.data import prepare
    from pipeline.train.local import train_in_process
    from pipeline.train.rank import WorkerPlan

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoints = {}
        for tick in (10, 1000):
            cfg = config(tmp, f"train.max_ticks={tick}")
            model_ref, data = prepare(cfg)
            started = time.perf_counter()
            checkpoints[tick] = train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / f"run-{tick}"))).checkpoints[-1]
            print(f"trained to tick {tick} in {time.perf_counter() - started:.1f} s", flush=True)
        import ray

        ray.shutdown()
        in_process = {tick: [] for tick in checkpoints}
        whole = {tick: [] for tick in checkpoints}
        for _ in range(REPEATS):  # interleaved, so drift on the machine hits both alike
            for tick, checkpoint in checkpoints.items():
                seconds, read = resume(tmp, checkpoint, tick)
                assert read == 8, read  # one tick of 8 samples: nothing before the resumed tick
                in_process[tick].append(seconds)
                whole[tick].append(whole_process(tmp, checkpoint, tick))
    print(f"resume + one tick, median of {REPEATS}:")
    for name, figures in (("in process", in_process), ("whole process", whole)):
        at_10, at_1000 = statistics.median(figures[10]), statistics.median(figures[1000])
        print(f"  {name:13s} tick 10: {at_10:.2f} s   tick 1,000: {at_1000:.2f} s   ratio {at_1000 / at_10:.2f}x "
              "(target: within 10%)")


if __name__ == "__main__":
    main()
