"""Training tiles: slide stores, folders of stores, or folders of PNG/JPEG tiles, sampled into batches.

Every source serves square uint8 tiles (n, S, S, 3) at the model's input size S: store tiles larger than S
and image files are randomly cropped (image files first resized from ``image_mpp`` to the training
magnification when that is given). :class:`TilePool` keeps a bounded in-memory buffer of tiles, refilled
from random chunks of the sources, so memory does not grow with the dataset; every draw is a pure
function of (seed, iteration), which makes a resumed run sample exactly what the uninterrupted one would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_ad.errors import WsiAdError
from wsi_ad.files import visible_files
from wsi_ad.images import ImageReadError, read_image
from wsi_ad.store import SlideStore, is_store_path, stores_in

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
BLOCK_TILES = 64  # tiles per read block (the stores' chunk size)


class DataError(WsiAdError):
    """Training data is missing or unusable. The message names the path."""


def _random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return image[y : y + size, x : x + size]


class StoreSource:
    """``tiles/<magnification>`` of one slide store: (N, T, T, 3) uint8, T >= ``size``.

    ``max_tiles``: serve only a random sample of at most this many of the store's tiles (drawn once from
    ``seed`` and the store's name, kept in slide order), e.g. the paper's N normal tiles per slide.
    ``indices``: serve exactly these tiles (sorted tile indices; overrides ``max_tiles``).
    """

    def __init__(self, path: str | os.PathLike, magnification: str, size: int, max_tiles: int | None = None,
                 seed: int = 0, indices: np.ndarray | None = None):
        self.path = Path(path)
        tiles = SlideStore.open(self.path).require("tiles")
        if magnification not in tiles:
            has = sorted(k for k in tiles.keys() if k.endswith("x"))
            raise DataError(f"{self.path}: no tiles at {magnification} (has {has})")
        self.array = tiles[magnification]
        self.size = size
        if self.array.shape[1] < size:
            raise DataError(f"{self.path}: tiles/{magnification} are {self.array.shape[1]} px, "
                            f"smaller than the model input {size} px")
        n = int(self.array.shape[0])
        self.indices = None if indices is None else np.sort(np.asarray(indices, dtype=np.int64))
        if indices is None and max_tiles is not None and max_tiles < n:
            name_key = int.from_bytes(self.path.name.encode()[:16].ljust(16, b"\0"), "little")
            rng = np.random.default_rng([seed, 0x5A1, name_key])
            self.indices = np.sort(rng.choice(n, size=max_tiles, replace=False))

    def __len__(self) -> int:
        return int(self.array.shape[0]) if self.indices is None else len(self.indices)

    def read(self, start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
        if self.indices is None:
            block = np.asarray(self.array[start:stop])
        else:
            block = np.asarray(self.array.oindex[self.indices[start:stop]])
        if block.shape[1] == self.size:
            return block
        return np.stack([_random_crop(t, self.size, rng) for t in block])


class ImageFolderSource:
    """PNG/JPEG files under a folder (recursively, e.g. anomalib's ``train/good``), one tile per file.

    ``scale``: resize factor applied before cropping (image µm/px over the training magnification's µm/px);
    images still smaller than ``size`` are enlarged to it.
    """

    def __init__(self, files: list[Path], size: int, scale: float | None = None):
        self.files = files
        self.size = size
        self.scale = scale

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, file: Path, rng: np.random.Generator) -> np.ndarray:
        try:
            img = Image.fromarray(read_image(file))
        except ImageReadError as exc:
            raise DataError(str(exc)) from exc
        w, h = img.size
        factor = self.scale or 1.0
        if min(w, h) * factor < self.size:
            factor = self.size / min(w, h)
        if abs(factor - 1.0) > 1e-6:
            new = (max(self.size, round(w * factor)), max(self.size, round(h * factor)))
            img = img.resize(new, Image.BILINEAR)
        return _random_crop(np.asarray(img), self.size, rng)

    def read(self, start: int, stop: int, rng: np.random.Generator) -> np.ndarray:
        return np.stack([self._load(f, rng) for f in self.files[start:stop]])



def discover_sources(
    paths: list[str | os.PathLike], magnification: str = "10x", size: int = 64, image_mpp: float | None = None,
    tiles_per_slide: int | None = None, seed: int = 0,
) -> list[StoreSource | ImageFolderSource]:
    """Sources for ``paths``: slide stores, folders of stores (``wsi-ad process --out``), or folders of
    PNG/JPEG tiles. ``image_mpp`` (µm/px of image files) resizes them to ``magnification``;
    ``tiles_per_slide`` samples at most that many tiles of each store (seeded by ``seed``)."""
    from wsi_ad.slide import magnification_to_mpp

    scale = image_mpp / magnification_to_mpp(magnification) if image_mpp else None
    sources: list[StoreSource | ImageFolderSource] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if is_store_path(path):
            sources.append(StoreSource(path, magnification, size, tiles_per_slide, seed))
            continue
        if path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                sources.append(ImageFolderSource([path], size, scale))
                continue
            raise DataError(f"{path}: not a slide store, a folder of stores or a PNG/JPEG tile")
        stores = stores_in(path)
        if stores:
            sources += [StoreSource(p, magnification, size, tiles_per_slide, seed) for p in stores]
            continue
        images = visible_files(path, IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{path}: no slide stores (*.zarr) and no PNG/JPEG tiles found")
        sources.append(ImageFolderSource(images, size, scale))
    sources = [s for s in sources if len(s)]
    if not sources:
        raise DataError("no training tiles found in " + ", ".join(str(p) for p in paths))
    return sources


@dataclass
class Contamination:
    """Known tumour tiles mixed into a training pool (:func:`contamination_sources`): ``sources`` to add to the
    pool's, and ``record`` (JSON-able: the fraction asked for and obtained, the tile counts, where every tumour tile
    came from), which the training loop writes into the checkpoint."""

    sources: list
    record: dict


def contamination_sources(
    fraction: float, normal_tiles: int, paths: list[str | os.PathLike], annotations: str | os.PathLike | None,
    magnification: str = "10x", size: int = 64, image_mpp: float | None = None, seed: int = 0,
) -> Contamination:
    """Tumour tiles that make ``fraction`` of a training pool of ``normal_tiles`` normal tiles: n =
    max(1, round(fraction * normal_tiles / (1 - fraction))) tiles drawn without replacement (seeded by ``seed``)
    from the candidates of ``paths``:

    - slide stores (or folders of stores) of annotated tumour slides: their tiles whose whole level-0 footprint lies
      inside a lesion of ``annotations/<slide id>.xml`` (ASAP XML; label 1 of :func:`wsi_ad.metrics.tile_labels`,
      the tiles the tile AUC counts as tumour);
    - PNG/JPEG files, or folders of them (e.g. an anomalib dataset's ``test/tumor``): every file is a tumour tile.

    The pool samples tiles uniformly, so a training batch holds ``fraction`` tumour tiles on average (the paper
    protocol of IGD's contamination experiment, Chen et al. AAAI 2022, Table 7). Raises :class:`DataError` when
    ``fraction`` is not in (0, 1), when there are fewer candidates than n (naming how many there are and the
    largest fraction they allow), when a store has no annotation file, or when a folder holds an anomalib
    ``good`` folder (normal tiles). A store or image reached twice (named twice, or itself and its folder) counts
    once. ``record["sources"]`` has, per store, its slide id, resolved path, annotation file, tumour tiles and how
    many were drawn; for images, their count, folders and how many were drawn.
    """
    from wsi_ad.tuning import TuneError, anomaly_tiles

    if not 0.0 < fraction < 1.0:
        raise DataError(f"the contamination fraction must be in (0, 1), got {fraction}")
    if not paths:
        raise DataError(f"a contamination of {fraction:g} needs tumour tiles: give annotated tumour slide stores or "
                        "tumour tile images (--contaminate-from)")
    from wsi_ad.slide import magnification_to_mpp

    stores: list[Path] = []
    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder (tumour tiles for the contamination)")
        if is_store_path(path):
            stores.append(path)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif path.is_dir() and stores_in(path):
            stores += stores_in(path)
        elif path.is_dir() and visible_files(path, IMAGE_SUFFIXES):
            found = visible_files(path, IMAGE_SUFFIXES)
            normal = sorted({str(f.parent) for f in found if "good" in f.relative_to(path).parts[:-1]})
            if normal:
                raise DataError(f"{path}: holds normal tiles ({normal[0]}, an anomalib 'good' folder); name the "
                                "folder of tumour tiles itself (e.g. DATASET/test/tumor)")
            images += found
        else:
            raise DataError(f"{path}: not a slide store, a folder of stores or PNG/JPEG tumour tiles")
    # a store or an image named twice (or through its folder and itself) is one candidate, never two
    stores = list(dict.fromkeys(s.resolve() for s in stores))
    images = list(dict.fromkeys(f.resolve() for f in images))
    candidates: list[tuple[int, int]] = []        # (store index or -1 for an image, tile index or image index)
    summary: list[dict] = []
    if stores:
        if annotations is None:
            raise DataError("tumour tiles of slide stores are those inside their lesion annotations: give the folder "
                            "of ASAP XML files (--annotations DIR)")
        annotations = Path(annotations).resolve()
        try:
            selection = anomaly_tiles(stores, annotations, max_tiles=None, seed=seed)
        except TuneError as exc:
            raise DataError(f"contamination: {exc}") from None
        for s, idx in enumerate(selection.sample.indices):
            candidates += [(s, int(i)) for i in idx]
        summary = [{k: d[k] for k in ("slide_id", "store", "annotations", "tumor_tiles")} for d in selection.summary]
    candidates += [(-1, i) for i in range(len(images))]
    needed = max(1, round(fraction * normal_tiles / (1.0 - fraction)))
    if len(candidates) < needed:
        most = len(candidates) / (len(candidates) + normal_tiles)
        raise DataError(f"a contamination of {fraction:g} of {normal_tiles} normal tiles needs {needed} tumour tiles; "
                        f"only {len(candidates)} are available (at most {most:.4g} with these)")
    rng = np.random.default_rng([int(seed), 0xC0, needed])
    picks = [candidates[i] for i in np.sort(rng.choice(len(candidates), size=needed, replace=False))]
    sources: list = []
    for s, store in enumerate(stores):
        chosen = np.array([i for k, i in picks if k == s], dtype=np.int64)
        summary[s]["used"] = int(len(chosen))
        if len(chosen):
            sources.append(StoreSource(store, magnification, size, indices=chosen))
    chosen_images = [images[i] for k, i in picks if k == -1]
    if chosen_images:
        scale = image_mpp / magnification_to_mpp(magnification) if image_mpp else None
        sources.append(ImageFolderSource(chosen_images, size, scale))
    if images:
        folders = sorted({str(f.parent) for f in images})
        summary.append({"images": len(images), "folders": folders, "used": len(chosen_images)})
    record = {"fraction": float(fraction), "normal_tiles": int(normal_tiles), "tumor_tiles": int(needed),
              "obtained_fraction": needed / (needed + normal_tiles), "available_tumor_tiles": len(candidates),
              "annotations": None if annotations is None else str(annotations), "seed": int(seed), "sources": summary}
    return Contamination(sources, record)


def augment(batch: np.ndarray, rng: np.random.Generator, flips: bool = True, rot90: bool = False) -> np.ndarray:
    """Random horizontal/vertical flips (each with p=0.5) and optional 90° rotations of (B, S, S, 3) tiles."""
    out = batch.copy()
    if flips:
        h = rng.random(len(out)) < 0.5
        out[h] = out[h, :, ::-1]
        v = rng.random(len(out)) < 0.5
        out[v] = out[v, ::-1]
    if rot90:
        r = rng.random(len(out)) < 0.5
        out[r] = np.rot90(out[r], k=1, axes=(1, 2))
    return out


class TilePool:
    """A bounded, deterministic sampler over the sources' tiles.

    When all tiles fit in ``buffer_tiles`` they are loaded once; otherwise the buffer is refilled with
    random blocks of ``BLOCK_TILES`` tiles every ``buffer_tiles`` drawn tiles. ``batch(iteration, n)``
    returns (n, S, S, 3) uint8 tiles drawn with replacement; the result depends only on the seed and
    ``iteration`` (and ``n``), never on what was drawn before.
    """

    def __init__(self, sources, buffer_tiles: int = 65536, seed: int = 0):
        self.sources = list(sources)
        self.seed = int(seed)
        self.blocks = [(i, start, min(start + BLOCK_TILES, len(s))) for i, s in enumerate(self.sources)
                       for start in range(0, len(s), BLOCK_TILES)]
        self.total = sum(len(s) for s in self.sources)
        self.buffer_tiles = max(int(buffer_tiles), BLOCK_TILES)
        self.fits = self.total <= self.buffer_tiles
        self._round: int | None = None
        self._buffer: np.ndarray | None = None

    def _fill(self, round_: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 7, round_])
        if self.fits:
            order = range(len(self.blocks))
        else:
            order, count = [], 0
            for b in rng.permutation(len(self.blocks)):
                order.append(int(b))
                count += self.blocks[b][2] - self.blocks[b][1]
                if count >= self.buffer_tiles:
                    break
        parts = [self.sources[i].read(start, stop, rng) for i, start, stop in (self.blocks[b] for b in order)]
        return np.concatenate(parts)

    def buffer(self, iteration: int, batch_size: int) -> np.ndarray:
        """The in-memory tiles serving ``iteration``: (M, S, S, 3) uint8."""
        round_ = 0 if self.fits else (iteration * batch_size) // self.buffer_tiles
        if round_ != self._round:
            self._buffer, self._round = self._fill(round_), round_
        return self._buffer

    def batch(self, iteration: int, batch_size: int) -> np.ndarray:
        tiles = self.buffer(iteration, batch_size)
        rng = np.random.default_rng([self.seed, 11, iteration])
        return tiles[rng.integers(0, len(tiles), batch_size)]

    def sample(self, n: int) -> np.ndarray:
        """Up to ``n`` distinct tiles from the first buffer (for the feature statistics)."""
        tiles = self.buffer(0, 1)
        rng = np.random.default_rng([self.seed, 13])
        return tiles[rng.permutation(len(tiles))[: min(n, len(tiles))]]


def to_tensor(tiles: np.ndarray, device=None):
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [-1, 1] on ``device``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(tiles)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
