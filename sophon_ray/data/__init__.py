"""Labelled image domains: load by source name, select classes, preprocess, Parquet I/O.

Importing this package pulls only torch and numpy; scikit-learn, torchvision, PIL and pyarrow are
imported by the loaders and Parquet functions that need them.
"""

from sophon_ray.data.images import Domain, Images
from sophon_ray.data.parquet import read_parquet, write_parquet
from sophon_ray.data.sources import available_sources, check_spec, load_domain
from sophon_ray.data.transforms import check_input, preprocess

__all__ = [
    "Domain", "Images", "available_sources", "check_input", "check_spec", "load_domain", "preprocess", "read_parquet",
    "write_parquet",
]
