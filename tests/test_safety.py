"""Never lose a user's files, never record an interrupted or weak audit, never open a door.

Unit tests for the verdict's control and statuses and for output claiming; the CLI on bad input
(exit 2, one line, nothing written); real subprocesses interrupted with SIGINT/SIGTERM during a
real audit and a real Ray Train protection; the sockets of a local Ray instance; `models:/`
references through every form of --tracking-uri.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sophon_ray.audit.verdict import headline, verdict
from sophon_ray.cli import main
from sophon_ray.errors import UserError
from sophon_ray.outputs import claim, guard

FAST = ["--smoke", "--set", "pretrain.steps=30", "--set", "protect.iterations=3"]
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# -- the verdict's control ------------------------------------------------------------------------

def _worst(protected, scratch, original=None):
    w = {"protected": dict(zip(("10", "50"), protected)), "scratch": dict(zip(("10", "50"), scratch))}
    if original is not None:
        w["original"] = dict(zip(("10", "50"), original))
    return w


def test_verdict_statuses_from_hand_made_tables():
    # passed: the source transfers (+0.30 at 10 steps), the protected model does not (+0.01)
    v = verdict(_worst([0.41, 0.80], [0.40, 0.82], [0.70, 0.85]), 0.02, "max", min_gap=0.10)
    assert v["status"] == "passed" and v["passed"] is True
    assert v["gap"] == pytest.approx({"10": 0.30, "50": 0.03}) and v["residual"] == pytest.approx({"10": 0.01, "50": -0.02})
    assert v["removed"]["10"] == pytest.approx(1 - 0.01 / 0.30) and v["removed"]["50"] == pytest.approx(1 + 0.02 / 0.03)
    assert v["control_gap"] == pytest.approx(0.30) and v["margin"] == pytest.approx(0.01)
    # inconclusive: the margin holds but the source is barely better than scratch (digits)
    v = verdict(_worst([0.848, 0.994], [0.848, 0.994], [0.848, 0.994]), 0.02, "max", min_gap=0.10)
    assert v["status"] == "inconclusive" and v["passed"] is False and "no power" in v["reason"]
    assert v["removed"] == {"10": None, "50": None}
    assert headline(v).startswith("verdict: INCONCLUSIVE") and "\n" not in headline(v)
    # inconclusive: no source attacked at all
    v = verdict(_worst([0.4, 0.8], [0.4, 0.8]), 0.02, "max", min_gap=0.10)
    assert v["status"] == "inconclusive" and v["gap"] == {} and "no control" in v["reason"]
    # failed: the protected model transfers; failed trials fail even a good margin
    v = verdict(_worst([0.65, 0.84], [0.40, 0.82], [0.70, 0.85]), 0.02, "max", min_gap=0.10)
    assert v["status"] == "failed" and v["margin"] == pytest.approx(0.25) and v["removed"]["10"] == pytest.approx(1 / 6)
    v = verdict(_worst([0.41, 0.80], [0.40, 0.82], [0.70, 0.85]), 0.02, "max", failed_trials=1, min_gap=0.10)
    assert v["status"] == "failed" and "1 planned trials failed" in v["reason"]
    assert verdict({}, 0.02)["status"] == "failed"


def test_verdict_for_a_minimising_attacker_flips_signs():
    # diffusion: lower MSE is better for the attacker; the source gives 0.05 less than scratch
    w = {"protected": {"25": 0.12}, "scratch": {"25": 0.11}, "original": {"25": 0.06}}
    v = verdict(w, 0.005, "min", min_gap=0.025)
    assert v["status"] == "passed" and v["gap"]["25"] == pytest.approx(0.05)
    assert v["residual"]["25"] == pytest.approx(-0.01) and v["removed"]["25"] == pytest.approx(1.2)
    w["original"]["25"] = 0.10
    assert verdict(w, 0.005, "min", min_gap=0.025)["status"] == "inconclusive"


def test_certification_needs_status_and_the_recorded_minimum():
    from sophon_ray.audit.driver import MINIMUM, certification

    std = {"max_budget": 100, "epsilon": 0.02, "min_gap": 0.10, **MINIMUM}
    strong = {"smoke": False, "recipes": 19, "seeds": 2, "budgets": [10, 25, 50, 100], "epsilon": 0.02, "min_gap": 0.10,
              "standard": std}
    assert certification({"status": "passed"}, strong) == {"certifies": True, "problems": []}
    assert not certification({"status": "inconclusive"}, strong)["certifies"]
    weak = {**strong, "smoke": True, "recipes": 4, "seeds": 1, "budgets": [1], "epsilon": 1.0, "min_gap": 0.0}
    problems = certification({"status": "passed"}, weak)["problems"]
    assert len(problems) == 6 and any("smoke" in p for p in problems) and any("largest budget 1" in p for p in problems)


# -- output paths ---------------------------------------------------------------------------------

def test_claim_refuses_foreign_paths_and_accepts_ours(tmp_path):
    user = tmp_path / "thesis"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not a sophon-ray model output.*--force"):
        claim(user, "model")
    with pytest.raises(UserError, match="not a sophon-ray model output"):
        guard(user, "model")  # library callers that skip claim are protected too
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        claim(plain, "model")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim(empty, "model") == empty and claim(tmp_path / "new" / "deeper", "audit")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "model.json").write_text(json.dumps({"format": "sophon-ray/model@1"}))
    (ours / "model.safetensors").write_bytes(b"")
    claim(ours, "model")
    with pytest.raises(UserError, match="not a sophon-ray audit output"):
        claim(ours, "audit")  # a model directory is not an audit folder
    assert claim(user, "model", force=True) == user
    guard(user, "model")  # claimed with --force in this process: may be replaced
    with pytest.raises(UserError, match="is a file, not a folder"):
        claim(plain / "sub", "model")
    with pytest.raises(UserError, match="cannot write"):
        claim("/proc/sophon-ray-out", "model")  # not writable, even for root


def test_pretrain_out_with_user_files_is_refused_then_replaced_with_force(tmp_path, capsys):
    out = tmp_path / "DIR"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "thesis.tex").write_text("years of work")
    rc = main(["pretrain", "digits", *FAST, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--force" in err[0]
    assert (out / "sub" / "thesis.tex").read_text() == "years of work" and len(list(out.iterdir())) == 1
    plain = tmp_path / "file"
    plain.write_text("mine")
    assert main(["pretrain", "digits", *FAST, "--out", str(plain)]) == 2 and plain.read_text() == "mine"
    assert not list(tmp_path.glob(".*"))  # nothing moved aside
    assert main(["pretrain", "digits", *FAST, "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.json", "model.safetensors"]
    assert main(["pretrain", "digits", *FAST, "--out", str(out)]) == 0  # our own output: replaced without --force
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["pretrain", "digits", "--smoke", "--set", "pretrain.steps=-5"], "pretrain.steps=-5"),
        (["pretrain", "digits", "--smoke", "--set", "pretrain.batch_size=0"], "pretrain.batch_size=0"),
        (["pretrain", "digits", "--smoke", "--set", "attack.budgets=[50,10]"], "attack.budgets"),
        (["run", "digits", "--smoke", "--workers", "-1"], "--workers -1"),
        (["protect", "digits", "--smoke", "--source", "x", "--workers", "0", "--resume"], "--resume"),
        (["audit", "digits", "--smoke", "--model", "x", "--epsilon", "-0.1"], "--epsilon -0.1"),
        (["audit", "digits", "--smoke", "--model", "x", "--epsilon", "nan"], "--epsilon nan"),
        (["audit", "digits", "--smoke", "--model", "x", "--epsilon", "1.5"], "[0, 1)"),
        (["audit", "digits", "--smoke", "--model", "x", "--min-gap", "-1"], "--min-gap"),
        (["run", "digits", "--smoke", "--epsilon", "inf"], "--epsilon inf"),
    ],
)
def test_impossible_configs_are_one_line_exit_2(argv, needle, tmp_path, capsys):
    rc = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_model_of_another_arch_or_edited_card_is_refused(tmp_path, capsys):
    tiny = tmp_path / "tiny"
    assert main(["pretrain", "digits", *FAST, "--set", "arch.name=cnn-tiny", "--out", str(tiny)]) == 0
    capsys.readouterr()
    rc = main(["attack", "digits", *FAST, "--model", str(tiny), "--recipe", "lr=0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "arch cnn-tiny" in err[-1] and "cnn-small" in err[-1]
    card = json.loads((tiny / "model.json").read_text())
    card["arch"] = {"name": "cnn-small", "kwargs": {}}  # edited: the weights are cnn-tiny's
    (tiny / "model.json").write_text(json.dumps(card))
    rc = main(["attack", "digits", *FAST, "--model", str(tiny), "--recipe", "lr=0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "do not fit" in err[0]


def test_unreachable_ray_address_fails_fast_for_audit(tmp_path, capsys):
    src = tmp_path / "source"
    assert main(["pretrain", "digits", *FAST, "--out", str(src)]) == 0
    capsys.readouterr()
    t = time.time()
    rc = main(["audit", "digits", "--smoke", "--model", str(src), "--ray-address", "127.0.0.1:9",
               "--out", str(tmp_path / "audit")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "unreachable" in err[-1] and time.time() - t < 30
    assert not (tmp_path / "audit").exists()


# -- local Ray listens on the loopback address only --------------------------------------------

def test_local_ray_listens_on_loopback_only():
    import psutil
    import ray

    from sophon_ray import ray_local

    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             **ray_local.local_init_kwargs())
    try:
        me = psutil.Process()
        pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
        listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert len(listening) >= 3  # GCS, raylet, this driver's core worker at least
        wild = [(c.laddr, c.pid) for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        assert wild == [], wild
    finally:
        ray_local.shutdown()


# -- models:/ references through every form of --tracking-uri ----------------------------------

def _cli(args, cwd, env=None, timeout=300):
    return subprocess.run([str(BIN / "sophon-ray"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_models_uri_resolves_through_every_tracking_uri_form(tmp_path):
    from sophon_ray.tracking.testing import mlflow_server

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["SOPHON_RAY_CACHE"] = str(tmp_path / "cache")
    work = tmp_path / "work"
    work.mkdir()
    src = tmp_path / "source"
    r = _cli(["pretrain", "digits", *FAST, "--out", str(src)], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    # the default store (./mlruns under the working directory): register via protect, then use the alias
    r = _cli(["protect", "digits", *FAST, "--source", str(src), "--out", str(tmp_path / "p")], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(["attack", "digits", *FAST, "--model", "models:/sophon-digits@candidate", "--recipe", "lr=0.01"], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (work / "mlflow.db").exists()  # no stray store from MLflow's own default
    for form in ("mlruns", f"sqlite:///{work}/mlruns/mlflow.db", str(work / "mlruns")):
        r = _cli(["attack", "digits", *FAST, "--model", "models:/sophon-digits@candidate", "--recipe", "lr=0.01",
                  "--tracking-uri", form], tmp_path if form != "mlruns" else work, env)
        assert r.returncode == 0, (form, r.stderr[-2000:])
    with mlflow_server(tmp_path / "server") as uri:
        r = _cli(["protect", "digits", *FAST, "--source", str(src), "--out", str(tmp_path / "p2"), "--tracking-uri", uri],
                 tmp_path, env)
        assert r.returncode == 0, r.stderr[-2000:]
        r = _cli(["attack", "digits", *FAST, "--model", "models:/sophon-digits@candidate", "--recipe", "lr=0.01",
                  "--tracking-uri", uri], tmp_path, env)
        assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()


# -- interrupts: real processes, real signals -------------------------------------------------

def _wait_for(proc, path: Path, needle: str, timeout: float) -> str:
    """Poll `path` (the process's stderr) until `needle` appears; returns the text so far."""
    end = time.time() + timeout
    while time.time() < end:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) before {needle!r}:\n{text[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no {needle!r} within {timeout}s")


def _interrupt(args, cwd, env, needle, sig, tmp_path, timeout=240):
    log = tmp_path / f"stderr-{sig}.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(BIN / "sophon-ray"), *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=f)
        _wait_for(proc, log, needle, timeout)
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the process did not stop within 90 s of the signal")
    return rc, log.read_text()


@pytest.mark.slow  # ~40 s: a real audit on a local Ray stopped by Ctrl-C (SIGTERM: the protect test below)
def test_interrupted_audit_writes_no_verdict_and_keeps_the_alias(tmp_path):
    from mlflow import MlflowClient

    env = {**os.environ, "SOPHON_RAY_CACHE": str(tmp_path / "cache")}
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env["MLFLOW_TRACKING_URI"] = uri
    src, prot = tmp_path / "source", tmp_path / "protected"
    assert main(["pretrain", "digits", *FAST, "--out", str(src)]) == 0
    assert main(["protect", "digits", *FAST, "--source", str(src), "--out", str(prot), "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    client.set_registered_model_alias("sophon-digits", "audited", "1")  # as if a strong audit had certified it
    for sig, code in ((signal.SIGINT, 130),):
        out = tmp_path / f"audit-{sig}"
        rc, err = _interrupt(["audit", "digits", "--smoke", "--model", str(prot), "--suite", "test-v1",
                              "--budgets", "200", "--concurrency", "1", "--out", str(out)],
                             tmp_path, env, "audit 1/", sig, tmp_path)
        assert rc == code, err[-2000:]
        assert "interrupted" in err.splitlines()[-1] and "Traceback" not in err
        assert not (out / "audit.json").exists() and not (out / "report.html").exists()
        assert client.get_registered_model("sophon-digits").aliases.get("audited") in ("1", 1)
        assert not any(k.startswith("audit") for k in client.get_model_version("sophon-digits", "1").tags)
        runs = client.search_runs([client.get_experiment_by_name("sophon-ray").experiment_id],
                                  "tags.kind = 'audit'", order_by=["attributes.start_time DESC"])
        assert runs[0].info.status == "KILLED"


@pytest.mark.slow  # ~40 s: a real Ray Train protection stopped by SIGTERM
def test_interrupted_protect_writes_no_model(tmp_path):
    env = dict(os.environ)
    src, out = tmp_path / "source", tmp_path / "protected"
    assert main(["pretrain", "digits", *FAST, "--out", str(src)]) == 0
    rc, err = _interrupt(["protect", "digits", "--smoke", "--set", "protect.iterations=40", "--source", str(src),
                          "--workers", "1", "--out", str(out)], tmp_path, env, "protect 2", signal.SIGTERM, tmp_path)
    assert rc == 143, err[-2000:]
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(".protected*"))
