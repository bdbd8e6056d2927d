"""Distributed protection on a real local Ray cluster: end to end, equivalence, faults, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sophon_ray
from sophon_ray import jobs
from sophon_ray.cli import main
from sophon_ray.errors import UserError

NO_BN = ["--set", "arch.kwargs={'width': 8, 'norm': 'none'}"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from sophon_ray.ray_local import local_init_kwargs, shutdown
    from sophon_ray.train.driver import quiet_ray_env

    quiet_ray_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, **local_init_kwargs())
    yield
    shutdown()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    assert main(["pretrain", "digits", "--smoke", "--out", str(root / "source")]) == 0
    assert main(["pretrain", "digits", "--smoke", *NO_BN, "--out", str(root / "source_nobn")]) == 0
    return root


def _protect(cfg, src, out, workers, **kw):
    from sophon_ray.train.driver import protect_distributed

    return protect_distributed(cfg, src, out, workers=workers, log=lambda m: None, **kw)


def test_two_workers_end_to_end(ray_local, source, capsys):
    out = source / "prot2"
    rc = main(["protect", "digits", "--smoke", "--source", str(source / "source"), "--out", str(out), "--workers", "2"])
    assert rc == 0
    model, card = sophon_ray.load_model(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert card["role"] == "protected" and metrics["iterations"] == 6 and metrics["workers"] == 2
    assert 0.0 <= metrics["original_test_accuracy"] <= 1.0
    err = capsys.readouterr().err
    assert "protect 6/6" in err and "2 workers" in err  # driver progress lines
    # Where the wall time went: every phase present, none negative, and together they cover the run.
    t = metrics["timings"]
    phases = ["imports", "prepare", "ray_init", "materialise_and_trainer", "to_worker_process", "worker_boot",
              "worker_setup", "loop", "final_report", "shutdown", "finish"]
    assert list(t) == phases and all(v >= -1.0 for v in t.values())  # -1: /proc boot time has 1 s resolution
    assert t["loop"] > 0 and t["shutdown"] < 10, t  # a 12 s shutdown is the stale State API address stall


def test_one_and_two_workers_give_the_same_parameters(ray_local, source):
    cfg = jobs.get_pipeline("digits", smoke=True, overrides=[NO_BN[1], "protect.iterations=3", "protect.guard_margin=1.0"])
    src = source / "source_nobn"
    one = _protect(cfg, src, source / "eq1", workers=1)
    two = _protect(cfg, src, source / "eq2", workers=2)
    local = jobs.protect(cfg, src, source / "eq0", log=lambda m: None)
    m1, card1 = sophon_ray.load_model(one)
    m2, _ = sophon_ray.load_model(two)
    assert card1["lineage"]["environment"]["torch_threads"] == 1  # the Ray worker's (1 CPU), written by rank 0
    m0, _ = sophon_ray.load_model(local)
    s0 = sophon_ray.load_model(src)[0].state_dict()
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, atol=1e-5, rtol=0)
        torch.testing.assert_close(m0.state_dict()[k], v, atol=1e-5, rtol=0)
    assert any(not torch.equal(v, s0[k]) for k, v in m1.state_dict().items())  # it did train


def test_worker_crash_recovers_from_checkpoint(ray_local, source):
    cfg = jobs.get_pipeline("digits", smoke=True)
    out = _protect(cfg, source / "source", source / "fault", workers=2, checkpoint_every=2, report_every=1,
                   fault={"iteration": 3, "rank": 1}, max_failures=2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 6
    run_dir = Path(json.loads((out / "model.json").read_text())["lineage"]["protect"]["storage"]) / metrics["ray_run"]
    assert (run_dir / "fault-injected").read_text() == "3"
    # rank 1 died after iteration 3; the run restarted from the checkpoint at iteration 2, so
    # iteration 3 ran (and was reported) twice, iterations 1-2 once
    reported = [json.loads(x)["iteration"] for x in (run_dir / "progress.jsonl").read_text().splitlines()]
    assert reported == [1, 2, 3, 3, 4, 5, 6]


@pytest.mark.slow
def test_resume_after_driver_interrupted(source, tmp_path):
    out, storage = tmp_path / "prot", tmp_path / "storage"
    argv = [sys.executable, "-m", "sophon_ray.cli", "protect", "digits", "--smoke", "--source", str(source / "source"),
            "--out", str(out), "--workers", "1", "--storage-path", str(storage),
            "--set", "protect.iterations=40", "--set", "protect.guard_every=5"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    progress = None
    while time.time() < deadline:
        found = list(storage.glob("*/checkpoint_*"))
        if found:
            progress = found[0].parent / "progress.jsonl"
            break
        time.sleep(0.5)
    assert progress is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGINT)  # Ctrl-C on the driver: it stops and shuts its local Ray down
    assert proc.wait(timeout=60) != 0
    assert not out.exists()
    interrupted_at = max(json.loads(x)["iteration"] for x in progress.read_text().splitlines())
    assert interrupted_at < 40
    r = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 40
    first = json.loads(progress.read_text().splitlines()[0])["iteration"]
    assert first > 4  # the resumed run started from a checkpoint, not from iteration 0


def test_too_many_workers_fails_fast(source, capsys):
    t = time.time()
    rc = main(["protect", "digits", "--smoke", "--source", str(source / "source"), "--workers", "64", "--out", str(source / "x")])
    assert rc == 2 and "--workers 64 needs" in capsys.readouterr().err and time.time() - t < 20
    assert not (source / "x").exists()


def test_unreachable_ray_address_fails_fast(source, capsys):
    t = time.time()
    rc = main(["protect", "digits", "--smoke", "--source", str(source / "source"), "--workers", "1",
               "--ray-address", "127.0.0.1:9", "--out", str(source / "y")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unreachable" in err[0] and time.time() - t < 20


def test_checkpoint_roundtrip_is_weights_only(tmp_path):
    from sophon_ray.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = jobs.get_pipeline("digits", smoke=True)
    t = jobs.load_tensors(cfg)
    a, b = jobs.new_model(cfg, 5, 0), jobs.new_model(cfg, 5, 1)
    pa, pb = jobs.build_protection(cfg, a, t, 1.0), jobs.build_protection(cfg, b, t, 1.0)
    pa.step()
    save_checkpoint(pa, tmp_path)
    load_checkpoint(pb, tmp_path)
    assert pb.iteration == 1
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    (tmp_path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(pb, tmp_path)


def test_checkpoint_of_another_version_is_refused_in_one_line(tmp_path):
    """A state.pt holding torch.optim state dicts (sophon-ray before core/optim.py) must not resume."""
    from sophon_ray.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = jobs.get_pipeline("digits", smoke=True)
    t = jobs.load_tensors(cfg)
    model = jobs.new_model(cfg, 5, 0)
    prot = jobs.build_protection(cfg, model, t, 1.0)
    save_checkpoint(prot, tmp_path)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    state["fts"] = torch.optim.Adam(model.parameters(), lr=1e-3).state_dict()
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(UserError, match="does not fit this protection run.*start without --resume"):
        load_checkpoint(prot, tmp_path)


def test_local_shutdown_drops_our_state_api_address(monkeypatch):
    """A stopped local instance's dashboard address must not leak into later Ray use (it made the
    e2e test's `ray job list` against another head hang in a full test run)."""
    from sophon_ray import ray_local

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    port = ray_local.local_init_kwargs()["dashboard_port"]
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    ray_local.shutdown()  # no Ray running here: ray.shutdown() is a no-op
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265")  # the user's own: kept
    ray_local.local_init_kwargs()
    ray_local.shutdown()
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.1:8265"


def test_lean_trainer_drops_only_the_helper_actors_this_job_cannot_use():
    import ray.train

    from sophon_ray.train.driver import lean_trainer_class

    def names(own_instance: bool, datasets=None) -> set[str]:
        trainer = lean_trainer_class(own_instance)(lambda config: None, datasets=datasets,
                                                   scaling_config=ray.train.ScalingConfig(num_workers=1))
        return {type(c).__name__ for c in trainer._create_default_callbacks()}

    own, shared = names(True), names(False)
    assert "BackendSetupCallback" in own and not {"DatasetsCallback", "PlacementGroupCleanerCallback"} & own
    assert shared == own | {"PlacementGroupCleanerCallback"}  # a shared cluster keeps the placement-group safety net
    assert "DatasetsCallback" in names(True, {"train": lambda: None})  # datasets given: Train's own handling
