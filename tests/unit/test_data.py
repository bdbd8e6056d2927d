"""Data layer: sources, class selection, preprocessing, Parquet I/O."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sophon_ray.config import DomainSpec, InputSpec
from sophon_ray.data import (
    Images, available_sources, load_domain, preprocess, read_parquet, write_parquet,
)
from sophon_ray.errors import UserError


def small_images(n=6, h=4, w=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Images(torch.randint(0, 256, (n, h, w, c), generator=g, dtype=torch.uint8), torch.arange(n) % 3)


# --- sources -----------------------------------------------------------------------------------


def test_digits_split_by_index():
    d = load_domain(DomainSpec(source="digits"))
    assert (len(d.train), len(d.test)) == (1437, 360)
    assert d.num_classes == 10 and d.name == "digits"
    assert d.train.x.shape == (1437, 8, 8, 1) and d.train.x.dtype == torch.uint8
    assert d.train.y.dtype == torch.int64 and int(d.train.x.max()) == 255
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert torch.equal(d.test.y, torch.as_tensor(raw.target[::5]))
    assert torch.equal(d.test.x[1, :, :, 0], torch.as_tensor(np.rint(raw.images[5] * 255 / 16).astype(np.uint8)))
    # Read without importing scikit-learn, but the very arrays load_digits returns.
    from sophon_ray.data.sources import _digits_arrays

    images, target = _digits_arrays()
    assert np.array_equal(images, raw.images) and np.array_equal(target, raw.target)


def test_digits_classes_relabel():
    full = load_domain(DomainSpec(source="digits"))
    d = load_domain(DomainSpec(source="digits", classes=(5, 6, 7, 8, 9)))
    assert d.name == "digits[5,6,7,8,9]" and d.num_classes == 5
    for sub, raw in ((d.train, full.train), (d.test, full.test)):
        assert sorted(sub.y.unique().tolist()) == [0, 1, 2, 3, 4]
        for j, c in enumerate(range(5, 10)):
            assert int((sub.y == j).sum()) == int((raw.y == c).sum())
        assert torch.equal(sub.x, raw.x[raw.y >= 5])
    assert len(d.train) + len(d.test) == int((full.train.y >= 5).sum() + (full.test.y >= 5).sum())


def test_digits_none_class():
    """none_class=True appends label 10 ("no digit"): twice a class's share per split, seeded, the
    four kinds in turn; the digits themselves are unchanged."""
    from sophon_ray.data.sources import NONE_KINDS, check_spec

    plain = load_domain(DomainSpec(source="digits"))
    spec = DomainSpec(source="digits", options={"none_class": True})
    d, again = load_domain(spec), load_domain(spec)
    assert d.name == "digits+none" and d.num_classes == 11 == check_spec(spec)
    assert (len(d.train), len(d.test)) == (1437 + 286, 360 + 72)
    for sub, raw in ((d.train, plain.train), (d.test, plain.test)):
        assert torch.equal(sub.x[: len(raw)], raw.x) and torch.equal(sub.y[: len(raw)], raw.y)
        none = sub.x[len(raw):]
        assert (sub.y[len(raw):] == 10).all() and none.dtype == torch.uint8 and none.shape[1:] == (8, 8, 1)
        shuffled = none[NONE_KINDS.index("shuffled")::len(NONE_KINDS)].float()
        assert shuffled.flatten(1).std(1).min() > 0  # ink from real digits, shape gone
    assert torch.equal(d.train.x, again.train.x) and not torch.equal(d.train.x[1437:1437 + 72], d.test.x[360:])
    with pytest.raises(UserError, match="none_class must be true or false"):
        load_domain(DomainSpec(source="digits", options={"none_class": "yes"}))
    with pytest.raises(UserError, match="no option"):
        load_domain(DomainSpec(source="digits", options={"nones": True}))


def test_classes_errors():
    with pytest.raises(UserError, match="0..9"):
        load_domain(DomainSpec(source="digits", classes=(3, 10)))
    with pytest.raises(UserError, match="distinct"):
        load_domain(DomainSpec(source="digits", classes=(3, 3)))


def test_class_without_samples(tmp_path):
    im = Images(torch.zeros(4, 2, 2, 1, dtype=torch.uint8), torch.tensor([0, 0, 2, 2]))
    write_parquet(im, tmp_path / "train.parquet")
    write_parquet(im, tmp_path / "test.parquet")
    assert load_domain(DomainSpec(source="parquet", root=str(tmp_path))).num_classes == 3
    with pytest.raises(UserError, match=r"\[1\] have no train samples"):
        load_domain(DomainSpec(source="parquet", root=str(tmp_path), classes=(0, 1)))


def test_synthetic_deterministic():
    spec = DomainSpec(source="synthetic", seed=3, options={"num_classes": 4, "size": 6, "channels": 3})
    a, b = load_domain(spec), load_domain(spec)
    c = load_domain(DomainSpec(source="synthetic", seed=4, options=dict(spec.options)))
    assert a.train.x.shape == (200, 6, 6, 3) and len(a.test) == 100 and a.num_classes == 4
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    with pytest.raises(UserError, match="valid options"):
        load_domain(DomainSpec(source="synthetic", options={"nclasses": 3}))


def test_synthetic_learnable():
    d = load_domain(DomainSpec(source="synthetic", seed=0))
    xtr, xte = d.train.x.flatten(1).float(), d.test.x.flatten(1).float()
    centroids = torch.stack([xtr[d.train.y == k].mean(0) for k in range(d.num_classes)])
    pred = torch.cdist(xte, centroids).argmin(1)
    assert (pred == d.test.y).float().mean() > 0.9


def test_cifar10_missing_root(tmp_path):
    for root in (tmp_path / "nothing-here", tmp_path):  # no folder; folder without the data (torchvision raises)
        with pytest.raises(UserError) as e:
            load_domain(DomainSpec(source="cifar10", root=str(root)))
        msg = str(e.value)
        assert str(root) in msg and "parquet" in msg and "\n" not in msg
    with pytest.raises(UserError, match="root"):
        load_domain(DomainSpec(source="cifar10", root=None))
    with pytest.raises(UserError, match="no split 'val'"):
        load_domain(DomainSpec(source="mnist", root=str(tmp_path), test_split="val"))


def test_unknown_source():
    with pytest.raises(UserError) as e:
        load_domain(DomainSpec(source="imagenet21k"))
    for name in ("digits", "cifar10", "imagefolder", "parquet"):
        assert name in str(e.value)
    assert set(available_sources()) >= {"digits", "synthetic", "cifar10", "cifar100", "mnist", "svhn", "stl10",
                                         "imagefolder", "parquet"}


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)  # sizes differ on purpose
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    spec = DomainSpec(source="imagefolder", root=str(tmp_path), test_split="val", options={"size": 8})
    d = load_domain(spec)
    assert d.train.x.shape == (6, 8, 8, 3) and d.test.x.shape == (4, 8, 8, 3)
    assert d.num_classes == 2 and d.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    capped = load_domain(DomainSpec(source="imagefolder", root=str(tmp_path), test_split="val",
                                    classes=(1,), options={"size": 8, "max_per_class": 1}))
    assert len(capped.train) == 1 and capped.train.y.tolist() == [0] and capped.num_classes == 1
    with pytest.raises(UserError, match="layout"):
        load_domain(DomainSpec(source="imagefolder", root=str(tmp_path), test_split="test"))


# --- preprocess ---------------------------------------------------------------------------------


def test_preprocess_shape_and_range():
    im = load_domain(DomainSpec(source="digits")).test
    x, y = preprocess(im, InputSpec(channels=1, size=16, mean=(0.5,), std=(0.5,)))
    assert x.shape == (360, 1, 16, 16) and x.dtype == torch.float32 and y is im.y
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # pixels 0 and 255 map to exactly -1 and 1
    x8, _ = preprocess(im, InputSpec(channels=1, size=8, mean=(0.0,), std=(1.0,)))
    assert torch.allclose(x8, im.x.permute(0, 3, 1, 2).float() / 255)


def test_preprocess_nearest_vs_bilinear():
    x = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8).view(1, 2, 2, 1)  # (N, H, W, C)
    im = Images(x, torch.zeros(1, dtype=torch.int64))
    spec = InputSpec(channels=1, size=4, mean=(0.0,), std=(1.0,))
    near, _ = preprocess(im, dataclasses.replace(spec, resize="nearest"))
    bil, _ = preprocess(im, spec)
    expect = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(near[0, 0], expect)
    assert set(bil.unique().tolist()) - {0.0, 1.0}  # bilinear blends
    assert torch.allclose(bil[0, 0, 1, 1], torch.tensor(0.375))  # 0.75*0.75*0 + 2*0.75*0.25*1 + 0.25**2*0
    with pytest.raises(UserError, match="resize"):
        preprocess(im, dataclasses.replace(spec, resize="bicubic"))


def test_preprocess_channels():
    grey = small_images(c=1)
    x, _ = preprocess(grey, InputSpec(channels=3, size=4, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0)))
    assert x.shape == (6, 3, 4, 4)
    base = (x[:, 0] + 0.1) * 1.0
    assert torch.allclose((x[:, 1] * 2.0 + 0.2), base, atol=1e-6)
    assert torch.allclose((x[:, 2] * 4.0 + 0.3), base, atol=1e-6)
    rgb = small_images(c=3)
    x1, _ = preprocess(rgb, InputSpec(channels=1, size=5, mean=(0.0,), std=(1.0,)))
    x3, _ = preprocess(rgb, InputSpec(channels=3, size=5, mean=(0.0,), std=(1.0,)))
    assert torch.allclose(x1, x3.mean(1, keepdim=True))
    with pytest.raises(UserError, match="channels"):
        preprocess(small_images(c=4), InputSpec(channels=3))
    with pytest.raises(UserError, match="mean"):
        preprocess(rgb, InputSpec(channels=3, mean=(0.5, 0.5), std=(0.5,)))


# --- parquet ------------------------------------------------------------------------------------


def test_parquet_round_trip(tmp_path):
    im = small_images(n=7, h=3, w=5, c=3)
    path = tmp_path / "sub" / "train.parquet"
    write_parquet(im, path)
    assert path.is_file() and list(path.parent.iterdir()) == [path]  # no .tmp left behind
    back = read_parquet(str(path))
    assert torch.equal(back.x, im.x) and torch.equal(back.y, im.y)
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    assert t.column_names == ["image", "label", "height", "width", "channels"]
    assert t.column("image")[0].as_py() == im.x[0].numpy().tobytes()
    empty = Images(torch.zeros(0, 2, 3, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    write_parquet(empty, tmp_path / "empty.parquet")
    assert read_parquet(tmp_path / "empty.parquet").x.shape == (0, 2, 3, 1)


def test_parquet_corrupt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": pa.array([b"\x00" * 12, b"\x00" * 11], pa.binary()),
                             "label": pa.array([0, 1], pa.int64()),
                             "height": pa.array([2, 2], pa.int32()), "width": pa.array([2, 2], pa.int32()),
                             "channels": pa.array([3, 3], pa.int32())}), bad)
    with pytest.raises(UserError, match="not a sophon-ray image Parquet file"):
        read_parquet(bad)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="not a sophon-ray image Parquet file"):
        read_parquet(junk)
    with pytest.raises(UserError, match="not found"):
        read_parquet(tmp_path / "missing.parquet")
    with pytest.raises(UserError, match="not found"):
        load_domain(DomainSpec(source="parquet", root=str(tmp_path)))


def test_parquet_mixed_shapes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"image": pa.array([b"\x00" * 4, b"\x00" * 4], pa.binary()),
                             "label": pa.array([0, 1], pa.int64()),
                             "height": pa.array([2, 4], pa.int32()), "width": pa.array([2, 1], pa.int32()),
                             "channels": pa.array([1, 1], pa.int32())}), bad)
    with pytest.raises(UserError, match="share one shape"):
        read_parquet(bad)


def test_parquet_source(tmp_path):
    d = load_domain(DomainSpec(source="digits"))
    write_parquet(d.train, tmp_path / "train.parquet")
    write_parquet(d.test, tmp_path / "test.parquet")
    p = load_domain(DomainSpec(source="parquet", root=str(tmp_path), classes=(5, 6, 7, 8, 9)))
    ref = load_domain(DomainSpec(source="digits", classes=(5, 6, 7, 8, 9)))
    assert torch.equal(p.train.x, ref.train.x) and torch.equal(p.test.y, ref.test.y) and p.num_classes == 5


def test_heavy_imports_are_lazy():
    """pyarrow, torchvision, scikit-learn and PIL may only be imported inside functions."""
    import ast
    from pathlib import Path

    import sophon_ray.data

    heavy = {"pyarrow", "torchvision", "sklearn", "PIL"}
    for path in Path(sophon_ray.data.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & heavy, f"{path.name} imports {names} at module level"
