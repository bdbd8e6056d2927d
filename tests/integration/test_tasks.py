"""A task's own training on real data, in-process (no Ray): the mnist smoke pretraining writes a
model directory whose recorded accuracy is the model's."""

from __future__ import annotations

import json

import pytest

import sophon_ray
from sophon_ray import tasks
from sophon_ray.pipelines import PIPELINES

from tests.support import one_thread


def test_mnist_smoke_pretrain(tmp_path):
    task = tasks.of(PIPELINES["mnist"].get_config(smoke=True))
    with one_thread():
        out = task.pretrain(tmp_path / "source", log=lambda s: None)
    model, card = sophon_ray.load_model(out)
    assert card["arch"] == {"name": "resnet20", "kwargs": {"width": 4}} and card["num_classes"] == 5
    assert card["domains"] == {"original": "mnist5k[0,1,2,3,4]", "restricted": ["mnist5k[5,6,7,8,9]"]}
    assert card["lineage"]["stage_hash"] == task.source_stage_hash()
    acc = json.loads((out / "metrics.json").read_text())["original_test_accuracy"]
    assert 0.5 < acc <= 1.0  # 30 steps of a width-4 ResNet-20 on 2,000 real digits (chance: 0.2)
    assert task.original_metric(model, task.load_tensors()) == pytest.approx(acc, abs=1e-9)  # what was recorded
