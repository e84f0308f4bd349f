"""One-shot GPU check (one CUDA device, under 8 minutes): prints one table of what the CPU machines
cannot show.

1. The Triton kernels against the float64 definition on CUDA: LayerNorm and RMSNorm, fp32 and bf16,
   σ = 0 and σ > 0, odd shapes and hidden sizes up to 16384; outputs and all gradients.
2. The Philox integers drawn on the GPU against the CPU reference, bit for bit (normals to 1e-5:
   the GPU's Box-Muller uses approximate sqrt/log).
3. GB/s of forward and forward+backward against torch.nn.LayerNorm (and Liger when installed), as a
   fraction of measured copy bandwidth (bench/norm.py's measurement).
4. A 20-tick ZeRO-2 bf16 run of configs/tiny.yaml through Ray Train on 1 GPU with DeepSpeed's fused
   Adam: finishes, loss falls, eval loss before/after.
5. GPU memory of ZeRO-3 loading (item 1 of the big-models issue) on this one device: peak allocated
   while loading SmolLM2 whole (`load_causal_lm` + `zero.Init(module=...)`) and partitioned.

    python bench/gpu_check.py            # on a machine with a CUDA GPU and the CUDA build of torch
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))  # the kernel tests' inputs, reference and Philox kernel, reused

import torch  # noqa: E402

ROWS: list[tuple[str, str, str]] = []  # (check, result, verdict)


def record(check: str, result: str, ok: bool | None) -> None:
    ROWS.append((check, result, "n/a" if ok is None else ("ok" if ok else "FAIL")))
    print(f"[gpu_check] {check}: {result}", flush=True)


def check_kernels() -> None:
    """Inputs and the float64 definition from tests/test_kernels.py, on the CPU; the kernels on CUDA."""
    import dataclasses

    from test_kernels import make_inputs, reference

    from pipeline.kernels import layer_norm, rms_norm

    worst = {}
    for shape in [(3, 7, 33), (5, 1000), (2, 3, 4099), (64, 8192), (16, 16384)]:
        for dtype in (torch.float32, torch.bfloat16):
            for sigma in (0.0, 0.3):
                for is_rms in (False, True):
                    x, w, b, noise = make_inputs(shape, is_rms, sigma, dtype)
                    up = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
                    leaves = [t.detach().cuda().requires_grad_() for t in (x, w, b) if t is not None]
                    on_gpu = dataclasses.replace(noise, row_ids=noise.row_ids.cuda()) if noise else None
                    y = (rms_norm(leaves[0], leaves[1], 1e-6, noise=on_gpu, backend="triton") if is_rms
                         else layer_norm(leaves[0], leaves[1], leaves[2], 1e-5, noise=on_gpu, backend="triton"))
                    got = [y, *torch.autograd.grad(y, leaves, up.cuda())]
                    exact = [t.detach().double().requires_grad_() for t in (x, w, b) if t is not None]
                    want_y = reference(exact[0], exact[1], exact[2] if len(exact) > 2 else None,
                                       1e-6 if is_rms else 1e-5, is_rms, noise)
                    want = [want_y, *torch.autograd.grad(want_y, exact, up.double())]
                    tolerance = 2e-5 if dtype == torch.float32 else 1.6e-2  # bf16: 2 ulps of 2^-7
                    for name, a, e in zip(("y", "dx", "dw", "db"), got, want, strict=False):
                        error = ((a.double().cpu() - e).abs().max() / max(e.abs().max().item(), 1.0)).item()
                        key = (str(dtype).removeprefix("torch."), name)
                        worst[key] = max(worst.get(key, 0.0), error / tolerance)
    for (dtype, name), ratio in sorted(worst.items()):
        record(f"triton {dtype} {name} vs float64 (worst over shapes, σ, LN/RMS)", f"{ratio:.2f} of tolerance",
               ratio <= 1.0)


def check_philox() -> None:
    import triton
    from test_noise import _triton_stream  # the interpreter test's kernel, compiled for the GPU here

    from pipeline.noise import stream_key
    from pipeline.noise.philox import philox_normal, philox_words

    counters = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**32, 2**40 + 7]),
                          torch.randint(0, 2**45, (1 << 20,), generator=torch.Generator().manual_seed(0))])
    key = stream_key(seed=1234, tick=17, layer=5)
    words = torch.zeros(2 * counters.numel(), dtype=torch.int64, device="cuda")
    normals = torch.zeros(counters.numel(), device="cuda")
    gpu_counters = counters.cuda()
    _triton_stream[(triton.cdiv(counters.numel(), 1024),)](words, normals, key, gpu_counters, counters.numel(),
                                                          BLOCK=1024)
    word0, word1 = philox_words(key, counters)
    same = torch.equal(words[0::2].cpu(), word0) and torch.equal(words[1::2].cpu(), word1)
    record("Philox integers on the GPU vs the CPU reference (1M counters)", "bit-identical" if same else "differ", same)
    error = (philox_normal(key, counters) - normals.cpu()).abs().max().item()
    record("Philox normals on the GPU vs the CPU reference", f"max |diff| {error:.1e}", error <= 1e-5)


def check_bandwidth() -> None:
    from norm import cuda_bandwidth

    copy_gbs, measured = cuda_bandwidth(repeats=20)
    record("copy bandwidth", f"{copy_gbs:.0f} GB/s", None)
    for r in measured:
        record(f"bf16 4096 x {r['hidden']} {r['impl']}", f"fwd {r['fwd']:.0f} GB/s ({r['fwd'] / copy_gbs:.2f}), "
               f"fwd+bwd {r['both']:.0f} GB/s ({r['both'] / copy_gbs:.2f})", None)


def check_ray_train_run() -> None:
    from pipeline.config import load_config
    from pipeline.locations import location_overrides
    from pipeline.train import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "tiny.yaml", [*location_overrides(Path(tmp)), "train.use_gpu=true",
                          "train.num_workers=1", "train.cpus_per_worker=1", "train.max_ticks=20", "train.zero_stage=2",
                          "train.precision=bf16", "train.eval_every=10", "noise.sigma=0.05", "tracking.log_model=false"])
        started = time.perf_counter()
        outcome = run_training(cfg)
        m = outcome.metrics
        record("20-tick ZeRO-2 bf16 run, Ray Train, 1 GPU, fused Adam",
               f"{time.perf_counter() - started:.0f} s; eval loss {m['eval_loss_start']:.3f} -> {m['eval_loss']:.3f}",
               m["eval_loss"] < m["eval_loss_start"])


def gpu_load_memory(loader: str) -> float:
    """Peak GPU memory allocated (MiB) while loading SmolLM2 for ZeRO-3 on this one device, in a child
    process with its own process group of one."""
    code = f"""
import os, torch, torch.distributed as dist, deepspeed
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}")
dist.init_process_group("nccl", rank=0, world_size=1)
torch.cuda.set_device(0)
from pipeline.config import load_config
from pipeline.models import materialize_model, load_causal_lm
from pipeline.train.partitioned import load_partitioned_causal_lm
cfg = load_config({str(REPO / 'configs' / 'demo.yaml')!r}, [])
ref = materialize_model(cfg.model)
ds = {{"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3}},
      "bf16": {{"enabled": True}}}}
torch.cuda.reset_peak_memory_stats()
if {loader!r} == "partitioned":
    load_partitioned_causal_lm(ref, ds)
else:
    deepspeed.zero.Init(module=load_causal_lm(ref), config_dict_or_path=ds)
print("PEAK", torch.cuda.max_memory_allocated() / 2**20)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK")]
    if not lines:
        raise RuntimeError(done.stderr[-1500:])
    return float(lines[-1].split()[1])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_load_memory() -> None:
    whole, partitioned = gpu_load_memory("whole"), gpu_load_memory("partitioned")
    record("ZeRO-3 load of SmolLM2 on 1 GPU, peak GPU memory", f"whole {whole:.0f} MiB, partitioned "
           f"{partitioned:.0f} MiB (bf16 model: 257 MiB)", None)


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check did not run")
        sys.exit(1)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    started = time.perf_counter()
    for check in (check_kernels, check_philox, check_bandwidth, check_ray_train_run, check_load_memory):
        try:
            check()
        except Exception as error:  # noqa: BLE001 - one failed check must not hide the others
            record(check.__name__, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", False)
    print(f"\nGPU check on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| check | result | verdict |\n|---|---|---|")
    for check, result, verdict in ROWS:
        print(f"| {check} | {result} | {verdict} |")
    sys.exit(0 if all(v != "FAIL" for _, _, v in ROWS) else 1)


if __name__ == "__main__":
    main()
