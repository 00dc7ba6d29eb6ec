"""The feature kNN baseline (PatchCore, ``knn``): the coreset and the search on known answers, a tile equal to a bank
entry scoring exactly 0, PatchCore's re-weighting checked by hand, a fit over chunks with a bounded bank that is
deterministic in the seed, and a checkpoint through ``wsi-ad score`` with maps."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

import wsi_ad.detectors.knn  # noqa: F401 - registers knn (until it is a built-in)
from pipelines.cli import main
from wsi_ad.config import Config, ConfigError
from wsi_ad.detectors import build
from wsi_ad.detectors.checkpoint import load_checkpoint
from wsi_ad.detectors.knn import FeatureKNN, memory
from wsi_ad.detectors.knn.memory import greedy_coreset, nearest
from wsi_ad.detectors.loop import train
from wsi_ad.detectors.scorer import load_scorer, score_store
from wsi_ad.errors import WsiAdError
from wsi_ad.scoring import load_scores
from wsi_ad.store import SlideStore
from wsi_ad.tile_pool import TilePool, discover_sources, to_tensor

#: A knn fitted in seconds: 192 of the store's tiles in chunks of 64, 5% coresets, a bank capped at 300 entries (so
#: that the union of the chunks' coresets is reduced again).
TINY = {"detector": "knn", "knn": {"coreset_ratio": 0.05, "chunk_tiles": 64, "max_fit_tiles": 192, "max_bank": 300},
        "data": {"buffer_tiles": 512}, "train": {"batch_size": 32, "seed": 5}}
QUIET = {"progress": False, "echo": lambda *a: None}


def _tiles(store, n: int, start: int = 0) -> torch.Tensor:
    array = SlideStore.open(store).require("tiles")["10x"]
    return to_tensor(np.asarray(array[start : start + n]))


def test_coreset_and_search_on_known_answers(monkeypatch):
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    for seed in range(6):                               # whatever the random start, the outlier is in a 2-coreset
        chosen = greedy_coreset(line, 2, seed).tolist()
        assert len(chosen) == 2 and 4 in chosen
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [1.0, 1.0], [9.0, 1.0]])
    for seed in range(6):
        chosen = greedy_coreset(points, 3, seed).tolist()
        assert len(set(chosen)) == 3
        covered = torch.cdist(points, points[chosen]).min(1).values.max()
        assert covered <= 2 * math.sqrt(2) + 1e-6      # greedy k-center: within twice the optimal radius (sqrt 2)
    dupes = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]).repeat(20, 1)
    assert sorted(dupes[greedy_coreset(dupes, 10, seed=1)].tolist()) == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    wide = torch.randn(400, 300, generator=torch.Generator().manual_seed(1))
    assert greedy_coreset(wide, 20, seed=2).tolist() == greedy_coreset(wide, 20, seed=2).tolist()   # seeded projection
    assert memory.random_projection(64, 128, 0) is None and memory.random_projection(300, 128, 0).shape == (300, 128)

    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(1000, 24, generator=generator), torch.randn(300, 24, generator=generator)
    queries[:5] = bank[[3, 99, 500, 998, 999]]
    monkeypatch.setattr(memory, "QUERY_ROWS", 64)       # many small blocks: the running top-k across bank blocks
    monkeypatch.setattr(memory, "SEARCH_BLOCK", 64 * 100)
    full = torch.cdist(queries.double(), bank.double())
    for k in (1, 5):
        dist, index = nearest(queries, bank, k)
        want_d, want_i = full.topk(k, dim=1, largest=False)
        assert dist.shape == index.shape == (300, k) and torch.equal(index, want_i)
        assert torch.allclose(dist.double(), want_d, atol=1e-5)
        assert torch.equal(dist[:5, 0], torch.zeros(5)) and index[:5, 0].tolist() == [3, 99, 500, 998, 999]
    with pytest.raises(ValueError, match="k must be in"):
        nearest(queries, bank[:3], 4)


def test_a_tile_in_the_bank_scores_zero_and_the_reweighting_matches_the_paper(scored_setting):
    config = Config.from_dict({**TINY, "knn": {**TINY["knn"], "reweight_neighbours": 3}})
    knn = build(config, "cpu")
    assert knn.grid == (16, 16) and knn.feature_dim == 24 + 40 and knn.map_shape == (16, 16)
    with pytest.raises(WsiAdError, match="empty memory bank"):
        knn.score_batch(torch.zeros(1, 3, 64, 64))
    tiles = _tiles(scored_setting["normal_store"], 12)
    seen, unseen = tiles[:8], _tiles(scored_setting["tumor_store"], 4, start=100)
    knn._set_bank(knn.features(seen).reshape(-1, knn.feature_dim))      # every patch of the 8 tiles in the bank
    with torch.no_grad():
        scores, maps = knn.score_batch(seen, pixel_maps=True)
    assert torch.equal(scores, torch.zeros(8)) and torch.equal(maps, torch.zeros(8, 16, 16))

    with torch.no_grad():                                 # the paper's eq. 7 by hand, b = 3
        scores, maps = knn.score_batch(unseen, pixel_maps=True)
    feats = knn.features(unseen).reshape(4, -1, knn.feature_dim).double()
    bank = knn.bank.double()
    for t in range(4):
        d = torch.cdist(feats[t], bank)                   # (P, K)
        patch = d.min(1).values
        worst = int(patch.argmax())
        m_star = int(d[worst].argmin())
        support = torch.cdist(bank[m_star : m_star + 1], bank)[0].topk(3, largest=False).indices
        assert int(support[0]) == m_star
        dj = torch.cdist(feats[t, worst : worst + 1], bank[support])[0]
        want = (1 - torch.exp(dj[0]) / torch.exp(dj).sum()) * patch[worst]
        assert float(patch[worst]) > 0 and math.isclose(float(scores[t]), float(want), rel_tol=1e-4)
        assert torch.allclose(maps[t].flatten().double(), patch, atol=1e-4)
    plain = build(Config.from_dict({**TINY, "knn": {**TINY["knn"], "reweight_neighbours": 1}}), "cpu")
    plain.load_state_dict(knn.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # the scorer's bf16 path: still float32
        s_star, plain_maps = plain.score_batch(unseen, pixel_maps=True)
    assert torch.allclose(s_star, maps.flatten(1).amax(1), atol=1e-5) and torch.all(scores < s_star)

    for bad, match in (({"layers": ["block4", "block2"]}, "shallower first"), ({"upsample": 3}, "power of two"),
                       ({"coreset_ratio": 0.0}, "coreset_ratio"), ({"reweight_neighbours": 0}, "reweight_neighbours"),
                       ({"layers": ["block2", "layer3"]}, "feature layers")):
        with pytest.raises(ConfigError, match=match):
            Config.from_dict({"detector": "knn", "knn": bad})
    with pytest.raises(ConfigError, match="does not tile"):
        build(Config.from_dict({"detector": "knn", "knn": {"upsample": 8}}), "cpu")     # 128 cells for 64 px


def test_fit_is_bounded_deterministic_and_scores_a_store_with_maps(scored_setting, tmp_path):
    config = Config.from_dict(TINY)
    stores = [scored_setting["normal_store"]]
    pool = TilePool(discover_sources(stores), 512, config.train.seed)
    knn = build(config, "cpu")
    blocks = knn._fit_blocks(pool)
    assert sum(stop - start for _, start, stop in blocks) == 192 and blocks == sorted(blocks)
    assert len(knn._fit_blocks(pool)) == len(blocks) and knn._fit_blocks(pool) == blocks

    first = train(stores, tmp_path / "a.pt", config, **QUIET)
    again = train(stores, tmp_path / "b.pt", config, **QUIET)
    assert first.complete and first.iterations == 0 and first.model_id == again.model_id
    assert first.model_id.startswith("knn-")
    state = load_checkpoint(first.checkpoint)["state"]
    # 3 chunks of 64 tiles x 256 patches, 5% each (820), reduced to 300 whenever past 600, and at the end
    assert state["bank"].shape == (300, 64) and state["bank"].dtype == torch.float32
    assert state["fit_tiles"] == 192 and state["fit_patches"] == 192 * 256 and state["grid"] == [16, 16]
    other = Config.from_dict({**TINY, "train": {**TINY["train"], "seed": 6}})
    assert train(stores, tmp_path / "c.pt", other, **QUIET).model_id != first.model_id
    one_chunk = Config.from_dict({**TINY, "knn": {**TINY["knn"], "max_fit_tiles": 64, "max_bank": 100000}})
    whole = train(stores, tmp_path / "d.pt", one_chunk, **QUIET)          # one chunk: exactly the paper's coreset
    assert load_checkpoint(whole.checkpoint)["state"]["bank"].shape == (math.ceil(0.05 * 64 * 256), 64)

    copy = tmp_path / "stores"
    shutil.copytree(scored_setting["stores_dir"], copy)
    assert main(["score", str(copy), "--model", str(first.checkpoint), "--device", "cpu", "--pixel-maps"]) == 0
    scorer = load_scorer(first.checkpoint)
    assert scorer.model_id == first.model_id and torch.equal(scorer.detector.bank, state["bank"])
    for name in ("normal_102", "tumor_103"):
        store = SlideStore.open(copy / f"{name}.zarr")
        np.testing.assert_allclose(load_scores(store, scorer.model_id), score_store(store, scorer), rtol=1e-5)
    normal = load_scores(SlideStore.open(copy / "normal_102.zarr"), scorer.model_id)
    assert np.all(np.isfinite(normal)) and np.all(normal >= 0)
    tiles = _tiles(copy / "tumor_103.zarr", 4)
    with torch.no_grad():
        scores, maps = scorer.detector.score_batch(tiles, pixel_maps=True)
    assert maps.shape == (4, 16, 16) and bool(torch.all(scores <= maps.flatten(1).amax(1) + 1e-6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_match_the_cpu(scored_setting):
    knn_cpu = build(Config.from_dict(TINY), "cpu")
    knn_cuda = build(Config.from_dict(TINY), "cuda")
    tiles = _tiles(scored_setting["normal_store"], 16)
    knn_cpu._set_bank(knn_cpu.features(tiles[:8]).reshape(-1, knn_cpu.feature_dim)[::3])
    knn_cuda.load_state_dict(knn_cpu.state_dict())
    with torch.no_grad():
        want, want_maps = knn_cpu.score_batch(tiles, pixel_maps=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, got_maps = knn_cuda.score_batch(tiles.cuda(), pixel_maps=True)
    assert got.device.type == "cuda" and got.dtype == torch.float32
    assert torch.allclose(got.cpu(), want, rtol=1e-3, atol=1e-3) and torch.allclose(got_maps.cpu(), want_maps, atol=1e-3)


def test_tune_parameters_are_declared_by_knn():
    section = Config.from_dict({"detector": "knn"}).to_dict()["knn"]
    changed = FeatureKNN.apply_search_params(section, {n: section[k] for n, k in FeatureKNN.search_parameters.items()})
    assert changed == section
    from wsi_ad.tuning import load_space

    assert len(load_space(None, detector="knn").candidates()) == 4
