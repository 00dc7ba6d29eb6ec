"""The DPA ``residual18`` progressive autoencoder (wsi_ad.detectors.dpa.residual) against METHODS.md 2.1 / 3.1 / 3.3."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_ad.detectors.dpa.networks import AutoencoderConfig, build_autoencoder
from wsi_ad.detectors.dpa.residual import DownBlock, PlainBlock, Residual18Autoencoder, UpBlock

CAMELYON = AutoencoderConfig(64, 8, 4, (4, 4, 4, 4))
KAIMING_GAIN = math.sqrt(2 / (1 + 0.2**2))  # leaky_relu, a = 0.2


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Residual18Autoencoder(CAMELYON)


def _convs(modules):
    return [c for m in modules for c in m.modules() if isinstance(c, nn.Conv2d)]


@pytest.mark.parametrize(
    ("size", "transition", "expected"),
    [
        (16, False, (1592, 999)),
        (32, False, (2184, 1591)),
        (64, False, (2776, 2183)),
        # METHODS 3.1 lists 2,889 / 1,703 and 3,481 / 2,295 for the transitions: the official FadeinLayer holds
        # alpha as a one-element nn.Parameter (requires_grad=False); here alpha is a float argument, so one less.
        (32, True, (2888, 1702)),
        (64, True, (3480, 2294)),
    ],
)
def test_parameter_counts_match_methods(net, size, transition, expected):
    assert net.parameter_count(size, transition) == expected


def test_parameter_breakdown_at_64(net):
    enc, dec = net.modules_in_use(64)
    assert [sum(p.numel() for p in m.parameters()) for m in enc] == [112 + 2 * 296, 592, 592, 592, 296]
    assert [sum(p.numel() for p in m.parameters()) for m in dec] == [296, 592, 592, 592, 111]
    assert sum(p.numel() for p in net.parameters()) == 6589  # all heads (16, 32, 64) of both halves


def test_layer_structure_at_64(net):
    enc, dec = net.modules_in_use(64)
    convs = _convs(enc + dec)
    assert len(_convs(enc)) == 19 and len(_convs(dec)) == 15  # 1 + 2*2 head, 3 stages * 4, latent 2 | 2, 12, 1
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)  # no 1x1 skips
    head = net.from_rgb["64"]
    assert isinstance(head[0], nn.Conv2d) and (head[0].in_channels, head[0].out_channels) == (3, 4)
    assert [type(b) for b in head[1:]] == [PlainBlock, PlainBlock] and len(head) == 3
    stage = net.down["64"]
    assert [type(b) for b in stage] == [DownBlock, PlainBlock]
    assert isinstance(stage[0].main[0], nn.LeakyReLU) and isinstance(stage[0].main[1], nn.AvgPool2d)
    assert isinstance(stage[0].skip[0], nn.AvgPool2d)
    up = net.up["64"]
    assert [type(b) for b in up] == [UpBlock, PlainBlock]
    assert isinstance(up[0].main[1], nn.Upsample) and up[0].main[1].mode == "nearest"
    assert isinstance(net.to_rgb["64"][0], nn.LeakyReLU) and net.to_rgb["64"][0].negative_slope == 0.2
    assert isinstance(net.to_latent, PlainBlock) and isinstance(net.to_latent.skip, nn.Identity)
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.2 for a in acts)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.Tanh)) for m in net.modules())


def test_skip_conv_only_when_widths_differ():
    block = PlainBlock(4, 6)
    assert isinstance(block.skip[0], nn.Conv2d) and block.skip[0].kernel_size == (1, 1)
    down = DownBlock(4, 4)
    assert len(down.skip) == 1 and isinstance(down.skip[0], nn.AvgPool2d)
    x = torch.randn(2, 4, 8, 8)
    assert block(x).shape == (2, 6, 8, 8) and down(x).shape == (2, 4, 4, 4) and UpBlock(4, 2)(x).shape == (2, 2, 16, 16)


def test_shapes_and_argument_checks(net):
    assert net.sizes == (16, 32, 64)
    for size in net.sizes:
        x = torch.rand(2, 3, size, size) * 2 - 1
        assert net.encode(x).shape == (2, 4, 8, 8)
        assert net(x).shape == x.shape and net(x).dtype == torch.float32
    with pytest.raises(ValueError, match="size must be one of"):
        net(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no previous resolution"):
        net(torch.zeros(1, 3, 16, 16), 16, 0.5)
    assert isinstance(build_autoencoder("residual18", CAMELYON), Residual18Autoencoder)


def test_uneven_widths_and_latent_channels():
    torch.manual_seed(0)
    model = Residual18Autoencoder(AutoencoderConfig(32, 8, 3, (8, 6, 5)))
    assert model.sizes == (16, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.encode(x, 32, 0.5).shape == (2, 3, 8, 8) and model(x, 32, 0.5).shape == x.shape
    for block, (cin, cout) in [
        (model.to_latent, (5, 3)),
        (model.from_latent, (3, 5)),
        (model.down["32"][0], (8, 6)),
        (model.up["16"][0], (5, 6)),
    ]:
        skip_convs = _convs([block.skip])
        assert [(c.in_channels, c.out_channels, c.kernel_size) for c in skip_convs] == [(cin, cout, (1, 1))]
    assert isinstance(model.down["32"][1].skip, nn.Identity)


def test_alpha_one_is_the_grown_net_and_alpha_zero_the_previous_one():
    torch.manual_seed(1)
    model = Residual18Autoencoder(CAMELYON)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        new = model(x, 64, 1.0)
        torch.testing.assert_close(model(x, 64), new)
        # alpha = 0: exactly the 32 px net on the pooled image (the encoder blend is 1 * low + 0 * high)
        half = F.avg_pool2d(x, 2)
        assert torch.equal(model.encode(x, 64, 0.0), model.encode(half, 32))
        z = model.encode(x, 64, 0.0)
        assert torch.equal(model.decode(z, 64, 0.0), F.interpolate(model.decode(z, 32), scale_factor=2, mode="nearest"))
        old = F.interpolate(model(half, 32), scale_factor=2, mode="nearest")
        torch.testing.assert_close(model(x, 64, 0.0), old, rtol=0, atol=0)
        # small alpha approaches the old net continuously
        assert (model(x, 64, 1e-6) - old).abs().max() < 1e-4
        mid = model(x, 64, 0.5)
        assert not torch.allclose(mid, new) and not torch.allclose(mid, old)
        # at alpha = 1 the 32 px heads play no part
        for p in [*model.from_rgb["32"].parameters(), *model.to_rgb["32"].parameters()]:
            p.add_(1.0)
        torch.testing.assert_close(model(x, 64, 1.0), new, rtol=0, atol=0)


def test_gradients_reach_every_module_in_use():
    torch.manual_seed(2)
    model = Residual18Autoencoder(CAMELYON)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model(x, 64, 0.5).square().mean().backward()
    enc, dec = model.modules_in_use(64, transition=True)
    used = {id(p) for m in enc + dec for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in used:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name  # the 16 px heads


def test_kaiming_fan_out_init_of_4_wide_convs():
    torch.manual_seed(3)
    convs = [c for c in Residual18Autoencoder(CAMELYON).modules() if isinstance(c, nn.Conv2d)]
    weights = torch.cat([c.weight.flatten() for c in convs if c.weight.shape == (4, 4, 3, 3)])
    assert weights.numel() == 40 * 144
    expected = KAIMING_GAIN / math.sqrt(4 * 9)
    assert abs(weights.std().item() / expected - 1) < 0.05
    assert abs(weights.mean().item()) < 0.02


def test_kaiming_fan_out_init_is_normal_and_biases_default():
    torch.manual_seed(4)
    model = Residual18Autoencoder(AutoencoderConfig(64, 8, 64, (64, 64, 64, 64)))
    wide = torch.cat([c.weight.flatten() for c in model.down.modules() if isinstance(c, nn.Conv2d)])
    expected = KAIMING_GAIN / math.sqrt(64 * 9)
    assert abs(wide.std().item() / expected - 1) < 0.01
    kurtosis = ((wide - wide.mean()) ** 4).mean() / wide.var() ** 2
    assert abs(kurtosis.item() - 3) < 0.1  # normal, not uniform (1.8)
    # fan_out, not fan_in: from-RGB 3 -> 64 and to-RGB 64 -> 3 both follow out_channels * 9
    rgb_in = model.from_rgb["64"][0].weight
    rgb_out = model.to_rgb["64"][1].weight
    assert abs(rgb_in.std().item() / (KAIMING_GAIN / math.sqrt(64 * 9)) - 1) < 0.1
    assert abs(rgb_out.std().item() / (KAIMING_GAIN / math.sqrt(3 * 9)) - 1) < 0.1
    # biases: PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), untouched by the Kaiming re-init
    scaled = torch.cat([c.bias / (1 / math.sqrt(c.weight[0].numel())) for c in model.modules() if isinstance(c, nn.Conv2d)])
    assert scaled.abs().max() <= 1 and scaled.abs().max() > 0.99 and abs(scaled.std().item() - 1 / math.sqrt(3)) < 0.02
