"""The SOPHON engine: pure PyTorch (no ray, mlflow or pyarrow; a test proves it)."""

from sophon_ray.core.attack import OPTIMIZERS, STRATEGIES, finetune
from sophon_ray.core.evaluate import accuracy
from sophon_ray.core.inner import Environment, first_order_meta_grad, sample_environments, second_order_meta_grad
from sophon_ray.core.losses import get_loss
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.core.protect import Protection, ProtectData, run

__all__ = [
    "OPTIMIZERS", "STRATEGIES", "finetune", "accuracy", "Environment", "first_order_meta_grad",
    "sample_environments", "second_order_meta_grad", "get_loss", "ClassificationObjective",
    "Protection", "ProtectData", "run",
]
