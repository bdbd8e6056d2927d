"""`sophon-ray harden` before any work: bad input is one line and exit 2, the output folder is
claimed like every other output, and a folder holding a harden of other settings is refused."""

from __future__ import annotations

import json

import pytest

from sophon_ray.app.cli import main
from sophon_ray.errors import UserError


@pytest.mark.parametrize("argv,needle", [
    (["harden", "digits", "--smoke", "--source", "x", "--rounds", "0"], "--rounds 0"),
    (["harden", "digits", "--smoke", "--source", "x", "--rounds", "2", "--feedback", "0"], "--feedback 0"),
    (["harden", "digits", "--smoke", "--source", "x"], "--rounds N"),
    (["harden", "digits", "--smoke", "--source", "x", "--rounds", "2", "--workers", "-1"], "--workers -1"),
    (["harden", "digits", "--smoke", "--source", "x", "--rounds", "2", "--epsilon", "2"], "--epsilon"),
    (["harden", "digits", "--smoke", "--source", "/nonexistent", "--rounds", "2"], "/nonexistent"),
    (["run", "digits", "--smoke", "--rounds", "0"], "--rounds 0"),
    # every audit flag is checked before the first round (issue 35: a typo used to cost a protection)
    (["harden", "digits", "--smoke", "--source", "x", "--rounds", "1", "--suite", "no-such-suite"], "no-such-suite"),
    (["harden", "digits", "--smoke", "--source", "x", "--rounds", "1", "--seeds", "0"], "--seeds 0"),
    (["harden", "digits", "--smoke", "--source", "x", "--rounds", "1", "--search", "0"], "--search 0"),
    (["harden", "digits", "--smoke", "--source", "x", "--rounds", "1", "--suite", "paper-v1", "--search", "9"],
     "fixed protocol"),
    (["run", "digits", "--smoke", "--suite", "no-such-suite"], "no-such-suite"),
    (["run", "digits", "--smoke", "--rounds", "1", "--seeds", "0"], "--seeds 0"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    rc = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything was claimed or written


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "model.json").write_text(json.dumps({"format": "sophon-ray/model@1"}))
    (path / "model.safetensors").write_bytes(b"")


def test_the_output_folder_is_claimed_like_any_other(tmp_path, capsys):
    from sophon_ray.outputs import claim

    root = tmp_path / "h"
    _model_dir(root / "round-1" / "protected")
    (root / "round-1" / "audit").mkdir()
    (root / "round-1" / "audit" / "audit.json").write_text("{}")
    (root / "harden.json").write_text("{}")
    (root / "removed.png").write_bytes(b"")
    assert claim(root, "harden") == root  # ours: rounds, state, plot
    (root / "round-1" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a sophon-ray harden output.*--force"):
        claim(root, "harden")
    rc = main(["harden", "digits", "--smoke", "--source", "x", "--rounds", "1", "--out", str(root)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    (root / "round-1" / "notes.txt").unlink()
    (root / "round-x").mkdir()
    with pytest.raises(UserError):
        claim(root, "harden")


def test_a_harden_of_other_settings_is_refused_unless_force(tmp_path):
    from sophon_ray.app.harden import _open_state
    from sophon_ray.outputs import write_json_atomic
    from sophon_ray.pipelines import load

    cfg, root = load("digits", smoke=True), tmp_path / "h"
    settings = {"feedback": 3, "source_sha256": "ab" * 32, "suite": "test-v1"}
    state = _open_state(root, cfg, settings, tmp_path / "src", force=False)
    assert state["rounds"] == [] and state["key"].startswith("64e52861-")
    root.mkdir()
    write_json_atomic(root / "harden.json", {**state, "rounds": [{"round": 1}]})
    _model_dir(root / "round-1" / "protected")
    assert _open_state(root, cfg, settings, tmp_path / "src", force=False)["rounds"] == [{"round": 1}]  # continues
    other = {**settings, "feedback": 1}
    with pytest.raises(UserError, match="other settings.*--force"):
        _open_state(root, cfg, other, tmp_path / "src", force=False)
    assert _open_state(root, cfg, other, tmp_path / "src", force=True)["rounds"] == []
    assert not (root / "round-1").exists() and not (root / "harden.json").exists()
    (root / "harden.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a sophon-ray harden state"):
        _open_state(root, cfg, settings, tmp_path / "src", force=False)


def test_a_start_that_is_not_protected_from_the_source_is_refused_before_any_work(digits_models, tmp_path, capsys):
    src, prot = digits_models / "source", digits_models / "protected"
    base = ["harden", "digits", "--smoke", "--rounds", "1", "--out", str(tmp_path / "out")]
    for argv, needle in [(["--source", str(src), "--start", str(src)], "not a model protected from this --source"),
                         (["--source", str(prot), "--start", str(prot)], "not a model protected from this --source"),
                         (["--source", str(src), "--start", str(tmp_path / "nope")], "nope")]:
        rc = main([*base, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_start_is_part_of_the_harden_state_key(digits_models, tmp_path):
    from sophon_ray import tasks
    from sophon_ray.app.harden import _open_state, check_start
    from sophon_ray.modeldir import read_card
    from sophon_ray.pipelines import load

    cfg = load("digits", smoke=True)
    src_card = read_card(digits_models / "source")
    card = check_start(tasks.of(cfg), src_card, digits_models / "protected")
    assert card["lineage"]["source"]["sha256"] == src_card["sha256"]
    plain = {"feedback": 3, "source_sha256": src_card["sha256"]}
    started = {**plain, "start_sha256": card["sha256"]}
    a = _open_state(tmp_path / "a", cfg, plain, tmp_path, force=False)["key"]
    b = _open_state(tmp_path / "b", cfg, started, tmp_path, force=False)["key"]
    assert a != b  # a harden from a start never continues one from the source (or another start)
