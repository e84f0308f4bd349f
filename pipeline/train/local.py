"""The training loop in this process, without Ray: one rank (world size 1) on a gloo group of its
own, checkpoints written to the run directory the way the Ray workers write them.

For tests and quick iteration: the loop, the sample order, the noise, checkpoints and resume are
the code the Ray workers run, so a run here trains exactly what a Ray run with the same global
batch trains.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import storage
from pipeline.train.checkpoints import upload_checkpoint
from pipeline.train.loop import SaveCheckpoint
from pipeline.train.rank import WorkerPlan, run_rank

# Told of every report as it is made: its metrics and, when it wrote one, the checkpoint's location.
Listener = Callable[[dict, str | None], None]


@dataclass
class LocalReporter:
    """Keeps every report; writes a checkpoint as `<run_dir>/checkpoint_<tick>` (manifest last)."""

    run_dir: str
    listener: Listener | None = None
    keep: int | None = None  # the newest K checkpoints stay, as Ray Train keeps them; None: all
    reports: list[dict] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    samples_read: int = 0  # training samples read from the cache (none before the resumed tick)

    def report(self, metrics: dict, save: SaveCheckpoint | None) -> None:
        self.reports.append(dict(metrics))
        location = None
        if save is not None:
            location = storage.join(self.run_dir, f"checkpoint_{int(metrics['tick']):06d}")
            with tempfile.TemporaryDirectory(prefix="ckpt-") as directory:
                save(Path(directory))
                upload_checkpoint(Path(directory), location, rank=0)
            self.checkpoints.append(location)
            while self.keep is not None and len(self.checkpoints) > self.keep:
                storage.delete(self.checkpoints.pop(0))
        if self.listener is not None:
            self.listener(dict(metrics), location)


def runs_in_process(cfg) -> bool:
    """Whether a run is one CPU rank, which `train_in_process` can train (a 1-worker sweep trial)."""
    t = cfg.train
    return t.num_workers == 1 and t.min_workers is None and not t.use_gpu


def train_in_process(plan: WorkerPlan, listener: Listener | None = None, keep: int | None = None) -> LocalReporter:
    """Train `plan` as a single rank in this process; the reports and checkpoints it made (the newest
    `keep`, when given)."""
    if not runs_in_process(plan.config):
        raise ValueError("train_in_process runs one CPU rank: set train.num_workers=1 and train.use_gpu=false "
                         "(and train.global_batch_size to keep a multi-worker run's global batch)")
    reporter = LocalReporter(plan.run_dir, listener, keep)
    with _process_group():
        reporter.samples_read = run_rank(plan, rank=0, world=1, local_world=1, device=torch.device("cpu"),
                                         reporter=reporter)
    return reporter


@contextlib.contextmanager
def _process_group():
    """A gloo group of one on 127.0.0.1 for DeepSpeed, which wants torch.distributed and the
    variables a launcher sets. The group is made once and kept for the process (DeepSpeed caches
    its groups, so a destroyed one would break the next run); the variables are restored."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError(f"a torch.distributed group of {dist.get_world_size()} ranks already exists in this process")
    with socket.socket() as probe:  # used only by the first call, which makes the group
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    saved = {key: os.environ.get(key) for key in launcher}
    os.environ.update(launcher)
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=0, world_size=1)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
