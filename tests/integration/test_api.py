"""The Python API (`import sophon_ray as sr`): the CLI's code paths from a notebook (issue 19)."""

from __future__ import annotations

import json

import pytest
import torch

import sophon_ray as sr
from sophon_ray.errors import UserError
from tests.support import one_thread


def test_api_pretrain_protect_and_refusals(tmp_path):
    """pipeline -> pretrain -> protect in-process, the same model directories and MLflow
    registration as the CLI; a folder holding someone else's files is refused unless force."""
    with one_thread():
        cfg = sr.pipeline("digits", smoke=True, overrides=["pretrain.steps=20", "protect.iterations=2"])
        assert cfg.pretrain.steps == 20 and cfg.protect.iterations == 2
        src = sr.pretrain(cfg, tmp_path / "src")
        prot = sr.protect(cfg, src, tmp_path / "prot")
        model, card = sr.load_model(prot)
        assert card["role"] == "protected" and card["lineage"]["source"]["sha256"] == sr.load_model(src)[1]["sha256"]
        metrics = json.loads((prot / "metrics.json").read_text())
        assert metrics["iterations"] == 2 and "seconds" not in metrics
        x = torch.zeros(1, 1, 16, 16)
        assert model(x).shape == (1, 5)
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        (theirs / "notes.txt").write_text("mine")
        with pytest.raises(UserError, match="force"):
            sr.pretrain(cfg, theirs)
        assert (theirs / "notes.txt").read_text() == "mine"
        with pytest.raises(UserError, match="unknown pipeline"):
            sr.pipeline("nope")
