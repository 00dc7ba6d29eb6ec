"""Weakly-supervised hyperparameter selection (DPA paper, §2.3): pick a detector's hyperparameters with
normal tiles plus a FEW anomalies of ONE kind, none of which is ever trained on. Works for every detector:
the candidates vary the parameters the detector itself declares searchable
(:attr:`~wsi_ad.detectors.base.Detector.search_parameters`) and the shared ones below.

For each candidate configuration and each of K folds **split by slide** (every slide store is one slide),
a model is trained on the normal stores of the other folds and scored on

- the normal tiles of the held-out fold's stores (a seeded sample of at most ``max_normal_tiles``), and
- the validation anomalies: tiles lying entirely inside the tumour polygons of a few annotated tumour
  slides (:func:`wsi_ad.metrics.tile_labels`, ``min_tumor_overlap=1.0``), a seeded sample of at most
  ``max_anomaly_tiles``, the same tiles for every candidate and fold;

the fold's score is the tile ROC AUC (anomaly = positive). Candidates are ranked by the mean AUC over the
folds (ties: smaller std, then fewer seconds). The held-out normal stores never share a slide with the
training stores (:func:`check_disjoint` refuses it; the official DPA code validates on tiles drawn from
the training set). The tumour slides are never trained on.

Outputs in ``out`` (all written atomically):

- ``tune_results.json``: settings, folds (slide ids), the anomaly selection, every candidate with its
  parameters, status (``ok`` / ``skipped`` / ``failed``, with the reason), per-fold AUCs and seconds,
  mean and std (population std, ``ddof=0``, as scikit-learn's grid search) of the AUC, and the winner;
- ``best_config.yaml``: the winner's full :class:`wsi_ad.config.Config`, which ``wsi-ad train --config``
  reads unchanged (train it on all normal slides);
- ``runs/<candidate_id>/fold<i>-<train_hash>.pt`` (+ ``.json`` with the fold's result): resumable work. A
  re-run reuses every finished candidate/fold whose configuration, training slides, validation slides
  and tile samples are unchanged, and resumes an interrupted training from its checkpoint.

Search-space YAML (``--space``; see ``configs/tune_space.yaml``, which equals the DPA's
``default_search_space``, the space used when none is given)::

    mode: random            # grid: every combination (there must be at most max_candidates);
                            # random: a seeded sample of max_candidates distinct combinations
    max_candidates: 8
    seed: 0                 # of the random sample
    space:                  # parameter -> list of values; every key is optional
      magnification: [10x, 20x]       # shared: data.magnification (tiles/<mag> must exist in every store)
      batch_size: [64, 128]           # shared: train.batch_size
      train.seed: [0, 1]              # any Config key, as section.key (the detector's section by its name)
      # the detector's own parameters, e.g. the DPA's (wsi_ad.detectors.dpa.detector.DPA.apply_search_params):
      latent_size: [4, 8]             # dpa.latent_size, px (bottleneck side)
      channels: [4, 8]                # int: that width at every level; list: dpa.channels per level
      lr: [0.001, 0.0003]             # dpa.lr
      iterations: [44333, 88666]      # int: total iterations (flat: dpa.flat_iterations; progressive:
                                      #   dpa.iterations scaled to that sum); mapping: dpa.iterations
      layer: [relu4_2, relu3_2]       # backbone feature layer at dpa.image_size (dpa.layers)

Candidates whose magnification some store lacks, or whose tiles there are smaller than the model input,
are skipped with the reason recorded; so are combinations that make an invalid Config. A candidate whose
training fails on bad input (a :class:`wsi_ad.errors.WsiAdError`) is recorded as failed and the search
goes on.

Tiles larger than the model input (e.g. 64 px store tiles for a 32 px model, or 128 px tiles at 20x) are
trained on random crops (:mod:`wsi_ad.tile_pool`) and scored on their centre crop. Tumour labels come
from each tile's full level-0 footprint (``tiles`` attribute ``geometry.tile0``), so the centre crop of an
anomaly tile lies inside the tumour too, and every candidate sees the same anomaly tiles.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from wsi_ad import __version__
from wsi_ad.atomic import write_text_atomic
from wsi_ad.config import Config, ConfigError, config_path, read_yaml
from wsi_ad.detectors import input_spec
from wsi_ad.errors import WsiAdError
from wsi_ad.store import STORE_SUFFIX, SlideStore, StoreError, is_store_path, stores_in

RESULTS_NAME = "tune_results.json"
#: Selection criteria of :func:`tune`.
SELECTIONS = ("weakly-supervised", "unsupervised")
BEST_CONFIG_NAME = "best_config.yaml"
RUNS_DIR = "runs"

#: Search parameters every detector has, and the Config key each sets.
SHARED_KEYS: dict[str, tuple[str, str]] = {
    "magnification": ("data", "magnification"),
    "batch_size": ("train", "batch_size"),
}


class TuneError(WsiAdError):
    """Bad tuning input: search space, stores, annotations, folds. The message names the culprit."""


class FoldLeakError(TuneError):
    """A validation fold shares a slide with the training stores it is meant to validate."""


# -- the search space -----------------------------------------------------------------------------------------

def _known_parameter(name: str) -> bool:
    """Whether ``name`` is a shared parameter, a registered detector's search parameter, or section.key."""
    import dataclasses

    from wsi_ad.config import DataSection, TrainSection
    from wsi_ad.detectors import get, names

    if name in SHARED_KEYS or any(name in get(d).search_parameters for d in names()):
        return True
    section, _, key = str(name).partition(".")
    classes = {"data": DataSection, "train": TrainSection, **{d: get(d).config_class for d in names()}}
    return section in classes and key in {f.name for f in dataclasses.fields(classes[section])}


@dataclass(frozen=True)
class SearchSpace:
    """Parameter name -> candidate values (in order), and how to draw candidates from their product.

    ``mode``: ``grid`` (every combination; at most ``max_candidates`` of them) or ``random`` (a sample of
    ``max_candidates`` distinct combinations drawn with ``seed``; all of them when there are fewer).
    """

    params: dict[str, list]
    mode: str = "random"
    max_candidates: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("grid", "random"):
            raise TuneError(f"search space: mode must be 'grid' or 'random', got {self.mode!r}")
        if not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise TuneError(f"search space: max_candidates must be a positive integer, got {self.max_candidates!r}")
        if not isinstance(self.params, Mapping) or not self.params:
            raise TuneError("search space: 'space' must be a non-empty mapping of parameter -> list of values")
        for name, values in self.params.items():
            if not _known_parameter(name):
                raise TuneError(f"search space: unknown parameter {name!r}; use a detector's search parameter "
                                f"(wsi-ad detectors), one of {sorted(SHARED_KEYS)}, or a Config key as section.key "
                                "(e.g. train.batch_size)")
            if not isinstance(values, list) or not values:
                raise TuneError(f"search space: {name!r} must be a non-empty list of values, got {values!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        if not isinstance(data, Mapping):
            raise TuneError("search space must be a mapping with a 'space' section")
        unknown = set(data) - {"mode", "max_candidates", "seed", "space"}
        if unknown:
            raise TuneError(f"search space: unknown key(s) {sorted(unknown)}; expected mode, max_candidates, seed, space")
        if "space" not in data:
            raise TuneError("search space: missing 'space' (parameter -> list of values)")
        return cls(params=dict(data["space"] or {}), mode=data.get("mode", "random"),
                   max_candidates=data.get("max_candidates", 8), seed=data.get("seed", 0))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SearchSpace:
        """A search space from a YAML file, or a packaged one by name (``tune_space_cpu``,
        :func:`wsi_ad.config.config_path`)."""
        path = config_path(path)
        data = read_yaml(path, TuneError, "search space")
        try:
            return cls.from_dict(data)
        except TuneError as exc:
            raise TuneError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "max_candidates": self.max_candidates, "seed": self.seed, "space": self.params}

    @property
    def size(self) -> int:
        """Number of combinations in the full product."""
        return math.prod(len(v) for v in self.params.values())

    def candidates(self, max_candidates: int | None = None, seed: int | None = None) -> list[dict[str, Any]]:
        """The parameter assignments to evaluate, each ``{name: value}`` (in the space's key order).

        ``max_candidates`` / ``seed`` override the space's own. Grid: all combinations in order (a
        :class:`TuneError` when there are more than ``max_candidates``). Random: distinct combinations in
        the order drawn.
        """
        limit = self.max_candidates if max_candidates is None else int(max_candidates)
        if limit < 1:
            raise TuneError(f"max_candidates must be >= 1, got {limit}")
        names, values = list(self.params), list(self.params.values())
        total = self.size
        if self.mode == "grid":
            if total > limit:
                raise TuneError(f"search space: the grid has {total} combinations, more than max_candidates={limit}; "
                                "raise max_candidates or use mode: random")
            return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]
        rng = np.random.default_rng(self.seed if seed is None else int(seed))
        picks = rng.choice(total, size=min(limit, total), replace=False) if total > limit else range(total)
        out = []
        for flat in picks:
            combo, rest = [], int(flat)
            for options in reversed(values):  # mixed radix, last parameter fastest (as itertools.product)
                rest, digit = divmod(rest, len(options))
                combo.append(options[digit])
            out.append(dict(zip(names, reversed(combo), strict=True)))
        return out


def default_space(detector: str = "dpa") -> dict[str, Any]:
    """The default search-space mapping of ``detector`` (its ``default_search_space``); TuneError when it has none."""
    from wsi_ad.detectors import get

    space = get(detector).default_search_space
    if space is None:
        raise TuneError(f"detector {detector!r} has no default search space; give one with --space")
    return copy.deepcopy(dict(space))


def load_space(path: str | os.PathLike | None = None, detector: str = "dpa") -> SearchSpace:
    """The search space of a YAML file, or ``detector``'s default (:func:`default_space`)."""
    return SearchSpace.from_yaml(path) if path is not None else SearchSpace.from_dict(default_space(detector))


def apply_params(base: Config, params: Mapping[str, Any]) -> Config:
    """A copy of ``base`` with the search-space ``params`` applied (see the module docstring), validated: shared
    parameters and ``section.key`` names set their key; the others are the detector's own, applied by its
    :meth:`~wsi_ad.detectors.base.Detector.apply_search_params`.

    Raises :class:`wsi_ad.config.ConfigError` for a parameter the detector does not have or a combination
    that makes no valid Config.
    """
    from wsi_ad.detectors import get
    from wsi_ad.slide import magnification_to_mpp

    detector = get(base.detector)
    data = copy.deepcopy(base.to_dict())
    own: dict[str, Any] = {}
    for name, value in params.items():
        if name in SHARED_KEYS:
            section, key = SHARED_KEYS[name]
        elif name in detector.search_parameters:
            own[name] = copy.deepcopy(value)
            continue
        elif "." in str(name):
            section, key = str(name).split(".", 1)
            if section not in data or section == "detector":
                raise ConfigError(f"{name}: no config section {section!r} for detector {base.detector!r}")
        else:
            raise ConfigError(f"detector {base.detector!r} has no search parameter {name!r} "
                              f"(it has {', '.join(sorted(detector.search_parameters)) or 'none'})")
        data[section][key] = copy.deepcopy(value)
    data[base.detector] = detector.apply_search_params(data[base.detector], own)
    try:
        config = Config.from_dict(data)
    except (TypeError, ValueError) as exc:  # a value of the wrong type in a section
        raise ConfigError(f"invalid value: {exc}") from exc
    try:
        magnification_to_mpp(config.data.magnification)
    except ValueError as exc:
        raise ConfigError(f"data.magnification: {exc}") from exc
    return config


def candidate_id(config: Config) -> str:
    """A short, stable id of what a config computes (its training identity; runtime keys left out)."""
    from wsi_ad.config import training_identity

    text = json.dumps(training_identity(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


# -- stores and folds -----------------------------------------------------------------------------------------


def find_stores(paths: Iterable[str | os.PathLike], what: str = "normal") -> list[Path]:
    """Slide stores named by ``paths``: stores themselves, or folders of ``*.zarr`` stores (the ``--out``
    of ``wsi-ad process``). Duplicates (same resolved path) are dropped; order is kept."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise TuneError(f"{path}: no such store or folder ({what} slides)")
        if is_store_path(path):
            found.append(path)
        elif path.is_dir():
            stores = stores_in(path)
            if not stores:
                raise TuneError(f"{path}: no slide stores (*{STORE_SUFFIX}) found ({what} slides)")
            found += stores
        else:
            raise TuneError(f"{path}: not a slide store or a folder of stores ({what} slides)")
    unique, seen = [], set()
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


@dataclass(frozen=True)
class Fold:
    """One split: train on ``train`` stores, validate on the normal tiles of ``validation`` stores."""

    index: int
    train: tuple[Path, ...]
    validation: tuple[Path, ...]


def slide_folds(normal_stores: Sequence[str | os.PathLike], k: int = 3, seed: int = 0) -> list[Fold]:
    """K folds split by slide: each store (one slide) is in exactly one fold's ``validation`` and in the
    ``train`` of every other fold. Stores are shuffled with ``seed`` and dealt into K groups of sizes
    differing by at most one. With fewer slides than ``k``, K is reduced to the number of slides (leave
    one slide out; compare ``len(result)`` with ``k``); fewer than two slides is a :class:`TuneError`.
    """
    stores = [Path(p) for p in normal_stores]
    if len({p.resolve() for p in stores}) != len(stores):
        raise TuneError("the normal stores list the same store more than once")
    if k < 2:
        raise TuneError(f"folds must be >= 2, got {k}")
    if len(stores) < 2:
        raise TuneError(f"cross-validation by slide needs at least 2 normal slide stores, got {len(stores)}")
    k = min(k, len(stores))
    order = np.random.default_rng(seed).permutation(len(stores))
    groups = [sorted(int(i) for i in part) for part in np.array_split(order, k)]
    folds = []
    for index, group in enumerate(groups):
        validation = tuple(stores[i] for i in group)
        train = tuple(stores[i] for i in range(len(stores)) if i not in set(group))
        folds.append(Fold(index, train, validation))
    return folds


def slide_identity(store: str | os.PathLike) -> set[str]:
    """What identifies the slide behind a store: its resolved path, and (when it opens as a slide store)
    its slide id and its source file's path. Two stores sharing any of these hold the same slide."""
    path = Path(store)
    keys = {f"store:{path.resolve()}"}
    try:
        attrs = SlideStore.open(path).root.attrs
    except StoreError:
        return keys
    if attrs.get("slide_id"):
        keys.add(f"slide_id:{attrs['slide_id']}")
    source = attrs.get("source") or {}
    if source.get("path"):
        keys.add(f"source:{source['path']}")
    return keys


def check_disjoint(train: Sequence[str | os.PathLike], validation: Sequence[str | os.PathLike],
                   what: str = "validation", against: str = "training") -> None:
    """Refuse a split whose ``validation`` stores share a slide with the ``train`` stores (by store path,
    slide id or source file): :class:`FoldLeakError` naming both. Scoring held-out tiles of a slide the
    model was trained on inflates its AUC."""
    if not validation:
        raise FoldLeakError(f"the {what} set is empty")
    owners: dict[str, Path] = {}
    for store in train:
        for key in slide_identity(store):
            owners[key] = Path(store)
    for store in validation:
        shared = sorted(key for key in slide_identity(store) if key in owners)
        if shared:
            raise FoldLeakError(f"{what} store {store} shares a slide with {against} store {owners[shared[0]]} "
                                f"({shared[0]}): the {what} tiles must come from slides never trained on")


# -- tiles ----------------------------------------------------------------------------------------------------

def _slide_id(store: Path) -> str:
    try:
        return str(SlideStore.open(store).root.attrs.get("slide_id") or store.stem)
    except StoreError:
        return store.stem


def _tiles_group(store: Path):
    try:
        return SlideStore.open(store).require("tiles")
    except StoreError as exc:
        raise TuneError(str(exc)) from exc


def _tile_count(store: Path) -> int:
    return int(_tiles_group(store)["coords"].shape[0])


def read_tiles(store: str | os.PathLike, indices: np.ndarray, magnification: str, size: int) -> np.ndarray:
    """Tiles ``indices`` (sorted) of a store's ``tiles/<magnification>``, centre-cropped to ``size`` px:
    (n, size, size, 3) uint8."""
    array = _tiles_group(Path(store))[magnification]
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    tiles = np.asarray(array.oindex[indices])
    off = (tiles.shape[1] - size) // 2
    return np.ascontiguousarray(tiles[:, off : off + size, off : off + size])


def _sample(pool: list[tuple[int, int]], limit: int | None, rng: np.random.Generator) -> list[tuple[int, int]]:
    if limit is not None and len(pool) > limit:
        keep = np.sort(rng.choice(len(pool), size=limit, replace=False))
        pool = [pool[i] for i in keep]
    return pool


def _by_store(picks: list[tuple[int, int]], n_stores: int) -> list[np.ndarray]:
    out = [[] for _ in range(n_stores)]
    for s, i in picks:
        out[s].append(i)
    return [np.asarray(sorted(v), dtype=np.int64) for v in out]


@dataclass
class TileSample:
    """A fixed selection of tiles: ``indices[i]`` are tile indices (sorted) of ``stores[i]``."""

    stores: list[Path]
    indices: list[np.ndarray]

    def __len__(self) -> int:
        return int(sum(len(i) for i in self.indices))

    def key(self) -> str:
        text = json.dumps([[str(s.resolve()), i.tolist()] for s, i in zip(self.stores, self.indices, strict=True)])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def tiles(self, magnification: str, size: int) -> np.ndarray:
        parts = [read_tiles(s, i, magnification, size) for s, i in zip(self.stores, self.indices, strict=True) if len(i)]
        return np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)


@dataclass
class ImageTileSample:
    """Validation anomalies given as image files (PNG/JPEG tumour tiles, e.g. a folder of annotated patches):
    ``files``, their µm/px ``image_mpp`` (None: already at the model's magnification). :meth:`tiles` loads them as
    the tile scorer does (:func:`wsi_ad.scoring.score_image_folder`): resized to the magnification, centre crop.
    ``stores`` is empty: the slide-disjoint guard cannot check image files, so their slides must not be among the
    normal training slides (the caller's responsibility, said in ``tune_results.json``)."""

    files: list[Path]
    image_mpp: float | None = None
    stores: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def key(self) -> str:
        text = json.dumps([[str(f.resolve()) for f in self.files], self.image_mpp])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def tiles(self, magnification: str, size: int) -> np.ndarray:
        from wsi_ad.scoring import _CenterCrop
        from wsi_ad.slide import magnification_to_mpp
        from wsi_ad.tile_pool import ImageFolderSource

        scale = self.image_mpp / magnification_to_mpp(magnification) if self.image_mpp else None
        return ImageFolderSource(self.files, size, scale).read(0, len(self.files), _CenterCrop())


@dataclass(frozen=True)
class ImageFold:
    """A fold of image tiles laid out by the caller (the DPA paper's block folds, :mod:`pipelines.dpa_protocol`):
    train on the PNG/JPEG tiles of ``train`` (files or folders), validate on ``normals`` and, for the
    weakly-supervised criterion, ``anomalies``. Image files carry no slide id, so the fold names the slides each
    part comes from (``train_slides``, ``validation_slides``, ``anomaly_slides``) and :meth:`check_disjoint`, the
    leak guard of :func:`evaluate_fold`, compares those names."""

    index: int
    train: tuple[Path, ...]
    normals: ImageTileSample
    anomalies: ImageTileSample | None
    train_slides: frozenset[str]
    validation_slides: frozenset[str]
    anomaly_slides: frozenset[str] = frozenset()

    def check_disjoint(self) -> None:
        """Raise :class:`FoldLeakError` when a validation tile (normal or anomaly) comes from a training slide, or
        when the fold has no normal validation tile."""
        if not len(self.normals):
            raise FoldLeakError(f"fold {self.index}: the validation set is empty")
        for what, slides in (("normal validation", self.validation_slides), ("anomaly", self.anomaly_slides)):
            shared = sorted(self.train_slides & slides)
            if shared:
                raise FoldLeakError(f"fold {self.index}: {what} tiles from slide(s) {', '.join(shared[:5])} that the "
                                    "fold trains on: validation tiles must come from slides never trained on")

    def train_files(self) -> list[Path]:
        """The training tiles' files, resolved (a folder of symbolic links names the files they point to)."""
        from wsi_ad.scoring import find_image_tiles

        return [p.resolve() for p in find_image_tiles(list(self.train))]


def anomaly_images(paths: Sequence[str | os.PathLike], image_mpp: float | None = None, max_tiles: int | None = 64,
                   seed: int = 0) -> AnomalySelection:
    """Validation anomalies from image files or folders of them (searched recursively): a seeded sample of at
    most ``max_tiles`` (None: all). Raises :class:`TuneError` when there is none or ``image_mpp`` is not positive."""
    from wsi_ad.scoring import find_image_tiles

    if image_mpp is not None and not image_mpp > 0:
        raise TuneError(f"anomaly image µm/px must be positive, got {image_mpp}")
    try:
        files = find_image_tiles(list(paths))
    except WsiAdError as exc:
        raise TuneError(f"--anomalies: {exc}") from None
    if not files:
        raise TuneError(f"no PNG/JPEG anomaly tile in {', '.join(map(str, paths))}")
    picks = sorted(_sample(list(range(len(files))), max_tiles, np.random.default_rng([int(seed), 2])))
    from wsi_ad.images import read_image

    for i in picks:                         # one unreadable tile would fail every candidate later: say it now
        try:
            read_image(files[i])
        except WsiAdError as exc:
            raise TuneError(f"--anomalies: {exc}") from None
    summary = [{"images": [str(p) for p in paths], "tumor_tiles": len(files), "selected": len(picks),
                "image_mpp": image_mpp, "note": "image files: the slide-disjoint guard cannot check them"}]
    return AnomalySelection(ImageTileSample([files[i] for i in picks], image_mpp), summary)


def _are_images(paths: Sequence[str | os.PathLike]) -> bool:
    """Whether ``paths`` name image tiles (files, or folders holding PNG/JPEG files and no ``*.zarr`` store)."""
    from wsi_ad.tile_pool import IMAGE_SUFFIXES

    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            continue
        if path.is_dir() and not path.name.endswith(".zarr") and not any(path.glob("*.zarr")) and any(
                f.suffix.lower() in IMAGE_SUFFIXES for f in path.rglob("*") if f.is_file()):
            continue
        return False
    return bool(paths)


def normal_sample(stores: Sequence[Path], max_tiles: int | None, seed: int) -> TileSample:
    """A seeded sample of at most ``max_tiles`` tiles (None: all) of the ``stores``, pooled."""
    stores = list(stores)
    pool = [(s, i) for s, store in enumerate(stores) for i in range(_tile_count(store))]
    picks = _sample(pool, max_tiles, np.random.default_rng([int(seed), 1]))
    return TileSample(stores, _by_store(picks, len(stores)))


@dataclass
class AnomalySelection:
    """The validation anomalies: tumour tiles of annotated tumour slides. ``summary`` per store: slide id,
    path, annotation file, tiles, tumour tiles (entirely inside the tumour polygons), selected."""

    sample: TileSample
    summary: list[dict]


def anomaly_tiles(tumor_stores: Sequence[str | os.PathLike], annotations_dir: str | os.PathLike,
                  max_tiles: int | None = 64, seed: int = 0) -> AnomalySelection:
    """Select the validation anomalies: the tiles of ``tumor_stores`` whose whole level-0 footprint lies
    inside the tumour polygons of ``annotations_dir/<slide_id>.xml`` (ASAP XML; label 1 of
    :func:`wsi_ad.metrics.tile_labels` with ``min_tumor_overlap=1.0``), a seeded sample of at most
    ``max_tiles`` of them pooled over the stores (None: all)."""
    from wsi_ad.annotations import annotation_file, read_asap_xml
    from wsi_ad.metrics import tile_labels

    stores = [Path(p) for p in tumor_stores]
    if not stores:
        raise TuneError("no anomaly (tumour) stores given")
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        what = "is a file, not the annotations folder" if annotations_dir.exists() else "annotations folder not found"
        raise TuneError(f"{annotations_dir}: {what} (ASAP XML <slide_id>.xml files)")
    pool: list[tuple[int, int]] = []
    summary = []
    for s, store in enumerate(stores):
        slide_id = _slide_id(store)
        xml = annotation_file(annotations_dir, slide_id)
        if xml is None:
            raise TuneError(f"{annotations_dir}: no annotation file {slide_id}.xml for tumour slide {slide_id} ({store})")
        tiles = _tiles_group(store)
        coords = np.asarray(tiles["coords"][:])
        geometry = dict(tiles.attrs.get("geometry") or {})
        if "tile0" not in geometry:
            raise TuneError(f"{store}: tiles have no geometry.tile0 attribute (footprint in level-0 px)")
        labels = tile_labels(coords, tuple(geometry["tile0"]), read_asap_xml(xml), min_tumor_overlap=1.0)
        tumor = np.flatnonzero(labels == 1)
        pool += [(s, int(i)) for i in tumor]
        summary.append({"slide_id": slide_id, "store": str(store), "annotations": str(xml), "tiles": int(len(coords)),
                        "tumor_tiles": int(len(tumor))})
    if not pool:
        raise TuneError("no tile of the tumour stores lies entirely inside a tumour annotation: "
                        + ", ".join(f"{d['slide_id']} ({d['tiles']} tiles)" for d in summary))
    picks = _sample(pool, max_tiles, np.random.default_rng([int(seed), 2]))
    sample = TileSample(stores, _by_store(picks, len(stores)))
    for entry, idx in zip(summary, sample.indices, strict=True):
        entry["selected"] = int(len(idx))
    return AnomalySelection(sample, summary)


def _has_magnification(stores: Iterable[Path], magnification: str, size: int) -> str | None:
    """None when every store has ``tiles/<magnification>`` of at least ``size`` px, else the reason."""
    missing, small = [], []
    for store in stores:
        tiles = _tiles_group(store)
        if magnification not in tiles:
            missing.append(store.name)
        elif tiles[magnification].shape[1] < size:
            small.append(f"{store.name} ({tiles[magnification].shape[1]} px)")
    if missing:
        return f"tiles/{magnification} missing in {len(missing)} store(s): {', '.join(missing[:5])}"
    if small:
        return f"tiles/{magnification} smaller than the model input {size} px in {', '.join(small[:5])}"
    return None


# -- the search -----------------------------------------------------------------------------------------------

def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:12]


@dataclass
class TuneResult:
    """What :func:`tune` produced. ``candidates``: one record per candidate (as in ``tune_results.json``);
    ``best``: the winner's record (None when no candidate could be evaluated)."""

    out: Path
    results_path: Path
    best_config_path: Path | None
    candidates: list[dict]
    best: dict | None
    folds: list[Fold] | list[ImageFold]
    notes: list[str] = field(default_factory=list)


def evaluate_fold(config: Config, fold: Fold | ImageFold, normals: TileSample | ImageTileSample,
                  anomalies: TileSample | ImageTileSample | None, run_dir: Path, *, device: str | None = None) -> dict:
    """Train ``config`` on ``fold.train`` (checkpoint under ``run_dir``, resumed when present) and score the
    held-out normals and the anomalies; returns the fold record (AUC, the held-out normals' mean score,
    seconds, counts). Without ``anomalies`` (unsupervised selection) the AUC is None. A finished fold
    whose record matches (same config, slides and tile samples) is returned as it was, with ``reused``.
    ``fold`` is a :class:`Fold` of slide stores or an :class:`ImageFold` (its ``normals`` and ``anomalies`` are
    the ones to pass). Raises :class:`FoldLeakError` when a validation tile comes from a training slide."""
    from sklearn.metrics import roc_auc_score

    from wsi_ad.detectors.loop import train
    from wsi_ad.detectors.scorer import load_scorer
    from wsi_ad.device import select_device

    # The leak of the official DPA code: never validate on tiles of the training slides.
    if isinstance(fold, ImageFold):
        fold.check_disjoint()
        files = [str(p) for p in fold.train_files()]
        train_id = [f"{len(files)} image files {_hash(files)}"]     # thousands of paths: their digest
        validation_id = normals.key()
        train_slides, validation_slides = sorted(fold.train_slides), sorted(fold.validation_slides)
    else:
        check_disjoint(fold.train, fold.validation)
        check_disjoint(fold.train, normals.stores)
        if anomalies is not None and not isinstance(anomalies, ImageTileSample):   # image files name no slide
            check_disjoint(fold.train, anomalies.stores, what="anomaly")
        outside = {p.resolve() for p in normals.stores} - {p.resolve() for p in fold.validation}
        if outside:
            raise FoldLeakError(f"normal validation tiles drawn from stores outside fold {fold.index}'s validation "
                                f"stores: {sorted(map(str, outside))}")
        train_id = [str(p.resolve()) for p in fold.train]
        validation_id = [str(p.resolve()) for p in fold.validation]
        train_slides = [_slide_id(p) for p in fold.train]
        validation_slides = [_slide_id(p) for p in fold.validation]
    run_config = copy.deepcopy(config)
    if device is not None:
        run_config.train.device = device
    train_key = _hash(train_id)
    key = {"candidate": candidate_id(config), "train": train_id, "validation": validation_id, "normals": normals.key(),
           "anomalies": None if anomalies is None else anomalies.key()}
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / f"fold{fold.index}-{train_key}.pt"
    record_path = checkpoint.with_suffix(".json")
    if record_path.is_file() and checkpoint.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if record and record.get("key") == key:
            return {**record, "reused": True}

    t0 = time.perf_counter()
    trained = train(list(fold.train), checkpoint, run_config, progress=False, echo=lambda *a: None)
    train_seconds = time.perf_counter() - t0
    if not trained.complete:
        raise TuneError(f"{checkpoint}: training did not complete")
    t1 = time.perf_counter()
    scorer = load_scorer(checkpoint, device=select_device(run_config.train.device))
    size, mag = scorer.image_size, scorer.magnification
    normal_scores = scorer.score(normals.tiles(mag, size))
    anomaly_scores = scorer.score(anomalies.tiles(mag, size)) if anomalies is not None else np.zeros(0, np.float32)
    labels = np.r_[np.zeros(len(normal_scores), np.int8), np.ones(len(anomaly_scores), np.int8)]
    scores = np.r_[normal_scores, anomaly_scores]
    if not np.isfinite(scores).all():
        raise TuneError(f"{checkpoint}: non-finite anomaly scores (diverged training?)")
    auc = float(roc_auc_score(labels, scores)) if anomalies is not None else None
    score_seconds = time.perf_counter() - t1
    record = {
        "fold": fold.index, "auc": auc, "n_normal": int(len(normal_scores)), "n_anomaly": int(len(anomaly_scores)),
        "normal_score_mean": float(np.mean(normal_scores)), "normal_score_median": float(np.median(normal_scores)),
        "anomaly_score_median": float(np.median(anomaly_scores)) if anomalies is not None else None,
        "train_seconds": round(train_seconds, 2), "score_seconds": round(score_seconds, 2),
        "seconds": round(train_seconds + score_seconds, 2), "iterations": trained.iterations,
        "final_loss": trained.final_loss, "checkpoint": str(checkpoint),
        "train_slides": train_slides, "validation_slides": validation_slides, "key": key,
    }
    write_text_atomic(record_path, json.dumps(record, indent=2))
    return {**record, "reused": False}


def tune(
    normal_stores: Sequence[str | os.PathLike],
    anomaly_stores: Sequence[str | os.PathLike] | None,
    annotations_dir: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    selection: str = "weakly-supervised",
    base_config: Config | None = None,
    space: SearchSpace | None = None,
    folds: int = 3,
    max_candidates: int | None = None,
    max_anomaly_tiles: int | None = 64,
    max_normal_tiles: int | None = 4096,
    anomaly_mpp: float | None = None,
    seed: int = 0,
    device: str | None = None,
    echo: Callable[[str], None] = print,
) -> TuneResult:
    """Weakly-supervised hyperparameter search (see the module docstring); writes ``out/tune_results.json``
    and ``out/best_config.yaml``.

    ``normal_stores`` / ``anomaly_stores``: slide stores or folders of stores (one store per slide); the anomalies
    may instead be PNG/JPEG tumour tiles (files or folders of them; :func:`anomaly_images`, at ``anomaly_mpp`` µm/px,
    no annotations needed);
    ``annotations_dir``: ASAP XML ``<slide_id>.xml`` of the tumour slides; ``base_config``: what the
    candidates change (default: the paper's :class:`Config`); ``space``: default the detector's ``default_search_space``;
    ``folds``: K of the slide-wise cross-validation; ``max_candidates``: overrides the space's;
    ``max_anomaly_tiles`` / ``max_normal_tiles``: caps of the validation tiles (anomalies in all, normals
    per fold; None: no cap); ``seed``: folds (of the stores sorted by slide id, so the argument order does
    not matter), tile samples and random search; ``device``: auto / cpu /
    cuda for training and scoring (a runtime setting: not written into ``best_config.yaml``).

    ``selection``: ``weakly-supervised`` (the winner has the best mean tile AUC of the validation anomalies vs the
    held-out normals) or ``unsupervised`` (the DPA paper's other criterion, its Table 2 row 1: the lowest mean
    score of the held-out normal tiles, which for the autoencoders is their reconstruction loss; no anomalies
    are used, ``anomaly_stores`` and ``annotations_dir`` may be None). The scores of candidates that change the
    loss itself (feature layer, backbone) are in different units, so this criterion compares them as the paper
    did, not on a common scale.
    """
    if selection not in SELECTIONS:
        raise TuneError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    supervised = selection == "weakly-supervised"
    for raw in anomaly_stores or ():
        if not Path(raw).exists():
            raise TuneError(f"--anomalies {raw}: no such file or folder")
    as_images = bool(anomaly_stores) and _are_images(anomaly_stores)    # tumour tiles as images: no annotations
    if anomaly_stores and not as_images and any(_are_images([p]) for p in anomaly_stores):
        raise TuneError("--anomalies: give either slide stores (with --annotations) or tumour tile images, not both")
    if supervised and not as_images and (not anomaly_stores or annotations_dir is None):
        raise TuneError("weakly-supervised selection needs anomaly stores and their annotations "
                        "(--anomalies, --annotations); --selection unsupervised needs neither")
    out = Path(out)
    base_config = base_config or Config()
    base_config.validate()
    space = space or load_space(detector=base_config.detector)
    if device is not None:
        if device not in ("auto", "cpu", "cuda"):
            raise TuneError(f"device must be auto, cpu or cuda, got {device!r}")
        from wsi_ad.device import select_device

        select_device(device)  # cuda asked for but absent: say so now, not once per candidate
    for name, value in (("max_anomaly_tiles", max_anomaly_tiles), ("max_normal_tiles", max_normal_tiles)):
        if value is not None and value < 1:
            raise TuneError(f"{name} must be >= 1, got {value}")
    normals = find_stores(normal_stores, "normal")
    images = supervised and as_images
    tumors = find_stores(anomaly_stores, "anomaly") if supervised and not images else []
    for store in normals + tumors:
        _tiles_group(store)  # every store must have been tiled
    normals.sort(key=lambda p: (_slide_id(p), str(p.resolve())))  # folds do not depend on the argument order
    if supervised and not images:
        check_disjoint(normals, tumors, what="anomaly", against="normal")
    notes: list[str] = []
    fold_list = slide_folds(normals, folds, seed)
    if len(fold_list) < folds:
        notes.append(f"{len(normals)} normal slides: folds reduced from {folds} to {len(fold_list)} (leave one slide out)")
        echo("note: " + notes[-1])
    if images:
        anomalies = anomaly_images(anomaly_stores, anomaly_mpp, max_anomaly_tiles, seed)
    else:
        anomalies = anomaly_tiles(tumors, annotations_dir, max_anomaly_tiles, seed) if supervised else None
    normal_samples = [normal_sample(f.validation, max_normal_tiles, seed * 1000 + f.index) for f in fold_list]
    if supervised:
        origin = "image files" if images else f"{len(tumors)} tumour slide(s)"
        echo(f"{len(normals)} normal slides in {len(fold_list)} folds; {len(anomalies.sample)} anomaly tiles from "
             f"{origin} ({sum(d['tumor_tiles'] for d in anomalies.summary)} tumour tiles there)")
    else:
        echo(f"{len(normals)} normal slides in {len(fold_list)} folds; unsupervised selection: the lowest mean score "
             "of held-out normal tiles wins (no anomalies)")

    assignments = space.candidates(max_candidates, None)
    results_path = out / RESULTS_NAME
    best_path = out / BEST_CONFIG_NAME
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "selection": selection, "normal_stores": [str(p) for p in normals],
        "anomaly_stores": [str(p) for p in tumors], "annotations": None if annotations_dir is None else str(annotations_dir),
        "anomaly_images": [str(p) for p in anomaly_stores] if images else None, "anomaly_mpp": anomaly_mpp,
        "folds_requested": folds, "folds": len(fold_list), "seed": seed,
        "max_candidates": max_candidates if max_candidates is not None else space.max_candidates,
        "max_anomaly_tiles": max_anomaly_tiles, "max_normal_tiles": max_normal_tiles, "device": device,
        "space": space.to_dict(), "base_config": base_config.to_dict(),
    }
    fold_info = [{"fold": f.index, "train": [_slide_id(p) for p in f.train],
                  "validation": [_slide_id(p) for p in f.validation], "normal_tiles": len(s)}
                 for f, s in zip(fold_list, normal_samples, strict=True)]

    document = {"settings": settings, "notes": notes, "folds": fold_info,
                "anomalies": None if anomalies is None else {"tiles": len(anomalies.sample),
                                                             "stores": anomalies.summary}}
    validation = [(f, n, anomalies.sample if supervised else None) for f, n in zip(fold_list, normal_samples,
                                                                                   strict=True)]
    records, best = _search(assignments, base_config, validation, out, document, supervised, selection, device, echo,
                            lambda config: _has_magnification(normals + tumors, config.data.magnification,
                                                              input_spec(config).tile_px))
    return TuneResult(out, results_path, best_path, records, best, fold_list, notes)


def tune_image_folds(
    folds: Sequence[ImageFold],
    out: str | os.PathLike,
    *,
    selection: str = "weakly-supervised",
    base_config: Config | None = None,
    space: SearchSpace | None = None,
    max_candidates: int | None = None,
    device: str | None = None,
    settings: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> TuneResult:
    """The search of :func:`tune` on folds of image tiles laid out by the caller (:class:`ImageFold`; the DPA
    paper's block folds of :mod:`pipelines.dpa_protocol`), with the same outputs in ``out``
    (``tune_results.json``, ``best_config.yaml``, resumable ``runs/``) and the same criteria (``selection``). The
    tiles are at the model's magnification already: they are cropped, never resized (``data.image_mpp`` of the
    candidates is set to None). ``settings``: what the caller records about the folds (written into
    ``tune_results.json``). Raises :class:`FoldLeakError` when a fold validates on a slide it trains on,
    :class:`TuneError` for bad input or when no candidate could be evaluated."""
    if selection not in SELECTIONS:
        raise TuneError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    supervised = selection == "weakly-supervised"
    folds = list(folds)
    if not folds:
        raise TuneError("no fold to select on")
    for fold in folds:
        fold.check_disjoint()
        if supervised and (fold.anomalies is None or not len(fold.anomalies)):
            raise TuneError(f"fold {fold.index}: weakly-supervised selection needs anomaly tiles in every fold")
    out = Path(out)
    base_config = base_config or Config()
    base_config = replace(base_config, data=replace(base_config.data, image_mpp=None))
    base_config.validate()
    space = space or load_space(detector=base_config.detector)
    if "magnification" in space.params:
        raise TuneError("the image folds are at one magnification: the search space cannot vary 'magnification'")
    if device is not None:
        from wsi_ad.device import select_device

        select_device(device)
    out.mkdir(parents=True, exist_ok=True)
    fold_info = [{"fold": f.index, "train": sorted(f.train_slides), "validation": sorted(f.validation_slides),
                  "anomaly_slides": sorted(f.anomaly_slides), "train_tiles": len(f.train_files()),
                  "normal_tiles": len(f.normals), "anomaly_tiles": len(f.anomalies) if f.anomalies else 0}
                 for f in folds]
    echo(f"{len(folds)} folds of image tiles; " + ("weakly-supervised: tile AUC of the validation anomalies against "
                                                   "the held-out normal tiles" if supervised else
                                                   "unsupervised: the lowest mean score of held-out normal tiles wins"))
    document = {"settings": {"selection": selection, "device": device,
                             "max_candidates": max_candidates if max_candidates is not None else space.max_candidates,
                             "space": space.to_dict(), "base_config": base_config.to_dict(), **(settings or {})},
                "notes": [], "folds": fold_info, "anomalies": None}
    validation = [(f, f.normals, f.anomalies if supervised else None) for f in folds]
    records, best = _search(space.candidates(max_candidates, None), base_config, validation, out, document, supervised,
                            selection, device, echo, lambda config: None)
    return TuneResult(out, out / RESULTS_NAME, out / BEST_CONFIG_NAME, records, best, folds, [])


def _search(assignments: list[dict[str, Any]], base_config: Config, validation: list[tuple], out: Path,
            document: dict, supervised: bool, selection: str, device: str | None, echo: Callable[[str], None],
            unusable: Callable[[Config], str | None]) -> tuple[list[dict], dict]:
    """Every candidate of ``assignments`` on every (fold, normals, anomalies) of ``validation``
    (:func:`evaluate_fold`), ``out/tune_results.json`` (``document`` with the candidates and the winner) saved
    after each fold, the winner's ``out/best_config.yaml``; returns (the candidate records, the winner's summary).
    ``unusable(config)``: why a candidate cannot run on these tiles (it is skipped), or None."""
    results_path, best_path = out / RESULTS_NAME, out / BEST_CONFIG_NAME
    records: list[dict] = []
    configs: dict[str, Config] = {}

    def save(best: dict | None) -> None:
        write_text_atomic(results_path, json.dumps({"wsi_ad_version": __version__,
                                                    "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **document,
                                                    "candidates": records, "best": best}, indent=2, default=str))

    for number, params in enumerate(assignments):
        record: dict[str, Any] = {"index": number, "params": params, "status": "ok", "reason": None, "id": None,
                                  "auc_mean": None, "auc_std": None, "normal_score_mean": None, "seconds": 0.0,
                                  "folds": []}
        records.append(record)
        label = f"candidate {number + 1}/{len(assignments)} {json.dumps(params, default=str)}"
        try:
            config = apply_params(base_config, params)
        except ConfigError as exc:
            record.update(status="skipped", reason=f"invalid configuration: {exc}")
            echo(f"{label}: skipped ({record['reason']})")
            save(None)
            continue
        cid = record["id"] = candidate_id(config)
        twin = next((r for r in records[:-1] if r["id"] == cid), None)
        if twin is not None:
            record.update(status="skipped", reason=f"same configuration as candidate {twin['index'] + 1}")
            echo(f"{label}: skipped ({record['reason']})")
            save(None)
            continue
        reason = unusable(config)
        if reason:
            record.update(status="skipped", reason=reason)
            echo(f"{label}: skipped ({reason})")
            save(None)
            continue
        configs[cid] = config
        run_dir = out / RUNS_DIR / cid
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        try:
            for fold, normals_f, anomalies_f in validation:
                result = evaluate_fold(config, fold, normals_f, anomalies_f, run_dir, device=device)
                result.pop("key", None)
                record["folds"].append(result)
                record["seconds"] = round(sum(f["seconds"] for f in record["folds"]), 2)
                value = (f"AUC {result['auc']:.3f}" if supervised
                         else f"mean normal score {result['normal_score_mean']:.4g}")
                echo(f"{label} fold {fold.index + 1}/{len(validation)}: {value} "
                     f"({result['seconds']:.1f} s{', reused' if result['reused'] else ''})")
                save(None)
        except FoldLeakError:
            raise
        except WsiAdError as exc:
            record.update(status="failed", reason=str(exc))
            echo(f"{label}: failed ({exc})")
            save(None)
            continue
        if supervised:
            aucs = np.array([f["auc"] for f in record["folds"]])
            record["aucs"] = [float(a) for a in aucs]
            record["auc_mean"], record["auc_std"] = float(aucs.mean()), float(aucs.std())
        record["normal_score_mean"] = float(np.mean([f["normal_score_mean"] for f in record["folds"]]))
        save(None)

    done = [r for r in records if r["status"] == "ok"]
    if not done:
        save(None)
        reasons = "; ".join(f"{r['index'] + 1}: {r['reason']}" for r in records)
        raise TuneError(f"no candidate could be evaluated ({reasons}); see {results_path}")
    if supervised:
        winner = max(done, key=lambda r: (r["auc_mean"], -r["auc_std"], -r["seconds"], -r["index"]))
    else:
        winner = min(done, key=lambda r: (r["normal_score_mean"], r["seconds"], r["index"]))
    best = {"index": winner["index"], "id": winner["id"], "params": winner["params"], "selection": selection,
            "auc_mean": winner["auc_mean"], "auc_std": winner["auc_std"],
            "normal_score_mean": winner["normal_score_mean"], "config": str(best_path)}
    write_best_config(best_path, configs[winner["id"]], winner, len(validation), selection)
    save(best)
    return records, best


class _ConfigDumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists and layer maps (``channels: [8, 8, 8]``), as the configs/ files."""


_ConfigDumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def write_best_config(path: str | os.PathLike, config: Config, record: Mapping[str, Any], n_folds: int,
                      selection: str = "weakly-supervised") -> Path:
    """Write ``config`` as a full Config YAML (what ``wsi-ad train --config`` reads), with a header saying
    where it comes from."""
    params = json.dumps(record["params"], default=str)
    criterion = (f"#   tile AUC, validation anomalies vs held-out normal slides: "
                 f"{record['auc_mean']:.4f} +- {record['auc_std']:.4f}\n" if selection == "weakly-supervised" else
                 f"#   mean score of held-out normal tiles (the lowest wins): {record['normal_score_mean']:.6g}\n")
    header = (f"# Chosen by wsi-ad tune ({selection} selection, {n_folds}-fold cross-validation by slide):\n"
              f"#   candidate {record['index'] + 1} ({record['id']}): {params}\n" + criterion +
              "# Train the final model on all normal slides with:\n"
              f"#   wsi-ad train NORMAL_STORES... --out model.pt --config {Path(path).name}\n")
    body = yaml.dump(config.to_dict(), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False, width=120)
    Config.from_dict(yaml.safe_load(body))  # what we write must read back
    return write_text_atomic(path, header + body)
