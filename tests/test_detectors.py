"""The detector interface: the registry, `wsi-ad detectors`, checkpoints that name their detector (and those
written before the interface), and a toy detector defined only here that trains, scores a store, runs in
`wsi-ad process --model` on a real Dask cluster and evaluates through the command line without any other
file knowing it: the proof that the next detectors are local changes."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import main
from wsi_ad import detectors
from wsi_ad.config import Config, ConfigError
from wsi_ad.detectors import Detector, InputSpec, UnknownDetectorError, register
from wsi_ad.detectors.checkpoint import load_checkpoint, model_id
from wsi_ad.detectors.scorer import load_scorer
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore

DATA = Path(__file__).resolve().parent / "data"


# -- a toy detector, defined only in this test ---------------------------------------------------------------

@dataclass
class ToyConfig:
    steps: int = 3
    lr: float = 0.5

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError("steps must be >= 0")


class MeanColourDistance(Detector):
    """Score = distance of a tile's mean colour to a learned normal mean colour (fitted, then refined by SGD)."""

    name = "toy_mean_colour"
    summary = "toy: distance of the tile's mean colour to the normal mean colour"
    config_class = ToyConfig
    score_units = "RGB distance in [-1, 1] units"
    search_parameters = {"lr": "lr"}

    def __init__(self, config, device="cpu"):
        super().__init__(config, device)
        self.centre = torch.nn.Parameter(torch.zeros(3, device=self.device))
        self.optimizer = torch.optim.SGD([self.centre], lr=config.section.lr)

    @classmethod
    def input_spec_of(cls, config):
        return InputSpec(64, config.data.magnification)

    @classmethod
    def num_steps_of(cls, config):
        return config.section.steps

    def fit(self, pool):
        tiles = torch.from_numpy(pool.sample(32)).float() / 127.5 - 1
        with torch.no_grad():
            self.centre.copy_(tiles.mean(dim=(0, 1, 2)) * 0.5)   # a poor start that training improves

    def train_step(self, tiles, step):
        loss = ((tiles.mean(dim=(2, 3)) - self.centre) ** 2).sum(1).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def state_dict(self):
        return {"centre": self.centre.detach().cpu()}

    def training_state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state, training_state=None):
        with torch.no_grad():
            self.centre.copy_(state["centre"])
        if training_state:
            self.optimizer.load_state_dict(training_state["optimizer"])

    def score_batch(self, tiles, pixel_maps=False):
        per_pixel = (tiles - self.centre.view(1, 3, 1, 1)).norm(dim=1)
        score = (tiles.mean(dim=(2, 3)) - self.centre).norm(dim=1)
        return score, (per_pixel if pixel_maps else None)


register(MeanColourDistance)


# -- the registry -------------------------------------------------------------------------------------------

def test_registry_lists_builtin_and_registered_detectors(capsys):
    assert "dpa" in detectors.names() and "toy_mean_colour" in detectors.names()
    assert detectors.get("dpa").name == "dpa" and detectors.get("toy_mean_colour") is MeanColourDistance
    register(MeanColourDistance)                                   # re-registering the same class is fine
    other = type("MeanColourDistance2", (MeanColourDistance,), {})
    with pytest.raises(ValueError, match="already registered"):
        register(other)
    with pytest.raises(ValueError, match="reserved"):
        register(type("Bad", (MeanColourDistance,), {"name": "train"}))
    with pytest.raises(TypeError):
        register(dict)
    with pytest.raises(UnknownDetectorError, match="unknown detector 'nope'.*dpa"):
        detectors.get("nope")
    assert detectors.input_spec(Config()) == InputSpec(64, "10x") and InputSpec(64, "10x").mpp == pytest.approx(1.0)

    assert main(["detectors"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("dpa ") and "Deep Perceptual Autoencoder" in line and "64 px at 10x" in line
               for line in lines)
    assert any(line.startswith("toy_mean_colour ") for line in lines)
    assert main(["detectors", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "ninatu/anomaly_detection" in out and '"architecture": "residual18"' in out and "latent_size" in out


def test_a_toy_config_section_is_its_detectors_own():
    config = Config.from_dict({"detector": "toy_mean_colour", "toy_mean_colour": {"steps": 2}})
    assert config.section == ToyConfig(steps=2) and config.to_dict()["toy_mean_colour"] == {"steps": 2, "lr": 0.5}
    with pytest.raises(ConfigError, match="toy_mean_colour: steps must be >= 0"):
        Config.from_dict({"detector": "toy_mean_colour", "toy_mean_colour": {"steps": -1}})
    with pytest.raises(ConfigError, match="unknown config section.*'dpa'"):
        Config.from_dict({"detector": "toy_mean_colour", "dpa": {}})
    with pytest.raises(ConfigError, match="no pretrained backbone"):
        config.set_backbone_weights("/some/weights.pth")


# -- checkpoints written before the detector interface ------------------------------------------------------

def test_a_checkpoint_of_the_previous_release_still_loads_and_scores_the_same():
    """tests/data/dpa_checkpoint_format1.pt was written by wsi-ad at commit 940398a (before the detector
    interface: a shallow 32 px DPA with efficientnet_lite0 features, 18 progressive iterations); the JSON
    beside it holds the scores that code gave on a fixed set of tiles."""
    reference = json.loads((DATA / "dpa_checkpoint_format1.json").read_text())
    raw = torch.load(DATA / "dpa_checkpoint_format1.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == 1 and "model" in raw["config"]                 # really the old format
    payload = load_checkpoint(DATA / "dpa_checkpoint_format1.pt")
    assert payload["format"] == 2 and payload["detector"] == "dpa"
    assert payload["config"]["dpa"]["architecture"] == "shallow" and payload["config"]["dpa"]["feature_stats"] == "train"
    assert payload["history"]["phase"][-1] == "stab32"
    detector = detectors.load(DATA / "dpa_checkpoint_format1.pt", device="cpu")
    assert detector.name == "dpa" and detector.input_spec == InputSpec(32, "10x") and detector.map_shape == (8, 8)
    scorer = load_scorer(DATA / "dpa_checkpoint_format1.pt", device="cpu")
    assert scorer.model_id == model_id(payload) and scorer.model_id.startswith("dpa-")
    tiles = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(scorer.score(tiles), np.asarray(reference["scores"], np.float32), rtol=1e-6, atol=1e-7)


def test_an_unknown_detector_in_a_checkpoint_is_a_clear_error(tmp_path):
    from wsi_ad.detectors.checkpoint import save_checkpoint

    config = Config.from_dict({"detector": "toy_mean_colour"}).to_dict()
    config["detector"] = "gone"
    config["gone"] = config.pop("toy_mean_colour")
    save_checkpoint(tmp_path / "gone.pt", {"detector": "gone", "config": config, "state": {}, "iteration": 0,
                                          "complete": True, "history": {}})
    with pytest.raises(ConfigError, match="unknown detector 'gone'"):
        load_scorer(tmp_path / "gone.pt", device="cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="cannot read checkpoint"):
        load_scorer(tmp_path / "junk.pt")


# -- the toy end to end, through the command line ------------------------------------------------------------

def _tile_folder(root: Path, store: Path) -> Path:
    """An anomalib Folder dataset: the store's tiles as normal PNGs, the same tiles tinted green as anomalies."""
    tiles = np.asarray(SlideStore.open(store).require("tiles")["10x"][:24])
    for split, sl in (("train/good", slice(0, 12)), ("test/good", slice(12, 24)), ("test/tinted", slice(12, 24))):
        folder = root / split
        folder.mkdir(parents=True)
        for i, tile in enumerate(tiles[sl]):
            if split == "test/tinted":
                tile = tile.copy()
                tile[..., 1] = 255
            Image.fromarray(tile).save(folder / f"{i:03d}.png")
    return root


def test_toy_detector_trains_scores_processes_and_evaluates_through_the_cli(scored_setting, tmp_path, capsys, monkeypatch):
    config = tmp_path / "toy.yaml"
    config.write_text("detector: toy_mean_colour\ntoy_mean_colour: {steps: 4}\ntrain: {batch_size: 8, device: cpu}\n")
    train_dir = scored_setting["normal_store"].parent
    ckpt = tmp_path / "toy.pt"
    assert main(["train", str(train_dir), "--out", str(ckpt), "--config", str(config), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["detector"] == "toy_mean_colour" and report["iterations"] == 4 and report["complete"]
    assert report["model_id"].startswith("toy_mean_colour-") and Path(report["loss_png"]).is_file()
    payload = load_checkpoint(ckpt)
    assert payload["detector"] == "toy_mean_colour" and payload["history"]["loss"]

    # score a store (a copy: the session's stores are shared) and aggregate it, as for the DPA; `score` and
    # `process --model` run on a real local Dask cluster: the workers import this module through $WSI_AD_DETECTORS
    monkeypatch.setenv(detectors.ENV_VAR, Path(__file__).stem)
    stores = tmp_path / "stores"
    shutil.copytree(scored_setting["tumor_store"], stores / "tumor_103.zarr")
    assert main(["score", str(stores), "--model", str(ckpt), "--device", "cpu"]) == 0
    store = SlideStore.open(stores / "tumor_103.zarr")
    scores = load_scores(store, report["model_id"])
    assert scores.shape == (store.stages["tiles"]["n_tiles"],) and np.isfinite(scores).all()
    assert store.is_complete(f"heatmap/{report['model_id']}") and (stores / "overlays" / "tumor_103.png").is_file()
    units = dict(store.require(f"scores/{report['model_id']}")["scores"].attrs)["units"]
    assert units == MeanColourDistance.score_units

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "tumor_103.tif").symlink_to(scored_setting["tumor"].path)
    assert main(["process", str(slides), "--out", str(tmp_path / "run"), "--model", str(ckpt), "--workers", "1"]) == 0
    processed = load_scores(SlideStore.open(tmp_path / "run" / "tumor_103.zarr"), report["model_id"])
    np.testing.assert_allclose(processed, scores, rtol=1e-6)
    capsys.readouterr()

    # tile AUC of the anomalib-layout folder: tinted tiles are far from the normal mean colour
    dataset = _tile_folder(tmp_path / "tiles", scored_setting["normal_store"])
    assert main(["evaluate", "tiles", str(dataset), "--model", str(ckpt), "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model_id"] == report["model_id"] and results["splits"]["test"]["auc"] == 1.0


# -- boundaries -----------------------------------------------------------------------------------------------

def test_only_the_detectors_folders_and_the_shared_feature_code_know_the_perceptual_detectors_internals():
    """The shared machinery (loop, checkpoints, scorer, pipelines) never reaches into a detector."""
    root = Path(__file__).resolve().parents[1]
    detectors = root / "wsi_ad" / "detectors"
    allowed = (*[p for p in detectors.iterdir() if p.is_dir() and p.name != "__pycache__"], root / "wsi_ad" / "features")
    assert {p.name for p in allowed} >= {"dpa", "piad", "features"}
    offenders = []
    for folder in (root / "wsi_ad", root / "pipelines"):
        for path in folder.rglob("*.py"):
            if any(path.is_relative_to(a) for a in allowed):
                continue
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(root)}: {w}" for w in ("latent_channels", "PerceptualLoss", "feature_stats")
                          if w in text]
    assert offenders == []


def test_scoring_imports_no_training_loop_and_no_dask():
    import subprocess
    import sys

    code = ("import sys, wsi_ad.scoring, wsi_ad.detectors.scorer; from wsi_ad.detectors import get; get('dpa'); "
            "print(sorted(m for m in sys.modules if m == 'wsi_ad.detectors.loop' or m.split('.')[0] in ('dask', 'distributed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_config_values_of_the_wrong_type_are_named_not_tracebacks():
    assert Config.from_dict({"dpa": {"lr": "1e-3"}}).section.lr == 0.001      # YAML 1.1 reads 1e-3 as a string
    for data, match in (({"dpa": {"lr": "abc"}}, "dpa.lr: expected a number"),
                        ({"dpa": {"progressive": "maybe"}}, "dpa.progressive: expected true or false"),
                        ({"data": {"flips": "abc"}}, "data.flips: expected true or false"),
                        ({"dpa": {"iterations": 5}}, "dpa.iterations: expected a mapping"),
                        ({"dpa": {"betas": 0.9}}, "dpa.betas: expected a list"),
                        ({"train": {"batch_size": None}}, "train.batch_size: expected int"),
                        ({"dpa": {"latent_channels": 0}}, "must be >= 1"),
                        ({"data": {"image_mpp": 0}}, "image_mpp must be a positive")):
        with pytest.raises(ConfigError, match=match):
            Config.from_dict(data)


def test_unusable_checkpoint_files_are_one_clear_error(tmp_path):
    from wsi_ad.detectors.checkpoint import CheckpointError, save_checkpoint

    good = DATA / "dpa_checkpoint_format1.pt"
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:20000])
    for name, match in (("empty.pt", "the file is empty"), ("text.pt", "not a torch file"), ("cut.pt", "truncated")):
        with pytest.raises(CheckpointError, match=match):
            load_scorer(tmp_path / name, device="cpu")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_scorer(tmp_path, device="cpu")
    save_checkpoint(tmp_path / "partial.pt", {})
    with pytest.raises(CheckpointError, match="not a complete wsi-ad checkpoint"):
        load_scorer(tmp_path / "partial.pt", device="cpu")
    payload = load_checkpoint(good)
    payload["config"]["dpa"]["channels"] = [4, 4, 4]                       # weights of 8-channel layers
    save_checkpoint(tmp_path / "mismatch.pt", payload)
    with pytest.raises(CheckpointError, match="do not fit its dpa config"):
        load_scorer(tmp_path / "mismatch.pt", device="cpu")


def test_a_detector_without_maps_says_so():
    from wsi_ad.errors import WsiAdError

    toy = detectors.build(Config(detector="toy_mean_colour"))
    toy.score_batch = lambda tiles, pixel_maps=False: (tiles.mean(dim=(1, 2, 3)), None)
    with pytest.raises(WsiAdError, match="gives no per-pixel maps"):
        _ = toy.map_shape
