"""Shared fixtures: where the real test files are, and small synthetic slides made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path | None:
    """``$WSI_AD_TEST_DATA`` if set, else ``../shared/data`` beside the repository, if it exists."""
    candidates = []
    if os.environ.get("WSI_AD_TEST_DATA"):
        candidates.append(Path(os.environ["WSI_AD_TEST_DATA"]))
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for candidate in candidates:
        if (candidate / "slides").is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test files (../shared/data or $WSI_AD_TEST_DATA); skips the test when they are absent."""
    path = _shared_data_dir()
    if path is None:
        pytest.skip(
            "real test data not found: set WSI_AD_TEST_DATA or place it at ../shared/data "
            "beside the repository (the synthetic-data tests still run)"
        )
    return path


@pytest.fixture(scope="session")
def shared_data_if_present() -> Path | None:
    """The real test files' folder, or None when absent (for tests that also run on synthetic data alone)."""
    return _shared_data_dir()


@pytest.fixture(scope="session")
def shared_slides(shared_data: Path) -> Path:
    """Directory of the real slide files in the shared test data."""
    return shared_data / "slides"


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """A small synthetic Camelyon16-like dataset (1 normal, 1 tumour, 2 test slides of 8192 x 8192 px at
    0.243 um/px), made once per session; see ``wsi_ad.synth.synthesize_dataset`` for the layout."""
    from wsi_ad.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("synth_dataset")
    return synthesize_dataset(root, n_normal=1, n_tumor=1, n_test=2, size_px=8192, seed=2024)


#: A small 64 px model like configs/demo_cpu.yaml but shorter: tens of seconds on 2 CPU cores.
SMALL_MODEL_CONFIG = REPO_ROOT / "configs" / "small_cpu.yaml"


@pytest.fixture(scope="session")
def scored_setting(tmp_path_factory):
    """Two synthetic slides (8192 px at 0.243 µm/px: one normal, one tumour with a 0.8 mm and a 0.4 mm lesion,
    ASAP XML beside it) tiled into stores (64 px at 10x, stain-normalized), and a small model trained on a
    third, normal slide's tiles. Made once per session.

    Returns a dict: ``normal`` / ``tumor`` (:class:`wsi_ad.synth.SynthSlide`), ``normal_store`` /
    ``tumor_store`` (paths of the ``.zarr`` stores), ``tumor_xml`` (path), ``model`` (checkpoint path),
    ``stores_dir`` (folder holding both stores).
    """
    from pipelines.process import process_paths
    from wsi_ad.annotations import write_asap_xml
    from wsi_ad.config import Config
    from wsi_ad.detectors.loop import train
    from wsi_ad.preprocess import PreprocessConfig
    from wsi_ad.synth import synthesize_slide

    root = tmp_path_factory.mktemp("scored_setting")
    train_slide = synthesize_slide(root / "train" / "normal_101.tif", width_px=8192, seed=101, tumor=False)
    normal = synthesize_slide(root / "slides" / "normal_102.tif", width_px=8192, seed=102, tumor=False)
    tumor = synthesize_slide(root / "slides" / "tumor_103.tif", width_px=8192, seed=103, tumor=True,
                             lesion_sizes_mm=[0.8, 0.4])
    write_asap_xml(root / "slides" / "tumor_103.xml", tumor.annotations)
    quiet = {"echo": lambda *a: None}
    process_paths([train_slide.path], root / "train_stores", PreprocessConfig(), **quiet)
    process_paths([normal.path, tumor.path], root / "stores", PreprocessConfig(), **quiet)
    result = train([root / "train_stores"], root / "model.pt", Config.from_yaml(SMALL_MODEL_CONFIG), progress=False, **quiet)
    return {"normal": normal, "tumor": tumor, "normal_store": root / "stores" / "normal_102.zarr",
            "tumor_store": root / "stores" / "tumor_103.zarr", "tumor_xml": root / "slides" / "tumor_103.xml",
            "model": result.checkpoint, "stores_dir": root / "stores"}


@pytest.fixture(scope="session")
def training_tumor_slide(tmp_path_factory):
    """A synthetic tumour slide (8192 px at 0.243 µm/px, one 0.8 mm lesion holding whole 768 px grid blocks) and
    its ASAP XML: ``(slide path, xml path)``. Made once per session."""
    from wsi_ad.annotations import write_asap_xml
    from wsi_ad.synth import synthesize_slide

    root = tmp_path_factory.mktemp("training_tumor")
    slide = synthesize_slide(root / "tumor_104.tif", width_px=8192, seed=104, tumor=True, lesion_sizes_mm=[0.8])
    write_asap_xml(root / "tumor_104.xml", slide.annotations)
    return slide.path, root / "tumor_104.xml"


@pytest.fixture
def paper_layout(tmp_path, synth_dataset, scored_setting, training_tumor_slide):
    """A Camelyon16-like folder of symbolic links (``tmp_path/c16``): two normal training slides, one annotated
    tumour training slide (:func:`training_tumor_slide`), one normal and one tumour test slide (the scored
    setting's, whose 0.8 mm lesion holds whole 768 px grid blocks of the DPA paper's protocol), ``reference.csv``
    and the tumour slides' ASAP XML."""
    data = tmp_path / "c16"
    normal = data / "training" / "normal"
    normal.mkdir(parents=True)
    (normal / "normal_001.tif").symlink_to(synth_dataset.root / "training" / "normal" / "normal_001.tif")
    (normal / "normal_101.tif").symlink_to(scored_setting["model"].parent / "train" / "normal_101.tif")
    for folder, source in (("tumor", training_tumor_slide[0]), ("lesion_annotations", training_tumor_slide[1])):
        (data / "training" / folder).mkdir()
        (data / "training" / folder / source.name).symlink_to(source)
    images, xmls = data / "testing" / "images", data / "testing" / "lesion_annotations"
    images.mkdir(parents=True)
    xmls.mkdir(parents=True)
    (images / "test_001.tif").symlink_to(scored_setting["normal"].path)
    (images / "test_002.tif").symlink_to(scored_setting["tumor"].path)
    (xmls / "test_002.xml").symlink_to(scored_setting["tumor_xml"])
    (data / "testing" / "reference.csv").write_text("Test_001,Normal,None,None\nTest_002,Tumor,IDC,Macro\n")
    return data
