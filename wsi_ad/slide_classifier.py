"""Slide-level classification from a heatmap, as the Camelyon16 winner did it: geometric and morphological features
of the heatmap, then a random forest trained on the training slides' heatmaps.

Wang, Khosla, Gargeya, Irshad, Beck, "Deep learning for identifying metastatic breast cancer" (arXiv 1606.05718,
Camelyon16's winning entry, HMS & MIT): from each slide's tumour-probability heatmap they extracted 28 features
(the percentage of tumour region in the tissue, the largest tumour region's area and longest axis, the number of
pixels above 0.90, statistics of the predictions, ... at thresholds 0.5 and 0.9) and trained a random forest on
the training slides to output the slide's probability of metastasis.

Departures, each for a reason:

- Our heatmaps hold anomaly scores, not probabilities, so the two thresholds are relative to normal tissue: the
  99th and 99.9th percentile of the tile scores of the training *normal* slides (:func:`thresholds_from_normals`),
  where the winner used 0.5 and 0.9.
- The 28 features (:data:`FEATURE_NAMES`): for each threshold t, on the 8-connected regions of tissue cells scoring
  above t (scikit-image ``regionprops``): the fraction of tissue above t, the number of regions, their total area,
  and the largest region's area, major and minor axis, eccentricity, solidity, extent, perimeter, mean and maximum
  score (12 x 2); plus the tissue's maximum, mean, standard deviation and 99th percentile score (4). Areas in mm²
  and lengths in mm (from the grid's level-0 px per cell and the slide's µm/px), so they mean the same at any
  magnification. The winner's exact list is not published feature by feature; this one follows its description.
- The forest: scikit-learn's ``RandomForestClassifier`` (200 trees, seeded; balanced class weights, since a
  cohort's tumour and normal slides are rarely equal in number).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import skimage.measure

from wsi_ad.errors import WsiAdError

_REGION = ("fraction_above", "n_regions", "total_area_mm2", "largest_area_mm2", "largest_major_axis_mm",
           "largest_minor_axis_mm", "largest_eccentricity", "largest_solidity", "largest_extent",
           "largest_perimeter_mm", "largest_mean_score", "largest_max_score")
_GLOBAL = ("max_score", "mean_score", "std_score", "p99_score")
#: The 28 features, in the order of :func:`heatmap_features`' output (``low_*``: above the lower threshold).
FEATURE_NAMES: tuple[str, ...] = tuple(f"{level}_{name}" for level in ("low", "high") for name in _REGION) + _GLOBAL
#: Percentiles of the training normal slides' tile scores used as the two thresholds.
THRESHOLD_PERCENTILES = (99.0, 99.9)


class SlideClassifierError(WsiAdError):
    """Bad input to the slide classifier: an empty heatmap, no slides of a class, mismatched features."""


def thresholds_from_normals(normal_scores: Sequence[np.ndarray]) -> tuple[float, float]:
    """The two feature thresholds: :data:`THRESHOLD_PERCENTILES` of every tile score of the training normal slides
    (each a (N,) array). Raises :class:`SlideClassifierError` when there is no score."""
    scores = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in normal_scores]) if normal_scores \
        else np.zeros(0)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise SlideClassifierError("no tile score of a normal training slide to set the thresholds from")
    low, high = np.percentile(scores, THRESHOLD_PERCENTILES)
    return float(low), float(high)


def heatmap_features(values: np.ndarray, cell_um: tuple[float, float], thresholds: tuple[float, float]) -> np.ndarray:
    """The 28 features (:data:`FEATURE_NAMES`) of one slide's heatmap.

    Args:
        values: (rows, cols) float scores, NaN off tissue (``Heatmap.values``).
        cell_um: (x, y) size of one cell in µm (level-0 px per cell x level-0 µm/px).
        thresholds: (low, high) score thresholds (:func:`thresholds_from_normals`).

    Returns:
        (28,) float64. Region features of a threshold no cell exceeds are 0.

    Raises:
        SlideClassifierError: ``values`` is not 2-D or holds no finite score.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise SlideClassifierError(f"heatmap must be (rows, cols), got shape {values.shape}")
    tissue = np.isfinite(values)
    if not tissue.any():
        raise SlideClassifierError("the heatmap holds no scored tile")
    cell_mm = (cell_um[0] / 1000.0, cell_um[1] / 1000.0)
    area_mm2 = cell_mm[0] * cell_mm[1]
    length_mm = float(np.sqrt(area_mm2))                # regionprops lengths are in cells; cells may be non-square
    scores = values[tissue]
    out: list[float] = []
    for t in thresholds:
        above = tissue & (values > t)
        labels = skimage.measure.label(above, connectivity=2)
        props = skimage.measure.regionprops(labels, intensity_image=np.where(tissue, values, 0.0))
        row = [above.sum() / tissue.sum(), float(len(props)), above.sum() * area_mm2]
        if props:
            big = max(props, key=lambda p: (p.area, -p.label))
            inside = values[labels == big.label]
            row += [big.area * area_mm2, big.axis_major_length * length_mm, big.axis_minor_length * length_mm,
                    float(big.eccentricity), float(big.solidity), float(big.extent), big.perimeter * length_mm,
                    float(inside.mean()), float(inside.max())]
        else:
            row += [0.0] * 9
        out += row
    out += [float(scores.max()), float(scores.mean()), float(scores.std()), float(np.percentile(scores, 99))]
    return np.asarray(out, dtype=np.float64)


@dataclass
class SlideForest:
    """A random forest on :func:`heatmap_features` (module docstring). ``fit`` on training slides, then
    ``predict`` gives each slide's probability of metastasis, (S,) float64 in [0, 1]."""

    seed: int = 0
    n_estimators: int = 200

    def fit(self, features: np.ndarray, labels: Sequence[int]) -> SlideForest:
        """``features``: (S, 28); ``labels``: (S,) 1 = tumour slide, 0 = normal. Raises
        :class:`SlideClassifierError` unless both classes are present."""
        from sklearn.ensemble import RandomForestClassifier

        x = self._check(features)
        y = np.asarray(labels, dtype=np.int64)
        if y.shape != (x.shape[0],) or set(np.unique(y)) != {0, 1}:
            raise SlideClassifierError(f"the random forest needs tumour (1) and normal (0) training slides, one label "
                                       f"per slide; got labels {sorted(set(y.tolist()))} for {x.shape[0]} slides")
        self.forest_ = RandomForestClassifier(n_estimators=self.n_estimators, random_state=self.seed,
                                              class_weight="balanced", n_jobs=1).fit(x, y)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        if not hasattr(self, "forest_"):
            raise SlideClassifierError("the slide classifier is not fitted")
        return self.forest_.predict_proba(self._check(features))[:, 1].astype(np.float64)

    @staticmethod
    def _check(features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES) or not np.isfinite(x).all():
            raise SlideClassifierError(f"features must be finite (S, {len(FEATURE_NAMES)}), got shape {x.shape}")
        return x
