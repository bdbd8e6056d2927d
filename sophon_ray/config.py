"""Typed, frozen configuration and `key.path=value` overrides.

Every pipeline is a Python file in `pipelines/` with `get_config(smoke=False)` returning a
`PipelineConfig`. Users change any field from the command line with `--set key.path=value`
(e.g. `--set protect.iterations=50 --set protect.env.optimizers=["adam"]`).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sophon_ray.errors import UserError


@dataclass(frozen=True)
class InputSpec:
    """How raw uint8 images become model inputs: resize to `size`, scale to [0, 1], normalise."""

    channels: int = 1
    size: int = 16
    resize: str = "bilinear"  # "bilinear" | "nearest"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)


@dataclass(frozen=True)
class DomainSpec:
    """A labelled image domain by source name; `classes` selects raw labels and relabels them 0..n-1."""

    source: str = "digits"  # digits | mnist5k | synthetic | cifar10 | cifar100 | mnist | svhn | stl10 | imagefolder | parquet
    classes: tuple[int, ...] | None = None
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArchSpec:
    name: str = "cnn-small"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class EnvRecipe:
    """One fixed FTS environment: a real attack recipe as the inner loop simulates it.

    The hardening loop (`sophon-ray harden`) feeds an audit's strongest recipes back into
    protection as these (`core.feedback.env_recipe` maps a `Recipe` exactly; docs/design.md,
    "Hardening loop"). Fields are `core.inner.Environment`'s: the inner optimizer, its lr, the
    support batch size, the simulated horizon K (`steps`: the budget where the attack won), head
    re-initialisation / head-only training (the strategy), L2 weight decay (`decoupled_decay`: AdamW's
    form), the attack's lr schedule over its `schedule_total` steps (its largest budget) with
    `warmup_steps`, and the attacker's images per class (`support_per_class`, None = the whole
    support pool). `label` names the audit recipe it came from.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 32
    steps: int = 10
    reinit_head: bool = False
    head_only: bool = False
    weight_decay: float = 0.0
    decoupled_decay: bool = False
    schedule: str = "constant"
    schedule_total: int = 0
    warmup_steps: int = 0
    support_per_class: int | None = None
    label: str = ""


@dataclass(frozen=True)
class EnvSpace:
    """The distribution of simulated fine-tuning environments for FTS.

    The default covers every optimizer family of the attack suites that has a functional inner
    version (SGD, momentum, Adam, RMSprop, Adagrad, Adadelta), each over the lr decades the
    suites attack with: on digits, simulating only SGD/momentum/Adam let RMSprop, Adagrad and
    Adadelta attackers through (docs/results.md).

    Each FTS step draws `protect.envs_per_step` environments: an inner optimizer uniformly from
    `optimizers`, a learning rate log-uniformly from `lr[optimizer]`, a support batch size from
    `batch_sizes`, head re-initialisation with probability `reinit_head_prob`, and head-only
    (linear-probe) fine-tuning with probability `head_only_prob`. With fixed `recipes` (the
    hardening loop's fed-back attacks), each of those environments is instead, with probability
    `recipe_prob`, one of `recipes` (chosen uniformly); without recipes nothing changes.
    """

    optimizers: tuple[str, ...] = ("sgd", "momentum", "adam", "rmsprop", "adagrad", "adadelta")
    lr: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"sgd": (1e-3, 3e-1), "momentum": (1e-4, 1e-1), "adam": (1e-5, 1e-2),
                                 "rmsprop": (1e-5, 3e-3), "adagrad": (1e-3, 1e-1), "adadelta": (0.1, 1.0)}
    )
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    reinit_head_prob: float = 0.5
    head_only_prob: float = 0.25
    recipes: tuple[EnvRecipe, ...] = ()
    recipe_prob: float = 0.5


@dataclass(frozen=True)
class ProtectConfig:
    iterations: int = 200  # T outer iterations
    ml_loop: int = 1  # FTS steps per outer iteration
    nl_loop: int = 1  # NTR steps per outer iteration
    envs_per_step: int = 2  # E environments per FTS step
    inner_steps: int = 10  # K simulated fine-tuning steps per environment
    query_every: int = 1  # evaluate the suppression loss after every m-th inner step (and the last); first order
    weighting: str = "uniform"  # inner-step weights of the FTS loss: uniform | linear (step k weighs k)
    order: str = "first"  # "first" | "second"
    # FTS environments: sequential (default: measured faster on CPU, docs/benchmarks.md) | auto
    # (torch.func.vmap over environments of one shape where exact, else sequential) | batched
    env_batching: str = "sequential"
    # Each simulated fine-tuning draws its support batches from this many restricted images per
    # class, drawn afresh per environment (an attacker with `attack.train_per_class` images);
    # None = the whole support pool. Classification only (needs labels).
    support_per_class: int | None = None
    loss: str = "klu"  # classification: klu | ice-neg (the default ICE form) | ice-comp; diffusion: dos | mse-ascent
    query_batch: int = 64
    ntr_batch: int = 64
    alpha: float = 1e-3  # FTS (meta) Adam learning rate
    beta: float = 3e-4  # NTR Adam learning rate
    clip: float = 0.5  # total gradient-norm clip for both phases (0 disables)
    guard_margin: float = 0.03  # allowed drop of original test accuracy below the source model
    guard_every: int = 10  # evaluate the guard every N outer iterations
    guard_backoff: float = 0.5  # on rollback, multiply the FTS learning rate by this
    seed: int = 0
    env: EnvSpace = field(default_factory=EnvSpace)
    # Where protection starts: "source" (the source model's weights, SOPHON as published) or "fresh"
    # (co-training: a seeded random init learns the original task from the frozen source as a
    # teacher, CE + distillation on original images, while FTS suppresses the restricted one; the
    # guard only measures until it first passes). docs/design.md, "Co-training".
    init: str = "source"
    # Long-horizon FTS terms beside ICE / KLU (issue 36; core/horizon.py has the formulas). Each is off
    # at weight 0.0 (the meta-gradient is then bit-identical to SOPHON's) and first order; tail_weight
    # and curv_weight need protect.order=first and run the environments sequentially.
    # Progress bound (CLAMP): the FTS objective adds tail_weight * ℓ_∞, the last query loss plus a
    # geometric tail of its latest increase, with the ratio of successive increases clamped to
    # [0, tail_ratio_max] (0 < tail_ratio_max < 1).
    tail_weight: float = 0.0
    tail_ratio_max: float = 0.9
    # Directional curvature (CLAMP / condition-number immunization): the FTS objective adds
    # -curv_weight * tanh(κ / curv_scale), κ the attacker's fit-loss curvature along its own update at
    # each query point, by finite differences of gradients with step curv_eps (parameter-space norm).
    curv_weight: float = 0.0
    curv_eps: float = 1e-2
    curv_scale: float = 1.0
    # Gradient coupling (SEAM): each FTS step adds couple_weight * cos(∇ restricted fit loss, ∇ NTR
    # loss) at θ (one restricted batch of query_batch, one original batch of ntr_batch), its
    # Hessian-vector products by finite differences with step couple_eps.
    couple_weight: float = 0.0
    couple_eps: float = 1e-2


@dataclass(frozen=True)
class Recipe:
    """One real fine-tuning attack."""

    strategy: str = "initFC-all"  # direct-all | direct-FC | initFC-all | initFC-FC
    optimizer: str = "adam"  # sgd | momentum | nesterov | adam | adamw | rmsprop | adagrad | adadelta
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | warmup
    warmup_steps: int = 20


def recipe_label(r: Recipe) -> str:
    """A recipe in one short line, e.g. "initFC-all adamw lr0.001 bs32 wd0.01 cosine"."""
    extra = (f" wd{r.weight_decay:g}" if r.weight_decay else "") + (f" {r.schedule}" if r.schedule != "constant" else "")
    return f"{r.strategy} {r.optimizer} lr{r.lr:g} bs{r.batch_size}{extra}"


@dataclass(frozen=True)
class AttackConfig:
    budgets: tuple[int, ...] = (25, 50, 100, 200, 400)
    eval_batch: int = 512
    seed: int = 0
    # Classifiers: the attacker fine-tunes on at most this many restricted training images per
    # class, one subset drawn with `seed` and shared by every subject and trial (None = all).
    train_per_class: int | None = None
    # The control's power a verdict needs: the source must beat scratch by at least this much at
    # some budget for `passed` (None = the kind's default: 0.10 accuracy, 0.025 MSE).
    min_gap: float | None = None


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    description: str
    kind: str = "classifier"  # "classifier" | "diffusion"
    input: InputSpec = field(default_factory=InputSpec)
    original: DomainSpec = field(default_factory=DomainSpec)
    restricted: tuple[DomainSpec, ...] = (DomainSpec(),)
    arch: ArchSpec = field(default_factory=ArchSpec)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)


@dataclass(frozen=True)
class DiffusionConfig:
    """Generation-mode settings, `cfg.diffusion` of a `DiffusionPipelineConfig` (`--set diffusion.x=...`).

    t_range: [lo, hi) timesteps that protection (FTS support/query and NTR batches) draws uniformly
        (None = whole schedule). Pretraining and attacks always train over the whole schedule.
    eval_timesteps / eval_seed: the fixed evaluation grid and noise seed of the denoising MSE.
    sample_steps / samples / sample_seed: DDPM sampling for grids and the judge metric
        (samples=0 skips the sample grids and the judge in the audit).
    judge: a classification config whose model labels generated samples (None: grids only); it is
        trained on the pipeline's own input spec (its `input` is replaced by the pipeline's).
    judge_classes: the judge's labels that count as "recognised as restricted".
    judge_confidence: a sample counts as a recognised digit only when the judge's top softmax
        probability reaches this (else it is rejected as "not a digit"); 0 = no rejection.
    judge_none_class: the judge's label for "no digit" (a class of non-digit images in its
        training data, e.g. digits' `none_class` option); a sample it labels so is rejected.
    retain: what protection's NTR step keeps on the original domain: "data" (ε-MSE against the
        drawn noise) or "teacher" (MSE to a frozen copy of the source model's prediction).
    """

    t_range: tuple[int, int] | None = None
    retain: str = "data"
    eval_timesteps: int = 10
    eval_seed: int = 0
    sample_steps: int = 50
    samples: int = 64
    sample_seed: int = 0
    judge: PipelineConfig | None = None
    judge_classes: tuple[int, ...] = ()
    judge_confidence: float = 0.0
    judge_none_class: int | None = None


@dataclass(frozen=True)
class DiffusionPipelineConfig(PipelineConfig):
    """A `PipelineConfig` plus the generation-mode settings (kind="diffusion" pipelines return it)."""

    kind: str = "diffusion"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


# kind -> the config class a pipeline file of that kind starts from
CONFIG_CLASSES: dict[str, type[PipelineConfig]] = {"classifier": PipelineConfig, "diffusion": DiffusionPipelineConfig}


def extensions(cfg: PipelineConfig) -> tuple[Any, ...]:
    """The fields a config subclass adds to `PipelineConfig` (e.g. `diffusion`), for stage hashes."""
    base = {f.name for f in dataclasses.fields(PipelineConfig)}
    return tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in base)


def to_dict(cfg: Any) -> Any:
    """A JSON-able dict of a config dataclass (tuples become lists; tuples of configs become lists)."""
    if isinstance(cfg, tuple):
        return [to_dict(c) for c in cfg]
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists stay values), for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Fields added to a config after results and run names were recorded with it: at these values
# they are left out of `config_hash`, so a config that does not use them keeps its hash (its stage
# hashes, Ray Train run names, resumable runs); set to anything else, they are hashed as usual.
HASH_NEUTRAL_DEFAULTS: dict[str, Any] = {"recipes": (), "recipe_prob": 0.5,  # EnvSpace, issue 29
                                      "init": "source",  # ProtectConfig (co-training), issue 29
                                      # ProtectConfig's long-horizon FTS terms, issue 36
                                      "tail_weight": 0.0, "tail_ratio_max": 0.9, "curv_weight": 0.0,
                                      "curv_eps": 1e-2, "curv_scale": 1.0, "couple_weight": 0.0, "couple_eps": 1e-2}


def _hashed_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in pairs if not (k in HASH_NEUTRAL_DEFAULTS and v == HASH_NEUTRAL_DEFAULTS[k])}


def _hash_view(cfg: Any) -> Any:
    """`to_dict(cfg)` without the hash-neutral fields at their neutral values."""
    if isinstance(cfg, tuple):
        return [_hash_view(c) for c in cfg]
    return json.loads(json.dumps(dataclasses.asdict(cfg, dict_factory=_hashed_fields)))


def config_hash(cfg: Any, n: int = 8) -> str:
    """Short stable hash of a config (or a tuple of configs), for deterministic run names."""
    obj = [_hash_view(c) for c in cfg] if isinstance(cfg, tuple) and not dataclasses.is_dataclass(cfg) else _hash_view(cfg)
    blob = json.dumps(obj, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def _frozen(value: Any) -> Any:
    """Lists (at any depth) as tuples, so a frozen config stays hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def _nullable(obj: Any, name: str) -> bool:
    """Whether dataclass field `name` of `obj` is annotated as possibly None (`X | None`)."""
    f = next((f for f in dataclasses.fields(obj) if f.name == name), None)
    return f is not None and "None" in str(f.type)


def _coerce(value: Any, current: Any, key: str, nullable: bool = False) -> Any:
    if value is None and (nullable or current is None):
        return None
    if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, bool):
        raise UserError(f"--set {key}: expected a {type(current).__name__}, got {value!r}")
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise UserError(f"--set {key}: expected true/false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, (list, tuple)):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if current is None or isinstance(value, type(current)):
        return _frozen(value)
    if isinstance(current, tuple) and not isinstance(value, (list, tuple)):
        return (value,)
    raise UserError(f"--set {key}: expected a {type(current).__name__}, got {value!r}")


def _replace_path(obj: Any, parts: list[str], value: Any, full: str) -> Any:
    head, rest = parts[0], parts[1:]
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        if head not in names:
            raise UserError(f"--set {full}: unknown key {head!r}; valid keys here: {', '.join(names)}")
        cur = getattr(obj, head)
        new = _replace_path(cur, rest, value, full) if rest else _coerce(value, cur, full, _nullable(obj, head))
        return dataclasses.replace(obj, **{head: new})
    if isinstance(obj, dict):
        if not rest:
            return {**obj, head: _frozen(value)}
        if head not in obj:
            raise UserError(f"--set {full}: unknown key {head!r}; valid keys here: {', '.join(obj)}")
        return {**obj, head: _replace_path(obj[head], rest, value, full)}
    if isinstance(obj, tuple) and head.isdigit() and int(head) < len(obj):
        i = int(head)
        item = _replace_path(obj[i], rest, value, full) if rest else value
        return obj[:i] + (item,) + obj[i + 1 :]
    raise UserError(f"--set {full}: {head!r} cannot be set on a {type(obj).__name__}")


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply `key.path=value` overrides to a frozen config, validating every key and type."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        cfg = _replace_path(cfg, key.strip().split("."), _parse_value(text.strip()), key.strip())
    return cfg


def merge_dict(obj: Any, data: Any, where: str = "") -> Any:
    """`obj` (a config dataclass) with the values of a nested dict merged in, every key and type
    checked like `--set` (a pipeline file's fields; UserError naming the key path). A domain
    mapping (`original`) replaces the domain whole, like each item of a list of mappings (e.g.
    `restricted`, a tuple of the existing items' dataclass): fields it does not give take the
    dataclass defaults, not `obj`'s. Mappings on dict fields (`options`, `kwargs`) replace them,
    `judge` mappings build a PipelineConfig."""
    if dataclasses.is_dataclass(obj) and isinstance(data, dict):
        names = [f.name for f in dataclasses.fields(obj)]
        changes = {}
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if key not in names:
                raise UserError(f"{path}: unknown key {key!r}; valid keys here: {', '.join(names)}")
            current = getattr(obj, key)
            if key == "judge" and isinstance(value, dict):
                current = current or PipelineConfig(name="judge", description="the judge classifier")
            if isinstance(current, DomainSpec) and isinstance(value, dict):
                current = DomainSpec()  # a domain means what the file says, not the base's classes or root
            changes[key] = None if value is None and _nullable(obj, key) else merge_dict(current, value, path)
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, tuple) and obj and dataclasses.is_dataclass(obj[0]) and isinstance(data, list):
        return tuple(merge_dict(type(obj[0])(), item, f"{where}.{i}") for i, item in enumerate(data))
    if dataclasses.is_dataclass(obj) or (isinstance(data, dict) and not isinstance(obj, dict) and obj is not None):
        raise UserError(f"{where}: expected a mapping of {type(obj).__name__} fields, got {data!r}")
    if isinstance(obj, dict):
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping, got {data!r}")
        return dict(data)
    return _coerce(data, obj, where)


# Named protection presets: `--preset NAME` (protect, run) puts these `--set` overrides before the
# user's own, so every field stays visible in the resolved config and a later --set wins.
# "paper": the SOPHON paper's classification settings as closely as the pipeline allows
# (docs/design.md, "The paper's protocol"): ICE in the paper's formula -log(1 - p_y) (`ice-comp`;
# the released code computes CrossEntropy(1 - logits), which equals `ice-neg` because softmax is
# shift-invariant), ONE simulated environment per step, K = 50 inner SGD steps at lr 1e-4 with the
# head re-initialised (Xavier, zero bias) before each simulation, support batches of 130 and query
# batches of 20 (the reference adapts on int(150 * 0.9 / 10) = 13 images per class of each batch of 150, 130,
# and evaluates on the other 20),
# first-order meta-gradient averaged uniformly over the steps, Adam outer lr 3e-4 (FTS) and 5e-4
# (NTR) with NTR batches of 150, total gradient norm clipped to 0.5, 1,000 outer iterations of one
# FTS and one NTR step. Kept from the pipeline: the guard (relative to the source's accuracy, the
# reference's is an absolute 80%) and the data.
# "hardened": the best protection measured so far on mnist-to-digits (docs/results.md, "Objectives
# beyond the simulated horizon"): 16x the pipeline default's compute, K = 20 simulated steps with the
# suppression loss after every 4th, 1,600 outer iterations (~70 min on 2 Ray Train workers of the
# 2-core VM; measured in --start chunks of 100 / 100 / 200 / 400 / 800). Under issue 36's target audit
# (default-v2 + a 64-trial search, 2 seeds, 10 / 25 / 100 steps) it removed 124% / 99% of the source's
# advantage at 10 / 25 steps and passed (margin +0.014 vs epsilon 0.02; it does not certify: 100 steps
# < the standard's 400) and the paper's whole suite with seed re-runs (paper-v1, margin +0.006 at 5
# epochs, 174% removed at 20; each recipe once it failed by 0.008 at 5 epochs). The 8x point (800
# iterations, half the cost) failed the search audit by 0.002 and passed paper-v1. Issue 36's
# long-horizon terms are not in it: none beat SOPHON's objective at equal compute.
PRESETS: dict[str, tuple[str, ...]] = {
    "hardened": ("protect.inner_steps=20", "protect.query_every=4", "protect.iterations=1600"),
    "paper": (
        "protect.loss=ice-comp", "protect.iterations=1000", "protect.ml_loop=1", "protect.nl_loop=1",
        "protect.envs_per_step=1", "protect.inner_steps=50", "protect.query_every=1", "protect.weighting=uniform",
        "protect.order=first", "protect.support_per_class=None", "protect.env.optimizers=['sgd']",
        "protect.env.lr={'sgd': (1e-4, 1e-4)}", "protect.env.batch_sizes=[130]", "protect.env.reinit_head_prob=1.0",
        "protect.env.head_only_prob=0.0", "protect.query_batch=20", "protect.ntr_batch=150", "protect.alpha=3e-4",
        "protect.beta=5e-4", "protect.clip=0.5",
    ),
}


def preset_overrides(name: str | None) -> tuple[str, ...]:
    """The `--set` overrides of a named preset (empty for None; UserError for an unknown name)."""
    if name is None:
        return ()
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; use one of: {', '.join(PRESETS)} (or --set fields yourself)")
    return PRESETS[name]
