"""Ready pipelines: one Python file each with `get_config(smoke=False) -> PipelineConfig`.

The explicit table below is the only registry (no decorators, no discovery).
"""

from __future__ import annotations

from types import ModuleType

from sophon_ray.pipelines import cifar100_celeba, digits, digits_diffusion, imagenette_cifar10, mnist, mnist_to_digits

PIPELINES: dict[str, ModuleType] = {
    "digits": digits,
    "digits-diffusion": digits_diffusion,
    "mnist": mnist,
    "mnist-to-digits": mnist_to_digits,
    "imagenette-cifar10": imagenette_cifar10,
    "cifar100-celeba": cifar100_celeba,
}
