"""PIAD's adversarial losses and its gradient-norm loss weights (``shared/METHODS.md`` §2.5, §4.3).

WGAN-GP with an output-magnitude penalty, for both critics (official code ``dpa/adv_losses.py``
``WassersteinLoss`` and ``dpa/losses.py``)::

    critic loss    = -λ (E D(real) - E D(fake)) + g E[(|∇_x̂ D(x̂)|₂ - γ)² / γ²] + ν (E D(real)² + E D(fake)²)
    generator term = -E D(fake)

with x̂ = u real + (1 - u) fake, u ~ U(0, 1) per sample, and λ = 1, g = 10, γ = 1, ν = 0.001 on Camelyon16.

The reconstruction weights (official ``piad/utils.py`` ``GradientNormHelper``): every ``every`` generator steps
the Frobenius norm of the gradient of each loss alone is recorded for every convolution weight of a network
(the encoder with its latent adversarial term and the reconstruction, the generator with its image adversarial
term and the reconstruction); per layer and loss the last ``history`` norms are smoothed by an exponentially
weighted moving average (:func:`ewma`), the adversarial/reconstruction ratio is taken element-wise, and the
network's reconstruction weight is the median of those ratios pooled over its layers and over time: after
scaling, the reconstruction gradient has about the norm of the adversarial one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, generator: torch.Generator | None,
                wasserstein_weight: float = 1.0, gradient_penalty: float = 10.0, gp_target: float = 1.0,
                norm_penalty: float = 0.001) -> tuple[torch.Tensor, dict[str, float]]:
    """The WGAN-GP critic loss of the module docstring on (B, ...) ``real`` and ``fake`` (both detached here);
    ``generator`` draws the interpolation weights u. Returns (scalar loss, {"wasserstein", "gp", "norm"})."""
    real, fake = real.detach(), fake.detach()
    d_real, d_fake = critic(real), critic(fake)
    wasserstein = -wasserstein_weight * (d_real.mean() - d_fake.mean())
    norm = norm_penalty * ((d_real ** 2).mean() + (d_fake ** 2).mean())
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    u = torch.rand(shape, generator=generator, device=real.device, dtype=real.dtype)
    mixed = (u * real + (1 - u) * fake).requires_grad_(True)
    out = critic(mixed)
    (grad,) = torch.autograd.grad(out, mixed, grad_outputs=torch.ones_like(out), create_graph=True)
    gp = gradient_penalty * (((grad.flatten(1).norm(2, dim=1) - gp_target) ** 2) / gp_target ** 2).mean()
    total = wasserstein + gp + norm
    return total, {"wasserstein": float(wasserstein.detach()), "gp": float(gp.detach()), "norm": float(norm.detach())}


def generator_adversarial(critic: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """-E D(fake): the adversarial term of the encoder (latent critic) or the generator (image critic)."""
    return -critic(fake).mean()


def ewma(values: Iterable[float], alpha: float) -> np.ndarray:
    """Exponentially weighted moving average started at the first value: y₀ = x₀, yᵢ = (1 - α) yᵢ₋₁ + α xᵢ
    (the official ``ewma_vectorized`` with its default offset; pandas' ``ewm(alpha, adjust=False)``)."""
    x = np.asarray(list(values), dtype=np.float64)
    out = np.empty_like(x)
    for i, value in enumerate(x):
        out[i] = value if i == 0 else (1.0 - alpha) * out[i - 1] + alpha * value
    return out


def weight_gradient_norms(loss: torch.Tensor, module: nn.Module) -> dict[str, float]:
    """{parameter name: Frobenius norm of d loss / d parameter} for every parameter of ``module`` whose name ends
    in ``weight`` and that ``loss`` reaches (biases are left out, as in the official code); the graph is kept."""
    named = [(n, p) for n, p in module.named_parameters() if n.endswith("weight") and p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: float(g.detach().norm()) for (n, _), g in zip(named, grads, strict=True) if g is not None}


class GradientNormBalancer:
    """The reconstruction weight of each network from its recorded gradient norms (module docstring).

    ``record(network, loss, norms)`` appends one measurement (``norms``: {layer: norm}); ``weight(network,
    base="adv", other="rec")`` is the median over layers and time of EWMA(‖∇ base‖) / EWMA(‖∇ other‖), using the
    last ``history`` measurements of each layer (1.0 before any). ``state_dict`` / ``load_state_dict`` carry the
    history across a resumed run."""

    def __init__(self, history: int = 200, alpha: float = 0.05):
        self.history = int(history)
        self.alpha = float(alpha)
        self.norms: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(dict))

    def record(self, network: str, loss: str, norms: dict[str, float]) -> None:
        layers = self.norms[network][loss]
        for layer, value in norms.items():
            layers[layer] = (layers.get(layer, []) + [float(value)])[-self.history:]

    def weight(self, network: str, base: str = "adv", other: str = "rec") -> float:
        by_loss = self.norms.get(network, {})
        ratios: list[float] = []
        for layer, base_values in by_loss.get(base, {}).items():
            other_values = by_loss.get(other, {}).get(layer)
            if not other_values or len(other_values) != len(base_values):
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = ewma(base_values, self.alpha) / ewma(other_values, self.alpha)
            ratios.extend(ratio[-self.history:][np.isfinite(ratio[-self.history:])].tolist())
        return float(np.median(ratios)) if ratios else 1.0

    def state_dict(self) -> dict:
        return {"history": self.history, "alpha": self.alpha,
                "norms": {n: {loss: {k: list(v) for k, v in layers.items()} for loss, layers in by_loss.items()}
                          for n, by_loss in self.norms.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.alpha = int(state["history"]), float(state["alpha"])
        self.norms = defaultdict(lambda: defaultdict(dict))
        for network, by_loss in state["norms"].items():
            for loss, layers in by_loss.items():
                self.norms[network][loss] = {k: [float(x) for x in v] for k, v in layers.items()}
