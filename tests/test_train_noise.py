"""Tick-synchronized noise in real training: 2 Ray Train workers, DeepSpeed ZeRO-3, σ > 0."""

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.noise import sigma_at
from pipeline.tracking.store import client_for
from pipeline.train import run_training
from pipeline.train.clock import TickMismatch, check_ticks_agree

from conftest import tiny_config

SIGMA, DECAY, TICKS = 0.3, 0.5, 4


def history(outcome, name):
    points = client_for(outcome.tracking_uri).get_metric_history(outcome.run_id, name)
    return {m.step: m.value for m in points}


@pytest.fixture(scope="module")
def noisy_run(ray_session, tmp_path_factory):
    """A ZeRO-3 run with noise. (Resuming it exactly is tests/reliability/test_resume.py.)"""
    tmp = tmp_path_factory.mktemp("noise")
    return run_training(tiny_config(tmp, f"noise.sigma={SIGMA}", f"noise.decay={DECAY}", "noise.seed=7",
                                    "train.zero_stage=3", "train.shuffle=false", f"train.max_ticks={TICKS}",
                                    "train.eval_every=0", "tracking.log_model=false"))


@pytest.mark.slow
def test_noisy_zero3_training_logs_the_schedule_and_stays_finite(noisy_run):
    first = noisy_run
    run = client_for(first.tracking_uri).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["norms.replaced"], params["norms.in_blocks"], params["norms.blocks"]) == ("5", "4", "2")
    assert run.data.params["noise.sigma"] == str(SIGMA)
    sigmas = history(first, "noise_sigma")  # logged at the end of tick t for the step taken at tick t-1
    assert sorted(sigmas) == list(range(1, TICKS + 1))
    for step, value in sigmas.items():
        assert value == pytest.approx(sigma_at(SIGMA, DECAY, step - 1))
    assert all(np.isfinite(list(history(first, "loss").values())))
    assert np.isfinite(first.metrics["eval_loss"])


def _tick_check_rank(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        check_ticks_agree(5, torch.device("cpu"))  # agreeing ticks pass
        check_ticks_agree(5 + rank, torch.device("cpu"))
        results.put((rank, "no error"))
    except TickMismatch as error:
        results.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_on_the_tick_raise_naming_each_tick():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_tick_check_rank, args=(rank, port, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    messages = dict(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert messages[0] == messages[1] == "ranks disagree on the tick (min 5, max 6): rank 0: 5, rank 1: 6"
