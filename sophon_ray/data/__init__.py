"""Labelled image domains: load by source name, select classes, preprocess, Parquet I/O.

Importing this package pulls only torch and numpy; scikit-learn, torchvision, PIL and pyarrow are
imported by the loaders and Parquet functions that need them.
"""

from sophon_ray.data.images import Domain, Images
from sophon_ray.data.parquet import read_parquet, write_parquet
from sophon_ray.data.sources import available_sources, load_domain
from sophon_ray.data.transforms import preprocess

__all__ = [
    "Domain", "Images", "available_sources", "load_domain", "preprocess", "read_parquet", "write_parquet",
]
