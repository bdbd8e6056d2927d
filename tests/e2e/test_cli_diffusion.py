"""The console script on a diffusion pipeline, as for classification: pretrain, protect, attack,
samples, and one-line exit-2 errors for bad input (digits-diffusion smoke models)."""

from __future__ import annotations

import json

import pytest

from sophon_ray import tasks
from sophon_ray.app.cli import main
from sophon_ray.config import Recipe

from tests.support import one_thread

SMOKE = ["--smoke"]



@pytest.fixture(autouse=True)
def _one_thread():
    """torch on one thread (restored after each test): in-process UNet attacks on a busy 2-core
    machine ran several times slower with a second thread spin-waiting."""
    with one_thread():
        yield

def test_cli_pretrain_protect_attack(diffusion_models, tmp_path, capsys):
    for role in ("source", "protected"):
        card = json.loads((diffusion_models / role / "model.json").read_text())
        assert card["kind"] == "diffusion" and card["role"] == role and card["lineage"]["stage_hash"]
        metrics = json.loads((diffusion_models / role / "metrics.json").read_text())
        assert {"original_test_mse", "restricted_test_mse"} <= set(metrics)
    rc = main(["attack", "digits-diffusion", *SMOKE, "--model", str(diffusion_models / "protected"),
               "--recipe", "strategy=up,optimizer=adam,lr=1e-3,batch_size=8", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "attack.json").read_text())
    assert result["metric"] == "mse" and list(result["curve"]) == ["2", "4"]
    # the console script runs the library's seeded attack: the same curve in-process
    task = tasks.of(tasks.get_pipeline("digits-diffusion", smoke=True))
    again = task.attack(diffusion_models / "protected", Recipe("up", "adam", 1e-3, 8), seed=0)
    assert result["curve"] == pytest.approx({str(k): v for k, v in again.items()}, rel=1e-6)
    assert "restricted mse" in capsys.readouterr().out


def test_samples_command_writes_grids_and_judge_metric(diffusion_models, tmp_path, capsys):
    out = tmp_path / "samples"
    rc = main(["samples", "digits-diffusion", *SMOKE, "--model", str(diffusion_models / "protected"), "--steps", "2",
               "--set", "diffusion.samples=4", "--set", "diffusion.sample_steps=3",
               "--set", "diffusion.judge.pretrain.steps=20", "--out", str(out)])
    assert rc == 0
    info = json.loads((out / "samples.json").read_text())
    assert info["steps"] == 2 and info["recipe"]["strategy"] == "all" and set(info["subjects"]) == {
        "protected", "scratch", "original"}
    assert all((out / row["after"]["grid"]).is_file() for row in info["subjects"].values())
    assert (out / "judge" / "model.json").is_file()  # trained once, cached for the next call
    # the judge metric: per subject and moment, the fractions of the 4 samples the judge recognised
    # as a restricted digit and rejected as no digit; disjoint, so they sum to at most 1
    judge = info["judge"]
    assert judge["classes"] == [5, 6, 7, 8, 9] and 0 <= judge["test_accuracy"] <= 1
    printed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if "recognised" in line}
    assert set(printed) == set(info["subjects"])
    for name, row in info["subjects"].items():
        moments = [w for w in ("before", "after") if w in row]
        assert moments == (["after"] if name == "scratch" else ["before", "after"])  # scratch has no "before"
        for when in moments:
            rec, rej = row[when]["recognised"], row[when]["rejected"]
            assert 0 <= rec <= 1 and 0 <= rej <= 1 and rec + rej <= 1 + 1e-9, (name, when, rec, rej)
            assert rec * 4 == pytest.approx(round(rec * 4)) and rej * 4 == pytest.approx(round(rej * 4))
        # what the command printed is what samples.json holds
        assert f"recognised {({w: row[w]['recognised'] for w in moments})}" in printed[name]
        assert f"rejected as no digit {({w: row[w]['rejected'] for w in moments})}" in printed[name]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """An (untrained) digits classifier model directory: the wrong kind for digits-diffusion."""
    from sophon_ray.modeldir import save_model_dir

    task = tasks.of(tasks.get_pipeline("digits", smoke=True))
    t = task.load_tensors()
    d = tmp_path_factory.mktemp("classifier") / "model"
    return save_model_dir(d, task.new_model(t.num_classes, 0), task.make_card(t, "source", {}), {})


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["pretrain", "digits-diffusion", "--set", "input.size=15"], "not divisible by the UNet's down-sampling factor"),
        (["attack", "digits-diffusion", "--model", "{protected}", "--set", "input.channels=3"],
         "takes 1-channel images but pipeline"),
        (["attack", "digits-diffusion", "--model", "{protected}", "--recipe", "strategy=direct-FC"], "is for classifiers"),
        (["attack", "digits-diffusion", "--model", "{classifier}"], "kind classifier != diffusion"),
        (["protect", "digits-diffusion", "--local", "--source", "{classifier}"], "kind classifier != diffusion"),
        (["audit", "digits-diffusion", "--model", "{protected}", "--suite", "default-v1"], "for diffusion pipelines"),
        (["attack", "digits", "--model", "{protected}"], "kind diffusion != classifier"),
        (["samples", "digits", "--model", "{protected}"], "needs a diffusion pipeline"),
    ],
)
def test_bad_input_is_one_line_exit_2(diffusion_models, classifier_dir, argv, needle, tmp_path, capsys):
    argv = [a.format(protected=diffusion_models / "protected", classifier=classifier_dir) for a in argv]
    rc = main([*argv, *SMOKE, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()
