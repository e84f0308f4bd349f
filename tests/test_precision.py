"""The run trains in the dtype its config resolves to, on every host: a ZeRO-3 model is built in the
fp32 or bf16 asked for where DeepSpeed's accelerator reports no fp16 (where DeepSpeed 0.19.8 dropped
an explicit fp32), and a model handed over in another dtype stops the run with one line."""

import pytest
import torch

from pipeline.data import prepare
from pipeline.train.local import _process_group, train_in_process
from pipeline.train.precision import PrecisionMismatch
from pipeline.train.rank import WorkerPlan, _build_rank
from pipeline.train.startup import Startup

from conftest import tiny_config


@pytest.fixture(scope="module")
def prepared(ray_session, tmp_path_factory):
    """The tiny corpus packed once (preparing needs Ray; training here does not)."""
    prepare(tiny_config(tmp_path_factory.mktemp("prepare")))


def config(tmp, *overrides):
    return tiny_config(tmp, "train.num_workers=1", "train.max_ticks=2", "train.eval_batches=1", "tracking.log_model=false",
                       *overrides)


@pytest.mark.parametrize(("precision", "expected"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_zero3_builds_the_model_in_the_precision_asked_for_where_no_fp16_is_reported(prepared, tmp_path,
                                                                                    host_without_fp16, precision,
                                                                                    expected):
    from safetensors.torch import load_file

    cfg = config(tmp_path, "train.zero_stage=3", f"train.precision={precision}")
    model_ref, data = prepare(cfg)
    with _process_group():
        me, _ = _build_rank(WorkerPlan(cfg, model_ref, None, data, str(tmp_path / "run")), 0, 1, torch.device("cpu"),
                            universal=False, startup=Startup())
    held = {name: param.ds_tensor for name, param in me.engine.module.named_parameters()}
    assert {tensor.dtype for tensor in held.values()} == {expected}
    files = load_file(f"{model_ref}/model.safetensors")  # one rank holds all of every weight
    for name, tensor in held.items():
        assert torch.equal(tensor.view(files[name].shape), files[name].to(expected)), name


def test_a_model_handed_over_in_another_dtype_stops_the_run_in_one_line_before_it_trains(prepared, tmp_path,
                                                                                      monkeypatch):
    """A library that builds the model in bf16 while the config says fp32 (DeepSpeed's own ZeRO-3 bug
    did that): at stage 2 DeepSpeed casts nothing in fp32, so the bf16 weights would train as they are."""
    import pipeline.models

    real = pipeline.models.load_causal_lm
    monkeypatch.setattr(pipeline.models, "load_causal_lm", lambda *a, **k: real(*a, **k).to(torch.bfloat16))
    cfg = config(tmp_path, "train.zero_stage=2", "train.precision=fp32")
    model_ref, data = prepare(cfg)
    with pytest.raises(PrecisionMismatch) as raised:
        train_in_process(WorkerPlan(cfg, model_ref, None, data, str(tmp_path / "run")))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("train.precision: the config resolves to fp32, but after DeepSpeed built the engine "
                              "the model has weights in another dtype: ")
    assert " in bf16 (" in message
    assert not (tmp_path / "run").exists()  # stopped before the first tick: no checkpoint
