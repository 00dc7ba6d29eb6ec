"""PIAD (issue 15): the official networks' sizes, the gradient-norm reconstruction weights on cases checked by
hand, real training steps on CPU that move every network, resume after a stop with identical weights, divergence
stopped with a clear error that keeps the last checkpoint, and a PIAD checkpoint through ``wsi-ad score`` and
``wsi-ad process``."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.cli import main
from wsi_ad.config import Config
from wsi_ad.detectors import build
from wsi_ad.detectors.base import TrainingDivergedError
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.detectors.loop import loss_paths, train
from wsi_ad.detectors.piad import PIAD
from wsi_ad.detectors.piad.losses import GradientNormBalancer, ewma, weight_gradient_norms
from wsi_ad.detectors.piad.networks import LatentCritic, Residual9Encoder, Residual9Generator, parameter_count
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore

#: A PIAD small enough for a few real CPU steps in seconds (the networks of the paper, narrower).
TINY = {
    "detector": "piad",
    "piad": {"latent_dim": 16, "encoder_channels": [4, 8, 8, 8, 8], "generator_channels": [8, 8, 8, 8, 4],
             "critic_channels": [4, 8, 8, 8, 8], "latent_critic_channels": [32, 32], "backbone": "efficientnet_lite0",
             "layers": {64: "block7"}, "feature_stats": "train", "stats_tiles": 64, "iterations": 6,
             "grad_norm_every": 2},
    "data": {"buffer_tiles": 512},
    "train": {"batch_size": 8, "checkpoint_every": 2, "log_every": 1, "seed": 3},
}


@pytest.mark.parametrize(("latent", "enc", "dec", "expected"), [
    # METHODS §4.1: the official modules of the default ("reproduce") and weakly-supervised ("with_cv") configs
    (256, [32, 64, 128, 256, 256], [256, 256, 128, 64, 32], (3_453_952, 2_854_147, 899_073, 1_313_793)),
    (128, [32, 64, 128, 128, 128], [128, 128, 128, 64, 32], (1_159_296, 1_002_243, 899_073, 1_182_721)),
])
def test_networks_have_the_official_parameter_counts_and_shapes(latent, enc, dec, expected):
    nets = (Residual9Encoder(enc, latent), Residual9Generator(latent, dec), Residual9Encoder([32, 64, 128, 128, 128], 1),
            LatentCritic(latent, [1024, 1024]))
    assert tuple(parameter_count(n) for n in nets) == expected
    x = torch.zeros(2, 3, 64, 64)
    z = nets[0](x)
    assert z.shape == (2, latent, 1, 1) and nets[1](z).shape == (2, 3, 64, 64)
    assert nets[2](x).shape == (2, 1, 1, 1) and nets[3](z).shape == (2, 1, 1, 1)


def test_gradient_norm_weights_on_cases_checked_by_hand():
    assert ewma([1.0, 3.0], 0.5).tolist() == [1.0, 2.0]                 # y0 = x0, y1 = 0.5 * 1 + 0.5 * 3
    assert ewma([4.0, 4.0, 4.0], 0.05).tolist() == [4.0, 4.0, 4.0]
    balancer = GradientNormBalancer(history=200, alpha=0.5)
    assert balancer.weight("encoder") == 1.0                             # nothing recorded yet
    balancer.record("encoder", "adv", {"a": 2.0, "b": 6.0})
    balancer.record("encoder", "rec", {"a": 1.0, "b": 2.0})
    assert balancer.weight("encoder") == 2.5                             # median of the ratios 2 and 3
    balancer.record("encoder", "adv", {"a": 4.0, "b": 6.0})
    balancer.record("encoder", "rec", {"a": 1.0, "b": 2.0})
    # a: EWMA(2, 4) = (2, 3) over (1, 1) -> 2, 3; b: (6, 6) / (2, 2) -> 3, 3; median of 2, 3, 3, 3
    assert balancer.weight("encoder") == 3.0
    short = GradientNormBalancer(history=1, alpha=0.5)                   # only the last measurement counts
    for adv in (100.0, 4.0):
        short.record("generator", "adv", {"w": adv})
        short.record("generator", "rec", {"w": 2.0})
    assert short.weight("generator") == 2.0

    # real gradients: adversarial loss 3 * sum(w), reconstruction sum(w) over a 4-weight layer (bias excluded)
    layer = nn.Linear(4, 1)
    adv, rec = 3 * layer.weight.sum() + 100 * layer.bias.sum(), layer.weight.sum()
    norms_adv, norms_rec = weight_gradient_norms(adv, layer), weight_gradient_norms(rec, layer)
    assert norms_adv == pytest.approx({"weight": 6.0}) and norms_rec == pytest.approx({"weight": 2.0})
    balancer = GradientNormBalancer()
    balancer.record("encoder", "adv", norms_adv)
    balancer.record("encoder", "rec", norms_rec)
    assert balancer.weight("encoder") == pytest.approx(3.0)


def _weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def test_training_steps_move_every_network_and_a_resumed_run_ends_with_identical_weights(scored_setting, tmp_path):
    config = Config.from_dict(TINY)
    torch.manual_seed(config.train.seed)                 # as the loop builds it
    initial = build(config, "cpu")
    before = {"encoder": _weights(initial.encoder.state_dict()), "generator": _weights(initial.generator.state_dict()),
              "image_critic": _weights(initial.image_critic.state_dict()),
              "latent_critic": _weights(initial.latent_critic.state_dict())}
    stores = [scored_setting["normal_store"]]
    quiet = {"progress": False, "echo": lambda *a: None}

    stopped = train(stores, tmp_path / "resumed.pt", config, stop_after=3, **quiet)
    assert (stopped.iterations, stopped.complete) == (3, False)
    mid = load_checkpoint(tmp_path / "resumed.pt")
    moved = {**mid["state"], **mid["training_state"]}
    for network, weights in before.items():
        changed = [k for k, v in weights.items() if not torch.equal(v, moved[network][k])]
        assert changed, f"{network}: no weight changed in 3 steps"
    assert set(mid["training_state"]) >= {"optimizer", "image_critic_optimizer", "latent_critic_optimizer", "balancer"}

    resumed = train(stores, tmp_path / "resumed.pt", config, **quiet)
    straight = train(stores, tmp_path / "straight.pt", config, **quiet)
    assert resumed.complete and resumed.resumed_from == 3 and straight.iterations == 6
    a, b = load_checkpoint(tmp_path / "resumed.pt")["state"], load_checkpoint(tmp_path / "straight.pt")["state"]
    for network in ("encoder", "generator"):
        for key in a[network]:
            assert torch.equal(a[network][key], b[network][key]), f"{network}.{key} differs after resume"
    assert resumed.model_id == straight.model_id

    # every named loss and the reconstruction weights chosen are in the loss curve (weights logged from step 2 on)
    with open(loss_paths(tmp_path / "straight.pt")[0]) as f:
        rows = list(csv.DictReader(f))
    assert {"rec_loss", "image_adv_loss", "latent_adv_loss", "image_critic_loss", "latent_critic_loss",
            "image_critic_gp", "latent_critic_norm", "rec_weight_encoder", "rec_weight_generator",
            "generated_diversity"} <= set(rows[0])
    assert float(rows[0]["rec_weight_encoder"]) == 1.0 and float(rows[-1]["rec_weight_encoder"]) != 1.0
    assert loss_paths(tmp_path / "straight.pt")[1].exists()


def test_divergence_stops_with_the_iteration_and_last_finite_losses_and_keeps_the_checkpoint(
        scored_setting, tmp_path, monkeypatch):
    stores = [scored_setting["normal_store"]]
    quiet = {"progress": False, "echo": lambda *a: None}
    config = Config.from_dict(TINY)
    real_step = PIAD.train_step

    def poisoned(self, tiles, step):                     # weights turn to NaN before step 4, as an overflow would
        if step == 4:
            with torch.no_grad():
                next(self.generator.parameters()).fill_(float("nan"))
        return real_step(self, tiles, step)

    monkeypatch.setattr(PIAD, "train_step", poisoned)
    out = tmp_path / "model.pt"
    with pytest.raises(TrainingDivergedError) as caught:
        train(stores, out, config, **quiet)
    message = str(caught.value)
    assert "training diverged at iteration 4" in message and "rec_loss = nan" in message
    assert "last finite values (iteration 3)" in message and f"{out} keeps its last checkpoint" in message
    kept = load_checkpoint(out)
    assert kept["iteration"] == 4 and all(torch.isfinite(v).all() for v in kept["state"]["generator"].values())
    monkeypatch.undo()

    # the official guard: a loss beyond loss_limit is divergence too
    guarded = Config.from_dict({**TINY, "piad": {**TINY["piad"], "loss_limit": 1e-9}})
    with pytest.raises(TrainingDivergedError, match="iteration 0: rec_loss = .* above loss_limit 1e-09 .*no checkpoint"):
        train(stores, tmp_path / "guarded.pt", guarded, **quiet)
    assert not (tmp_path / "guarded.pt").exists()

    # a logged statistic is no loss: one tile per batch (no spread to measure) trains on
    single = Config.from_dict({**TINY, "piad": {**TINY["piad"], "iterations": 2}, "train": {**TINY["train"], "batch_size": 1}})
    assert train(stores, tmp_path / "single.pt", single, **quiet).complete


def test_a_piad_checkpoint_goes_through_train_score_and_process_commands(scored_setting, tmp_path, capsys):
    import yaml

    config = tmp_path / "piad.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "checkpoint_every": 100}}))
    model = tmp_path / "piad.pt"
    assert main(["train", str(scored_setting["normal_store"]), "--out", str(model), "--config", str(config),
                 "--set", "piad.iterations=4"]) == 0
    stores = tmp_path / "stores"
    shutil.copytree(scored_setting["stores_dir"], stores)
    assert main(["score", str(stores), "--model", str(model), "--device", "cpu", "--export", "ngff"]) == 0
    scorer = load_scorer(model)
    assert scorer.model_id.startswith("piad-") and scorer.units.startswith("relative perceptual L1")
    for name in ("normal_102", "tumor_103"):
        store = SlideStore.open(stores / f"{name}.zarr")
        stored = load_scores(store, scorer.model_id)
        np.testing.assert_allclose(stored, score_store(store, scorer), rtol=1e-5)
        assert (stores / "overlays" / f"{name}.png").exists() and (stores / "ngff" / f"{name}.ome.zarr").is_dir()
    assert main(["process", str(scored_setting["tumor"].path), "--out", str(tmp_path / "run"), "--model", str(model),
                 "--workers", "1"]) == 0
    assert "slide score" in capsys.readouterr().out


def test_tune_parameters_are_declared_by_piad():
    from wsi_ad.tuning import apply_params, load_space

    section = Config.from_dict({"detector": "piad"}).to_dict()["piad"]
    weakly = PIAD.apply_search_params(section, {"latent_dim": 128, "layer": "relu3_2"})
    assert weakly["encoder_channels"] == [32, 64, 128, 128, 128] and weakly["generator_channels"] == [128, 128, 128, 64, 32]
    assert weakly["layers"] == {64: "relu3_2"}
    Config.from_dict({"detector": "piad", "piad": weakly}).validate()
    space = load_space(None, detector="piad")                 # PIAD's own default: the two official settings
    candidates = space.candidates()
    assert len(candidates) == 8
    for params in candidates:                                  # each makes a valid config
        config = apply_params(Config.from_dict({"detector": "piad"}), params)
        assert config.section.latent_dim == params["latent_dim"] and config.section.iterations == params["iterations"]
