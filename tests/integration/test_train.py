"""Distributed protection on a real local Ray cluster: end to end, equivalence with the local
protection, a worker crash recovered from a checkpoint, fast failures, checkpoints, the lean
trainer. (Resuming after Ctrl-C on the driver: tests/e2e/test_signals.py.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import sophon_ray
from sophon_ray import tasks
from sophon_ray.app.cli import main
from sophon_ray.errors import UserError

NO_BN = ["--set", "arch.kwargs={'width': 8, 'norm': 'none'}"]


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
    task = tasks.of(tasks.get_pipeline("digits", smoke=True))
    t = task.load_tensors()
    n = len(t.original_test[1])  # the recorded accuracy is the model's (Ray's worker threads may flip a near tie)
    assert task.original_metric(model, t) == pytest.approx(metrics["original_test_accuracy"], abs=1.5 / n)
    err = capsys.readouterr().err
    assert "protect 6/6" in err and "2 workers" in err  # driver progress lines
    # Where the wall time went (in the Ray run directory, not in the model's metrics.json): every
    # phase present, none negative, and together they cover the run.
    from sophon_ray.train.driver import timings_of

    assert "timings" not in metrics and "seconds" not in metrics
    t = timings_of(out)
    phases = ["imports", "prepare", "ray_init", "materialise_and_trainer", "to_worker_process", "worker_boot",
              "worker_setup", "loop", "final_report", "shutdown", "finish"]
    assert list(t) == phases and all(v >= -1.0 for v in t.values())  # -1: /proc boot time has 1 s resolution
    assert t["loop"] > 0 and t["shutdown"] < 10, t  # a 12 s shutdown is the stale State API address stall


def test_one_and_two_workers_give_the_same_parameters(ray_local, source):
    cfg = tasks.get_pipeline("digits", smoke=True, overrides=[NO_BN[1], "protect.iterations=3", "protect.guard_margin=1.0"])
    src = source / "source_nobn"
    one = _protect(cfg, src, source / "eq1", workers=1)
    two = _protect(cfg, src, source / "eq2", workers=2)
    local = tasks.of(cfg).protect(src, source / "eq0", log=lambda m: None)
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
    cfg = tasks.get_pipeline("digits", smoke=True)
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

    task = tasks.of(tasks.get_pipeline("digits", smoke=True))
    t = task.load_tensors()
    a, b = task.new_model(5, 0), task.new_model(5, 1)
    pa, pb = task.build_protection(a, t, 1.0), task.build_protection(b, t, 1.0)
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

    task = tasks.of(tasks.get_pipeline("digits", smoke=True))
    t = task.load_tensors()
    model = task.new_model(5, 0)
    prot = task.build_protection(model, t, 1.0)
    save_checkpoint(prot, tmp_path)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    state["fts"] = torch.optim.Adam(model.parameters(), lr=1e-3).state_dict()
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(UserError, match="does not fit this protection run.*start without --resume"):
        load_checkpoint(prot, tmp_path)


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
