"""The Task: a pipeline config bound to its kind, the only place where kinds differ.

A `Task` (classifier: `tasks.classifier.ClassifierTask`, diffusion: `tasks.diffusion.DiffusionTask`)
binds a `PipelineConfig` to the data, models, metric and core engine of its kind: load tensors,
build and load models, pretrain, protect, attack, name its attack suites. Everything above
(Ray Train, the audit, MLflow, the CLI) asks the task and never compares a kind, metric or goal
string itself; the metric's direction lives in one `Metric` object.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch

from sophon_ray import modeldir
from sophon_ray.config import PipelineConfig, Recipe, config_hash, extensions, to_dict
from sophon_ray.errors import UserError

Log = Callable[[str], None]
Metrics = Callable[[int, dict[str, float]], None]


def no_metrics(step: int, metrics: dict[str, float]) -> None:
    return None


@dataclass(frozen=True)
class Metric:
    """A restricted/original test metric and the attacker's goal for it.

    name: "accuracy" | "mse" (what audit.json's `metric` records); label: its short form.
    goal: what the attacker wants of the restricted metric ("max" | "min").
    digits: decimals when printed.
    ceiling: an exclusive upper bound of margins and gaps (accuracy: 1), None where unbounded.
    example: a typical epsilon, for error messages.
    """

    name: str
    label: str
    goal: str
    digits: int
    ceiling: float | None = None
    example: float = 0.02

    @property
    def sign(self) -> float:
        """+1 where the attacker maximises, -1 where it minimises: `sign * (a - b)` is a's advantage."""
        return 1.0 if self.goal == "max" else -1.0

    @property
    def worst(self) -> float:
        """The value no attack can do worse than (-inf for max, +inf for min)."""
        return -self.sign * math.inf

    @property
    def direction(self) -> str:
        return "higher" if self.goal == "max" else "lower"

    @property
    def superlative(self) -> str:
        return "highest" if self.goal == "max" else "lowest"

    def better(self, a: float, b: float) -> float:
        """The value an attacker prefers of a and b."""
        return max(a, b) if self.goal == "max" else min(a, b)

    def best(self, values: Iterable[float]) -> float:
        """The attacker's best of `values` (ValueError when empty, like max/min)."""
        return max(values) if self.goal == "max" else min(values)

    def advantage(self, a: float, b: float) -> float:
        """How much better a is than b for the attacker (positive: a is better)."""
        return self.sign * (a - b)

    def fmt(self, value: float) -> str:
        return f"{value:.{self.digits}f}"

    def check_threshold(self, flag: str, value: Any) -> None:
        """UserError for a margin/gap threshold that is negative, not finite, or at/above the ceiling."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        if not ok or (self.ceiling is not None and value >= self.ceiling):
            bound = f"in [0, {self.ceiling:g})" if self.ceiling is not None else ">= 0"
            raise UserError(f"{flag} {value!r}: must be a finite number {bound} ({self.name}, e.g. {self.example:g})")


ACCURACY = Metric("accuracy", "acc", "max", 3, ceiling=1.0, example=0.02)
MSE = Metric("mse", "mse", "min", 4, example=0.005)
METRICS: dict[str, Metric] = {m.name: m for m in (ACCURACY, MSE)}


def metric_named(name: str) -> Metric:
    """The `Metric` audit.json names (UserError for an unknown one)."""
    if name not in METRICS:
        raise UserError(f"unknown metric {name!r} (expected {' or '.join(METRICS)}): the audit.json is not one of ours")
    return METRICS[name]


@dataclass(frozen=True)
class SuiteProtocol:
    """What a named attack suite fixes besides its recipes, so that `--suite NAME` means the same
    attack on every pipeline (e.g. `paper-v1`, the SOPHON paper's evaluation).

    budgets: the suite's own budgets (None: the pipeline's `attack.budgets`), in `unit`.
    unit: "steps" (optimizer steps) or "epochs" (passes over the attacker's training images; an
        epoch is floor(images / batch size) steps, at least 1, as a DataLoader with drop_last=True).
    attacker_data: "pipeline" (`attack.train_per_class` images per class) or "full" (the whole
        restricted training split, whatever the pipeline's limit).
    metric_key: the part of the kind's metric breakdown the verdict uses (diffusion: "t1", the
        denoising MSE at t = 1 only, the paper's metric); None: the overall metric.
    certifies: whether a passing audit with this suite may certify a model (alias `audited`).
    note: one line for audit.json and the report on what the suite is.
    """

    budgets: tuple[int, ...] | None = None
    unit: str = "steps"
    attacker_data: str = "pipeline"
    metric_key: str | None = None
    certifies: bool = True
    note: str = ""

    def epochs_to_steps(self, budgets: tuple[int, ...], images: int, batch_size: int) -> tuple[int, ...]:
        """Optimizer-step budgets of a trial: `budgets` as they are in steps; in epochs, each times
        floor(images / batch_size) (at least 1)."""
        if self.unit == "steps":
            return tuple(budgets)
        per = max(images // max(batch_size, 1), 1)
        return tuple(b * per for b in budgets)

    def smoke(self) -> SuiteProtocol:
        """The protocol as a `--smoke` audit runs it: epoch budgets shrunk to `SMOKE_EPOCHS` (a smoke
        audit must stay quick; it never certifies anyway); a protocol in steps is unchanged (its
        budgets, None for the steps protocol, are the pipeline's, which --smoke shrinks already)."""
        if self.unit == "steps" or self.budgets is None:
            return self
        return dataclasses.replace(self, budgets=SMOKE_EPOCHS)


SMOKE_EPOCHS: tuple[int, ...] = (1, 2)  # an epoch protocol's budgets under --smoke (`SuiteProtocol.smoke`)


STEPS_PROTOCOL = SuiteProtocol()


@dataclass(frozen=True)
class Tensors:
    """Preprocessed tensors of a pipeline: (x, y) pairs for each domain split."""

    original_train: tuple[torch.Tensor, torch.Tensor]
    original_test: tuple[torch.Tensor, torch.Tensor]
    restricted_train: tuple[torch.Tensor, torch.Tensor]
    restricted_test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    names: dict[str, Any]


def unit_of(audit: dict[str, Any]) -> str:
    """The unit of an audit's budgets: "steps" (optimizer steps) or "epochs" (a protocol suite such
    as paper-v1), from audit.json "protocol" (else "strength"); "steps" where it records neither."""
    return str((audit.get("protocol") or {}).get("unit") or (audit.get("strength") or {}).get("unit") or "steps")


def steps_text(span: tuple[int, int] | None, approx: str = "~") -> str:
    """`~440` or `~700-2180` (a range where recipes differ), "" for None."""
    if not span:
        return ""
    lo, hi = span
    return f"{approx}{lo}" if lo == hi else f"{approx}{lo}-{hi}"


def budget_label(b: Any, unit: str = "steps", steps: dict[str, tuple[int, int]] | None = None,
                 approx: str = "~") -> str:
    """One budget with its unit: `25 steps`, `1 epoch`, `20 epochs (~440 steps)` (the step equivalent
    where `steps`, from `step_equivalents`, knows it)."""
    word = unit[:-1] if str(b) == "1" and unit.endswith("s") else unit
    extra = steps_text((steps or {}).get(str(b)), approx)
    return f"{b} {word}" + (f" ({extra} steps)" if extra else "")


def head_keys(model: torch.nn.Module) -> tuple[str, ...]:
    from sophon_ray.models import HEAD

    return tuple(k for k, _ in model.named_parameters() if k.startswith(HEAD + "."))


class Task:
    """A pipeline config bound to its kind. Subclasses set the class attributes and implement the
    kind-specific methods; `protect`, cards, compatibility and stage hashes are shared.

    Class attributes:
        kind: the `cfg.kind` this task serves ("classifier" | "diffusion").
        metric: the restricted/original test metric and the attacker's goal.
        audit_suite / run_suite / smoke_suite: default attack suites of `audit`, `run`, `run --smoke`.
        epsilon: the default allowed margin of the verdict (in units of the metric).
        min_gap: the default power the control needs (source minus scratch, in units of the metric)
            for a verdict to be `passed` rather than `inconclusive`: five epsilons, so that an
            advantage the protection removed is five times what the verdict tolerates (docs/design.md).
        strategies: attack strategies the search space draws from.
        default_recipe: the attack of `sophon-ray attack` / `samples` without --recipe.
    """

    kind: ClassVar[str]
    metric: ClassVar[Metric]
    audit_suite: ClassVar[str]
    run_suite: ClassVar[str]
    smoke_suite: ClassVar[str]
    epsilon: ClassVar[float]
    min_gap: ClassVar[float]
    strategies: ClassVar[tuple[str, ...]]
    default_recipe: ClassVar[Recipe]
    has_samples: ClassVar[bool] = False  # sample grids and a judge (`samples`, audit extras)

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    # -- what each kind implements ----------------------------------------------------------

    def check(self) -> None:
        """Kind-specific checks of the config (UserError naming the fix); called by `validate`."""

    @staticmethod
    def build_module(card: dict[str, Any]) -> torch.nn.Module:
        """Rebuild the (untrained) module a model card describes."""
        raise NotImplementedError

    def load_tensors(self) -> Tensors:
        """Load the original and (first) restricted domain, preprocessed per `cfg.input`."""
        raise NotImplementedError

    def new_model(self, num_classes: int, seed: int) -> torch.nn.Module:
        """A randomly initialised model of the pipeline's architecture (seeded); a UNet ignores num_classes."""
        raise NotImplementedError

    def original_metric(self, model: torch.nn.Module, t: Tensors) -> float:
        """The original-domain test metric of `model` (the guard's quantity)."""
        raise NotImplementedError

    def model_metrics(self, model: torch.nn.Module, t: Tensors) -> dict[str, float]:
        """The final test metrics a model's metrics.json records, e.g. original_test_<metric>."""
        raise NotImplementedError

    def build_protection(self, model: torch.nn.Module, t: Tensors, source_value: float, **dist: Any) -> Any:
        """The core `Protection` of the pipeline (shared by local and Ray Train runs)."""
        raise NotImplementedError

    def pretrain(self, out: str | Path, log: Log = print, on_metrics: Metrics = no_metrics) -> Path:
        """Train the unprotected source model on the original domain and write its model directory.

        `on_metrics(step, metrics)` receives the training loss every 10 steps (e.g. for MLflow).
        """
        raise NotImplementedError

    def validate_recipe(self, recipe: Recipe) -> None:
        """UserError for a recipe this kind of model cannot take (e.g. a head strategy for a UNet)."""
        raise NotImplementedError

    def _fit_source(self, model: torch.nn.Module, n: int,
                    loss_of: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                    log: Log, on_metrics: Metrics) -> None:
        """The pretraining loop both kinds share: AdamW + cosine over `pretrain.steps` seeded
        batches of indices into `n` original training items; `loss_of(idx, g)` is the kind's loss."""
        p = self.cfg.pretrain
        opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(p.steps, 1))
        g = torch.Generator().manual_seed(p.seed)
        model.train()
        for step in range(1, p.steps + 1):
            loss = loss_of(torch.randint(n, (p.batch_size,), generator=g), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0 or step == p.steps:
                on_metrics(step, {"train_loss": loss.item()})
            if step % max(p.steps // 5, 1) == 0 or step == p.steps:
                log(f"pretrain {step}/{p.steps} loss {loss.item():.4f}")

    def finetune_kwargs(self, t: Tensors, model: torch.nn.Module, seed: int,
                        detail: dict[str, float] | None = None) -> dict[str, Any]:
        """The kind-specific arguments of `core.attack.finetune` (train, evaluate, head_keys[, loss_fn]).
        A kind with a finer breakdown of its metric (diffusion: timestep buckets) refills `detail`
        at every evaluation; the others leave it empty."""
        raise NotImplementedError

    def suites(self) -> dict[str, tuple[Recipe, ...]]:
        """The named attack suites of this kind."""
        raise NotImplementedError

    def protocols(self) -> dict[str, SuiteProtocol]:
        """The suites of this kind that fix more than recipes (budgets, unit, attacker data, metric)."""
        return {}

    def protocol(self, suite: str | None) -> SuiteProtocol:
        """The protocol of a suite (the default: steps, the pipeline's budgets and attacker data)."""
        return self.protocols().get(suite or self.audit_suite, STEPS_PROTOCOL)

    def import_model(self, weights: str | Path, out: str | Path, *, new_head: bool = False,
                     log: Log = print) -> Path:
        """Write a model directory (role "source") from weights the user brings: the module of
        `cfg.arch`, the weights matched key by key, the card recording their origin and sha256."""
        raise NotImplementedError

    def _save_imported(self, model: torch.nn.Module, t: Tensors, weights: str | Path, out: str | Path,
                       new_head: bool, log: Log) -> Path:
        path = Path(weights).resolve()
        digest = modeldir.sha256_file(path) if path.is_file() else modeldir.sha256_file(path / self.weights_file)
        metrics = self.model_metrics(model, t)
        lineage = {"imported": {"path": str(path), "sha256": digest, "new_head": bool(new_head)},
                   "stage_hash": f"imported-{digest[:16]}"}
        log(f"import: {path} -> original test {self.metric.name} {metrics[f'original_test_{self.metric.name}']:.4f}")
        return modeldir.save_model_dir(out, model, self.make_card(t, "source", lineage), metrics)

    weights_file: ClassVar[str] = ""  # the weights file inside an imported folder (diffusers)

    def audit_extras(self, audit: dict[str, Any], subjects: dict[str, str | None], out: Path, log: Log = print,
                     enabled: bool = True, judge_dir: str | Path | None = None) -> dict[str, Any] | None:
        """Kind-specific additions to an audit directory (diffusion: sample grids and the judge
        metric in `samples.json`); returns what was written (None: nothing)."""
        return None

    # -- shared -----------------------------------------------------------------------------

    def suite(self, name: str | None = None) -> tuple[Recipe, ...]:
        """A named attack suite (None: the kind's audit default)."""
        name = name or self.audit_suite
        known = self.suites()
        if name not in known:
            raise UserError(f"unknown attack suite {name!r} for {self.kind} pipelines; use one of: {', '.join(known)}")
        return known[name]

    def load_for(self, source: str | Path, t: Tensors) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Load a local model directory and refuse one that does not fit the pipeline's data."""
        model, card = load_model(source)
        self.check_compatible(card, t.num_classes, str(source))
        return model, card

    def attack(self, model_src: str | Path | None, recipe: Recipe, seed: int = 0,
               t: Tensors | None = None) -> dict[int, float]:
        """One real fine-tuning run on the restricted domain; `model_src=None` attacks a scratch
        model (seeded 10000 + seed). Returns the restricted test metric at each of `cfg.attack.budgets`."""
        from sophon_ray.core import finetune

        self.validate_recipe(recipe)
        t = t or self.load_tensors()
        model = self.new_model(t.num_classes, 10_000 + seed) if model_src is None else self.load_for(model_src, t)[0]
        torch.manual_seed(seed)
        return finetune(model, recipe, budgets=self.cfg.attack.budgets, seed=seed,
                        **self.finetune_kwargs(t, model, seed))

    def protect(self, source: str | Path, out: str | Path, log: Log = print, on_metrics: Metrics = no_metrics,
                start: str | Path | None = None, fed_by: dict[str, Any] | None = None) -> Path:
        """Run SOPHON in-process on `source` and write the protected model directory.

        `on_metrics(iteration, metrics)` receives every outer iteration's metrics. The same loop for
        every kind: only the tensors, the model check, the metric and the `Protection` differ.
        `start`: a model directory whose weights protection starts from (`start_from`); `fed_by`:
        the audit (mode, attack seed) whose recipes a hardening round trained on (card lineage).
        """
        from sophon_ray.core import run
        from sophon_ray.core.protect import validate_config

        cfg, m = self.cfg, self.metric
        validate_config(cfg.protect, cfg.kind)
        t = self.load_tensors()
        model, src_card = self.load_for(source, t)
        source_value = self.original_metric(model, t)
        prot = self.build_protection(model, t, source_value)
        start_card = self.start_from(model, start, t) if start is not None else None
        began = time.perf_counter()
        every = max(cfg.protect.iterations // 10, 1)

        def progress(it: int, x: dict[str, float]) -> None:
            on_metrics(it, x)
            if it % every == 0 or it == cfg.protect.iterations:
                fts = f" fts_loss {m.fmt(x['fts_loss'])} sim_{m.label} {m.fmt(x['sim_metric'])}" if "fts_loss" in x else ""
                ntr = f" ntr_loss {m.fmt(x['ntr_loss'])}" if "ntr_loss" in x else ""
                orig = f" orig_{m.label} {m.fmt(x['orig_metric'])}" if "orig_metric" in x else ""
                log(f"protect {it}/{cfg.protect.iterations}{fts}{ntr}{orig} ({time.perf_counter() - began:.1f}s)")

        run(prot, progress)
        guard_note(prot.guard, m, source_value, log)
        final = self.model_metrics(model, t)
        metrics = {**final, f"source_original_test_{m.name}": source_value,
                   "guard_rollbacks": prot.guard.rollbacks, "iterations": prot.iteration, **prot.guard.summary()}
        start_sha = start_card["sha256"] if start_card else None
        lineage = {"source": {"path": modeldir.lineage_path(source), "sha256": src_card["sha256"]},
                   **({"start": {"path": modeldir.lineage_path(start), "sha256": start_sha}} if start_card else {}),
                   **({"fed_by": dict(fed_by)} if fed_by else {}), "guard": guard_record(prot.guard),
                   "protect": to_dict(cfg.protect), "stage_hash": self.protect_stage_hash(src_card["sha256"], 0, start_sha)}
        log(f"protect done: original test {m.name} {final[f'original_test_{m.name}']:.4f} "
            f"(source {source_value:.4f}), {prot.guard.rollbacks} guard rollbacks "
            f"({time.perf_counter() - began:.1f}s)")
        return modeldir.save_model_dir(out, model, self.make_card(t, "protected", lineage), metrics)

    def start_from(self, model: torch.nn.Module, start: str | Path, t: Tensors) -> dict[str, Any]:
        """Load the weights and buffers of the model directory `start` into `model` in place (after
        `build_protection`, before a checkpoint is restored): protection continues from another
        model, the hardening loop's previous round, while the source it was built from stays the
        teacher, the guard's reference and (in the card's lineage) the audit's control.
        Returns `start`'s card."""
        weights, card = self.load_for(start, t)
        model.load_state_dict(weights.state_dict())
        return card

    def fresh_start(self, model: torch.nn.Module, num_classes: int) -> torch.nn.Module | None:
        """With `protect.init=fresh` (co-training): a frozen copy of `model` (the source) to be the
        original domain's teacher, and `model` re-initialised in place (seeded by protect.seed), so
        protection starts from no source-like weights. Returns None (and leaves `model`) otherwise."""
        import copy

        if self.cfg.protect.init != "fresh":
            return None
        teacher = copy.deepcopy(model).requires_grad_(False).eval()
        model.load_state_dict(self.new_model(num_classes, self.cfg.protect.seed).state_dict())
        return teacher

    def make_card(self, t: Tensors, role: str, lineage: dict[str, Any]) -> dict[str, Any]:
        """The model.json fields of a model made from the config; `lineage` gains this process's
        `modeldir.environment()` unless it names the environment already (Ray Train: the workers')."""
        cfg = self.cfg
        lineage = {**lineage, "environment": lineage.get("environment") or modeldir.environment()}
        return {
            "kind": cfg.kind,
            "arch": {"name": cfg.arch.name, "kwargs": dict(cfg.arch.kwargs)},
            "num_classes": t.num_classes,
            "input": dataclasses.asdict(cfg.input),
            "pipeline": cfg.name,
            "domains": t.names,
            "role": role,
            "lineage": lineage,
        }

    def check_compatible(self, card: dict[str, Any], num_classes: int, where: str) -> None:
        """Refuse a model whose kind, architecture, class count or input spec does not match the
        pipeline's (the audit's scratch baseline is built from the pipeline's arch)."""
        cfg = self.cfg
        want_in = dataclasses.asdict(cfg.input)
        got_in = {k: (tuple(v) if isinstance(v, list) else v) for k, v in card["input"].items()}
        problems = []
        if card["kind"] != cfg.kind:
            problems.append(f"kind {card['kind']} != {cfg.kind}")
        arch = card.get("arch") or {}
        if arch.get("name") != cfg.arch.name or dict(arch.get("kwargs") or {}) != dict(cfg.arch.kwargs):
            # the audit's scratch baseline is the pipeline's arch: another arch would be compared unfairly
            problems.append(f"arch {arch.get('name')} {dict(arch.get('kwargs') or {})} != {cfg.arch.name} {dict(cfg.arch.kwargs)}")
        if card.get("num_classes") != num_classes:
            problems.append(f"{card.get('num_classes')} classes != {num_classes}")
        if got_in != want_in:
            problems.append(f"input {got_in} != {want_in}")
        if problems:
            raise UserError(
                f"model {where} does not match pipeline {cfg.name!r} ({'; '.join(problems)}); "
                "pass a model made by this pipeline, or --set input.../arch... to match the model"
            )

    def source_stage_hash(self) -> str:
        """What determines the source model: data, input, architecture and pre-training config."""
        cfg = self.cfg
        return config_hash((cfg.input, cfg.original, cfg.restricted, cfg.arch, cfg.pretrain))

    def protect_stage_hash(self, source_sha: str, workers: int, start_sha: str | None = None) -> str:
        """What determines a protected model: the protect config (and kind extensions such as
        `diffusion`), the data, the source, the worker count and the weights it started from
        (`start_sha`, when not the source's)."""
        cfg = self.cfg
        start = f"-from{start_sha[:8]}" if start_sha else ""
        return config_hash((cfg.protect, cfg.input, cfg.restricted, *self.protect_extensions())) + f"-{source_sha[:8]}-w{workers}{start}"

    def attacker_support(self, protocol: SuiteProtocol) -> int | None:
        """The attacker's restricted images per class under `protocol` (a fed-back recipe's
        `support_per_class`); None: the whole split (classifiers override: `attack.train_per_class`)."""
        return None

    def protect_extensions(self) -> tuple[Any, ...]:
        """The kind's own settings that change a protected model (default: every extension field)."""
        return extensions(self.cfg)

    def named_metrics(self, m: dict[str, float]) -> dict[str, float]:
        """Protection metrics with the generic `*_metric` keys renamed after the kind's metric."""
        return {(k[: -len("metric")] + self.metric.name if k.endswith("_metric") else k): v for k, v in m.items()}


# kind -> "module:Class", imported on first use (the diffusion task pulls in diffusers)
TASKS: dict[str, str] = {
    "classifier": "sophon_ray.tasks.classifier:ClassifierTask",
    "diffusion": "sophon_ray.tasks.diffusion:DiffusionTask",
}


def guard_record(guard: Any) -> dict[str, Any]:
    """The card's `lineage.guard`: whether the protection's final weights passed the guard, the
    iteration of the last passing snapshot, the rollbacks."""
    return {"passed": bool(guard.passed), "last_pass": guard.passed_at if guard.passed else None,
            "rollbacks": int(guard.rollbacks)}


def guard_note(guard: Any, m: Metric, source_value: float, log: Log) -> None:
    """One line when a protection's guard never passed (its model will not certify)."""
    if not guard.passed:
        log(f"protect: the guard never passed (original {m.name} {guard.last_value:.4f} vs source "
            f"{source_value:.4f}); the model is kept but cannot certify: raise protect.iterations or protect.nl_loop")


def task_class(kind: Any, where: str = "") -> type[Task]:
    """The `Task` subclass serving `kind` (UserError for an unknown kind)."""
    if kind not in TASKS:
        raise UserError(f"{where or 'model'} has unknown kind {kind!r}; use one of: {', '.join(TASKS)}")
    module, name = TASKS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_model(source: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a local model directory of any kind as (module, card), the weights checked against the card."""
    return modeldir.load_model(source, lambda card: task_class(card.get("kind")).build_module(card))
