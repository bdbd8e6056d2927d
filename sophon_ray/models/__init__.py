"""Model builders: classifiers (`features` + linear `head`) and DDPM UNets.

Importing this package does not import diffusers or torchvision; builders import them lazily.
"""

from sophon_ray.models.classifiers import HEAD, Classifier, build_classifier, classifier_names, reset_head_
from sophon_ray.models.diffusion import build_diffusion, diffusion_names, downsample_factor

__all__ = [
    "HEAD",
    "Classifier",
    "build_classifier",
    "build_diffusion",
    "classifier_names",
    "diffusion_names",
    "downsample_factor",
    "reset_head_",
]
