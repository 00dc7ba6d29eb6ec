"""Camelyon16 evaluation: slide-level ROC AUC (with bootstrap CI), tile-level labels and AUC, and FROC.

Pure numpy / scikit-learn / scikit-image / shapely; importable without Dask or torch.

Units, throughout: coordinates are level-0 pixels (x to the right, y down, top-left origin), as in the
ASAP XML files and ``tiles/coords``; lengths given in µm say so (``_um``); ``mpp0`` is the level-0
resolution in µm per pixel (0.243 for Camelyon16).

- **Reference labels** (``read_reference_csv``): the official ``testing/reference.csv``
  (``Test_001,Tumor,IDC,Macro`` / ``Test_003,Normal,DCIS,None``, no header).
- **Slide level** (``roc_auc``, ``bootstrap_auc_ci``, ``slide_auc_report``): one score per slide, AUC
  over all test slides and over the Macro / Micro splits (tumour slides of that category vs every normal
  slide, as in the Camelyon16 paper's analysis).
- **Tile level** (``tile_labels``, ``tile_auc``): a tile is tumour when its footprint lies inside the
  tumour polygons (by default entirely, as in the paper), normal when it does not overlap them, and
  left out otherwise; the AUC compares tumour tiles of tumour slides with the tiles of normal slides.
- **FROC** (``evaluation_mask``, ``froc``, ``detections_from_heatmap``): a re-implementation of the
  official Camelyon16 lesion-level evaluation (``Evaluation_FROC.py`` by B. Ehteshami Bejnordi):
  evaluation masks at level 5, annotations dilated by 75 µm (a 37.5 µm radius), 8-connected lesions,
  isolated tumour cells (major axis < 275 µm after the dilation) neither counted nor false positives,
  and the score is the mean sensitivity at 1/4, 1/2, 1, 2, 4, 8 false positives per slide.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import scipy.stats
import shapely
import skimage.feature
import skimage.measure
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as _sk_roc_curve

from wsi_ad.annotations import EXCLUSION, TUMOR, Annotation, fill_polygon
from wsi_ad.errors import InputFileError, WsiAdError

#: Level-0 resolution of the Camelyon16 slides, µm per pixel.
CAMELYON16_MPP = 0.243
#: Pyramid level (downsample 2**level) at which the official evaluation masks are built.
EVALUATION_LEVEL = 5
#: Total dilation of the annotations in the official evaluation, µm (applied as a 37.5 µm radius).
DILATION_UM = 75.0
#: Major axis (µm, measured on the dilated region) below which a region is isolated tumour cells.
ITC_MAJOR_AXIS_UM = 275.0
#: Average false positives per slide at which the FROC score averages the sensitivity.
FROC_FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Slides left out of the lesion-level (FROC) evaluation: Test_114's annotations are incomplete.
DEFAULT_FROC_EXCLUDE: frozenset[str] = frozenset({"test_114"})

#: File extensions stripped from slide ids before comparing them.
_ID_EXTENSIONS = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".zarr", ".xml", ".csv", ".h5", ".png")
_METASTASIS = {"macro": "Macro", "micro": "Micro"}
_NO_METASTASIS = {"", "none", "normal", "n/a", "na", "-"}
_HEADER_FIRST_FIELDS = {"image", "images", "slide", "slide_id", "slideid", "id", "name", "filename", "file", "case"}


class MetricsError(WsiAdError):
    """Evaluation input that cannot be used: bad labels or scores, unknown slides, no lesions to find."""


class ReferenceCsvError(InputFileError, MetricsError):
    """A reference label file (Camelyon16 ``reference.csv``) is missing or malformed; names file and line."""


def normalize_slide_id(slide_id: str | os.PathLike) -> str:
    """The comparison key of a slide id: file name without folder and known extension, lower case.

    ``"Test_001"``, ``"test_001.tif"`` and ``"/data/TEST_001.zarr"`` all give ``"test_001"``.
    """
    name = os.path.basename(os.fspath(slide_id).strip().rstrip("/\\"))
    lower = name.lower()
    for ext in _ID_EXTENSIONS:
        if lower.endswith(ext) and len(lower) > len(ext):
            lower = lower[: -len(ext)]
            break
    return lower


# ---------------------------------------------------------------------------------------------------
# Reference labels
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceRow:
    """One slide of ``reference.csv``.

    ``slide_id`` as written in the file (``"Test_001"``); ``label`` ``"Tumor"`` or ``"Normal"``;
    ``primary`` the primary tumour type (``"IDC"``, ...) or None when the field is empty;
    ``metastasis`` ``"Macro"`` / ``"Micro"`` for tumour slides, None for normal ones; ``line`` the
    1-based line number in the file.
    """

    slide_id: str
    label: str
    primary: str | None
    metastasis: str | None
    line: int = 0

    @property
    def key(self) -> str:
        """Lower-case slide id used for matching (``normalize_slide_id``)."""
        return normalize_slide_id(self.slide_id)

    @property
    def is_tumor(self) -> bool:
        return self.label == "Tumor"


def _parse_reference_row(fields: list[str], line: int) -> ReferenceRow:
    fields = [f.strip() for f in fields]
    while fields and fields[-1] == "" and len(fields) > 2:
        fields.pop()
    if len(fields) < 2 or not fields[0]:
        raise ValueError(f"expected 'slide_id,Tumor|Normal[,primary type][,Macro|Micro|None]', got {fields!r}")
    slide_id, label_text = fields[0], fields[1].lower()
    if label_text not in ("tumor", "tumour", "normal"):
        raise ValueError(f"label of {slide_id!r} is {fields[1]!r}; expected 'Tumor' or 'Normal'")
    label = "Normal" if label_text == "normal" else "Tumor"
    rest = fields[2:]
    if len(rest) > 2:
        raise ValueError(f"{slide_id!r} has {len(fields)} fields; expected at most 4")
    primary_text, category_text = "", ""
    if len(rest) == 2:
        # official order: primary type, then category; accept the category first as well
        if rest[1].lower() in _METASTASIS or rest[1].lower() in _NO_METASTASIS:
            primary_text, category_text = rest
        elif rest[0].lower() in _METASTASIS:
            category_text, primary_text = rest
        else:
            raise ValueError(f"metastasis category of {slide_id!r} is {rest[1]!r}; expected Macro, Micro or None")
    elif len(rest) == 1:
        if rest[0].lower() in _METASTASIS or rest[0].lower() in _NO_METASTASIS:
            category_text = rest[0]
        else:
            primary_text = rest[0]
    category_key = category_text.lower()
    metastasis = _METASTASIS.get(category_key)
    if label == "Tumor" and metastasis is None:
        raise ValueError(f"tumour slide {slide_id!r} has metastasis category {category_text!r}; expected Macro or Micro")
    if label == "Normal" and category_key not in _NO_METASTASIS:
        raise ValueError(f"normal slide {slide_id!r} has metastasis category {category_text!r}; expected None or empty")
    return ReferenceRow(slide_id=slide_id, label=label, primary=primary_text or None, metastasis=metastasis, line=line)


def read_reference_csv(path: str | os.PathLike) -> list[ReferenceRow]:
    """Read the Camelyon16 test reference (``testing/reference.csv``), in file order.

    Rows are ``slide_id,Tumor|Normal,primary type,Macro|Micro|None`` without a header (the official
    file); normal rows may have the last two fields empty (``Test_002,Normal,,``). Labels and categories
    compare case-insensitively, blank lines and a header line (first field ``image``/``slide``/``id``...)
    are skipped, a UTF-8 byte-order mark is tolerated.

    Raises ``ReferenceCsvError`` (a ``MetricsError`` and ``InputFileError``) naming the file and line for
    a missing file, an unknown label, a tumour slide without Macro/Micro, a normal slide with one, too
    many fields, or a slide id listed twice (ids compare case-insensitively).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ReferenceCsvError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceCsvError(path, f"cannot read: {exc}") from None
    rows: list[ReferenceRow] = []
    seen: dict[str, int] = {}
    for line_no, fields in enumerate(csv.reader(text.splitlines()), start=1):
        if not fields or all(not f.strip() for f in fields):
            continue
        if not rows and fields[0].strip().lower() in _HEADER_FIRST_FIELDS:
            continue
        try:
            row = _parse_reference_row(fields, line_no)
        except ValueError as exc:
            raise ReferenceCsvError(path, f"line {line_no}: {exc}") from None
        if row.key in seen:
            raise ReferenceCsvError(path, f"line {line_no}: slide {row.slide_id!r} already listed on line {seen[row.key]}")
        seen[row.key] = line_no
        rows.append(row)
    if not rows:
        raise ReferenceCsvError(path, "no reference rows")
    return rows


# ---------------------------------------------------------------------------------------------------
# Slide level: ROC AUC, bootstrap CI, report
# ---------------------------------------------------------------------------------------------------


def _labels_scores(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise MetricsError(f"labels and scores must be 1-D of the same length, got shapes {y.shape} and {s.shape}")
    if y.dtype == bool:
        y = y.astype(np.int8)
    if y.size and not np.isin(y, (0, 1)).all():
        raise MetricsError(f"labels must be 0 (normal) or 1 (tumour), got values {np.unique(y)[:10].tolist()}")
    y = y.astype(np.int8)
    if not np.isfinite(s).all():
        raise MetricsError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise MetricsError(f"AUC needs both classes; got {n_pos} positive and {y.size - n_pos} negative")
    return y, s


def roc_auc(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn); ``labels`` 0/1 (1 = tumour), higher score = more tumour.

    Ties count one half (Mann-Whitney). Raises ``MetricsError`` for mismatched lengths, labels other
    than 0/1, non-finite scores, or a single class.
    """
    y, s = _labels_scores(labels, scores)
    return float(roc_auc_score(y, s))


def _rank_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Row-wise Mann-Whitney AUC of (B, n_pos) positive vs (B, n_neg) negative scores (average ranks)."""
    n_pos, n_neg = pos.shape[1], neg.shape[1]
    ranks = scipy.stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def bootstrap_auc_ci(
    labels: Sequence | np.ndarray,
    scores: Sequence | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval ``(low, high)`` of the ROC AUC, level ``1 - alpha``.

    Stratified: each of the ``n_boot`` resamples draws the positives with replacement from the
    positives and the negatives from the negatives, so every resample keeps the class sizes (and
    has an AUC). Deterministic for a given ``seed`` (``numpy.random.default_rng``).
    """
    y, s = _labels_scores(labels, scores)
    if n_boot < 1:
        raise MetricsError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise MetricsError(f"alpha must be in (0, 1), got {alpha}")
    pos, neg = s[y == 1], s[y == 0]
    rng = np.random.default_rng(seed)
    block = max(1, int(4_000_000 // (pos.size + neg.size)))
    aucs = []
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        p = pos[rng.integers(0, pos.size, size=(b, pos.size))]
        n = neg[rng.integers(0, neg.size, size=(b, neg.size))]
        aucs.append(_rank_auc(p, n))
    low, high = np.quantile(np.concatenate(aucs), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def roc_points(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray,
               max_points: int | None = None) -> dict[str, list]:
    """ROC curve for plotting: ``{"fpr": [...], "tpr": [...], "thresholds": [...]}`` (scikit-learn,
    every point kept, or ``max_points`` evenly spaced ones including both ends); the first threshold, +inf in
    scikit-learn, is given as None (JSON has no inf)."""
    y, s = _labels_scores(labels, scores)
    fpr, tpr, thr = _sk_roc_curve(y, s, drop_intermediate=False)
    if max_points is not None and len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "thresholds": [float(v) if np.isfinite(v) else None for v in thr],
    }


def _auc_block(labels: np.ndarray, scores: np.ndarray, n_boot: int, seed: int, alpha: float) -> dict:
    n_tumor, n_normal = int(labels.sum()), int(labels.size - labels.sum())
    out: dict = {"n_tumor": n_tumor, "n_normal": n_normal}
    if n_tumor == 0 or n_normal == 0:
        out.update(auc=None, ci_low=None, ci_high=None, roc=None,
                   note=f"AUC undefined: {n_tumor} tumour and {n_normal} normal slides")
        return out
    low, high = bootstrap_auc_ci(labels, scores, n_boot=n_boot, seed=seed, alpha=alpha)
    out.update(auc=roc_auc(labels, scores), ci_low=low, ci_high=high, roc=roc_points(labels, scores))
    return out


#: How ``slide_auc_report`` treats a reference slide without a score.
MISSING_POLICIES = ("omit", "wrong")


def slide_auc_report(
    reference_rows: Iterable[ReferenceRow],
    slide_scores: Mapping[str, float],
    *,
    missing: str = "omit",
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Slide-level evaluation: AUC with bootstrap CI overall and for the Macro / Micro splits.

    ``slide_scores`` maps slide ids (matched case-insensitively, extensions ignored, see
    ``normalize_slide_id``) to one finite score per slide, higher = more likely tumour. ``overall``
    compares every tumour slide with every normal slide; ``macro`` / ``micro`` compare the tumour slides
    of that category with all normal slides (the split of the Camelyon16 paper). Each block holds
    ``auc``, ``ci_low``, ``ci_high`` (stratified percentile bootstrap, ``1 - alpha``), ``n_tumor``,
    ``n_normal`` and ``roc`` points (``fpr``, ``tpr``, ``thresholds``); a block with one class empty has
    ``auc`` None and a ``note``.

    Reference slides without a score are listed in ``missing`` (and ``complete`` is False). With
    ``missing="omit"`` they are left out of the AUC; with ``missing="wrong"`` every reference slide stays in
    the denominator and an unscored one counts as a wrong answer: a tumour slide ranks below, a normal slide
    above, every scored slide (the AUC of a submission that gave it the worst possible probability); the
    AUC of the scored slides alone is then ``scored_only``. Scores of slides not in the reference are
    listed in ``unexpected`` and not used. Raises ``MetricsError`` for a non-finite score, two scores for
    one slide, or an unknown ``missing``.
    """
    if missing not in MISSING_POLICIES:
        raise MetricsError(f"missing must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
    rows = list(reference_rows)
    scores: dict[str, float] = {}
    for sid, value in slide_scores.items():
        key = normalize_slide_id(sid)
        if key in scores:
            raise MetricsError(f"slide {sid!r} has two scores (ids compare case-insensitively)")
        value = float(value)
        if not math.isfinite(value):
            raise MetricsError(f"score of slide {sid!r} is {value}")
        scores[key] = value
    ref_keys = {row.key for row in rows}
    missing_ids = [row.slide_id for row in rows if row.key not in scores]
    unexpected = sorted(sid for sid in slide_scores if normalize_slide_id(sid) not in ref_keys)
    scored = [row for row in rows if row.key in scores]
    known = [scores[row.key] for row in scored]
    worst_for = {True: min(known, default=0.0) - 1.0, False: max(known, default=0.0) + 1.0}
    evaluated = rows if missing == "wrong" else scored
    labels = np.array([int(row.is_tumor) for row in evaluated], dtype=np.int8)
    values = np.array([scores.get(row.key, worst_for[row.is_tumor]) for row in evaluated], dtype=np.float64)
    report: dict = {
        "n_reference": len(rows),
        "n_scored": len(scored),
        "complete": not missing_ids,
        "missing": missing_ids,
        "missing_counted_as": {"omit": "left out", "wrong": "wrong"}[missing],
        "unexpected": unexpected,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha, "method": "stratified percentile"},
        "overall": _auc_block(labels, values, n_boot, seed, alpha),
    }
    for category in ("Macro", "Micro"):
        keep = np.array([(not row.is_tumor) or row.metastasis == category for row in evaluated], dtype=bool)
        report[category.lower()] = _auc_block(labels[keep], values[keep], n_boot, seed, alpha)
    if missing == "wrong":
        scored_labels = np.array([int(row.is_tumor) for row in scored], dtype=np.int8)
        report["scored_only"] = _auc_block(scored_labels, np.asarray(known, dtype=np.float64), n_boot, seed, alpha)
    return report


# ---------------------------------------------------------------------------------------------------
# Tile level
# ---------------------------------------------------------------------------------------------------


def _region(annotations: Iterable[Annotation], kind: str) -> np.ndarray:
    """Disjoint polygons (shapely array) covering the union of the ``kind`` annotations, made valid."""
    polys = [shapely.Polygon(a.vertices) for a in annotations if a.kind == kind]
    if not polys:
        return np.empty(0, dtype=object)
    union = shapely.union_all(shapely.make_valid(np.array(polys, dtype=object)))
    pieces: list = []
    for part in _polygon_parts(union):
        pieces.extend(_split_polygon(part))
    parts = np.array(pieces, dtype=object)
    shapely.prepare(parts)
    return parts


def _polygon_parts(geometry) -> list:
    """The polygons of positive area in a (multi)polygon or collection (lines and points dropped)."""
    parts = shapely.get_parts(geometry)
    return list(parts[(shapely.get_type_id(parts) == 3) & (shapely.area(parts) > 0)])


def _split_polygon(polygon, max_vertices: int = 256, depth: int = 0) -> list:
    """``polygon`` cut into pieces of at most ``max_vertices`` vertices by halving its bounding box along
    the longer side, recursively. The pieces only share cut lines, so their areas add up to the polygon's;
    small pieces make each tile's intersection cheap (a whole-lesion outline has thousands of vertices)."""
    if shapely.get_num_coordinates(polygon) <= max_vertices or depth >= 16:
        return [polygon]
    x0, y0, x1, y1 = polygon.bounds
    if x1 - x0 >= y1 - y0:
        xm = 0.5 * (x0 + x1)
        halves = (shapely.box(x0, y0, xm, y1), shapely.box(xm, y0, x1, y1))
    else:
        ym = 0.5 * (y0 + y1)
        halves = (shapely.box(x0, y0, x1, ym), shapely.box(x0, ym, x1, y1))
    out = []
    for half in halves:
        for piece in _polygon_parts(shapely.intersection(polygon, half)):
            out.extend(_split_polygon(piece, max_vertices, depth + 1))
    return out


def _overlap_area(tiles: np.ndarray, tile_area: float, parts: np.ndarray) -> np.ndarray:
    """Per tile, the area (level-0 px²) of its intersection with the disjoint polygons ``parts``."""
    out = np.zeros(tiles.size, dtype=np.float64)
    if parts.size == 0 or tiles.size == 0:
        return out
    tile_idx, part_idx = shapely.STRtree(parts).query(tiles, predicate="intersects")
    if tile_idx.size == 0:
        return out
    inside = shapely.contains(parts[part_idx], tiles[tile_idx])  # prepared: fast for the interior tiles
    area = np.full(tile_idx.size, tile_area, dtype=np.float64)
    edge = ~inside
    if edge.any():
        area[edge] = shapely.area(shapely.intersection(tiles[tile_idx[edge]], parts[part_idx[edge]]))
    np.add.at(out, tile_idx, area)
    return out


#: Fractions of a tile's area this close to 0 or to the threshold are taken as equal (float round-off of
#: the polygon pieces; 1e-9 of a 256 x 256 px tile is 7e-5 px²).
_AREA_TOL = 1e-9


def tile_labels(
    coords: np.ndarray,
    tile_size_level0: float | tuple[float, float],
    annotations: Iterable[Annotation],
    *,
    min_tumor_overlap: float = 1.0,
) -> np.ndarray:
    """Ground-truth label of each tile from the lesion annotations: int8, 1 tumour, 0 normal, -1 left out.

    ``coords`` (N, 2) are the tiles' level-0 top-left (x, y), ``tile_size_level0`` the footprint
    (w, h) in level-0 pixels (one number for a square). The overlap of each footprint with the tumour
    polygons (their union, self-intersecting ones made valid) is computed exactly with shapely:

    - ``1`` when the tumour fraction of the footprint is >= ``min_tumor_overlap`` (default 1.0: the
      whole tile inside tumour, as in the paper), and the tile overlaps no exclusion polygon;
    - ``0`` when the footprint overlaps no tumour polygon (a shared edge, zero area, is no overlap; areas
      below 1e-9 of the tile count as zero) and no exclusion polygon;
    - ``-1`` (ambiguous, to be left out) for a partial overlap below ``min_tumor_overlap``, or any
      overlap of positive area with an exclusion polygon (ASAP group ``_2``: normal tissue drawn inside
      tumour, never trusted as either class).

    Candidate polygons come from an STRtree and interior tiles are settled by a prepared ``contains``
    test, so only tiles on a polygon boundary pay for an intersection.
    """
    if not 0.0 < min_tumor_overlap <= 1.0:
        raise MetricsError(f"min_tumor_overlap must be in (0, 1], got {min_tumor_overlap}")
    xy = np.asarray(coords, dtype=np.float64)
    if xy.size == 0:
        return np.zeros(0, dtype=np.int8)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise MetricsError(f"coords must be (N, 2) level-0 (x, y), got shape {xy.shape}")
    w, h = (float(tile_size_level0), float(tile_size_level0)) if np.isscalar(tile_size_level0) else map(
        float, tile_size_level0)
    if not (w > 0 and h > 0):
        raise MetricsError(f"tile size must be positive, got {tile_size_level0}")
    annotations = list(annotations)
    tiles = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + w, xy[:, 1] + h)
    tile_area = w * h
    tumor_frac = _overlap_area(tiles, tile_area, _region(annotations, TUMOR)) / tile_area
    excluded = _overlap_area(tiles, tile_area, _region(annotations, EXCLUSION)) / tile_area > _AREA_TOL
    labels = np.full(xy.shape[0], -1, dtype=np.int8)
    labels[tumor_frac <= _AREA_TOL] = 0
    labels[tumor_frac >= min_tumor_overlap - _AREA_TOL] = 1
    labels[excluded] = -1
    return labels


def _as_scores(values, what: str) -> np.ndarray:
    s = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(s).all():
        raise MetricsError(f"{what}: {int((~np.isfinite(s)).sum())} tile scores are NaN or infinite")
    return s


def tile_auc(
    tumor_slides: Mapping[str, tuple[np.ndarray, np.ndarray]] | Iterable[tuple[np.ndarray, np.ndarray]],
    normal_slides: Mapping[str, np.ndarray] | Iterable[np.ndarray],
) -> dict:
    """Tile-level AUC by the paper's protocol: tumour tiles of tumour slides vs the tiles of normal slides.

    ``tumor_slides`` holds ``(scores, labels)`` per tumour slide (labels from ``tile_labels``; only
    label 1 is used, normal and ambiguous tiles of tumour slides are left out); ``normal_slides`` holds
    the scores of every tile of each normal slide. Either may be a mapping by slide id or a sequence.
    Returns ``{"auc", "n_tumor_tiles", "n_normal_tiles", "n_tumor_slides", "n_normal_slides",
    "n_unused_tiles_on_tumor_slides"}``. Raises ``MetricsError`` for non-finite scores, mismatched
    lengths, or no tiles of one class.
    """
    tumor_items = list(tumor_slides.items()) if isinstance(tumor_slides, Mapping) else list(enumerate(tumor_slides))
    normal_items = list(normal_slides.items()) if isinstance(normal_slides, Mapping) else list(enumerate(normal_slides))
    pos, neg, unused = [], [], 0
    for sid, (scores, labels) in tumor_items:
        s = _as_scores(scores, f"tumour slide {sid!r}")
        y = np.asarray(labels).reshape(-1)
        if y.shape != s.shape:
            raise MetricsError(f"tumour slide {sid!r}: {s.size} scores but {y.size} labels")
        pos.append(s[y == 1])
        unused += int((y != 1).sum())
    for sid, scores in normal_items:
        neg.append(_as_scores(scores, f"normal slide {sid!r}"))
    p = np.concatenate(pos) if pos else np.zeros(0)
    n = np.concatenate(neg) if neg else np.zeros(0)
    if p.size == 0 or n.size == 0:
        raise MetricsError(f"tile AUC needs tumour and normal tiles; got {p.size} tumour and {n.size} normal")
    labels = np.concatenate([np.ones(p.size, np.int8), np.zeros(n.size, np.int8)])
    return {
        "auc": roc_auc(labels, np.concatenate([p, n])),
        "n_tumor_tiles": int(p.size),
        "n_normal_tiles": int(n.size),
        "n_tumor_slides": len(tumor_items),
        "n_normal_slides": len(normal_items),
        "n_unused_tiles_on_tumor_slides": unused,
    }


# ---------------------------------------------------------------------------------------------------
# FROC: evaluation masks, detections, curve and score
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EvaluationMask:
    """The labelled lesion mask of one tumour slide at pyramid level ``level`` (official evaluation).

    ``labels`` is int32, 0 background and 1..n one per lesion (8-connected regions of the dilated,
    hole-filled annotation mask, numbered in raster order as ``skimage.measure.label`` does on the whole
    slide). To save memory it holds only the window of the level-``level`` grid that contains every
    lesion: ``offset`` is that window's (row, col) in the full grid of ``shape`` (rows, cols) =
    (ceil(h / 2**level), ceil(w / 2**level)); ``full_labels()`` gives the whole grid. Cell (r, c) covers
    level-0 x in [c * 2**level, (c + 1) * 2**level), likewise y. ``itc_labels`` are the labels of isolated
    tumour cells; ``level0_size`` is the slide's level-0 (w, h); ``mpp0`` its level-0 µm/px;
    ``major_axis_um`` the major axis (µm) of each label 1..n, index label - 1.
    """

    labels: np.ndarray
    offset: tuple[int, int]
    shape: tuple[int, int]
    itc_labels: frozenset[int]
    level: int
    mpp0: float
    level0_size: tuple[int, int]
    major_axis_um: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def downsample(self) -> int:
        return 2**self.level

    @property
    def n_regions(self) -> int:
        """Number of labelled regions, ITCs included."""
        return int(self.major_axis_um.size)

    @property
    def lesion_labels(self) -> list[int]:
        """Labels of the lesions to be detected (every region that is not an ITC)."""
        return [k for k in range(1, self.n_regions + 1) if k not in self.itc_labels]

    @property
    def n_lesions(self) -> int:
        return self.n_regions - len(self.itc_labels)

    def full_labels(self) -> np.ndarray:
        """The label image of the whole slide at this level, int32 (rows, cols) = ``shape``."""
        out = np.zeros(self.shape, dtype=np.int32)
        r, c = self.offset
        out[r : r + self.labels.shape[0], c : c + self.labels.shape[1]] = self.labels
        return out

    def label_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Region label under level-0 points (x, y): cell (floor(y / 2**level), floor(x / 2**level)), as
        the official code indexes it; 0 for background. Raises ``MetricsError`` for points off the slide."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        w, h = self.level0_size
        off = (x < 0) | (y < 0) | (x >= w) | (y >= h)
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise MetricsError(
                f"{int(off.sum())} detections lie off the slide (level-0 size {w} x {h}), e.g. at "
                f"({x[i]:g}, {y[i]:g}); detections must be level-0 (x, y)"
            )
        rows = np.floor(y / self.downsample).astype(np.int64) - self.offset[0]
        cols = np.floor(x / self.downsample).astype(np.int64) - self.offset[1]
        inside = (rows >= 0) & (cols >= 0) & (rows < self.labels.shape[0]) & (cols < self.labels.shape[1])
        out = np.zeros(x.size, dtype=np.int32)
        out[inside] = self.labels[rows[inside], cols[inside]]
        return out


def _paint(grid: np.ndarray, vertices: np.ndarray, ds: float, origin: tuple[float, float], value: bool) -> None:
    """Set the cells of ``grid`` (cell = ``ds`` level-0 px, top-left at level-0 ``origin``) whose centre is
    inside the polygon to ``value``; only the polygon's bounding box is filled (``fill_polygon``)."""
    v = np.asarray(vertices, dtype=np.float64)
    c0 = max(0, int(math.floor((v[:, 0].min() - origin[0]) / ds)))
    r0 = max(0, int(math.floor((v[:, 1].min() - origin[1]) / ds)))
    c1 = min(grid.shape[1], int(math.ceil((v[:, 0].max() - origin[0]) / ds)) + 1)
    r1 = min(grid.shape[0], int(math.ceil((v[:, 1].max() - origin[1]) / ds)) + 1)
    if r1 <= r0 or c1 <= c0:
        return
    inside = fill_polygon(v, (r1 - r0, c1 - c0), ds, (origin[0] + c0 * ds, origin[1] + r0 * ds))
    grid[r0:r1, c0:c1][inside] = value


def evaluation_mask(
    annotations: Iterable[Annotation],
    level0_size: tuple[int, int],
    *,
    mpp0: float = CAMELYON16_MPP,
    level: int = EVALUATION_LEVEL,
    dilation_um: float = DILATION_UM,
    itc_major_axis_um: float = ITC_MAJOR_AXIS_UM,
) -> EvaluationMask:
    """The official Camelyon16 evaluation mask of one slide from its annotations (``computeEvaluationMask``
    and ``computeITCList`` of ``Evaluation_FROC.py``).

    1. Rasterize tumour minus exclusion polygons on the level-``level`` grid (2**level level-0 px per
       cell; a cell is tumour when its centre is inside, even-odd rule, see ``annotations.fill_polygon``).
    2. Dilate: keep every cell whose centre lies at a Euclidean distance (``distance_transform_edt``)
       strictly less than ``dilation_um / (mpp0 * 2**level * 2)`` cells from a tumour cell centre. As in
       the official code the 75 µm are halved: a 37.5 µm radius, so the region grows by 75 µm across.
       At level 5 and 0.243 µm/px that is 4.82 cells.
    3. Fill holes, label 8-connected regions (lesions closer than ~75 µm merge into one).
    4. ITC: a region whose ``regionprops`` major axis (``axis_major_length``) x ``mpp0 * 2**level`` is below
       ``itc_major_axis_um`` (275 µm = 200 µm + the 75 µm dilation; 35.36 cells at level 5).

    ``level0_size`` is the slide's level-0 (w, h). Only the window around the lesions is computed and
    stored (identical result, see ``EvaluationMask``).
    """
    annotations = list(annotations)
    w, h = int(level0_size[0]), int(level0_size[1])
    if w <= 0 or h <= 0:
        raise MetricsError(f"level0_size must be positive (w, h), got {level0_size}")
    ds = 2**level
    shape = (-(-h // ds), -(-w // ds))
    radius_cells = dilation_um / (mpp0 * ds * 2.0)
    empty = EvaluationMask(np.zeros((0, 0), np.int32), (0, 0), shape, frozenset(), level, mpp0, (w, h), np.zeros(0))
    tumors = [a for a in annotations if a.kind == TUMOR]
    if not tumors:
        return empty
    # window: tumour bounding box (cells) padded beyond the dilation radius, clipped to the slide
    v = np.concatenate([a.vertices for a in tumors])
    pad = int(math.ceil(radius_cells)) + 2
    r0 = max(0, int(math.floor(v[:, 1].min() / ds)) - pad)
    c0 = max(0, int(math.floor(v[:, 0].min() / ds)) - pad)
    r1 = min(shape[0], int(math.ceil(v[:, 1].max() / ds)) + pad + 1)
    c1 = min(shape[1], int(math.ceil(v[:, 0].max() / ds)) + pad + 1)
    if r1 <= r0 or c1 <= c0:
        return empty
    win = (r1 - r0, c1 - c0)
    origin = (c0 * ds, r0 * ds)
    tumor = np.zeros(win, dtype=bool)
    for a in tumors:
        _paint(tumor, a.vertices, ds, origin, True)
    for a in annotations:
        if a.kind == EXCLUSION:
            _paint(tumor, a.vertices, ds, origin, False)
    if not tumor.any():
        return empty
    distance = ndi.distance_transform_edt(~tumor)
    filled = ndi.binary_fill_holes(distance < radius_cells)
    labels = skimage.measure.label(filled, connectivity=2).astype(np.int32)
    props = skimage.measure.regionprops(labels)
    major_um = np.array([p.axis_major_length for p in props], dtype=np.float64) * (mpp0 * ds)
    itc = frozenset(int(p.label) for p, m in zip(props, major_um, strict=True) if m < itc_major_axis_um)
    return EvaluationMask(labels, (r0, c0), shape, itc, level, mpp0, (w, h), major_um)


def evaluation_mask_from_xml(path: str | os.PathLike, level0_size: tuple[int, int], **kwargs) -> EvaluationMask:
    """``evaluation_mask`` of the annotations in an ASAP XML file (``annotations.read_asap_xml``)."""
    from wsi_ad.annotations import read_asap_xml

    return evaluation_mask(read_asap_xml(path), level0_size, **kwargs)


@dataclass(frozen=True)
class FrocResult:
    """FROC curve and score.

    The curve has one point per distinct threshold (ascending), then a final (0 FP, 0 sensitivity) point
    (threshold +inf), as the official ``computeFROC``: ``thresholds[i]``, ``fps_per_slide[i]`` (detections
    counted as false positives with score >= threshold, divided by ``n_slides``) and ``sensitivity[i]``
    (fraction of the ``n_lesions`` lesions with a hit scoring >= threshold). ``fp_rates`` and
    ``sensitivities`` are the sensitivity read at each rate (linear interpolation along the curve);
    ``score`` their mean. ``lesions`` lists (slide_id, label, best hit score or None when missed).
    """

    thresholds: np.ndarray
    fps_per_slide: np.ndarray
    sensitivity: np.ndarray
    fp_rates: tuple[float, ...]
    sensitivities: np.ndarray
    score: float
    n_slides: int
    n_tumor_slides: int
    n_lesions: int
    n_detections: int
    n_true_positive_hits: int
    n_false_positives: int
    n_ignored: int
    excluded: list[str]
    missing: list[str]
    lesions: list[tuple[str, int, float | None]]

    def as_dict(self) -> dict:
        """JSON-friendly summary (the curve as lists; the final threshold +inf as None)."""
        return {
            "score": self.score,
            "fp_rates": list(self.fp_rates),
            "sensitivities": [float(v) for v in self.sensitivities],
            "curve": {
                "thresholds": [float(t) if np.isfinite(t) else None for t in self.thresholds],
                "fps_per_slide": [float(v) for v in self.fps_per_slide],
                "sensitivity": [float(v) for v in self.sensitivity],
            },
            "n_slides": self.n_slides,
            "n_tumor_slides": self.n_tumor_slides,
            "n_lesions": self.n_lesions,
            "n_detected_lesions": sum(1 for _, _, s in self.lesions if s is not None),
            "n_detections": self.n_detections,
            "n_false_positives": self.n_false_positives,
            "n_ignored": self.n_ignored,
            "excluded": self.excluded,
            "missing": self.missing,
        }


def sensitivity_at(fps_per_slide: np.ndarray, sensitivity: np.ndarray, rate: float) -> float:
    """Sensitivity of an FROC curve at ``rate`` average false positives per slide.

    Linear interpolation along the curve drawn through its points in threshold order: at an FP rate the
    curve passes several points (a vertical step) the highest sensitivity counts; between two rates the
    line joins the highest point of the lower rate to the lowest point of the higher one; beyond the last
    point the curve stays flat. This equals ``numpy.interp(rate, fps[::-1], sensitivity[::-1])`` on the
    official curve (the usual way the Camelyon16 score is read from ``computeFROC``'s output).
    """
    f = np.asarray(fps_per_slide, dtype=np.float64)
    s = np.asarray(sensitivity, dtype=np.float64)
    below = f <= rate
    if not below.any():
        return 0.0
    f_lo = f[below].max()
    s_lo = s[f == f_lo].max()
    above = f > rate
    if not above.any():
        return float(s_lo)
    f_hi = f[above].min()
    s_hi = s[f == f_hi].min()
    return float(s_lo + (s_hi - s_lo) * (rate - f_lo) / (f_hi - f_lo))


def _as_detections(value, sid: str) -> np.ndarray:
    d = np.asarray(value, dtype=np.float64)
    if d.size == 0:
        return np.zeros((0, 3))
    if d.ndim != 2 or d.shape[1] != 3:
        raise MetricsError(f"detections of {sid!r} must be (K, 3) level-0 (x, y, score), got shape {d.shape}")
    if not np.isfinite(d).all():
        raise MetricsError(f"detections of {sid!r} contain NaN or infinite values")
    return d


def froc(
    detections: Mapping[str, np.ndarray],
    masks: Mapping[str, EvaluationMask | None],
    *,
    exclude: Iterable[str] = DEFAULT_FROC_EXCLUDE,
    fp_rates: Sequence[float] = FROC_FP_RATES,
) -> FrocResult:
    """Lesion-level FROC of the official Camelyon16 evaluation (``compute_FP_TP_Probs`` + ``computeFROC``).

    ``masks`` defines the evaluated slides: slide id -> ``EvaluationMask`` for a tumour slide, None for
    a normal slide. ``detections`` maps slide ids to (K, 3) arrays of level-0 (x, y) and a score (higher
    = more confident; any real number). Ids match case-insensitively; slides in ``exclude`` (default
    Test_114) are left out of both; a slide in ``masks`` without detections counts as having none and is
    listed in ``missing``; detections for a slide not in ``masks`` raise ``MetricsError``.

    Per slide, each detection reads the label under it (``EvaluationMask.label_at``): background -> a
    false positive; an ITC region -> ignored; a lesion -> that lesion's score is the highest of its hits
    (further hits are neither TP nor FP). Every detection on a normal slide is a false positive. At each
    threshold t, FPs per slide = #FP scores >= t / number of slides, sensitivity = #lesions scored >= t /
    number of lesions (ITCs not counted). ``score`` = mean sensitivity at ``fp_rates`` (default 1/4, 1/2,
    1, 2, 4, 8), read with ``sensitivity_at``. Raises ``MetricsError`` when there is no lesion to detect.
    """
    excluded_keys = {normalize_slide_id(s) for s in exclude}
    mask_by_key: dict[str, tuple[str, EvaluationMask | None]] = {}
    for sid, m in masks.items():
        key = normalize_slide_id(sid)
        if key in mask_by_key:
            raise MetricsError(f"slide {sid!r} has two evaluation masks (ids compare case-insensitively)")
        mask_by_key[key] = (sid, m)
    det_by_key: dict[str, np.ndarray] = {}
    for sid, d in detections.items():
        key = normalize_slide_id(sid)
        if key in det_by_key:
            raise MetricsError(f"slide {sid!r} has two detection lists (ids compare case-insensitively)")
        if key not in mask_by_key and key not in excluded_keys:
            raise MetricsError(f"detections for slide {sid!r}, which has no entry in masks (None for a normal slide)")
        det_by_key[key] = _as_detections(d, sid)

    excluded = sorted(sid for key, (sid, _) in mask_by_key.items() if key in excluded_keys)
    evaluated = [(key, sid, m) for key, (sid, m) in mask_by_key.items() if key not in excluded_keys]
    missing = sorted(sid for key, sid, _ in evaluated if key not in det_by_key)
    fp_scores: list[np.ndarray] = []
    lesion_scores: list[float] = []
    lesions: list[tuple[str, int, float | None]] = []
    n_det = n_tp_hits = n_ignored = n_tumor = 0
    for key, sid, m in evaluated:
        d = det_by_key.get(key, np.zeros((0, 3)))
        n_det += d.shape[0]
        if m is None:
            fp_scores.append(d[:, 2])
            continue
        n_tumor += 1
        hit = m.label_at(d[:, 0], d[:, 1]) if d.shape[0] else np.zeros(0, np.int32)
        fp_scores.append(d[hit == 0, 2])
        is_itc = np.isin(hit, list(m.itc_labels)) if m.itc_labels else np.zeros(hit.size, bool)
        n_ignored += int(is_itc.sum())
        for label in m.lesion_labels:
            on = hit == label
            if on.any():
                best = float(d[on, 2].max())
                lesion_scores.append(best)
                lesions.append((sid, label, best))
                n_tp_hits += 1
                n_ignored += int(on.sum()) - 1
            else:
                lesions.append((sid, label, None))
    n_lesions = len(lesions)
    n_slides = len(evaluated)
    if n_lesions == 0:
        raise MetricsError(f"FROC needs at least one lesion to detect; the {n_slides} evaluated slides have none")
    fps = np.concatenate(fp_scores) if fp_scores else np.zeros(0)
    tps = np.asarray(lesion_scores, dtype=np.float64)
    thresholds = np.unique(np.concatenate([fps, tps]))
    # counts of scores >= t for every threshold t, by binary search on the sorted scores
    fps_sorted, tps_sorted = np.sort(fps), np.sort(tps)
    fp_count = fps_sorted.size - np.searchsorted(fps_sorted, thresholds, side="left")
    tp_count = tps_sorted.size - np.searchsorted(tps_sorted, thresholds, side="left")
    curve_fps = np.append(fp_count / n_slides, 0.0)
    curve_sens = np.append(tp_count / n_lesions, 0.0)
    curve_thr = np.append(thresholds, np.inf)
    rates = tuple(float(r) for r in fp_rates)
    sens_at = np.array([sensitivity_at(curve_fps, curve_sens, r) for r in rates], dtype=np.float64)
    return FrocResult(
        thresholds=curve_thr,
        fps_per_slide=curve_fps,
        sensitivity=curve_sens,
        fp_rates=rates,
        sensitivities=sens_at,
        score=float(sens_at.mean()) if sens_at.size else float("nan"),
        n_slides=n_slides,
        n_tumor_slides=n_tumor,
        n_lesions=n_lesions,
        n_detections=n_det,
        n_true_positive_hits=n_tp_hits,
        n_false_positives=int(fps.size),
        n_ignored=n_ignored,
        excluded=excluded,
        missing=missing,
        lesions=lesions,
    )


def detections_from_heatmap(
    heatmap: np.ndarray,
    level0_per_cell: float | tuple[float, float],
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    min_distance_cells: int = 3,
    threshold: float | None = None,
    max_detections: int | None = 100,
) -> np.ndarray:
    """FROC detections from a slide heatmap: its local maxima, as a (K, 3) array of level-0 x, y, score.

    ``heatmap`` is 2-D (rows, cols) of scores, NaN where there is no tissue; NaN cells are never
    detections and count as lower than any score around them. ``level0_per_cell`` is the level-0 pixels
    per cell along (x, y) (one number for square cells) and ``origin`` the level-0 (x, y) of cell (0, 0)'s
    top-left corner; a detection lies at its cell's centre: x = origin_x + (col + 0.5) * cell_x.

    Peaks come from ``skimage.feature.peak_local_max`` (no border exclusion): a cell that is the
    maximum within ``min_distance_cells`` cells (Chebyshev distance) and not within that distance of a
    higher kept peak; a flat plateau gives peaks spaced by that distance. Only peaks scoring >=
    ``threshold`` (when given) are kept, then the ``max_detections`` highest (None: all), sorted by
    descending score (ties by row, then column).
    """
    hm = np.asarray(heatmap, dtype=np.float64)
    if hm.ndim != 2:
        raise MetricsError(f"heatmap must be 2-D, got shape {hm.shape}")
    if min_distance_cells < 1:
        raise MetricsError(f"min_distance_cells must be >= 1, got {min_distance_cells}")
    if np.isscalar(level0_per_cell):
        sx = sy = float(level0_per_cell)
    else:
        sx, sy = (float(v) for v in level0_per_cell)
    finite = np.isfinite(hm)
    if not finite.any():
        return np.zeros((0, 3))
    lo, hi = float(hm[finite].min()), float(hm[finite].max())
    fill = lo - max(1.0, hi - lo)
    # a frame of `fill` around the map: a flat map is not "no peaks" to peak_local_max, and off-map is low
    image = np.pad(np.where(finite, hm, fill), 1, constant_values=fill)
    peaks = skimage.feature.peak_local_max(
        image, min_distance=int(min_distance_cells), threshold_abs=fill, exclude_border=False
    )
    peaks = peaks - 1
    if peaks.size == 0:
        return np.zeros((0, 3))
    rows, cols = peaks[:, 0], peaks[:, 1]
    scores = hm[rows, cols]
    keep = np.isfinite(scores)
    if threshold is not None:
        keep &= scores >= threshold
    rows, cols, scores = rows[keep], cols[keep], scores[keep]
    order = np.lexsort((cols, rows, -scores))
    if max_detections is not None:
        order = order[: int(max_detections)]
    rows, cols, scores = rows[order], cols[order], scores[order]
    return np.column_stack([origin[0] + (cols + 0.5) * sx, origin[1] + (rows + 0.5) * sy, scores]).astype(np.float64)
