"""The sophon-ray image Parquet format: one row per image.

Columns: `image` (binary, raw uint8 bytes H*W*C in C-order HWC), `label` (int64), `height`,
`width`, `channels` (int32). pyarrow is imported inside the functions so that importing
`sophon_ray.data` (and never `sophon_ray.core`) pulls it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sophon_ray.data.images import Images
from sophon_ray.errors import UserError

COLUMNS = ("image", "label", "height", "width", "channels")
_SHAPE_KEY = b"sophon_ray.shape"  # schema metadata "H,W,C", so an empty file still knows its shape


def write_parquet(images: Images, path: str | Path) -> None:
    """Write images atomically (to `path + ".tmp"`, then `os.replace`).

    Args:
        images: uint8 (N, H, W, C) images with int64 labels.
        path: destination file; its parent folder is created if missing.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    n, h, w, c = images.x.shape
    row = h * w * c
    if row == 0:
        raise UserError(f"cannot write images of shape {h}x{w}x{c} to {path}: every dimension must be positive")
    data = images.x.contiguous().numpy().reshape(n, row)  # (N, H*W*C), C-order HWC per image
    per_chunk = max(1, (2**31 - 1) // row)  # plain binary has int32 offsets: < 2 GiB per chunk
    chunks = []
    for i in range(0, n, per_chunk):
        part = np.ascontiguousarray(data[i : i + per_chunk]).reshape(-1)
        k = min(per_chunk, n - i)
        offsets = np.arange(k + 1, dtype=np.int32) * row
        chunks.append(pa.Array.from_buffers(pa.binary(), k, [None, pa.py_buffer(offsets), pa.py_buffer(part)]))
    image = pa.chunked_array(chunks, pa.binary())
    table = pa.table(
        {
            "image": image,
            "label": pa.array(images.y.numpy(), pa.int64()),
            "height": pa.array(np.full(n, h, np.int32)),
            "width": pa.array(np.full(n, w, np.int32)),
            "channels": pa.array(np.full(n, c, np.int32)),
        }
    ).replace_schema_metadata({_SHAPE_KEY: f"{h},{w},{c}".encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _bad(path: Path, why: str) -> UserError:
    return UserError(
        f"{path} is not a sophon-ray image Parquet file: {why}; rewrite it with sophon_ray.data.write_parquet"
    )


def _one_value(table, name: str, path: Path) -> int:
    import pyarrow.compute as pc

    col = table.column(name)
    if col.null_count:
        raise _bad(path, f"column {name!r} has nulls")
    lo, hi = pc.min_max(col).values()
    if lo.as_py() != hi.as_py():
        raise _bad(path, f"rows differ in {name} ({lo.as_py()}..{hi.as_py()}); all images must share one shape")
    if lo.as_py() < 1:
        raise _bad(path, f"{name}={lo.as_py()} must be positive")
    return int(lo.as_py())


def read_parquet(path: str | Path) -> Images:
    """Read and validate a sophon-ray image Parquet file.

    Args:
        path: file written by `write_parquet` (or any file with the same columns).

    Returns:
        Images with x uint8 (N, H, W, C) and y int64 (N,).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Parquet file {path} not found; write it with sophon_ray.data.write_parquet or fix the path")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _bad(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise _bad(path, f"missing column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})")
    image, label = table.column("image"), table.column("label")
    if not (pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type)):
        raise _bad(path, f"column 'image' is {image.type}, expected binary")
    if not pa.types.is_integer(label.type):
        raise _bad(path, f"column 'label' is {label.type}, expected int64")
    n = table.num_rows
    if n == 0:
        shape = (table.schema.metadata or {}).get(_SHAPE_KEY)
        if shape is None:
            raise _bad(path, "it has no rows and no recorded image shape")
        h, w, c = (int(v) for v in shape.decode().split(","))
        return Images(torch.zeros(0, h, w, c, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    h, w, c = (_one_value(table, k, path) for k in ("height", "width", "channels"))
    if image.null_count or label.null_count:
        raise _bad(path, "columns 'image'/'label' have nulls")
    lengths = pc.binary_length(image)
    lo, hi = pc.min_max(lengths).values()
    if lo.as_py() != h * w * c or hi.as_py() != h * w * c:
        raise _bad(path, f"image byte lengths {lo.as_py()}..{hi.as_py()} do not match {h}x{w}x{c}={h * w * c}")
    arr = image.combine_chunks()
    offset_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    x = torch.from_numpy(data.copy()).reshape(n, h, w, c)  # (N, H, W, C)
    y = torch.from_numpy(label.to_numpy().astype(np.int64))  # (N,)
    return Images(x, y)
