"""Camelyon16 evaluation (wsi_ad.metrics): every expected number below is worked out by hand in a comment.

Level-5 evaluation grid at 0.243 µm/px: one cell = 32 level-0 px = 7.776 µm; the official dilation
threshold is 75 / (0.243 * 32 * 2) = 4.8225 cells (a 37.5 µm radius) and the ITC threshold
275 / (0.243 * 32) = 35.36 cells.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from wsi_ad.annotations import Annotation, read_asap_xml, tumor_annotations
from wsi_ad.errors import InputFileError, WsiAdError
from wsi_ad.metrics import (
    DEFAULT_FROC_EXCLUDE,
    MetricsError,
    ReferenceCsvError,
    bootstrap_auc_ci,
    detections_from_heatmap,
    evaluation_mask,
    froc,
    normalize_slide_id,
    read_reference_csv,
    roc_auc,
    sensitivity_at,
    slide_auc_report,
    tile_auc,
    tile_labels,
)

CELL = 32  # level-0 px per level-5 cell


def _rect(x0, y0, x1, y1, kind="tumor", name="r") -> Annotation:
    v = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    return Annotation(name=name, group="_0" if kind == "tumor" else "_2", kind=kind, shape_type="Polygon", vertices=v)


def _cells(r0, c0, n_rows, n_cols, kind="tumor") -> Annotation:
    """A rectangle covering exactly level-5 cells rows r0..r0+n_rows-1, cols c0..c0+n_cols-1 (centre rule)."""
    return _rect(c0 * CELL, r0 * CELL, (c0 + n_cols) * CELL, (r0 + n_rows) * CELL, kind=kind)


def _centre(row, col) -> tuple[float, float]:
    """Level-0 (x, y) of the centre of level-5 cell (row, col)."""
    return col * CELL + 16.0, row * CELL + 16.0


# ------------------------------------------------------------------------------------------------
# reference.csv
# ------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_reference_csv_has_129_slides_49_tumour_22_macro_27_micro(shared_data):
    rows = read_reference_csv(shared_data / "camelyon16" / "reference.csv")
    assert len(rows) == 129  # Test_001..Test_130 without Test_049
    assert sum(r.is_tumor for r in rows) == 49 and sum(not r.is_tumor for r in rows) == 80
    assert sum(r.metastasis == "Macro" for r in rows) == 22
    assert sum(r.metastasis == "Micro" for r in rows) == 27
    assert all(r.metastasis is None for r in rows if not r.is_tumor)
    keys = {r.key for r in rows}
    assert "test_049" not in keys and "test_114" in keys and "test_130" in keys
    first = rows[0]
    assert (first.slide_id, first.label, first.primary, first.metastasis, first.line) == ("Test_001", "Tumor", "IDC", "Macro", 1)
    third = rows[2]  # Test_003,Normal,DCIS,None
    assert (third.label, third.primary, third.metastasis) == ("Normal", "DCIS", None)


def test_reference_csv_accepts_empty_normal_fields_case_and_a_header(tmp_path):
    path = tmp_path / "reference.csv"
    path.write_text("\ufeffimage,type,primary,category\nTest_001,Tumor,IDC,Macro\ntest_002,normal,,\n\nTEST_003,TUMOR,ILC,micro\n"
                    "Test_004,Normal\n")
    rows = read_reference_csv(path)
    assert [(r.key, r.label, r.primary, r.metastasis) for r in rows] == [
        ("test_001", "Tumor", "IDC", "Macro"),
        ("test_002", "Normal", None, None),
        ("test_003", "Tumor", "ILC", "Micro"),
        ("test_004", "Normal", None, None),
    ]
    assert [r.line for r in rows] == [2, 3, 5, 6]
    assert normalize_slide_id("/data/TEST_001.tif") == normalize_slide_id("Test_001") == "test_001"


@pytest.mark.parametrize(
    "text, message",
    [
        ("Test_001,Tumor,IDC,Macro\nTest_002,Maybe,,\n", "line 2: label of 'Test_002' is 'Maybe'"),
        ("Test_001,Tumor,IDC,\n", "line 1: tumour slide 'Test_001' has metastasis category ''"),
        ("Test_001,Normal,IDC,Macro\n", "line 1: normal slide 'Test_001'"),
        ("Test_001,Tumor,IDC,Macro\ntest_001,Normal,,\n", "line 2: slide 'test_001' already listed on line 1"),
        ("Test_001,Tumor,IDC,Macro,extra\n", "line 1: 'Test_001' has 5 fields"),
        ("Test_001\n", "line 1: expected"),
        ("\n\n", "no reference rows"),
    ],
)
def test_malformed_reference_csv_raises_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "reference.csv"
    path.write_text(text)
    with pytest.raises(ReferenceCsvError, match=message) as info:
        read_reference_csv(path)
    assert isinstance(info.value, MetricsError) and isinstance(info.value, InputFileError)
    assert str(path) in str(info.value)


def test_missing_reference_csv(tmp_path):
    with pytest.raises(WsiAdError, match="file not found"):
        read_reference_csv(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------------------
# slide level
# ------------------------------------------------------------------------------------------------


def test_roc_auc_counts_ties_as_one_half():
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.5, 0.5, 0.5, 0.1, 0.3]
    # positive/negative pairs (3 x 3 = 9): 0.9 beats 0.5, 0.1, 0.3 -> 3; each 0.5 ties 0.5 (1/2) and beats
    # 0.1 and 0.3 -> 2.5, twice -> 5; AUC = (3 + 5) / 9 = 8/9
    assert roc_auc(labels, scores) == pytest.approx(8 / 9)
    assert roc_auc(np.array(labels, dtype=bool), scores) == pytest.approx(8 / 9)


@pytest.mark.parametrize(
    "labels, scores, message",
    [([1, 1], [0.1, 0.2], "both classes"), ([1, 0], [0.1], "same length"), ([2, 0], [0.1, 0.2], "0 \\(normal\\) or 1"),
     ([1, 0], [np.nan, 0.2], "NaN")],
)
def test_roc_auc_rejects_bad_input(labels, scores, message):
    with pytest.raises(MetricsError, match=message):
        roc_auc(labels, scores)


def test_bootstrap_ci_contains_auc_and_is_deterministic_by_seed():
    rng = np.random.default_rng(7)
    labels = np.r_[np.ones(20, int), np.zeros(30, int)]
    scores = np.r_[rng.normal(1.0, 1.0, 20), rng.normal(0.0, 1.0, 30)]
    auc = roc_auc(labels, scores)
    low, high = bootstrap_auc_ci(labels, scores, n_boot=500, seed=3)
    assert low < auc < high and 0.0 <= low and high <= 1.0
    assert bootstrap_auc_ci(labels, scores, n_boot=500, seed=3) == (low, high)
    assert bootstrap_auc_ci(labels, scores, n_boot=500, seed=4) != (low, high)
    narrow = bootstrap_auc_ci(labels, scores, n_boot=500, seed=3, alpha=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    # perfectly separated classes: every stratified resample is separated too, so the CI is [1, 1]
    assert bootstrap_auc_ci([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], n_boot=50) == (1.0, 1.0)


def test_slide_auc_report_macro_micro_missing_and_unexpected():
    rows = [
        _row("Test_001", "Tumor", "Macro"),
        _row("Test_002", "Tumor", "Micro"),
        _row("Test_003", "Tumor", "Micro"),
        _row("Test_004", "Normal", None),
        _row("Test_005", "Normal", None),
    ]
    scores = {"test_001.tif": 0.9, "TEST_002": 0.4, "Test_004": 0.5, "test_005": 0.1, "Test_999": 0.7}
    report = slide_auc_report(rows, scores, n_boot=200)
    assert report["missing"] == ["Test_003"] and report["complete"] is False
    assert report["unexpected"] == ["Test_999"]
    assert (report["n_reference"], report["n_scored"]) == (5, 4)
    overall, macro, micro = report["overall"], report["macro"], report["micro"]
    # overall: tumour {0.9, 0.4} vs normal {0.5, 0.1}: 0.9 > both (2), 0.4 > 0.1 only (1) -> 3/4
    assert overall["auc"] == pytest.approx(0.75) and (overall["n_tumor"], overall["n_normal"]) == (2, 2)
    # macro: {0.9} vs {0.5, 0.1} -> 2/2; micro (Test_003 missing): {0.4} vs {0.5, 0.1} -> 1/2
    assert macro["auc"] == pytest.approx(1.0) and (macro["n_tumor"], macro["n_normal"]) == (1, 2)
    assert micro["auc"] == pytest.approx(0.5) and (micro["n_tumor"], micro["n_normal"]) == (1, 2)
    for block in (overall, macro, micro):
        assert block["ci_low"] <= block["auc"] <= block["ci_high"]
        roc = block["roc"]
        assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0 and roc["thresholds"][0] is None
        assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(block["auc"])
    # no micro tumour slide scored at all: that split has no AUC, and says why
    only_macro = slide_auc_report(rows, {"Test_001": 0.9, "Test_004": 0.5, "Test_005": 0.1}, n_boot=10)
    assert only_macro["micro"]["auc"] is None and "0 tumour" in only_macro["micro"]["note"]
    with pytest.raises(MetricsError, match="two scores"):
        slide_auc_report(rows, {"Test_001": 0.1, "test_001": 0.2})
    with pytest.raises(MetricsError, match="nan"):
        slide_auc_report(rows, {"Test_001": float("nan")})


def test_slide_auc_over_the_whole_reference_counts_an_unscored_slide_as_wrong():
    rows = [_row("Test_001", "Tumor", "Macro"), _row("Test_002", "Tumor", "Micro"), _row("Test_003", "Normal", None),
            _row("Test_004", "Normal", None), _row("Test_005", "Normal", None)]
    # Test_002 (tumour) and Test_005 (normal) failed: the scored slides alone separate perfectly
    scores = {"Test_001": 0.9, "Test_003": 0.5, "Test_004": 0.1}
    report = slide_auc_report(rows, scores, missing="wrong", n_boot=50)
    assert report["missing"] == ["Test_002", "Test_005"] and report["missing_counted_as"] == "wrong"
    overall = report["overall"]
    assert (overall["n_tumor"], overall["n_normal"]) == (2, 3)
    # pairs (tumour, normal): Test_001 beats 0.5 and 0.1 but not the unscored normal (ranked above every tumour);
    # the unscored tumour Test_002 ranks below everything: 2 of 6 pairs right
    assert overall["auc"] == pytest.approx(2 / 6)
    assert report["scored_only"]["auc"] == pytest.approx(1.0) and report["scored_only"]["n_tumor"] == 1
    assert report["micro"]["auc"] == pytest.approx(0.0)           # its only tumour slide is the unscored one
    omitted = slide_auc_report(rows, scores, n_boot=50)
    assert omitted["overall"]["auc"] == pytest.approx(1.0) and omitted["missing_counted_as"] == "left out"
    assert "scored_only" not in omitted
    with pytest.raises(MetricsError, match="missing must be one of"):
        slide_auc_report(rows, scores, missing="zero")


def _row(slide_id, label, metastasis):
    from wsi_ad.metrics import ReferenceRow

    return ReferenceRow(slide_id=slide_id, label=label, primary="IDC", metastasis=metastasis)


# ------------------------------------------------------------------------------------------------
# tile level
# ------------------------------------------------------------------------------------------------


def test_tile_labels_inside_partial_edge_outside_and_exclusion():
    anns = [_rect(0, 0, 100, 100), _rect(60, 60, 80, 80, kind="exclusion")]
    coords = np.array([
        [10, 10],    # 10..20 x 10..20: inside the tumour                      -> 1
        [95, 10],    # x 95..105: half inside (50 of 100 px²)                   -> -1 at the default 1.0
        [100, 10],   # x 100..110: shares the edge x = 100, zero area         -> 0
        [200, 200],  # far outside                                            -> 0
        [65, 65],    # inside the exclusion square                            -> -1
        [55, 55],    # 55..65: 25 px² of it in the exclusion                    -> -1
        [-5, -5],    # -5..5: 25 of 100 px² in the tumour                       -> -1
    ])
    np.testing.assert_array_equal(tile_labels(coords, 10, anns), [1, -1, 0, 0, -1, -1, -1])
    # tumour fractions 1, 0.5, 0, 0, (excl.), (excl.), 0.25
    np.testing.assert_array_equal(tile_labels(coords, (10, 10), anns, min_tumor_overlap=0.5), [1, 1, 0, 0, -1, -1, -1])
    np.testing.assert_array_equal(tile_labels(coords, 10, anns, min_tumor_overlap=0.25), [1, 1, 0, 0, -1, -1, 1])
    assert tile_labels(coords, 10, anns).dtype == np.int8
    # non-square footprint: (95, 10) with w = 5 lies inside; (100, 10) with w = 5 outside
    np.testing.assert_array_equal(tile_labels(coords[1:3], (5, 10), anns), [1, 0])
    with pytest.raises(MetricsError, match="min_tumor_overlap"):
        tile_labels(coords, 10, anns, min_tumor_overlap=0)


def test_tile_labels_use_the_union_of_overlapping_and_adjacent_polygons():
    # two polygons meeting at x = 100 and a third overlapping both: a tile across the seam is inside
    anns = [_rect(0, 0, 100, 100), _rect(100, 0, 200, 100), _rect(50, 50, 150, 150)]
    coords = np.array([[95, 10], [120, 120], [95, 95], [170, 120]])
    # [170, 120]: x 170..180, y 120..130: outside the first two, 0 area in the third (x > 150) -> 0
    np.testing.assert_array_equal(tile_labels(coords, 10, anns), [1, 1, 1, 0])
    # a self-intersecting "bow tie" (two triangles meeting at (50, 50)) is made valid, not an error
    bowtie = Annotation("b", "_0", "tumor", "Polygon", np.array([[0, 0], [100, 100], [100, 0], [0, 100]], float))
    np.testing.assert_array_equal(tile_labels(np.array([[80, 45], [45, 45]]), 10, [bowtie]), [1, -1])
    assert tile_labels(np.zeros((0, 2)), 10, anns).shape == (0,)


@pytest.mark.shared_data
def test_tile_labels_on_real_annotations_match_direct_shapely(shared_data):
    anns = read_asap_xml(shared_data / "camelyon16" / "annotations" / "tumor_110.xml")
    tile = 64 * 0.972 / 0.243  # 64 px at 10x: 256 level-0 px
    v = np.concatenate([a.vertices for a in anns])
    xs = np.arange(v[:, 0].min() - 2000, v[:, 0].max() + 2000, tile)
    ys = np.arange(v[:, 1].min() - 2000, v[:, 1].max() + 2000, tile)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.column_stack([gx.ravel(), gy.ravel()])
    labels = tile_labels(coords, tile, anns)            # its speed: benchmarks, not a timed test
    assert coords.shape[0] > 40_000
    counts = {k: int((labels == k).sum()) for k in (-1, 0, 1)}
    assert counts[1] > 10_000 and counts[0] > 20_000 and 0 < counts[-1] < counts[1]
    # the same labels by brute force on a sample: tile area against the unions, no tree, no splitting
    tumor = shapely.union_all(shapely.make_valid([shapely.Polygon(a.vertices) for a in anns if a.kind == "tumor"]))
    excl = shapely.union_all([shapely.Polygon(a.vertices) for a in anns if a.kind == "exclusion"])
    idx = np.random.default_rng(0).choice(coords.shape[0], 600, replace=False)
    idx = np.r_[idx, np.flatnonzero(labels == -1)[:300]]
    for i in idx:
        box = shapely.box(*coords[i], *(coords[i] + tile))
        frac = box.intersection(tumor).area / box.area
        expect = -1 if box.intersection(excl).area > 0 else (1 if frac >= 1 - 1e-9 else 0 if frac <= 1e-9 else -1)
        assert labels[i] == expect, (i, frac)


def test_tile_auc_tumour_tiles_of_tumour_slides_vs_normal_slides():
    tumor = {"tumor_001": (np.array([0.9, 0.8, 0.1, 0.7]), np.array([1, 1, 0, -1], dtype=np.int8))}
    normal = {"normal_001": np.array([0.2, 0.85]), "normal_002": np.array([0.3])}
    result = tile_auc(tumor, normal)
    # positives {0.9, 0.8} (label 1 only), negatives {0.2, 0.85, 0.3}:
    # 0.9 beats all 3, 0.8 beats 0.2 and 0.3 -> (3 + 2) / (2 * 3) = 5/6
    assert result["auc"] == pytest.approx(5 / 6)
    assert (result["n_tumor_tiles"], result["n_normal_tiles"]) == (2, 3)
    assert (result["n_tumor_slides"], result["n_normal_slides"], result["n_unused_tiles_on_tumor_slides"]) == (1, 2, 2)
    assert tile_auc(list(tumor.values()), list(normal.values()))["auc"] == pytest.approx(5 / 6)
    with pytest.raises(MetricsError, match="4 scores but 3 labels"):
        tile_auc({"t": (np.zeros(4), np.ones(3))}, normal)
    with pytest.raises(MetricsError, match="NaN"):
        tile_auc(tumor, {"n": np.array([np.nan])})


# ------------------------------------------------------------------------------------------------
# evaluation mask
# ------------------------------------------------------------------------------------------------


def test_evaluation_mask_dilates_by_37_5_um_radius():
    mask = evaluation_mask([_cells(50, 50, 10, 10)], (6400, 6400))
    assert mask.shape == (200, 200) and mask.level == 5 and mask.downsample == 32
    assert evaluation_mask([_cells(50, 50, 10, 10)], (6401, 6390)).shape == (200, 201)  # ceil(h/32), ceil(w/32)
    full = mask.full_labels()
    # cells within 4.8225 cells (centre to centre) of the 10 x 10 square: the square (100), four 4 x 10 side
    # strips (160), and per corner the (a, b), a, b >= 1 with a² + b² <= 23: a = 1: b 1..4 (4), a = 2: b 1..4 (4),
    # a = 3: b 1..3 (3), a = 4: b 1..2 (2) -> 13, four corners 52; total 100 + 160 + 52 = 312 cells
    assert int((full > 0).sum()) == 312
    row = full[55]  # through the square: cols 50..59 plus 4 each side = 46..63
    assert np.flatnonzero(row).tolist() == list(range(46, 64))
    # 10 cells = 78 µm, dilated to 18 cells = 140 µm across: under 275 µm, isolated tumour cells
    assert mask.n_regions == 1 and mask.n_lesions == 0 and mask.itc_labels == frozenset({1})
    # a 75 µm dilation with a 2x coarser level halves the radius in cells: 75 / (0.243 * 64 * 2) = 2.41 -> 2 cells
    coarse = evaluation_mask([_cells(50, 50, 10, 10)], (6400, 6400), level=6).full_labels()
    # the same square is 5 x 5 cells at level 6 (25), sides 4 x 2 x 5 (40), corners a² + b² <= 5: (1,1), (1,2), (2,1) -> 12
    assert int((coarse > 0).sum()) == 25 + 40 + 12


def test_evaluation_mask_merges_lesions_closer_than_75_um():
    # gap of 8 empty cells: gap cell k (1..8) is k and 9 - k cells from the two squares, min <= 4 < 4.82 -> merged
    merged = evaluation_mask([_cells(20, 20, 10, 10), _cells(20, 38, 10, 10)], (6400, 6400))
    assert merged.n_regions == 1
    # gap of 9 cells (77.8 µm between the nearest cell centres): gap cell 5 is 5 cells from both -> separate
    apart = evaluation_mask([_cells(20, 20, 10, 10), _cells(20, 39, 10, 10)], (6400, 6400))
    assert apart.n_regions == 2
    labels = apart.label_at(*np.array([_centre(25, 25), _centre(25, 44)]).T)
    assert sorted(labels.tolist()) == [1, 2]  # raster order: the left square first


def test_evaluation_mask_isolated_tumour_cells_by_major_axis():
    anns = [_cells(20, 20, 40, 40),  # 40 cells = 311 µm: dilated ~48 cells across, a lesion
            _cells(150, 150, 4, 4),  # 4 cells = 31 µm: dilated ~12 cells = 93 µm < 275 µm, an ITC
            _cells(150, 20, 1, 40)]  # a 311 µm x 8 µm sliver: dilated 9 x 48 cells, major axis > 35.36 -> a lesion
    mask = evaluation_mask(anns, (6400, 6400))
    assert mask.n_regions == 3 and mask.n_lesions == 2
    lesion, itc, sliver = mask.label_at(*np.array([_centre(40, 40), _centre(151, 151), _centre(150, 40)]).T)
    assert mask.itc_labels == frozenset({int(itc)})
    assert set(mask.lesion_labels) == {int(lesion), int(sliver)}
    axis = mask.major_axis_um
    assert axis[itc - 1] < 275 < axis[lesion - 1] and axis[sliver - 1] > 275
    # a 12-cell-wide rounded square: the inertia-ellipse major axis is about its width, 12 x 7.776 = 93 µm
    assert 80 < axis[itc - 1] < 110
    # a higher ITC threshold turns the lesion into an ITC as well
    assert len(evaluation_mask(anns, (6400, 6400), itc_major_axis_um=1000).itc_labels) == 3


def test_evaluation_mask_exclusion_holes_are_filled_and_no_tumour_gives_empty_mask():
    # a 30-cell tumour square with a 14-cell exclusion square inside: the hole (shrunk by the dilation) is filled
    anns = [_cells(20, 20, 30, 30), _cells(28, 28, 14, 14, kind="exclusion")]
    mask = evaluation_mask(anns, (6400, 6400))
    assert mask.n_regions == 1 and mask.label_at(*_centre(35, 35)) == [1]
    empty = evaluation_mask([_cells(2, 2, 3, 3, kind="exclusion")], (6400, 6400))
    assert empty.n_regions == 0 and empty.n_lesions == 0 and empty.full_labels().shape == (200, 200)
    with pytest.raises(MetricsError, match="off the slide"):
        mask.label_at(np.array([6400.0]), np.array([10.0]))


@pytest.mark.shared_data
def test_evaluation_masks_of_the_real_annotations(shared_data):
    ann_dir = shared_data / "camelyon16" / "annotations"
    # test_046 (micro-metastases): 4 splines, Feret diameters 299, 463, 71 and 75 µm, far apart. After the
    # 75 µm dilation the two small ones measure ~140 µm (< 275: ITC), the others ~380 and ~500 µm (lesions)
    anns = read_asap_xml(ann_dir / "test_046.xml")
    mask = evaluation_mask(anns, (60000, 30000))
    assert (mask.n_regions, len(mask.itc_labels), mask.n_lesions) == (4, 2, 2)
    axis = np.sort(mask.major_axis_um)
    assert axis[1] < 275 < axis[2] and 300 < axis[2] < 450 and 450 < axis[3] < 600
    for a in anns:  # every spline's centroid lies in a labelled region
        c = shapely.Polygon(a.vertices).centroid
        assert mask.label_at(np.array([c.x]), np.array([c.y]))[0] > 0
    # tumor_110 (macro-metastasis): 21 tumour polygons (4 of them several mm) and 18 exclusions merge into
    # 5 regions, none of them an ITC; the largest spans over 1 cm
    anns = read_asap_xml(ann_dir / "tumor_110.xml")
    mask = evaluation_mask(anns, (97792, 221184))
    assert mask.shape == (6912, 3056) and mask.labels.shape[0] < 2000  # only a window is held
    assert (mask.n_regions, len(mask.itc_labels)) == (5, 0)
    assert mask.major_axis_um.max() > 10_000
    for a in tumor_annotations(anns):
        c = shapely.Polygon(a.vertices).representative_point()
        assert mask.label_at(np.array([c.x]), np.array([c.y]))[0] > 0


# ------------------------------------------------------------------------------------------------
# FROC
# ------------------------------------------------------------------------------------------------


def _froc_case():
    """One tumour slide (lesions A, B, C of 40 x 40 cells = 311 µm, an ITC of 4 x 4 cells) and one normal slide,
    6400 x 6400 level-0 px (200 x 200 cells); plus Test_114 (excluded by default)."""
    anns = [_cells(10, 10, 40, 40), _cells(10, 100, 40, 40), _cells(100, 10, 40, 40), _cells(150, 150, 4, 4)]
    mask = evaluation_mask(anns, (6400, 6400))
    assert mask.n_lesions == 3 and len(mask.itc_labels) == 1
    tumor_det = np.array([
        [*_centre(30, 30), 0.9],    # lesion A
        [*_centre(37, 37), 0.4],    # lesion A again: a lower hit, neither TP nor FP
        [*_centre(30, 120), 0.7],   # lesion B
        [*_centre(151, 151), 0.95],  # the ITC: ignored
        [3000.0, 5000.0, 0.7],      # cell (156, 93): background, FP
        [6000.0, 100.0, 0.2],       # cell (3, 187): background, FP
    ])                              # lesion C: missed
    normal_det = np.array([[100, 100, 0.95], [200, 200, 0.5], [300, 300, 0.3]], dtype=float)  # all FP
    detections = {"Test_001": tumor_det, "test_002": normal_det, "Test_114": np.array([[10, 10, 0.99]] * 50)}
    masks = {"test_001": mask, "Test_002": None, "Test_114": None}
    return detections, masks


def test_froc_hand_computed_two_slides():
    detections, masks = _froc_case()
    result = froc(detections, masks)
    # counted: FP scores {0.7, 0.2} (tumour slide) + {0.95, 0.5, 0.3} (normal slide); lesion scores A 0.9,
    # B 0.7, C missed; 2 slides, 3 lesions. Thresholds ascending, FPs >= t / 2, lesions >= t / 3:
    #   t = 0.2:  5 FP -> 2.5, A B -> 2/3      t = 0.7:  0.7, 0.95 -> 1.0, A B -> 2/3
    #   t = 0.3:  4 FP -> 2.0, 2/3             t = 0.9:  0.95 -> 0.5, A -> 1/3
    #   t = 0.5:  3 FP -> 1.5, 2/3             t = 0.95: 0.95 -> 0.5, none -> 0      then (0, 0) at +inf
    np.testing.assert_allclose(result.thresholds, [0.2, 0.3, 0.5, 0.7, 0.9, 0.95, np.inf])
    np.testing.assert_allclose(result.fps_per_slide, [2.5, 2.0, 1.5, 1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(result.sensitivity, [2 / 3, 2 / 3, 2 / 3, 2 / 3, 1 / 3, 0, 0])
    # at 1/4 FP: between (0, 0) and (0.5, 0) -> 0; at 1/2: the highest point at 0.5 -> 1/3; at 1: 2/3;
    # at 2: 2/3; at 4 and 8, past the last point (2.5): 2/3. Score = (0 + 1/3 + 4 * 2/3) / 6 = 3/6 = 0.5
    np.testing.assert_allclose(result.sensitivities, [0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert result.score == pytest.approx(0.5)
    # the usual reading of the official curve, np.interp on the reversed arrays, agrees
    np.testing.assert_allclose(np.interp(result.fp_rates, result.fps_per_slide[::-1], result.sensitivity[::-1]),
                               result.sensitivities)
    assert (result.n_slides, result.n_tumor_slides, result.n_lesions) == (2, 1, 3)
    assert (result.n_detections, result.n_false_positives, result.n_ignored) == (9, 5, 2)  # ignored: ITC + 2nd hit on A
    assert result.excluded == ["Test_114"] and result.missing == []
    assert sorted(s for _, _, s in result.lesions if s is not None) == [0.7, 0.9]
    assert sum(s is None for _, _, s in result.lesions) == 1
    summary = result.as_dict()
    assert summary["n_detected_lesions"] == 2 and summary["curve"]["thresholds"][-1] is None
    # between rates the curve is a straight line: at 0.75 FP, halfway from (0.5, 1/3) to (1.0, 2/3) -> 1/2
    assert froc(detections, masks, fp_rates=(0.75,)).score == pytest.approx(0.5)


def test_froc_test_114_exclusion_is_configurable():
    detections, masks = _froc_case()
    assert "test_114" in DEFAULT_FROC_EXCLUDE
    with_114 = froc(detections, masks, exclude=())
    # Test_114 now counts as a third (normal) slide whose 50 detections are all FPs
    assert with_114.n_slides == 3 and with_114.n_false_positives == 5 + 50 and with_114.excluded == []
    assert with_114.score < froc(detections, masks).score


def test_froc_missing_unknown_and_invalid_slides():
    detections, masks = _froc_case()
    no_normal = {k: v for k, v in detections.items() if k != "test_002"}
    result = froc(no_normal, masks)
    assert result.missing == ["Test_002"] and result.n_slides == 2  # evaluated as a slide without detections
    with pytest.raises(MetricsError, match="no entry in masks"):
        froc({**detections, "Test_050": np.zeros((0, 3))}, masks)
    with pytest.raises(MetricsError, match="off the slide"):
        froc({**detections, "Test_001": np.array([[7000.0, 10.0, 0.5]])}, masks)
    with pytest.raises(MetricsError, match=r"\(K, 3\)"):
        froc({**detections, "Test_001": np.zeros((2, 2))}, masks)
    with pytest.raises(MetricsError, match="at least one lesion"):
        froc({"Test_002": detections["test_002"]}, {"Test_002": None})


def test_froc_counts_hits_in_the_dilation_margin_and_accepts_any_real_score():
    mask = evaluation_mask([_cells(10, 10, 40, 40)], (6400, 6400))  # cols 10..49, dilated to 46..53
    det = np.array([[*_centre(30, 53), -3.0],   # 4 cells right of the square: inside the 37.5 µm margin -> the lesion
                    [*_centre(30, 55), -5.0]])  # 6 cells right: background -> FP
    result = froc({"t": det}, {"t": mask})
    assert result.lesions == [("t", 1, -3.0)] and result.n_false_positives == 1
    # thresholds -5 (1 FP / 1 slide, sensitivity 1), -3 (0 FP, 1), then (0, 0)
    np.testing.assert_allclose(result.fps_per_slide, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(result.sensitivity, [1.0, 1.0, 0.0])
    assert result.score == pytest.approx(1.0)


def test_sensitivity_at_reads_the_highest_point_of_a_vertical_step():
    fps = np.array([2.0, 1.0, 1.0, 0.0])
    sens = np.array([0.8, 0.6, 0.2, 0.0])
    assert sensitivity_at(fps, sens, 1.0) == pytest.approx(0.6)
    assert sensitivity_at(fps, sens, 0.5) == pytest.approx(0.1)  # (0, 0) -> (1, 0.2)
    assert sensitivity_at(fps, sens, 1.5) == pytest.approx(0.7)  # (1, 0.6) -> (2, 0.8)
    assert sensitivity_at(fps, sens, 9.0) == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------------
# detections from a heatmap
# ------------------------------------------------------------------------------------------------


HEATMAP = np.array([
    [np.nan, np.nan, 0.1, 0.2, 0.1],
    [np.nan, 0.3, 0.9, 0.4, 0.2],
    [0.1, 0.2, 0.3, 0.2, 0.1],
    [0.2, 0.1, 0.2, 0.6, 0.5],
    [0.8, 0.2, 0.1, 0.3, np.nan],
])


def test_detections_are_local_maxima_at_cell_centres_in_level0():
    # 3 x 3 maxima (min distance 1): 0.9 at (1, 2); 0.6 at (3, 3) (neighbours .3 .2 .1 .2 .5 .1 .3 and NaN);
    # 0.8 at the corner (4, 0) (neighbours .2 .1 .2). Cells are 10 level-0 px, origin (1000, 2000):
    # x = 1000 + (col + 0.5) * 10, y = 2000 + (row + 0.5) * 10
    det = detections_from_heatmap(HEATMAP, 10, origin=(1000, 2000), min_distance_cells=1)
    np.testing.assert_allclose(det, [[1025, 2015, 0.9], [1005, 2045, 0.8], [1035, 2035, 0.6]])
    # min distance 2: (3, 3) is 2 rows from the 0.9 at (1, 2) -> not a maximum of its 5 x 5 window
    det = detections_from_heatmap(HEATMAP, 10, origin=(1000, 2000), min_distance_cells=2)
    np.testing.assert_allclose(det[:, 2], [0.9, 0.8])
    assert detections_from_heatmap(HEATMAP, 10, min_distance_cells=1, threshold=0.85)[:, 2].tolist() == [0.9]
    assert detections_from_heatmap(HEATMAP, 10, min_distance_cells=1, max_detections=2)[:, 2].tolist() == [0.9, 0.8]
    # non-square cells: (x, y) = ((2 + 0.5) * 10, (1 + 0.5) * 20) for the 0.9
    np.testing.assert_allclose(detections_from_heatmap(HEATMAP, (10, 20), min_distance_cells=1)[0], [25, 30, 0.9])


def test_detections_nan_cells_and_flat_maps():
    assert detections_from_heatmap(np.full((4, 4), np.nan), 10).shape == (0, 3)
    # a NaN cell is never a peak, however high its neighbours' score: here the single tissue cell is the peak
    one = np.full((3, 3), np.nan)
    one[1, 1] = -2.5
    np.testing.assert_allclose(detections_from_heatmap(one, 4), [[6, 6, -2.5]])
    # a flat map still gives peaks, spaced by the min distance (a plateau is a maximum)
    flat = detections_from_heatmap(np.zeros((3, 3)), 1, min_distance_cells=3)
    assert flat.shape == (1, 3)
    with pytest.raises(MetricsError, match="2-D"):
        detections_from_heatmap(np.zeros(5), 1)


def test_heatmap_detections_feed_froc():
    mask = evaluation_mask([_cells(10, 10, 40, 40)], (6400, 6400))
    heat = np.full((25, 25), 0.1)  # 256 level-0 px per cell (8 level-5 cells)
    heat[3, 3] = 0.9               # level-0 centre (3.5 * 256, 3.5 * 256) = (896, 896): inside the lesion
    heat[20, 20] = 0.5             # (5248, 5248): background -> FP
    det = detections_from_heatmap(heat, 256, threshold=0.2)
    result = froc({"t": det}, {"t": mask})
    assert result.n_lesions == 1 and result.lesions[0][2] == pytest.approx(0.9) and result.n_false_positives == 1
