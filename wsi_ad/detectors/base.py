"""The interface every anomaly detector implements, and the input it expects.

A detector learns what normal tiles look like and scores tiles by how far they depart from it (higher =
more anomalous). Everything around it — the tile pool, the resumable training loop
(:mod:`~wsi_ad.detectors.loop`), checkpoints (:mod:`~wsi_ad.detectors.checkpoint`), the scorer
(:mod:`~wsi_ad.detectors.scorer`), heatmaps, tuning, the command line — is shared and only talks to this
interface. Shaped after anomalib's model modules (a model owns its networks and its optimizers: one for an
autoencoder, a generator/critic set for a GAN, none for a memory bank) and zarr's codec registry (a saved
object names its class).

Contract of the tensors a detector sees: tiles are ``(B, 3, S, S)`` float32 in [-1, 1] (RGB, channels
first; ``S`` = :attr:`InputSpec.tile_px`) on the detector's device. A detector that needs another input
(e.g. ImageNet normalisation, another size) converts inside its own methods.

Writing one: subclass :class:`Detector`, give it a config dataclass (its own YAML section, with a
``validate()`` that raises :class:`~wsi_ad.config.ConfigError`; ``image_size`` and ``iterations`` keys give the
default :meth:`~Detector.input_spec_of` and :meth:`~Detector.num_steps_of`), implement the abstract methods and
register it (:func:`wsi_ad.detectors.register`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wsi_ad.errors import WsiAdError

if TYPE_CHECKING:
    from wsi_ad.config import Config
    from wsi_ad.tile_pool import TilePool


class TrainingDivergedError(WsiAdError):
    """Training produced a non-finite (or, for a detector that says so, exploding) loss; the last checkpoint
    written before it is kept as it was."""


@dataclass(frozen=True)
class InputSpec:
    """The tiles a detector trains on and scores: ``tile_px`` x ``tile_px`` px at ``magnification``
    (e.g. ``"10x"``, the ``tiles/<magnification>`` array of slide stores)."""

    tile_px: int
    magnification: str

    @property
    def mpp(self) -> float:
        """Microns per pixel of the tiles (10x ≈ 1.0 µm/px)."""
        from wsi_ad.slide import magnification_to_mpp

        return magnification_to_mpp(self.magnification)

    @property
    def field_um(self) -> float:
        """Side of one tile in µm."""
        return self.tile_px * self.mpp


class Detector(ABC):
    """One anomaly detector: built from a :class:`~wsi_ad.config.Config` whose ``section`` is an instance of
    :attr:`config_class`, on a torch ``device``.

    Class attributes to set: ``name`` (registry key, also the config section's name), ``summary`` (one line
    for ``wsi-ad detectors``), ``paper`` (the paper and official code it follows), ``config_class``,
    ``score_units`` (what a score means, for reports and heatmap colour bars), ``map_reduction`` (how a
    per-pixel map is made, recorded beside stored maps), ``search_parameters``
    (short name -> key of the detector's section that ``wsi-ad tune`` may vary) and, optionally,
    ``default_search_space`` (a search-space mapping, see :mod:`wsi_ad.tuning`).

    Lifecycle in training: ``__init__`` builds the networks (seeded by the loop), :meth:`fit` runs once on
    normal tiles before the first step (statistics, memory banks), then :meth:`before_step` and
    :meth:`train_step` for steps ``0 .. num_steps - 1``; :meth:`state_dict` / :meth:`training_state_dict` are
    checkpointed and restored with :meth:`load_state_dict`, after which training resumes with identical results. In scoring:
    ``__init__``, :meth:`load_state_dict`, :meth:`eval`, then :meth:`score_batch`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    config_class: ClassVar[type]
    score_units: ClassVar[str] = "anomaly score (higher = more anomalous)"
    map_reduction: ClassVar[str] = ""
    search_parameters: ClassVar[Mapping[str, str]] = {}
    default_search_space: ClassVar[Mapping[str, Any] | None] = None

    def __init__(self, config: Config, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)

    # -- what it expects -------------------------------------------------------------------------------

    @classmethod
    def input_spec_of(cls, config: Config) -> InputSpec:
        """The tiles a detector of ``config`` expects (without building it); by default its section's
        ``image_size`` px at ``data.magnification``."""
        return InputSpec(int(config.section.image_size), config.data.magnification)

    @property
    def input_spec(self) -> InputSpec:
        return self.input_spec_of(self.config)

    @classmethod
    def num_steps_of(cls, config: Config) -> int:
        """Training steps of a detector of ``config``: by default its section's ``iterations``; 0 (fit-only) when
        the section has none."""
        return int(getattr(config.section, "iterations", 0))

    @property
    def num_steps(self) -> int:
        return self.num_steps_of(self.config)

    @property
    def batches_per_step(self) -> int:
        """Fresh batches of ``train.batch_size`` tiles one :meth:`train_step` consumes (e.g. a GAN's critic
        updates and its generator update each take their own); the loop passes them concatenated."""
        return 1

    def phase(self, step: int) -> str:
        """A label of the part of training that ``step`` belongs to (e.g. a progressive-growing phase), for
        progress lines and loss curves; ``""`` when training has no phases."""
        return ""

    def checkpoint_steps(self) -> set[int]:
        """Steps (counts of steps done) after which the loop must checkpoint besides every
        ``train.checkpoint_every``, e.g. the end of every phase."""
        return set()

    @classmethod
    def apply_search_params(cls, section: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        """``section`` (the detector's config section as a dict) with search-space ``params`` (short
        names of :attr:`search_parameters`) set; override for parameters that need translating."""
        section = dict(section)
        for name, value in params.items():
            section[cls.search_parameters[name]] = value
        return section

    # -- training -------------------------------------------------------------------------------------

    def fit(self, pool: TilePool) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Prepare from normal tiles before the first training step (``pool.sample(n)`` gives (n, S, S, 3)
        uint8 tiles): measure statistics, build a memory bank. Not called on resume (the state has it)."""

    def before_step(self, pool: TilePool, step: int) -> None:  # noqa: B027 - optional hook
        """Called before every :meth:`train_step` (also the first one after a resume) with the training pool:
        a detector that re-estimates statistics from the normal tiles during training (an EM algorithm's E-step)
        does it here, when ``step`` is one of its estimation steps, as a pure function of its weights and
        ``pool`` (so that a resumed run repeats it). Values worth a curve go in :meth:`train_step`'s return."""

    def train_step(self, tiles: torch.Tensor, step: int) -> dict[str, float]:
        """One optimisation step on ``tiles`` (B, 3, S, S) float32 in [-1, 1], B = ``batches_per_step`` x
        ``train.batch_size``; returns named losses (and other scalars worth a curve). The detector owns its
        optimizers and their schedule; randomness it draws must be a function of (``train.seed``, ``step``) so
        that a resumed run repeats it. Raises :class:`TrainingDivergedError` for a loss it knows has exploded
        (the loop itself refuses non-finite values)."""
        raise NotImplementedError(f"detector {self.name!r} has no training steps (fit-only)")

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What scoring needs (weights, statistics, memory banks): nested dicts of tensors, numbers,
        strings and lists (``torch.load(weights_only=True)`` must read it back). The model id hashes it."""

    def training_state_dict(self) -> dict[str, Any] | None:
        """What resuming training needs besides :meth:`state_dict` (optimizer states); None when nothing."""
        return None

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], training_state: dict[str, Any] | None = None) -> None:
        """Restore :meth:`state_dict` (and, when resuming training, :meth:`training_state_dict`)."""

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules the detector holds (for train/eval mode)."""
        return [m for m in vars(self).values() if isinstance(m, torch.nn.Module)]

    def train(self, mode: bool = True) -> Detector:
        for module in self.modules():
            module.train(mode)
        return self

    def eval(self) -> Detector:
        return self.train(False)

    #: Salt of :meth:`step_generator`'s streams (each detector its own, so that two detectors of one seed do not
    #: draw the same numbers).
    random_salt: ClassVar[int] = 0

    def step_generator(self, step: int) -> torch.Generator:
        """A torch generator on the detector's device for the randomness of training step ``step`` (latent samples,
        interpolation weights): a pure function of (``train.seed``, :attr:`random_salt`, ``step``), so that a resumed
        run draws the same numbers."""
        import numpy as np

        seed = int(np.random.default_rng([self.config.train.seed, self.random_salt, step]).integers(0, 2**63 - 1))
        return torch.Generator(device=self.device).manual_seed(seed)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast on cuda when ``train.amp`` is set (for a detector's forward passes in training)."""
        if self.device.type == "cuda" and self.config.train.amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield

    # -- scoring --------------------------------------------------------------------------------------

    @abstractmethod
    def score_batch(self, tiles: torch.Tensor, pixel_maps: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) float32 in [-1, 1] -> ((B,) float32 scores, (B, h, w) float32 per-pixel maps or
        None), on the detector's device; called without gradients. A map's cells tile the input evenly
        (:attr:`map_shape`); maps are only computed when ``pixel_maps``."""

    @property
    def map_shape(self) -> tuple[int, int]:
        """(h, w) of a per-pixel map of one tile; each cell covers ``tile_px / w`` input px.
        :class:`~wsi_ad.errors.WsiAdError` when the detector gives no maps."""
        with torch.no_grad():
            size = self.input_spec.tile_px
            _, maps = self.score_batch(torch.zeros(1, 3, size, size, device=self.device), pixel_maps=True)
        if maps is None:
            from wsi_ad.errors import WsiAdError

            raise WsiAdError(f"detector {self.name!r} gives no per-pixel maps (score without --pixel-maps)")
        return int(maps.shape[1]), int(maps.shape[2])
