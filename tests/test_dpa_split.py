"""The DPA paper's official Camelyon16 block lists (``wsi_ad.dpa_split``): parsing, errors, and the real lists'
counts and geometry (issue 19)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ad.dpa_split import OFFICIAL_COUNTS, Block, DpaSplitError, parse_block_name, read_block_list, read_dpa_split
from wsi_ad.metrics import tile_labels


def test_block_name_row_is_x_column_is_y():
    block = parse_block_name("tumor_110_tumor_x_1536_y_70656_w_768_h_768.jpg\n")
    assert block == Block("tumor_110", "tumor", 70656, 1536, (768, 768))
    assert block.box == (70656, 1536, 768, 768)


@pytest.mark.parametrize("line", ["tumor_110_x_1_y_2_w_768_h_768.jpg", "tumor_110_tumor_x_1_y_2_w_768_h_768.png",
                                  "Tumor_110_tumor_x_1_y_2_w_768_h_768.jpg", "tumor_110_tumor_x_-1_y_2_w_7_h_7.jpg"])
def test_bad_block_names_are_refused(line):
    with pytest.raises(DpaSplitError, match="not a DPA split block name"):
        parse_block_name(line)


def test_list_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("normal_001_normal_x_0_y_0_w_768_h_768.jpg\n\nnot a block\n")
    with pytest.raises(DpaSplitError, match=r"train.txt, line 3: not a DPA split block name"):
        read_block_list(path)
    with pytest.raises(DpaSplitError, match="cannot read"):
        read_block_list(tmp_path / "missing.txt")
    with pytest.raises(DpaSplitError, match="not a folder"):
        read_dpa_split(tmp_path / "nowhere")


def test_the_official_lists(shared_data):
    split = read_dpa_split(shared_data / "camelyon16" / "dpa_split")
    assert split.counts() == OFFICIAL_COUNTS == {"normal_train": 7612, "normal_test": 4000, "anomaly_test": 817,
                                                 "anomaly_train": 2169}
    every = split.normal_train + split.normal_test + split.anomaly_train + split.anomaly_test
    assert all(b.size == (768, 768) and b.x >= 0 and b.y >= 0 for b in every)
    assert {b.slide.split("_")[0] for b in split.normal_train} == {"normal"}
    assert {b.slide.split("_")[0] for b in split.anomaly_train} == {"tumor"}
    assert {b.slide.split("_")[0] for b in split.normal_test + split.anomaly_test} == {"test"}
    assert {b.kind for b in split.normal_train + split.normal_test} == {"normal"}
    assert {b.kind for b in split.anomaly_train + split.anomaly_test} == {"tumor"}
    assert len({b.slide for b in split.normal_test}) == 80 and len({b.slide for b in split.anomaly_test}) == 24
    assert "test_114" not in {b.slide for b in split.anomaly_test + split.normal_test}
    per_slide = {}
    for b in split.normal_train:
        per_slide[b.slide] = per_slide.get(b.slide, 0) + 1
    assert max(per_slide.values()) == 50                       # at most 50 blocks a slide
    for fold in split.folds:
        slides = {b.slide for b in fold["anomaly_val"]}
        assert len(slides) == 2 and len(fold["anomaly_val"]) == 100
        assert len(fold["normal_train"]) + len(fold["normal_val"]) == 7612
        # the known flaw: split per tile, so validation normals share slides with training normals
        assert {b.slide for b in fold["normal_val"]} & {b.slide for b in fold["normal_train"]}


def test_official_tumour_blocks_lie_inside_the_lesion(shared_data):
    """Read as level-0 (x = column, y = row), the 50 official tumour blocks of tumor_110 lie fully inside its lesion
    (real ASAP XML) but one on its edge; read the other way round, most do not (SOURCES.md: 13 of 50)."""
    from wsi_ad.annotations import read_asap_xml

    split = read_dpa_split(shared_data / "camelyon16" / "dpa_split")
    blocks = [b for b in split.anomaly_train + split.anomaly_test if b.slide == "tumor_110"]
    assert len(blocks) == 50
    lesion = read_asap_xml(shared_data / "camelyon16" / "annotations" / "tumor_110.xml")
    labels = tile_labels(np.array([[b.x, b.y] for b in blocks]), (768, 768), lesion)
    # 49 fully inside by our polygon rule, one touching a lesion edge or an exclusion hole (the official lists were
    # cut from a rasterised mask), none outside
    assert (labels == 1).sum() == 49 and (labels == 0).sum() == 0
    swapped = tile_labels(np.array([[b.y, b.x] for b in blocks]), (768, 768), lesion)
    assert (swapped == 1).sum() == 13


def test_selection_folds_split_the_normal_blocks_by_slide():
    """The selection folds of the dpa-paper protocol (pipelines.dpa_protocol.normal_slide_groups): each fold holds
    out about a fifth of the normal training slides, never one it trains on, no slide is held out twice, and the
    split depends on the seed only."""
    from pipelines.dpa_protocol import normal_slide_groups
    from wsi_ad.errors import WsiAdError

    slides = [f"normal_{i:03d}" for i in range(1, 161)]
    folds = normal_slide_groups(reversed(slides), seed=3)
    assert folds == normal_slide_groups(slides, seed=3) != normal_slide_groups(slides, seed=4)
    assert len(folds) == 3
    held = [s for _, validation in folds for s in validation]
    assert len(held) == len(set(held)) == 3 * 32
    for train, validation in folds:
        assert not set(train) & set(validation) and sorted(train + validation) == slides
    assert [len(v) for _, v in normal_slide_groups(slides[:3])] == [1, 1, 1]
    assert len(normal_slide_groups(slides[:2])) == 2
    with pytest.raises(WsiAdError, match="at least 2 normal training slides"):
        normal_slide_groups(slides[:1])


def test_the_official_folds_leak_and_ours_do_not(shared_data):
    """The official cv_folds split the normal blocks, not the slides: every fold's validation slides are all among
    its training slides. Ours, on the same 7,612 blocks, hold out about as many blocks (the official: 1,522 a fold)
    from slides the fold never trains on; the official validation anomalies name training tumour slides only."""
    from pipelines.dpa_protocol import normal_slide_groups

    split = read_dpa_split(shared_data / "camelyon16" / "dpa_split")
    per_slide: dict[str, int] = {}
    for block in split.normal_train:
        per_slide[block.slide] = per_slide.get(block.slide, 0) + 1
    for fold in split.folds:
        train, validation = {b.slide for b in fold["normal_train"]}, {b.slide for b in fold["normal_val"]}
        assert len(fold["normal_val"]) == 1522 and validation <= train             # the leak
        assert len(fold["anomaly_val"]) == 100 and len({b.slide for b in fold["anomaly_val"]}) == 2
        assert all(b.slide.startswith("tumor_") for b in fold["anomaly_val"])
    for train, validation in normal_slide_groups(per_slide, seed=0):
        held = sum(per_slide[s] for s in validation)
        assert not set(train) & set(validation) and 1300 <= held <= 1750, held
