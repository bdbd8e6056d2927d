"""sophon_ray/config.py: `--set` overrides (paths, parsing, coercion, errors), the config hash that
decides which `run` stages are skipped (and the stage hashes built on it), `to_dict`, `flatten`,
`extensions` and `recipe_label`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest

from sophon_ray import tasks
from sophon_ray.config import (
    ArchSpec, AttackConfig, DiffusionConfig, DiffusionPipelineConfig, DomainSpec, EnvSpace, InputSpec,
    PipelineConfig, ProtectConfig, Recipe, apply_overrides, config_hash, extensions, flatten, recipe_label, to_dict,
)
from sophon_ray.errors import UserError
from sophon_ray.pipelines import PIPELINES


@pytest.fixture
def base() -> PipelineConfig:
    return PipelineConfig(name="t", description="a test config", original=DomainSpec(classes=(0, 1)),
                          restricted=(DomainSpec(classes=(2, 3)),), arch=ArchSpec("cnn-small", {"width": 8}))


# -- apply_overrides: paths ------------------------------------------------------------------------


def test_overrides_set_nested_fields_and_leave_the_original_untouched(base):
    cfg = apply_overrides(base, ["protect.iterations=50", "protect.env.optimizers=['adam']", "input.size=32"])
    assert cfg.protect.iterations == 50 and cfg.protect.env.optimizers == ("adam",) and cfg.input.size == 32
    assert base.protect.iterations == 200 and base.input.size == 16  # frozen: a new config, the old one unchanged
    assert dataclasses.replace(cfg, protect=base.protect, input=base.input) == base  # nothing else moved
    assert apply_overrides(base, []) is base


def test_overrides_apply_in_order_and_reach_tuples_and_dicts(base):
    cfg = apply_overrides(base, ["protect.alpha=1e-2", "protect.alpha=3e-3"])
    assert cfg.protect.alpha == 3e-3  # the last one wins
    cfg = apply_overrides(base, ["restricted.0.root=/data/x", "restricted.0.classes=[7, 8]"])
    assert cfg.restricted == (DomainSpec(classes=(7, 8), root="/data/x"),)
    cfg = apply_overrides(base, ["arch.kwargs.width=16", "arch.kwargs.norm=none"])
    assert cfg.arch.kwargs == {"width": 16, "norm": None}  # a dict takes new keys; "none" parses as None
    assert apply_overrides(base, ["arch.kwargs={'width': 4}"]).arch.kwargs == {"width": 4}  # or is replaced whole
    cfg = apply_overrides(base, ["protect.env.lr.sgd=(0.01, 0.1)"])
    assert cfg.protect.env.lr["sgd"] == (0.01, 0.1) and cfg.protect.env.lr["adam"] == EnvSpace().lr["adam"]
    cfg = apply_overrides(base, [" protect.seed = 3 "])  # spaces around key and value are ignored
    assert cfg.protect.seed == 3


def test_overrides_reach_the_fields_a_config_subclass_adds():
    cfg = DiffusionPipelineConfig(name="d", description="d")
    out = apply_overrides(cfg, ["diffusion.samples=8", "diffusion.t_range=(100, 200)", "diffusion.judge_classes=[5, 6]"])
    assert out.diffusion.samples == 8 and out.diffusion.t_range == (100, 200) and out.diffusion.judge_classes == (5, 6)
    assert type(out) is DiffusionPipelineConfig and out.kind == "diffusion"


# -- apply_overrides: parsing and coercion ---------------------------------------------------------


def test_values_are_parsed_and_coerced_to_the_fields_type(base):
    cfg = apply_overrides(base, ["protect.alpha=1", "protect.clip=0", "pretrain.lr=2e-3", "protect.loss=ice-neg",
                                 "original.source=cifar10", "attack.budgets=[10, 20]", "input.mean=0.1",
                                 "input.std=(0.2, 0.3, 0.4)", "original.root=null", "original.options={'size': 8}"])
    assert cfg.protect.alpha == 1.0 and isinstance(cfg.protect.alpha, float)  # int -> float field
    assert isinstance(cfg.protect.clip, float) and cfg.pretrain.lr == 2e-3
    assert cfg.protect.loss == "ice-neg" and cfg.original.source == "cifar10"  # bare words are strings
    assert cfg.attack.budgets == (10, 20)  # a list becomes the field's tuple
    assert cfg.input.mean == (0.1,) and cfg.input.std == (0.2, 0.3, 0.4)  # a scalar becomes a 1-tuple
    assert cfg.original.root is None and cfg.original.options == {"size": 8}
    assert apply_overrides(base, ["attack.train_per_class=25"]).attack.train_per_class == 25  # None field: any value
    assert apply_overrides(base, ["attack.min_gap=0.05"]).attack.min_gap == 0.05


def test_booleans_and_nested_lists():
    @dataclass(frozen=True)
    class Flags:
        on: bool = False
        pairs: tuple = ((0, 1),)

    assert apply_overrides(Flags(), ["on=true"]).on is True and apply_overrides(Flags(), ["on=False"]).on is False
    with pytest.raises(UserError, match="expected true/false, got 1"):
        apply_overrides(Flags(), ["on=1"])
    assert apply_overrides(Flags(), ["pairs=[[1, 2], [3, 4]]"]).pairs == ((1, 2), (3, 4))  # inner lists too


@pytest.mark.parametrize(
    "item,needle",
    [
        ("protect.iterations", "expected key.path=value"),
        ("nope=1", "unknown key 'nope'; valid keys here: name, description"),
        ("protect.nope=1", "unknown key 'nope'; valid keys here: iterations"),
        ("protect.env.lr.nope.x=1", "unknown key 'nope'; valid keys here: sgd"),
        ("restricted.1.root=x", "'1' cannot be set on a tuple"),
        ("protect.iterations.x=1", "'x' cannot be set on a int"),
        ("protect.iterations=1.5", "expected a int, got 1.5"),
        ("protect.iterations=abc", "expected a int, got 'abc'"),
        ("input.size=None", "expected a int, got None"),
        ("protect.alpha=fast", "expected a float, got 'fast'"),
        ("protect.loss=3", "expected a str, got 3"),
        ("original.options=[1]", "expected a dict"),
    ],
)
def test_bad_overrides_are_one_line_user_errors_naming_the_key(base, item, needle):
    with pytest.raises(UserError) as e:
        apply_overrides(base, [item])
    assert needle in str(e.value) and str(e.value).startswith("--set ") and "\n" not in str(e.value)


def test_a_bool_is_not_an_integer(base):
    with pytest.raises(UserError, match="protect.iterations"):
        apply_overrides(base, ["protect.iterations=true"])


def test_lists_become_tuples_where_the_field_is_none():
    cfg = apply_overrides(PipelineConfig(name="t", description="d"), ["original.classes=[5, 6]"])
    assert cfg.original.classes == (5, 6) and isinstance(cfg.original.classes, tuple)
    lr = apply_overrides(cfg, ["protect.env.lr.sgd=[0.001, 0.01]"]).protect.env.lr["sgd"]
    assert lr == (0.001, 0.01) and isinstance(lr, tuple)


# -- config_hash and the stage hashes ----------------------------------------------------------------


def test_config_hash_is_stable_and_short(base):
    h = config_hash(base)
    assert len(h) == 8 and int(h, 16) >= 0 and config_hash(base, n=16).startswith(h)
    again = PipelineConfig(name="t", description="a test config", original=DomainSpec(classes=(0, 1)),
                           restricted=(DomainSpec(classes=(2, 3)),), arch=ArchSpec("cnn-small", {"width": 8}))
    assert again is not base and config_hash(again) == h  # equal configs, equal hashes
    # dict key order and tuple-vs-list do not matter: the hash is of the JSON form with sorted keys
    a = ArchSpec("resnet20", {"width": 8, "norm": "bn"})
    assert config_hash(a) == config_hash(ArchSpec("resnet20", {"norm": "bn", "width": 8}))
    assert config_hash(InputSpec(mean=(0.5,))) == config_hash(apply_overrides(InputSpec(), ["mean=[0.5]"]))
    # pinned to literals: a change to the serialisation would silently re-run every user's `run` stages
    assert config_hash(a) == "7af886ae" and config_hash(a, n=16) == "7af886aef006978d"
    assert config_hash((a, ArchSpec("cnn-small"))) == "a40c4c62"
    import hashlib  # the literal above is the sha256 of this JSON text, written out by hand

    text = b'{"kwargs": {"norm": "bn", "width": 8}, "name": "resnet20"}'
    assert hashlib.sha256(text).hexdigest()[:8] == "7af886ae"


@pytest.mark.parametrize("item", ["name=u", "description=other", "protect.iterations=7", "protect.env.batch_sizes=[8]",
                                  "attack.budgets=[5]", "input.size=8", "original.seed=1", "restricted.0.classes=[4]",
                                  "arch.kwargs.width=4", "pretrain.seed=1"])
def test_config_hash_changes_with_any_field(base, item):
    assert config_hash(apply_overrides(base, [item])) != config_hash(base)


def test_config_hash_of_a_tuple_is_the_hash_of_its_parts_in_order(base):
    pair = (base.input, base.arch)
    assert config_hash(pair) == config_hash((InputSpec(), ArchSpec("cnn-small", {"width": 8})))
    assert config_hash(pair) != config_hash((base.arch, base.input))
    assert config_hash(base.restricted) == config_hash((DomainSpec(classes=(2, 3)),))  # a tuple of configs


SOURCE_STAGE = ["input.size=8", "original.classes=[0, 2]", "restricted.0.classes=[3, 4]", "arch.name=cnn-tiny",
                "pretrain.steps=5", "pretrain.seed=1"]
NOT_SOURCE_STAGE = ["protect.iterations=7", "attack.budgets=[5]", "attack.seed=3", "description=other"]
PROTECT_STAGE = ["protect.iterations=7", "protect.env.optimizers=['sgd']", "protect.loss=ice-neg", "input.size=8",
                 "restricted.0.classes=[3, 4]"]
NOT_PROTECT_STAGE = ["pretrain.steps=5", "attack.budgets=[5]", "attack.train_per_class=4", "description=other"]


def _task(overrides=()):
    return tasks.of(apply_overrides(PIPELINES["digits"].get_config(smoke=True), list(overrides)))


@pytest.mark.parametrize("item", SOURCE_STAGE + NOT_SOURCE_STAGE)
def test_source_stage_hash_follows_only_what_makes_the_source(item):
    """`run` reuses a source model whose card has this hash: a change that alters the source must
    change it, a change that does not must not (else `run` would pretrain again for nothing)."""
    assert (_task([item]).source_stage_hash() != _task().source_stage_hash()) == (item in SOURCE_STAGE)


@pytest.mark.parametrize("item", PROTECT_STAGE + NOT_PROTECT_STAGE)
def test_protect_stage_hash_follows_only_what_makes_the_protected_model(item):
    sha = "ab" * 32
    assert (_task([item]).protect_stage_hash(sha, 0) != _task().protect_stage_hash(sha, 0)) == (item in PROTECT_STAGE)


def test_protect_stage_hash_names_the_source_and_the_workers():
    task = _task()
    h = task.protect_stage_hash("ab" * 32, 2)
    assert h.endswith("-abababab-w2") and h != task.protect_stage_hash("cd" * 32, 2) != task.protect_stage_hash("ab" * 32, 1)


def test_protect_stage_hash_covers_a_subclass_extension():
    task = tasks.of(PIPELINES["digits-diffusion"].get_config(smoke=True))
    other = tasks.of(apply_overrides(task.cfg, ["diffusion.t_range=(10, 20)"]))
    assert other.protect_stage_hash("ab" * 32, 0) != task.protect_stage_hash("ab" * 32, 0)


# -- to_dict, flatten, extensions, recipe_label -------------------------------------------------------


def test_to_dict_is_json_and_round_trips(base):
    d = to_dict(base)
    assert json.loads(json.dumps(d)) == d and d["restricted"] == [{**to_dict(DomainSpec()), "classes": [2, 3]}]
    assert d["input"]["mean"] == [0.5] and d["protect"]["env"]["lr"]["sgd"] == [1e-3, 3e-1]  # tuples -> lists
    back = apply_overrides(PipelineConfig(name="x", description="y"),
                           [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in flatten(d).items()
                            if k not in ("restricted", "protect.env.lr")]
                           + [f"restricted.0.{k}={v!r}" for k, v in d["restricted"][0].items() if k != "options"])
    assert to_dict(back) == d  # every field survives a round trip through --set
    assert to_dict((base.input, base.arch)) == [to_dict(base.input), to_dict(base.arch)]
    assert to_dict(Recipe()) == dataclasses.asdict(Recipe())


def test_flatten_makes_dotted_keys_and_keeps_lists_and_empty_dicts():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}, "f": "x"}
    assert flatten({"a": {1: "int key"}}) == {"a": {1: "int key"}}  # only string-keyed dicts are opened
    assert flatten(to_dict(ProtectConfig()))["env.lr.adam"] == [1e-5, 1e-2]


def test_extensions_are_the_fields_a_subclass_adds(base):
    assert extensions(base) == ()
    d = DiffusionPipelineConfig(name="d", description="d", diffusion=DiffusionConfig(samples=4))
    assert extensions(d) == (DiffusionConfig(samples=4),)


def test_recipe_label():
    assert recipe_label(Recipe()) == "initFC-all adam lr0.001 bs32"
    r = Recipe("direct-FC", "adamw", 3e-4, 16, weight_decay=0.01, schedule="cosine")
    assert recipe_label(r) == "direct-FC adamw lr0.0003 bs16 wd0.01 cosine"
    assert recipe_label(Recipe(schedule="warmup")).endswith(" warmup")


def test_defaults_are_the_documented_ones():
    """Defaults users rely on without --set (docs/design.md, pipeline files)."""
    assert AttackConfig().budgets == (25, 50, 100, 200, 400) and AttackConfig().train_per_class is None
    assert InputSpec() == InputSpec(1, 16, "bilinear", (0.5,), (0.5,))
    assert PipelineConfig(name="x", description="y").kind == "classifier"
    assert DiffusionPipelineConfig(name="x", description="y").kind == "diffusion"


def test_protect_stage_hash_ignores_audit_only_diffusion_settings():
    """Sampling and the judge are audit-only: changing them must not re-protect in `run`."""
    task = tasks.of(PIPELINES["digits-diffusion"].get_config(smoke=True))
    for item in ("diffusion.samples=3", "diffusion.sample_steps=7", "diffusion.judge_classes=[1]", "diffusion.judge_none_class=None"):
        other = tasks.of(apply_overrides(task.cfg, [item]))
        assert other.protect_stage_hash("ab" * 32, 0) == task.protect_stage_hash("ab" * 32, 0), item
    moved = tasks.of(apply_overrides(task.cfg, ["diffusion.eval_timesteps=5"]))
    assert moved.protect_stage_hash("ab" * 32, 0) != task.protect_stage_hash("ab" * 32, 0)


def test_none_only_where_the_field_allows_it():
    cfg = apply_overrides(PIPELINES["digits"].get_config(smoke=True), ["original.classes=None", "attack.min_gap=null"])
    assert cfg.original.classes is None and cfg.attack.min_gap is None
    with pytest.raises(UserError, match="protect.iterations"):
        apply_overrides(cfg, ["protect.iterations=None"])
