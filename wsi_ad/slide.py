"""Open any slide OpenSlide reads, resolve its resolution in microns per pixel, read regions at a target
resolution.

Resolution contract: every request is made in microns per pixel (µm/px). Magnification names are a
convenience on top (``"10x"`` is 1.0 µm/px, ``"20x"`` 0.5, ``"40x"`` 0.25). A request is served from the
coarsest pyramid level that is still at least as fine as the target ("the finest level not finer than
needed") and resized the rest of the way. A level whose resolution lies within ``tolerance`` (default 5 %)
of the target is used as it is, without resampling: a Camelyon16 slide scanned at 0.243 µm/px serves
"10x" from its native 4x-downsampled level (0.972 µm/px) rather than interpolating every pixel by 2.8 %.
:meth:`Slide.effective_mpp` says which resolution a request is really served at.

Coordinates are level-0 pixels, top-left origin, x then y, unless a name says otherwise.

Microns-per-pixel resolution order:

1. an explicit ``mpp`` given by the caller (``--mpp`` on the command line) always wins;
2. ``openslide.mpp-x`` / ``openslide.mpp-y`` (the scanner's own value);
3. TIFF ``XResolution``/``YResolution`` with a centimetre or inch ``ResolutionUnit``;
4. the objective power (``openslide.objective-power``, ``aperio.AppMag``) as 10 / power µm/px;
5. otherwise :class:`~wsi_ad.errors.MissingMppError`, naming ``--mpp``.

Values outside the range of microscopy scanners (``PLAUSIBLE_MPP``) are ignored at every step: a TIFF
written with the default 72 dpi claims 352.8 µm/px, which is no scan resolution.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsi_ad.errors import MissingMppError, SlideError
from wsi_ad.files import visible_files
from wsi_ad.images import rgb_on_white

log = logging.getLogger(__name__)

#: Range of level-0 resolutions (µm/px) that a real slide scanner produces; anything else is a
#: placeholder written by generic software (72 dpi = 352.8 µm/px) and is ignored.
PLAUSIBLE_MPP = (0.05, 20.0)

#: Relative difference under which a pyramid level counts as "at" the requested resolution.
DEFAULT_MPP_TOLERANCE = 0.05

#: File name extensions of the formats OpenSlide reads (used to discover slides in folders).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                    ".bif", ".dcm", ".czi")

#: Largest block of level pixels read at once while building a thumbnail (bounds memory).
_THUMBNAIL_BLOCK_PX = 4096

_MAGNIFICATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[xX]\s*$")


def magnification_to_mpp(magnification: str | float) -> float:
    """Nominal µm/px of an objective magnification: ``"40x"`` → 0.25, ``"20x"`` → 0.5, ``"10x"`` → 1.0.

    The convention 10 / power µm/px is the one scanners and the Camelyon16 data follow (within a few %).
    Numbers are taken as a power (``10`` → 1.0 µm/px).
    """
    if isinstance(magnification, str):
        match = _MAGNIFICATION_RE.match(magnification)
        if not match:
            raise ValueError(f"magnification must look like '10x' or '2.5x', got {magnification!r}")
        power = float(match.group(1))
    else:
        power = float(magnification)
    if power <= 0:
        raise ValueError(f"magnification must be positive, got {magnification!r}")
    return 10.0 / power


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and math.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def _float_property(properties: Mapping[str, str], key: str) -> float | None:
    value = properties.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class MppResolution:
    """Level-0 resolution of a slide and where it came from.

    Attributes:
        mpp_x, mpp_y: level-0 microns per pixel along x and y.
        source: ``"override"``, ``"openslide"``, ``"tiff-resolution"`` or ``"objective-power"``.
    """

    mpp_x: float
    mpp_y: float
    source: str


def resolve_mpp(properties: Mapping[str, str], override: float | None = None,
                path: str | os.PathLike = "<slide>") -> MppResolution:
    """Resolve level-0 µm/px from OpenSlide properties, following the order in the module docstring.

    Args:
        properties: the slide's OpenSlide property map.
        override: µm/px given by the user; wins over metadata (a disagreement over 5 % is logged).
        path: the slide's path, for messages.

    Raises:
        MissingMppError: when no source gives a plausible value and there is no override.
    """
    found: MppResolution | None = None
    ignored: list[str] = []  # implausible values seen on the way, for the error message
    mpp_x = _float_property(properties, openslide.PROPERTY_NAME_MPP_X)
    mpp_y = _float_property(properties, openslide.PROPERTY_NAME_MPP_Y)
    if _plausible(mpp_x):
        found = MppResolution(mpp_x, mpp_y if _plausible(mpp_y) else mpp_x, "openslide")
    elif mpp_x is not None:
        ignored.append(f"openslide.mpp-x = {mpp_x:g} µm/px")
    if found is None:
        found = _mpp_from_tiff_resolution(properties, ignored)
    if found is None:
        power = _float_property(properties, openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        if power is None:
            power = _float_property(properties, "aperio.AppMag")
        if power is not None and power > 0 and _plausible(10.0 / power):
            found = MppResolution(10.0 / power, 10.0 / power, "objective-power")
            if override is None:
                log.warning("%s: no mpp metadata; assuming %.3f µm/px from objective power %gx "
                            "(pass --mpp to set it exactly)", path, 10.0 / power, power)
        elif power is not None:
            ignored.append(f"objective power {power:g}")
    if override is not None:
        if not _plausible(override):
            raise SlideError(path, f"--mpp {override} is outside the range of slide scanners "
                                   f"({PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} µm/px)")
        if found is not None and abs(found.mpp_x - override) > 0.05 * override:
            log.warning("%s: --mpp %.4f overrides %.4f µm/px from %s", path, override, found.mpp_x,
                        found.source)
        return MppResolution(float(override), float(override), "override")
    if found is None:
        why = "no resolution metadata (openslide.mpp-x, TIFF resolution tags or objective power)"
        if ignored:
            why += (f"; ignored implausible {', '.join(ignored)} (outside the {PLAUSIBLE_MPP[0]}-"
                    f"{PLAUSIBLE_MPP[1]} µm/px of slide scanners, e.g. a 72-dpi placeholder)")
        raise MissingMppError(path, why + "; give the level-0 microns per pixel with --mpp "
                                          "(e.g. --mpp 0.25 for a 40x scan)")
    return found


def _mpp_from_tiff_resolution(properties: Mapping[str, str], ignored: list[str]) -> MppResolution | None:
    """µm/px from the TIFF resolution tags, or None; implausible values are appended to ``ignored``."""
    unit = properties.get("tiff.ResolutionUnit", "").lower()
    microns_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    x_res = _float_property(properties, "tiff.XResolution")
    y_res = _float_property(properties, "tiff.YResolution")
    if microns_per_unit is None or not x_res or x_res <= 0:
        return None
    mpp_x = microns_per_unit / x_res
    mpp_y = microns_per_unit / y_res if y_res and y_res > 0 else mpp_x
    if not (_plausible(mpp_x) and _plausible(mpp_y)):
        ignored.append(f"TIFF resolution {x_res:g} px/{unit} = {mpp_x:g} µm/px")
        return None
    return MppResolution(mpp_x, mpp_y, "tiff-resolution")


class Slide:
    """A whole-slide image opened with OpenSlide, with its resolution resolved.

    Use :func:`open_slide` (or ``Slide(path)``) and close it, or use it as a context manager.

    Attributes:
        path: the slide file.
        slide_id: the file name without extension (``tumor_001``), used to name per-slide outputs.
        mpp_x, mpp_y: level-0 µm/px; ``mpp_source`` says where they came from.
        level_dimensions: (width, height) of each level in that level's pixels.
        level_downsamples: (downsample_x, downsample_y) of each level relative to level 0, computed from
            the level dimensions (not taken from the file's metadata).
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None, *, check_readable: bool = True):
        """Open ``path``.

        Args:
            path: any file OpenSlide reads (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...).
            mpp: level-0 µm/px that overrides the file's metadata (the ``--mpp`` option).
            check_readable: decode one tile of the smallest level now, so a file whose image data is
                corrupt fails at open time rather than in the middle of a batch.

        Raises:
            SlideError: the file is missing, not a slide, corrupt or unreadable.
            MissingMppError: no resolution can be resolved and ``mpp`` is None.
        """
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError(self.path, "file not found")
        if self.path.is_dir():
            raise SlideError(self.path, "is a directory, not a slide file")
        vendor = openslide.OpenSlide.detect_format(self.path)
        if vendor is None:
            raise SlideError(self.path, "not a slide format OpenSlide reads (unsupported or corrupt file)")
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"OpenSlide cannot open it: {exc}") from exc
        self.vendor = vendor
        self.slide_id = slide_id_of(self.path)
        self.properties: Mapping[str, str] = dict(self._osr.properties)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self._osr.level_dimensions)
        width0, height0 = self.level_dimensions[0]
        if width0 <= 0 or height0 <= 0:
            self.close()
            raise SlideError(self.path, f"level 0 has no pixels ({width0}x{height0})")
        self.level_downsamples: tuple[tuple[float, float], ...] = tuple(
            (width0 / w, height0 / h) for w, h in self.level_dimensions)
        try:
            resolution = resolve_mpp(self.properties, override=mpp, path=self.path)
        except SlideError:
            self.close()
            raise
        self.mpp_x, self.mpp_y, self.mpp_source = resolution.mpp_x, resolution.mpp_y, resolution.source
        if check_readable:
            try:
                last = self.level_count - 1
                w, h = self.level_dimensions[last]
                self.read_level(last, (0, 0), (min(w, 64), min(h, 64)))
            except SlideError:
                self.close()
                raise

    # -- geometry -------------------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def mpp(self) -> float:
        """Level-0 µm/px, the mean of x and y (they differ only on anisotropic scanners)."""
        return (self.mpp_x + self.mpp_y) / 2.0

    @property
    def objective_power(self) -> float | None:
        """The scan's objective power if the file states it, else None."""
        return _float_property(self.properties, openslide.PROPERTY_NAME_OBJECTIVE_POWER)

    def level_mpp(self, level: int) -> float:
        """µm/px of pyramid ``level`` (mean of x and y)."""
        ds_x, ds_y = self.level_downsamples[level]
        return (self.mpp_x * ds_x + self.mpp_y * ds_y) / 2.0

    def level_for_mpp(self, mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE) -> int:
        """The coarsest level whose resolution is at least as fine as ``mpp`` µm/px (within ``tolerance``).

        A level up to ``tolerance`` (relative) coarser than the target still counts, so a 0.972 µm/px
        level serves a 1.0 µm/px request. If every level is coarser than the target, level 0 is returned
        (the caller then upsamples).
        """
        if mpp <= 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= mpp * (1.0 + tolerance):
                best = level
        return best

    def effective_mpp(self, mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE) -> float:
        """The µm/px a request for ``mpp`` is actually served at.

        That is the resolution of the chosen level when it lies within ``tolerance`` of ``mpp`` (no
        resampling), else ``mpp`` itself (the level is resized to exactly ``mpp``).
        """
        level_mpp = self.level_mpp(self.level_for_mpp(mpp, tolerance))
        return level_mpp if abs(level_mpp - mpp) <= tolerance * mpp else mpp

    def level0_size(self, size: tuple[int, int], mpp: float,
                    tolerance: float = DEFAULT_MPP_TOLERANCE) -> tuple[float, float]:
        """Level-0 (width, height) in pixels covered by ``size`` pixels read at ``mpp`` µm/px."""
        effective = self.effective_mpp(mpp, tolerance)
        return size[0] * effective / self.mpp_x, size[1] * effective / self.mpp_y

    # -- reading --------------------------------------------------------------------------------

    def read_level(self, level: int, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` = (width, height) pixels of ``level`` whose top-left is ``location`` in *level*
        pixels. Returns (height, width, 3) uint8 RGB; areas outside the scanned region are white.

        Raises:
            SlideError: the image data cannot be decoded.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        # OpenSlide takes the location in level-0 pixels and divides by its own level downsample.
        os_downsample = self._osr.level_downsamples[level]
        location0 = (int(round(location[0] * os_downsample)), int(round(location[1] * os_downsample)))
        try:
            image = self._osr.read_region(location0, level, (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as exc:
            raise SlideError(self.path, f"cannot read image data at level {level}, "
                                        f"location {location}: {exc}") from exc
        return rgb_on_white(image)    # OpenSlide's RGBA: outside the scanned area is transparent

    def read_region(self, location: tuple[float, float], size: tuple[int, int], mpp: float,
                    tolerance: float = DEFAULT_MPP_TOLERANCE) -> np.ndarray:
        """Read a region of ``size`` = (width, height) pixels at ``mpp`` µm/px.

        Args:
            location: top-left of the region in level-0 pixels (x, y).
            size: output (width, height) in pixels at the effective resolution.
            mpp: requested µm/px; served at :meth:`effective_mpp` (see the module docstring).
            tolerance: relative difference under which a level is used without resampling.

        Returns:
            (height, width, 3) uint8 RGB covering level-0 box
            ``location .. location + level0_size(size, mpp)``.
        """
        level = self.level_for_mpp(mpp, tolerance)
        ds_x, ds_y = self.level_downsamples[level]
        width0, height0 = self.level0_size(size, mpp, tolerance)
        # The region in (fractional) level pixels, and the integer window of level pixels holding it.
        left, top = location[0] / ds_x, location[1] / ds_y
        right, bottom = left + width0 / ds_x, top + height0 / ds_y
        x0, y0 = math.floor(left + 1e-6), math.floor(top + 1e-6)
        x1, y1 = math.ceil(right - 1e-6), math.ceil(bottom - 1e-6)
        window = self.read_level(level, (x0, y0), (x1 - x0, y1 - y0))
        box = (left - x0, top - y0, right - x0, bottom - y0)
        if window.shape[1] == size[0] and window.shape[0] == size[1] and max(map(abs, box[:2])) < 1e-6:
            return window
        return _resize(window, size, box)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px as (height, width, 3) uint8 RGB, background white.

        Read block by block from the coarsest level fine enough, so memory stays bounded by the output
        size (plus one block) whatever the slide size. The output is exactly
        ``round(level-0 size * level-0 mpp / mpp)`` pixels, i.e. the resolution is ``mpp`` (no snapping).
        """
        width0, height0 = self.dimensions
        out_w = max(1, int(round(width0 * self.mpp_x / mpp)))
        out_h = max(1, int(round(height0 * self.mpp_y / mpp)))
        level = self.level_for_mpp(mpp, tolerance=0.0)
        level_w, level_h = self.level_dimensions[level]
        # Level pixels per output pixel, per axis.
        scale_x, scale_y = level_w / out_w, level_h / out_h
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        block_w = max(1, int(_THUMBNAIL_BLOCK_PX / scale_x))
        block_h = max(1, int(_THUMBNAIL_BLOCK_PX / scale_y))
        for oy0 in range(0, out_h, block_h):
            oy1 = min(out_h, oy0 + block_h)
            for ox0 in range(0, out_w, block_w):
                ox1 = min(out_w, ox0 + block_w)
                left, top, right, bottom = ox0 * scale_x, oy0 * scale_y, ox1 * scale_x, oy1 * scale_y
                x0, y0 = math.floor(left), math.floor(top)
                x1, y1 = min(level_w, math.ceil(right)), min(level_h, math.ceil(bottom))
                window = self.read_level(level, (x0, y0), (x1 - x0, y1 - y0))
                out[oy0:oy1, ox0:ox1] = _resize(window, (ox1 - ox0, oy1 - oy0),
                                                 (left - x0, top - y0, right - x0, bottom - y0))
        return out

    def summary(self) -> dict:
        """A JSON-ready description: path, vendor, mpp and its source, levels with their µm/px."""
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
            "vendor": self.vendor,
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": self.level_downsamples[i][0],
                 "mpp": self.level_mpp(i)}
                for i, (w, h) in enumerate(self.level_dimensions)
            ],
        }

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the OpenSlide handle (idempotent)."""
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"Slide({str(self.path)!r}, {w}x{h} px, {self.level_count} levels, "
                f"{self.mpp_x:.4f} µm/px from {self.mpp_source})")


def open_slide(path: str | os.PathLike, mpp: float | None = None, *, check_readable: bool = True) -> Slide:
    """Open a slide file; see :class:`Slide`."""
    return Slide(path, mpp=mpp, check_readable=check_readable)


def _resize(image: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Resample the ``box`` (left, top, right, bottom; fractional pixels) of ``image`` to ``size``.

    Area averaging (``BOX``) when shrinking, which is what a lower magnification sees; bilinear when
    enlarging.
    """
    shrinking = (box[2] - box[0]) >= size[0]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    resized = Image.fromarray(image).resize((int(size[0]), int(size[1])), resample=resample, box=box)
    return np.asarray(resized)


def slide_id_of(path: str | os.PathLike) -> str:
    """The id of the slide at ``path``: the file name the user gave, without its extension
    (``case_A.tif`` -> ``case_A``). A symlink's own name, never its target's: the id names the slide's store,
    its report row and its label and annotation look-ups, so it is decided here, once. Ids are compared
    case-insensitively (:func:`wsi_ad.metrics.normalize_slide_id`)."""
    return Path(path).stem


def find_slides(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Slide files named by ``paths``: files as given, folders searched (recursively) by extension.

    A folder of DICOM files is one slide (OpenSlide opens it from any of its files): only the first
    ``.dcm`` of each folder is returned. Files are returned sorted and without duplicates; hidden files
    and folders (names starting with ``.``) are skipped.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            candidates = visible_files(path, SLIDE_EXTENSIONS)
        else:
            candidates = [path]
        dicom_dirs: set[Path] = set()
        for candidate in candidates:
            if candidate.suffix.lower() == ".dcm":
                if candidate.parent in dicom_dirs:
                    continue
                dicom_dirs.add(candidate.parent)
            if candidate not in found:
                found.append(candidate)
    return found
