"""Job specs: every shipped spec is valid and names real configs; uploads and env stay safe."""

import shlex

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.jobs.spec import REQUIRED_EXCLUDES, config_paths, load_job_spec, runtime_env_dict
from pipeline.runtime import QUIET_RAY_ENV

from conftest import REPO

SPECS = sorted((REPO / "jobs").glob("*.yaml"))


def test_the_four_specs_ship():
    assert {p.stem for p in SPECS} >= {"finetune-cpu", "finetune-gpu", "sweep", "tiny"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_is_a_pipeline_command_on_an_existing_config(path):
    spec = load_job_spec(path)
    assert shlex.split(spec.entrypoint)[0] == "pipeline"
    words = shlex.split(spec.entrypoint)
    for config in config_paths(spec):
        overrides = [w for w in words[words.index(config) + 1:] if "=" in w]
        load_config(REPO / config, overrides)  # raises ConfigError naming the field if anything is off


def test_gpu_spec_asks_for_16_nodes_of_8_gpus_bf16_zero3_with_everything_in_a_bucket():
    spec = load_job_spec(REPO / "jobs" / "finetune-gpu.yaml")
    words = shlex.split(spec.entrypoint)
    assert {"train.use_gpu=true", "train.num_workers=128", "train.zero_stage=3", "train.precision=bf16"} <= set(words)
    shared = ("data.path", "data.cache_dir", "model.cache_dir", "train.output_dir")
    assert all(any(w.startswith(f"{field}=s3://") for w in words) for field in shared)
    assert "PIPELINE_WORK_DIR" not in spec.runtime_env.env_vars  # no shared directory needed


def test_upload_excludes_are_enforced_and_only_named_env_travels(tmp_path):
    spec_file = tmp_path / "bare.yaml"
    spec_file.write_text("entrypoint: pipeline train --config configs/tiny.yaml\n"
                         "runtime_env: {env_vars: {MLFLOW_TRACKING_URI: '${MLFLOW_TRACKING_URI}', "
                         "UNSET: '${NOT_SET_ANYWHERE}'}}\n")
    environ = {"MLFLOW_TRACKING_URI": "http://10.0.0.5:5000", "HF_TOKEN": "secret123", "AWS_SECRET_ACCESS_KEY": "x"}
    env = runtime_env_dict(load_job_spec(spec_file), REPO, environ)
    assert env["working_dir"] == str(REPO)
    for pattern in (".venv/", ".ray/", ".cache/", "mlruns/", "outputs/", "**/checkpoint_*/", ".env", "*.pem"):
        assert pattern in env["excludes"] and pattern in REQUIRED_EXCLUDES
    named = {k: v for k, v in env["env_vars"].items() if k not in QUIET_RAY_ENV}
    assert named == {"MLFLOW_TRACKING_URI": "http://10.0.0.5:5000"}  # no secrets, no unset values
    assert "secret123" not in repr(env)


def test_overrides_are_appended_quoted_and_bad_specs_name_the_field(tmp_path):
    spec = load_job_spec(REPO / "jobs" / "tiny.yaml", ["train.max_ticks=2", "tracking.run_name=a b"])
    assert spec.entrypoint.endswith("train.max_ticks=2 'tracking.run_name=a b'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("entrypoint: rm -rf /\nresources: {entrypoint_num_gpus: -1}\nextra: 1\n")
    with pytest.raises(ConfigError) as error:
        load_job_spec(bad)
    message = str(error.value)
    assert "entrypoint: must be a pipeline command" in message
    assert "resources.entrypoint_num_gpus" in message and "extra: unknown field" in message


def test_a_spec_that_takes_the_work_dir_needs_it_set(tmp_path):
    """Without PIPELINE_WORK_DIR a job's caches and outputs would land in one node's temporary copy
    of the repo: refused in one line naming the spec, the entry and both ways out."""
    spec_file = tmp_path / "needs-work-dir.yaml"
    spec_file.write_text("entrypoint: pipeline train --config configs/tiny.yaml\n"
                         "runtime_env: {env_vars: {PIPELINE_WORK_DIR: '${PIPELINE_WORK_DIR}', "
                         "UNSET: '${NOT_SET_ANYWHERE}'}}\n")
    spec = load_job_spec(spec_file)
    for environ in ({}, {"PIPELINE_WORK_DIR": ""}):
        with pytest.raises(ConfigError) as error:
            runtime_env_dict(spec, REPO, environ)
        message = str(error.value)
        assert message.startswith(f"job spec {spec_file}: env_vars.PIPELINE_WORK_DIR takes ${{PIPELINE_WORK_DIR}}")
        assert "storage every node shares" in message and "train.output_dir" in message and "\n" not in message
    env = runtime_env_dict(spec, REPO, {"PIPELINE_WORK_DIR": "/shared/work"})
    assert env["env_vars"]["PIPELINE_WORK_DIR"] == "/shared/work" and "UNSET" not in env["env_vars"]
    for shipped in SPECS:  # every shipped spec that asks for it; the bucket ones need no shared directory
        submitted = {"MLFLOW_TRACKING_URI": "http://10.0.0.5:5000"}
        if "${PIPELINE_WORK_DIR}" not in shipped.read_text():
            assert "PIPELINE_WORK_DIR" not in runtime_env_dict(load_job_spec(shipped), REPO, submitted)["env_vars"]
            continue
        with pytest.raises(ConfigError, match=f"job spec {shipped}: .*PIPELINE_WORK_DIR"):
            runtime_env_dict(load_job_spec(shipped), REPO, submitted)


def test_submit_without_the_work_dir_stops_before_reaching_any_cluster(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv("PIPELINE_WORK_DIR", raising=False)
    assert main(["submit", str(REPO / "jobs" / "tiny.yaml"), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pipeline: job spec ") and "PIPELINE_WORK_DIR" in err[0], err
