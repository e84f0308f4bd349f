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


def test_kuberay_entrypoint_names_a_config_that_exists():
    job = next(doc for _, doc in _documents() if doc["kind"] == "RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "pipeline"]
    config = words[words.index("--config") + 1]
    assert (REPO / config).is_file()


def test_no_public_exposure_of_dashboard_or_gcs():
    for path, doc in _documents():
        specs = [doc["spec"]] if doc["kind"] == "RayCluster" else [doc["spec"].get("rayClusterSpec", {})]
        for spec in specs:
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path
        if doc["kind"] == "Service" and doc["spec"].get("type") in ("LoadBalancer", "NodePort"):
            ports = {p.get("port") for p in doc["spec"].get("ports", [])} | {
                p.get("targetPort") for p in doc["spec"].get("ports", [])}
            assert not ports & PRIVATE_PORTS, f"{path} exposes {ports & PRIVATE_PORTS} publicly"
