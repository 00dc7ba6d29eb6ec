"""IGD's config section (``igd:`` in a config YAML). The defaults are the official global/local setting
(tianyu0207/IGD at commit 1ce9952, ``p256/`` and ``p32/``; ``shared/METHODS.md`` §7.2) adapted to 64 px tiles,
see ``configs/igd_paper.yaml``; ``configs/igd_cpu.yaml`` is a narrow version for 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass, field

from wsi_ad.config import ConfigError

#: The MS-SSIM scale weights of Wang et al. (2003), as the official code's 5-scale global loss uses them; a loss
#: on fewer scales uses the first ones renormalised (the official 4-scale local weights 0.0516, 0.3295, 0.3463,
#: 0.2726 are the first four of these over their sum).
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass
class IGDConfig:
    """Encoders, decoders, critics, the Gaussian descriptor, the losses and the optimisation of IGD.

    Two models are trained side by side on the same batches: the global one on whole tiles (``image_size`` px) and,
    when ``local`` is true, the local one on every ``local_patch_px`` patch of a tile at stride ``local_stride_px``.
    Each encoder is the frozen ImageNet ``backbone``'s pooled embedding (``efficientnet_lite0``, shipped offline;
    ``resnet18`` from the torch hub cache or ``backbone_weights``) followed by a trainable linear map to
    ``latent_dim``; the backbone instance is shared by both models.

    Widths: ``decoder_channels`` at 4, 8, ..., ``image_size / 2`` px (global: linear to 4 px, nearest x2 + conv3x3,
    residual up blocks, then batch norm, ReLU, nearest x2 + conv5x5 to RGB); ``local_decoder_channels`` at 4, 8,
    ..., ``local_patch_px`` px (linear to 4 px, residual up blocks, batch norm, ReLU, conv3x3 to RGB);
    ``critic_channels`` at ``image_size / 2``, ..., 8, 4 px (conv5x5 stride 2, residual down blocks with layer norm,
    conv3x3 stride 2, linear to one value); ``local_critic_channels`` at ``local_patch_px``, ..., 4 px (conv3x3,
    residual down blocks, linear, sigmoid).

    Losses: reconstruction ``msssim_weight * (1 - MS-SSIM) + (1 - msssim_weight) * mean|x - x̂| / 2`` (tiles in
    [-1, 1], data range 2) on ``msssim_scales`` (global) / ``local_msssim_scales`` (local) scales with a Gaussian
    window of standard deviation ``msssim_sigma`` px (3 px wide at 0.375); Gaussian anomaly classifier
    ``1 - exp(-|z - c|^2 / sigma2)``; interpolation term ``inter_weight * E critic(decode(a z + (1 - a) z'))^2``
    with a ~ U(0, ``alpha_max``) and z' the batch reversed. The critic regresses a on the interpolations and 0 on
    ``x̂ + critic_gamma (x - x̂)``. E-step: centre and spread re-estimated from ``estep_tiles`` training tiles every
    ``estep_every`` iterations (and before the first), centre coordinates closer to 0 than ``center_eps`` pushed to
    ±``center_eps``, each batch's mean squared distance floored at ``sigma2_floor``.

    Optimisation: Adam (``lr``, ``betas``) for each model's linear map + decoder (weight decay ``weight_decay``) and
    for its critic (no weight decay), the learning rate decayed polynomially (power ``lr_decay_power``) to 0 over
    ``iterations``.

    Score: ``score_local_weight * max_patches(local_rec_weight * rec + (1 - local_rec_weight) * gac) +
    (1 - score_local_weight) * (global_rec_weight * rec + (1 - global_rec_weight) * gac)``; without the local model,
    the global term alone.
    """

    image_size: int = 64
    latent_dim: int = 128
    backbone: str = "resnet18"
    decoder_channels: list[int] = field(default_factory=lambda: [512, 256, 128, 64])
    critic_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    local: bool = True
    local_patch_px: int = 32
    local_stride_px: int = 16
    local_decoder_channels: list[int] = field(default_factory=lambda: [512, 256, 128, 64])
    local_critic_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    msssim_weight: float = 0.85
    msssim_scales: int = 5
    local_msssim_scales: int = 4
    msssim_sigma: float = 0.375
    inter_weight: float = 0.1
    alpha_max: float = 0.5
    critic_gamma: float = 0.2
    estep_every: int = 4757
    estep_tiles: int = 8192
    center_eps: float = 0.1
    sigma2_floor: float = 1.0
    iterations: int = 121792
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    weight_decay: float = 1e-6
    lr_decay_power: float = 0.9
    score_local_weight: float = 0.5
    local_rec_weight: float = 0.9
    global_rec_weight: float = 0.1
    backbone_weights: str | None = None
    download_weights: bool = False

    def __post_init__(self):
        for key in ("decoder_channels", "critic_channels", "local_decoder_channels", "local_critic_channels", "betas"):
            setattr(self, key, list(getattr(self, key)))

    @staticmethod
    def _levels(size: int) -> int:
        """Resolutions 4, 8, ..., ``size`` px."""
        return (size // 4).bit_length()

    def validate(self) -> None:
        """Raise :class:`~wsi_ad.config.ConfigError` naming the first invalid key."""
        from wsi_ad.features.backbones import list_backbones

        size, patch, stride = self.image_size, self.local_patch_px, self.local_stride_px
        for key, value, least in (("image_size", size, 32), ("local_patch_px", patch, 32)):
            if value < least or value & (value - 1):
                raise ConfigError(f"{key} must be a power of two >= {least} (the backbones downsample 32x), got {value}")
        widths = {"decoder_channels": self._levels(size) - 1, "critic_channels": self._levels(size) - 1,
                  "local_decoder_channels": self._levels(patch), "local_critic_channels": self._levels(patch)}
        for key, count in widths.items():
            values = getattr(self, key)
            if len(values) != count or any(int(w) < 1 for w in values):
                at = "image_size" if key in ("decoder_channels", "critic_channels") else "local_patch_px"
                raise ConfigError(f"{key} must list {count} positive widths (for {at} {getattr(self, at)}), got {values}")
        if self.local and (patch > size or stride < 1 or (size - patch) % stride or patch % stride):
            raise ConfigError(f"local patches of {patch} px at stride {stride} px must tile the {size} px tile evenly "
                              "(patch <= tile, both multiples of the stride)")
        if self.backbone not in list_backbones():
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(list_backbones())}")
        if self.latent_dim < 1 or self.iterations < 0 or self.estep_every < 1 or self.estep_tiles < 1:
            raise ConfigError("latent_dim, estep_every and estep_tiles must be >= 1, iterations >= 0")
        if not 0 <= self.msssim_weight <= 1:
            raise ConfigError(f"msssim_weight must be in [0, 1], got {self.msssim_weight}")
        for key in ("msssim_scales", "local_msssim_scales"):
            if not 1 <= getattr(self, key) <= len(MSSSIM_WEIGHTS):
                raise ConfigError(f"{key} must be 1 to {len(MSSSIM_WEIGHTS)}, got {getattr(self, key)}")
        if self.msssim_sigma <= 0:
            raise ConfigError(f"msssim_sigma must be positive, got {self.msssim_sigma}")
        for key, px in (("msssim_scales", size), ("local_msssim_scales", patch if self.local else None)):
            problem = px is not None and msssim_misfit(px, getattr(self, key), self.msssim_sigma)
            if problem:
                raise ConfigError(f"{key}: {problem}")
        if not 0 < self.alpha_max <= 1 or not 0 <= self.critic_gamma <= 1 or self.inter_weight < 0:
            raise ConfigError("alpha_max must be in (0, 1], critic_gamma in [0, 1], inter_weight >= 0")
        if self.center_eps < 0 or self.sigma2_floor <= 0:
            raise ConfigError("center_eps must be >= 0 and sigma2_floor positive")
        if self.lr <= 0 or self.weight_decay < 0 or self.lr_decay_power < 0:
            raise ConfigError("lr must be positive, weight_decay and lr_decay_power >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for key in ("score_local_weight", "local_rec_weight", "global_rec_weight"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")


def msssim_window(sigma: float) -> int:
    """Side in px of the Gaussian window of standard deviation ``sigma`` px that torchmetrics' MS-SSIM uses
    (``2 * int(3.5 * sigma + 0.5) + 1``: 3 px at 0.375, 11 px at 1.5)."""
    return 2 * int(3.5 * sigma + 0.5) + 1


def msssim_misfit(px: int, scales: int, sigma: float) -> str | None:
    """Why an MS-SSIM of ``scales`` scales with a window of ``sigma`` px cannot run on ``px`` px images, or None:
    the coarsest scale must hold the window, and torchmetrics' own checks (side >= 2^scales, side //
    max(1, (scales - 1)^2) > window - 1) must pass."""
    window = msssim_window(sigma)
    coarsest = px >> (scales - 1)
    if coarsest < window or px < 2 ** scales or px // max(1, (scales - 1) ** 2) <= window - 1:
        return (f"{scales} scales of {px} px images leave {coarsest} px at the coarsest, too small for the {window} px "
                f"window of sigma {sigma:g} px (torchmetrics needs side // {max(1, (scales - 1) ** 2)} > {window - 1}): "
                "use fewer scales or a smaller sigma")
    return None
