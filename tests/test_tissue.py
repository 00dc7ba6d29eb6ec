"""Tissue masking on real slides and thumbnails (pen ink, fluorescence) and on synthetic images built here.

The PNG thumbnails in ../shared/data/thumbnails carry no resolution. The µm/px used for each was estimated
from what is visible in it (fat cells are ~50–100 µm across, lymphocyte nuclei ~7 µm, a core or section
~10–15 mm): the two whole-section thumbnails at ~32 µm/px, the two pen-marked crops at ~2 µm/px and the
lung crop, whose nuclei are ~15–20 px, at ~0.5 µm/px.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label
from skimage.morphology import dilation, disk

from wsi_ad.atomic import write_png_atomic
from wsi_ad.slide import open_slide
from wsi_ad.tissue import (
    TissueMask,
    TissueParams,
    level0_boxes_to_mask_px,
    level0_px_to_mask_px,
    mask_px_to_level0_px,
    mask_slide,
    qc_image,
    tissue_fraction,
    tissue_mask,
)

THUMBNAIL_MPP = {
    "diagnostic-slide-thumb-rgb.png": 32.0,
    "wsi-blue-pen.png": 32.0,
    "tcga-green-pen.png": 2.0,
    "tcga-red-pen.png": 2.0,
    "tcga-lung-rgb.png": 0.5,
}
PEN_THUMBNAILS = sorted(name for name in THUMBNAIL_MPP if "pen" in name or "diagnostic" in name)


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _reference_ink(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Ink by plain RGB thresholds in the style of histolab's pen filters (independent of wsi_ad.tissue),
    strict enough to hit only unmistakable ink."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return {
        "green": (g > r + 30) & (b > r + 20),
        "blue": (b > r + 40) & (b > g + 20),
        "red": (r > 150) & (g < 50) & (b < 70),
        "black": rgb.max(axis=2) < 40,
    }


# -- real slides ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cmu1(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        mask, thumb = mask_slide(slide)
        yield slide.mpp, mask, thumb, slide


def test_cmu1_tissue_found_and_every_region_kept(cmu1):
    slide_mpp, mask, thumb, _ = cmu1
    assert mask.mpp == 8.0 and mask.mask.shape == thumb.shape[:2] and mask.mask.dtype == bool
    # The section (1.1 x 1.5 mm field) covers roughly a third of it; a thin detached strand on the left
    # is a second region and must be kept (not only the largest).
    assert 0.4 < mask.tissue_area_mm2 < 0.9
    assert label(mask.mask).max() >= 2
    assert mask.warnings == []
    assert 20 <= mask.threshold <= 45


def test_cmu1_no_mask_on_white_glass(cmu1):
    _, mask, thumb, _ = cmu1
    sat = thumb.max(axis=2).astype(int) - thumb.min(axis=2)
    white = (thumb.min(axis=2) > 220) & (sat < 15)
    # Glass around the section: white pixels connected to the image border.
    labels = label(white, connectivity=1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    glass = np.isin(labels, border[border > 0])
    # Closing (24 µm = 3 px here) may bridge glass between tissue at the edges: allow that band.
    near_tissue_edge = dilation(~mask.mask, disk(3)) & dilation(mask.mask, disk(3))
    far_glass = glass & ~near_tissue_edge
    assert far_glass.sum() > 0.4 * glass.size
    assert (far_glass & mask.mask).sum() <= 0.002 * far_glass.sum()
    # White spaces inside the section (clefts, gaps between fibres) are filled only when small.
    assert (white & mask.mask).sum() < 0.1 * mask.mask.sum()


def test_mask_slide_is_warning_free(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecation warnings from scikit-image
            mask, _ = mask_slide(slide)
    assert mask.mask.any()


def test_resolution_invariance(shared_slides):
    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        fine, _ = mask_slide(slide, TissueParams(mask_mpp=4.0))
        coarse, _ = mask_slide(slide, TissueParams(mask_mpp=8.0))
    assert fine.mask.shape[0] == pytest.approx(2 * coarse.mask.shape[0], abs=1)
    assert coarse.tissue_area_mm2 == pytest.approx(fine.tissue_area_mm2, rel=0.10)


def test_fluorescence_slide_gives_no_tissue_and_a_warning(shared_slides, caplog):
    with caplog.at_level(logging.WARNING, logger="wsi_ad.tissue"):
        with open_slide(shared_slides / "fluorescence-tritc.ndpi") as slide:
            mask, thumb = mask_slide(slide)
    assert mask.mask.shape == thumb.shape[:2]
    assert mask.tissue_fraction_of_image < 0.01
    assert any("no brightfield H&E tissue" in w and "fluorescence" in w for w in mask.warnings)
    assert "fluorescence" in caplog.text


# -- real thumbnails --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PEN_THUMBNAILS)
def test_pen_ink_is_excluded(shared_data, name):
    rgb = _rgb(shared_data / "thumbnails" / name)
    mask = tissue_mask(rgb, mpp=THUMBNAIL_MPP[name])
    assert mask.tissue_fraction_of_image > 0.1, "tissue found beside the ink"
    checked = 0
    for kind, ink in _reference_ink(rgb).items():
        if ink.sum() < 200:  # a few dark pixels in a fold are not marker
            continue
        checked += 1
        overlap = (ink & mask.mask).sum() / ink.sum()
        assert overlap < 0.02, f"{name}: {overlap:.1%} of the {kind} ink is in the tissue mask"
    assert checked >= 1
    assert mask.pen_fraction > 0.02


def test_diagnostic_thumbnail_keeps_tissue_inside_marker_circles(shared_data):
    rgb = _rgb(shared_data / "thumbnails" / "diagnostic-slide-thumb-rgb.png")
    mask = tissue_mask(rgb, mpp=32.0)
    # Centres of two black-marker circles (row, col), checked by eye: tissue, not ink.
    for row, col in [(130, 100), (285, 275)]:
        assert mask.mask[row, col]
    assert mask.dark_fraction > 0.02  # the marker rings


@pytest.mark.parametrize("name", ["tcga-lung-rgb.png", "wsi-blue-pen.png"])
def test_other_thumbnails_tissue_found(shared_data, name):
    rgb = _rgb(shared_data / "thumbnails" / name)
    mask = tissue_mask(rgb, mpp=THUMBNAIL_MPP[name])
    assert mask.warnings == []
    assert 0.1 < mask.tissue_fraction_of_image <= 1.0


# -- synthetic images -------------------------------------------------------------------------------

def _synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """White glass with a dense purple disk and a pale pink rectangle, at 8 µm/px, with noise."""
    rng = np.random.default_rng(seed)
    rgb = np.full((200, 300, 3), 242.0)
    rows, cols = np.mgrid[:200, :300]
    dense = (rows - 100) ** 2 + (cols - 70) ** 2 < 45 ** 2
    faint = (rows >= 60) & (rows < 140) & (cols >= 170) & (cols < 270)
    rgb[dense] = (170, 80, 150)   # saturation ~0.53
    rgb[faint] = (230, 180, 205)  # saturation ~0.22: pale eosin
    rgb += rng.normal(0, 3, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), dense, faint


def test_faint_and_dense_regions_are_both_kept():
    rgb, dense, faint = _synthetic()
    mask = tissue_mask(rgb, mpp=8.0)
    assert mask.warnings == []
    assert (mask.mask & dense).sum() > 0.95 * dense.sum()
    assert (mask.mask & faint).sum() > 0.95 * faint.sum()
    assert (mask.mask & ~dense & ~faint).sum() < 0.02 * (dense.sum() + faint.sum())
    assert label(mask.mask).max() == 2
    assert mask.tissue_area_mm2 == pytest.approx((dense.sum() + faint.sum()) * 64 / 1e6, rel=0.05)


def test_same_physical_result_at_two_resolutions():
    rgb, _, _ = _synthetic()
    coarse = tissue_mask(rgb[::2, ::2], mpp=16.0)
    fine = tissue_mask(rgb, mpp=8.0)
    assert coarse.tissue_area_mm2 == pytest.approx(fine.tissue_area_mm2, rel=0.05)


def test_small_specks_removed_small_fragments_kept():
    rgb = np.full((200, 200, 3), 242, np.uint8)
    rgb[20:22, 20:22] = (170, 80, 150)      # 16 x 16 µm speck at 8 µm/px: dust
    rgb[100:112, 100:112] = (170, 80, 150)  # 96 x 96 µm fragment: tissue
    mask = tissue_mask(rgb, mpp=8.0)
    assert not mask.mask[15:30, 15:30].any()
    assert mask.mask[103:109, 103:109].all()


@pytest.mark.parametrize("value", [255, 240])
def test_blank_glass_gives_empty_mask_and_warning(value, caplog):
    rng = np.random.default_rng(1)
    rgb = np.clip(value + rng.normal(0, 2, (150, 150, 3)), 0, 255).astype(np.uint8)
    with caplog.at_level(logging.WARNING, logger="wsi_ad.tissue"):
        mask = tissue_mask(rgb, mpp=8.0)
    assert not mask.mask.any()
    assert mask.tissue_area_mm2 == 0.0
    assert any("no tissue found" in w for w in mask.warnings)
    assert "no tissue found" in caplog.text


def test_black_image_gives_empty_mask_and_warning():
    mask = tissue_mask(np.zeros((50, 60, 3), np.uint8), mpp=8.0)
    assert not mask.mask.any() and mask.warnings


def test_green_pen_on_glass_and_on_tissue_is_excluded():
    rgb, dense, _ = _synthetic()
    rgb[:, 140:152] = (60, 150, 120)  # a green stroke across glass and the faint region
    rgb[90:110, 40:100] = (20, 20, 25)  # black marker across the dense disk
    mask = tissue_mask(rgb, mpp=8.0)
    assert not mask.mask[:, 140:152].any()
    assert not mask.mask[90:110, 40:100].any()
    assert mask.mask[dense].mean() > 0.6
    assert mask.pen_fraction > 0.03


def test_params_validate_and_round_trip():
    params = TissueParams(mask_mpp=4.0, channel="gray")
    assert TissueParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError):
        TissueParams(channel="hue")
    with pytest.raises(ValueError):
        TissueParams(min_object_area_um2=-1)
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((4, 4), np.uint8), mpp=8.0)


def test_gray_channel_option_finds_tissue():
    rgb, dense, faint = _synthetic()
    mask = tissue_mask(rgb, mpp=8.0, params=TissueParams(channel="gray"))
    assert (mask.mask & dense).sum() > 0.95 * dense.sum()
    assert mask.params.channel == "gray"


# -- tissue fraction of level-0 boxes -----------------------------------------------------------------

def test_tissue_fraction_hand_computed():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # tissue over mask pixels 2..5 (x and y)
    # mask at 8 µm/px, slide at 0.5 µm/px: one mask pixel = 16 level-0 pixels.
    boxes = np.array([
        [32, 32, 64, 64],    # exactly the square: 1
        [0, 0, 32, 32],      # outside: 0
        [64, 32, 64, 64],    # right half in: 0.5
        [80, 80, 32, 32],    # straddles the corner at (96, 96) level-0: 1/4 in
        [40, 40, 8, 8],      # inside one tissue mask pixel: 1
        [88, 88, 16, 16],    # half a mask pixel in, each way: 1/4
        [150, 150, 40, 40],  # partly outside the mask (10 mask px = 160 level-0 px): 0
        [0, 0, 0, 0],        # empty: 0
    ])
    got = tissue_fraction(mask, boxes, mask_mpp=8.0, slide_mpp=0.5)
    np.testing.assert_allclose(got, [1, 0, 0.5, 0.25, 1, 0.25, 0, 0], atol=1e-12)
    tm = TissueMask(mask, 8.0, 30.0, TissueParams())
    np.testing.assert_allclose(tm.tissue_fraction(boxes, 0.5), got)


def test_tissue_fraction_matches_brute_force_on_random_boxes():
    rng = np.random.default_rng(3)
    mask = rng.random((40, 50)) > 0.5
    # slide 0.25 µm/px, mask 4 µm/px: 16 level-0 px per mask px; boxes aligned to mask pixels.
    cells = rng.integers(0, 30, (50, 2))
    sizes = rng.integers(1, 10, (50, 2))
    boxes = np.concatenate([cells * 16, sizes * 16], axis=1)
    got = tissue_fraction(mask, boxes, mask_mpp=4.0, slide_mpp=0.25)
    want = [mask[y:y + h, x:x + w].mean() for x, y, w, h in np.concatenate([cells, sizes], axis=1)]
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_coordinate_helpers_round_trip():
    xy = np.array([[0.0, 0.0], [10.0, 20.0]])
    level0 = mask_px_to_level0_px(xy, mask_mpp=8.0, slide_mpp=(0.5, 0.25))
    np.testing.assert_allclose(level0, [[0, 0], [160, 640]])
    np.testing.assert_allclose(level0_px_to_mask_px(level0, mask_mpp=8.0, slide_mpp=(0.5, 0.25)), xy)
    boxes = level0_boxes_to_mask_px([[160, 640, 16, 32]], mask_mpp=8.0, slide_mpp=(0.5, 0.25))
    np.testing.assert_allclose(boxes, [[10, 20, 1, 1]])


def test_tissue_fraction_of_real_tiles(cmu1):
    slide_mpp, mask, _, slide = cmu1
    width, height = slide.dimensions
    tile = 256
    xs, ys = np.meshgrid(np.arange(0, width - tile, tile), np.arange(0, height - tile, tile))
    boxes = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, tile), np.full(xs.size, tile)], axis=1)
    frac = mask.tissue_fraction(boxes, (slide.mpp_x, slide.mpp_y))
    assert frac.shape == (len(boxes),) and ((frac >= 0) & (frac <= 1)).all()
    assert (frac > 0.5).sum() > 10 and (frac == 0).sum() > 10
    # The mean tissue fraction of a full tiling is the tissue fraction of the covered area.
    assert frac.mean() == pytest.approx(mask.tissue_fraction_of_image, abs=0.08)


# -- QC image -----------------------------------------------------------------------------------------

def test_qc_image_outline_is_on_the_mask_boundary(tmp_path):
    rgb, _, _ = _synthetic()
    mask = tissue_mask(rgb, mpp=8.0)
    qc = qc_image(rgb, mask, color=(0, 255, 0), thickness_px=2)
    assert qc.shape == rgb.shape and qc.dtype == np.uint8
    drawn = np.all(qc == (0, 255, 0), axis=2) & ~np.all(rgb == (0, 255, 0), axis=2)
    assert drawn.any()
    assert not (drawn & ~mask.mask).any()                      # only on tissue pixels ...
    interior = ~dilation(~mask.mask, np.ones((5, 5), bool))    # ... and only within 2 px of the edge
    assert not (drawn & interior).any()
    edge = mask.mask & dilation(~mask.mask, np.ones((3, 3), bool))
    assert drawn[edge].all()                                  # the whole boundary is drawn
    np.testing.assert_array_equal(qc[~drawn], rgb[~drawn])
    path = tmp_path / "qc" / "slide_tissue.png"
    write_png_atomic(path, qc)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), qc)
    assert [p.name for p in path.parent.iterdir()] == ["slide_tissue.png"]  # no temporary left
