"""A run's start: rank 0 says how long each part took, and a sweep's trials evaluate tick 0 once
(the same model on the same eval subset), the later ones reading the first one's result. In one
process, without Ray (`train.local`), on the tiny model."""

import pytest

from pipeline.data import prepare
from pipeline.train import loop
from pipeline.train.local import train_in_process
from pipeline.train.rank import WorkerPlan

from conftest import tiny_config


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    """The tiny corpus packed once (preparing needs Ray; training here does not)."""
    prepare(tiny_config(tmp_path_factory.mktemp("prepare")))


@pytest.fixture
def evaluations(monkeypatch):
    """How many evaluations the loop ran (the real evaluation, counted)."""
    calls = []
    evaluate = loop._evaluate

    def counted(*args):
        calls.append(1)
        return evaluate(*args)

    monkeypatch.setattr(loop, "_evaluate", counted)
    return calls


def run(tmp, name, *overrides, shared=None):
    # Two ticks, evaluated before training and at the end only: two evaluations when tick 0 is computed.
    cfg = tiny_config(tmp, "train.num_workers=1", "train.micro_batch_size=8", "train.max_ticks=2",
                      "train.eval_every=0", "train.eval_batches=1", "noise.sigma=0.1", *overrides)
    model_ref, data = prepare(cfg)
    return train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / name), first_eval_dir=shared))


def test_a_later_trial_reads_the_tick0_eval_instead_of_computing_it(prepared, tmp_path, evaluations, capsys):
    shared = str(tmp_path / "first-eval")
    fresh = run(tmp_path, "plain")  # `pipeline train`: no shared store, nothing written
    assert len(evaluations) == 2 and not (tmp_path / "first-eval").exists()
    first = run(tmp_path, "trial-1", "train.lr=1e-2", shared=shared)
    assert len(evaluations) == 4 and len(list((tmp_path / "first-eval").glob("*.json"))) == 1
    capsys.readouterr()
    second = run(tmp_path, "trial-2", "train.lr=1e-4", "noise.sigma=0.2", "train.seed=3", shared=shared)
    assert len(evaluations) == 5  # its final evaluation only
    out = capsys.readouterr().out
    assert "(before training; the sweep computed it once)" in out
    # The value read is the one computed fresh, exactly; training itself differs (lr, σ, seed).
    assert second.reports[-1]["eval_loss_start"] == first.reports[-1]["eval_loss_start"] == fresh.reports[-1]["eval_loss_start"]
    assert second.reports[-1]["eval_loss"] != first.reports[-1]["eval_loss"]
    assert "[pipeline] started in" in out and "first eval reused from" in out
    # What changes the evaluation (here the eval subset) is another key: evaluated again.
    run(tmp_path, "trial-3", "train.eval_batches=2", shared=shared)
    assert len(evaluations) == 7 and len(list((tmp_path / "first-eval").glob("*.json"))) == 2


def test_a_classifiers_seed_draws_its_head_so_it_keys_the_shared_first_eval(tmp_path):
    """A sweep's confirmation runs change train.seed: a causal LM's tick 0 is the same model whatever
    the seed, a classifier's is a new head drawn from it."""
    from pipeline.train.startup import first_eval_key

    def key(*overrides):
        return first_eval_key(tiny_config(tmp_path, *overrides), "model", "fingerprint", 16, 1)

    assert key("train.seed=1") == key("train.seed=2")
    classifier = ("model.task=sequence_classification", "data.format=labelled_text")
    assert key(*classifier, "train.seed=1") != key(*classifier, "train.seed=2")
    assert key(*classifier, "train.seed=1", "train.lr=1e-3") == key(*classifier, "train.seed=1", "train.lr=1e-2")
