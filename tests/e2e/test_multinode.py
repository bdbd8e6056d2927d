"""A real two-node Ray cluster on one machine (issue 20.2), driven through the `sophon-ray` CLI.

A head and a second node (`ray start --address`), 1 CPU each, all on 127.0.0.1 with their own
temp dirs and ports; `sophon-ray protect digits --workers 2 --ray-address ...` then places one
worker per node (1 CPU per worker). The protected weights must equal, bit for bit, those of the
same `--workers 2` protection on one 2-CPU node. Then the second node is killed mid-run (its
whole process session, as a lost machine) and a replacement joins: Ray Train's FailureConfig
restarts from the last checkpoint and the run finishes with every iteration and a valid model.
The cluster helpers live in benchmarks/multinode.py (which also times all this).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # minutes: `make test-slow`

ITERATIONS = 8  # a checkpoint every iteration (the driver's default: iterations // 10, at least 1)


def _root() -> Path:
    for d in Path(__file__).resolve().parents:  # tests/ may gain subfolders: find the repo root
        if (d / "pyproject.toml").exists() and (d / "benchmarks" / "multinode.py").exists():
            return d
    raise RuntimeError("repository root with benchmarks/multinode.py not found")


def _load_helpers():
    path = _root() / "benchmarks" / "multinode.py"
    spec = importlib.util.spec_from_file_location("sophon_bench_multinode", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


mn = _load_helpers()


@pytest.fixture(scope="module")
def cluster_and_single(tmp_path_factory):
    """(cluster, source model dir, work dir, single-node result): the two-node cluster starts while
    the source is pretrained and protected on one node (two CLI runs in a thread)."""
    root = tmp_path_factory.mktemp("multinode")
    env = mn.base_env()  # MLFLOW_TRACKING_URI: conftest's per-session SQLite store

    def reference():
        src = mn.pretrain("digits", root, env)
        return src, mn.run_single("digits", src, root, env, ITERATIONS)

    with ThreadPoolExecutor(1) as pool:
        ref = pool.submit(reference)
        with mn.local_cluster() as cluster:
            cluster.start_head(num_cpus=1)
            cluster.add_node("node2", num_cpus=1)
            cluster.env["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
            src, single = ref.result()
            yield cluster, src, root, single


def test_two_nodes_one_worker_each_equal_single_node_bit_for_bit(cluster_and_single):
    cluster, src, root, single = cluster_and_single
    two = mn.run_two_nodes(cluster, "digits", src, root, ITERATIONS)
    assert two["train_workers_seen"] == {"head": 1, "node2": 1}  # placement: one worker per node
    assert two["metrics"]["iterations"] == ITERATIONS and two["metrics"]["workers"] == 2
    assert two["sha256"] == single["sha256"]  # the weights, bit for bit
    assert mn.file_sha(Path(two["out"]) / "model.safetensors") == two["sha256"]


def test_losing_a_node_mid_run_recovers_from_checkpoint(cluster_and_single):
    import sophon_ray

    cluster, src, root, single = cluster_and_single
    loss = mn.run_node_loss(cluster, "digits", src, root, ITERATIONS, kill_after=2, replace_delay=0.0)
    its = loss["reported_iterations"]
    assert loss["metrics"]["iterations"] == ITERATIONS and its[-1] == ITERATIONS
    # a restarted worker group continued from a checkpoint taken before the loss (not from 0)
    resumed = loss["resumed_from_iteration"]
    assert resumed is not None and 1 <= resumed <= loss["killed_at_iteration"] + 1, loss
    assert sorted(set(its)) == list(range(1, ITERATIONS + 1))  # no iteration skipped
    model, card = sophon_ray.load_model(loss["out"])  # checks the sha256 of model.safetensors
    assert card["role"] == "protected" and loss["safetensors_sha_ok"]
    # the checkpoint holds the whole state (weights, both optimizers, guard, iteration, RNG) and every
    # iteration's randomness derives from (seed, iteration): the recovered run is the same run
    assert loss["sha256"] == single["sha256"]
    assert loss["recovery_s"] is not None and loss["recovery_s"] < 300
    print(json.dumps({k: loss[k] for k in ("killed_at_iteration", "resumed_from_iteration", "recovery_s",
                                           "restart_after_capacity_s", "replacement_join_s", "wall_s")}))
