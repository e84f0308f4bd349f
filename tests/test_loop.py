"""The training loop in one process, without Ray: resume at tick k reads nothing before tick k and
continues the very same losses (ZeRO-2 and ZeRO-3), and the noise reaches training."""

import pytest
from memory_peak import export_peak

from pipeline.data import prepare
from pipeline.train.local import train_in_process
from pipeline.train.rank import WorkerPlan

from conftest import tiny_config

TICKS, GLOBAL_BATCH = 6, 8


def run(tmp, name, *overrides):
    cfg = tiny_config(tmp, "train.num_workers=1", f"train.micro_batch_size={GLOBAL_BATCH}", f"train.max_ticks={TICKS}",
                      "train.eval_every=1", "train.eval_batches=1", "train.lr=1e-2", *overrides)
    model_ref, data = prepare(cfg)
    return train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp / name)))


def losses(reporter):
    return {int(r["tick"]): r["loss"] for r in reporter.reports}


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    """The tiny corpus packed once (preparing needs Ray; training here does not)."""
    prepare(tiny_config(tmp_path_factory.mktemp("prepare")))


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_at_tick_k_reads_nothing_before_it_and_continues_the_losses(prepared, tmp_path, stage):
    noisy = ("noise.sigma=0.1", f"train.zero_stage={stage}", "train.checkpoint_every=3")
    whole = run(tmp_path, "whole", *noisy)
    assert whole.samples_read == TICKS * GLOBAL_BATCH
    checkpoint = whole.checkpoints[0]
    assert checkpoint.endswith("checkpoint_000003")
    resumed = run(tmp_path, "resumed", *noisy, f"train.resume_from={checkpoint}")
    assert resumed.samples_read == (TICKS - 3) * GLOBAL_BATCH  # ticks 3, 4, 5 only: no replay
    assert sorted(losses(resumed)) == [4, 5, 6]
    for tick, loss in losses(resumed).items():
        assert loss == pytest.approx(losses(whole)[tick], rel=1e-6), tick
    assert resumed.reports[-1]["eval_loss"] == pytest.approx(whole.reports[-1]["eval_loss"], rel=1e-6)


def test_the_noise_reaches_training(prepared, tmp_path):
    quiet, noisy = losses(run(tmp_path, "quiet")), losses(run(tmp_path, "noisy", "noise.sigma=0.1"))
    assert quiet[1] == pytest.approx(noisy[1], rel=0.05)  # the same samples, the same model
    # Far above the 1e-5 within which the same run on 1 or 2 workers agrees, and growing as it trains.
    differences = [abs(noisy[t] - quiet[t]) / quiet[t] for t in sorted(quiet)]
    assert min(differences) > 2e-5 and max(differences) > 3e-4, differences
    again = losses(run(tmp_path, "noisy-again", "noise.sigma=0.1"))
    assert again == pytest.approx(noisy, rel=1e-6)  # and ε is the same draw every time


def saved_activation_bytes(model, input_ids) -> int:
    """What autograd keeps for the backward pass of one forward (activations, mostly)."""
    import torch

    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, labels=input_ids)
    return saved


def test_gradient_checkpointing_trains_the_same_losses_with_less_kept_for_backward(prepared, tmp_path):
    import torch

    from pipeline.models import materialize_model
    from pipeline.train.rank import build_model

    plain = losses(run(tmp_path, "plain", "noise.sigma=0.1"))
    checkpointed = losses(run(tmp_path, "checkpointed", "noise.sigma=0.1", "train.gradient_checkpointing=true"))
    assert checkpointed == pytest.approx(plain, rel=1e-6)  # recomputation draws the same noise
    kept = {}
    for enabled in (False, True):
        cfg = tiny_config(tmp_path, f"train.gradient_checkpointing={str(enabled).lower()}")
        model, _ = build_model(cfg, materialize_model(cfg.model))
        model.train()
        kept[enabled] = saved_activation_bytes(model, torch.randint(0, 500, (8, 64)))
    assert kept[True] < 0.5 * kept[False], kept


def test_the_attention_implementation_reaches_the_model(prepared, tmp_path):
    from pipeline.models import materialize_model
    from pipeline.train.rank import build_model

    cfg = tiny_config(tmp_path, "model.attn_implementation=eager")
    model, _ = build_model(cfg, materialize_model(cfg.model))
    assert model.config._attn_implementation == "eager"
    eager, sdpa = losses(run(tmp_path, "eager", "model.attn_implementation=eager")), losses(run(tmp_path, "sdpa"))
    assert eager == pytest.approx(sdpa, rel=1e-5)  # the same function, another kernel


def test_the_export_writes_the_trained_weights_in_shards_holding_one_shard_at_a_time(prepared, tmp_path):
    import json

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from pipeline.train.checkpoints import local_checkpoint
    from pipeline.train.export import export_model, trained_weights

    wider = ("model.architecture.hidden_size=256", "model.architecture.intermediate_size=1024",
             "model.architecture.num_hidden_layers=4", "train.zero_stage=2")
    cfg = tiny_config(tmp_path, "train.num_workers=1", *wider)
    model_ref, _ = prepare(cfg)
    checkpoint = run(tmp_path, "run", *wider, "train.max_ticks=2").checkpoints[-1]
    with local_checkpoint(checkpoint) as directory:
        trained = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag="tick-000002")
        trained_weights(directory)  # imports DeepSpeed's and torch's lazy paths before the measurement
    model_bytes = sum(t.numel() * 4 for t in trained.values())
    AutoModelForCausalLM  # noqa: B018  (transformers' model classes imported before the measurement too)
    shard = 2**20
    # The writing measured apart from the export's checkpoint verification (its hashing threads take
    # 8 MiB each, more than the budget) and from this process's allocator state.
    grown = export_peak(checkpoint, model_ref, str(tmp_path / "written"), shard)
    exported = export_model(checkpoint, model_ref, str(tmp_path / "model"), torch.float32, shard)
    index = json.loads((exported.local_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 8  # the 16 MB model in 1 MiB shards
    assert json.loads((tmp_path / "written" / "model.safetensors.index.json").read_text()) == index
    # About a shard and its serialization (the consolidation used to hold 2x the model).
    print(f"writing the export: {grown / 2**20:.1f} MiB, model {model_bytes / 2**20:.1f} MiB")
    assert grown < 3 * shard, (grown, model_bytes)
    reloaded = AutoModelForCausalLM.from_pretrained(exported.local_dir)
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, trained.get(name, trained.get("model.embed_tokens.weight")), rtol=1e-5,
                                   atol=0)
    halved = export_model(checkpoint, model_ref, str(tmp_path / "model-bf16"), torch.bfloat16, shard)
    in_bf16 = AutoModelForCausalLM.from_pretrained(halved.local_dir, dtype="auto")
    assert in_bf16.dtype == torch.bfloat16 and in_bf16.config.dtype == torch.bfloat16
    assert torch.equal(in_bf16.model.norm.weight, trained["model.norm.weight"].to(torch.bfloat16))


def learning_rates(reporter):
    return {int(r["tick"]): r["lr"] for r in reporter.reports if "lr" in r}


def test_a_run_resumed_at_its_last_tick_trains_nothing_and_more_ticks_follow_the_longer_schedule(prepared, tmp_path,
                                                                                                 capsys):
    short = run(tmp_path, "short", "train.max_ticks=4", "train.checkpoint_every=2")
    final = short.checkpoints[-1]
    assert final.endswith("checkpoint_000004")

    again = run(tmp_path, "again", "train.max_ticks=4", f"train.resume_from={final}")
    assert again.samples_read == 0 and again.checkpoints == []  # nothing trained, nothing written
    assert [r["tick"] for r in again.reports] == [4]  # its final evaluation, for the summary and the run
    assert again.reports[0]["eval_loss"] == pytest.approx(short.reports[-1]["eval_loss"], rel=1e-6)
    assert again.reports[0]["eval_loss_start"] == pytest.approx(short.reports[-1]["eval_loss_start"], rel=1e-6)
    assert "the run is already complete at tick 4 of train.max_ticks=4" in capsys.readouterr().out

    # train.max_ticks raised from 4 to 6: ticks 5 and 6 train at the rates of a run configured for 6
    # from its start (the cosine stretched over 6 ticks), not at the 4-tick schedule's end.
    longer = run(tmp_path, "longer", f"train.resume_from={final}")
    fresh = run(tmp_path, "fresh")
    assert sorted(learning_rates(longer)) == [5, 6]
    for tick in (5, 6):
        assert learning_rates(longer)[tick] == learning_rates(fresh)[tick], tick
    assert learning_rates(longer)[5] > learning_rates(short)[4]  # the rate rises again from the short run's minimum
