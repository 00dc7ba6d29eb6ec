"""Optical-density maths shared by the stain fit and the stain transform: a leaf module, numpy only.

:mod:`wsi_ad.stain` (fit, numpy reference and torch transform) and :mod:`wsi_ad.stain_kernel` (the compiled
CPU transform) both need the same OD conversion and the same Gram inverse of a stain matrix, computed
bit for bit alike. They live here, in a module that imports nothing from the package, so that both import
it at top level and neither imports the other for them (no import cycle; as tiatoolbox keeps ``rgb2od``
in ``tiatoolbox.utils.transforms`` for its stain extractors and normalizers).

Model (Beer-Lambert): a pixel's optical density is ``od = -ln(I / 255)`` per channel (R, G, B), with
``I`` clamped to >= 1 so that black has a finite OD (``ln 255`` ≈ 5.54).
"""

from __future__ import annotations

import numpy as np


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``-ln(max(I, 1) / 255)`` of uint8 RGB, float32, same shape (OD units, >= 0)."""
    rgb = np.asarray(rgb)
    lut = -np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)
    return lut.astype(np.float32)[rgb]


def gram_inverse(stain_matrix: np.ndarray) -> np.ndarray:
    """``inv(S @ S.T)`` of a (2, 3) stain matrix ``S`` (rows: stain OD vectors), (2, 2) float64.

    ``S`` is converted to float64 first. With both stains active the concentrations of OD ``od`` (..., 3)
    are ``(od @ S.T - λ) @ gram_inverse(S)`` (OD units along each stain vector).
    """
    s = np.asarray(stain_matrix, dtype=np.float64)
    return np.linalg.inv(s @ s.T)
