"""The DPA paper's Camelyon16 tile split: the official block lists, read into level-0 blocks.

Shvetsova, Bakhanova, Tuluptceva, Dylov et al., "Anomaly detection in medical imaging with deep perceptual
autoencoders" (IEEE Access 2021), official code ``ninatu/anomaly_detection`` (Apache-2.0), folder ``folds/``; a copy
is in ``shared/data/camelyon16/dpa_split/`` (see its ``SOURCES.md``). The paper used, per slide, at most 50 blocks
of 768 x 768 px at level 0 (40x, 0.243 µm/px); tumour blocks lie fully inside a lesion. Each block was resized to
192 x 192 px (10x) and a 64 x 64 px crop of it was the model's input: a random crop for training, the centre crop
for testing. The folder holds:

========================  ========  ============================================================================
file                      lines     what
========================  ========  ============================================================================
``normal/train.txt``      7,612     normal blocks of the training ``normal_*`` slides
``normal/test.txt``       4,000     normal blocks of the 80 normal test slides (50 a slide)
``anomaly/test.txt``      817       tumour blocks of 24 tumour test slides
``anomaly/train.txt``     2,169     tumour blocks of the training ``tumor_*`` slides (the selection pool)
``cv_folds/K/...``                  the three selection folds ``K`` = 0, 1, 2: ``normal/train.txt``,
                                    ``normal/val.txt``, ``anomaly/test.txt`` (validation anomalies: 50 blocks from
                                    each of two training tumour slides)
========================  ========  ============================================================================

Each line is a file name ``<slide>_<kind>_x_<R>_y_<C>_w_<W>_h_<H>.jpg``. The official code names numpy axes, so
``x_`` is the ROW (level-0 y of the top-left corner) and ``y_`` the COLUMN (level-0 x); :func:`parse_block_name`
returns level-0 (x, y) the usual way round. Known flaw of the official folds: they were split per tile, not per
slide, so a fold's normal validation blocks come from the slides of its training blocks.

The lists are not shipped inside this package: give their folder (``read_dpa_split(root)``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from wsi_ad.errors import WsiAdError

#: A line of the official lists (module docstring).
BLOCK_NAME = re.compile(r"^(?P<slide>(?:normal|tumor|test)_\d{3})_(?P<kind>normal|tumor)"
                        r"_x_(?P<row>\d+)_y_(?P<col>\d+)_w_(?P<w>\d+)_h_(?P<h>\d+)\.jpg$")
#: Counts of the official lists (the paper's: 7,612 normal training, 4,000 normal and 817 tumour test tiles).
OFFICIAL_COUNTS = {"normal_train": 7612, "normal_test": 4000, "anomaly_test": 817, "anomaly_train": 2169}
FOLDS = (0, 1, 2)


class DpaSplitError(WsiAdError):
    """An official block list is missing or holds a line that is not a block name."""


@dataclass(frozen=True)
class Block:
    """One block of the official split: ``slide`` (lower case, e.g. ``tumor_110``, ``test_021``), ``kind``
    (``normal`` or ``tumor``), the level-0 px (x, y) of its top-left corner and its ``size`` (w, h) in level-0 px
    (768 x 768 in every official list)."""

    slide: str
    kind: str
    x: int
    y: int
    size: tuple[int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) in level-0 px."""
        return self.x, self.y, self.size[0], self.size[1]


def parse_block_name(name: str) -> Block:
    """The :class:`Block` of one line of an official list (``x_`` is the row, ``y_`` the column; module docstring).
    Raises :class:`DpaSplitError` for anything else."""
    m = BLOCK_NAME.match(name.strip())
    if m is None:
        raise DpaSplitError(f"not a DPA split block name: {name.strip()!r} (expected "
                            "<slide>_<normal|tumor>_x_<row>_y_<col>_w_<W>_h_<H>.jpg)")
    return Block(m["slide"], m["kind"], int(m["col"]), int(m["row"]), (int(m["w"]), int(m["h"])))


def read_block_list(path: str | os.PathLike) -> list[Block]:
    """Every block of one list file, in file order (blank lines skipped). Raises :class:`DpaSplitError` naming the
    file (and line) when it is missing or a line does not parse."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DpaSplitError(f"{path}: cannot read the DPA split list: {exc.strerror or exc}") from exc
    blocks = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                blocks.append(parse_block_name(line))
            except DpaSplitError as exc:
                raise DpaSplitError(f"{path}, line {number}: {exc}") from None
    return blocks


@dataclass(frozen=True)
class DpaSplit:
    """The official split: :attr:`normal_train`, :attr:`normal_test`, :attr:`anomaly_train`, :attr:`anomaly_test`
    (lists of :class:`Block`) and :attr:`folds`, one dict per fold with ``normal_train``, ``normal_val`` and
    ``anomaly_val`` (the fold's validation anomalies, ``cv_folds/K/anomaly/test.txt``)."""

    normal_train: list[Block]
    normal_test: list[Block]
    anomaly_train: list[Block]
    anomaly_test: list[Block]
    folds: list[dict[str, list[Block]]]

    def counts(self) -> dict[str, int]:
        return {"normal_train": len(self.normal_train), "normal_test": len(self.normal_test),
                "anomaly_test": len(self.anomaly_test), "anomaly_train": len(self.anomaly_train)}


def read_dpa_split(root: str | os.PathLike) -> DpaSplit:
    """Read the official lists from ``root`` (the ``dpa_split`` folder, module docstring). Raises
    :class:`DpaSplitError` naming the missing or malformed file."""
    root = Path(root)
    if not root.is_dir():
        raise DpaSplitError(f"{root}: not a folder (expected the DPA split: normal/, anomaly/, cv_folds/)")
    folds = [{"normal_train": read_block_list(root / "cv_folds" / str(k) / "normal" / "train.txt"),
              "normal_val": read_block_list(root / "cv_folds" / str(k) / "normal" / "val.txt"),
              "anomaly_val": read_block_list(root / "cv_folds" / str(k) / "anomaly" / "test.txt")} for k in FOLDS]
    return DpaSplit(normal_train=read_block_list(root / "normal" / "train.txt"),
                    normal_test=read_block_list(root / "normal" / "test.txt"),
                    anomaly_train=read_block_list(root / "anomaly" / "train.txt"),
                    anomaly_test=read_block_list(root / "anomaly" / "test.txt"),
                    folds=folds)
