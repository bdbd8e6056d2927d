"""The classification task (kind="classifier"): pretrain, protect and attack a classifier.

The restricted-domain metric is test accuracy (higher = better for the attacker); the attacker
fine-tunes on `attack.train_per_class` images per class (`attacker_subset`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sophon_ray import modeldir
from sophon_ray.config import Recipe, to_dict
from sophon_ray.errors import UserError
from sophon_ray.tasks.base import ACCURACY, Log, Metrics, Task, Tensors, head_keys, no_metrics
from sophon_ray.tasks.classifier.suites import PROTOCOLS, SUITES


class ClassifierTask(Task):
    kind = "classifier"
    metric = ACCURACY
    audit_suite, run_suite, smoke_suite = "default-v1", "quick-v3", "test-v1"
    epsilon, min_gap = 0.02, 0.10
    # The search draws all six, renorm-all and bnrecal-all included (audit/space.py says why).
    strategies = ("direct-all", "direct-FC", "initFC-all", "initFC-FC", "renorm-all", "bnrecal-all")
    default_recipe = Recipe()

    def check(self) -> None:
        attacker_subset(torch.zeros(0, dtype=torch.int64), self.cfg.attack.train_per_class, 0)

    @staticmethod
    def build_module(card: dict[str, Any]) -> torch.nn.Module:
        from sophon_ray.config import ArchSpec
        from sophon_ray.models import build_classifier

        arch = ArchSpec(name=card["arch"]["name"], kwargs=dict(card["arch"].get("kwargs", {})))
        inp = card["input"]
        return build_classifier(arch, int(card["num_classes"]), int(inp["channels"]), int(inp["size"]))

    def load_tensors(self) -> Tensors:
        """Load the original and restricted domain and preprocess them per `cfg.input`."""
        from sophon_ray.data import load_domain, preprocess

        cfg = self.cfg
        self.check()  # refuse a bad attacker limit before reading any data
        orig, restr = load_domain(cfg.original), load_domain(cfg.restricted[0])
        if orig.num_classes != restr.num_classes:
            raise UserError(
                f"original ({orig.num_classes} classes) and restricted ({restr.num_classes}) label spaces differ; "
                "select the same number of classes in original.classes and restricted.0.classes"
            )
        return Tensors(
            original_train=preprocess(orig.train, cfg.input),
            original_test=preprocess(orig.test, cfg.input),
            restricted_train=preprocess(restr.train, cfg.input),
            restricted_test=preprocess(restr.test, cfg.input),
            num_classes=orig.num_classes,
            names={"original": orig.name, "restricted": [restr.name]},
        )

    def new_model(self, num_classes: int, seed: int) -> torch.nn.Module:
        from sophon_ray.models import build_classifier

        cfg = self.cfg
        torch.manual_seed(seed)
        return build_classifier(cfg.arch, num_classes, cfg.input.channels, cfg.input.size)

    def original_metric(self, model: torch.nn.Module, t: Tensors) -> float:
        """Original-domain test accuracy."""
        from sophon_ray.core import accuracy

        return accuracy(model, *t.original_test, batch_size=self.cfg.attack.eval_batch)

    def model_metrics(self, model: torch.nn.Module, t: Tensors) -> dict[str, float]:
        return {"original_test_accuracy": self.original_metric(model, t)}

    def pretrain(self, out: str | Path, log: Log = print, on_metrics: Metrics = no_metrics) -> Path:
        """Train the unprotected source classifier on the original domain (AdamW + cosine)."""
        cfg = self.cfg
        t = self.load_tensors()
        p = cfg.pretrain
        model = self.new_model(t.num_classes, p.seed)
        x, y = t.original_train
        start = time.perf_counter()
        self._fit_source(model, len(x), lambda idx, g: torch.nn.functional.cross_entropy(model(x[idx]), y[idx]),
                         log, on_metrics)
        acc = self.original_metric(model, t)
        log(f"pretrain done: original test accuracy {acc:.4f} ({time.perf_counter() - start:.1f}s)")
        card = self.make_card(t, "source", {"config": to_dict(cfg.pretrain), "stage_hash": self.source_stage_hash()})
        return modeldir.save_model_dir(out, model, card, {"original_test_accuracy": acc})

    def build_protection(self, model: torch.nn.Module, t: Tensors, source_value: float, **dist: Any):
        """The core `Protection` for a classification pipeline (shared by local and Ray Train runs).
        With `protect.init=fresh`, `model` (the source, as passed in: Train workers load a checkpoint
        only after this) becomes the frozen NTR teacher and is re-initialised (`Task.fresh_start`)."""
        from sophon_ray.core import ClassificationObjective, Protection, ProtectData, get_loss

        cfg = self.cfg
        teacher = self.fresh_start(model, t.num_classes)
        objective = ClassificationObjective(get_loss(cfg.protect.loss, cfg.kind), teacher)
        data = ProtectData(original=t.original_train, restricted=t.restricted_train)
        return Protection(
            model, cfg.protect, data, objective,
            evaluate_original=lambda: self.original_metric(model, t),
            source_value=source_value, higher_is_better=True, head_keys=head_keys(model), **dist,
        )

    def validate_recipe(self, recipe: Recipe) -> None:
        """Refuse impossible recipes and the UNet strategies (all/up/down) for a classifier."""
        from sophon_ray.core.attack import STRATEGIES, validate_recipe as validate

        validate(recipe)
        if recipe.strategy not in STRATEGIES:
            raise UserError(f"strategy {recipe.strategy!r} is for diffusion UNets; a classifier takes "
                            f"strategy={'|'.join(STRATEGIES)} (e.g. --recipe strategy=initFC-all,optimizer=adam,lr=1e-3)")

    def attacker_support(self, protocol: Any) -> int | None:
        """`attack.train_per_class`, or None where the suite's protocol gives the whole split."""
        return None if protocol.attacker_data == "full" else self.cfg.attack.train_per_class

    def attacker_train(self, t: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """The restricted (x, y) the attacker fine-tunes on: `cfg.attack.train_per_class` images per
        class of the restricted training split (all of it when None)."""
        x, y = t.restricted_train
        if self.cfg.attack.train_per_class is None:
            return x, y
        idx = attacker_subset(y, self.cfg.attack.train_per_class, self.cfg.attack.seed)
        return x[idx], y[idx]

    def finetune_kwargs(self, t: Tensors, model: torch.nn.Module, seed: int,
                        detail: dict[str, float] | None = None) -> dict[str, Any]:
        """The classification arguments of `core.attack.finetune`: the attacker's restricted (x, y)
        (`attacker_train`), restricted test accuracy, the model's head (cross-entropy is finetune's
        default loss). `detail` stays empty (accuracy has no breakdown)."""
        from sophon_ray.core import accuracy

        return {
            "train": self.attacker_train(t),
            "evaluate": lambda m: accuracy(m, *t.restricted_test, batch_size=self.cfg.attack.eval_batch),
            "head_keys": head_keys(model),
        }

    def suites(self) -> dict[str, tuple[Recipe, ...]]:
        return SUITES

    def protocols(self) -> dict[str, Any]:
        return PROTOCOLS

    def import_model(self, weights: str | Path, out: str | Path, *, new_head: bool = False,
                     log: Log = print) -> Path:
        """A source model directory from a state dict (.safetensors or weights-only .pt) of
        `cfg.arch`: torchvision key names for `torchvision:<builder>` archs (`fc.weight` ->
        `head.weight`), the project's own names otherwise. `new_head` re-initialises the head
        (seeded) instead of loading it, for weights made for another class count."""
        from sophon_ray.models.classifiers import TORCHVISION, torchvision_keys
        from sophon_ray.tasks.weights import match, read_state_dict

        cfg = self.cfg
        t = self.load_tensors()
        model = self.new_model(t.num_classes, cfg.pretrain.seed)
        state = read_state_dict(weights)
        if cfg.arch.name.startswith(TORCHVISION):
            key = torchvision_keys(cfg.arch.name[len(TORCHVISION):], t.num_classes, **cfg.arch.kwargs)
            state = {key(k): v for k, v in state.items()}
        is_head = (lambda k: k.startswith("head.")) if new_head else (lambda k: False)
        match(model, state, str(weights), skip=is_head,
              hint=lambda k: (f" ({t.num_classes} classes here: pass --new-head to re-initialise the head)"
                              if k.startswith("head.") else ""))
        model.load_state_dict({k: v for k, v in state.items() if not is_head(k)}, strict=not new_head)
        return self._save_imported(model.eval(), t, weights, out, new_head, log)


def attacker_subset(y: torch.Tensor, per_class: int | None, seed: int) -> torch.Tensor:
    """Indices of the attacker's restricted training images: at most `per_class` of each class.

    Args:
        y: (N,) int64 labels of the restricted training split (any device).
        per_class: images kept per class (all of a class that has fewer); None keeps everything.
        seed: seeds the draw (`attack.seed`), so every subject and trial fine-tunes on the same images.
    Returns:
        (M,) int64 indices into y, ascending, on y's device.
    """
    if per_class is None:
        return torch.arange(len(y), device=y.device)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"attack.train_per_class must be a positive integer or None, got {per_class!r}")
    from sophon_ray.core.protect import per_class_subset

    return per_class_subset(y, per_class, torch.Generator().manual_seed(int(seed)))
