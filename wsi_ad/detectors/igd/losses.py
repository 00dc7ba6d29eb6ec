"""IGD's losses and its E-step: MS-SSIM + MAE reconstruction, the Gaussian anomaly classifier, and the centre and
spread estimates (Chen et al. AAAI 2022; official code tianyu0207/IGD, ``shared/METHODS.md`` §7.1-7.2).

Tensors: images (B, 3, H, W) float in [-1, 1] (the tiles' range; MS-SSIM maps them to [0, 1]); codes (N, D) float;
every per-sample loss (B,) float.
"""

from __future__ import annotations

import torch

from wsi_ad.detectors.igd.config import MSSSIM_WEIGHTS, msssim_window

#: Pixel values span [-1, 1].
DATA_RANGE = 2.0


def msssim_weights(scales: int) -> tuple[float, ...]:
    """MS-SSIM scale weights: the 5 published ones as they are (they sum to 1.0001, as the official global loss uses
    them), or the first ``scales`` over their sum (4: the official local model's)."""
    if scales == len(MSSSIM_WEIGHTS):
        return MSSSIM_WEIGHTS
    head = MSSSIM_WEIGHTS[:scales]
    return tuple(w / sum(head) for w in head)


def msssim(x: torch.Tensor, y: torch.Tensor, scales: int, sigma: float) -> torch.Tensor:
    """Per-image MS-SSIM (B,) of two (B, 3, H, W) batches in [-1, 1], over ``scales`` scales with a Gaussian window
    of ``sigma`` px (torchmetrics' ``multiscale_structural_similarity_index_measure``, K = (0.01, 0.03), negative
    similarities clipped to 0 as pytorch-msssim does). Computed on the images mapped to [0, 1] (data range 1):
    SSIM's luminance term ``(2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)`` assumes non-negative intensities and
    collapses towards 0 for any brightness change of a region whose signed mean is near 0 (measured: shifting a
    uniform-noise tile by +0.2 of [-1, 1] gives 1 - MS-SSIM = 1.00 on [-1, 1], 0.003 on [0, 1]). Differentiable."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    window = msssim_window(sigma)
    with torch.autocast(x.device.type, enabled=False):      # E[x^2] - mu^2 cancels catastrophically in bf16
        return multiscale_structural_similarity_index_measure(
            (x.float() + 1) / 2, (y.float() + 1) / 2, gaussian_kernel=True, sigma=sigma, kernel_size=window,
            reduction="none", data_range=1.0, betas=msssim_weights(scales), normalize="relu")


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, scales: int, sigma: float,
                        msssim_weight: float = 0.85) -> torch.Tensor:
    """ℓ_r per image (B,) float32: ``msssim_weight * (1 - MS-SSIM) + (1 - msssim_weight) * mean|x - x̂| / 2`` (the
    paper's ρ = 0.15 is the MAE weight; the official code divides the MAE by the data range). Computed in fp32
    under any autocast."""
    mae = (x.float() - recon.float()).abs().flatten(1).mean(dim=1) / DATA_RANGE
    return msssim_weight * (1.0 - msssim(recon, x, scales, sigma)) + (1.0 - msssim_weight) * mae


def gac_loss(codes: torch.Tensor, center: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """ℓ_h of the Gaussian anomaly classifier per code (N,): ``1 - exp(-|z - c|^2 / sigma2)`` (``sigma2`` is the
    spread estimate, a mean squared distance: the official code divides by it without squaring)."""
    return 1.0 - torch.exp(-((codes.float() - center.float()) ** 2).sum(dim=1) / sigma2)


def estimate_center(codes: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """The E-step centre (D,): the mean code, with coordinates in (-eps, 0) set to -eps and in (0, eps) to +eps
    (Deep SVDD's guard against a trivially matched zero unit; exact zeros stay 0, as in the official code)."""
    center = codes.double().mean(dim=0)
    small = center.abs() < eps
    center[small & (center < 0)] = -eps
    center[small & (center > 0)] = eps
    return center.to(codes.dtype)


def estimate_sigma2(codes: torch.Tensor, center: torch.Tensor, batch: int, floor: float = 1.0) -> torch.Tensor:
    """The E-step spread (scalar): the mean over consecutive batches of ``batch`` codes of each batch's mean
    squared distance to ``center``, every batch value floored at ``floor`` (as the official code, which averages
    over its data loader's batches)."""
    values = []
    for part in codes.split(int(batch)):
        d = ((part.double() - center.double()) ** 2).sum(dim=1).mean()
        values.append(torch.clamp(d, min=floor))
    return torch.stack(values).mean().to(codes.dtype)
