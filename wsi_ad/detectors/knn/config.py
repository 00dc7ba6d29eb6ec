"""The feature kNN baseline's config section (``knn:`` in a config YAML): PatchCore's memory bank of mid-level
ImageNet patch features (Roth et al., CVPR 2022; ``shared/METHODS.md`` §10) on 64 px tiles. ``configs/knn_cpu.yaml``
is the setting for 2 CPU cores, ``configs/knn_paper.yaml`` the paper's as close as the registered backbones allow."""

from __future__ import annotations

from dataclasses import dataclass, field

from wsi_ad.config import ConfigError


@dataclass
class KNNConfig:
    """Features, coreset, memory bound and score of the feature memory bank.

    Features: ``image_size`` px tiles, enlarged bilinearly by the integer factor ``upsample`` (1 = as they are), go
    through the frozen ImageNet ``backbone`` (``efficientnet_lite0``, shipped offline; ``resnet18`` from the torch
    hub cache or ``backbone_weights``); the maps of the two ``layers`` (names in
    :data:`wsi_ad.features.backbones.LAYER_NAMES`, shallower first) are each 3x3 average pooled (stride 1, padding 1),
    the deeper one bilinearly resized to the shallower one's grid, and concatenated along channels: one feature per
    cell of that grid (a "patch"). ``embed_dim``: when set, each layer's channels are first average pooled to
    ``embed_dim`` and the concatenation again to ``embed_dim`` (the authors' reduction); null keeps the plain
    concatenation (anomalib).

    Fit (no training steps): the patch features of the normal tiles (all of them, or a seeded random ``max_fit_tiles``
    of them) are read ``chunk_tiles`` tiles at a time; each chunk is reduced to ``coreset_ratio`` of its patches by
    greedy k-center coreset selection on a random projection to ``coreset_projection_dim`` dimensions, and the union
    of the chunks' coresets, whenever it grows past 2 x ``max_bank`` entries (and once at the end when past
    ``max_bank``), is reduced to ``max_bank`` entries the same way.

    Score: the Euclidean distance of every patch to its nearest bank entry; the tile's score is the largest of them,
    re-weighted by PatchCore's ``1 - softmax`` over the distances to the ``reweight_neighbours`` nearest bank entries of
    that patch's neighbour (1 = no re-weighting: the plain maximum).
    """

    image_size: int = 64
    backbone: str = "efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["block2", "block4"])
    upsample: int = 1
    embed_dim: int | None = None
    coreset_ratio: float = 0.1
    coreset_projection_dim: int = 128
    chunk_tiles: int = 1024
    max_fit_tiles: int | None = None
    max_bank: int = 1_000_000
    reweight_neighbours: int = 9
    backbone_weights: str | None = None
    download_weights: bool = False

    def __post_init__(self):
        self.layers = list(self.layers)

    def validate(self) -> None:
        """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid key."""
        from wsi_ad.features.backbones import LAYER_NAMES, list_backbones

        if self.backbone not in list_backbones():
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(list_backbones())}")
        known = LAYER_NAMES[self.backbone]
        if len(self.layers) != 2 or any(layer not in known for layer in self.layers):
            raise ConfigError(f"layers must name two {self.backbone} feature layers of {list(known)}, got {self.layers}")
        if known.index(self.layers[0]) >= known.index(self.layers[1]):
            raise ConfigError(f"layers must be two different layers, the shallower first, got {self.layers}")
        if self.image_size < 16 or self.image_size % 16:
            raise ConfigError(f"image_size must be a multiple of 16, got {self.image_size}")
        if self.upsample < 1 or self.upsample & (self.upsample - 1):
            raise ConfigError(f"upsample must be a power of two >= 1 (so that map cells tile the tile), got {self.upsample}")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ConfigError(f"embed_dim must be >= 1 (or null for the plain concatenation), got {self.embed_dim}")
        if not 0 < self.coreset_ratio <= 1:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_projection_dim < 1:
            raise ConfigError(f"coreset_projection_dim must be >= 1, got {self.coreset_projection_dim}")
        if self.chunk_tiles < 1:
            raise ConfigError(f"chunk_tiles must be >= 1, got {self.chunk_tiles}")
        if self.max_fit_tiles is not None and self.max_fit_tiles < 1:
            raise ConfigError(f"max_fit_tiles must be >= 1 (or null for every tile), got {self.max_fit_tiles}")
        if self.max_bank < 1:
            raise ConfigError(f"max_bank must be >= 1, got {self.max_bank}")
        if self.reweight_neighbours < 1:
            raise ConfigError(f"reweight_neighbours must be >= 1 (1 = no re-weighting), got {self.reweight_neighbours}")
