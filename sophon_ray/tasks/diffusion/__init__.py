"""The diffusion task (kind="diffusion"): pretrain, protect and attack a DDPM UNet.

Same model directories, engine, guard and Ray Train path as classifiers, with the ε-prediction
objective of `core.diffusion`; the restricted-domain metric is the denoising MSE on held-out
images over a fixed timestep grid with fixed noise (lower = better for the attacker), measured
for the original domain too. Sample grids and the judge metric live in `tasks.diffusion.samples`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sophon_ray import modeldir
from sophon_ray.config import DiffusionConfig, Recipe, to_dict
from sophon_ray.errors import UserError
from sophon_ray.tasks.base import MSE, Log, Metrics, Task, Tensors, no_metrics
from sophon_ray.tasks.diffusion.suites import PROTOCOLS_DIFFUSION, SUITES_DIFFUSION


@dataclass
class AttackResult:
    """One real fine-tuning run: restricted and original test MSE per budget, the final model."""

    restricted: dict[int, float]
    original: dict[int, float]
    model: torch.nn.Module


class DiffusionTask(Task):
    kind = "diffusion"
    metric = MSE
    audit_suite, run_suite, smoke_suite = "diffusion-v2", "diffusion-v2", "diffusion-test-v1"
    epsilon, min_gap = 0.005, 0.025
    strategies = ("all", "up", "down")
    default_recipe = Recipe("all", "adam", 1e-3, 16)
    has_samples = True

    def protect_extensions(self) -> tuple[Any, ...]:
        """What of `cfg.diffusion` changes a protected UNet: the protection's timestep range and
        the guard's evaluation grid (sampling and the judge are audit-only)."""
        import dataclasses

        return (dataclasses.replace(self.settings, samples=0, sample_steps=0, sample_seed=0, judge=None,
                                    judge_classes=(), judge_confidence=0.0, judge_none_class=None),)

    @property
    def settings(self) -> DiffusionConfig:
        """`cfg.diffusion` if the config carries it, else the defaults."""
        return getattr(self.cfg, "diffusion", None) or DiffusionConfig()

    def check(self) -> None:
        """UserError for an image size the UNet cannot take, or a judge that cannot label samples."""
        from sophon_ray.data.sources import check_spec
        from sophon_ray.models import downsample_factor

        cfg = self.cfg
        factor = downsample_factor(cfg.arch)
        if cfg.input.size % factor:
            raise UserError(
                f"image size {cfg.input.size} is not divisible by the UNet's down-sampling factor {factor} "
                f"({cfg.arch.name}); use input.size=<multiple of {factor}>"
            )
        if cfg.protect.support_per_class is not None or any(
                (r.get("support_per_class") if isinstance(r, dict) else r.support_per_class) is not None
                for r in cfg.protect.env.recipes):
            raise UserError("protect.support_per_class (and a fed-back recipe's) needs class labels (classification "
                            "pipelines); leave it unset for a diffusion pipeline")
        if self.settings.retain not in ("data", "teacher"):
            raise UserError(f"diffusion.retain={self.settings.retain!r}: use data or teacher")
        if not 0.0 <= self.settings.judge_confidence < 1.0:
            raise UserError("diffusion.judge_confidence must be in [0, 1) (0 = count every sample)")
        judge = self.settings.judge
        if judge is not None and (judge.kind != "classifier" or not self.settings.judge_classes):
            raise UserError("diffusion.judge must be a classifier config (kind=classifier) and diffusion.judge_classes "
                            "the judge's labels that count as restricted (e.g. [5,6,7,8,9])")
        none = self.settings.judge_none_class
        labels = None if judge is None else check_spec(judge.original) if judge.original.classes is None else len(judge.original.classes)
        if none is not None and (judge is None or none in self.settings.judge_classes or not 0 <= none < (labels or none + 1)):
            raise UserError(f"diffusion.judge_none_class={none} must be a label of the judge's that is not one of "
                            "diffusion.judge_classes (e.g. 10 for a digits judge with none_class=true), or null")

    @staticmethod
    def build_module(card: dict[str, Any]) -> torch.nn.Module:
        from sophon_ray.config import ArchSpec
        from sophon_ray.models import build_diffusion

        arch = ArchSpec(name=card["arch"]["name"], kwargs=dict(card["arch"].get("kwargs", {})))
        inp = card["input"]
        return build_diffusion(arch, int(inp["channels"]), int(inp["size"]))[0]

    def load_tensors(self) -> Tensors:
        """Original and restricted images preprocessed per `cfg.input`. Unlike classification, the two
        label spaces may differ (labels are unused); `num_classes` is the original domain's."""
        from sophon_ray.data import load_domain, preprocess

        cfg = self.cfg
        self.check()
        orig, restr = load_domain(cfg.original), load_domain(cfg.restricted[0])
        return Tensors(
            original_train=preprocess(orig.train, cfg.input), original_test=preprocess(orig.test, cfg.input),
            restricted_train=preprocess(restr.train, cfg.input), restricted_test=preprocess(restr.test, cfg.input),
            num_classes=orig.num_classes, names={"original": orig.name, "restricted": [restr.name]},
        )

    def new_unet(self, seed: int) -> tuple[torch.nn.Module, Any]:
        """A seeded random UNet of the pipeline's architecture and its DDPM scheduler."""
        from sophon_ray.models import build_diffusion

        self.check()
        torch.manual_seed(seed)
        return build_diffusion(self.cfg.arch, self.cfg.input.channels, self.cfg.input.size)

    def new_model(self, num_classes: int, seed: int) -> torch.nn.Module:
        """A seeded random UNet (`num_classes` is ignored: a UNet has no head)."""
        return self.new_unet(seed)[0]

    def scheduler(self) -> Any:
        """The pipeline's DDPM scheduler (diffusers `DDPMScheduler`), without building a UNet."""
        from sophon_ray.models.diffusion import build_scheduler

        return build_scheduler(self.cfg.arch)

    def load_for(self, source: str | Path, t: Tensors) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Load a diffusion model directory and refuse one that does not fit the pipeline's data."""
        from sophon_ray.core.diffusion import check_images
        from sophon_ray.models import downsample_factor
        from sophon_ray.tasks.base import load_model

        cfg = self.cfg
        model, card = load_model(source)
        got, want = int(card["input"]["channels"]), cfg.input.channels
        if card["kind"] == self.kind and got != want:
            raise UserError(f"model {source} takes {got}-channel images but pipeline {cfg.name!r} has {want} "
                            f"(input.channels); pass a model made for this data or --set input.channels={got}")
        self.check_compatible(card, t.num_classes, str(source))
        check_images(t.restricted_test[0][:1], model.config.in_channels, downsample_factor(cfg.arch), f"pipeline {cfg.name}")
        return model, card

    def objective(self, alphas_cumprod: torch.Tensor, protection: bool = False,
                  teacher: torch.nn.Module | None = None):
        """The `DiffusionObjective` of the pipeline (suppression loss `cfg.protect.loss`); timesteps from
        `diffusion.t_range` for protection, else (pretraining, attacks) from the whole schedule;
        `teacher` (the frozen source) makes NTR distil it (`diffusion.retain=teacher`)."""
        from sophon_ray.core.diffusion import DiffusionObjective
        from sophon_ray.core.losses import get_loss

        t_range = self.settings.t_range if protection else None
        return DiffusionObjective(get_loss(self.cfg.protect.loss, self.kind), alphas_cumprod, t_range, teacher)

    def mse(self, model: torch.nn.Module, x: torch.Tensor, alphas_cumprod: torch.Tensor) -> float:
        """Denoising MSE of `model` on images `x` over the pipeline's fixed grid and noise seed."""
        from sophon_ray.core.diffusion import denoising_mse, eval_timesteps

        s = self.settings
        grid = eval_timesteps(len(alphas_cumprod), s.eval_timesteps)
        return denoising_mse(model, x, alphas_cumprod, grid, s.eval_seed, self.cfg.attack.eval_batch)

    def mse_buckets(self, model: torch.nn.Module, x: torch.Tensor, alphas_cumprod: torch.Tensor) -> dict[str, float]:
        """`core.diffusion.mse_buckets` on the pipeline's grid and noise seed ("overall" is `mse`)."""
        from sophon_ray.core.diffusion import eval_timesteps, mse_buckets

        s = self.settings
        grid = eval_timesteps(len(alphas_cumprod), s.eval_timesteps)
        return mse_buckets(model, x, alphas_cumprod, grid, s.eval_seed, self.cfg.attack.eval_batch)

    def original_metric(self, model: torch.nn.Module, t: Tensors) -> float:
        """Original-domain test MSE (the guard's quantity; of the source model: the guard's reference)."""
        return self.mse(model, t.original_test[0], self.scheduler().alphas_cumprod)

    def model_metrics(self, model: torch.nn.Module, t: Tensors) -> dict[str, float]:
        """Original and restricted test MSE of a model (what metrics.json records)."""
        alphas = self.scheduler().alphas_cumprod
        return {"original_test_mse": self.mse(model, t.original_test[0], alphas),
                "restricted_test_mse": self.mse(model, t.restricted_test[0], alphas)}

    def pretrain(self, out: str | Path, log: Log = print, on_metrics: Metrics = no_metrics) -> Path:
        """Train the unprotected source UNet on the original domain (ε-prediction MSE, AdamW + cosine)."""
        cfg = self.cfg
        t = self.load_tensors()
        p = cfg.pretrain
        model, sched = self.new_unet(p.seed)
        obj = self.objective(sched.alphas_cumprod)
        x = t.original_train[0]
        start = time.perf_counter()
        self._fit_source(model, len(x), lambda idx, g: obj.fit_loss(model, obj.make_batch((x[idx],), g)),
                         log, on_metrics)
        metrics = self.model_metrics(model, t)
        log(f"pretrain done: original test MSE {metrics['original_test_mse']:.4f}, "
            f"restricted test MSE {metrics['restricted_test_mse']:.4f} ({time.perf_counter() - start:.1f}s)")
        card = self.make_card(t, "source", {"config": to_dict(cfg.pretrain), "stage_hash": self.source_stage_hash()})
        return modeldir.save_model_dir(out, model, card, metrics)

    def build_protection(self, model: torch.nn.Module, t: Tensors, source_value: float, **dist: Any):
        """The core `Protection` for a diffusion pipeline (shared by local and Ray Train runs).

        The guard passes while the original test MSE <= source_value * (1 + protect.guard_margin).
        With `diffusion.retain=teacher` or `protect.init=fresh` (co-training: `model` re-initialised,
        `Task.fresh_start`), a frozen copy of `model` as passed in (the source: Train workers load a
        checkpoint only after this) is the NTR teacher.
        """
        import copy

        from sophon_ray.core import Protection, ProtectData

        alphas = self.scheduler().alphas_cumprod
        teacher = self.fresh_start(model, 0)  # protect.init=fresh: the source is always the NTR teacher
        if teacher is None and self.settings.retain == "teacher":
            teacher = copy.deepcopy(model).requires_grad_(False).eval()
        obj = self.objective(alphas, protection=True, teacher=teacher)
        data = ProtectData(original=t.original_train, restricted=t.restricted_train)
        return Protection(
            model, self.cfg.protect, data, obj,
            evaluate_original=lambda: self.mse(model, t.original_test[0], alphas),
            source_value=source_value, higher_is_better=False, head_keys=(), make_batch=obj.make_batch, **dist,
        )

    def validate_recipe(self, recipe: Recipe) -> None:
        """Refuse classifier strategies for a UNet (they need a head)."""
        from sophon_ray.core.attack import DIFFUSION_STRATEGIES, validate_recipe as validate

        validate(recipe)
        if recipe.strategy not in DIFFUSION_STRATEGIES:
            raise UserError(f"strategy {recipe.strategy!r} is for classifiers; a diffusion model takes "
                            f"strategy={'|'.join(DIFFUSION_STRATEGIES)} (e.g. --recipe strategy=all,optimizer=adam,lr=1e-3)")

    def finetune_kwargs(self, t: Tensors, model: torch.nn.Module | None, seed: int,
                        detail: dict[str, float] | None = None) -> dict[str, Any]:
        """The diffusion arguments of `core.attack.finetune` (train, evaluate, head_keys, loss_fn):
        restricted training images, restricted test MSE, no head, ε-prediction loss over the whole
        schedule with noise/timesteps from a generator seeded by `seed`. Every evaluation refills
        `detail` (when given) with its timestep buckets (`mse_buckets`; "overall" is the value)."""
        alphas = self.scheduler().alphas_cumprod

        def evaluate(m: torch.nn.Module) -> float:
            if detail is None:
                return self.mse(m, t.restricted_test[0], alphas)
            detail.clear()
            detail.update(self.mse_buckets(m, t.restricted_test[0], alphas))
            return detail["overall"]

        return {
            "train": (t.restricted_train[0],),
            "evaluate": evaluate,
            "head_keys": (),
            "loss_fn": self.objective(alphas).loss_fn(torch.Generator().manual_seed(7919 * seed + 17)),
        }

    def attack_run(self, model_src: str | Path | None, recipe: Recipe, seed: int = 0, t: Tensors | None = None,
                   track_original: bool = True) -> AttackResult:
        """Fine-tune a subject on the restricted training images; `model_src=None` is a scratch UNet
        (seeded 10000 + seed). With `track_original`, the original-domain test MSE is measured at each budget."""
        from sophon_ray.core import finetune

        self.validate_recipe(recipe)
        t = t or self.load_tensors()
        model = self.new_unet(10_000 + seed)[0] if model_src is None else self.load_for(model_src, t)[0]
        alphas = self.scheduler().alphas_cumprod
        torch.manual_seed(seed)
        original: dict[int, float] = {}

        def on_budget(steps: int, _: float) -> None:
            if track_original:
                original[steps] = self.mse(model, t.original_test[0], alphas)

        curve = finetune(model, recipe, budgets=self.cfg.attack.budgets, seed=seed, on_budget=on_budget,
                         **self.finetune_kwargs(t, model, seed))
        return AttackResult(curve, original, model)

    def attack(self, model_src: str | Path | None, recipe: Recipe, seed: int = 0,
               t: Tensors | None = None) -> dict[int, float]:
        """One real fine-tuning run; returns the restricted test MSE at each of `cfg.attack.budgets`."""
        return self.attack_run(model_src, recipe, seed, t, track_original=False).restricted

    def suites(self) -> dict[str, tuple[Recipe, ...]]:
        return SUITES_DIFFUSION

    def protocols(self) -> dict[str, Any]:
        return PROTOCOLS_DIFFUSION

    weights_file = "diffusion_pytorch_model.safetensors"

    def import_model(self, weights: str | Path, out: str | Path, *, new_head: bool = False,
                     log: Log = print) -> Path:
        """A source model directory from a diffusers `UNet2DModel.save_pretrained` folder
        (config.json + diffusion_pytorch_model.safetensors) whose config is `cfg.arch`'s."""
        import json

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from sophon_ray.models.diffusion import DIFFUSERS_UNET, unet_config_keys
        from sophon_ray.tasks.weights import match

        if new_head:
            raise UserError("--new-head is for classifiers; a UNet has no head")
        folder = Path(weights)
        if not (folder / "config.json").is_file():
            raise UserError(f"--weights {folder}: expected a diffusers UNet2DModel folder (config.json + "
                            f"{self.weights_file}, from save_pretrained)")
        if not (folder / self.weights_file).is_file():
            raise UserError(f"{folder}: no {self.weights_file}; save with unet.save_pretrained(dir, "
                            "safe_serialization=True) (pickled .bin weights are never loaded)")
        t = self.load_tensors()
        model = self.new_model(t.num_classes, self.cfg.pretrain.seed)
        config = json.loads((folder / "config.json").read_text())
        for key in ("sample_size", "in_channels", "out_channels", *unet_config_keys()):
            want, got = model.config.get(key), config.get(key, model.config.get(key))
            if (list(want) if isinstance(want, (list, tuple)) else want) != (list(got) if isinstance(got, (list, tuple)) else got):
                raise UserError(f"{folder}/config.json: {key}={got!r} but arch {self.cfg.arch.name} has {want!r}; "
                                f"describe this UNet with --set arch.name={DIFFUSERS_UNET} and its config as arch.kwargs "
                                "(docs: Protect your own model)")
        try:
            state = load_file(str(folder / self.weights_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{folder / self.weights_file} cannot be read as safetensors ({str(e)[:120]})") from None
        match(model, state, str(folder / self.weights_file))
        model.load_state_dict(state)
        return self._save_imported(model.eval(), t, folder, out, False, log)

    def audit_extras(self, audit: dict[str, Any], subjects: dict[str, str | None], out: Path, log: Log = print,
                     enabled: bool = True, judge_dir: str | Path | None = None) -> dict[str, Any]:
        """After a diffusion audit: `sample_report` with the strongest recipe against the protected model,
        fine-tuned for the optimizer steps the audit's largest budget meant (`attack_steps`: an epoch
        suite's budget in steps, from the trial's `step_budgets`), or, when disabled (`--no-samples`,
        `diffusion.samples=0`), a samples.json saying so and how to make them."""
        from sophon_ray.outputs import write_json_atomic
        from sophon_ray.tasks.diffusion.samples import attack_steps, sample_report, strongest_trial

        trial = strongest_trial(audit)
        recipe = None if trial is None else Recipe(**trial["recipe"])
        length = None if trial is None else attack_steps(audit, trial)
        why = ("--no-samples" if not enabled else "diffusion.samples=0" if self.settings.samples < 1
               else "no ok trial of the protected model" if recipe is None
               else "the strongest trial does not record the optimizer steps of its epoch budgets" if length is None
               else None)
        if why is not None:
            info = {"skipped": f"sample grids and the judge metric were skipped ({why}); make them with "
                               f"`sophon-ray samples {self.cfg.name} --model {subjects.get('protected')} "
                               f"--audit {out}/audit.json`"}
            write_json_atomic(Path(out) / "samples.json", info)
            log(f"samples: {info['skipped']}")
            return info
        steps, budget = length
        log(f"samples: fine-tune every subject with the strongest recipe ({recipe.strategy} {recipe.optimizer} "
            f"lr {recipe.lr:g}) for {steps} steps{f' ({budget})' if budget else ''} and sample {self.settings.samples} images each")
        return sample_report(self, subjects, out, recipe, steps=steps, judge_dir=judge_dir, log=log, budget=budget)
