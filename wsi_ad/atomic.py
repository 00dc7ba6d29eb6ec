"""Atomic file and directory writes: write to a temporary sibling, then rename over the target.

A reader (or a re-run after a crash) therefore sees either the old complete output or the new complete
output, never a half-written one. The temporary sibling lives in the same directory so the final
``os.replace`` is a same-filesystem rename.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it to ``target``, else delete it.

    Works for files and for directories (e.g. a zarr store): whatever the body creates at the yielded
    path replaces ``target`` as a whole. An existing directory at ``target`` is removed only after the
    new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(target)
    try:
        yield temp
        if temp.is_dir() and target.is_dir():
            old = _temp_sibling(target)
            os.replace(target, old)
            os.replace(temp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, target)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """Create the folder ``path`` (with its parents) when missing and check that this process can write there, before
    any work is done. Raises :class:`~wsi_ad.errors.WsiAdError` naming ``what`` (e.g. ``"--out"``) otherwise (a
    read-only file system, no permission, a file in the way)."""
    from wsi_ad.errors import WsiAdError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsiAdError(f"{what} {path}: cannot create the folder ({exc.strerror or exc})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise WsiAdError(f"{what} {path}: not a writable folder")
    return path


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically and return the target path."""
    with atomic_path(target) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically and return the target path."""
    with atomic_path(target) as temp:
        temp.write_bytes(data)
    return Path(target)


def write_png_atomic(target: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB, (H, W) uint8 or (H, W) bool image as PNG, atomically."""
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return write_bytes_atomic(target, buffer.getvalue())
