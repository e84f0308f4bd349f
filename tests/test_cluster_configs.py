"""Cluster configs: launcher YAMLs valid against the schema shipped in Ray; KubeRay manifests safe."""

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from conftest import REPO

SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
LAUNCHERS = [REPO / "clusters" / "aws.yaml", REPO / "clusters" / "gcp.yaml"]
KUBERAY = sorted((REPO / "clusters" / "kuberay").glob("*.yaml"))
PRIVATE_PORTS = {6379, 8265}


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_yaml_validates_and_has_cpu_head_and_gpu_workers(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, SCHEMA)
    broken = copy.deepcopy(config)
    broken["max_workers"] = "four"  # the check can fail: a wrong type is rejected
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    node_text = yaml.safe_dump(workers)
    assert workers and ("p4d" in node_text or "acceleratorCount: 8" in node_text)
    assert config["provider"]["use_internal_ips"] is True


def _documents():
    return [(path, doc) for path in KUBERAY for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kuberay_manifests_parse_with_gpu_workers_and_a_self_deleting_job():
    kinds = {doc["kind"]: doc for _, doc in _documents()}
    assert {"RayCluster", "RayJob"} <= set(kinds)
    job = kinds["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    for spec in (kinds["RayCluster"]["spec"], job["rayClusterSpec"]):
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["resources"]["requests"] and head["resources"]["limits"]


def test_kuberay_entrypoint_is_a_valid_config_with_everything_in_a_bucket():
    from pipeline.config import load_config

    job = next(doc for _, doc in _documents() if doc["kind"] == "RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "pipeline"]
    config = words[words.index("--config") + 1]
    cfg = load_config(REPO / config, [w for w in words if "=" in w])  # names the field if anything is off
    assert all(location.startswith("s3://") for location in
               (cfg.data.path, cfg.data.cache_dir, cfg.model.cache_dir, cfg.train.output_dir))
    assert cfg.train.num_workers == 128 and cfg.train.zero_stage == 3


def test_the_clusters_scale_to_16_gpu_nodes_with_the_autoscaler_on():
    for path in LAUNCHERS:
        config = yaml.safe_load(path.read_text())
        workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
        assert config["max_workers"] >= 16 and max(t["max_workers"] for t in workers) >= 16, path
    for path, doc in _documents():
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["enableInTreeAutoscaling"] is True, path
        gpu = spec["workerGroupSpecs"][0]
        gpus = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert (gpu["minReplicas"], gpu["maxReplicas"], int(gpus)) == (0, 16, 8), path


def test_no_public_exposure_of_dashboard_or_gcs():
    for path, doc in _documents():
        specs = [doc["spec"]] if doc["kind"] == "RayCluster" else [doc["spec"].get("rayClusterSpec", {})]
        for spec in specs:
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path
        if doc["kind"] == "Service" and doc["spec"].get("type") in ("LoadBalancer", "NodePort"):
            ports = {p.get("port") for p in doc["spec"].get("ports", [])} | {
                p.get("targetPort") for p in doc["spec"].get("ports", [])}
            assert not ports & PRIVATE_PORTS, f"{path} exposes {ports & PRIVATE_PORTS} publicly"


DOCKERFILE = REPO / "clusters" / "Dockerfile"


def test_the_image_builds_on_a_cuda_devel_base_with_python_headers_and_a_prebuilt_fused_adam():
    text = DOCKERFILE.read_text()
    base = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    assert base.startswith("nvidia/cuda:") and "-devel-" in base  # nvcc for DeepSpeed's ops
    assert "python3.11-dev" in text  # Python.h, for Triton's launcher
    assert "DS_BUILD_FUSED_ADAM=1" in text and "--no-build-isolation" in text  # built against the CUDA torch
    assert all("-c constraints.txt" in line for line in text.splitlines() if "pip install" in line and "--no-deps" not in line
               and "--upgrade pip" not in line)


def _pip_report(tmp_path, *args: str, isolated: bool = False) -> dict:
    """`pip install --dry-run --report` (resolution only: nothing is installed). `isolated` leaves out
    this machine's pip configuration (its local CPU wheels) and asks the public index alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not (isolated and k in ("PIP_FIND_LINKS", "PIP_CONSTRAINT"))}
    if isolated:
        env["PIP_CONFIG_FILE"] = os.devnull
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return {item["metadata"]["name"].lower(): item for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_the_images_python_layer_resolves_against_the_constraints(tmp_path):
    """What this machine can check of the image's pip layer (the CUDA wheels themselves cannot be
    fetched here: clusters/README.md lists what stays unverified)."""
    import re

    # The torch the image installs is PyPI's Linux wheel, a CUDA build: its CUDA major version is
    # the one the devel base must bring for nvcc.
    torch_wheel = _pip_report(tmp_path, "--no-deps", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                              "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                              "-c", "constraints.txt", "torch", isolated=True)["torch"]
    cuda_majors = {m.group(1) for dep in torch_wheel["metadata"].get("requires_dist", [])
                   if (m := re.match(r"nvidia-\w+-cu(\d+)", dep))}
    base = next(line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("FROM "))
    assert cuda_majors == {base.split(":")[1].split(".")[0]}, (cuda_majors, base)
    # Everything else, as the image's `pip install -c constraints.txt -e .` resolves it (the local CPU
    # torch standing in for the CUDA one): every pin holds, and the set is consistent.
    resolved = _pip_report(tmp_path, "-c", "constraints.txt", "-e", ".")
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for name in ("torch", "ray", "deepspeed", "transformers", "mlflow", "triton", "pyarrow"):
        assert resolved[name]["metadata"]["version"].split("+")[0] == pins[name], name
