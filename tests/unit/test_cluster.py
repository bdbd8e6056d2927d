"""Every YAML in cluster/ parses and carries the fields its kind requires."""

from __future__ import annotations

import pytest
import yaml

from tests.support import ROOT

CLUSTER = ROOT / "cluster"


def docs():
    for path in sorted(CLUSTER.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield pytest.param(path.name, doc, id=f"{path.name}#{i}")


def test_cluster_folder_has_the_promised_files():
    names = {p.name for p in CLUSTER.iterdir()}
    assert {"ray-cluster-gpu.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "runtime_env.yaml",
            "mlflow-server.yaml", "README.md"} <= names


def _pod_containers(template):
    containers = template["spec"]["containers"]
    assert containers and all("image" in c and "name" in c for c in containers)
    return containers


@pytest.mark.parametrize("name,doc", list(docs()))
def test_yaml_has_required_fields(name, doc):
    kind = doc.get("kind")
    if name == "ray-cluster-gpu.yaml":
        for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
            assert key in doc
        assert doc["head_node_type"] in doc["available_node_types"]
        assert any("shm-size" in o for o in doc["docker"]["run_options"])
    elif name == "runtime_env.yaml":
        assert "working_dir" in doc and ".venv/" in doc["excludes"]
        assert doc["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
        assert any(p.startswith("torch==") for p in doc["pip"]["packages"])
    elif kind == "RayCluster":
        assert doc["apiVersion"] == "ray.io/v1"
        _pod_containers(doc["spec"]["headGroupSpec"]["template"])
        for group in doc["spec"]["workerGroupSpecs"]:
            assert "groupName" in group
            _pod_containers(group["template"])
    elif kind == "RayJob":
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["spec"]["entrypoint"].startswith("sophon-ray run")
        assert "runtimeEnvYAML" in doc["spec"]
        yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        _pod_containers(doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
    elif kind in ("Deployment", "StatefulSet"):
        assert doc["spec"]["selector"]["matchLabels"] == doc["spec"]["template"]["metadata"]["labels"]
        _pod_containers(doc["spec"]["template"])
    elif kind == "Service":
        assert doc["spec"]["ports"] and doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    elif kind == "PersistentVolumeClaim":
        assert "ReadWriteMany" in doc["spec"]["accessModes"]
    else:
        pytest.fail(f"{name}: unexpected document kind {kind!r}")
