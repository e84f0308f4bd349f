"""Checks the driver makes before Ray Train starts, and how worker failures are reported."""

import pytest
from ray.train import WorkerGroupError

from pipeline.config import ConfigError
from pipeline.train.launch import describe_failure
from pipeline.train.resources import check_against_cluster

from conftest import tiny_config


def test_worker_failures_become_one_line_per_rank():
    error = WorkerGroupError("details", {1: RuntimeError("shard empty"), 0: ValueError("bad value\nsecond line")})
    assert describe_failure(error) == "rank 0: ValueError: second line; rank 1: RuntimeError: shard empty"
    alike = WorkerGroupError("details", {1: FloatingPointError("loss is nan"), 0: FloatingPointError("loss is nan")})
    assert describe_failure(alike) == "ranks 0, 1: FloatingPointError: loss is nan"


def test_resources_the_cluster_lacks_fail_fast(ray_session, tmp_path):
    with pytest.raises(ConfigError, match=r"train.use_gpu: the Ray cluster has \(or can scale to\) 0 GPUs"):
        check_against_cluster(tiny_config(tmp_path, "train.use_gpu=true"))
    with pytest.raises(ConfigError, match=r"train.cpus_per_worker: 2 workers x 8 CPUs"):
        check_against_cluster(tiny_config(tmp_path, "train.cpus_per_worker=8"))
    check_against_cluster(tiny_config(tmp_path))


def test_seq_len_above_model_positions_is_named_before_ray_starts(tmp_path):
    import ray

    from pipeline.data import prepare

    cfg = tiny_config(tmp_path, "data.seq_len=512")
    started_before = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"data.seq_len: 512 is above the model's maximum of 256"):
        prepare(cfg)
    assert ray.is_initialized() == started_before


def test_triton_backend_without_gpus_and_bad_resume_path_are_named(tmp_path):
    from pipeline.train.launch import check_kernel, resolve_resume

    with pytest.raises(ConfigError, match=r"kernel.backend: 'triton' runs on GPUs"):
        check_kernel(tiny_config(tmp_path, "kernel.backend=triton"))
    check_kernel(tiny_config(tmp_path, "kernel.backend=triton", "train.use_gpu=true"))
    with pytest.raises(ConfigError, match=r"train.resume_from: .* holds no checkpoint directories"):
        resolve_resume(tiny_config(tmp_path, f"train.resume_from={tmp_path}"))
    with pytest.raises(ConfigError, match=r"train.resume_from: .*/nowhere is not a directory"):
        resolve_resume(tiny_config(tmp_path, f"train.resume_from={tmp_path}/nowhere"))
    with pytest.raises(ConfigError, match=r"kernel.backend: Input should be 'auto', 'triton' or 'torch'"):
        tiny_config(tmp_path, "kernel.backend=cuda")
    with pytest.raises(ConfigError, match=r"noise.sigma: Input should be greater than or equal to 0"):
        tiny_config(tmp_path, "noise.sigma=-0.1")


def test_flash_attention_needs_a_gpu_and_its_package(tmp_path):
    import importlib.util

    from pipeline.train.launch import check_kernel

    with pytest.raises(ConfigError, match=r"model.attn_implementation: flash_attention_2 runs on GPUs"):
        check_kernel(tiny_config(tmp_path, "model.attn_implementation=flash_attention_2"))
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match=r"model.attn_implementation: flash_attention_2 needs the flash-attn package"):
            check_kernel(tiny_config(tmp_path, "model.attn_implementation=flash_attention_2", "train.use_gpu=true"))
    with pytest.raises(ConfigError, match=r"model.attn_implementation: Input should be 'sdpa', 'eager' or 'flash_attention_2'"):
        tiny_config(tmp_path, "model.attn_implementation=xformers")


@pytest.fixture
def autoscaling_gpu_groups(ray_session):
    """The local Ray as an autoscaling cluster would describe itself: what an autoscaler (KubeRay's,
    `ray up`'s) reports to the GCS, here a GPU worker group of 0 to 16 nodes x 8 GPUs, none up."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu-workers", min_count=0, max_count=16)
    group.resources.update({"CPU": 8, "GPU": 8})
    key, namespace = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)
    yield
    _internal_kv_del(key, namespace=namespace)


def test_gpus_that_only_scaling_up_provides_pass_preflight_then_the_wait_is_bounded(autoscaling_gpu_groups,
                                                                                   tmp_path):
    import time

    from pipeline.train.resources import ResourcesTimeout, wait_for_workers

    cfg = tiny_config(tmp_path, "train.use_gpu=true", "train.num_workers=16", "train.resources_timeout_s=6")
    check_against_cluster(cfg)  # 16 GPUs are reachable by scaling up: not refused before anything scales
    with pytest.raises(ConfigError, match=r"has \(or can scale to\) 128 GPUs, fewer than 129 workers"):
        check_against_cluster(tiny_config(tmp_path, "train.use_gpu=true", "train.num_workers=129"))
    said = []
    started = time.monotonic()
    with pytest.raises(ResourcesTimeout, match=r"waited 6 s for 16 workers x \{CPU: 0.5, GPU: 1\}"):
        wait_for_workers(cfg, say=said.append)
    assert 6 <= time.monotonic() - started < 20
    assert said[0].startswith("[pipeline] waiting up to 6 s (train.resources_timeout_s) for 16 workers")
    wait_for_workers(tiny_config(tmp_path), say=said.append)  # CPU workers that fit: placed, nothing said
    assert len(said) == 1
