"""Output claiming: a folder that is not a sophon-ray output of the right kind is never replaced
without --force; files, unwritable paths and foreign folders are refused in one line."""

from __future__ import annotations

import json

import pytest

from sophon_ray.errors import UserError
from sophon_ray.outputs import claim, guard


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
    assert claim(empty, "model") == empty and claim(tmp_path / "new" / "deeper", "audit") == tmp_path / "new" / "deeper"
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
