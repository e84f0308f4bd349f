"""The fused noisy norm against eager PyTorch, measured in one run.

CPU (always): forward+backward time and bytes kept for backward at (8, 512, 768), for
  fused      pipeline.kernels.layer_norm with noise (torch path, native CPU kernel): ε regenerated
  eager      F.layer_norm + σ·torch.randn + add (the issue's baseline; noise outside the affine)
  eager-same the same function as ours in eager ops, (x̂ + σ·ε)·γ + β, which must keep x̂ + σ·ε for dγ
CUDA (when a GPU is present): GB/s of forward and forward+backward for hidden sizes 1024-16384
  against torch.nn.LayerNorm (and Liger's LayerNorm if installed), as a fraction of the device's
  measured copy bandwidth.

    .venv/bin/python bench/norm.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from pipeline.kernels import layer_norm
from pipeline.noise import Noise

SIGMA = 0.1


def saved_bytes(fn) -> int:
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fn()
    return sum(sizes)


def median_ms(step, repeats: int, sync=lambda: None) -> float:
    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def cpu_report(repeats: int) -> None:
    shape, n = (8, 512, 768), 768
    x = torch.randn(shape, requires_grad=True)
    weight = torch.ones(n, requires_grad=True)
    bias = torch.zeros(n, requires_grad=True)
    noise = Noise(SIGMA, seed=0, tick=3, layer=1, row_ids=torch.arange(8 * 512).view(8, 512))
    upstream = torch.randn(shape)

    def fused():
        return layer_norm(x, weight, bias, noise=noise, backend="torch")

    def eager():
        return F.layer_norm(x, (n,), weight, bias) + SIGMA * torch.randn(shape)

    def eager_same():
        xhat = F.layer_norm(x, (n,))
        return (xhat + SIGMA * torch.randn(shape)) * weight + bias

    variants = {"fused": fused, "eager": eager, "eager-same": eager_same}
    # Interleave the variants over rounds so that machine noise hits them alike.
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):
        for name, fn in variants.items():
            times[name].append(median_ms(lambda fn=fn: fn().backward(upstream), max(1, repeats // 3)))
    baseline = statistics.median(times["eager"])
    print(f"CPU, {torch.get_num_threads()} threads, LayerNorm {shape} fp32, σ={SIGMA}: forward+backward")
    print(f"{'variant':<12}{'ms':>9}{'x eager':>9}{'saved MiB':>11}")
    for name, fn in variants.items():
        ms = statistics.median(times[name])
        print(f"{name:<12}{ms:>9.2f}{ms / baseline:>9.2f}{saved_bytes(fn) / 2**20:>11.2f}")


def cuda_bandwidth(repeats: int) -> tuple[float, list[dict]]:
    """The device's copy bandwidth (GB/s) and, per hidden size and implementation, the GB/s of
    forward and forward+backward in bf16 over 4096 rows."""
    device = torch.device("cuda")
    sync = torch.cuda.synchronize
    buffer = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    copy_ms = median_ms(lambda: buffer.clone(), repeats, sync)
    copy_gbs = 2 * buffer.numel() / copy_ms / 1e6
    try:
        from liger_kernel.transformers import LigerLayerNorm
    except ImportError:
        LigerLayerNorm = None
    rows, measured = 4096, []
    for n in (1024, 2048, 4096, 8192, 16384):
        x = torch.randn(rows, n, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        weight = torch.ones(n, device=device, dtype=torch.bfloat16, requires_grad=True)
        bias = torch.zeros(n, device=device, dtype=torch.bfloat16, requires_grad=True)
        noise = Noise(SIGMA, 0, 0, 0, torch.arange(rows, device=device))
        impls = {
            "fused+noise": lambda: layer_norm(x, weight, bias, noise=noise),
            "fused": lambda: layer_norm(x, weight, bias),
            "torch": lambda: F.layer_norm(x, (n,), weight, bias),
        }
        if LigerLayerNorm is not None:
            liger = LigerLayerNorm(n).to(device, torch.bfloat16)
            impls["liger"] = lambda: liger(x)
        element = x.element_size()
        forward_bytes = 2 * rows * n * element  # read x, write y
        both_bytes = forward_bytes + 3 * rows * n * element  # backward reads x and dy, writes dx
        for name, fn in impls.items():
            measured.append({"hidden": n, "impl": name,
                             "fwd": forward_bytes / median_ms(fn, repeats, sync) / 1e6,
                             "both": both_bytes / median_ms(lambda: fn().backward(dy), repeats, sync) / 1e6})
    return copy_gbs, measured


def cuda_report(repeats: int) -> None:
    copy_gbs, measured = cuda_bandwidth(repeats)
    print(f"\nCUDA {torch.cuda.get_device_name()}: copy bandwidth {copy_gbs:.0f} GB/s; bf16, 4096 rows; "
          f"GB/s and fraction of copy bandwidth")
    print(f"{'hidden':>7} {'impl':<14}{'fwd GB/s':>10}{'frac':>6}{'fwd+bwd GB/s':>14}{'frac':>6}")
    for r in measured:
        print(f"{r['hidden']:>7} {r['impl']:<14}{r['fwd']:>10.0f}{r['fwd'] / copy_gbs:>6.2f}{r['both']:>14.0f}"
              f"{r['both'] / copy_gbs:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    cpu_report(args.repeats)
    if torch.cuda.is_available():
        cuda_report(args.repeats)
    else:
        print("\nno CUDA device: the GB/s comparison was not run")


if __name__ == "__main__":
    main()
