"""The DPA's ablations as config switches (issue 17; the paper's Table 2, official ``configs/dpa/camelyon16/final``):
the official critic's size, the pixel-L1 and composite scores computed by hand, real adversarial training steps that
resume with identical weights, and model ids of configs without the switches unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsi_ad.config import Config, ConfigError, training_identity
from wsi_ad.detectors import build
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.detectors.dpa.residual import Residual18Critic
from wsi_ad.detectors.loop import train
from wsi_ad.features.perceptual import perceptual_scores

BASE = {"architecture": "residual18", "channels": [4, 4, 4, 4], "backbone": "efficientnet_lite0",
        "feature_stats": "train", "stats_tiles": 32, "progressive": False, "flat_iterations": 4}
QUIET = {"progress": False, "echo": lambda *a: None}
TRAIN = {"batch_size": 4, "checkpoint_every": 2, "log_every": 1, "seed": 2}


def config(**dpa) -> Config:
    return Config.from_dict({"detector": "dpa", "dpa": {**BASE, **dpa}, "data": {"buffer_tiles": 512}, "train": TRAIN})


def test_the_official_critic_and_the_switches_validated():
    assert sum(p.numel() for p in Residual18Critic([4] * 5).parameters()) == 3_137    # METHODS §3.7, official ddis
    assert Residual18Critic([8, 8, 8, 8, 8])(torch.zeros(3, 3, 64, 64)).shape == (3,)
    with pytest.raises(ConfigError, match="adversarial_weight needs progressive: false"):
        config(adversarial_weight=0.1, progressive=True)
    with pytest.raises(ConfigError, match="critic_channels needs one width per resolution.*\\(5\\)"):
        config(adversarial_weight=0.1, critic_channels=[4, 4])
    with pytest.raises(ConfigError, match="with loss: l1 it is the whole loss"):
        config(loss="l1", l1_weight=1.0)
    with pytest.raises(ConfigError, match="loss must be perceptual or l1"):
        config(loss="ssim")
    # configs that do not use the switches keep the identity (and so the model ids) they had before them
    assert not {"loss", "l1_weight", "adversarial_weight", "critic_channels", "n_critic", "critic_lr"} & set(
        training_identity(Config())["dpa"])
    assert training_identity(config(l1_weight=0.5))["dpa"]["l1_weight"] == 0.5


def test_pixel_l1_and_composite_scores_are_the_formulas():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.manual_seed(0)
    pixel = build(config(loss="l1")).eval()
    assert pixel._extractor is None and pixel.perceptual is None               # no backbone at all
    with torch.no_grad():
        recon = pixel.autoencoder(x, 64, 1.0)
        scores, maps = pixel.score_batch(x, pixel_maps=True)
    assert torch.allclose(scores, (x - recon).abs().mean(dim=(1, 2, 3)), atol=1e-6)
    assert maps.shape == (2, 8, 8) and torch.allclose(maps.mean(dim=(1, 2)), scores, atol=1e-6)
    assert "feature_stats" not in pixel.state_dict() and pixel.score_units.startswith("mean absolute pixel")

    composite = build(config(l1_weight=0.5))
    assert "+ 0.5 x mean absolute pixel difference" in composite.score_units
    composite.fit(_Pool(x))
    composite.eval()
    with torch.no_grad():
        recon = composite.autoencoder(x, 64, 1.0)
        perceptual, perceptual_maps = perceptual_scores(composite.perceptual, x, recon, True)
        scores, maps = composite.score_batch(x, pixel_maps=True)
        l1 = (x - recon).abs().mean(dim=1)
    assert torch.allclose(scores, perceptual + 0.5 * l1.mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(maps, perceptual_maps + 0.5 * F.adaptive_avg_pool2d(l1[:, None], maps.shape[-2:])[:, 0])
    assert torch.allclose(maps.mean(dim=(1, 2)), scores, atol=1e-5)


class _Pool:
    """The tile pool's ``sample`` on fixed tiles, for the feature statistics."""

    def __init__(self, x: torch.Tensor):
        self.tiles = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()

    def sample(self, n: int):
        return self.tiles[:n]


def test_adversarial_ablation_trains_critic_and_autoencoder_and_resumes_identically(scored_setting, tmp_path):
    cfg = config(adversarial_weight=0.1, critic_channels=[4, 4, 4, 4, 4])
    stores = [scored_setting["normal_store"]]
    stopped = train(stores, tmp_path / "resumed.pt", cfg, stop_after=2, **QUIET)
    mid = load_checkpoint(tmp_path / "resumed.pt")
    assert not stopped.complete and set(mid["training_state"]) >= {"critic", "critic_optimizer", "optimizer"}
    assert {"critic_loss", "gp", "adversarial", "reconstruction"} <= set(mid["history"])
    torch.manual_seed(cfg.train.seed)
    fresh_critic = build(cfg).critic.state_dict()
    assert any(not torch.equal(fresh_critic[k], mid["training_state"]["critic"][k]) for k in fresh_critic)
    resumed = train(stores, tmp_path / "resumed.pt", cfg, **QUIET)
    straight = train(stores, tmp_path / "straight.pt", cfg, **QUIET)
    assert resumed.resumed_from == 2 and resumed.complete and resumed.model_id == straight.model_id
    final = load_checkpoint(straight.checkpoint)
    assert final["training_state"] is None and "critic" not in final["state"]      # the score needs no critic


def test_the_shipped_ablation_configs():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "ablations"
    configs = {p.stem: Config.from_yaml(p) for p in sorted(folder.glob("*.yaml"))}
    assert {"dpa_pg_cpu", "dpa_adv_0.1_cpu", "dpa_adv_0.01_cpu", "dpa_l1_1.0_cpu", "dpa_pixel_l1_cpu",
            "dpa_wo_pg_paper", "dpa_adv_0.1_paper", "dpa_l1_1.0_paper", "dpa_pixel_l1_paper"} <= set(configs)
    assert configs["dpa_adv_0.1_paper"].section.adversarial_weight == 0.1 and configs["dpa_adv_0.1_paper"].section.lr == 2e-4
    paper_l1 = build(configs["dpa_pixel_l1_paper"])            # no backbone weights needed: no perceptual loss
    assert sum(paper_l1.autoencoder.parameter_count(64)) == 223_715   # METHODS §3.7, official wo_pg_L1_unsupervised
