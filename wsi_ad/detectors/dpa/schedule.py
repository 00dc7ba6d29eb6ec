"""The DPA's progressive-growing schedule (stab16 -> trns32 -> stab32 -> trns64 -> stab64) and one phase's loss.

Phases (called "stages" in the paper and its code; here "phase", because a *stage* is a step of the slide
pipeline): in a transition phase ``trnsS`` the new size-S blocks fade in linearly, ``alpha`` rising from
1/N to 1 over the phase's N iterations (incremented before each step, as the official code); in a
stabilization phase ``stabS`` alpha is 1. Input images are faded the same way as the network
(``alpha * down(x, S) + (1 - alpha) * nearest_up(down(x, S/2))``) and the loss depth grows in step:
``L = alpha * L_S(x, x̃) + (1 - alpha) * L_{S/2}(down(x), down(x̃))``. ``down`` is bilinear resizing without
anti-aliasing (``F.interpolate(..., mode="bilinear", align_corners=False)``), as in the official code
(ninatu/anomaly_detection); for a factor of 2 it equals 2 x 2 average pooling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Phase:
    """One phase of the schedule: ``kind`` "stab" or "trns", ``size`` px, ``iterations``."""

    kind: str
    size: int
    iterations: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.size}"

    def alpha(self, step: int) -> float:
        """Fade-in weight at the phase's ``step`` (0-based): (step + 1) / iterations in a transition, 1 otherwise."""
        if self.kind == "stab":
            return 1.0
        return min((step + 1) / max(self.iterations, 1), 1.0)


def progressive_phases(iterations: dict[str, int], start_size: int, image_size: int) -> list[Phase]:
    """stab{start}, then trns/stab for each doubling up to ``image_size``; iterations looked up by phase name.

    Raises ValueError when ``iterations`` lacks a phase of the schedule or names one outside it."""
    phases = [Phase("stab", start_size, 0)]
    size = start_size * 2
    while size <= image_size:
        phases += [Phase("trns", size, 0), Phase("stab", size, 0)]
        size *= 2
    missing = [p.name for p in phases if p.name not in iterations]
    if missing:
        raise ValueError(f"iterations lacks phase(s) {missing} (phases: {[p.name for p in phases]})")
    extra = set(iterations) - {p.name for p in phases}
    if extra:
        raise ValueError(f"iterations names phase(s) {sorted(extra)} not in the schedule {[p.name for p in phases]}")
    return [Phase(p.kind, p.size, int(iterations[p.name])) for p in phases]


def flat_phases(iterations: int, image_size: int) -> list[Phase]:
    """The non-progressive schedule: one stabilization phase at full size."""
    return [Phase("stab", image_size, int(iterations))]


def loss_sizes(phases: list[Phase]) -> tuple[int, ...]:
    """Input sizes (px) at which the perceptual loss is evaluated over a schedule (feature stats needed)."""
    sizes = {p.size for p in phases}
    sizes |= {p.size // 2 for p in phases if p.kind == "trns"}
    return tuple(sorted(sizes))


def resize_batch(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(B, 3, S, S) -> (B, 3, size, size): ``bilinear`` (the official code: ``F.interpolate``, align_corners
    False, no anti-aliasing) or ``area`` (average pooling; the ``shallow`` net's setting)."""
    factor = x.shape[-1] // size
    if factor == 1:
        return x
    if mode == "area":
        return F.avg_pool2d(x, factor)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def fade(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * x + (1 - alpha) * upsample(down(x))``: the image seen at a transition's alpha (down by 2:
    bilinear and average pooling agree)."""
    if alpha >= 1:
        return x
    return alpha * x + (1 - alpha) * F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")


def phase_loss(model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, size: int,
               alpha: float = 1.0, resize: str = "bilinear") -> torch.Tensor:
    """Per-sample loss (B,) float32 of ``model`` at ``size`` px and fade ``alpha``.

    ``x``: (B, 3, S, S) in [-1, 1] with S >= size (resized to ``size`` first, see :func:`resize_batch`);
    ``loss(x, x̃)`` -> (B,).
    """
    x = fade(resize_batch(x, size, resize), alpha)
    recon = model(x, size, alpha)
    new = loss(x, recon)
    if alpha >= 1:
        return new
    prev = loss(F.avg_pool2d(x, 2), F.avg_pool2d(recon, 2))
    return alpha * new + (1 - alpha) * prev
