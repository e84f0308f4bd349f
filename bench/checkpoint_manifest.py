"""What committing a checkpoint by manifest costs: SHA-256 of every file (write_manifest) and a full
verification on resume (problem_with), against the baseline of saving the same state with torch.save.

Default: 1 GiB of fp32 state in 4 files, about what one rank of a 135M-parameter model writes at
ZeRO-2 with 2 workers (weights plus its Adam shard). `--mib N` changes the size.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline.train.checkpoints import problem_with, write_manifest


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = 4
    state = [torch.randn(args.mib * (1 << 20) // 4 // files) for _ in range(files)]
    rows = []
    for _ in range(args.rounds):
        directory = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
        try:
            save = timed(lambda: [torch.save(t, directory / f"part{i}.pt") for i, t in enumerate(state)])
            manifest = timed(lambda: write_manifest(directory, rank=0, world_size=1, tick=1))
            verify = timed(lambda: problem_with(directory))
            rows.append((save, manifest, verify))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    save, manifest, verify = (min(column) for column in zip(*rows))
    print(f"{args.mib} MiB in {files} files, best of {args.rounds}")
    print(f"  torch.save (baseline)   {save:6.2f} s  1.00x  ({args.mib / save:,.0f} MiB/s)")
    print(f"  write_manifest (SHA-256) {manifest:6.2f} s  {manifest / save:.2f}x  ({args.mib / manifest:,.0f} MiB/s)")
    print(f"  verify on resume        {verify:6.2f} s  {verify / save:.2f}x")


if __name__ == "__main__":
    main()
