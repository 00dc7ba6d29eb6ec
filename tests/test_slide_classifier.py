"""The Camelyon16 winner's slide classification (``wsi_ad.slide_classifier``): heatmap features checked on
hand-made heatmaps, the forest, and its errors."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ad.slide_classifier import (
    FEATURE_NAMES,
    SlideClassifierError,
    SlideForest,
    heatmap_features,
    thresholds_from_normals,
)

CELL_UM = (62.208, 62.208)          # a 256 px tile at 0.243 µm/px


def _named(values, thresholds=(1.0, 2.0)) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, heatmap_features(values, CELL_UM, thresholds), strict=True))


def test_features_of_a_square_lesion_and_a_small_one():
    values = np.full((40, 50), 0.5)
    values[:, 45:] = np.nan                         # off tissue
    values[5:15, 5:15] = 3.0                        # a 10 x 10 cell lesion above both thresholds
    values[30, 30] = 1.5                            # one cell above the low threshold only
    f = _named(values)
    cell_mm2 = (CELL_UM[0] / 1000) ** 2
    assert len(FEATURE_NAMES) == 28
    assert f["low_n_regions"] == 2 and f["high_n_regions"] == 1
    assert f["low_fraction_above"] == pytest.approx(101 / (40 * 45))
    assert f["low_total_area_mm2"] == pytest.approx(101 * cell_mm2)
    assert f["low_largest_area_mm2"] == pytest.approx(100 * cell_mm2) == f["high_largest_area_mm2"]
    # a square of n cells: second moments (n^2 - 1) / 12 on both axes, axis length 4 sqrt(that)
    side = 4 * np.sqrt((10**2 - 1) / 12) * CELL_UM[0] / 1000
    assert f["high_largest_major_axis_mm"] == pytest.approx(side) == pytest.approx(f["high_largest_minor_axis_mm"])
    assert f["high_largest_eccentricity"] == pytest.approx(0.0, abs=1e-6)
    assert f["high_largest_solidity"] == 1.0 and f["high_largest_extent"] == 1.0
    assert f["high_largest_mean_score"] == 3.0 and f["high_largest_max_score"] == 3.0
    assert f["max_score"] == 3.0
    finite = values[np.isfinite(values)]
    assert f["mean_score"] == pytest.approx(finite.mean()) and f["std_score"] == pytest.approx(finite.std())


def test_no_cell_above_a_threshold_gives_zero_region_features():
    f = _named(np.full((8, 8), 0.5))
    assert all(f[name] == 0.0 for name in FEATURE_NAMES if name.startswith(("low_", "high_")))
    assert f["max_score"] == 0.5


def test_thresholds_are_percentiles_of_normal_tile_scores():
    scores = [np.arange(1000.0), np.array([np.nan, 1000.0])]
    low, high = thresholds_from_normals(scores)
    assert (low, high) == pytest.approx(tuple(np.percentile(np.arange(1001.0), (99, 99.9))))
    with pytest.raises(SlideClassifierError, match="no tile score"):
        thresholds_from_normals([np.array([np.nan])])


def test_forest_separates_slides_by_their_largest_region_and_is_seeded():
    rng = np.random.default_rng(0)

    def slide(lesion: int):
        values = rng.normal(0.0, 0.3, size=(60, 60))
        if lesion:
            r, c = rng.integers(5, 40, size=2)
            values[r:r + lesion, c:c + lesion] += 3.0
        return heatmap_features(values, CELL_UM, (1.0, 2.0))

    x = np.stack([slide(0) for _ in range(10)] + [slide(int(s)) for s in rng.integers(3, 12, size=10)])
    y = [0] * 10 + [1] * 10
    test = np.stack([slide(0) for _ in range(5)] + [slide(6) for _ in range(5)])
    p = SlideForest(seed=3).fit(x, y).predict(test)
    assert p.shape == (10,) and (p[5:].min() > p[:5].max())
    np.testing.assert_array_equal(p, SlideForest(seed=3).fit(x, y).predict(test))


def test_forest_errors():
    x = np.zeros((4, 28))
    with pytest.raises(SlideClassifierError, match="tumour .1. and normal .0. training slides"):
        SlideForest().fit(x, [0, 0, 0, 0])
    with pytest.raises(SlideClassifierError, match=r"features must be finite \(S, 28\)"):
        SlideForest().fit(np.zeros((4, 3)), [0, 1, 0, 1])
    with pytest.raises(SlideClassifierError, match="not fitted"):
        SlideForest().predict(x)
    with pytest.raises(SlideClassifierError, match="no scored tile"):
        heatmap_features(np.full((3, 3), np.nan), CELL_UM, (1.0, 2.0))
