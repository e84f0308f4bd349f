"""What `train.gradient_checkpointing` saves on SmolLM2-135M: peak RSS of one forward + backward
(batch 4 x 256, fp32, σ = 0.05 noise, the fused norms) with and without it, each in a fresh
process, and the bytes autograd keeps for the backward pass.

    .venv/bin/python bench/activation_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
BATCH, SEQ = 4, 256


def measure(model_cache: str, checkpointing: bool) -> dict:
    """In this process: build the model as a rank does, then one noisy forward + backward."""
    import resource
    import time

    import torch

    from pipeline.config import load_config
    from pipeline.models import materialize_model
    from pipeline.noise import NoiseContext, noise_context
    from pipeline.train.rank import build_model

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.cache_dir={model_cache}",
                                                       f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    model, _ = build_model(cfg, materialize_model(cfg.model))
    model.train()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    input_ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    kept = 0

    def pack(tensor):
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    started = time.perf_counter()
    context = NoiseContext(sigma=0.05, seed=0, tick=0, sample_ids=torch.arange(BATCH))
    with noise_context(context):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    return {"seconds": time.perf_counter() - started, "loss": float(loss), "kept_mib": kept / 2**20,
            "baseline_mib": baseline, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); "
                        f"import activation_memory as a; a.measure({tmp!r}, False)"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # converts the GGUF once
        runs = {}
        for checkpointing in (False, True):
            code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'bench')!r}); import activation_memory as a; "
                    f"print(json.dumps(a.measure({tmp!r}, {checkpointing})))")
            done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            runs[checkpointing] = json.loads(done.stdout.strip().splitlines()[-1])
    plain, checkpointed = runs[False], runs[True]
    print(f"SmolLM2-135M, batch {BATCH} x {SEQ}, fp32, one forward + backward with noise:")
    for name, run in (("without", plain), ("with", checkpointed)):
        print(f"  {name:7s} gradient checkpointing: kept for backward {run['kept_mib']:7.1f} MiB, peak RSS "
              f"{run['peak_mib']:7.1f} MiB (above the loaded model: {run['peak_mib'] - run['baseline_mib']:7.1f} MiB), "
              f"{run['seconds']:.1f} s, loss {run['loss']:.5f}")
    print(f"  saved: {plain['kept_mib'] - checkpointed['kept_mib']:.1f} MiB kept for backward "
          f"({checkpointed['kept_mib'] / plain['kept_mib']:.2f}x), peak RSS above the model "
          f"{(checkpointed['peak_mib'] - checkpointed['baseline_mib']) / (plain['peak_mib'] - plain['baseline_mib']):.2f}x, "
          f"time {checkpointed['seconds'] / plain['seconds']:.2f}x")


if __name__ == "__main__":
    main()
