"""Reading the bytes of a network or property file, gzip-compressed or not.

VNN-COMP benchmark repositories ship ``.onnx.gz`` and ``.vnnlib.gz`` files while their
``instances.csv`` often names the uncompressed path, so a missing ``NAME`` is also looked for as
``NAME.gz``.
"""

from __future__ import annotations

import gzip
from pathlib import Path


def resolve(path: str | Path) -> Path:
    """``path`` itself if it exists, else ``path.gz`` if that exists, else ``path`` (for the caller's error)."""
    p = Path(path)
    if not p.exists() and p.suffix != ".gz":
        packed = p.with_name(p.name + ".gz")
        if packed.exists():
            return packed
    return p


def read_bytes(path: str | Path) -> bytes:
    """The file's content, decompressed when it is gzip (by its ``.gz`` name or its magic bytes).

    Raises ``OSError`` (also ``gzip.BadGzipFile``, an ``OSError``) as the caller's read would.
    """
    p = resolve(path)
    data = p.read_bytes()
    if p.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data
