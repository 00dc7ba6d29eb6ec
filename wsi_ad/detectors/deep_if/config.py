"""Deep IF's config section (``deep_if:`` in a config YAML): pooled ImageNet features of several backbone layers and
an Isolation Forest (``shared/METHODS.md`` §5). ``configs/deep_if_paper.yaml`` is the official "reproduce" setting
on our backbone, ``configs/deep_if_cpu.yaml`` a cheaper resize for 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_ad.config import ConfigError


@dataclass
class DeepIFConfig:
    """Features, Isolation Forest and training-tile cap of Deep IF.

    ``image_size`` px tiles are resized (bilinear) to ``input_px`` px and fed to the frozen ImageNet ``backbone``
    (a name of :func:`wsi_ad.features.backbones.list_backbones`); the outputs of its feature ``layers`` (names of
    :data:`wsi_ad.features.backbones.LAYER_NAMES`; null: every layer the backbone offers) are each averaged over
    space and concatenated into one vector per tile. An Isolation Forest of ``n_estimators`` trees, each grown on
    ``max_samples`` training vectors (null: scikit-learn's ``"auto"``, min(256, n)), is fitted on the vectors of the
    training tiles: all of them, or a seeded random ``fit_tiles`` of them when there are more. ``backbone_weights``
    / ``download_weights``: where the backbone's ImageNet weights come from (runtime keys, see
    :meth:`wsi_ad.config.Config.set_backbone_weights`).
    """

    image_size: int = 64
    input_px: int = 299
    backbone: str = "efficientnet_lite0"
    layers: list[str] | None = None
    n_estimators: int = 100
    max_samples: int | None = None
    fit_tiles: int = 65536
    backbone_weights: str | None = None
    download_weights: bool = False

    def __post_init__(self):
        if self.layers is not None:
            self.layers = list(self.layers)

    def validate(self) -> None:
        """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid key."""
        from wsi_ad.features.backbones import LAYER_NAMES, list_backbones

        if self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1 px, got {self.image_size}")
        if self.input_px < 32:
            raise ConfigError(f"input_px must be >= 32 (the backbones downsample up to 32x), got {self.input_px}")
        if self.backbone not in list_backbones():
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(list_backbones())}")
        known = LAYER_NAMES[self.backbone]
        if self.layers is not None:
            bad = [layer for layer in self.layers if layer not in known]
            if bad or not self.layers or len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"layers must be distinct {self.backbone} feature layers out of {list(known)} "
                                  f"(or null for all), got {self.layers}")
        if self.n_estimators < 1:
            raise ConfigError(f"n_estimators must be >= 1, got {self.n_estimators}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1 (or null for min(256, n)), got {self.max_samples}")
        if self.fit_tiles < 2:
            raise ConfigError(f"fit_tiles must be >= 2, got {self.fit_tiles}")

    @property
    def feature_layers(self) -> list[str]:
        """The layers whose pooled outputs are concatenated, in order."""
        from wsi_ad.features.backbones import LAYER_NAMES

        return list(self.layers) if self.layers is not None else list(LAYER_NAMES[self.backbone])
