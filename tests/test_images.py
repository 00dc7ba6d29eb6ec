"""Every tile image mode decodes to the right picture, by one loader (wsi_ad.images.read_image) used by
training, tile scoring, evaluate tiles, normalize-tiles and stain targets: the 8-bit / white-background twin
of each file is the reference."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsi_ad.images import ImageReadError, read_image, rgb_on_white
from wsi_ad.tile_pool import ImageFolderSource


@pytest.fixture(scope="module")
def he_tile():
    """A 64 px H&E-like tile (pink stroma, purple nuclei) from the synthetic slide renderer's colours."""
    rng = np.random.default_rng(0)
    tile = np.empty((64, 64, 3), np.uint8)
    tile[...] = (236, 170, 200)
    for _ in range(12):
        y, x = rng.integers(4, 60, 2)
        tile[y - 3 : y + 3, x - 3 : x + 3] = (95, 60, 150)
    return tile


def test_grayscale_8_and_16_bit_decode_alike(he_tile, tmp_path):
    gray8 = np.asarray(Image.fromarray(he_tile).convert("L"))
    Image.fromarray(gray8).save(tmp_path / "g8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")      # full 16-bit range
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    expected = np.repeat(gray8[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_image(tmp_path / "g8.png"), expected)
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png"), expected)      # scaled, not clipped to white
    assert read_image(tmp_path / "g16.png").std() > 10


def test_transparency_is_white_as_on_slides(he_tile, tmp_path):
    rgba = np.dstack([he_tile, np.full((64, 64), 255, np.uint8)])
    opaque = rgb_on_white(Image.fromarray(rgba, "RGBA"))
    np.testing.assert_array_equal(opaque, he_tile)                                 # alpha 255: dropped
    assert opaque.flags.writeable and opaque.flags.c_contiguous
    rgba[:, 32:] = 0                                                               # right half (0, 0, 0, 0)
    white = he_tile.copy()
    white[:, 32:] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    np.testing.assert_array_equal(read_image(tmp_path / "half.png"), white)
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(tmp_path / "clear.png")
    assert (read_image(tmp_path / "clear.png") == 255).all()
    la = Image.fromarray(np.dstack([np.full((8, 8), 40, np.uint8), np.zeros((8, 8), np.uint8)]), "LA")
    assert (rgb_on_white(la) == 255).all()
    index = np.zeros((64, 64), np.uint8)
    index[:, :16] = 1                                                              # index 1 is transparent
    palette = Image.fromarray(index, "P")
    palette.putpalette([236, 170, 200, 0, 0, 0])
    palette.save(tmp_path / "pal.png", transparency=1)
    decoded = read_image(tmp_path / "pal.png")
    assert (decoded[:, :16] == 255).all() and (decoded[:, 16:] == (236, 170, 200)).all()
    cmyk = Image.fromarray(he_tile).convert("CMYK")
    assert np.abs(rgb_on_white(cmyk).astype(int) - he_tile).max() <= 2


def test_every_tile_path_uses_the_loader(he_tile, tmp_path):
    from wsi_ad.tile_stain import read_rgb

    rgba = np.dstack([he_tile, np.full((64, 64), 255, np.uint8)])
    rgba[:, 32:] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    expected = he_tile.copy()
    expected[:, 32:] = 255
    np.testing.assert_array_equal(read_rgb(tmp_path / "half.png"), expected)          # normalize-tiles, targets
    crop = ImageFolderSource([tmp_path / "half.png"], 64).read(0, 1, np.random.default_rng(0))[0]
    np.testing.assert_array_equal(crop, expected)                                     # train, score --tiles
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match="broken.png: cannot read image"):
        read_image(tmp_path / "broken.png")
