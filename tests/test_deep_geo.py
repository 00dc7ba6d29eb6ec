"""Deep GEO (issue 17, ``deep_geo``): the 72 transformations against SciPy's reflect-filled affine shift (the Keras
routine of the official code) in the official order, the Dirichlet MLE on a known answer, the WRN's layers, and real
training steps that resume with identical weights and Dirichlets, scored through ``wsi-ad score``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage

import wsi_ad.detectors.deep_geo  # noqa: F401 - registers deep_geo
from pipelines.cli import main
from wsi_ad.config import Config, ConfigError
from wsi_ad.detectors import build
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.detectors.deep_geo.dirichlet import dirichlet_log_likelihood, fit_dirichlet, inverse_digamma
from wsi_ad.detectors.deep_geo.networks import WideResNet
from wsi_ad.detectors.deep_geo.transforms import all_transforms, apply_transforms, index_maps, transform_parameters
from wsi_ad.detectors.loop import train
from wsi_ad.detectors.scorer import load_scorer
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore
from wsi_ad.tile_pool import to_tensor

TINY = {"detector": "deep_geo",
        "deep_geo": {"input_px": 32, "shift_px": 8, "depth": 10, "widen": 1, "iterations": 4, "dirichlet_tiles": 12},
        "data": {"buffer_tiles": 512, "flips": False},
        "train": {"batch_size": 8, "checkpoint_every": 2, "log_every": 1, "seed": 5}}
QUIET = {"progress": False, "echo": lambda *a: None}


def _official(image: np.ndarray, flip: bool, tx: int, ty: int, k: int) -> np.ndarray:
    """The official transformation of an (H, W, C) image: NumPy's fliplr, Keras' affine shift (SciPy's
    affine_transform, order 1, reflect fill, offset (tx, ty) on (row, column)), NumPy's rot90."""
    out = np.fliplr(image) if flip else image
    if tx or ty:
        out = np.stack([ndimage.affine_transform(out[..., c], np.eye(2), offset=(tx, ty), order=1, mode="reflect")
                        for c in range(out.shape[-1])], axis=-1)
    return np.rot90(out, k)


def test_the_72_transformations_are_the_official_ones_in_the_official_order():
    params = transform_parameters(16)
    assert len(params) == 72 and len(set(params)) == 72
    assert params[:5] == [(False, 0, 0, 0), (False, 0, 0, 1), (False, 0, 0, 2), (False, 0, 0, 3), (False, 0, -16, 0)]
    assert params[12] == (False, -16, 0, 0) and params[36] == (True, 0, 0, 0) and params[71] == (True, 16, 16, 3)
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    maps = torch.from_numpy(index_maps(64, 16))
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    every = all_transforms(x, maps)
    assert every.shape == (72, 3, 64, 64)
    for i, p in enumerate(params):
        assert np.array_equal(every[i].permute(1, 2, 0).numpy(), _official(image, *p)), p
    flat = every.flatten(1).numpy()
    assert len({row.tobytes() for row in flat}) == 72                            # 72 distinct images
    # flips and rotations are permutations, undone by their inverse; shifts keep the 48 px they move intact
    for i in (1, 2, 3, 36, 37, 39):
        flip, _, _, k = params[i]
        back = np.rot90(every[i].permute(1, 2, 0).numpy(), -k)
        assert np.array_equal(np.fliplr(back) if flip else back, image)
    shifted = every[params.index((False, 16, -16, 0))].permute(1, 2, 0).numpy()
    assert np.array_equal(shifted[:48, 16:], image[16:, :48])
    assert np.array_equal(shifted[48:, 16:], image[63:47:-1, :48])                # reflected: d c b a | a b c d
    # the order matters: rotating before the shift gives another image for the same parameters
    rotated_first = _official(np.rot90(image, 1), False, 16, 0, 0)
    assert not np.array_equal(rotated_first, _official(image, False, 16, 0, 1))
    with pytest.raises(ValueError, match="shift_px"):
        index_maps(32, 32)
    # batched: each image its own transformation
    batch = torch.rand(5, 3, 32, 32)
    which = torch.tensor([0, 71, 5, 40, 13])
    out = apply_transforms(batch, torch.from_numpy(index_maps(32, 8)), which)
    for b, i in enumerate(which.tolist()):
        ref = _official(batch[b].permute(1, 2, 0).numpy(), *transform_parameters(8)[i])
        assert np.array_equal(out[b].permute(1, 2, 0).numpy(), ref)


def test_the_dirichlet_fit_recovers_a_known_alpha():
    y = np.linspace(-8.0, 5.0, 27)
    from scipy.special import psi

    np.testing.assert_allclose(psi(inverse_digamma(y)), y, atol=1e-10)
    alpha = np.array([30.0, 2.0, 0.5, 0.5, 1.0, 5.0])
    samples = np.random.default_rng(3).dirichlet(alpha, size=40000)
    mean, mean_log = samples.mean(0), np.log(samples).mean(0)
    fitted = fit_dirichlet(mean, mean_log)
    np.testing.assert_allclose(fitted, alpha, rtol=0.04)
    best = dirichlet_log_likelihood(fitted, mean_log)          # the maximum: every nudge lowers the likelihood
    for i in range(len(alpha)):
        for factor in (0.99, 1.01):
            nudged = fitted.copy()
            nudged[i] *= factor
            assert dirichlet_log_likelihood(nudged, mean_log) < best


def test_the_wide_resnets_layers_and_config_errors():
    net = WideResNet(16, 8, 72, 64)                                      # the paper's WRN-16-8 on 64 px tiles
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs if c.kernel_size == (3, 3)] == [16] + [128] * 4 + [256] * 4 + [512] * 4
    assert all(c.bias is None for c in convs) and net.fc.in_features == 2048
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 72)
    bn = net.bn
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)
    std = float(net.groups[1].conv1.weight.detach().std())                        # He normal: sqrt(2 / (3 * 3 * 128))
    assert abs(std - (2 / (9 * 128)) ** 0.5) < 0.002
    assert WideResNet(10, 1, 72, 32).fc.in_features == 64
    with pytest.raises(ConfigError, match="data.flips and data.rot90 must be false"):
        build(Config.from_dict({**TINY, "data": {"flips": True}}), "cpu")
    with pytest.raises(ConfigError, match="depth must be 6 n"):
        Config.from_dict({"detector": "deep_geo", "deep_geo": {"depth": 12}})
    with pytest.raises(ConfigError, match="shift_px must be in"):
        Config.from_dict({"detector": "deep_geo", "deep_geo": {"input_px": 32, "shift_px": 32}})
    with pytest.raises(ConfigError, match="score must be one of"):
        Config.from_dict({"detector": "deep_geo", "deep_geo": {"score": "max"}})


def test_training_resumes_with_identical_weights_and_dirichlets_and_scores_a_store(scored_setting, tmp_path):
    config = Config.from_dict(TINY)
    stores = [scored_setting["normal_store"]]
    torch.manual_seed(config.train.seed)
    before = {k: v.clone() for k, v in build(config, "cpu").net.state_dict().items()}
    stopped = train(stores, tmp_path / "resumed.pt", config, stop_after=2, **QUIET)
    assert not stopped.complete
    mid = load_checkpoint(tmp_path / "resumed.pt")
    assert "alpha" not in mid["state"]                                   # fitted only after the last step
    assert any(not torch.equal(before[k], mid["state"]["net"][k]) for k in before if k.endswith("weight"))
    resumed = train(stores, tmp_path / "resumed.pt", config, **QUIET)
    straight = train(stores, tmp_path / "straight.pt", config, **QUIET)
    assert resumed.resumed_from == 2 and resumed.model_id == straight.model_id
    assert resumed.model_id.startswith("deep_geo-")
    state = load_checkpoint(straight.checkpoint)["state"]                 # torch.load(weights_only=True)
    alpha = state["alpha"]
    assert alpha.shape == (72, 72) and alpha.dtype == torch.float64 and bool((alpha > 0).all())

    # the score is the official normality with the checkpoint's Dirichlets, from the network's softmax outputs
    scorer = load_scorer(straight.checkpoint, device="cpu")
    store_tiles = np.asarray(SlideStore.open(scored_setting["tumor_store"]).require("tiles")["10x"][:6])
    net = scorer.detector.net
    with torch.no_grad():
        small = torch.nn.functional.interpolate(to_tensor(store_tiles), size=(32, 32), mode="bilinear", antialias=True)
        copies = all_transforms(small, torch.from_numpy(index_maps(32, 8)))
        p = torch.softmax(net(copies), dim=1).double().view(6, 72, 72).numpy()
    expected = -np.einsum("tk,btk->b", alpha.numpy() - 1.0, np.log(p + 1e-6)) / 72
    np.testing.assert_allclose(scorer.score(store_tiles), expected, rtol=1e-4)

    copy = tmp_path / "stores"                            # one store: 72 forward passes a tile
    shutil.copytree(scored_setting["tumor_store"], copy / "tumor_103.zarr")
    assert main(["score", str(copy), "--model", str(straight.checkpoint), "--device", "cpu"]) == 0
    stored = load_scores(SlideStore.open(copy / "tumor_103.zarr"), scorer.model_id)
    assert stored.shape == (SlideStore.open(copy / "tumor_103.zarr").require("tiles")["10x"].shape[0],)
    np.testing.assert_allclose(stored[:6], expected, rtol=1e-4)

    simple = Config.from_dict({**TINY, "deep_geo": {**TINY["deep_geo"], "score": "log_probability", "iterations": 1}})
    model = train(stores, tmp_path / "simple.pt", simple, **QUIET)
    assert "alpha" not in load_checkpoint(model.checkpoint)["state"]
    scores = load_scorer(model.checkpoint, device="cpu").score(store_tiles)
    assert scores.shape == (6,) and np.isfinite(scores).all() and (scores > 0).all()   # -mean log p > 0
