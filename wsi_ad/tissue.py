"""Tissue masking of brightfield (H&E) slides: Otsu on a thumbnail, sizes in microns, ink removed.

Pure functions over arrays (scikit-image style); nothing here knows about Dask or the store.

Resolution contract: the mask is computed on a thumbnail at ``mpp`` µm/px (``TissueParams.mask_mpp`` when
read by :func:`mask_slide`). Every size in :class:`TissueParams` is in µm or µm² and converted to pixels
with that resolution, so the same settings give the same physical result at 20x or 40x and at any
thumbnail resolution (unlike pixel-count thresholds, which change meaning with the scan).

Steps of :func:`tissue_mask`:

1. *Dark-background check.* A brightfield slide is mostly bright glass. When the median brightness is
   below ``dark_value`` the image is not brightfield (typically fluorescence: black background, coloured
   signal); the mask is empty and a warning says so. No exception: a batch goes on.
2. *Ink and dark areas.* Coloured pen (green / blue / red) is found by RGB rules (H&E is pink to purple:
   green is its lowest channel, and it is never a saturated pure red); black marker, slide label, black
   borders and scanner edges are found as very dark pixels (max channel < ``dark_value``).
3. *Threshold.* The channel (HSV saturation × 255, or 255 − grey) is median-smoothed and thresholded by
   Otsu over all pixels that are neither ink nor dark (glass included: it is the background class). The
   Otsu value is clipped to [``min_threshold``, ``max_threshold``]: the floor stops a blank slide from
   thresholding noise, the ceiling keeps faint tissue when dense tissue dominates the histogram.
4. *Morphology.* Closing then opening with disks of radii in µm; holes below ``min_hole_area_um2`` are
   filled and objects below ``min_object_area_um2`` removed. Every remaining region is kept (never only
   the largest one).
5. *Ink removal.* Ink and dark pixels, grown by ``pen_margin_um``, are removed from the mask last (after
   hole filling, so a marker ring drawn on tissue cannot be filled back in); fragments cut off below the
   minimum object area go too.

Coordinates: mask pixels are (row, col) of the mask array; level-0 pixels are x then y, top-left origin.
One mask pixel spans ``mask_mpp / slide_mpp`` level-0 pixels (see :func:`level0_per_mask_px`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from skimage.filters import threshold_otsu
from skimage.filters.rank import median as rank_median
from skimage.morphology import closing, dilation, disk, opening, remove_small_holes, remove_small_objects
from skimage.segmentation import find_boundaries

log = logging.getLogger(__name__)

CHANNELS = ("saturation", "gray")


@dataclass(frozen=True)
class TissueParams:
    """Settings of :func:`tissue_mask`. Sizes are physical (µm, µm²); intensities on a 0–255 scale.

    Attributes:
        mask_mpp: µm/px of the thumbnail the mask is computed on (8 µm/px: a 100k-px-wide 40x slide
            gives a ~3000-px-wide mask, enough to resolve a 256-px tile at 0.5 µm/px by 16 mask pixels).
        channel: ``"saturation"`` (HSV S × 255; separates stained tissue from colourless glass, also
            when the stain is pale) or ``"gray"`` (255 − luminance; darkness).
        median_radius_um: radius (µm) of the median filter applied to the channel before thresholding.
        close_radius_um: radius (µm) of the disk used to close gaps between nearby tissue pixels.
        open_radius_um: radius (µm) of the disk used to open (remove thin spurs and specks).
        min_object_area_um2: tissue regions smaller than this (µm²) are dropped as dust or debris
            (5 000 µm², about a 70 µm square: a thin strand or a small biopsy fragment is kept).
        min_hole_area_um2: holes (gaps between fibres, small lumina) smaller than this (µm²) are
            filled; larger clefts, lumina and fat lobules stay out (10 000 µm² ≈ a 100 µm square).
        min_threshold: floor on the Otsu threshold (channel units, 0–255) so blank glass is not
            thresholded on its noise (20 ≈ saturation 0.08; clean glass is below ~0.04).
        max_threshold: ceiling on the Otsu threshold (0–255) so pale tissue stays in when dense tissue
            drives Otsu up (45 ≈ saturation 0.18; pale eosin is ~0.1–0.25). ``None`` disables it.
        suppress_pen: detect green / blue / red pen ink and black marker and remove it from the mask.
        pen_margin_um: ink areas are grown by this (µm, at least one pixel) before removal (ink edges
            are soft).
        min_pen_area_um2: ink or dark regions smaller than this (µm²) are ignored: pen strokes are
            hundreds of µm wide, while dark nuclei or coloured specks are not ink (5000 µm² ≈ a 70 µm
            square).
        min_pen_saturation: minimum HSV saturation (0–1) of a pixel called coloured ink.
        pen_channel_margin: how far (0–255) one RGB channel must exceed another in the ink rules.
        dark_value: pixels whose brightest channel is below this (0–255) are black marker, label,
            border or scanner edge, never tissue; an image whose *median* brightness is below it has
            a dark background (not brightfield, e.g. fluorescence) and gets an empty mask.
    """

    mask_mpp: float = 8.0
    channel: str = "saturation"
    median_radius_um: float = 8.0
    close_radius_um: float = 24.0
    open_radius_um: float = 8.0
    min_object_area_um2: float = 5_000.0
    min_hole_area_um2: float = 10_000.0
    min_threshold: float = 20.0
    max_threshold: float | None = 45.0
    suppress_pen: bool = True
    pen_margin_um: float = 16.0
    min_pen_area_um2: float = 5_000.0
    min_pen_saturation: float = 0.12
    pen_channel_margin: int = 15
    dark_value: int = 60

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {self.channel!r}")
        if not (self.mask_mpp > 0 and math.isfinite(self.mask_mpp)):
            raise ValueError(f"mask_mpp must be a positive number of µm/px, got {self.mask_mpp}")
        for name in ("median_radius_um", "close_radius_um", "open_radius_um", "min_object_area_um2",
                     "min_hole_area_um2", "pen_margin_um", "min_pen_area_um2"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.min_threshold <= 255:
            raise ValueError(f"min_threshold must be in 0..255, got {self.min_threshold}")
        if self.max_threshold is not None and not self.min_threshold <= self.max_threshold <= 255:
            raise ValueError(f"max_threshold must be in min_threshold..255 or None, got {self.max_threshold}")
        if not 0 <= self.min_pen_saturation <= 1:
            raise ValueError(f"min_pen_saturation must be in 0..1, got {self.min_pen_saturation}")
        if not 0 <= self.dark_value <= 255:
            raise ValueError(f"dark_value must be in 0..255, got {self.dark_value}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every setting (for recording in the store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TissueParams:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown tissue parameters: {', '.join(unknown)}")
        return cls(**values)


@dataclass
class TissueMask:
    """A tissue mask and how it was made.

    Attributes:
        mask: (H, W) bool, True on tissue; pixel (row, col) covers level-0 pixels
            ``[col * s, (col + 1) * s) x [row * s, (row + 1) * s)`` with ``s = mpp / slide_mpp``.
        mpp: µm/px of the mask.
        threshold: the threshold used, on the chosen channel's 0–255 scale (Otsu, clipped); NaN when no
            threshold was computed (dark background).
        otsu_threshold: the raw Otsu value before clipping (NaN when there were no pixels to threshold).
        params: the settings used.
        pen_fraction: fraction of the image's pixels removed as coloured pen ink (after growing by
            ``pen_margin_um``).
        dark_fraction: fraction of the image's pixels removed as black (marker, label, border).
        warnings: human-readable warnings (also logged), e.g. no tissue found.
    """

    mask: np.ndarray
    mpp: float
    threshold: float
    params: TissueParams
    otsu_threshold: float = float("nan")
    pen_fraction: float = 0.0
    dark_fraction: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def tissue_area_mm2(self) -> float:
        """Area of the mask's tissue in mm²."""
        return float(np.count_nonzero(self.mask)) * self.mpp * self.mpp / 1e6

    @property
    def tissue_fraction_of_image(self) -> float:
        """Fraction of the mask's pixels that are tissue."""
        return float(np.count_nonzero(self.mask)) / max(1, self.mask.size)

    def tissue_fraction(self, boxes_level0: np.ndarray, slide_mpp: float | tuple[float, float]) -> np.ndarray:
        """Fraction of each level-0 box covered by tissue; see :func:`tissue_fraction`."""
        return tissue_fraction(self.mask, boxes_level0, mask_mpp=self.mpp, slide_mpp=slide_mpp)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no mask pixels): resolution, threshold, areas, params, warnings."""
        height, width = self.mask.shape
        return {
            "mask_mpp": self.mpp,
            "mask_shape": [int(height), int(width)],
            "threshold": _json_float(self.threshold),
            "otsu_threshold": _json_float(self.otsu_threshold),
            "tissue_area_mm2": self.tissue_area_mm2,
            "tissue_fraction_of_image": self.tissue_fraction_of_image,
            "pen_fraction": self.pen_fraction,
            "dark_fraction": self.dark_fraction,
            "params": self.params.to_dict(),
            "warnings": list(self.warnings),
        }


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


# -- unit conversions ----------------------------------------------------------------------------

def radius_um_to_px(radius_um: float, mpp: float) -> int:
    """A radius in µm as a whole number of pixels at ``mpp`` µm/px (rounded; 0 means "no filter")."""
    return int(round(radius_um / mpp))


def area_um2_to_px(area_um2: float, mpp: float) -> float:
    """An area in µm² as a (fractional) number of pixels at ``mpp`` µm/px."""
    return area_um2 / (mpp * mpp)


def _mpp_xy(slide_mpp: float | tuple[float, float]) -> tuple[float, float]:
    if np.ndim(slide_mpp) == 0:
        return float(slide_mpp), float(slide_mpp)  # type: ignore[arg-type]
    mpp_x, mpp_y = slide_mpp  # type: ignore[misc]
    return float(mpp_x), float(mpp_y)


def level0_per_mask_px(mask_mpp: float, slide_mpp: float | tuple[float, float]) -> tuple[float, float]:
    """Level-0 pixels per mask pixel along (x, y): ``mask_mpp / slide_mpp``."""
    mpp_x, mpp_y = _mpp_xy(slide_mpp)
    return mask_mpp / mpp_x, mask_mpp / mpp_y


def mask_px_to_level0_px(xy_mask_px: np.ndarray, *, mask_mpp: float,
                         slide_mpp: float | tuple[float, float]) -> np.ndarray:
    """Mask-pixel coordinates (N, 2: x = column, y = row; pixel corners) to level-0 pixel coordinates."""
    scale = np.asarray(level0_per_mask_px(mask_mpp, slide_mpp))
    return np.asarray(xy_mask_px, dtype=np.float64) * scale


def level0_px_to_mask_px(xy_level0_px: np.ndarray, *, mask_mpp: float,
                         slide_mpp: float | tuple[float, float]) -> np.ndarray:
    """Level-0 pixel coordinates (N, 2: x, y) to fractional mask-pixel coordinates (x = column, y = row)."""
    scale = np.asarray(level0_per_mask_px(mask_mpp, slide_mpp))
    return np.asarray(xy_level0_px, dtype=np.float64) / scale


def level0_boxes_to_mask_px(boxes_level0: np.ndarray, *, mask_mpp: float,
                            slide_mpp: float | tuple[float, float]) -> np.ndarray:
    """Level-0 boxes (N, 4: x, y, w, h) to fractional mask-pixel boxes (N, 4: x, y, w, h)."""
    boxes = np.asarray(boxes_level0, dtype=np.float64).reshape(-1, 4)
    sx, sy = level0_per_mask_px(mask_mpp, slide_mpp)
    return boxes / np.array([sx, sy, sx, sy])


# -- tissue fraction of boxes ---------------------------------------------------------------------

def summed_area_table(mask: np.ndarray) -> np.ndarray:
    """(H + 1, W + 1) float64 integral image: ``sat[r, c]`` = tissue pixels in ``mask[:r, :c]``."""
    mask = np.asarray(mask)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    if mask.dtype == np.bool_:
        # Counted in integers (exact, as the float64 sums of 0/1 were), then stored as float64: 2x faster.
        counts = np.cumsum(mask, axis=1, dtype=np.int32 if mask.size < 2**31 else np.int64)
        np.cumsum(counts, axis=0, out=counts)
        sat[1:, 1:] = counts
    else:
        np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
    return sat


def _sat_at(sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The integral of the mask over ``[0, x] x [0, y]`` for fractional x (columns), y (rows).

    Inside one pixel the integral is bilinear in (x, y), so bilinear interpolation of the table is
    exact (the mask is piecewise constant over pixels).
    """
    height, width = sat.shape[0] - 1, sat.shape[1] - 1
    x = np.clip(x, 0.0, width)
    y = np.clip(y, 0.0, height)
    x0 = np.minimum(np.floor(x).astype(np.intp), max(width - 1, 0))
    y0 = np.minimum(np.floor(y).astype(np.intp), max(height - 1, 0))
    x1 = np.minimum(x0 + 1, width)
    y1 = np.minimum(y0 + 1, height)
    fx, fy = x - x0, y - y0
    return ((1 - fx) * (1 - fy) * sat[y0, x0] + fx * (1 - fy) * sat[y0, x1]
            + (1 - fx) * fy * sat[y1, x0] + fx * fy * sat[y1, x1])


def tissue_fraction(mask: np.ndarray, boxes_level0: np.ndarray, *, mask_mpp: float,
                    slide_mpp: float | tuple[float, float], sat: np.ndarray | None = None) -> np.ndarray:
    """Fraction of each level-0 box covered by tissue, from the mask (vectorized, exact area weighting).

    Args:
        mask: (H, W) bool tissue mask at ``mask_mpp`` µm/px.
        boxes_level0: (N, 4) boxes ``x, y, w, h`` in level-0 pixels.
        mask_mpp: µm/px of the mask.
        slide_mpp: level-0 µm/px of the slide (a number, or ``(mpp_x, mpp_y)``).
        sat: the mask's :func:`summed_area_table`, to reuse over many calls.

    Returns:
        (N,) float64 in [0, 1]: tissue area inside the box / box area, where mask pixels partly inside a
        box count by the part inside (so the result is exact for the mask as a piecewise-constant
        image). Parts of a box outside the mask count as no tissue; an empty box gives 0.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if sat is None:
        sat = summed_area_table(mask)
    boxes = level0_boxes_to_mask_px(boxes_level0, mask_mpp=mask_mpp, slide_mpp=slide_mpp)
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    inside = _sat_at(sat, x1, y1) - _sat_at(sat, x0, y1) - _sat_at(sat, x1, y0) + _sat_at(sat, x0, y0)
    area = boxes[:, 2] * boxes[:, 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(area > 0, inside / np.where(area > 0, area, 1.0), 0.0)
    return np.clip(fraction, 0.0, 1.0)


# -- per-pixel colour rules ------------------------------------------------------------------------

def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB, got {rgb.dtype}")
    return rgb[..., :3]


def saturation_255(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation on a 0–255 scale, float32 (0 for black pixels)."""
    rgb = _check_rgb(rgb)
    vmax = rgb.max(axis=2).astype(np.float32)
    vmin = rgb.min(axis=2).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        sat = np.where(vmax > 0, (vmax - vmin) / np.where(vmax > 0, vmax, 1.0), 0.0)
    return (sat * 255.0).astype(np.float32)


def darkness_255(rgb: np.ndarray) -> np.ndarray:
    """255 − luminance (ITU-R 709 weights, as ``skimage.color.rgb2gray``), float32."""
    rgb = _check_rgb(rgb).astype(np.float32)
    return 255.0 - (0.2125 * rgb[..., 0] + 0.7154 * rgb[..., 1] + 0.0721 * rgb[..., 2])


def pen_ink_mask(rgb: np.ndarray, *, min_saturation: float = 0.12, channel_margin: int = 15) -> np.ndarray:
    """Pixels of coloured pen ink (green, teal, blue, red), as (H, W) bool.

    H&E is pink to purple: red is high, green is the lowest channel, blue lies between or above. Ink
    breaks that pattern:

    * green / teal: green exceeds red by ``channel_margin`` (H&E never has G > R);
    * blue: blue exceeds red and green by ``channel_margin`` and green is not below red by more than
      ``channel_margin`` (hue 180–245°; hematoxylin is violet, G < R);
    * red: saturation above 0.6 and hue within −15°..+20° of pure red (eosin is pink-magenta, hue
      ~320–345°, saturation mostly under 0.6).

    ``min_saturation`` (0–1) keeps near-grey pixels (glass tints, JPEG noise) out.
    """
    rgb = _check_rgb(rgb)
    r = rgb[..., 0].astype(np.int16)
    g = rgb[..., 1].astype(np.int16)
    b = rgb[..., 2].astype(np.int16)
    sat = saturation_255(rgb) / 255.0
    coloured = sat >= min_saturation
    m = channel_margin
    green = (g > r + m) & coloured
    blue = (b > r + m) & (b > g + m) & (g >= r - m) & coloured
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    chroma = np.maximum(vmax - vmin, 1).astype(np.float32)
    hue_ratio = (g - b).astype(np.float32) / chroma  # hue / 60° when red is the largest channel
    red = (r == vmax) & (sat > 0.6) & (hue_ratio >= -0.25) & (hue_ratio <= 1.0 / 3.0) & (vmax > 60)
    return green | blue | red


def dark_mask(rgb: np.ndarray, *, dark_value: int = 60) -> np.ndarray:
    """Very dark pixels (brightest channel < ``dark_value``): black marker, label, border, scanner edge."""
    return _check_rgb(rgb).max(axis=2) < dark_value


# -- the mask ---------------------------------------------------------------------------------------

def tissue_mask(rgb: np.ndarray, *, mpp: float, params: TissueParams = TissueParams()) -> TissueMask:
    """Tissue mask of a brightfield thumbnail; see the module docstring for the steps.

    Args:
        rgb: (H, W, 3) uint8 RGB thumbnail, background white (an alpha channel is ignored).
        mpp: µm/px of ``rgb``; converts every µm / µm² setting of ``params`` to pixels.
        params: the settings.

    Returns:
        A :class:`TissueMask` at ``mpp``. Input without brightfield tissue (blank glass, a dark
        fluorescence image) gives an empty mask and a message in ``warnings`` (also logged), never an
        exception.

    Raises:
        ValueError: ``rgb`` is not (H, W, 3) uint8 or ``mpp`` is not a positive number.
    """
    rgb = _check_rgb(rgb)
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number of µm/px, got {mpp}")
    height, width = rgb.shape[:2]
    warnings: list[str] = []
    empty = np.zeros((height, width), dtype=bool)
    if rgb.size == 0:
        return _finish(TissueMask(empty, mpp, float("nan"), params, warnings=["empty image"]))

    brightness = rgb.max(axis=2)
    median_brightness = float(np.median(brightness))
    if median_brightness < params.dark_value:
        warnings.append(
            f"no brightfield H&E tissue: background is dark (median brightness {median_brightness:.0f}/255), "
            "looks like fluorescence (or a black image); tissue mask is empty")
        return _finish(TissueMask(empty, mpp, float("nan"), params, dark_fraction=1.0, warnings=warnings))

    # Ink and dark areas are found on a median-smoothed image, so single dark nuclei or coloured specks
    # at fine resolutions are not taken for marker; ink regions under min_pen_area_um2 are ignored.
    median_px = radius_um_to_px(params.median_radius_um, mpp)
    smooth_rgb = _median_rgb(rgb, median_px)
    min_pen_px = area_um2_to_px(params.min_pen_area_um2, mpp)
    dark = _drop_small(dark_mask(smooth_rgb, dark_value=params.dark_value), min_pen_px)
    if params.suppress_pen:
        ink = _drop_small(pen_ink_mask(smooth_rgb, min_saturation=params.min_pen_saturation,
                                       channel_margin=params.pen_channel_margin), min_pen_px)
    else:
        ink = np.zeros_like(dark)
    excluded = ink | dark

    channel = saturation_255(rgb) if params.channel == "saturation" else darkness_255(rgb)
    channel_u8 = np.clip(np.rint(channel), 0, 255).astype(np.uint8)
    if median_px > 0:
        channel_u8 = rank_median(channel_u8, footprint=disk(median_px))

    values = channel_u8[~excluded]
    if values.size == 0 or values.min() == values.max():
        otsu = float("nan") if values.size == 0 else float(values[0])
    else:
        otsu = float(threshold_otsu(values))
    threshold = params.min_threshold if not math.isfinite(otsu) else max(otsu, params.min_threshold)
    if params.max_threshold is not None:
        threshold = min(threshold, params.max_threshold)

    tissue = (channel_u8 > threshold) & ~excluded
    close_px = radius_um_to_px(params.close_radius_um, mpp)
    if close_px > 0:
        tissue = closing(tissue, _disk(close_px))
    open_px = radius_um_to_px(params.open_radius_um, mpp)
    if open_px > 0:
        tissue = opening(tissue, _disk(open_px))
    hole_px = area_um2_to_px(params.min_hole_area_um2, mpp)
    if hole_px >= 1:
        tissue = remove_small_holes(tissue, max_size=max(0, math.ceil(hole_px) - 1))
    object_px = area_um2_to_px(params.min_object_area_um2, mpp)
    keep_from = max(0, math.ceil(object_px) - 1)  # objects of keep_from px or fewer are removed

    if keep_from > 0:
        tissue = remove_small_objects(tissue, max_size=keep_from)

    pen_fraction = 0.0
    dark_fraction = 0.0
    if excluded.any():
        margin_px = max(1, radius_um_to_px(params.pen_margin_um, mpp)) if params.pen_margin_um > 0 else 0
        footprint = _disk(margin_px) if margin_px > 0 else None
        grown_ink = dilation(ink, footprint) if (footprint is not None and ink.any()) else ink
        grown_dark = dilation(dark, footprint) if (footprint is not None and dark.any()) else dark
        pen_fraction = float(np.count_nonzero(grown_ink)) / ink.size
        dark_fraction = float(np.count_nonzero(grown_dark)) / dark.size
        tissue &= ~(grown_ink | grown_dark)
        if keep_from > 0:
            tissue = remove_small_objects(tissue, max_size=keep_from)
        if pen_fraction > 0.001:
            log.info("%.1f %% of the image removed as pen ink", 100 * pen_fraction)

    result = TissueMask(tissue.astype(bool, copy=False), mpp, float(threshold), params, otsu_threshold=otsu,
                        pen_fraction=pen_fraction, dark_fraction=dark_fraction, warnings=warnings)
    if not result.mask.any():
        reason = ("no pixels left after removing ink and dark areas" if not math.isfinite(otsu) else
                  f"no region above threshold {threshold:.1f} on {params.channel} and larger than "
                  f"{params.min_object_area_um2:g} µm²")
        warnings.append(f"no tissue found ({reason}); blank glass or a very faint slide?")
    return _finish(result)


def _disk(radius_px: int):
    """A disk footprint; large ones as a sequence of small ones (same result, far faster)."""
    return disk(radius_px, decomposition="sequence") if radius_px > 3 else disk(radius_px)


def _median_rgb(rgb: np.ndarray, radius_px: int) -> np.ndarray:
    """Per-channel median filter of an RGB uint8 image with a disk of ``radius_px`` (copy if 0)."""
    if radius_px <= 0:
        return rgb.copy()
    footprint = disk(radius_px)
    return np.stack([rank_median(np.ascontiguousarray(rgb[..., c]), footprint=footprint)
                     for c in range(3)], axis=-1)


def _drop_small(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """``mask`` without connected regions smaller than ``min_area_px`` pixels."""
    max_size = max(0, math.ceil(min_area_px) - 1)
    if max_size == 0 or not mask.any():
        return mask
    return remove_small_objects(mask, max_size=max_size)


def _finish(result: TissueMask) -> TissueMask:
    for message in result.warnings:
        log.warning("tissue mask: %s", message)
    return result


def mask_slide(slide, params: TissueParams = TissueParams()) -> tuple[TissueMask, np.ndarray]:
    """Mask a :class:`~wsi_ad.slide.Slide` from its thumbnail at ``params.mask_mpp`` µm/px.

    Returns:
        ``(mask, thumbnail)``: the :class:`TissueMask` (its ``mpp`` is ``params.mask_mpp``) and the
        (H, W, 3) uint8 thumbnail it was computed on (for a QC image).
    """
    thumbnail = slide.thumbnail(params.mask_mpp)
    result = tissue_mask(thumbnail, mpp=params.mask_mpp, params=params)
    return result, thumbnail


# -- QC image ---------------------------------------------------------------------------------------

def qc_image(thumbnail: np.ndarray, mask: TissueMask | np.ndarray, *,
             color: tuple[int, int, int] = (0, 255, 0),
             thickness_px: int = 2) -> np.ndarray:
    """The thumbnail with the mask's outline drawn in ``color``, (H, W, 3) uint8 RGB (a new array).

    The outline is the tissue pixels on the mask boundary (``find_boundaries(mode="inner")``), grown
    inwards to ``thickness_px`` pixels, so it lies exactly on the mask's edge.
    """
    rgb = _check_rgb(thumbnail)
    mask_array = mask.mask if isinstance(mask, TissueMask) else np.asarray(mask, dtype=bool)
    if mask_array.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask_array.shape} does not match thumbnail {rgb.shape[:2]}")
    outline = find_boundaries(mask_array, mode="inner")
    if thickness_px > 1:
        outline = dilation(outline, np.ones((2 * thickness_px - 1,) * 2, dtype=bool)) & mask_array
    out = rgb.copy()
    out[outline] = color
    return out
