"""The Ray Train side of a rank: its place in the world from Ray's context, and a reporter that
hands each checkpoint to Ray Train after uploading it itself. The loop is `train.rank.run_rank`."""

from __future__ import annotations

import dataclasses
import functools
import posixpath
import tempfile
from pathlib import Path

from pipeline import storage
from pipeline.train.checkpoints import upload_checkpoint
from pipeline.train.loop import SaveCheckpoint
from pipeline.train.rank import WorkerPlan, run_rank


def train_worker(plan: WorkerPlan) -> None:
    import psutil  # a dependency of Ray's
    import ray.train
    import ray.train.torch

    # When this process began: what is before it is Ray starting the worker group, what is after it this
    # process's own start (interpreter, imports, Ray Train's set-up), in the start-up line.
    plan = dataclasses.replace(plan, marks=(*plan.marks, ("worker process", psutil.Process().create_time())))
    context = ray.train.get_context()
    run_rank(plan, context.get_world_rank(), context.get_world_size(), context.get_local_world_size(),
             ray.train.torch.get_device(), RayReporter(plan.run_dir, context.get_world_rank()))


class RayReporter:
    """Metrics to `ray.train.report`; a checkpoint written to a temporary directory, uploaded by
    this rank (`checkpoint_upload_fn`), and registered with Ray Train, which keeps the newest K."""

    def __init__(self, run_dir: str, rank: int):
        self.run_dir, self.rank = run_dir, rank

    def report(self, metrics: dict, save: SaveCheckpoint | None) -> None:
        import ray.train

        if save is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="ckpt-") as directory:
            save(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_upload_fn=functools.partial(_upload, self.run_dir, self.rank))


def _upload(run_dir: str, rank: int, checkpoint, checkpoint_dir_name: str):
    """Ray's checkpoint_upload_fn: this rank's files into `<run_dir>/<checkpoint_dir_name>/`, its
    manifest after all of them (the commit: object stores have no rename). Every rank uploads into
    the same directory; Ray registers it once every rank's upload has returned."""
    import ray.train

    upload_checkpoint(Path(checkpoint.path), storage.join(run_dir, checkpoint_dir_name), rank)
    # Ray manages (keeps K, deletes older) only checkpoints on its own storage filesystem object.
    ray_storage = ray.train.get_context().get_storage()
    return ray.train.Checkpoint(path=posixpath.join(ray_storage.experiment_fs_path, checkpoint_dir_name),
                                filesystem=ray_storage.storage_filesystem)
