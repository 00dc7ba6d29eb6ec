"""Our FROC (``wsi_ad.metrics``) against a port of the official Camelyon16 computation, on random cases.

The port below is written here from the published logic of ``Evaluation_FROC.py`` (B. Ehteshami Bejnordi, the
Camelyon16 organisers' script): ``computeEvaluationMask`` (Euclidean distance to the tumour pixels of the level-5
mask, kept below 75 / (0.243 * 2**5 * 2) cells, holes filled, 8-connected labels), ``computeITCList`` (regions whose
``major_axis_length`` is below 275 / (0.243 * 2**5) cells), ``compute_FP_TP_Probs`` (a detection reads the label under
``int(y / 2**5), int(x / 2**5)``; background: a false positive; an ITC: ignored; a lesion: its probability becomes the
largest of its hits, kept in a ``float32`` array with one zero-initialised entry per region), ``computeFROC`` (the
thresholds are the sorted distinct values of every FP probability and every region's TP entry, the lowest one
dropped; at each, the FPs and TP entries at or above it; a final (0, 0) point; FPs divided by the number of slides,
TPs by the number of non-ITC regions) and the score (``np.interp`` of 1/4 .. 8 FPs per slide on the reversed curve,
averaged).

Known differences, each pinned by a test here:

1. *Float32 hit scores.* The official stores a lesion's best hit in float32 while false-positive scores stay float64,
   so a hit and a false positive with the same float64 score can fall on opposite sides of a threshold. We keep
   float64 throughout. On scores exactly representable in float32 (every random case below) the two agree.
2. *The lowest threshold dropped.* The official drops the smallest distinct value; with a missed lesion or an ITC
   that value is their 0 entry (dropping it is right: a 0 threshold would count missed lesions as found). When every
   lesion is hit and there is no ITC, the official drops the lowest real score instead, and its curve loses the
   point with the most false positives. We keep every real score as a threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.measure

from wsi_ad.annotations import Annotation
from wsi_ad.metrics import CAMELYON16_MPP, FROC_FP_RATES, evaluation_mask, froc

LEVEL = 5
CELL = 2**LEVEL


# -- the port (official logic, our names) ----------------------------------------------------------------------------


def official_evaluation_mask(tumour_cells: np.ndarray, resolution: float = CAMELYON16_MPP) -> np.ndarray:
    """``computeEvaluationMask`` on a level-5 raster (True = tumour; the official reads 255 from the mask TIFF)."""
    pixels = np.where(tumour_cells, 255, 0)
    distance = ndi.distance_transform_edt(255 - pixels)
    threshold = 75 / (resolution * pow(2, LEVEL) * 2)
    filled = ndi.binary_fill_holes(distance < threshold)
    return skimage.measure.label(filled, connectivity=2)


def official_itc_list(mask: np.ndarray, resolution: float = CAMELYON16_MPP) -> list[int]:
    properties = skimage.measure.regionprops(mask)
    threshold = 275 / (resolution * pow(2, LEVEL))
    return [i + 1 for i in range(int(np.amax(mask))) if properties[i].axis_major_length < threshold]


def official_fp_tp_probs(xs, ys, probs, is_tumor: bool, mask, itc: list[int]):
    max_label = int(np.amax(mask)) if mask is not None else 0
    fp_probs, tp_probs = [], np.zeros((max_label,), dtype=np.float32)
    for x, y, p in zip(xs, ys, probs, strict=True):
        if not is_tumor:
            fp_probs.append(p)
            continue
        hit = mask[int(y / pow(2, LEVEL)), int(x / pow(2, LEVEL))]
        if hit == 0:
            fp_probs.append(p)
        elif hit not in itc and p > tp_probs[hit - 1]:
            tp_probs[hit - 1] = p
    return fp_probs, tp_probs, max_label - len(itc)


def official_froc(cases) -> tuple[np.ndarray, np.ndarray, float]:
    """``cases``: per slide (detections (K, 3) level-0 x, y, p; tumour raster or None). Returns (FPs per slide,
    sensitivity, score) as the official ``computeFROC`` + its score line."""
    all_fp, all_tp, n_tumours = [], [], 0
    for det, raster in cases:
        mask = official_evaluation_mask(raster) if raster is not None else None
        itc = official_itc_list(mask) if mask is not None else []
        fp, tp, n = official_fp_tp_probs(det[:, 0], det[:, 1], det[:, 2], raster is not None, mask, itc)
        all_fp += list(fp)
        all_tp += list(tp)
        n_tumours += n
    total_fp, total_tp = [], []
    all_probs = sorted(set(all_fp + all_tp))
    for threshold in all_probs[1:]:
        total_fp.append((np.asarray(all_fp) >= threshold).sum())
        total_tp.append((np.asarray(all_tp) >= threshold).sum())
    total_fp.append(0)
    total_tp.append(0)
    fps = np.asarray(total_fp) / float(len(cases))
    sensitivity = np.asarray(total_tp) / float(n_tumours)
    score = float(np.mean(np.interp(FROC_FP_RATES, fps[::-1], sensitivity[::-1])))
    return fps, sensitivity, score


# -- random cases --------------------------------------------------------------------------------------------------


def _random_case(rng: np.random.Generator, n_slides: int, every_lesion_hit: bool = False):
    """Slides of 96 x 96 level-5 cells whose lesions are unions of rectangles on cell boundaries (so that the
    rasters of the port and our polygon fill agree exactly), detections with scores k / 1024 (exact in float32)."""
    rows, cols = 96, 96
    size = (cols * CELL, rows * CELL)
    slides = []
    for s in range(n_slides):
        tumour = s == 0 or rng.random() < 0.6
        annotations, raster = [], np.zeros((rows, cols), bool)
        if tumour:
            for _ in range(rng.integers(1, 5)):
                w, h = rng.integers(2, 45, size=2)
                c0, r0 = rng.integers(2, cols - w - 2), rng.integers(2, rows - h - 2)
                raster[r0:r0 + h, c0:c0 + w] = True
                x0, y0, x1, y1 = c0 * CELL, r0 * CELL, (c0 + w) * CELL, (r0 + h) * CELL
                annotations.append(Annotation(name="a", group="_0", kind="tumor", shape_type="Polygon",
                                              vertices=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)))
        k = int(rng.integers(0, 25))
        xy = rng.uniform(0, 1, size=(k, 2)) * np.array(size)
        if tumour and (every_lesion_hit or rng.random() < 0.7):
            inside = np.argwhere(raster)
            picks = inside[rng.integers(0, len(inside), size=int(rng.integers(1, 6)))]
            xy = np.vstack([xy, (picks[:, ::-1] + rng.uniform(0.05, 0.95, size=picks.shape)) * CELL])
        scores = rng.integers(1, 1025, size=len(xy)) / 1024.0
        det = np.column_stack([xy, scores]) if len(xy) else np.zeros((0, 3))
        slides.append((f"Test_{s + 1:03d}", det, raster if tumour else None, annotations if tumour else None, size))
    return slides


def _ours(slides):
    masks = {sid: (evaluation_mask(ann, size) if raster is not None else None)
             for sid, _, raster, ann, size in slides}
    return froc({sid: det for sid, det, *_ in slides}, masks, exclude=())


def _with_lesions(slides) -> bool:
    return any(raster is not None and (official_evaluation_mask(raster).max() - len(official_itc_list(
        official_evaluation_mask(raster)))) > 0 for _, _, raster, _, _ in slides)


def test_our_froc_equals_the_official_computation_on_random_cases():
    rng = np.random.default_rng(2024)
    compared = with_zero_entry = 0
    while compared < 40:
        slides = _random_case(rng, int(rng.integers(2, 6)))
        if not _with_lesions(slides):
            continue
        fps, sens, score = official_froc([(det, raster) for _, det, raster, _, _ in slides])
        ours = _ours(slides)
        # the lesions and ITCs are the same regions
        for _, _, raster, ann, size in slides:
            if raster is not None:
                official = official_evaluation_mask(raster)
                mine = evaluation_mask(ann, size)
                assert np.array_equal(mine.full_labels(), official)
                assert sorted(mine.itc_labels) == official_itc_list(official)
        has_zero = any(
            raster is not None and (len(official_itc_list(official_evaluation_mask(raster))) > 0
                                    or any(s is None for sid2, _, s in ours.lesions if sid2 == sid))
            for sid, _, raster, _, _ in slides)
        if has_zero:        # a 0 entry is the one the official drops: the curves are the same, point for point
            with_zero_entry += 1
            assert np.allclose(ours.fps_per_slide, fps) and np.allclose(ours.sensitivity, sens)
            assert ours.score == pytest.approx(score, abs=1e-12)
        else:               # every lesion hit, no ITC: the official curve is ours without its lowest threshold
            assert np.allclose(ours.fps_per_slide[1:], fps) and np.allclose(ours.sensitivity[1:], sens)
        compared += 1
    assert 20 <= with_zero_entry < compared


def test_difference_when_every_lesion_is_hit_the_official_drops_the_lowest_real_score():
    """Known difference 2: one normal slide with one false positive at 0.25, one tumour slide whose only lesion is
    hit at 0.75. The official thresholds are [0.75] (0.25 dropped), ours [0.25, 0.75]: our curve has the point
    (1 FP per 2 slides = 0.5, sensitivity 1) that the official lacks, so at 1/2 FP per slide we read 1.0 and the
    official's interpolation reads 1.0 only from 0 FPs on (it has no FP point at all)."""
    size = (96 * CELL, 96 * CELL)
    raster = np.zeros((96, 96), bool)
    raster[20:70, 20:70] = True                 # 50 cells = 389 µm: a lesion, not an ITC
    x0, x1 = 20 * CELL, 70 * CELL
    ann = [Annotation(name="a", group="_0", kind="tumor", shape_type="Polygon",
                      vertices=np.array([[x0, x0], [x1, x0], [x1, x1], [x0, x1]], float))]
    normal = np.array([[100.0, 100.0, 0.25]])
    tumour = np.array([[45.0 * CELL, 45.0 * CELL, 0.75]])
    fps, sens, score = official_froc([(normal, None), (tumour, raster)])
    assert list(fps) == [0.0, 0.0] and list(sens) == [1.0, 0.0]            # one threshold (0.75), then (0, 0)
    ours = froc({"Test_001": normal, "Test_002": tumour}, {"Test_001": None, "Test_002": evaluation_mask(ann, size)},
                exclude=())
    assert list(ours.thresholds[:-1]) == [0.25, 0.75]
    assert list(ours.fps_per_slide) == [0.5, 0.0, 0.0] and list(ours.sensitivity) == [1.0, 1.0, 0.0]
    assert ours.score == 1.0 and score == 1.0   # here the reading is the same; the curves are not


def test_difference_float32_hit_scores():
    """Known difference 1: a hit and a false positive both scored 0.1 (not exact in float32). The official stores
    the hit as float32(0.1) = 0.10000000149 > 0.1, so at the threshold 0.10000000149 the FP (0.1) is below and the
    lesion above: an extra point (0 FP, sensitivity 1) that float64 scoring does not have."""
    size = (96 * CELL, 96 * CELL)
    raster = np.zeros((96, 96), bool)
    raster[20:70, 20:70] = True
    x0, x1 = 20 * CELL, 70 * CELL
    ann = [Annotation(name="a", group="_0", kind="tumor", shape_type="Polygon",
                      vertices=np.array([[x0, x0], [x1, x0], [x1, x1], [x0, x1]], float))]
    tumour = np.array([[45.0 * CELL, 45.0 * CELL, 0.1], [5.0 * CELL, 5.0 * CELL, 0.1]])     # a hit and an FP
    normal = np.array([[100.0, 100.0, 0.05]])
    fps, sens, score = official_froc([(normal, None), (tumour, raster)])
    assert list(fps) == [0.5, 0.0, 0.0] and list(sens) == [1.0, 1.0, 0.0]   # 0.1 and float32(0.1) apart
    ours = froc({"Test_001": normal, "Test_002": tumour}, {"Test_001": None, "Test_002": evaluation_mask(ann, size)},
                exclude=())
    assert list(ours.thresholds[:-1]) == [0.05, 0.1]
    assert list(ours.fps_per_slide) == [1.0, 0.5, 0.0] and list(ours.sensitivity) == [1.0, 1.0, 0.0]
    assert ours.score != pytest.approx(score)   # at 1/4 FP per slide: official 1.0, ours 0.5 (interpolated)
