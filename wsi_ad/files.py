"""Finding data files in folders, the same way for slides, stores and tiles: hidden files and folders
(names starting with ``.``: macOS AppleDouble companions ``._x.png``, ``.ipynb_checkpoints/``, ``.DS_Store``,
our own ``.*.tmp`` work folders) are never data."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def is_hidden(path: str | os.PathLike, root: str | os.PathLike | None = None) -> bool:
    """Whether ``path``, or any folder between ``root`` and it, has a name starting with ``.``."""
    path = Path(path)
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    return any(part.startswith(".") for part in parts)


def visible_files(folder: str | os.PathLike, suffixes: Iterable[str]) -> list[Path]:
    """Files under ``folder`` (recursively) whose suffix, in lower case, is one of ``suffixes``, sorted,
    skipping hidden files and everything inside hidden folders."""
    folder, suffixes = Path(folder), {s.lower() for s in suffixes}
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in suffixes and not is_hidden(p, folder) and p.is_file())
