"""sophon-ray: make pre-trained models non-fine-tunable (SOPHON) and prove it, on Ray and MLflow."""

from sophon_ray.card import load_model

__all__ = ["load_model"]
__version__ = "0.1.0"
