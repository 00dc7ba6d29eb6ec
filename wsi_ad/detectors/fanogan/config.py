"""f-AnoGAN's config section (``fanogan:`` in a config YAML). The defaults are the paper's networks and optimisers
(Schlegl et al. 2019 and the authors' released code as ``shared/METHODS.md`` §8 describes it) on 64 px RGB tiles,
see ``configs/fanogan_paper.yaml``; ``configs/fanogan_cpu.yaml`` is a narrow version for 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass, field

from wsi_ad.config import ConfigError


@dataclass
class FAnoGANConfig:
    """Networks, schedule, losses and optimisers of f-AnoGAN.

    ``image_size`` px tiles (a power of two >= 8). Widths are listed per resolution: ``generator_channels`` from
    4 px up to ``image_size`` (the first is the width of the 4 x 4 map the linear input layer makes, each next one
    the output of one residual up block), ``critic_channels`` and ``encoder_channels`` from ``image_size`` down to
    4 px (the first is the width of the input convolution, each next one the output of one residual down block);
    the critic's features f(x) are its flattened 4 x 4 map (16 x ``critic_channels[-1]`` values). ``latent_dim``:
    size of z, drawn from the ``prior`` (``normal``: N(0, I); ``uniform``: U(-1, 1)).

    Schedule: phase ``gan`` of ``gan_iterations`` generator steps, each after ``n_critic`` critic steps on fresh
    batches (WGAN-GP, gradient penalty weight ``gradient_penalty``, Adam ``lr`` with ``betas`` for both networks),
    then phase ``encoder`` of ``encoder_iterations`` encoder steps with G and the critic frozen (the izi_f loss
    with feature weight ``kappa``, RMSProp ``encoder_lr`` with smoothing constant ``rmsprop_alpha``). Score: the
    izi_f residual of a tile with the same ``kappa``.
    """

    image_size: int = 64
    latent_dim: int = 128
    prior: str = "normal"
    generator_channels: list[int] = field(default_factory=lambda: [512, 512, 256, 128, 64])
    critic_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 512])
    encoder_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 512])
    gan_iterations: int = 50000
    encoder_iterations: int = 50000
    n_critic: int = 5
    gradient_penalty: float = 10.0
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    encoder_lr: float = 5e-5
    rmsprop_alpha: float = 0.9
    kappa: float = 1.0

    def __post_init__(self):
        for key in ("generator_channels", "critic_channels", "encoder_channels", "betas"):
            setattr(self, key, list(getattr(self, key)))

    @property
    def levels(self) -> int:
        """Resolutions from ``image_size`` down to 4 px (the widths each network lists)."""
        return (self.image_size // 4).bit_length()

    @property
    def iterations(self) -> int:
        """All training steps: ``gan_iterations + encoder_iterations``."""
        return self.gan_iterations + self.encoder_iterations

    def validate(self) -> None:
        """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid key."""
        size = self.image_size
        if size < 8 or size & (size - 1):
            raise ConfigError(f"image_size must be a power of two >= 8, got {size}")
        for key in ("generator_channels", "critic_channels", "encoder_channels"):
            widths = getattr(self, key)
            if len(widths) != self.levels or any(int(w) < 1 for w in widths):
                order = "4 px up to" if key == "generator_channels" else "down to 4 px from"
                raise ConfigError(f"{key} must list {self.levels} positive widths ({order} {size} px), got {widths}")
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.prior not in ("normal", "uniform"):
            raise ConfigError(f"prior must be normal or uniform, got {self.prior!r}")
        if self.gan_iterations < 1 or self.encoder_iterations < 1:
            raise ConfigError(f"gan_iterations and encoder_iterations must be >= 1, got {self.gan_iterations} and "
                              f"{self.encoder_iterations}")
        if self.n_critic < 1:
            raise ConfigError(f"n_critic must be >= 1, got {self.n_critic}")
        if self.gradient_penalty < 0 or self.kappa < 0:
            raise ConfigError("gradient_penalty and kappa must be >= 0")
        if self.lr <= 0 or self.encoder_lr <= 0:
            raise ConfigError("lr and encoder_lr must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 < self.rmsprop_alpha < 1:
            raise ConfigError(f"rmsprop_alpha must be in (0, 1), got {self.rmsprop_alpha}")
