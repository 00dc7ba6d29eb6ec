"""Synthetic slides: real files read back with OpenSlide and tifffile, dataset layout, determinism, content."""

from __future__ import annotations

import csv
import filecmp

import numpy as np
import openslide
import pytest
import scipy.ndimage as ndi
import tifffile
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from wsi_ad.annotations import fill_polygon, rasterize_annotations, read_asap_xml
from wsi_ad.synth import (
    CAMELYON_MPP,
    HOSPITAL_STAINS,
    _build_scene,
    level_dimensions,
    render_region,
    synthesize_slide,
)


@pytest.fixture(scope="module")
def tumor_slide(tmp_path_factory):
    """One 8192 px tumour slide with a single 0.9 mm lesion and no pen marks (for pixel statistics)."""
    path = tmp_path_factory.mktemp("synth_slide") / "tumor.tif"
    return synthesize_slide(path, width_px=8192, seed=11, lesion_sizes_mm=[0.9], pen_marks=False)


def test_openslide_reads_level_structure_and_metadata(tumor_slide):
    with openslide.OpenSlide(str(tumor_slide.path)) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(CAMELYON_MPP)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(CAMELYON_MPP)
        assert osr.properties["openslide.objective-power"] == "40"
        assert osr.level_count >= 4
        assert list(osr.level_dimensions) == tumor_slide.level_dimensions == level_dimensions(8192, 8192)
        assert osr.level_dimensions[0] == (8192, 8192)
        np.testing.assert_allclose(osr.level_downsamples, [2.0**k for k in range(osr.level_count)])
        assert "thumbnail" in osr.associated_images
        x_min, y_min, x_max, y_max = tumor_slide.annotations[0].bbox  # lesions lie in tissue
        center = (int(x_min + x_max) // 2 - 256, int(y_min + y_max) // 2 - 256)
        for level in range(osr.level_count):
            w_k, h_k = osr.level_dimensions[level]
            size = (min(128, w_k // 2), min(96, h_k // 2))
            region = np.asarray(osr.read_region(center, level, size))
            assert region.shape == (size[1], size[0], 4)
            assert (region[..., 3] == 255).all()  # inside the level: opaque
            assert region[..., :3].std() > 1  # real content, not a blank read


def test_tiff_pages_look_like_an_svs(tumor_slide):
    with tifffile.TiffFile(tumor_slide.path) as tif:
        pages = tif.pages
        assert len(pages) == len(tumor_slide.level_dimensions) + 1
        assert pages[0].is_tiled and not pages[1].is_tiled  # level 0, then the stripped thumbnail
        assert all(p.is_tiled for p in list(pages)[2:])
        for page in pages:
            assert page.tags["NewSubfileType"].value == 0
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert pages[0].description.startswith("Aperio Image Library")
        assert "AppMag = 40|MPP = 0.243" in pages[0].description
        xres = pages[0].tags["XResolution"].value
        assert 1e4 / (xres[0] / xres[1]) == pytest.approx(CAMELYON_MPP, rel=1e-6)  # px/cm -> um/px
        lvl1 = pages[2].tags["XResolution"].value
        assert 1e4 / (lvl1[0] / lvl1[1]) == pytest.approx(CAMELYON_MPP * 2, rel=1e-6)
        assert (pages[0].tilewidth, pages[0].tilelength) == (256, 256)


def test_annotations_written_and_drawn_are_the_same_polygons(synth_dataset, tumor_slide):
    (xml,) = synth_dataset.tumor_annotations
    slide = synth_dataset.slides["tumor_001"]
    assert read_asap_xml(xml) == slide.annotations
    assert len(slide.annotations) >= 1
    assert all(a.kind == "tumor" and a.group == "_0" for a in slide.annotations)
    (lesion,) = tumor_slide.annotations
    assert lesion.major_axis_px() * CAMELYON_MPP / 1000 == pytest.approx(0.9, abs=0.001)
    assert tumor_slide.metastasis == "Micro"


def test_dataset_has_the_official_layout_and_reference(synth_dataset):
    root = synth_dataset.root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    tumor_tests = [name for name, label_ in synth_dataset.test_labels.items() if label_ == "Tumor"]
    expected = [
        "testing/images/test_001.tif",
        "testing/images/test_002.tif",
        *(f"testing/lesion_annotations/{name.lower()}.xml" for name in tumor_tests),
        "testing/reference.csv",
        "training/lesion_annotations/tumor_001.xml",
        "training/normal/normal_001.tif",
        "training/tumor/tumor_001.tif",
    ]
    assert files == sorted(expected)  # nothing else: no temporary files left behind
    assert sorted(synth_dataset.test_labels.values()) == ["Normal", "Tumor"]
    with open(synth_dataset.reference_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows] == ["Test_001", "Test_002"]  # no header
    for name, label_, primary, category in rows:
        assert label_ == synth_dataset.test_labels[name]
        assert primary  # the patient's primary tumour type, as in the official file
        slide = synth_dataset.slides[name.lower()]
        if label_ == "Tumor":
            assert category == slide.metastasis in ("Macro", "Micro")
            assert (category == "Macro") == (slide.largest_lesion_mm > 2.0)
        else:
            assert category == "None" and not slide.annotations
    for path in synth_dataset.test_annotations:
        stem = path.stem
        assert read_asap_xml(path) == synth_dataset.slides[stem].annotations


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a = synthesize_slide(tmp_path / "a.tif", width_px=4096, seed=5, stain="B")
    b = synthesize_slide(tmp_path / "b.tif", width_px=4096, seed=5, stain="B", workers=1)
    c = synthesize_slide(tmp_path / "c.tif", width_px=4096, seed=6, stain="B")
    assert filecmp.cmp(a.path, b.path, shallow=False)
    assert not filecmp.cmp(a.path, c.path, shallow=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif", "c.tif"]


def test_rendering_is_seamless_across_windows():
    scene = _build_scene(4096, 4096, 3, 0, None, HOSPITAL_STAINS["A"], False, CAMELYON_MPP)
    x0, y0 = 1536, 1536  # in tissue (the largest island is near the centre)
    whole = render_region(scene, x0, y0, 512, 512).astype(int)
    rows = [
        np.concatenate([render_region(scene, x0 + dx, y0 + dy, 256, 256) for dx in (0, 256)], axis=1)
        for dy in (0, 256)
    ]
    parts = np.concatenate(rows, axis=0).astype(int)
    assert whole.std() > 10  # tissue, not glass
    # identical up to the glass's per-window noise (about +-1 % intensity)
    assert np.abs(whole - parts).max() <= 6
    assert np.abs(whole - parts).mean() < 1.5


def _lesion_and_normal_regions(slide, size=768):
    """Level-0 top-left corners of a window well inside the lesion and one in normal tissue far from it."""
    ds = 16
    shape = (8192 // ds, 8192 // ds)
    lesion = rasterize_annotations(slide.annotations, shape, ds)
    inside = ndi.distance_transform_edt(lesion)
    ly, lx = np.unravel_index(np.argmax(inside), inside.shape)
    with openslide.OpenSlide(str(slide.path)) as osr:
        level = osr.get_best_level_for_downsample(4)          # downsample 4 (level 2 of a 2x pyramid)
        low = np.asarray(osr.read_region((0, 0), level, osr.level_dimensions[level]).convert("RGB")).astype(float)
    low = low.reshape(shape[0], 4, shape[1], 4, 3).mean(axis=(1, 3))
    tissue = low.max(axis=2) - low.min(axis=2) > 25  # stained: coloured, unlike grey glass
    far_from_lesion = ndi.distance_transform_edt(~lesion) > 40
    deep_tissue = ndi.distance_transform_edt(tissue) > 30
    ny, nx = np.argwhere(far_from_lesion & deep_tissue)[0]
    half = size // 2
    return (lx * ds - half, ly * ds - half), (nx * ds - half, ny * ds - half), tissue, low


def _nucleus_stats(rgb):
    """(typical nucleus radius in px, mean haematoxylin of nuclear pixels) of an RGB window.

    The radius comes from a granulometry: the radius of the disk whose morphological opening removes
    half of the (hole-filled, Otsu-thresholded) nuclear area; robust to touching nuclei.
    """
    h = rgb2hed(rgb)[..., 0]
    smooth = ndi.gaussian_filter(h, 2)
    nuclei = ndi.binary_fill_holes(smooth > threshold_otsu(smooth))
    area = nuclei.sum()
    depth = ndi.distance_transform_edt(nuclei)
    radius = 0
    for radius in range(4, 48, 2):
        # opening by a disk of this radius, via distance transforms: the union of the disks that fit
        opened = ndi.distance_transform_edt(depth < radius) <= radius
        if (opened & nuclei).sum() < 0.5 * area:
            break
    return radius, float(h[nuclei].mean())


def test_tumour_looks_different_from_normal_tissue(tumor_slide):
    size = 768
    (tx, ty), (nx, ny), _, _ = _lesion_and_normal_regions(tumor_slide, size)
    (lesion,) = tumor_slide.annotations
    assert fill_polygon(lesion.vertices, (size, size), 1.0, (tx, ty)).all()  # the window is all tumour
    assert not fill_polygon(lesion.vertices, (size, size), 1.0, (nx, ny)).any()  # and this one none
    with openslide.OpenSlide(str(tumor_slide.path)) as osr:
        tumour = np.asarray(osr.read_region((tx, ty), 0, (size, size)).convert("RGB"))
        normal = np.asarray(osr.read_region((nx, ny), 0, (size, size)).convert("RGB"))
    t_radius, t_dark = _nucleus_stats(tumour)
    n_radius, n_dark = _nucleus_stats(normal)
    um = CAMELYON_MPP
    # lymphocytes: 6-8 um nuclei; tumour: 10-20 um, crowded and hyperchromatic (darker than lymphocytes)
    assert 2.0 <= n_radius * um <= 4.5, n_radius
    assert 4.5 <= t_radius * um <= 10.0, t_radius
    assert t_radius >= 1.6 * n_radius
    assert t_dark > 1.15 * n_dark, (t_dark, n_dark)


def test_background_is_near_white_and_tissue_is_he_coloured(tumor_slide):
    _, _, tissue, low = _lesion_and_normal_regions(tumor_slide)
    far_glass = ndi.distance_transform_edt(~tissue) > 30
    glass = low[far_glass]
    assert len(glass) > 1000
    assert (glass.mean(axis=0) > 235).all() and (glass.mean(axis=0) < 253).all()
    assert glass.std(axis=0).max() < 3
    he = low[ndi.binary_erosion(tissue, iterations=5)]
    r, g, b = he.mean(axis=0)
    assert r > g + 20 and b > g + 20, (r, g, b)  # pink-purple: eosin and haematoxylin both absorb green


def test_pen_marks_add_ink_and_change_nothing_else(tmp_path):
    plain = synthesize_slide(tmp_path / "plain.tif", width_px=4096, seed=8, pen_marks=False)
    pen = synthesize_slide(tmp_path / "pen.tif", width_px=4096, seed=8, pen_marks=True)
    assert plain.annotations == pen.annotations
    lows = []
    for slide in (plain, pen):
        with openslide.OpenSlide(str(slide.path)) as osr:
            lows.append(np.asarray(osr.read_region((0, 0), 2, osr.level_dimensions[2]).convert("RGB")).astype(int))
    changed = np.abs(lows[1] - lows[0]).max(axis=-1) > 30
    assert 0.005 < changed.mean() < 0.5  # strokes, not the whole slide
    unchanged = np.abs(lows[1] - lows[0]).max(axis=-1) <= 2
    assert unchanged.mean() > 0.5


def test_hospital_stains_differ():
    a, b = HOSPITAL_STAINS["A"], HOSPITAL_STAINS["B"]
    assert a.od_h != b.od_h and a.od_e != b.od_e and a.scale_e != b.scale_e


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        synthesize_slide(tmp_path / "s.tif", width_px=1024)
    with pytest.raises(ValueError, match="cannot place a 3.00 mm lesion"):
        synthesize_slide(tmp_path / "s.tif", width_px=8192, lesion_sizes_mm=[3.0])
    assert not list(tmp_path.iterdir())


# -- the "lymph-node" tissue mode -------------------------------------------------------------------------------


def _ln_scene(seed=7, lesion_mm=None, size=8192):
    sizes = None if lesion_mm is None else [lesion_mm]
    return _build_scene(size, size, seed, 0 if lesion_mm is None else 1, sizes, HOSPITAL_STAINS["A"], False,
                        CAMELYON_MPP, tissue="lymph-node")


def _zone_window(scene, name, size=512, threshold=0.9):
    """Top-left (level-0, 128-aligned) of a ``size`` window centred on a point where zone ``name`` is >= threshold
    and the tissue is solid, or None."""
    from wsi_ad.synth import FIELD_DS, _ln_zone, sample_field

    st = 64
    n = scene.width // st
    z = _ln_zone(scene, name, 0, 0, n, n, step=st)
    tissue = sample_field(scene.tissue_field, FIELD_DS, 0, 0, n, n, step=st)
    cand = np.argwhere((z >= threshold) & (tissue > (0.3 if name == "capsule" else 0.8)))
    if not len(cand):
        return None
    y, x = cand[len(cand) // 2] * st
    half = size // 2
    return (int(np.clip(x // 128 * 128 - half, 0, scene.width - size)),
            int(np.clip(y // 128 * 128 - half, 0, scene.height - size)))


def test_tissue_modes_share_the_scene_and_simple_is_unchanged(tmp_path):
    from wsi_ad.synth import DEFAULT_TISSUE, TISSUE_MODES

    assert TISSUE_MODES == ("simple", "lymph-node") and DEFAULT_TISSUE in TISSUE_MODES
    simple = _build_scene(4096, 4096, 3, 0, None, HOSPITAL_STAINS["A"], False, CAMELYON_MPP)
    ln = _build_scene(4096, 4096, 3, 0, None, HOSPITAL_STAINS["A"], False, CAMELYON_MPP, tissue="lymph-node")
    assert simple.tissue == "simple" and simple.edge_field is None
    assert [i.center for i in simple.islands] == [i.center for i in ln.islands] and simple.stain == ln.stain
    assert not np.array_equal(render_region(simple, 1536, 1536, 256, 256), render_region(ln, 1536, 1536, 256, 256))
    with pytest.raises(ValueError, match="unknown tissue mode"):
        _build_scene(4096, 4096, 3, 0, None, HOSPITAL_STAINS["A"], False, CAMELYON_MPP, tissue="liver")
    slide = synthesize_slide(tmp_path / "ln.tif", width_px=4096, seed=3, tissue="lymph-node", workers=1)
    assert slide.tissue == "lymph-node"
    with openslide.OpenSlide(str(slide.path)) as osr:
        assert osr.properties.get("aperio.SynthTissue") == "lymph-node"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(CAMELYON_MPP, rel=1e-3)


@pytest.mark.parametrize("zone", ["capsule", "fat", "lumen", "gc", "blur", None])
def test_lymph_node_rendering_is_seamless_across_windows(zone):
    """Every structure is a pure function of level-0 coordinates: one 512 px window == four 256 px windows."""
    scene = _ln_scene(size=16384)
    corner = (6144, 6144) if zone is None else _zone_window(scene, zone)
    assert corner is not None, zone
    x0, y0 = corner
    whole = render_region(scene, x0, y0, 512, 512).astype(int)
    parts = np.concatenate([
        np.concatenate([render_region(scene, x0 + dx, y0 + dy, 256, 256) for dx in (0, 256)], axis=1)
        for dy in (0, 256)], axis=0).astype(int)
    assert whole.std() > 10
    diff = np.abs(whole - parts)
    assert diff.max() <= 6  # up to the glass's per-window noise (largest on white fat and glass)
    assert np.percentile(diff, 99) <= 4 and diff.mean() < 2.0


def test_lymph_node_structures_are_present_and_rare():
    from wsi_ad.synth import _LN_ZONES, FIELD_DS, _ln_zone, sample_field

    scene = _ln_scene(size=16384)
    n = scene.width // 64
    tissue = sample_field(scene.tissue_field, FIELD_DS, 0, 0, n, n, step=64) > 0.6
    fractions = {name: float((_ln_zone(scene, name, 0, 0, n, n, step=64)[tissue] > 0.5).mean()) for name in _LN_ZONES}
    for name in ("fat", "lumen", "gc", "capsule", "sinus"):
        assert 0.002 < fractions[name] < 0.12, fractions
    # fat: white vacuoles (glass-bright, unstained) split by thin pink membranes
    x0, y0 = _zone_window(scene, "fat")
    fat = render_region(scene, x0, y0, 512, 512).astype(int)
    white = fat.min(axis=-1) > 225
    assert 0.3 < white.mean() < 0.97
    pink = (fat[..., 0] > fat[..., 1] + 30) & ~white
    assert pink.mean() > 0.01
    # vessels: red blood cells (red: green and blue both absorbed, no haematoxylin) in the lumen
    x0, y0 = _zone_window(scene, "lumen")
    vessel = render_region(scene, x0, y0, 512, 512).astype(int)
    red = (vessel[..., 0] > 180) & (vessel[..., 1] < 140) & (vessel[..., 2] < 150)
    assert red.mean() > 0.02
    simple = _build_scene(16384, 16384, 7, 0, None, HOSPITAL_STAINS["A"], False, CAMELYON_MPP)
    plain = render_region(simple, x0, y0, 512, 512).astype(int)
    assert ((plain[..., 0] > 180) & (plain[..., 1] < 140) & (plain[..., 2] < 150)).mean() < 0.002


def test_lymph_node_tumour_nuclei_are_larger_not_darker():
    """Carcinoma nuclei of the lymph-node mode are larger than lymphocytes but hold no more haematoxylin per
    pixel (vesicular), unlike the simple mode's hyperchromatic ones."""
    scene = _ln_scene(seed=11, lesion_mm=0.9)
    (lesion,) = scene.lesions
    cx, cy = lesion.vertices.mean(axis=0)
    tx, ty = int(cx) // 128 * 128 - 384, int(cy) // 128 * 128 - 384
    assert fill_polygon(lesion.vertices, (768, 768), 1.0, (tx, ty)).all()
    tumour = render_region(scene, tx, ty, 768, 768)
    normal = None
    for nx, ny in ((x, y) for y in range(1536, 6144, 768) for x in range(1536, 6144, 768)):
        if fill_polygon(lesion.vertices, (768, 768), 1.0, (nx, ny)).any():
            continue
        window = render_region(scene, nx, ny, 768, 768)
        if window.min(axis=-1).mean() < 150:  # solid lymphoid tissue
            normal = window
            break
    assert normal is not None
    t_radius, t_dark = _nucleus_stats(tumour)
    n_radius, n_dark = _nucleus_stats(normal)
    assert t_radius >= 1.6 * n_radius, (t_radius, n_radius)
    assert t_dark <= n_dark, (t_dark, n_dark)


def test_synth_cli_too_small_a_slide_is_one_line(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["synth", str(tmp_path / "s"), "--size", "100", "--normal", "1", "--tumor", "0", "--test", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsi-ad: error: synth: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
