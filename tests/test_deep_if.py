"""Deep IF (issue 17, ``deep_if``): the forest in tensor form scores as scikit-learn's ``-score_samples`` on the same
features (the known answer), a fit on a real store that repeats and resumes, and its checkpoint through ``wsi-ad
score`` (no per-pixel maps)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from sklearn.ensemble import IsolationForest

import wsi_ad.detectors.deep_if  # noqa: F401 - registers deep_if
from pipelines.cli import main
from wsi_ad.config import Config, ConfigError
from wsi_ad.detectors import build
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.detectors.deep_if.config import DeepIFConfig
from wsi_ad.detectors.deep_if.forest import ForestScorer, forest_state, node_depths
from wsi_ad.detectors.loop import train
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore
from wsi_ad.tile_pool import to_tensor

TINY = {"detector": "deep_if", "deep_if": {"input_px": 32, "n_estimators": 20},
        "data": {"buffer_tiles": 512}, "train": {"batch_size": 64, "seed": 5}}
QUIET = {"progress": False, "echo": lambda *a: None}


def test_the_tensor_forest_is_scikit_learns_score_samples():
    rng = np.random.default_rng(0)
    train_x = np.concatenate([rng.normal(size=(700, 12)), rng.normal(3.0, 0.5, size=(5, 12))]).astype(np.float32)
    train_x[:, 3] = np.round(train_x[:, 3])             # ties: values equal to thresholds' neighbours
    for kwargs in ({"random_state": 1}, {"random_state": 2, "max_samples": 2}, {"random_state": 3, "max_features": 0.5,
                                                                               "bootstrap": True}):
        forest = IsolationForest(**kwargs).fit(train_x)
        state = forest_state(forest)
        test_x = np.concatenate([train_x[:50], rng.normal(0, 2.5, size=(300, 12)).astype(np.float32)])
        ours = ForestScorer(state).score(torch.from_numpy(test_x)).numpy()
        np.testing.assert_allclose(ours, -forest.score_samples(test_x), rtol=1e-12, atol=0)
        depths = node_depths(state["children_left"].numpy(), state["children_right"].numpy())
        for i, tree in enumerate(forest.estimators_):
            assert np.array_equal(depths[i, :tree.tree_.node_count], tree.tree_.compute_node_depths())
    # the checkpointed form is plain tensors and ints: it survives torch.save / torch.load(weights_only=True)
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = ForestScorer(torch.load(buffer, weights_only=True))
    np.testing.assert_allclose(loaded.score(torch.from_numpy(test_x)).numpy(), -forest.score_samples(test_x), rtol=1e-12)
    with pytest.raises(ValueError, match="fitted on 12 features"):
        loaded.score(torch.zeros(2, 5))


def test_config_defaults_are_scikit_learns_and_bad_keys_are_named():
    s = DeepIFConfig()
    assert (s.n_estimators, s.max_samples, s.input_px, s.image_size) == (100, None, 299, 64)
    assert s.feature_layers == ["block2", "block4", "block7", "block10"]
    with pytest.raises(ConfigError, match="layers must be distinct"):
        Config.from_dict({"detector": "deep_if", "deep_if": {"layers": ["block2", "conv2d_7b"]}})
    with pytest.raises(ConfigError, match="input_px"):
        Config.from_dict({"detector": "deep_if", "deep_if": {"input_px": 16}})
    with pytest.raises(ConfigError, match="unknown backbone"):
        Config.from_dict({"detector": "deep_if", "deep_if": {"backbone": "inceptionresnetv2"}})


def test_fit_on_a_store_is_sklearns_forest_on_the_pooled_features_and_scores_through_the_cli(scored_setting, tmp_path,
                                                                                           capsys):
    config = Config.from_dict(TINY)
    stores = [scored_setting["normal_store"]]
    first = train(stores, tmp_path / "a.pt", config, **QUIET)
    assert first.complete and first.iterations == 0 and first.model_id.startswith("deep_if-")
    again = train(stores, tmp_path / "a.pt", config, **QUIET)           # complete: resuming does nothing
    assert again.resumed_from == 0 and again.model_id == first.model_id
    straight = train(stores, tmp_path / "b.pt", config, **QUIET)        # a fresh fit repeats it
    assert straight.model_id == first.model_id
    reseeded = train(stores, tmp_path / "c.pt", Config.from_dict({**TINY, "train": {**TINY["train"], "seed": 6}}), **QUIET)
    assert reseeded.model_id != first.model_id

    # the known answer on the real features: the pooled concatenation of the backbone's layers, fed to scikit-learn
    detector = build(config, "cpu")
    train_tiles = np.asarray(SlideStore.open(stores[0]).require("tiles")["10x"][:])
    with torch.no_grad():
        x = to_tensor(train_tiles[:8])
        maps = detector.backbone(torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True))
        pooled = torch.cat([maps[k].mean(dim=(2, 3)) for k in ("block2", "block4", "block7", "block10")], dim=1)
        assert torch.allclose(detector.features(x), pooled, atol=1e-6) and pooled.shape == (8, 256)
        features = torch.cat([detector.features(to_tensor(train_tiles[i:i + 64])) for i in range(0, len(train_tiles), 64)])
    forest = IsolationForest(n_estimators=20, random_state=5).fit(features.numpy())
    payload = load_checkpoint(first.checkpoint)                          # torch.load(weights_only=True)
    assert payload["state"]["forest"]["max_samples"] == min(256, len(train_tiles))
    scorer = load_scorer(first.checkpoint, device="cpu")
    store = SlideStore.open(scored_setting["tumor_store"])
    test_tiles = np.asarray(store.require("tiles")["10x"][:96])
    with torch.no_grad():
        test_features = detector.features(to_tensor(test_tiles)).numpy()
    np.testing.assert_allclose(scorer.score(test_tiles), -forest.score_samples(test_features), rtol=1e-5)

    copy = tmp_path / "stores"
    shutil.copytree(scored_setting["stores_dir"], copy)
    assert main(["score", str(copy), "--model", str(first.checkpoint), "--device", "cpu"]) == 0
    tumor = SlideStore.open(copy / "tumor_103.zarr")
    np.testing.assert_allclose(load_scores(tumor, scorer.model_id), score_store(tumor, scorer), rtol=1e-6)
    capsys.readouterr()
    assert main(["score", str(copy), "--model", str(first.checkpoint), "--device", "cpu", "--pixel-maps"]) == 1
    assert capsys.readouterr().out.count("gives no per-pixel maps (score without --pixel-maps)") == 2


def test_a_cap_on_the_training_tiles_fits_a_seeded_subset(scored_setting, tmp_path):
    capped = {**TINY, "deep_if": {**TINY["deep_if"], "fit_tiles": 40}}
    a = train([scored_setting["normal_store"]], tmp_path / "a.pt", Config.from_dict(capped), **QUIET)
    b = train([scored_setting["normal_store"]], tmp_path / "b.pt", Config.from_dict(capped), **QUIET)
    assert a.model_id == b.model_id
    forest = load_checkpoint(a.checkpoint)["state"]["forest"]
    assert forest["max_samples"] == 40 and forest["n_features"] == 256
