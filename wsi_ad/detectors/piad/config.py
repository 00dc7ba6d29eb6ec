"""PIAD's config section (``piad:`` in a config YAML). The defaults are the official Camelyon16 setting
(ninatu/anomaly_detection, ``configs/piad/camelyon16/final/reproduce``), see
``configs/piad_camelyon16_paper.yaml``; the weakly-supervised ("with_cv") variant differs in the latent size,
the widths and the iterations (``shared/METHODS.md`` §4.1, §4.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from wsi_ad.config import ConfigError
from wsi_ad.features.perceptual import check_perceptual_settings, layers_by_size


@dataclass
class PIADConfig:
    """Networks, losses, gradient-norm balancing and optimisers of PIAD.

    Widths are listed from the input resolution down to 4 px (``encoder_channels``, ``critic_channels``: 64, 32,
    16, 8, 4 px for 64 px tiles) and from 4 px up (``generator_channels``); ``latent_dim`` is the size of the
    1 x 1 latent code, whose prior is N(0, I); ``latent_critic_channels`` the hidden widths of the latent critic.
    ``n_critic`` critic updates (each on a fresh batch) precede every encoder+generator update.
    Both critics use the WGAN-GP loss ``-wasserstein_weight * (E D(real) - E D(fake)) + gradient_penalty *
    E((|grad| - gp_target)^2 / gp_target^2) + norm_penalty * (E D(real)^2 + E D(fake)^2)``. The reconstruction
    loss is the relative perceptual L1 of the DPA (``backbone``, ``layers``, ``feature_stats``, ``stats_tiles``
    as in the ``dpa`` section); its weight against each adversarial term is re-balanced every
    ``grad_norm_every`` generator steps from the last ``grad_norm_history`` gradient norms, smoothed with an
    exponential moving average of weight ``grad_norm_alpha``. ``loss_limit``: any loss beyond it stops training
    as diverged (the official code's 10^6). Adam: ``lr`` for encoder+generator, ``critic_lr`` for both critics,
    ``betas`` for all three.
    """

    image_size: int = 64
    latent_dim: int = 256
    encoder_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 256])
    generator_channels: list[int] = field(default_factory=lambda: [256, 256, 128, 64, 32])
    critic_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128, 128])
    latent_critic_channels: list[int] = field(default_factory=lambda: [1024, 1024])
    backbone: str = "vgg19"
    layers: dict[int, str] | None = None
    feature_stats: str = "imagenet"
    stats_tiles: int = 4096
    iterations: int = 100000
    n_critic: int = 2
    lr: float = 2e-4
    critic_lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.99])
    wasserstein_weight: float = 1.0
    gradient_penalty: float = 10.0
    gp_target: float = 1.0
    norm_penalty: float = 0.001
    grad_norm_every: int = 100
    grad_norm_history: int = 200
    grad_norm_alpha: float = 0.05
    loss_limit: float = 1e6
    backbone_weights: str | None = None
    download_weights: bool = False

    def __post_init__(self):
        self.layers = layers_by_size(self.layers)  # YAML/JSON may give "64": int sizes
        for key in ("encoder_channels", "generator_channels", "critic_channels", "latent_critic_channels", "betas"):
            setattr(self, key, list(getattr(self, key)))

    @property
    def levels(self) -> int:
        """Resolutions from ``image_size`` down to 4 px (the widths each network lists)."""
        return (self.image_size // 4).bit_length()

    def validate(self) -> None:
        """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid key."""
        size = self.image_size
        if size < 8 or size & (size - 1):
            raise ConfigError(f"image_size must be a power of two >= 8, got {size}")
        for key in ("encoder_channels", "generator_channels", "critic_channels"):
            widths = getattr(self, key)
            if len(widths) != self.levels or any(int(w) < 1 for w in widths):
                raise ConfigError(f"{key} must list {self.levels} positive widths (at {size} px down to 4 px), "
                                  f"got {widths}")
        if self.latent_dim < 1 or not self.latent_critic_channels or any(w < 1 for w in self.latent_critic_channels):
            raise ConfigError("latent_dim and latent_critic_channels must be positive")
        check_perceptual_settings(self.backbone, self.layers, self.feature_stats)
        if self.iterations < 0 or self.n_critic < 0 or self.stats_tiles < 1:
            raise ConfigError("iterations and n_critic must be >= 0, stats_tiles >= 1")
        if self.lr <= 0 or self.critic_lr <= 0:
            raise ConfigError("lr and critic_lr must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.gp_target <= 0 or self.gradient_penalty < 0 or self.norm_penalty < 0 or self.wasserstein_weight <= 0:
            raise ConfigError("gp_target and wasserstein_weight must be positive, the penalties >= 0")
        if self.grad_norm_every < 1 or self.grad_norm_history < 1 or not 0 < self.grad_norm_alpha <= 1:
            raise ConfigError("grad_norm_every and grad_norm_history must be >= 1, grad_norm_alpha in (0, 1]")
        if self.loss_limit <= 0:
            raise ConfigError(f"loss_limit must be positive, got {self.loss_limit}")
