"""Deep GEO's config section (``deep_geo:`` in a config YAML): a Wide ResNet that classifies which of 72 geometric
transformations a normal tile went through, and a Dirichlet normality score (``shared/METHODS.md`` §6). The defaults
are the official Camelyon16 setting (``configs/deep_geo_paper.yaml``); ``configs/deep_geo_cpu.yaml`` is a narrow
network for 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_ad.config import ConfigError

#: Score variants: the official Dirichlet normality, or the log-probability of the correct transformation.
SCORES = ("dirichlet", "log_probability")


@dataclass
class DeepGEOConfig:
    """Transformations, classifier, optimisation and score of Deep GEO.

    ``image_size`` px tiles, resized (bilinear, antialiased) to ``input_px`` px first when that is set (null: used as
    they are, the official setting); transformations of the ``input_px`` (else ``image_size``) px images: {no flip,
    horizontal flip} x shifts {0, -t, +t}^2 x quarter turns, t = ``shift_px`` px of that size
    (:mod:`~wsi_ad.detectors.deep_geo.transforms`). Classifier: WRN-``depth``-``widen``
    (:class:`~wsi_ad.detectors.deep_geo.networks.WideResNet`, dropout ``dropout``). Training: ``iterations`` steps of
    cross-entropy on batches of ``train.batch_size`` tiles, each under a random transformation; Adam ``lr`` (Keras'
    defaults: betas 0.9, 0.999, epsilon 1e-7) with the Keras L2 penalty ``l2`` x Σ w² on every weight (the loss
    gradient gains 2 ``l2`` w). ``score``: ``dirichlet`` (a Dirichlet fitted per transformation to the softmax outputs
    of ``dirichlet_tiles`` training tiles, after the last step) or ``log_probability`` (the mean log-probability of
    the right transformation; no fit).
    """

    image_size: int = 64
    input_px: int | None = None
    shift_px: int = 16
    depth: int = 16
    widen: int = 8
    dropout: float = 0.0
    iterations: int = 12846
    lr: float = 1e-3
    l2: float = 2.5e-4
    score: str = "dirichlet"
    dirichlet_tiles: int = 8192

    def validate(self) -> None:
        """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid key."""
        for key in ("image_size", "input_px"):
            value = getattr(self, key)
            if value is not None and (value < 32 or value % 32):
                raise ConfigError(f"{key} must be a multiple of 32 (two stride-2 groups, then 8 px pooling), got {value}")
        if not 0 <= self.shift_px < self.network_px:
            raise ConfigError(f"shift_px must be in [0, {self.network_px}) (the classifier's input px), got {self.shift_px}")
        if self.shift_px == 0:
            raise ConfigError("shift_px must be positive: without shifts the 72 transformations are not distinct")
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ConfigError(f"depth must be 6 n + 4 with n >= 1 (10, 16, 22, ...), got {self.depth}")
        if self.widen < 1:
            raise ConfigError(f"widen must be >= 1, got {self.widen}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1 (the Dirichlet fit runs after the last), got {self.iterations}")
        if self.lr <= 0 or self.l2 < 0:
            raise ConfigError("lr must be positive and l2 >= 0")
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.dirichlet_tiles < 2:
            raise ConfigError(f"dirichlet_tiles must be >= 2, got {self.dirichlet_tiles}")

    @property
    def network_px(self) -> int:
        """Side in px of the images the transformations and the classifier see."""
        return self.image_size if self.input_px is None else self.input_px
