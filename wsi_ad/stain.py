"""H&E stain normalization: Vahadane's stain matrix fitted once per slide, applied by a batched closed form.

Model (Beer-Lambert). A pixel's optical density (OD) is ``od = -ln(I / 255)`` per channel (R, G, B); the
stained tissue has ``od ≈ c @ S`` with ``S`` the (2, 3) *stain matrix* (unit OD row vectors, haematoxylin
then eosin) and ``c >= 0`` the two stain concentrations (OD units along each stain vector).

Fit (:func:`fit_stain`, :func:`fit_slide_stain`). Vahadane et al. (IEEE TMI 2016): sparse non-negative
matrix factorization of the tissue pixels' OD, i.e. dictionary learning with a non-negative dictionary and
non-negative, L1-penalized codes (λ = ``StainParams.lambda_`` = 0.1, as StainTools and the paper's
preprocessing), solved with scikit-learn's ``MiniBatchDictionaryLearning``. A slide is fitted once, on
tissue pixels sampled over the *whole* slide at ``StainParams.sample_mpp`` µm/px (not on one tile), with a
fixed seed. The two atoms are ordered H then E (H has the larger red OD, as in StainTools). A fit that is
degenerate (the two stains nearly parallel, an unused atom, eosin not absorbing mostly green, haematoxylin
not absorbing red) is rejected and Macenko's method is tried on the same pixels; when that fails too, or
there are too few tissue pixels, or the image is not brightfield (fluorescence: dark background), the fit
is ``"identity"`` and :class:`StainNormalizer` passes images through unchanged. Every fallback is
recorded in ``StainFit.warnings`` and logged. Max concentrations are the 99th percentile of each stain's
concentration over the tissue pixels (StainTools' robust maximum).

Transform (:class:`StainNormalizer`). Concentrations are the *exact* solution of StainTools' per-pixel
problem ``min_c 0.5 ||od - c @ S||² + λc·sum(c), c >= 0`` (λc = ``StainParams.concentration_lambda`` =
0.01, as StainTools' ``get_concentrations``): with two stains the solution has a closed form (both stains
active: a 2x2 linear solve; otherwise the better single stain, ``max(0, od·s - λc)``), so the transform is
a few multiply-adds per pixel instead of a per-pixel lasso. The concentrations are scaled by
``max_target / max_source`` and re-rendered with the target matrix. A pure white pixel (OD 0) gets zero
concentrations and stays white. On the CPU the per-pixel arithmetic is one compiled loop
(:mod:`wsi_ad.stain_kernel`); on a GPU it is the same arithmetic in torch, in chunks of
``chunk_pixels`` pixels so memory stays bounded on large (H, W, 3) regions.

Resolution: the maxima of concentrations depend on resolution (coarse pixels blend nuclei and stroma), so
the source and the target are fitted at the same µm/px: slides at ``sample_mpp`` (the default target too),
image files (tiles without a physical scale) at their own resolution.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import warnings as _warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ad.errors import WsiAdError
from wsi_ad.optical_density import gram_inverse, rgb_to_od

log = logging.getLogger(__name__)

METHODS = ("vahadane", "macenko", "identity")

#: File name extensions read as plain images (not slides) by :func:`fit_target` when no region is given.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class StainError(WsiAdError):
    """Bad input to the stain module (wrong array shape or dtype, unreadable target image)."""


# --------------------------------------------------------------------------------------------------
# Parameters and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StainParams:
    """Settings of the stain fit and transform (hashed into the stage's config).

    Attributes:
        lambda_: L1 penalty of the dictionary learning codes (Vahadane; 0.1 as StainTools / the paper).
        concentration_lambda: L1 penalty of the per-pixel concentrations (0.01 as StainTools).
        n_pixels: tissue pixels sampled for a fit (at most).
        sample_mpp: µm/px at which a slide's tissue pixels are sampled (:func:`fit_slide_stain`) and at
            which a slide target is read (:func:`fit_target`).
        seed: seed of the pixel sampling and of the dictionary learning (same seed, same matrix).
        luminosity_threshold: a pixel is tissue when its CIELAB L* / 100 is below this (StainTools: 0.8).
        min_od: pixels whose summed OD is below this are glass, whatever their luminosity.
        max_od: pixels with any channel's OD above this (RGB below ~21) are ink, label, black background
            or fluorescence, not H&E, and are left out of fits.
        min_pixels: fewer tissue pixels than this and no fit is tried (identity).
        max_cosine: the fit is degenerate when the cosine between the H and E vectors exceeds this.
        min_h_red: the H vector's red OD component must be at least this (haematoxylin absorbs red).
        percentile: percentile of concentrations taken as each stain's maximum (99, StainTools).
        macenko_alpha: Macenko's angular percentile (1 → the 1st and 99th percentile angles).
        dl_solver: ``"exact"`` (batch alternating minimization with closed-form codes) or ``"sklearn"``
            (``MiniBatchDictionaryLearning``; slower, kept for comparison).
        dl_pixels: the dictionary learning runs on at most this many of the sampled pixels (seeded).
        dl_max_iter, dl_tol: most alternating iterations (epochs for sklearn) and the stopping tolerance
            on the change of the dictionary.
        dl_batch_size: mini-batch size of the sklearn solver.
        dark_background: an image whose median brightness (0-255) is below this is not brightfield.
        sample_windows, sample_window_px: a slide with more tissue than this many windows of this size (px
            at ``sample_mpp``) is sampled through that many windows centred on random tissue (seeded), so a
            fit reads ~1 Mpx whatever the slide's size (reading all its tissue took 6 s on a 50k slide);
            smaller slides are read whole.
    """

    lambda_: float = 0.1
    concentration_lambda: float = 0.01
    n_pixels: int = 100_000
    sample_mpp: float = 2.0
    seed: int = 0
    luminosity_threshold: float = 0.8
    min_od: float = 0.15
    max_od: float = 2.5
    min_pixels: int = 500
    max_cosine: float = 0.97
    min_h_red: float = 0.3
    percentile: float = 99.0
    macenko_alpha: float = 1.0
    dl_solver: str = "exact"
    dl_pixels: int = 20_000
    dl_max_iter: int = 100
    dl_tol: float = 1e-5
    dl_batch_size: int = 256
    dark_background: float = 60.0
    sample_windows: int = 64
    sample_window_px: int = 128

    def __post_init__(self) -> None:
        if self.lambda_ <= 0 or self.concentration_lambda < 0:
            raise ValueError("lambda_ must be > 0 and concentration_lambda >= 0")
        if self.n_pixels < 10 or self.min_pixels < 1:
            raise ValueError("n_pixels must be >= 10 and min_pixels >= 1")
        if self.sample_mpp <= 0:
            raise ValueError(f"sample_mpp must be positive (µm/px), got {self.sample_mpp}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 0 < self.max_cosine < 1:
            raise ValueError(f"max_cosine must be in (0, 1), got {self.max_cosine}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (for the config hash and the store's attrs)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StainParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class StainFit:
    """A fitted stain model (stored in the slide's zarr store, ``stain/`` attrs).

    Attributes:
        stain_matrix: (2, 3) float64 unit optical-density row vectors (R, G, B), haematoxylin then eosin.
        max_concentrations: (2,) robust maxima (``StainParams.percentile``) of the H and E concentrations
            over tissue pixels, in OD units along each stain vector.
        method: ``"vahadane"``, ``"macenko"`` (fallback) or ``"identity"`` (no H&E fit possible: the
            normalizer passes images through unchanged).
        warnings: why a fallback was taken, and other remarks.
        n_pixels: number of tissue pixels the fit used.
    """

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray
    method: str
    warnings: tuple[str, ...] = ()
    n_pixels: int = 0

    def __post_init__(self) -> None:
        matrix = np.asarray(self.stain_matrix, dtype=np.float64).reshape(2, 3).copy()
        maxc = np.asarray(self.max_concentrations, dtype=np.float64).reshape(2).copy()
        if not (np.isfinite(matrix).all() and np.isfinite(maxc).all()):
            raise ValueError("stain matrix and max concentrations must be finite")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        matrix.setflags(write=False)
        maxc.setflags(write=False)
        object.__setattr__(self, "stain_matrix", matrix)
        object.__setattr__(self, "max_concentrations", maxc)
        object.__setattr__(self, "warnings", tuple(str(w) for w in self.warnings))
        object.__setattr__(self, "n_pixels", int(self.n_pixels))

    @property
    def is_identity(self) -> bool:
        return self.method == "identity"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists of floats, strings, ints."""
        return {
            "stain_matrix": [[float(v) for v in row] for row in self.stain_matrix],
            "max_concentrations": [float(v) for v in self.max_concentrations],
            "method": self.method,
            "warnings": list(self.warnings),
            "n_pixels": self.n_pixels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainFit:
        return cls(np.asarray(d["stain_matrix"], dtype=np.float64),
                   np.asarray(d["max_concentrations"], dtype=np.float64),
                   str(d["method"]), tuple(d.get("warnings", ())), int(d.get("n_pixels", 0)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StainFit):
            return NotImplemented
        return (np.array_equal(self.stain_matrix, other.stain_matrix)
                and np.array_equal(self.max_concentrations, other.max_concentrations)
                and (self.method, self.warnings, self.n_pixels)
                == (other.method, other.warnings, other.n_pixels))

    __hash__ = None  # type: ignore[assignment]


#: Default target: fitted once on a real H&E image and shipped as numbers.
#: Procedure (re-run it with ``python -m wsi_ad.stain``): ``fit_target(
#: "../shared/data/slides/cmu-1-small-region.svs")`` with the default ``StainParams()`` (λ = 0.1, seed 0),
#: i.e. the whole image (OpenSlide test slide CMU-1-Small-Region, Aperio SVS, 2220x2967 px at
#: 0.499 µm/px, licence CC0) read at ``sample_mpp`` = 2.0 µm/px, tissue = L*/100 < 0.8 and summed OD
#: >= 0.15 and every channel OD <= 2.5, Vahadane fit (``dl_solver="exact"``) on 20 000 of 100 000 sampled pixels, maxima = 99th
#: percentiles of the λc = 0.01 concentrations.
DEFAULT_TARGET = StainFit(
    stain_matrix=np.array([[0.579606, 0.697647, 0.421125],
                           [0.262363, 0.818612, 0.510920]]),
    max_concentrations=np.array([2.639650, 1.743097]),
    method="vahadane",
    warnings=(),
    n_pixels=100_000,
)


# --------------------------------------------------------------------------------------------------
# Optical density, tissue pixels
# --------------------------------------------------------------------------------------------------


def _check_uint8_rgb(rgb: np.ndarray, what: str = "image") -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise StainError(f"{what} must be uint8 RGB, got dtype {rgb.dtype}")
    if rgb.ndim < 2 or rgb.shape[-1] != 3:
        raise StainError(f"{what} must have 3 channels in the last axis, got shape {rgb.shape}")
    return rgb


def luminosity(rgb: np.ndarray) -> np.ndarray:
    """CIELAB L* / 100 (0 black .. 1 white) of uint8 RGB pixels (..., 3)."""
    from skimage.color import rgb2lab

    flat = np.asarray(rgb, dtype=np.uint8).reshape(-1, 1, 3)
    return (rgb2lab(flat)[:, 0, 0] / 100.0).reshape(np.shape(rgb)[:-1])


def tissue_pixels(rgb: np.ndarray, params: StainParams = StainParams(),
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Bool mask (shape ``rgb.shape[:-1]``) of the pixels a fit uses: inside ``mask`` (when given), darker
    than ``luminosity_threshold``, summed OD >= ``min_od`` and no channel OD above ``max_od``."""
    rgb = _check_uint8_rgb(rgb)
    od = rgb_to_od(rgb)
    keep = (od.sum(-1) >= params.min_od) & (od.max(-1) <= params.max_od)
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool).reshape(keep.shape)
    if keep.any():
        idx = np.flatnonzero(keep)
        lum = luminosity(rgb.reshape(-1, 3)[idx])
        flat = keep.reshape(-1)
        flat[idx[lum >= params.luminosity_threshold]] = False
    return keep


# --------------------------------------------------------------------------------------------------
# Concentrations: exact 2-stain non-negative lasso, closed form (numpy reference + torch kernel)
# --------------------------------------------------------------------------------------------------


def concentrations(od: np.ndarray, stain_matrix: np.ndarray, lambda_: float = 0.01) -> np.ndarray:
    """Exact ``argmin_{c >= 0} 0.5 ||od - c @ S||² + lambda_ * sum(c)`` per pixel, (..., 3) → (..., 2).

    With two stains the problem is solved in closed form: the stationary point with both stains active,
    ``(od @ S.T - λ) @ inv(S @ S.T)``, when it is non-negative; otherwise the better of the single-stain
    solutions ``max(0, (od·s - λ) / |s|²)`` (objective ``-0.5 max(0, od·s - λ)² / |s|²``). Units: OD along
    each stain vector (rows of ``S``, unit rows in a :class:`StainFit`).
    """
    od = np.asarray(od, dtype=np.float64)
    s = np.asarray(stain_matrix, dtype=np.float64)
    sq = (s * s).sum(axis=1)
    b = od.reshape(-1, 3) @ s.T - lambda_
    both = b @ gram_inverse(s)
    ok = (both >= 0).all(axis=1)
    pos = np.maximum(b, 0.0)
    use_h = pos[:, 0] ** 2 / sq[0] >= pos[:, 1] ** 2 / sq[1]
    out = np.zeros_like(b)
    out[use_h, 0] = pos[use_h, 0] / sq[0]
    out[~use_h, 1] = pos[~use_h, 1] / sq[1]
    out[ok] = both[ok]
    return out.reshape(od.shape[:-1] + (2,))


def _max_concentrations(conc: np.ndarray, percentile: float) -> np.ndarray:
    return np.percentile(conc.reshape(-1, 2), percentile, axis=0)


# --------------------------------------------------------------------------------------------------
# Fits
# --------------------------------------------------------------------------------------------------


def _unit_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)


def _order_h_e(m: np.ndarray) -> np.ndarray:
    """H first: the stain with the larger red OD component (StainTools' rule)."""
    return m if m[0, 0] >= m[1, 0] else m[[1, 0]]


def check_stain_matrix(matrix: np.ndarray, params: StainParams = StainParams()) -> list[str]:
    """Reasons why a (2, 3) H-then-E matrix is not a plausible H&E fit (empty list: plausible)."""
    problems = []
    m = np.asarray(matrix, dtype=np.float64)
    if not np.isfinite(m).all():
        return ["stain matrix is not finite"]
    norms = np.linalg.norm(m, axis=1)
    if (norms < 1e-6).any():
        return ["one stain vector is zero (the fit found a single colour)"]
    u = m / norms[:, None]
    if (u < -1e-6).any():
        problems.append("a stain vector has negative optical density")
    cosine = float(u[0] @ u[1])
    if cosine > params.max_cosine:
        problems.append(f"H and E vectors are nearly parallel (cosine {cosine:.3f} > {params.max_cosine})")
    if u[0, 0] < params.min_h_red:
        problems.append(f"haematoxylin absorbs too little red (red OD component {u[0, 0]:.2f} < "
                        f"{params.min_h_red})")
    if int(np.argmax(u[1])) != 1:
        problems.append(f"eosin does not absorb mostly green (OD {np.round(u[1], 2).tolist()})")
    return problems


def _vahadane_matrix(od: np.ndarray, params: StainParams) -> np.ndarray:
    """Vahadane's sparse NMF on (N, 3) OD: ``min 0.5 ||X - C D||² + λ |C|_1``, ``C >= 0``, ``D >= 0``,
    ``|d_k| <= 1`` (the objective of SPAMS ``trainDL(mode=2, posAlpha, posD)`` that StainTools calls).

    ``params.dl_solver = "exact"`` (default): batch alternating minimization; the code step is the exact
    closed-form 2-atom non-negative lasso (:func:`concentrations`), the dictionary step Mairal's block
    coordinate update with projection on the non-negative unit ball. ~50x faster than ``"sklearn"``
    (``MiniBatchDictionaryLearning``, whose lasso runs one Python-level call per pixel), same optimum
    (agreement is checked in the benchmark). Returns (2, 3) unit rows, H then E.
    """
    rng = np.random.default_rng([params.seed, 0xD1C7])
    if len(od) > params.dl_pixels:
        od = od[np.sort(rng.choice(len(od), params.dl_pixels, replace=False))]
    if params.dl_solver == "sklearn":
        from sklearn.decomposition import MiniBatchDictionaryLearning

        learner = MiniBatchDictionaryLearning(
            n_components=2, alpha=params.lambda_, batch_size=params.dl_batch_size, max_iter=params.dl_max_iter,
            fit_algorithm="cd", transform_algorithm="lasso_cd", positive_dict=True, positive_code=True,
            random_state=params.seed, shuffle=True)
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")  # convergence chatter of the inner coordinate descent
            learner.fit(od.astype(np.float64))
        return _order_h_e(_unit_rows(np.maximum(learner.components_, 0.0)))
    if params.dl_solver != "exact":
        raise ValueError(f"dl_solver must be 'exact' or 'sklearn', got {params.dl_solver!r}")
    x = od.astype(np.float64)
    # Initial atoms: two seeded random tissue pixels' OD directions, as SPAMS does (distinct ones).
    d = _unit_rows(x[rng.choice(len(x), 2, replace=False)])
    for _ in range(10):
        if d[0] @ d[1] < 0.999:
            break
        d = _unit_rows(x[rng.choice(len(x), 2, replace=False)])
    for _ in range(params.dl_max_iter):
        previous = d.copy()
        c = concentrations(x, d, params.lambda_)          # (N, 2) exact codes
        a = c.T @ c                                       # (2, 2)
        bm = c.T @ x                                      # (2, 3)
        for _inner in range(3):
            for k in range(2):
                if a[k, k] < 1e-12:                       # unused atom: restart it on the worst pixel
                    residual = ((x - c @ d) ** 2).sum(axis=1)
                    d[k] = _unit_rows(x[[int(np.argmax(residual))]])[0]
                    continue
                u = d[k] + (bm[k] - a[k] @ d) / a[k, k]
                u = np.maximum(u, 0.0)
                d[k] = u / max(float(np.linalg.norm(u)), 1.0)
        if np.abs(d - previous).max() < params.dl_tol:
            break
    return _order_h_e(_unit_rows(d))


def _macenko_matrix(od: np.ndarray, params: StainParams) -> np.ndarray:
    """Macenko et al. (2009): extreme angles in the plane of the two principal OD directions."""
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    v = vecs[:, [2, 1]]
    v[:, 0] *= np.sign(v[0, 0]) or 1.0
    v[:, 1] *= np.sign(v[0, 1]) or 1.0
    proj = od @ v
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [params.macenko_alpha, 100 - params.macenko_alpha])
    v1 = v @ np.array([math.cos(lo), math.sin(lo)])
    v2 = v @ np.array([math.cos(hi), math.sin(hi)])
    m = np.array([v1, v2])
    if (m < 0).any():  # a slightly negative component from noise: clip (OD cannot be negative)
        m = np.maximum(m, 0.0)
    return _order_h_e(_unit_rows(m))


def _identity_fit(reason: str, n_pixels: int, earlier: list[str] | None = None) -> StainFit:
    notes = [*(earlier or []), f"no H&E stain fit possible: {reason}; stain normalization is the identity "
                               f"(images pass through unchanged)"]
    for note in notes[len(earlier or []):]:
        log.warning("stain: %s", note)
    return StainFit(DEFAULT_TARGET.stain_matrix, DEFAULT_TARGET.max_concentrations, "identity",
                    tuple(notes), n_pixels)


def _fit_od(od: np.ndarray, params: StainParams, notes: list[str]) -> StainFit:
    """Fit on tissue OD pixels (N, 3): Vahadane, else Macenko, else identity."""
    n = len(od)
    if n < params.min_pixels:
        return _identity_fit(f"too few tissue pixels ({n} < {params.min_pixels})", n, notes)
    if n > params.n_pixels:
        rng = np.random.default_rng([params.seed, 0x57A1])
        od = od[np.sort(rng.choice(n, params.n_pixels, replace=False))]
    for method, fitter in (("vahadane", _vahadane_matrix), ("macenko", _macenko_matrix)):
        try:
            matrix = fitter(od, params)
            problems = check_stain_matrix(matrix, params)
        except (ValueError, np.linalg.LinAlgError) as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
        if not problems:
            conc = concentrations(od, matrix, params.concentration_lambda)
            maxc = _max_concentrations(conc, params.percentile)
            if (maxc > 1e-3).all():
                return StainFit(matrix, maxc, method, tuple(notes), len(od))
            problems = [f"a stain is absent (99th percentile concentrations {np.round(maxc, 4).tolist()})"]
        note = f"{method} stain fit rejected: {'; '.join(problems)}"
        if method == "vahadane":
            note += "; falling back to Macenko"
        log.warning("stain: %s", note)
        notes.append(note)
    return _identity_fit("neither Vahadane nor Macenko found plausible H&E stains", len(od), notes)


def fit_stain(rgb: np.ndarray, *, params: StainParams = StainParams(), mask: np.ndarray | None = None) -> StainFit:
    """Fit the H&E stain matrix of an image (H, W, 3) or of pixels (N, 3), uint8 RGB.

    Tissue pixels (:func:`tissue_pixels`, restricted to ``mask`` when given) are sampled (at most
    ``params.n_pixels``, seeded) and fitted by Vahadane's method; degenerate fits fall back to Macenko, then
    to identity, with the reason in ``StainFit.warnings``. A dark image (median brightness below
    ``params.dark_background``: fluorescence) is identity at once.
    """
    rgb = _check_uint8_rgb(rgb)
    pixels = rgb.reshape(-1, 3)
    notes: list[str] = []
    if pixels.size and mask is None and rgb.ndim == 3:
        median_brightness = float(np.median(pixels.max(axis=1)))
        if median_brightness < params.dark_background:
            return _identity_fit(f"dark background (median brightness {median_brightness:.0f}/255): not a "
                                 f"brightfield H&E image (fluorescence?)", 0)
    keep = tissue_pixels(pixels, params, None if mask is None else np.asarray(mask, bool).reshape(-1))
    return _fit_od(rgb_to_od(pixels[keep]), params, notes)


def fit_slide_stain(slide, tissue_mask, *, params: StainParams = StainParams(),
                    block_px: int = 1024) -> StainFit:
    """Fit a slide's stain matrix on tissue pixels sampled over the whole slide at ``params.sample_mpp`` µm/px.

    Args:
        slide: a :class:`~wsi_ad.slide.Slide`.
        tissue_mask: a :class:`~wsi_ad.tissue.TissueMask` (``.mask`` bool at ``.mpp`` µm/px) or a bare bool
            array covering the whole slide (its resolution is then inferred from its shape).
        params: settings; ``n_pixels`` pixels are kept, spread evenly (by seeded random subsampling) over
            every tissue block of the slide.
        block_px: blocks of ``block_px`` x ``block_px`` pixels at ``sample_mpp`` are read one at a time
            (memory stays bounded); blocks without tissue in the mask are not read.

    An empty mask (e.g. a fluorescence slide, for which the tissue stage warns) gives an identity fit with a
    warning, never an exception.
    """
    mask = np.asarray(getattr(tissue_mask, "mask", tissue_mask), dtype=bool)
    width0, height0 = slide.dimensions
    mask_mpp_x = width0 * slide.mpp_x / mask.shape[1]
    mask_mpp_y = height0 * slide.mpp_y / mask.shape[0]
    mpp = params.sample_mpp
    out_w = max(1, int(round(width0 * slide.mpp_x / mpp)))
    out_h = max(1, int(round(height0 * slide.mpp_y / mpp)))
    tissue_px_estimate = mask.sum() * (mask_mpp_x * mask_mpp_y) / (mpp * mpp)
    if tissue_px_estimate < 1:
        return _identity_fit("the tissue mask is empty (no brightfield tissue found)", 0)
    rng = np.random.default_rng([params.seed, 0xB10C])
    window = params.sample_window_px
    if tissue_px_estimate > params.sample_windows * window * window:
        pixels = _sample_tissue_windows(slide, mask, (mask_mpp_x, mask_mpp_y), params, rng)
        return _fit_od(rgb_to_od(pixels), params, [])
    keep_fraction = min(1.0, 1.5 * params.n_pixels / tissue_px_estimate)
    chunks = []
    for by in range(0, out_h, block_px):
        for bx in range(0, out_w, block_px):
            w, h = min(block_px, out_w - bx), min(block_px, out_h - by)
            # mask pixels covering this block (nearest neighbour)
            rows = np.minimum(((by + np.arange(h) + 0.5) * mpp / mask_mpp_y).astype(int), mask.shape[0] - 1)
            cols = np.minimum(((bx + np.arange(w) + 0.5) * mpp / mask_mpp_x).astype(int), mask.shape[1] - 1)
            if not mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].any():
                continue
            block_mask = mask[np.ix_(rows, cols)]
            if not block_mask.any():
                continue
            location = (bx * mpp / slide.mpp_x, by * mpp / slide.mpp_y)
            region = slide.read_region(location, (w, h), mpp)
            region = region[:block_mask.shape[0], :block_mask.shape[1]]
            keep = tissue_pixels(region, params, block_mask[:region.shape[0], :region.shape[1]])
            pixels = region[keep]
            if keep_fraction < 1.0:
                pixels = pixels[rng.random(len(pixels)) < keep_fraction]
            chunks.append(pixels)
    pixels = np.concatenate(chunks) if chunks else np.zeros((0, 3), np.uint8)
    return _fit_od(rgb_to_od(pixels), params, [])


def _sample_tissue_windows(slide, mask: np.ndarray, mask_mpp: tuple[float, float], params: StainParams,
                           rng: np.random.Generator) -> np.ndarray:
    """Tissue pixels of ``params.sample_windows`` windows of ``sample_window_px`` px at ``sample_mpp``, centred
    on tissue-mask pixels drawn uniformly (seeded): the whole slide's tissue is sampled while the pixels
    read stay bounded (about 1 Mpx) whatever the slide's size."""
    mpp, window = params.sample_mpp, params.sample_window_px
    rows, cols = np.nonzero(mask)
    picks = rng.choice(len(rows), size=params.sample_windows, replace=len(rows) < params.sample_windows)
    keep_fraction = min(1.0, 1.5 * params.n_pixels / (params.sample_windows * window * window))
    chunks = []
    for i in np.sort(picks):
        cx0 = (cols[i] + 0.5) * mask_mpp[0] / slide.mpp_x          # level-0 centre of the mask pixel
        cy0 = (rows[i] + 0.5) * mask_mpp[1] / slide.mpp_y
        half0 = window / 2 * mpp / slide.mpp_x
        x0, y0 = max(0.0, cx0 - half0), max(0.0, cy0 - half0)
        region = slide.read_region((x0, y0), (window, window), mpp)
        # the tissue mask over the window (nearest neighbour), so ink and glass next to tissue stay out
        mrows = np.minimum(((y0 * slide.mpp_y + (np.arange(window) + 0.5) * mpp) / mask_mpp[1]).astype(int),
                           mask.shape[0] - 1)
        mcols = np.minimum(((x0 * slide.mpp_x + (np.arange(window) + 0.5) * mpp) / mask_mpp[0]).astype(int),
                           mask.shape[1] - 1)
        pixels = region[tissue_pixels(region, params, mask[np.ix_(mrows, mcols)])]
        if keep_fraction < 1.0:
            pixels = pixels[rng.random(len(pixels)) < keep_fraction]
        chunks.append(pixels)
    return np.concatenate(chunks) if chunks else np.zeros((0, 3), np.uint8)


def fit_target(source, *, params: StainParams = StainParams(), region: tuple[int, int, int, int] | None = None,
               mpp: float | None = None) -> StainFit:
    """Fit a normalization target.

    Args:
        source: an (H, W, 3) uint8 array; an image file (PNG, JPEG, TIFF...) read at its own resolution;
            or a slide file, read at ``mpp`` µm/px (default ``params.sample_mpp``, the resolution slides are
            fitted at) either as a ``region`` or, without one, whole over its tissue mask.
        region: ``(x, y, w, h)`` in level-0 pixels of the slide (e.g. the paper's 2816 x 2816 px of
            Camelyon16 normal_056 at 40x).
        mpp: µm/px at which a slide region is read.
    """
    if isinstance(source, np.ndarray):
        return fit_stain(source, params=params)
    path = Path(source)
    if region is None and mpp is None and path.suffix.lower() in IMAGE_EXTENSIONS:
        from wsi_ad.images import ImageReadError, read_image

        try:
            rgb = read_image(path)
        except ImageReadError:
            if path.suffix.lower() not in (".tif", ".tiff"):
                raise StainError(f"{path}: cannot read the target image") from None
            # a pyramidal TIFF that PIL cannot read: treat it as a slide
        else:
            return fit_stain(rgb, params=params)
    from wsi_ad.slide import open_slide

    with open_slide(path) as slide:
        read_mpp = params.sample_mpp if mpp is None else float(mpp)
        if region is None:
            from wsi_ad.tissue import mask_slide

            mask, _ = mask_slide(slide)
            return fit_slide_stain(slide, mask, params=dataclasses.replace(params, sample_mpp=read_mpp))
        x, y, w, h = region
        size = (max(1, int(round(w * slide.mpp_x / read_mpp))), max(1, int(round(h * slide.mpp_y / read_mpp))))
        rgb = slide.read_region((x, y), size, read_mpp)
    return fit_stain(rgb, params=params)


# --------------------------------------------------------------------------------------------------
# Transform
# --------------------------------------------------------------------------------------------------


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class StainNormalizer:
    """Map images stained like ``source`` to the stain of ``target``: uint8 RGB in, uint8 RGB out.

    ``normalizer(rgb)`` takes (H, W, 3) or (N, H, W, 3) uint8 (any leading shape) and returns the same shape.
    Per pixel: OD, exact non-negative lasso concentrations with the source matrix (λc =
    ``concentration_lambda``), scaled by ``target.max / source.max``, rendered with the target matrix.
    An identity ``source`` (or target) returns a copy.

    Where it runs (``device``, default CUDA when available, else CPU):

    * CPU: one compiled pass (:mod:`wsi_ad.stain_kernel`, numba; releases the GIL). ``threads`` > 1 splits
      one call's pixels over that many threads; the default 1 suits the pipeline, which runs one
      single-threaded worker per core.
    * CUDA: the same arithmetic in torch, ``chunk_pixels`` pixels per pass, on pinned host memory.

    The two agree to within one grey level (float32 rounding at the rounding thresholds).
    """

    def __init__(self, source: StainFit, target: StainFit = None, *, device=None,  # type: ignore[assignment]
                 concentration_lambda: float = StainParams.concentration_lambda, chunk_pixels: int = 1 << 22,
                 threads: int = 1):
        target = DEFAULT_TARGET if target is None else target
        self.source, self.target = source, target
        self.identity = source.is_identity or target.is_identity
        self.device = torch.device(device) if device is not None else _default_device()
        self.chunk_pixels = int(chunk_pixels)
        self.threads = max(1, int(threads))
        self.concentration_lambda = float(concentration_lambda)
        s = _unit_rows(np.asarray(source.stain_matrix, np.float64))
        ginv = gram_inverse(s) if not self.identity else np.eye(2)
        scale = np.asarray(target.max_concentrations) / np.maximum(np.asarray(source.max_concentrations), 1e-6)
        render = scale[:, None] * np.asarray(target.stain_matrix, np.float64)
        # Fold the constants: b = od @ S.T - λ; both = b @ Ginv; out_od = (c * scale) @ T.
        self._st_list = [[float(v) for v in row] for row in s]
        self._ginv_list = [[float(v) for v in row] for row in ginv]
        self._render_list = [[float(v) for v in row] for row in render]
        self._cosine_nonnegative = bool(s[0] @ s[1] >= 0)
        self._tables = None
        if not self.identity and self.device.type == "cpu":
            # imported here: numba costs ~100 MB of memory per process and is needed only by the CPU path
            from wsi_ad.stain_kernel import TransformTables

            self._tables = TransformTables.build(s, render, self.concentration_lambda)

    def __repr__(self) -> str:
        return f"StainNormalizer({self.source.method} -> {self.target.method}, device={self.device})"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        rgb = _check_uint8_rgb(rgb)
        if self.identity or rgb.size == 0:
            return rgb.copy()
        flat = np.ascontiguousarray(rgb).reshape(-1, 3)
        out = np.empty_like(flat)
        if self.device.type == "cpu":
            self._transform_cpu(flat, out)
            return out.reshape(rgb.shape)
        with torch.inference_mode():
            for start in range(0, len(flat), self.chunk_pixels):
                stop = min(len(flat), start + self.chunk_pixels)
                x = torch.from_numpy(flat[start:stop]).pin_memory().to(self.device, non_blocking=True)
                out[start:stop] = self._compute(x).cpu().numpy()
        return out.reshape(rgb.shape)

    def _transform_cpu(self, flat: np.ndarray, out: np.ndarray) -> None:
        parts = min(self.threads, max(1, len(flat) >> 16))  # >= 64K pixels per thread
        if parts == 1:
            self._tables.transform(flat, out)
            return
        bounds = np.linspace(0, len(flat), parts + 1).astype(int)
        with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="stain") as pool:
            for future in [pool.submit(self._tables.transform, flat[a:b], out[a:b])
                           for a, b in itertools.pairwise(bounds)]:
                future.result()

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form transform of (P, 3) uint8 pixels in torch (any device), planar float32 arithmetic."""
        od = x.T.float().clamp_(min=1.0).div_(255.0).log_().neg_()   # (3, P) OD = -ln(max(I, 1) / 255)
        st_ = self._st_list
        lam = self.concentration_lambda
        b0 = od[0] * st_[0][0] + od[1] * st_[0][1] + od[2] * st_[0][2] - lam   # od·h - λ
        b1 = od[0] * st_[1][0] + od[1] * st_[1][1] + od[2] * st_[1][2] - lam   # od·e - λ
        g = self._ginv_list
        c0 = b0 * g[0][0] + b1 * g[1][0]                        # both stains active
        c1 = b0 * g[0][1] + b1 * g[1][1]
        # exact non-negative solution without selects (see wsi_ad.stain_kernel): min(c, b) for a
        # non-negative stain cosine (every fit), max(c, b) otherwise; then clamped at 0
        pick = torch.minimum if self._cosine_nonnegative else torch.maximum
        c0 = pick(c0, b0).clamp_(min=0.0)
        c1 = pick(c1, b1).clamp_(min=0.0)
        r = self._render_list                                   # scale folded in: (2, 3)
        out = torch.empty((x.shape[0], 3), dtype=torch.uint8, device=x.device)
        for ch in range(3):
            v = c0 * r[0][ch] + c1 * r[1][ch]
            # OD above 20 renders as 0 anyway (255 e^-20 < 1e-6); clamping it keeps exp() out of float32
            # denormals, which are ~100x slower on x86.
            out[:, ch] = torch.exp(v.clamp_(max=20.0).neg_()).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return out


def normalize(rgb: np.ndarray, source: StainFit, target: StainFit = None, **kwargs) -> np.ndarray:
    """One-shot :class:`StainNormalizer` ``(source, target)(rgb)``."""
    return StainNormalizer(source, target, **kwargs)(rgb)


def _compute_default_target(path: str | os.PathLike) -> StainFit:
    """The procedure behind :data:`DEFAULT_TARGET` (see the comment there)."""
    return fit_target(path, params=StainParams())


if __name__ == "__main__":  # print the numbers of DEFAULT_TARGET
    import json
    import sys

    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
    fit = _compute_default_target(sys.argv[1] if len(sys.argv) > 1 else default)
    print(json.dumps(fit.to_dict(), indent=1))
