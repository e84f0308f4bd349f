import pytest

from pipeline.config import ConfigError, load_config
from pipeline.raw_config import apply_overrides, flatten
from pipeline.tracking import tracking_uri

from conftest import REPO, TINY_YAML


def test_shipped_configs_parse():
    tiny = load_config(TINY_YAML)
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert tiny.model.source == "config" and tiny.train.zero_stage == 2
    assert demo.model.source == "gguf" and demo.data.split.eval_from == 2000
    assert demo.train.num_workers == 2 and demo.train.zero_stage == 2


def test_dotted_overrides_are_typed():
    cfg = load_config(TINY_YAML, ["train.lr=3e-4", "train.max_ticks=3", "data.seq_len=128",
                                  "train.betas=[0.8, 0.9]", "tracking.log_model=false"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.max_ticks == 3 and cfg.data.seq_len == 128
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.tracking.log_model is False


@pytest.mark.parametrize("override, field", [
    ("train.lrr=1", "train.lrr: unknown field"),
    ("train.lr=fast", "train.lr:"),
    ("train.zero_stage=4", "train.zero_stage:"),
    ("data.format=csv", "data.format:"),
    ("nonsense.key=1", "nonsense: unknown field"),
    ("data.split.rule=path_number", None),  # valid rule, eval_from comes from the file
])
def test_errors_name_the_field(override, field):
    if field is None:
        load_config(TINY_YAML, [override])
        return
    with pytest.raises(ConfigError) as error:
        load_config(TINY_YAML, [override])
    message = str(error.value)
    assert field in message
    assert "\n" not in message


def test_cross_field_rules_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {source: gguf}\ndata: {path: x}\n")
    with pytest.raises(ConfigError, match=r"^config error: model: path must be given"):
        load_config(path)
    path.write_text("model: {source: hub, path: a/b}\ndata: {path: x, split: {rule: path_number}}\n")
    with pytest.raises(ConfigError, match=r"data.split: eval_from must be given"):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    (["train.min_workers=3"], r"train.min_workers: 3 is more than num_workers \(2\)"),
    (["train.min_workers=1"], r"train.min_workers: set global_batch_size too"),
    (["train.min_workers=1", "train.num_workers=3", "train.global_batch_size=8", "train.micro_batch_size=2"],
     r"global_batch_size: 8 is not divisible by 3 workers x micro_batch_size 2"),
])
def test_a_worker_range_needs_a_global_batch_every_count_divides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY_YAML, overrides)


def test_missing_required_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {source: hub, path: a/b}\n")
    with pytest.raises(ConfigError, match="data: required field is missing"):
        load_config(path)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lr: is a value"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_flatten_gives_dotted_params():
    flat = flatten(load_config(TINY_YAML))
    assert flat["train.lr"] == pytest.approx(3e-3)
    assert flat["model.architecture.num_hidden_layers"] == 2
    assert flat["data.split.rule"] == "path_number"


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None).endswith("/mlruns/mlflow.db") and tracking_uri(None).startswith("sqlite:///")
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/x.db")
    assert tracking_uri("http://127.0.0.1:5000") == f"sqlite:///{tmp_path}/x.db"


@pytest.mark.parametrize("overrides, message", [
    (["model.task=sequence_classification"],
     r"^config error: data.format: 'text' is for model.task 'causal_lm', and model.task is 'sequence_classification'; "
     r"for 'sequence_classification' use labelled_text$"),
    (["data.format=tagged_tokens"], r"^config error: data.format: 'tagged_tokens' is for model.task 'token_classification'"),
    (["data.format=labelled_text", "model.task=token_classification"], r"for 'token_classification' use tagged_tokens$"),
    (["data.format=labelled_text", "model.task=sequence_classification", "data.packing=document"],
     r"data.packing: 'document' packs examples together"),
    (["data.format=tagged_tokens", "model.task=token_classification", "data.label_names=[O, O]"],
     r"data.label_names: a classifier needs at least 2 distinct classes"),
])
def test_a_classification_task_needs_its_labelled_format(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(TINY_YAML, overrides)
    assert "\n" not in str(error.value)


def test_labelled_formats_put_one_example_in_each_block_and_truncate():
    data = load_config(TINY_YAML, ["data.format=tagged_tokens", "model.task=token_classification"]).data
    assert (data.packing_mode, data.too_long_mode, data.reads_records, data.has_examples) == ("none", "truncate", True, False)
    assert load_config(TINY_YAML, ["data.format=chat"]).data.too_long_mode == "skip"


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=3", r"^train.zero_stage: 3 loads causal LMs only; model.task 'sequence_classification' trains "
                           r"at stages 0-2$"),
    ("model.lora.r=4", r"^model.lora: LoRA adapts causal LMs only; model.task 'sequence_classification' fine-tunes"),
])
def test_what_a_classification_task_does_not_train_stops_before_ray_in_one_line(override, message):
    from pipeline.train.launch import check_task

    classify = ["data.format=labelled_text", "model.task=sequence_classification"]
    with pytest.raises(ConfigError, match=message) as error:
        check_task(load_config(TINY_YAML, [*classify, override]))
    assert "\n" not in str(error.value)
    check_task(load_config(TINY_YAML, classify))  # ZeRO-2, full fine-tuning: it trains
    check_task(load_config(TINY_YAML, [override]))  # and a causal LM trains either
