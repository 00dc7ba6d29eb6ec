"""The plain autoencoder baseline (issue 17, ``ae``): the paper's layers, the residuals on known answers, real
training steps that resume with identical weights, and a checkpoint through ``wsi-ad score`` with maps."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipelines.cli import main
from wsi_ad.config import Config, ConfigError
from wsi_ad.detectors import build
from wsi_ad.detectors.ae.detector import ConvAutoencoder
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.detectors.loop import train
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore

TINY = {"detector": "ae", "ae": {"latent_dim": 8, "iterations": 4},
        "data": {"buffer_tiles": 512}, "train": {"batch_size": 8, "checkpoint_every": 2, "log_every": 1, "seed": 5}}
QUIET = {"progress": False, "echo": lambda *a: None}


def test_the_papers_layers_and_the_residuals_on_known_answers():
    net = ConvAutoencoder(128, 100)                                     # the paper's 128 px setting
    assert net.encoder(torch.zeros(1, 3, 128, 128)).shape == (1, 100, 1, 1)
    convs = [m for m in net.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0], c.out_channels) for c in convs[:3]] == [(4, 2, 32), (4, 2, 32), (3, 1, 32)]
    assert convs[-1].kernel_size == (8, 8) and ConvAutoencoder(64, 100)(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 64, 64)

    l2 = build(Config.from_dict(TINY), "cpu")
    x = torch.rand(2, 3, 64, 64) * 1.6 - 0.8
    assert torch.allclose(l2.residual(x, x + 0.1), torch.full((2, 64, 64), 0.01), atol=1e-6)
    ssim = build(Config.from_dict({**TINY, "ae": {**TINY["ae"], "loss": "ssim"}}), "cpu")
    assert float(ssim.residual(x, x).abs().max()) < 1e-5
    assert float(ssim.residual(x, torch.rand_like(x)).mean()) > 0.5    # unrelated noise: little structure shared
    with pytest.raises(ConfigError, match="loss must be l2 or ssim"):
        Config.from_dict({"detector": "ae", "ae": {"loss": "l1"}})
    with pytest.raises(ConfigError, match="multiple of 16"):
        Config.from_dict({"detector": "ae", "ae": {"image_size": 40}})


def test_training_resumes_with_identical_weights_and_scores_a_store_with_maps(scored_setting, tmp_path):
    config = Config.from_dict(TINY)
    stores = [scored_setting["normal_store"]]
    torch.manual_seed(config.train.seed)
    before = {k: v.clone() for k, v in build(config, "cpu").net.state_dict().items()}
    stopped = train(stores, tmp_path / "resumed.pt", config, stop_after=2, **QUIET)
    assert not stopped.complete
    mid = load_checkpoint(tmp_path / "resumed.pt")["state"]["net"]
    assert all(not torch.equal(before[k], mid[k]) for k in before if k.endswith("weight"))
    resumed = train(stores, tmp_path / "resumed.pt", config, **QUIET)
    straight = train(stores, tmp_path / "straight.pt", config, **QUIET)
    assert resumed.resumed_from == 2 and resumed.model_id == straight.model_id and resumed.model_id.startswith("ae-")

    copy = tmp_path / "stores"
    shutil.copytree(scored_setting["stores_dir"], copy)
    assert main(["score", str(copy), "--model", str(straight.checkpoint), "--device", "cpu", "--pixel-maps"]) == 0
    scorer = load_scorer(straight.checkpoint)
    store = SlideStore.open(copy / "tumor_103.zarr")
    np.testing.assert_allclose(load_scores(store, scorer.model_id), score_store(store, scorer), rtol=1e-5)
    tiles = torch.from_numpy(np.asarray(store.require("tiles")["10x"][:4])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        scores, maps = scorer.detector.score_batch(tiles, pixel_maps=True)
    assert maps.shape == (4, 8, 8) and torch.allclose(maps.flatten(1).mean(1), scores, atol=1e-6)   # mean reduction


def test_a_value_logged_in_one_phase_only_leaves_gaps_in_the_loss_curve(scored_setting, tmp_path):
    from wsi_ad.detectors import register
    from wsi_ad.detectors.ae.detector import Autoencoder
    from wsi_ad.detectors.loop import loss_paths

    class PhasedAutoencoder(Autoencoder):
        """The ae with a value logged in its first two steps only (as a GAN phase's critic terms)."""

        name = "ae_phased_test"

        def train_step(self, tiles, step):
            values = super().train_step(tiles, step)
            return {**values, "critic": 1.0} if step < 2 else values

    register(PhasedAutoencoder)
    phased = {k: v for k, v in TINY.items() if k != "ae"}
    config = Config.from_dict({**phased, "detector": "ae_phased_test", "ae_phased_test": TINY["ae"]})
    result = train([scored_setting["normal_store"]], tmp_path / "phased.pt", config, **QUIET)
    history = load_checkpoint(result.checkpoint)["history"]
    assert history["critic"] == [1.0, 1.0, None, None] and len(history["loss"]) == 4
    assert loss_paths(result.checkpoint)[0].read_text().count("\n") == 5      # header + one row per logged step
