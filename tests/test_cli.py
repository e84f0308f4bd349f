"""The CLI end to end, as a user runs it: subprocesses, a temporary MLflow store, configs/tiny.yaml; and
the commands that start nothing (help, config-reference) in-process."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.locations import location_overrides

from conftest import TINY_YAML
from test_console import check_quiet_console

CLI = [sys.executable, "-m", "pipeline"]


def run_cli(args, tmp_path, timeout=600, tracking_uri=None):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    return subprocess.run(CLI + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def full_log(done: subprocess.CompletedProcess) -> Path:
    return Path(re.search(r"^\[pipeline\] full log: (\S+)$", done.stdout, re.M)[1])


def locations(tmp_path):
    # The tracking store comes from MLFLOW_TRACKING_URI (set by run_cli), which overrides the config's.
    return location_overrides(tmp_path)


def test_config_error_is_one_line_before_ray_starts(tmp_path):
    started = time.monotonic()
    result = run_cli(["train", "--config", str(TINY_YAML), "train.lr=fast", "train.nope=1"], tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "train.lr:" in lines[0] and "train.nope: unknown field" in lines[0]
    assert "Ray" not in result.stdout + result.stderr
    assert time.monotonic() - started < 60


def test_module_and_console_script_agree():
    script = Path(sys.executable).parent / "pipeline"  # the console script pip installed beside python
    as_module = subprocess.run(CLI + ["--help"], capture_output=True, text=True, timeout=60)
    as_script = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert as_module.returncode == as_script.returncode == 0
    assert as_module.stdout.replace("__main__.py", "pipeline") == as_script.stdout
    for name in ("prepare", "train", "runs"):
        assert name in as_script.stdout


@pytest.mark.slow
def test_prepare_train_runs_end_to_end(tmp_path):
    # `prepare` records nothing, so a tracking server that is down does not stop it.
    prepared = run_cli(["prepare", "--config", str(TINY_YAML), *locations(tmp_path)], tmp_path,
                       tracking_uri="http://127.0.0.1:9")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "written" in prepared.stdout and "blocks of 64" in prepared.stdout
    assert re.search(r"^\[pipeline\] read [\d.]+/[\d.]+ MB \| .* documents \| done$", prepared.stdout, re.M)
    check_quiet_console(prepared.stdout + prepared.stderr, full_log(prepared).read_text(),
                        library=("Execution plan of Dataset", "Setting accelerator to CPU"))

    trained = run_cli(["train", "--config", str(TINY_YAML), "--debug-steps", "4", *locations(tmp_path)], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = trained.stdout + trained.stderr
    assert "reused" in out  # train found the cache `prepare` wrote
    assert "tick 4/4" in out and "perplexity before" in out and "mlflow ui --backend-store-uri" in out
    # The console holds our lines only; the library lines are in the full log it names.
    assert re.search(r"^\[pipeline\] tick \d+/\d+ \| loss ", out, re.M)
    check_quiet_console(out, full_log(trained).read_text(),
                        library=("Setting accelerator to CPU", "(TrainController) ", "Reporting training result"))

    listed = run_cli(["runs", "--experiment", "tiny"], tmp_path, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = [line for line in listed.stdout.splitlines() if "FINISHED" in line]
    assert len(rows) == 1 and rows[0].split()[-2] == "4"


@pytest.mark.parametrize("name", ["prepare", "train", "tune"])
def test_help_ends_with_the_config_sections(name, capsys):
    with pytest.raises(SystemExit) as exit:
        main([name, "--help"])
    assert exit.value.code == 0
    epilog = capsys.readouterr().out.split("config sections")[1]
    for section in ("model", "data", "train", "noise", "sweep", "tracking", "storage", "ray"):
        assert f"\n  {section} " in epilog
    assert "pipeline config-reference [SECTION]" in epilog


def test_config_reference_command(tmp_path, capsys):
    assert main(["config-reference", "sweep.confirm"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| field | default | meaning |") and "| `sweep.confirm.seeds` | `3` |" in out
    assert "sweep.num_samples" not in out
    assert main(["config-reference", "nope"]) == 2
    assert "no section 'nope'" in capsys.readouterr().err

    readme = tmp_path / "README.md"
    readme.write_text("<!-- config-reference:start -->\n<!-- config-reference:end -->\n")
    assert main(["config-reference", "--check", str(readme)]) == 1
    assert "out of date: run `pipeline config-reference --write README.md`" in capsys.readouterr().err
    assert main(["config-reference", "--write", str(readme)]) == 0
    assert main(["config-reference", "--check", str(readme)]) == 0
    assert "| `model.lora.r` | `8` |" in readme.read_text()
    assert main(["config-reference", "train", "--write", str(readme)]) == 2
