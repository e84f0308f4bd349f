"""Memory of exporting a trained checkpoint as a HF model: the consolidation the pipeline used before
(every weight rebuilt in fp32 in memory, then a model loaded to receive them, then save_pretrained)
against the sharded export (`pipeline.train.export`: one tensor and one shard in memory at a time).

A ~150M-parameter Llama built from config trains one tick in this process (ZeRO-2 and ZeRO-3), and
each export runs in a fresh process. Reported: peak RSS above the process's baseline (file pages
included, such as the memory-mapped optimizer states), peak private memory (RssAnon, sampled every
millisecond), seconds, and the ratio to the largest shard written. Target: <= 1.5 x the largest shard.

    .venv/bin/python bench/export_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SHARD_MB = 100
WIDER = ("model.architecture.hidden_size=1024", "model.architecture.intermediate_size=2816",
         "model.architecture.num_hidden_layers=12", "model.architecture.num_attention_heads=16",
         "model.architecture.num_key_value_heads=8")


def status_mib(field: str) -> float:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) / 1024


def measure(mode: str, checkpoint: str, model_ref: str, out: str) -> dict:
    """In a fresh process: one export, its peaks above this process's baseline."""
    import deepspeed.utils.zero_to_fp32  # noqa: F401  (imports, for both exports, before the baseline)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from pipeline.train.export import export_model

    Path("/proc/self/clear_refs").write_text("5")
    baseline, private_baseline = status_mib("VmRSS"), status_mib("RssAnon")
    peak = {"private": private_baseline}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            peak["private"] = max(peak["private"], status_mib("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    if mode == "sharded":
        export_model(checkpoint, model_ref, out, torch.float32, SHARD_MB * 2**20)
    else:
        consolidate_in_memory(checkpoint, model_ref, Path(out))
    seconds = time.perf_counter() - started
    stop.set()
    largest = max(p.stat().st_size for p in Path(out).glob("*.safetensors")) / 2**20
    return {"mode": mode, "rss_mib": status_mib("VmHWM") - baseline, "private_mib": peak["private"] - private_baseline,
            "seconds": seconds, "largest_shard_mib": largest}


def consolidate_in_memory(checkpoint: str, model_ref: str, out: Path) -> None:
    """The export as it was before: the whole fp32 state dict, a loaded model, save_pretrained."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.models import load_causal_lm

    tag = (Path(checkpoint) / "pipeline_tag").read_text().strip()
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=tag)
    model = load_causal_lm(model_ref)
    model.load_state_dict(state, strict=False)
    model.save_pretrained(out)


def train_checkpoint(tmp: Path, stage: int) -> tuple[str, str]:
    """One tick of the wide model in this process at ZeRO `stage`; (checkpoint, model reference)."""
    from pipeline.data import prepare
    from pipeline.runtime import ensure_ray
    from pipeline.train.local import train_in_process
    from pipeline.train.rank import WorkerPlan

    from conftest import tiny_config

    overrides = ("train.num_workers=1", "train.micro_batch_size=1", "train.max_ticks=1", "train.eval_batches=1",
                 f"train.zero_stage={stage}", *WIDER)
    cfg = tiny_config(tmp, *overrides)
    ensure_ray(cfg.ray, dashboard=False)
    model_ref, data = prepare(cfg)
    reporter = train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / f"run-{stage}")))
    return reporter.checkpoints[-1], model_ref


def main() -> None:
    import ray

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        from conftest import SHARED_CACHES

        SHARED_CACHES[:] = [f"model.cache_dir={tmp / 'models'}", f"data.cache_dir={tmp / 'data'}"]
        checkpoints = {stage: train_checkpoint(tmp, stage) for stage in (2, 3)}
        ray.shutdown()
        for stage, (checkpoint, model_ref) in checkpoints.items():
            size = sum(p.stat().st_size for p in Path(checkpoint).rglob("*.pt")) / 2**20
            for mode in ("in memory (before)", "sharded"):
                out = tmp / f"export-{stage}-{mode.split()[0]}"
                code = f"import export_memory as e, json; print(json.dumps(e.measure({mode.split()[0]!r}, " \
                       f"{checkpoint!r}, {model_ref!r}, {str(out)!r})))"
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", code], cwd=REPO / "bench", capture_output=True, text=True,
                                      check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({**row, "stage": stage, "checkpoint_mib": size, "process_s": time.perf_counter() - started,
                             "mode": mode})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| ZeRO | checkpoint | export | peak RSS | peak private | largest shard | private / shard | export s "
          "| whole process s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['checkpoint_mib']:.0f} MiB | {r['mode']} | {r['rss_mib']:.0f} MiB "
              f"| {r['private_mib']:.0f} MiB | {r['largest_shard_mib']:.0f} MiB "
              f"| {r['private_mib'] / r['largest_shard_mib']:.2f}x | {r['seconds']:.1f} | {r['process_s']:.1f} |")


if __name__ == "__main__":
    main()
