"""f-AnoGAN (``fanogan``): the paper's network sizes, the critic's gradient penalty and the izi_f score on known
answers, real training steps through both phases (GAN, then encoder) that resume with identical weights from
inside either phase and from the boundary, and a checkpoint through ``wsi-ad score`` with maps."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wsi_ad.detectors.fanogan  # noqa: F401 - registers the detector
from pipelines.cli import main
from wsi_ad.config import Config, ConfigError
from wsi_ad.detectors import build
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.detectors.fanogan.networks import Critic
from wsi_ad.detectors.loop import loss_paths, train
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore

#: An f-AnoGAN small enough for a few real CPU steps in seconds: the paper's networks, 4 channels wide.
TINY = {"detector": "fanogan",
        "fanogan": {"latent_dim": 8, "generator_channels": [4, 4, 4, 4, 4], "critic_channels": [4, 4, 4, 4, 4],
                    "encoder_channels": [4, 4, 4, 4, 4], "gan_iterations": 2, "encoder_iterations": 2, "n_critic": 2,
                    "encoder_lr": 1e-3},
        "data": {"buffer_tiles": 128}, "train": {"batch_size": 4, "checkpoint_every": 100, "log_every": 1, "seed": 7}}
QUIET = {"progress": False, "echo": lambda *a: None}


def test_the_papers_networks_and_the_layer_normalisation():
    config = Config.from_dict({"detector": "fanogan"})                 # the defaults: DIM 64, z in R^128
    detector = build(config, "cpu")
    g, d, e = detector.generator, detector.critic, detector.encoder
    assert (g.input.in_features, g.input.out_features) == (128, 512 * 4 * 4)
    assert [b.conv1.out_channels for b in g.up] == [512, 256, 128, 64]
    assert d.feature_dim == 8192 and (d.head.in_features, d.head.out_features) == (8192, 1)
    assert [b.conv2.out_channels for b in d.down] == [128, 256, 512, 512] and d.input.out_channels == 64
    assert (e.head.in_features, e.head.out_features) == (8192, 128)
    assert all(isinstance(m, nn.GroupNorm) for b in d.down for m in (b.norm1, b.norm2))
    assert all(isinstance(m, nn.BatchNorm2d) for b in e.down for m in (b.norm1, b.norm2))
    assert detector.num_steps == 100000 and detector.batches_per_step == 5
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        out = g(torch.randn(2, 128))
        assert out.shape == (2, 3, 64, 64) and float(out.abs().max()) < 1
        assert d(x).shape == (2, 1) and d.features(x).shape == (2, 8192) and e(x).shape == (2, 128)

    # the critic's layer normalisation: each sample over channels and pixels together, per-channel scale and offset
    norm = Critic([4, 4, 4, 4, 4]).down[0].norm1
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.5, -0.5, 1.0]))
        h = torch.randn(3, 4, 8, 8) * 5 + 2
        expected = F.layer_norm(h, (4, 8, 8), eps=norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]
        assert torch.allclose(norm(h), expected, atol=1e-5)

    for bad, match in (({"image_size": 48}, "power of two"), ({"critic_channels": [8, 8]}, "critic_channels must list 5"),
                       ({"prior": "cauchy"}, "prior must be"), ({"n_critic": 0}, "n_critic"),
                       ({"encoder_iterations": 0}, "encoder_iterations"), ({"betas": [0.0, 1.0]}, "betas")):
        with pytest.raises(ConfigError, match=match):
            Config.from_dict({"detector": "fanogan", "fanogan": bad})


class _LinearCritic(nn.Module):
    """D(x) = <w, x>: its gradient with respect to x is w everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) @ self.w)[:, None]


def test_the_critic_loss_and_its_gradient_penalty_on_known_answers():
    detector = build(Config.from_dict(TINY), "cpu")
    real, fake = torch.rand(5, 3, 64, 64), -torch.rand(5, 3, 64, 64)
    unit = torch.randn(3 * 64 * 64)
    unit = unit / unit.norm()
    for scale, gp in ((1.0, 0.0), (3.0, 10.0 * (3.0 - 1.0) ** 2), (0.5, 10.0 * 0.25)):
        detector.critic = _LinearCritic(scale * unit)
        loss, parts = detector.critic_objective(real, fake, torch.Generator().manual_seed(0))
        wasserstein = float(((fake - real).flatten(1) @ (scale * unit)).mean())
        assert parts["gp"] == pytest.approx(gp, abs=1e-4)
        assert parts["wasserstein"] == pytest.approx(wasserstein, abs=1e-5)          # float32 sums of 12,288 terms
        assert float(loss.detach()) == pytest.approx(wasserstein + gp, abs=1e-4) and parts["norm"] == 0.0


def test_the_izif_score_and_map_equal_the_formula_from_g_e_and_the_critic_features():
    config = Config.from_dict({**TINY, "fanogan": {**TINY["fanogan"], "kappa": 2.5}})
    torch.manual_seed(0)
    detector = build(config, "cpu").eval()
    with torch.no_grad():                          # BatchNorm running statistics away from their initial values
        for module in (detector.generator, detector.encoder):
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        scores, maps = detector.score_batch(x, pixel_maps=True)
        recon = detector.generator(detector.encoder(x))
        image = ((x - recon) ** 2).sum(dim=(1, 2, 3)) / (3 * 64 * 64)
        f_x, f_r = detector.critic.features(x), detector.critic.features(recon)
        feature = ((f_x - f_r) ** 2).sum(1) / f_x.shape[1]
        alone, _ = detector.score_batch(x[2:3])
    assert f_x.shape == (6, 16 * 4)
    assert torch.allclose(scores, image + 2.5 * feature, rtol=1e-5)
    assert float(alone[0]) == pytest.approx(float(scores[2]), rel=1e-5)      # a tile's score ignores its batch
    cells = (x - recon).abs().mean(1).reshape(6, 8, 8, 8, 8).mean(dim=(2, 4))  # 8 px cells of the channel mean
    assert maps.shape == (6, 8, 8) and torch.allclose(maps, cells, atol=1e-6)
    assert detector.map_shape == (8, 8)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_phases_train_the_right_networks_and_resume_anywhere_with_identical_weights(scored_setting, tmp_path):
    config = Config.from_dict(TINY)
    torch.manual_seed(config.train.seed)                              # as the loop builds it
    initial = build(config, "cpu")
    assert [initial.phase(s) for s in range(4)] == ["gan"] * 2 + ["encoder"] * 2
    assert initial.checkpoint_steps() == {2, 4} and initial.num_steps == 4
    before = {n: _weights(getattr(initial, n)) for n in ("generator", "critic", "encoder")}
    stores = [scored_setting["normal_store"]]
    out = tmp_path / "resumed.pt"

    # stopped inside the GAN phase, at the boundary, inside the encoder phase; resumed each time
    boundary = None
    for stop, phase_done in ((1, "gan"), (2, "gan"), (3, "encoder"), (None, "encoder")):
        result = train(stores, out, config, stop_after=stop, **QUIET)
        assert result.iterations == (stop or 4) and result.complete == (stop is None)
        saved = load_checkpoint(out)
        assert saved["history"]["phase"][-1] == phase_done
        if stop == 2:
            boundary = saved["state"]
    assert result.resumed_from == 3

    # the GAN phase moves G and the critic, not E; the encoder phase moves E only (G's running statistics too)
    for name in ("generator", "critic"):
        assert not _same(before[name], boundary[name]), f"{name}: unchanged by the GAN phase"
    assert _same(before["encoder"], boundary["encoder"])
    final = load_checkpoint(out)["state"]
    for name in ("generator", "critic"):
        assert _same(boundary[name], final[name]), f"{name}: changed in the encoder phase"
    assert not _same(boundary["encoder"], final["encoder"])

    straight = train(stores, tmp_path / "straight.pt", config, **QUIET)
    other = load_checkpoint(straight.checkpoint)["state"]
    for name in ("generator", "critic", "encoder"):
        assert _same(final[name], other[name]), f"{name}: differs after resuming"
    assert result.model_id == straight.model_id and straight.model_id.startswith("fanogan-")

    with open(loss_paths(straight.checkpoint)[0]) as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["gan"] * 2 + ["encoder"] * 2
    assert all(np.isfinite(float(r["critic_gp"])) and np.isnan(float(r["izif_image"])) for r in rows[:2])
    assert all(np.isnan(float(r["critic_gp"])) and np.isfinite(float(r["izif_feature"])) for r in rows[2:])
    assert loss_paths(straight.checkpoint)[1].exists()


def test_a_checkpoint_round_trips_and_scores_a_store_with_maps_through_the_command_line(scored_setting, tmp_path):
    config = Config.from_dict({**TINY, "fanogan": {**TINY["fanogan"], "gan_iterations": 1, "encoder_iterations": 1}})
    trained = train([scored_setting["normal_store"]], tmp_path / "model.pt", config, **QUIET)
    payload = load_checkpoint(trained.checkpoint)
    assert payload["training_state"] is None and set(payload["state"]) == {"generator", "critic", "encoder"}

    copy = tmp_path / "stores"
    shutil.copytree(scored_setting["stores_dir"], copy)
    assert main(["score", str(copy), "--model", str(trained.checkpoint), "--device", "cpu", "--pixel-maps"]) == 0
    scorer = load_scorer(trained.checkpoint)
    assert scorer.model_id == trained.model_id
    store = SlideStore.open(copy / "tumor_103.zarr")
    np.testing.assert_allclose(load_scores(store, scorer.model_id), score_store(store, scorer), rtol=1e-5)

    rebuilt = build(config, "cpu")                                     # a fresh detector with the saved state
    rebuilt.load_state_dict(payload["state"])
    rebuilt.eval()
    assert all(_same(payload["state"][n], v) for n, v in rebuilt.state_dict().items())
    tiles = torch.from_numpy(np.asarray(store.require("tiles")["10x"][:4])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        scores, maps = scorer.detector.score_batch(tiles, pixel_maps=True)
        again, _ = rebuilt.score_batch(tiles)
    assert torch.equal(scores, again) and maps.shape == (4, 8, 8) and bool((scores > 0).all())
    np.testing.assert_allclose(load_scores(store, scorer.model_id)[:4], scores.numpy(), rtol=1e-5)
