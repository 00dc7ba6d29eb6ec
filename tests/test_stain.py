"""Stain normalization (wsi_ad.stain): Vahadane fit, fallbacks, and the closed-form batched transform."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch

from wsi_ad import stain as st
from wsi_ad.stain import DEFAULT_TARGET, StainFit, StainNormalizer, StainParams, fit_slide_stain, fit_stain
from wsi_ad.synth import HOSPITAL_STAINS


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _beer_lambert(matrix: np.ndarray, n: int, seed: int, background=(0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) uint8 pixels I = 255 exp(-(c @ S + background)) with random sparse non-negative c; and c."""
    rng = np.random.default_rng(seed)
    conc = rng.gamma(2.0, 0.35, size=(n, 2))
    kind = rng.choice(3, size=n, p=[0.35, 0.35, 0.3])  # H only, E only, both
    conc[kind == 0, 1] = 0.0
    conc[kind == 1, 0] = 0.0
    od = conc @ matrix + np.asarray(background)
    rgb = np.clip(np.rint(255.0 * np.exp(-od) + rng.normal(0, 0.7, od.shape)), 0, 255).astype(np.uint8)
    return rgb, conc


def _stain_matrix(name: str) -> np.ndarray:
    s = HOSPITAL_STAINS[name]
    return _unit(np.array([s.od_h, s.od_e]))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (_unit(a) * _unit(b)).sum(axis=1)


def _image(matrix: np.ndarray, shape=(128, 128), seed=0) -> np.ndarray:
    rgb, _ = _beer_lambert(matrix, shape[0] * shape[1], seed)
    return rgb.reshape(*shape, 3)


# -- fit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["A", "B"])
def test_fit_recovers_known_stain_matrix(name):
    truth = _stain_matrix(name)
    rgb, _ = _beer_lambert(truth, 30_000, seed=1)
    fit = fit_stain(rgb)
    assert fit.method == "vahadane", fit.warnings
    assert fit.stain_matrix.shape == (2, 3)
    assert np.allclose(np.linalg.norm(fit.stain_matrix, axis=1), 1.0)
    assert (_cosines(fit.stain_matrix, truth) >= 0.99).all(), (fit.stain_matrix, truth)
    assert (fit.max_concentrations > 0.5).all()


def test_fit_is_deterministic_and_seeded():
    rgb = _image(_stain_matrix("A"), (160, 160), seed=3)
    a = fit_stain(rgb, params=StainParams(seed=7))
    b = fit_stain(rgb, params=StainParams(seed=7))
    assert np.array_equal(a.stain_matrix, b.stain_matrix)
    assert np.array_equal(a.max_concentrations, b.max_concentrations)
    assert a == b


def test_fit_respects_mask():
    a_img = _image(_stain_matrix("A"), (100, 100), seed=1)
    b_img = _image(_stain_matrix("B"), (100, 100), seed=2)
    both = np.concatenate([a_img, b_img], axis=1)
    mask = np.zeros(both.shape[:2], bool)
    mask[:, :100] = True
    fit = fit_stain(both, mask=mask)
    assert (_cosines(fit.stain_matrix, _stain_matrix("A")) >= 0.99).all()


def test_degenerate_vahadane_falls_back_to_macenko(monkeypatch, caplog):
    # A dictionary with two nearly parallel "stains" is rejected; Macenko on the same pixels is used.
    monkeypatch.setattr(st, "_vahadane_matrix",
                        lambda od, params: _unit(np.array([[0.65, 0.70, 0.29], [0.64, 0.71, 0.30]])))
    rgb, _ = _beer_lambert(_stain_matrix("A"), 20_000, seed=2)
    with caplog.at_level(logging.WARNING, logger="wsi_ad.stain"):
        fit = fit_stain(rgb)
    assert fit.method == "macenko"
    assert any("nearly parallel" in w and "Macenko" in w for w in fit.warnings)
    assert "falling back to Macenko" in caplog.text
    assert (_cosines(fit.stain_matrix, _stain_matrix("A")) >= 0.97).all()


def test_wrong_hue_is_rejected():
    # Eosin that absorbs mostly blue, haematoxylin that absorbs no red: both checks fire.
    problems = st.check_stain_matrix(_unit(np.array([[0.1, 0.7, 0.7], [0.1, 0.3, 0.95]])))
    assert any("red" in p for p in problems) and any("green" in p for p in problems)
    assert st.check_stain_matrix(DEFAULT_TARGET.stain_matrix) == []


def test_too_few_tissue_pixels_is_identity():
    rgb = np.full((64, 64, 3), 250, np.uint8)
    rgb[:5, :5] = (120, 60, 150)
    fit = fit_stain(rgb)
    assert fit.method == "identity"
    assert any("too few tissue pixels" in w for w in fit.warnings)
    assert np.isfinite(fit.stain_matrix).all()


def test_to_dict_from_dict_round_trip():
    fit = StainFit(DEFAULT_TARGET.stain_matrix, DEFAULT_TARGET.max_concentrations, "macenko",
                   ("vahadane stain fit rejected: x",), 1234)
    d = json.loads(json.dumps(fit.to_dict()))
    assert StainFit.from_dict(d) == fit
    assert StainFit.from_dict(DEFAULT_TARGET.to_dict()) == DEFAULT_TARGET
    params = StainParams(seed=3, sample_mpp=4.0)
    assert StainParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params


def test_default_target_is_plausible_h_and_e():
    assert DEFAULT_TARGET.method == "vahadane"
    assert np.allclose(np.linalg.norm(DEFAULT_TARGET.stain_matrix, axis=1), 1.0, atol=1e-5)
    assert st.check_stain_matrix(DEFAULT_TARGET.stain_matrix) == []


# -- concentrations and transform ------------------------------------------------------------------


def test_closed_form_concentrations_match_lasso_solver():
    from sklearn.decomposition import sparse_encode

    matrix = DEFAULT_TARGET.stain_matrix
    rgb, _ = _beer_lambert(_stain_matrix("B"), 3000, seed=4)
    od = st.rgb_to_od(rgb).astype(np.float64)
    ours = st.concentrations(od, matrix, 0.01)
    # sklearn's lasso_cd minimises (1 / (2 n_features)) ||x - c D||² + alpha ||c||_1: alpha = λ / 3
    ref = sparse_encode(od, matrix, algorithm="lasso_cd", alpha=0.01, positive=True, max_iter=10_000)
    assert (ours >= 0).all()
    assert np.abs(ours - ref).max() < 1e-3


def _reference_transform(rgb, source, target):
    """The transform in float64 numpy, from the closed-form concentrations."""
    conc = st.concentrations(st.rgb_to_od(rgb), source.stain_matrix, 0.01)
    conc = conc * target.max_concentrations / source.max_concentrations
    return np.clip(np.rint(255 * np.exp(-conc @ target.stain_matrix)), 0, 255).astype(np.uint8)


def test_cpu_kernel_and_torch_kernel_equal_float64_reference():
    source = fit_stain(_image(_stain_matrix("B"), (96, 96), seed=5))
    rgb = _image(_stain_matrix("B"), (64, 64), seed=6)
    rgb[:4] = 255  # white rows: single-stain and zero branches too
    rgb[4:8] = np.random.default_rng(0).integers(0, 256, (4, 64, 3), dtype=np.uint8)
    ref = _reference_transform(rgb, source, DEFAULT_TARGET)
    normalizer = StainNormalizer(source, DEFAULT_TARGET, device="cpu")
    cpu = normalizer(rgb)
    torch_out = normalizer._compute(torch.from_numpy(rgb.reshape(-1, 3))).numpy().reshape(rgb.shape)
    for out in (cpu, torch_out):
        diff = np.abs(out.astype(int) - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("cosine", [0.8, 0.0, -0.3])
def test_branch_free_concentrations_equal_the_closed_form_for_any_stain_cosine(cosine):
    """The kernels' max(min(c, b), 0) (max(max(c, b), 0) for a negative cosine) is the exact solution on
    every branch of the closed form: both stains, one alone, none; all 2^24 colours' worth of cases are
    covered by random colours plus the corners."""
    h = _unit([0.65, 0.70, 0.29])
    orth = _unit(np.cross(h, [0.0, 0.0, 1.0]))
    e = cosine * h + np.sqrt(1 - cosine**2) * orth
    fit = StainFit(np.stack([h, e]), (1.5, 1.2), "vahadane")
    target = StainFit(np.abs(np.stack([h, _unit([0.07, 0.99, 0.11])])), (1.8, 1.0), "vahadane")
    rng = np.random.default_rng(3)
    rgb = np.concatenate([rng.integers(0, 256, (20000, 3)), [[255, 255, 255], [0, 0, 0], [255, 0, 0]]])
    rgb = rgb.astype(np.uint8)
    ref = _reference_transform(rgb, fit, target)
    normalizer = StainNormalizer(fit, target, device="cpu")
    for out in (normalizer(rgb), normalizer._compute(torch.from_numpy(rgb)).numpy()):
        diff = np.abs(out.astype(int) - ref)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_all_white_tile_unchanged():
    white = np.full((256, 256, 3), 255, np.uint8)
    fit = fit_stain(white)
    assert fit.method == "identity" and fit.warnings
    source = fit_stain(_image(_stain_matrix("A"), seed=1))
    normalizer = StainNormalizer(source)
    assert np.array_equal(normalizer(white), white)
    assert np.array_equal(StainNormalizer(fit)(white), white)
    glass = np.full((32, 32, 3), 246, np.uint8)  # bare glass stays near-white
    assert normalizer(glass).min() >= 235


def test_batched_equals_per_image():
    source = fit_stain(_image(_stain_matrix("A"), seed=1))
    tiles = np.stack([_image(_stain_matrix("A"), (64, 64), seed=s) for s in range(4)])
    normalizer = StainNormalizer(source)
    batched = normalizer(tiles)
    assert batched.shape == tiles.shape and batched.dtype == np.uint8
    for tile, out in zip(tiles, batched, strict=True):
        assert np.array_equal(normalizer(tile), out)
    with pytest.raises(st.StainError):
        normalizer(tiles.astype(np.float32))


def test_threads_and_pickling_give_the_same_output(shared_slides):
    from wsi_ad.slide import open_slide

    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        region = slide.read_region((200, 600), (512, 512), 0.499)
    source = fit_stain(region)
    one = StainNormalizer(source, device="cpu")(region)
    np.testing.assert_array_equal(StainNormalizer(source, device="cpu", threads=3)(region), one)
    copy = pickle.loads(pickle.dumps(StainNormalizer(source, device="cpu")))  # as sent to a Dask worker
    np.testing.assert_array_equal(copy(region), one)


def test_normalizing_to_own_stain_changes_little():
    rgb = _image(_stain_matrix("A"), (128, 128), seed=8)
    fit = fit_stain(rgb)
    out = StainNormalizer(fit, fit)(rgb)
    assert np.abs(out.astype(int) - rgb).mean() < 2.0


def test_normalization_maps_one_stain_onto_another():
    a_fit = fit_stain(_image(_stain_matrix("A"), seed=1))
    b_rgb = _image(_stain_matrix("B"), seed=2)
    a_like = _image(_stain_matrix("A"), seed=2)  # same concentrations as b_rgb, stain A
    b_fit = fit_stain(b_rgb)
    out = StainNormalizer(b_fit, a_fit)(b_rgb)
    before = np.abs(b_rgb.astype(int) - a_like).mean()
    after = np.abs(out.astype(int) - a_like).mean()
    assert after < 0.5 * before, (before, after)


# -- slides -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hospital_slides(tmp_path_factory):
    from wsi_ad.synth import synthesize_slide

    root = tmp_path_factory.mktemp("stain_slides")
    return {name: synthesize_slide(root / f"{name}.tif", width_px=4096, seed=11, stain=name, workers=2).path
            for name in ("A", "B")}


def test_two_hospitals_mean_optical_density_comes_together(hospital_slides):
    from wsi_ad.slide import open_slide
    from wsi_ad.tissue import mask_slide

    means_before, means_after = {}, {}
    for name, path in hospital_slides.items():
        with open_slide(path) as slide:
            mask, _ = mask_slide(slide)
            fit = fit_slide_stain(slide, mask)
            # Stain B's H and E are close (cosine 0.91): Vahadane (SPAMS too) merges them at 2 µm/px
            # (cosine 0.98), the fit is rejected and Macenko's taken.
            assert fit.method == ("vahadane" if name == "A" else "macenko"), fit.warnings
            assert (_cosines(fit.stain_matrix, _stain_matrix(name)) >= 0.95).all(), (name, fit.stain_matrix)
            region = slide.thumbnail(2.0)
        keep = st.tissue_pixels(region)
        out = StainNormalizer(fit)(region)
        means_before[name] = st.rgb_to_od(region[keep]).mean(axis=0)
        means_after[name] = st.rgb_to_od(out[keep]).mean(axis=0)
    before = np.abs(means_before["A"] - means_before["B"]).sum()
    after = np.abs(means_after["A"] - means_after["B"]).sum()
    assert after < 0.5 * before, (means_before, means_after)


def test_real_he_slide_fit_matches_default_target(shared_slides):
    from wsi_ad.slide import open_slide
    from wsi_ad.tissue import mask_slide

    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        mask, _ = mask_slide(slide)
        fit = fit_slide_stain(slide, mask)
        tile = slide.read_region((800, 1200), (256, 256), slide.mpp_x)
    assert fit.method == "vahadane"
    assert (_cosines(fit.stain_matrix, DEFAULT_TARGET.stain_matrix) >= 0.99).all()
    out = StainNormalizer(fit)(tile)
    assert np.abs(out.astype(int) - tile).mean() < 6.0  # normalized to (nearly) its own stain


def test_fit_target_from_image_file_and_slide_region(shared_slides, tmp_path):
    from PIL import Image

    from wsi_ad.slide import open_slide

    path = shared_slides / "cmu-1-small-region.svs"
    with open_slide(path) as slide:
        rgb = slide.read_region((400, 800), (1024, 1024), slide.mpp_x)
    Image.fromarray(rgb).save(tmp_path / "target.png")
    from_png = st.fit_target(tmp_path / "target.png")
    from_region = st.fit_target(path, region=(400, 800, 1024, 1024), mpp=0.499)
    assert from_png.method == from_region.method == "vahadane"
    assert (_cosines(from_png.stain_matrix, from_region.stain_matrix) >= 0.999).all()
    assert (_cosines(from_png.stain_matrix, DEFAULT_TARGET.stain_matrix) >= 0.98).all()


def test_fluorescence_slide_warns_and_passes_through(shared_slides, caplog):
    from wsi_ad.slide import open_slide
    from wsi_ad.tissue import mask_slide

    with open_slide(shared_slides / "fluorescence-tritc.ndpi") as slide:
        mask, thumb = mask_slide(slide)
        with caplog.at_level(logging.WARNING, logger="wsi_ad.stain"):
            fit = fit_slide_stain(slide, mask)
        region = slide.read_region((1000, 1000), (256, 256), 0.5)
    assert fit.method == "identity" and fit.warnings
    assert "no H&E stain fit possible" in caplog.text
    direct = fit_stain(thumb)
    assert direct.method == "identity" and any("dark background" in w for w in direct.warnings)
    for f in (fit, direct):
        assert np.isfinite(f.stain_matrix).all() and np.isfinite(f.max_concentrations).all()
        assert np.array_equal(StainNormalizer(f)(region), region)
    assert StainFit.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit


def test_near_degenerate_real_slide_falls_back_to_macenko(shared_slides):
    # The TCGA crop is eosin-dominated: Vahadane (ours and SPAMS alike) finds H and E almost parallel
    # (cosine ~0.99), so the fit is rejected and Macenko's is used, with a recorded warning.
    from wsi_ad.slide import open_slide
    from wsi_ad.tissue import mask_slide

    with open_slide(shared_slides / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.5) as slide:
        mask, _ = mask_slide(slide)
        fit = fit_slide_stain(slide, mask)
        tile = slide.read_region((2000, 1500), (256, 256), 0.5)
    assert fit.method in ("macenko", "vahadane")
    if fit.method == "macenko":
        assert any("falling back to Macenko" in w for w in fit.warnings)
    out = StainNormalizer(fit)(tile)
    assert out.shape == tile.shape and out.dtype == np.uint8 and out.mean() > 60


def test_large_slides_are_fitted_from_sampled_windows_like_from_all_tissue(hospital_slides):
    from wsi_ad.slide import open_slide
    from wsi_ad.tissue import mask_slide

    with open_slide(hospital_slides["A"]) as slide:
        mask, _ = mask_slide(slide)
        everything = fit_slide_stain(slide, mask, params=StainParams(sample_windows=100_000))
        windows = fit_slide_stain(slide, mask, params=StainParams(sample_windows=24, sample_window_px=64))
        again = fit_slide_stain(slide, mask, params=StainParams(sample_windows=24, sample_window_px=64))
    assert windows.method == everything.method == "vahadane"
    assert (_cosines(windows.stain_matrix, everything.stain_matrix) >= 0.999).all()
    np.testing.assert_allclose(windows.max_concentrations, everything.max_concentrations, rtol=0.1)
    assert windows == again                                  # seeded
