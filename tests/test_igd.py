"""IGD (issue 16): the official networks' sizes, the E-step and the losses on cases checked by hand, real training
steps on CPU that move every network, resume with identical weights, the contamination experiment recorded in the
checkpoint, and an IGD checkpoint through ``wsi-ad score`` with per-pixel maps."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from pipelines.cli import main
from wsi_ad.config import Config, ConfigError, training_identity
from wsi_ad.detectors import build
from wsi_ad.detectors.checkpoint import CheckpointError, load_checkpoint
from wsi_ad.detectors.igd import IGD
from wsi_ad.detectors.igd.losses import estimate_center, estimate_sigma2, gac_loss, msssim_weights, reconstruction_loss
from wsi_ad.detectors.igd.networks import GlobalCritic, GlobalDecoder, LocalCritic, LocalDecoder, parameter_count
from wsi_ad.detectors.loop import loss_paths, train
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.features.backbones import BackboneError
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore
from wsi_ad.tile_pool import DataError, TilePool, discover_sources

#: An IGD small enough for a few real CPU steps in seconds (the paper's networks, narrower).
TINY = {
    "detector": "igd",
    "igd": {"latent_dim": 16, "backbone": "efficientnet_lite0", "decoder_channels": [16, 8, 8, 8],
            "critic_channels": [8, 8, 8, 8], "local_decoder_channels": [16, 8, 8, 8], "local_critic_channels": [8, 8, 8, 8],
            "iterations": 6, "estep_every": 3, "estep_tiles": 48, "lr": 0.001},
    "data": {"buffer_tiles": 512},
    "train": {"batch_size": 8, "checkpoint_every": 2, "log_every": 1, "seed": 3},
}
QUIET = {"progress": False, "echo": lambda *a: None}


def test_networks_have_the_official_parameter_counts_and_shapes():
    # the official modules (tianyu0207/IGD 1ce9952) at their own sizes, counted once on CPU: p256 twoin1Generator256
    # without its ResNet and linear map, VisualDiscriminator256(64); p32 twoin1Generator's decoder, VisualDiscriminator(64)
    assert parameter_count(GlobalDecoder(128, [512, 512, 512, 256, 128, 64])) == 10_903_363
    assert parameter_count(GlobalCritic([64, 128, 256, 512, 512, 512])) == 17_715_201
    assert parameter_count(LocalDecoder(128, [512, 256, 128, 64])) == 3_556_675
    assert parameter_count(LocalCritic([64, 128, 256, 512])) == 2_964_993
    paper = Config.from_dict({"detector": "igd"}).section                 # the tile setting of configs/igd_paper.yaml
    decoder, critic = GlobalDecoder(128, paper.decoder_channels), GlobalCritic(paper.critic_channels)
    assert decoder(torch.zeros(2, 128)).shape == (2, 3, 64, 64) and critic(torch.zeros(2, 3, 64, 64)).shape == (2,)
    local = LocalCritic(paper.local_critic_channels)(torch.zeros(2, 3, 32, 32))
    assert local.shape == (2,) and bool(((local > 0) & (local < 1)).all())
    with pytest.raises(ValueError, match="expected 64 x 64 px"):
        critic(torch.zeros(1, 3, 32, 32))


def test_e_step_gaussian_classifier_and_reconstruction_on_cases_checked_by_hand():
    codes = torch.tensor([[1.0, 0.02, 0.5], [3.0, 0.06, -0.5], [2.0, -0.2, 0.0], [2.0, 0.0, 0.0]])
    center = estimate_center(codes, eps=0.1)
    # mean (2, -0.03, 0): -0.03 is closer to 0 than eps, pushed to -0.1; an exact 0 stays 0 (as the official code)
    assert center.tolist() == pytest.approx([2.0, -0.1, 0.0])
    # batches of 2: (1 + 0.12^2 + 0.25 + 1 + 0.16^2 + 0.25) / 2 = 1.27; (0.1^2 + 0.1^2) / 2 = 0.01, floored at 1
    assert float(estimate_sigma2(codes, center, batch=2, floor=1.0)) == pytest.approx((1.27 + 1.0) / 2)
    assert float(estimate_sigma2(codes, center, batch=4, floor=0.0)) == pytest.approx((1.2644 + 1.2756 + 0.01 + 0.01) / 4)
    # GAC: 0 at the centre, 1/2 at squared distance sigma2 * ln 2, towards 1 far away
    sigma2 = torch.tensor(1.5)
    z = torch.stack([center, center + torch.tensor([math.sqrt(1.5 * math.log(2)), 0, 0]), center + 100])
    assert gac_loss(z, center, sigma2).tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)

    # MS-SSIM weights: 5 scales as published, 4 scales = the official local model's
    assert msssim_weights(5) == pytest.approx((0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    assert msssim_weights(4) == pytest.approx((0.0516, 0.3295, 0.3463, 0.2726), abs=1e-4)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert reconstruction_loss(x, x, 5, 0.375).tolist() == pytest.approx([0.0] * 3, abs=1e-5)
    shifted = (x + 0.2).clamp(-1, 1)
    mae = (x - shifted).abs().flatten(1).mean(1) / 2                    # data range 2
    only_mae = reconstruction_loss(x, shifted, 5, 0.375, msssim_weight=0.0)
    assert only_mae.tolist() == pytest.approx(mae.tolist(), rel=1e-6)
    noisy = reconstruction_loss(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1), 5, 0.375)
    assert bool((noisy > reconstruction_loss(x, shifted, 5, 0.375)).all())
    # a brightness shift keeps the structure: MS-SSIM (on [0, 1]) barely moves, whatever the tile's signed mean
    assert bool((reconstruction_loss(x, shifted, 5, 0.375, msssim_weight=1.0) < 0.01).all())
    patches = torch.rand(2, 3, 32, 32) * 2 - 1
    assert reconstruction_loss(patches, patches, 4, 0.375).tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    # scales that do not fit the image are a config error, not a torchmetrics traceback
    with pytest.raises(ConfigError, match="local_msssim_scales: 5 scales of 32 px"):
        Config.from_dict({"detector": "igd", "igd": {"local_msssim_scales": 5}})
    with pytest.raises(ConfigError, match="msssim_scales: .* window of sigma 1.5"):
        Config.from_dict({"detector": "igd", "igd": {"msssim_sigma": 1.5}})
    with pytest.raises(ConfigError, match="tile the 64 px tile evenly"):
        Config.from_dict({"detector": "igd", "igd": {"local_stride_px": 24}})


def test_the_e_step_follows_the_official_order_and_only_runs_on_its_steps(scored_setting):
    config = Config.from_dict(TINY)
    torch.manual_seed(0)
    detector = build(config, "cpu")
    pool = TilePool(discover_sources([scored_setting["normal_store"]], "10x", 64), 512, seed=3)
    tiles = torch.from_numpy(pool.sample(48)).permute(0, 3, 1, 2).float() / 127.5 - 1

    def codes(scale):
        model = detector.models[scale]
        with torch.no_grad():
            return model.projection(detector.embed(detector._inputs(scale, tiles)))

    detector.before_step(pool, 0)                                      # first: c, then sigma2 around the new c
    for scale, per_batch in (("global", 8), ("local", 8 * 9)):
        c = estimate_center(codes(scale))
        assert torch.allclose(detector.models[scale].center, c, atol=1e-6)
        assert float(detector.models[scale].sigma2) == pytest.approx(float(estimate_sigma2(codes(scale), c, per_batch)))
    old = detector.models["global"].center.clone() + 0.5
    detector.models["global"].center.copy_(old)
    with torch.no_grad():
        detector.models["global"].projection.weight.mul_(3.0)           # the codes move, as training moves them
    detector.before_step(pool, 2)                                      # not an E-step: nothing changes
    assert torch.equal(detector.models["global"].center, old)
    detector.before_step(pool, 3)                                      # later: sigma2 around the old c, then c
    # float32 sums in another order (CI once: 18.650484 vs 18.650505, 1.1e-6 relative): a float32 tolerance
    assert float(detector.models["global"].sigma2) == pytest.approx(float(estimate_sigma2(codes("global"), old, 8)),
                                                                    rel=1e-5)
    assert torch.allclose(detector.models["global"].center, estimate_center(codes("global")), atol=1e-6)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_steps_move_every_network_and_a_resumed_run_ends_with_identical_weights(scored_setting, tmp_path):
    config = Config.from_dict(TINY)
    torch.manual_seed(config.train.seed)                               # as the loop builds it
    initial = build(config, "cpu")
    before = {f"{scale}.{part}": _weights(getattr(initial.models[scale], part))
              for scale in ("global", "local") for part in ("projection", "decoder")}
    before.update({f"{scale}.critic": _weights(initial.critics[scale]) for scale in ("global", "local")})
    stores = [scored_setting["normal_store"]]

    stopped = train(stores, tmp_path / "resumed.pt", config, stop_after=2, **QUIET)
    assert (stopped.iterations, stopped.complete) == (2, False)
    mid = load_checkpoint(tmp_path / "resumed.pt")
    for name, weights in before.items():
        scale, part = name.split(".")
        moved = mid["training_state"]["critics"][scale] if part == "critic" else {
            k[len(part) + 1:]: v for k, v in mid["state"][scale].items() if k.startswith(part + ".")}
        changed = [k for k, v in weights.items() if not torch.equal(v, moved[k])]
        assert changed, f"{name}: no weight changed in 2 steps"
    for scale in ("global", "local"):                                   # the checkpoint holds c and sigma2
        assert mid["state"][scale]["center"].shape == (16,) and float(mid["state"][scale]["sigma2"]) >= 1.0
    assert mid["contamination"] is None

    resumed = train(stores, tmp_path / "resumed.pt", config, **QUIET)   # resumes at 2: an E-step falls at 3
    straight = train(stores, tmp_path / "straight.pt", config, **QUIET)
    assert resumed.complete and resumed.resumed_from == 2 and straight.iterations == 6
    a, b = load_checkpoint(tmp_path / "resumed.pt")["state"], load_checkpoint(tmp_path / "straight.pt")["state"]
    for scale in ("global", "local"):
        for key in a[scale]:
            assert torch.equal(a[scale][key], b[scale][key]), f"{scale}.{key} differs after resume"
    assert resumed.model_id == straight.model_id and resumed.model_id.startswith("igd-")
    assert not torch.equal(a["global"]["center"], mid["state"]["global"]["center"])    # re-estimated at step 3

    with open(loss_paths(tmp_path / "straight.pt")[0]) as f:
        rows = list(csv.DictReader(f))
    assert {"loss", "lr", *(f"{s}_{k}" for s in ("global", "local") for k in ("rec_loss", "gac_loss", "inter_loss",
                                                                              "critic_loss", "sigma2"))} <= set(rows[0])
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"]) == pytest.approx(0.001)            # polynomial decay


def test_contamination_mixes_known_tumour_tiles_and_is_recorded(scored_setting, tmp_path):
    stores = [scored_setting["normal_store"]]
    tumour = [scored_setting["tumor_store"]]
    annotations = scored_setting["tumor_xml"].parent
    config = Config.from_dict({**TINY, "igd": {**TINY["igd"], "iterations": 2}, "data": {**TINY["data"], "contaminate": 0.1}})
    normal_tiles = sum(len(s) for s in discover_sources(stores, "10x", 64))
    result = train(stores, tmp_path / "c.pt", config, contaminate_from=tumour, annotations=annotations, **QUIET)
    record = load_checkpoint(result.checkpoint)["contamination"]
    assert result.contamination == record                              # train() returns what it wrote
    assert record["fraction"] == 0.1 and record["normal_tiles"] == normal_tiles
    assert record["tumor_tiles"] == round(0.1 * normal_tiles / 0.9)
    assert record["obtained_fraction"] == pytest.approx(0.1, abs=0.01)
    assert record["sources"][0]["slide_id"] == "tumor_103" and record["sources"][0]["used"] == record["tumor_tiles"]
    assert record["available_tumor_tiles"] == record["sources"][0]["tumor_tiles"] > record["tumor_tiles"]
    # the contamination is part of what a checkpoint computes: another fraction is another model
    other = Config.from_dict({**config.to_dict(), "data": {**config.to_dict()["data"], "contaminate": 0.05}})
    with pytest.raises(CheckpointError, match="differs in data.contaminate"):
        train(stores, tmp_path / "c.pt", other, contaminate_from=tumour, annotations=annotations, **QUIET)
    # a store named twice (by two spellings of its path) is one source: the same draw as once
    twice = [*tumour, scored_setting["tumor_store"].parent / ".." / "stores" / "tumor_103.zarr"]
    again = train(stores, tmp_path / "c2.pt", config, contaminate_from=twice, annotations=annotations, **QUIET)
    assert load_checkpoint(again.checkpoint)["contamination"] == record and again.model_id == result.model_id
    # a model trained without contamination keeps the id it had before the key existed
    assert "contaminate" not in training_identity(Config.from_dict(TINY))["data"]

    # tumour tile images: every file counts; the command line records the same
    images = tmp_path / "tumour_tiles"
    images.mkdir()
    from PIL import Image

    tiles = SlideStore.open(scored_setting["tumor_store"]).require("tiles")["10x"]
    for i in range(3):
        Image.fromarray(np.asarray(tiles[i])).save(images / f"t{i}.png")
    with pytest.raises(DataError, match=r"needs \d+ tumour tiles; only 3 are available"):
        train(stores, tmp_path / "i.pt", config, contaminate_from=[images], **QUIET)
    small = Config.from_dict({**config.to_dict(), "data": {**config.to_dict()["data"], "contaminate": 0.01}})
    assert train(stores, tmp_path / "i.pt", small, contaminate_from=[images], **QUIET).complete
    assert load_checkpoint(tmp_path / "i.pt")["contamination"]["sources"][-1]["images"] == 3
    stopped = train(stores, tmp_path / "r.pt", small, contaminate_from=[images], stop_after=1, **QUIET)
    assert not stopped.complete                                         # resuming with other tumour tiles is refused
    with pytest.raises(CheckpointError, match="other contamination tiles"):
        train(stores, tmp_path / "r.pt", small, contaminate_from=tumour, annotations=annotations, **QUIET)
    anomalib = tmp_path / "dataset"
    shutil.copytree(images, anomalib / "train" / "good")               # an anomalib root holds normal tiles too
    with pytest.raises(DataError, match="anomalib 'good' folder"):
        train(stores, tmp_path / "x.pt", small, contaminate_from=[anomalib], **QUIET)
    with pytest.raises(DataError, match="--annotations DIR"):
        train(stores, tmp_path / "x.pt", config, contaminate_from=tumour, **QUIET)
    with pytest.raises(DataError, match="needs tumour tiles"):
        train(stores, tmp_path / "x.pt", config, **QUIET)
    with pytest.raises(DataError, match="fraction is 0"):
        train(stores, tmp_path / "x.pt", Config.from_dict(TINY), contaminate_from=tumour, **QUIET)
    with pytest.raises(DataError, match="fraction is 0"):
        train(stores, tmp_path / "x.pt", Config.from_dict(TINY), annotations=annotations, **QUIET)


def test_an_igd_checkpoint_goes_through_train_and_score_commands_with_maps(scored_setting, tmp_path, capsys):
    import yaml

    config = tmp_path / "igd.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "checkpoint_every": 100}}))
    model = tmp_path / "igd.pt"
    assert main(["train", str(scored_setting["normal_store"]), "--out", str(model), "--config", str(config),
                 "--set", "igd.iterations=3", "--contaminate", "0.05", "--contaminate-from",
                 str(scored_setting["tumor_store"]), "--annotations", str(scored_setting["tumor_xml"].parent)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["contamination"]["fraction"] == 0.05 and summary["contamination"]["tumor_tiles"] >= 1
    stores = tmp_path / "stores"
    shutil.copytree(scored_setting["stores_dir"], stores)
    assert main(["score", str(stores), "--model", str(model), "--device", "cpu", "--pixel-maps"]) == 0
    scorer = load_scorer(model)
    assert scorer.model_id.startswith("igd-") and scorer.units.startswith("IGD score")
    for name in ("normal_102", "tumor_103"):
        store = SlideStore.open(stores / f"{name}.zarr")
        np.testing.assert_allclose(load_scores(store, scorer.model_id), score_store(store, scorer), rtol=1e-5)
        assert (stores / "overlays" / f"{name}.png").exists()

    detector = scorer.detector                                          # the checkpoint's IGD, in eval mode
    x = torch.from_numpy(np.asarray(SlideStore.open(stores / "tumor_103.zarr").require("tiles")["10x"][:4]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        scores, maps = detector.score_batch(x, pixel_maps=True)
    assert maps.shape == (4, 4, 4) and detector.map_shape == (4, 4)        # 16 px cells: the local stride
    assert torch.allclose(maps.flatten(1).amax(1), scores, atol=1e-6)      # the map's max is the tile score
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):      # the bf16 scoring path (CUDA's default)
        low, _ = detector.score_batch(x)
    assert low.dtype == torch.float32 and torch.allclose(low, scores, atol=0.02)

    # the anomalib-layout tile benchmark takes the checkpoint as any other
    from PIL import Image

    tiles = np.asarray(SlideStore.open(stores / "normal_102.zarr").require("tiles")["10x"][:16])
    for split, part in (("test/good", tiles[:8]), ("test/tinted", tiles[8:].copy())):
        (tmp_path / "tiles" / split).mkdir(parents=True)
        if split == "test/tinted":
            part[..., 1] = 255
        for i, tile in enumerate(part):
            Image.fromarray(tile).save(tmp_path / "tiles" / split / f"{i}.png")
    assert main(["evaluate", "tiles", str(tmp_path / "tiles"), "--model", str(model), "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model_id"] == scorer.model_id and 0.0 <= results["splits"]["test"]["auc"] <= 1.0


def test_a_resnet18_encoder_from_a_named_weight_file(scored_setting, tmp_path):
    from torchvision.models import resnet18

    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    config = Config.from_dict({**TINY, "igd": {**TINY["igd"], "backbone": "resnet18", "iterations": 1}})
    config.set_backbone_weights(weights)
    result = train([scored_setting["normal_store"]], tmp_path / "r.pt", config, **QUIET)
    assert result.complete
    assert build(config).backbone.dim == 512
    config.set_backbone_weights(tmp_path / "missing.pth")
    with pytest.raises(BackboneError, match="resnet18 weights file not found"):
        build(config)


def test_tune_parameters_are_declared_by_igd():
    from wsi_ad.tuning import apply_params, load_space

    section = Config.from_dict({"detector": "igd"}).to_dict()["igd"]
    changed = IGD.apply_search_params(section, {name: section[key] for name, key in IGD.search_parameters.items()})
    assert changed == section                                          # every declared parameter is a key of the section
    space = load_space(None, detector="igd")
    candidates = space.candidates()
    assert len(candidates) == 4
    for params in candidates:
        config = apply_params(Config.from_dict({"detector": "igd"}), params)
        assert config.section.latent_dim == params["latent_dim"] and config.data.magnification == params["magnification"]
