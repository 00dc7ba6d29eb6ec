"""Stain normalization of tile folders (wsi_ad.tile_stain, ``wsi-ad normalize-tiles``), on tiles cut from
synthetic slides of two "hospitals" with different H&E stains."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from wsi_ad.optical_density import rgb_to_od
from wsi_ad.stain import StainError, tissue_pixels
from wsi_ad.tile_stain import MANIFEST_NAME, fit_tiles_target, list_images, load_target, normalize_tile_folder, read_rgb


def _tissue_tiles(slide_path, n: int, seed: int) -> list[np.ndarray]:
    """``n`` 64 x 64 tiles at 10x (0.972 µm/px) that are mostly tissue, in a seeded order."""
    from wsi_ad.slide import open_slide

    with open_slide(slide_path) as slide:
        region = slide.read_region((0, 0), slide.dimensions, 0.972)
    tiles = [region[y:y + 64, x:x + 64] for y in range(0, region.shape[0] - 63, 64)
             for x in range(0, region.shape[1] - 63, 64)]
    tiles = [t for t in tiles if tissue_pixels(t).mean() > 0.6]
    order = np.random.default_rng(seed).permutation(len(tiles))
    assert len(tiles) >= n
    return [tiles[i] for i in order[:n]]


@pytest.fixture(scope="module")
def two_hospital_folder(tmp_path_factory):
    """anomalib layout: train/good from hospital A; test/good from hospital B (named by source slide)."""
    from wsi_ad.synth import synthesize_slide

    root = tmp_path_factory.mktemp("tile_stain")
    slides = {name: synthesize_slide(root / f"{name}.tif", width_px=4096, seed=5, stain=name, workers=2).path
              for name in ("A", "B")}
    data = root / "tiles"
    for folder, name, n, suffix in (("train/good", "A", 12, ".png"), ("test/good", "B", 8, ".png"),
                                    ("test/jpeg", "B", 2, ".jpg")):
        (data / folder).mkdir(parents=True)
        for i, tile in enumerate(_tissue_tiles(slides[name], n, seed=len(folder))):
            Image.fromarray(tile).save(data / folder / f"slide{name}_{i:03d}{suffix}", quality=98)
    return data


def _mean_od(folder) -> np.ndarray:
    pixels = []
    for path in sorted(folder.iterdir()):
        rgb = read_rgb(path)
        pixels.append(rgb[tissue_pixels(rgb)])
    return rgb_to_od(np.concatenate(pixels)).mean(axis=0)


def test_two_hospitals_tiles_come_together_and_the_folder_is_mirrored(two_hospital_folder, tmp_path):
    out = tmp_path / "normalized"
    result = normalize_tile_folder(two_hospital_folder, out)
    assert result.written == 22 and result.skipped == 0 and not result.failures
    sources = sorted(p.relative_to(two_hospital_folder) for p in two_hospital_folder.rglob("*.*"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.*") if p.name != MANIFEST_NAME) == sources
    for rel in sources:  # same size, same format
        with Image.open(two_hospital_folder / rel) as a, Image.open(out / rel) as b:
            assert (a.size, a.format) == (b.size, b.format)
    before = np.abs(_mean_od(two_hospital_folder / "test/good") - _mean_od(two_hospital_folder / "train/good")).sum()
    after = np.abs(_mean_od(out / "test/good") - _mean_od(out / "train/good")).sum()
    assert after < 0.5 * before, (before, after)   # measured: 0.209 -> 0.052
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["target_source"].endswith("train/good")
    assert set(manifest["files"]) == {str(p) for p in sources}
    assert {e["method"] for e in manifest["files"].values()} <= {"vahadane", "macenko", "identity"}
    assert sum(result.methods.values()) == 22


def test_rerun_skips_done_tiles_and_a_different_target_is_refused(two_hospital_folder, tmp_path):
    out = tmp_path / "normalized"
    first = normalize_tile_folder(two_hospital_folder, out)
    (out / "test/good/slideB_000.png").unlink()       # as if killed before that tile was written
    stamp = (out / "train/good/slideA_000.png").stat().st_mtime_ns
    again = normalize_tile_folder(two_hospital_folder, out)
    assert (again.written, again.skipped) == (1, 21)
    assert (out / "train/good/slideA_000.png").stat().st_mtime_ns == stamp
    assert again.target == first.target                 # the recorded target, not a refit
    other = load_target(out / MANIFEST_NAME)
    other = type(other).from_dict({**other.to_dict(), "max_concentrations": [1.0, 1.0]})
    with pytest.raises(StainError, match="another target"):
        normalize_tile_folder(two_hospital_folder, out, target=other)
    with pytest.raises(StainError, match="inside the input"):
        normalize_tile_folder(two_hospital_folder, two_hospital_folder / "normalized")


def test_unreadable_tile_fails_alone_and_the_cli_exits_1(two_hospital_folder, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "good").mkdir(parents=True)
    for path in sorted((two_hospital_folder / "train/good").iterdir())[:3]:
        (src / "good" / path.name).write_bytes(path.read_bytes())
    (src / "good" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    assert main(["normalize-tiles", str(src), str(out)]) == 1
    captured = capsys.readouterr()
    assert "3 tiles normalized" in captured.out and "broken.png" in captured.err
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert list(manifest["failures"]) == ["good/broken.png"] and len(manifest["files"]) == 3
    # another folder normalized to this folder's target, read from its record
    assert main(["normalize-tiles", str(src / "good"), str(tmp_path / "again"), "--stain-target",
                 str(out / MANIFEST_NAME)]) == 1
    assert load_target(tmp_path / "again" / MANIFEST_NAME) == load_target(out / MANIFEST_NAME)
    assert main(["normalize-tiles", str(src), str(tmp_path / "x"), "--group-pattern", "(unclosed"]) == 2


def test_one_fit_per_source_slide_with_a_group_pattern_and_workers(two_hospital_folder, tmp_path):
    out = tmp_path / "grouped"
    target = fit_tiles_target(list_images(two_hospital_folder / "train/good"))
    result = normalize_tile_folder(two_hospital_folder / "test", out, target=target,
                                   group_pattern=r"^(slide[AB])_", workers=2)
    assert result.written == 10 and not result.failures
    entries = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert {e["group"] for e in entries.values()} == {"slideB"}
    assert len({e["method"] for e in entries.values()}) == 1  # one fit for the slide's tiles
    normalize_tile_folder(two_hospital_folder / "test", tmp_path / "per_tile",
                          target=result.target)
    # the slide's pooled fit and per-tile fits land on the same stain (0.006 OD apart here; 0.16 unnormalized)
    assert abs(_mean_od(out / "good") - _mean_od(tmp_path / "per_tile" / "good")).sum() < 0.03


def test_reference_target_is_the_stain_slides_are_normalized_to(two_hospital_folder, tmp_path):
    from wsi_ad.stain import DEFAULT_TARGET

    out = tmp_path / "reference"
    assert main(["normalize-tiles", str(two_hospital_folder), str(out), "--stain-target", "reference"]) == 0
    target = load_target(out / MANIFEST_NAME)
    np.testing.assert_allclose(target.stain_matrix, DEFAULT_TARGET.stain_matrix)
    np.testing.assert_allclose(target.max_concentrations, DEFAULT_TARGET.max_concentrations)
    fitted = fit_tiles_target(list_images(two_hospital_folder / "train" / "good"))
    assert not np.allclose(fitted.stain_matrix, DEFAULT_TARGET.stain_matrix, atol=1e-3)   # not the default fit
