"""The DPA building blocks: the shallow autoencoder, progressive fade-in, relative perceptual L1 and its
ImageNet statistics, backbones, config, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_ad.config import Config, ConfigError
from wsi_ad.detectors.checkpoint import load_checkpoint, model_id, save_checkpoint
from wsi_ad.detectors.dpa.networks import AutoencoderConfig
from wsi_ad.detectors.dpa.schedule import loss_sizes, phase_loss, progressive_phases
from wsi_ad.detectors.dpa.shallow import ShallowAutoencoder
from wsi_ad.features.backbones import BackboneError, backbone_spec, build_backbone, build_multilayer, list_backbones
from wsi_ad.features.perceptual import PerceptualLoss, feature_stats, imagenet_feature_stats, relative_l1

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", (16, 32, 64))


def test_relative_l1_is_mean_abs_difference_over_mean_abs_target_per_sample():
    target = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])  # (2, 1, 2, 2)
    recon = torch.tensor([[[[0.0, -2.0], [1.0, -4.0]]], [[[0.5, 1.5], [0.5, 0.5]]]], requires_grad=True)
    value = relative_l1(target, recon)
    # sample 0: mean|diff| = (1 + 0 + 2 + 0) / 4 = 0.75, mean|target| = 10 / 4 = 2.5 -> 0.3
    # sample 1: mean|diff| = 1 / 4 = 0.25, mean|target| = 0.5 -> 0.5
    torch.testing.assert_close(value, torch.tensor([0.3, 0.5]))
    # the denominator is detached: the gradient is sign(recon - target) / (numel * mean|target|) only
    target.requires_grad_(True)
    relative_l1(target, recon).sum().backward()
    torch.testing.assert_close(target.grad[0, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]) / (4 * 2.5))


def test_perceptual_loss_standardizes_features_per_channel(lite0):
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    mean, std = feature_stats(lite0, x, 64, batch_size=3)
    assert mean.shape == std.shape == (40,)
    loss = PerceptualLoss(lite0, {64: (mean, std)})
    f = loss.features(x)
    torch.testing.assert_close(f.mean(dim=(0, 2, 3)), torch.zeros(40), atol=1e-4, rtol=0)
    torch.testing.assert_close(f.std(dim=(0, 2, 3), unbiased=False), torch.ones(40), atol=1e-3, rtol=0)
    assert torch.all(loss(x, x) == 0)
    assert torch.all(loss(x, x.flip(-1)) > 0)


def test_autoencoder_shapes_and_camelyon_bottleneck():
    model = ShallowAutoencoder(AutoencoderConfig())
    assert model.sizes == (16, 32, 64)
    for size in (16, 32, 64):
        x = torch.rand(2, 3, size, size) * 2 - 1
        assert model.encode(x).shape == (2, 4, 8, 8)
        assert model(x).shape == x.shape
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d, torch.nn.GroupNorm))
                   for m in model.modules())
    with pytest.raises(ValueError, match="channels needs 4 widths"):
        AutoencoderConfig(channels=(4, 4, 4))


def test_alpha_zero_is_the_previous_resolution_and_alpha_one_the_new():
    torch.manual_seed(0)
    model = ShallowAutoencoder(AutoencoderConfig(channels=(4, 6, 8, 8)))
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    old = F.interpolate(model(F.avg_pool2d(x, 2), 32, 1.0), scale_factor=2, mode="nearest")
    torch.testing.assert_close(model(x, 64, 0.0), old)
    new = model(x, 64, 1.0)
    with torch.no_grad():  # at alpha = 1 the 32 px input/output layers play no part
        for p in [*model.from_rgb["32"].parameters(), *model.to_rgb["32"].parameters()]:
            p.add_(1.0)
    torch.testing.assert_close(model(x, 64, 1.0), new)
    mid = model(x, 64, 0.5)
    assert not torch.allclose(mid, new) and not torch.allclose(mid, model(x, 64, 0.0))


def test_phase_loss_at_alpha_zero_is_the_previous_phase_loss_on_halved_images(lite0):
    torch.manual_seed(1)
    model = ShallowAutoencoder()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    stats = {s: feature_stats(lite0, F.avg_pool2d(x, 64 // s), s) for s in (16, 32, 64)}
    loss = PerceptualLoss(lite0, stats)
    for resize in ("area", "bilinear"):   # by 2, bilinear resizing (the official code's) is 2 x 2 averaging
        torch.testing.assert_close(phase_loss(model, loss, x, 64, 0.0, resize),
                                   phase_loss(model, loss, F.avg_pool2d(x, 2), 32, 1.0, resize))
    torch.testing.assert_close(phase_loss(model, loss, x, 32, 0.0, "area"), phase_loss(model, loss, x, 16, 1.0, "area"))
    full = loss(x, model(x, 64, 1.0))
    torch.testing.assert_close(phase_loss(model, loss, x, 64, 1.0), full)
    # by 4 they differ: bilinear (align_corners=False, no anti-aliasing) averages the two middle pixels only
    bilinear = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear, F.avg_pool2d(x[:, :, 1:-1, 1:-1], 2, stride=4, padding=0))


def test_progressive_schedule_matches_the_paper():
    paper = Config().section
    phases = progressive_phases(paper.iterations, 16, 64)
    assert [(p.name, p.iterations) for p in phases] == [
        ("stab16", 20000), ("trns32", 20000), ("stab32", 20000), ("trns64", 20000), ("stab64", 8666)]
    assert paper.flat_iterations == 34666                       # the official wo_pg schedule
    trns = phases[1]
    # alpha rises from 1/N to 1, incremented before each step (the official code)
    assert trns.alpha(0) == 1 / 20000 and trns.alpha(9999) == 0.5 and trns.alpha(19999) == 1
    assert phases[0].alpha(5) == 1
    assert loss_sizes(phases) == (16, 32, 64)
    with pytest.raises(ValueError, match="lacks phase"):
        progressive_phases({"stab16": 1}, 16, 64)


def test_config_files_load_and_the_paper_config_is_the_default(tmp_path):
    paper = Config.from_yaml(REPO_ROOT / "configs" / "camelyon16_paper.yaml")
    assert paper == Config() and paper.detector == "dpa"
    assert (paper.section.architecture, paper.section.feature_stats, paper.train.amp) == ("residual18", "imagenet", False)
    demo = Config.from_yaml(REPO_ROOT / "configs" / "demo_cpu.yaml")
    assert demo.section.backbone == "efficientnet_lite0" and demo.section.layers == {64: "block7"}
    assert demo.section.architecture == "shallow" and demo.section.feature_stats == "train"
    assert Config.from_dict({"dpa": {"layers": {"64": "relu3_2"}}}).section.layers == {64: "relu3_2"}
    assert Config.from_dict(Config().to_dict()) == Config()
    with pytest.raises(ConfigError, match="layers key: expected a number"):
        Config.from_dict({"dpa": {"layers": {"big": "block7"}}})
    with pytest.raises(ConfigError, match="not layers of vgg19"):
        Config.from_dict({"dpa": {"layers": {64: "block7"}}})
    with pytest.raises(ConfigError, match="no shipped|ImageNet statistics"):   # none ship for efficientnet_lite0
        Config.from_dict({"dpa": {"backbone": "efficientnet_lite0"}})
    with pytest.raises(ConfigError, match="unknown detector 'nope'; registered: .*dpa"):
        Config.from_dict({"detector": "nope"})
    with pytest.raises(ConfigError, match="unknown config section.*'model'"):
        Config.from_dict({"detector": "dpa", "model": {}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batch_sise: 3}\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        Config.from_yaml(bad)


def test_configs_written_before_the_detector_interface_read_as_the_shallow_dpa():
    old = {"model": {"image_size": 32, "latent_size": 8, "latent_channels": 4, "channels": [8, 8, 8]},
           "backbone": {"name": "efficientnet_lite0", "weights": "/w.pth", "download": False, "layers": {"32": "block4"}},
           "data": {"magnification": "10x", "stats_tiles": 64},
           "train": {"progressive": True, "iterations": {"stab16": 2, "trns32": 1, "stab32": 1}, "flat_iterations": None,
                     "lr": 0.003, "batch_size": 8}}
    config = Config.from_dict(old)
    s = config.section
    assert config.detector == "dpa" and (s.architecture, s.feature_stats) == ("shallow", "train")
    assert (s.image_size, s.channels, s.backbone, s.layers, s.backbone_weights) == (32, [8, 8, 8], "efficientnet_lite0",
                                                                                     {32: "block4"}, "/w.pth")
    assert (s.stats_tiles, s.lr, s.progressive, s.flat_iterations) == (64, 0.003, True, 4)  # None meant the sum
    assert config.train.batch_size == 8 and config.train.amp is True          # the old default


def test_imagenet_feature_statistics_of_the_official_code_ship_for_vgg19():
    mean, std = imagenet_feature_stats("vgg19", "relu4_2")
    assert mean.shape == std.shape == (512,) and mean.dtype == torch.float32
    assert abs(float(mean.mean()) - 1.07) < 0.01 and abs(float(std.mean()) - 3.32) < 0.01   # METHODS.md §2.3
    assert torch.all(std > 0) and torch.all(mean >= 0)                      # ReLU outputs
    assert imagenet_feature_stats("vgg19", "relu3_2")[0].shape == (256,)
    with pytest.raises(BackboneError, match="only for vgg19"):
        imagenet_feature_stats("efficientnet_lite0", "block4")
    with pytest.raises(BackboneError, match="layer 'relu9_9'"):
        imagenet_feature_stats("vgg19", "relu9_9")


def test_efficientnet_lite0_imagenet_weights_classify_a_cat():
    from skimage.data import chelsea

    spec = backbone_spec("efficientnet_lite0")
    model = spec.architecture()
    model.load_state_dict(spec.convert(torch.load(
        build_backbone.__globals__["resolve_weights"](spec), map_location="cpu", weights_only=True)))
    model.eval()
    img = chelsea()
    h, w, _ = img.shape
    side = min(h, w)
    img = img[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    size = spec.preprocess.input_size
    img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    x = (x - torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(spec.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    assert 281 <= int(probs.argmax()) <= 285          # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert float(probs[281:286].sum()) > 0.8


def test_backbone_registry_layers_and_frozen_weights(lite0):
    assert set(list_backbones()) >= {"vgg19", "efficientnet_lite0"}
    assert backbone_spec("vgg19").layer_for(32) == "relu3_2" and backbone_spec("vgg19").layer_for(64) == "relu4_2"
    shapes = {s: tuple(lite0(torch.zeros(1, 3, s, s), s).shape) for s in (16, 32, 64)}
    assert shapes == {16: (1, 24, 4, 4), 32: (1, 24, 8, 8), 64: (1, 40, 8, 8)}
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training
    vgg = build_backbone("vgg19", (32, 64), pretrained=False)   # random weights: architecture only
    assert tuple(vgg(torch.zeros(1, 3, 32, 32), 32).shape) == (1, 256, 8, 8)
    assert tuple(vgg(torch.zeros(1, 3, 64, 64), 64).shape) == (1, 512, 8, 8)
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone("resnet9000")
    # a config may choose other feature layers per input size
    deep = build_backbone("efficientnet_lite0", (32, 64), layers={64: "block7"})
    assert tuple(deep(torch.zeros(1, 3, 64, 64), 64).shape) == (1, 80, 4, 4)
    assert tuple(deep(torch.zeros(1, 3, 32, 32), 32).shape) == (1, 24, 8, 8)  # other sizes keep the registry's
    with pytest.raises(BackboneError, match="unknown efficientnet_lite0 feature layer.*relu4_2"):
        build_backbone("efficientnet_lite0", (64,), layers={64: "relu4_2"})
    # several layers from one pass read the same maps as one truncated network each
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    both = build_multilayer("efficientnet_lite0", ("block4", "block2"))(x)
    assert list(both) == ["block4", "block2"] and torch.equal(both["block4"], lite0(x, 64))
    assert torch.equal(both["block2"], lite0(x, 32)) and tuple(both["block2"].shape) == (2, 24, 16, 16)
    with pytest.raises(BackboneError, match="unknown resnet18 feature layer.*block2"):
        build_multilayer("resnet18", ("block2",), pretrained=False)


def test_vgg19_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(BackboneError, match=r"vgg19-dcbb9e9d\.pth.*--backbone-weights.*--download-weights"):
        build_backbone("vgg19")
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("vgg19", weights=tmp_path / "missing.pth")


def test_checkpoint_roundtrip_and_model_id(tmp_path):
    model = ShallowAutoencoder()
    payload = {"detector": "dpa", "config": Config().to_dict(),
               "state": {"autoencoder": model.state_dict(),
                         "feature_stats": {"64": {"mean": torch.zeros(3), "std": torch.ones(3)}}},
               "training_state": None, "iteration": 5, "complete": False, "history": {"loss": [1.0]}}
    path = save_checkpoint(tmp_path / "m.pt", payload)
    loaded = load_checkpoint(path)
    assert loaded["iteration"] == 5 and loaded["format"] == 2 and model_id(loaded) == model_id(payload)
    assert model_id(payload).startswith("dpa-") and len(model_id(payload)) == len("dpa-") + 12
    # runtime-only settings (where the backbone weights come from) do not change the id
    payload["config"]["dpa"]["backbone_weights"] = "/elsewhere/vgg19.pth"
    assert model_id(payload) == model_id(loaded)
    payload["state"]["autoencoder"] = {k: v + 1 for k, v in payload["state"]["autoencoder"].items()}
    assert model_id(payload) != model_id(loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]    # no temporary left behind
