"""``wsi-ad compare``: several detectors trained on the same normal tiles, scored on the same test tiles, several
seeds, one table (the DPA paper's Tables 1 and 2, on the user's data).

::

    wsi-ad compare --data DIR --out OUT [--detectors dpa,piad,igd,ae,knn,deep_if,deep_geo,fanogan]
                   [--configs cpu|paper] [--config NAME=CONFIG.yaml ...] [--seeds 3] [--tune] [--device auto]

``DIR`` is either

- a folder laid out like Camelyon16 (``training/normal``, ``testing/images``, ``testing/lesion_annotations``,
  ``testing/reference.csv``; ``training/tumor`` + ``training/lesion_annotations`` for ``--tune``): the slides are
  preprocessed once as ``wsi-ad evaluate camelyon16`` does (``OUT/data``), every model trains on the tiles of the
  normal training slides and scores the test slides through ``wsi-ad process`` (heatmaps and all); reported: tile
  AUC (the paper's protocol, :func:`wsi_ad.metrics.tile_auc`), slide AUC and FROC
  (:func:`pipelines.camelyon16.evaluate_run`);
- or an anomalib Folder dataset (``train/good`` tiles to train on; ``test/good`` and ``test/<anomalous>`` to score):
  tile AUC (:func:`pipelines.evaluate.evaluate_tiles`).

Rows: each name of ``--detectors`` with its shipped config of the ``--configs`` scale (:data:`CONFIGS`), then each
``--config NAME=CONFIG.yaml`` (a row named NAME: another setting, e.g. a DPA ablation of
``configs/ablations/``). For every row and seed k (``train.seed`` of the config + k) a model is trained into
``OUT/runs/<row>/seed<k>/model.pt`` (a finished one is reused, an interrupted one resumed) and evaluated; the
result is kept beside it (``result.json``) so that a re-run only does what is missing. A row that fails (bad
config, missing weights, diverged training, ...) records the error in its row; the table goes on. With ``--tune``
each row first selects its hyperparameters by the weakly-supervised protocol (:mod:`wsi_ad.tuning`, on tumour tiles
of ``--tune-slides`` tumour training slides, never on the test slides; with ``--protocol dpa-paper``, on the
blocks as the paper's ``cv_folds``, :func:`pipelines.dpa_protocol.select_on_blocks`) and the selected setting is a
second column, as the paper's "default" and "WS" columns.

Writes ``OUT/compare.json`` (everything, per seed), ``OUT/compare.md`` (the table: mean ± std over seeds, training
time, scoring tiles/s, the published value beside each row that has one) and ``OUT/roc.png`` (tile ROC, one curve
per row, its first seed).

The scoring throughput is measured on the same sample of test tiles for every row (up to
:data:`THROUGHPUT_TILES` tiles, decoded in memory before timing; one untimed warm-up batch first), so the figures
compare the detectors, not the data loading.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

from wsi_ad.atomic import write_text_atomic
from wsi_ad.config import Config, ConfigError, config_path, packaged_config_dir
from wsi_ad.errors import WsiAdError

CONFIG_DIR = packaged_config_dir()

#: The shipped config of each built-in detector, by scale: ``cpu`` (minutes on 2 CPU cores) and ``paper`` (the
#: published setting, a GPU job).
CONFIGS = {
    "cpu": {"dpa": "demo_cpu.yaml", "piad": "piad_cpu.yaml", "igd": "igd_cpu.yaml", "ae": "ae_cpu.yaml",
            "deep_if": "deep_if_cpu.yaml", "deep_geo": "deep_geo_cpu.yaml", "knn": "knn_cpu.yaml",
            "fanogan": "fanogan_cpu.yaml"},
    "paper": {"dpa": "camelyon16_paper.yaml", "piad": "piad_camelyon16_paper.yaml", "igd": "igd_paper.yaml",
              "ae": "ae_paper.yaml", "deep_if": "deep_if_paper.yaml", "deep_geo": "deep_geo_paper.yaml",
              "knn": "knn_paper.yaml", "fanogan": "fanogan_paper.yaml"},
}

#: Published Camelyon16 tile ROC AUCs (mean, std over 3 runs) of the DPA paper (Shvetsova et al. 2020, Tables 1
#: and 2; ``shared/METHODS.md`` §13.1), by row name: ``default`` hyperparameters and ``ws`` (weakly-supervised).
PUBLISHED = {
    "dpa": {"ws": (0.934, 0.003), "source": "DPA paper Table 1 (DPA, WS hyperparameters, progressive growing)"},
    "piad": {"default": (0.854, 0.020), "ws": (0.895, 0.006), "source": "DPA paper Table 1 (PIAD)"},
    "deep_if": {"default": (0.876, 0.015), "ws": (0.906, 0.003), "source": "DPA paper Table 1 (Deep IF)"},
    "deep_geo": {"default": (0.524, 0.111), "ws": (0.459, 0.021), "source": "DPA paper Table 1 (Deep GEO)"},
    "dpa_wo_pg": {"ws": (0.927, 0.004), "source": "DPA paper Table 2 row 2 (AE + perceptual loss, WS selection)"},
    "dpa_adv_0.1": {"ws": (0.908, 0.007), "source": "DPA paper Table 2 row 3 (+ 0.1 adversarial)"},
    "dpa_adv_0.01": {"ws": (0.931, 0.006), "source": "DPA paper Table 2 row 4 (+ 0.01 adversarial)"},
    "dpa_l1_1.0": {"ws": (0.753, 0.016), "source": "DPA paper Table 2 row 5 (+ 1 x pixel L1)"},
    "dpa_unsupervised": {"default": (0.879, 0.006),
                         "source": "DPA paper Table 2 row 1 (AE + perceptual loss, unsupervised selection)"},
}

#: What a row may be named (it names the row's folder under ``OUT/runs``).
ROW_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")

#: Test tiles timed for the scoring throughput.
THROUGHPUT_TILES = 1024


class CompareError(WsiAdError):
    """The comparison cannot start (no data, unknown rows); a row's own failure is recorded, never raised."""


def parse_rows(detectors: str | None, configs: str, extra: list[str]) -> dict[str, Path]:
    """{row name: config file} of ``--detectors`` (comma-separated names, their ``configs`` scale) and
    ``--config NAME=PATH`` items. Raises :class:`CompareError` for an unknown scale, a name without a shipped
    config, a malformed item or a row named twice."""
    if configs not in CONFIGS:
        raise CompareError(f"--configs must be one of {', '.join(CONFIGS)}, got {configs!r}")
    rows: dict[str, Path] = {}
    for name in filter(None, (d.strip() for d in (detectors or "").split(","))):
        if name not in CONFIGS[configs]:
            raise CompareError(f"no shipped {configs} config for detector {name!r} (shipped: "
                               f"{', '.join(CONFIGS[configs])}); give one with --config {name}=PATH")
        if name in rows:
            raise CompareError(f"--detectors names {name!r} twice")
        rows[name] = CONFIG_DIR / CONFIGS[configs][name]
    for item in extra:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise CompareError(f"--config {item!r}: expected NAME=CONFIG.yaml")
        if not ROW_NAME.fullmatch(name):
            raise CompareError(f"--config {item!r}: a row name is letters, digits, '_', '-' and '.' (it names the "
                               "row's folder under OUT/runs), not starting with '.'")
        if name in rows:
            raise CompareError(f"row {name!r} is given twice")
        rows[name] = path
    if not rows:
        raise CompareError("nothing to compare: give --detectors and/or --config NAME=CONFIG.yaml")
    for name, path in rows.items():          # a file, or a packaged config by name (wsi-ad configs)
        try:
            rows[name] = config_path(path)
        except ConfigError as exc:
            raise CompareError(f"--config {name}={path}: {exc}") from None
    return rows


# -- the data ---------------------------------------------------------------------------------------------------

class _Data:
    """Training paths, the evaluation of a model and the tiles timed for throughput, for one kind of input."""

    kind = ""
    train_paths: list[Path]

    def evaluate(self, model: Path, run: Path, device: str, echo) -> dict:
        raise NotImplementedError

    def sample(self, magnification: str, size: int, image_mpp: float | None) -> np.ndarray:
        raise NotImplementedError


class _SlideData(_Data):
    """A Camelyon16-like folder: stores made once in ``OUT/data``, every model scored through ``wsi-ad process``."""

    kind = "slides"

    def __init__(self, root: Path, work: Path, echo, workers: int | None = None):
        from pipelines.camelyon16 import Camelyon16Layout

        self.layout = Camelyon16Layout(root)
        self.layout.check(training=True)
        self.work, self.workers = work, workers
        echo("Preprocessing the normal training slides ...")
        self.train_paths = self._stores(self.layout.training_normal, "training_normal", "normal training slide", echo)
        echo("Preprocessing the test slides ...")
        self.test_stores = self._stores(self.layout.testing_images, "testing", "test slide", echo)

    def _stores(self, slides: Path, name: str, what: str, echo) -> list[Path]:
        """Preprocess the ``slides`` folder into ``work/name``: the stores that gave tiles (CompareError if none)."""
        from pipelines.process import BatchConfig, run_batch

        batch = run_batch([slides], self.work / name, BatchConfig(), echo=lambda line: echo("    " + line),
                          workers=self.workers)
        stores = [Path(r["store"]) for r in batch.results if r["status"] == "ok" and r.get("n_tiles")]
        if not stores:
            raise CompareError(f"no {what} of {self.layout.root} gave tiles; see {batch.report_html}")
        return stores

    def evaluate(self, model: Path, run: Path, device: str, echo) -> dict:
        from pipelines.camelyon16 import evaluate_run
        from pipelines.process import BatchConfig, run_batch

        batch = BatchConfig(model=model, device=device, annotations_dir=self.layout.testing_annotations,
                            labels=self.layout.reference)
        tested = run_batch([self.layout.testing_images], self.work / "testing", batch, echo=lambda line: None,
                           workers=self.workers)
        metrics = evaluate_run(tested.results, self.layout, roc=True)
        failed = [r["slide_id"] for r in tested.results if r["status"] == "failed"]
        return {"tile_auc": metrics["tile"]["auc"], "slide_auc": metrics["slide"]["auc"],
                "froc": metrics["froc"].get("score"), "n_tumor_tiles": metrics["tile"].get("n_tumor_tiles"),
                "n_normal_tiles": metrics["tile"].get("n_normal_tiles"), "failed_slides": failed,
                "roc": metrics["tile"].get("roc"), "note": metrics["tile"].get("note")}

    def sample(self, magnification: str, size: int, image_mpp: float | None) -> np.ndarray:
        from wsi_ad.store import SlideStore
        from wsi_ad.tuning import read_tiles

        tiles, left = [], THROUGHPUT_TILES
        for store in self.test_stores:
            n = SlideStore.open(store).require("tiles")[magnification].shape[0]
            take = np.arange(min(n, left))
            tiles.append(read_tiles(store, take, magnification, size))
            left -= len(take)
            if left <= 0:
                break
        return np.concatenate(tiles)


class _FolderData(_Data):
    """An anomalib Folder dataset: train on ``train/good``, tile AUC on ``test``."""

    kind = "tiles"

    def __init__(self, root: Path):
        from pipelines.evaluate import folder_splits

        self.root = root
        self.train_paths = [root / "train" / "good"]
        if not self.train_paths[0].is_dir():
            raise CompareError(f"{root}: an anomalib Folder dataset needs train/good (the normal training tiles)")
        self.splits = folder_splits(root)

    def evaluate(self, model: Path, run: Path, device: str, echo) -> dict:
        from pipelines.evaluate import evaluate_tiles
        from wsi_ad.detectors.checkpoint import load_checkpoint
        from wsi_ad.metrics import roc_points

        image_mpp = Config.from_dict(load_checkpoint(model)["config"]).data.image_mpp   # as the model was trained
        results = evaluate_tiles(self.root, model, run / "tiles", device=device, image_mpp=image_mpp,
                                 echo=lambda line: None)
        test = results["splits"]["test"]
        import csv

        with open(test["scores_csv"], newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        labels = [int(r["label"]) for r in rows]
        scores = [float(r["score"]) for r in rows]
        return {"tile_auc": test["auc"], "slide_auc": None, "froc": None, "n_tumor_tiles": test["n_anomalous"],
                "n_normal_tiles": test["n_good"], "failed_slides": [], "roc": roc_points(labels, scores, max_points=400),
                "note": None}

    def sample(self, magnification: str, size: int, image_mpp: float | None) -> np.ndarray:
        from wsi_ad.tile_pool import discover_sources

        sources = discover_sources([p for folders in self.splits["test"].values() for p in folders], magnification,
                                   size, image_mpp)
        tiles, left, rng = [], THROUGHPUT_TILES, np.random.default_rng(0)
        for source in sources:
            take = min(len(source), left)
            tiles.append(source.read(0, take, rng))
            left -= take
            if left <= 0:
                break
        return np.concatenate(tiles)


class _BlockData(_FolderData):
    """The DPA paper's blocks of a Camelyon16-like folder (``--protocol dpa-paper``): a Folder dataset that also
    knows its ``layout``, its ``blocks`` ((folder, manifest) of :func:`pipelines.dpa_protocol.make_blocks`) and the
    official lists' folder ``split_dir`` (or None), for the selection on blocks."""

    def __init__(self, layout, blocks: tuple[Path, dict], split_dir: str | Path | None):
        super().__init__(blocks[0])
        self.layout, self.blocks, self.split_dir = layout, blocks, split_dir


def data_kind(root: str | Path) -> str:
    """``"tiles"`` (an anomalib Folder dataset) or ``"slides"`` (a Camelyon16-like folder); :class:`CompareError`
    for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise CompareError(f"--data {root}: not a folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "tiles"
    if (root / "training").is_dir() and (root / "testing").is_dir():
        return "slides"
    raise CompareError(f"--data {root}: neither a Camelyon16-like folder (training/normal, testing/images, "
                       "testing/reference.csv) nor an anomalib Folder dataset (train/good, test/good, test/<anomalous>)")


def open_data(root: str | Path, out: Path, echo, workers: int | None = None, protocol: str = "all-tiles",
              dpa_split: str | Path | None = None) -> _Data:
    """The comparison's data: a Camelyon16-like folder of slides or an anomalib Folder dataset of tiles. With
    ``protocol="dpa-paper"`` (slides only), the DPA paper's blocks of those slides (:mod:`pipelines.dpa_protocol`),
    made once in ``OUT/dpa_paper``: every row trains on the training blocks and is scored on the test blocks."""
    if protocol == "dpa-paper":
        from pipelines.camelyon16 import Camelyon16Layout
        from pipelines.dpa_protocol import make_blocks, undefined_reason

        if data_kind(root) == "tiles":
            raise CompareError("--protocol dpa-paper needs a Camelyon16-like folder of slides, not a tile folder")
        layout = Camelyon16Layout(Path(root))
        layout.check(training=True)
        folder, manifest = make_blocks(layout, out / "dpa_paper", dpa_split, echo)
        undefined = undefined_reason(manifest)
        if undefined:
            raise CompareError(f"--protocol dpa-paper: the tile AUC is {undefined}")
        return _BlockData(layout, (folder, manifest), dpa_split)
    if dpa_split is not None:
        raise CompareError("--dpa-split belongs to --protocol dpa-paper")
    if data_kind(root) == "tiles":
        return _FolderData(Path(root))
    return _SlideData(Path(root), out / "data", echo, workers)


# -- one model ----------------------------------------------------------------------------------------------------

def _measure_throughput(model: Path, data: _Data, device: str) -> float:
    """Tiles per second of the model's scorer on the shared throughput sample (after one warm-up batch)."""
    from wsi_ad.detectors.scorer import load_scorer
    from wsi_ad.scoring import default_batch_size

    scorer = load_scorer(model, device=None if device == "auto" else device)
    tiles = data.sample(scorer.magnification, scorer.image_size, scorer.config.data.image_mpp)
    batch = default_batch_size(scorer.device)
    scorer.score(tiles[:batch], batch_size=batch)
    start = time.perf_counter()
    scorer.score(tiles, batch_size=batch)
    return len(tiles) / max(time.perf_counter() - start, 1e-9)


def run_one(config: Config, data: _Data, run: Path, device: str, echo) -> dict:
    """Train (or resume, or reuse) one model of ``config`` into ``run/model.pt`` and evaluate it; the record also
    written to ``run/result.json``. Raises whatever training or scoring raises."""
    from wsi_ad.config import training_identity
    from wsi_ad.detectors.checkpoint import load_checkpoint, model_id
    from wsi_ad.detectors.loop import train

    run.mkdir(parents=True, exist_ok=True)
    checkpoint, record_path = run / "model.pt", run / "result.json"
    if record_path.is_file() and checkpoint.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            payload = load_checkpoint(checkpoint)
            same = training_identity(Config.from_dict(payload["config"])) == training_identity(config)
            if payload["complete"] and same and record.get("model_id") == model_id(payload):
                return {**record, "reused": True}
        except (OSError, ValueError, WsiAdError):
            pass
    trained = train(data.train_paths, checkpoint, config, progress=False, echo=lambda line: None)
    if not trained.complete:
        raise WsiAdError(f"{checkpoint}: training did not complete")
    record = {"seed": config.train.seed, "model_id": trained.model_id, "checkpoint": str(checkpoint),
              "iterations": trained.iterations, "final_loss": trained.final_loss,
              "train_seconds": round(trained.seconds, 1), "resumed_from": trained.resumed_from}
    started = time.perf_counter()
    record.update(data.evaluate(checkpoint, run, device, echo))
    record["evaluate_seconds"] = round(time.perf_counter() - started, 1)
    record["score_tiles_per_s"] = round(_measure_throughput(checkpoint, data, device), 1)
    write_text_atomic(record_path, json.dumps(record, indent=2))
    return {**record, "reused": False}


# -- the table ----------------------------------------------------------------------------------------------------

def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """Mean ± std over a row's finished seeds (population std, as the paper's "± std over 3 runs"), medians of
    training time (of the trainings that ran start to end in one go: a resumed one timed only its last part) and
    scoring throughput."""
    ok = [r for r in runs if r.get("status") == "ok"]
    out = {key: _stats([r.get(key) for r in ok]) for key in ("tile_auc", "slide_auc", "froc")}
    whole = [r["train_seconds"] for r in ok if not r.get("resumed_from")]
    out["train_seconds_median"] = statistics.median(whole) if whole else None
    out["score_tiles_per_s_median"] = statistics.median([r["score_tiles_per_s"] for r in ok]) if ok else None
    out["seeds_ok"], out["seeds_failed"] = len(ok), len(runs) - len(ok)
    return out


def _pm(stats: dict | None) -> str:
    if not stats or stats.get("mean") is None:
        return "–"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}" if stats["n"] > 1 else f"{stats['mean']:.3f}"


def _published(name: str, column: str) -> str:
    entry = PUBLISHED.get(name, {}).get(column)
    return "–" if entry is None else f"{entry[0]:.3f} ± {entry[1]:.3f}"


def table(report: dict) -> str:
    """The markdown table of ``compare.md``."""
    slides = report["data"]["kind"] == "slides"
    tuned = any(row.get("tuned") for row in report["rows"])
    protocol = report["data"].get("protocol", "all-tiles")
    tile = "tile AUC (dpa-paper protocol)" if protocol == "dpa-paper" else (
        "tile AUC (all-tiles protocol)" if slides else "tile AUC")
    head = ["row", "detector", tile] + (["slide AUC", "FROC"] if slides else [])
    head += ["tile AUC (WS)"] if tuned else []
    head += ["train s (median)", "score tiles/s", "seeds",
             "published tile AUC (Camelyon16, paper setting, dpa-paper protocol"
             + (")" if protocol == "dpa-paper" else "; other tiles than ours)")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        s = row["summary"]
        cells = [row["name"], row["detector"] or "?", _pm(s.get("tile_auc"))]
        if slides:
            cells += [_pm(s.get("slide_auc")), _pm(s.get("froc"))]
        if tuned:
            cells += [_pm((row.get("tuned") or {}).get("summary", {}).get("tile_auc"))]
        train_s, rate = s.get("train_seconds_median"), s.get("score_tiles_per_s_median")
        cells += ["–" if train_s is None else f"{train_s:.0f}", "–" if rate is None else f"{rate:.0f}",
                  f"{s.get('seeds_ok', 0)}/{s.get('seeds_ok', 0) + s.get('seeds_failed', 0)}"]
        published = [f"default {_published(row['name'], 'default')}" if "default" in PUBLISHED.get(row["name"], {})
                     else "", f"WS {_published(row['name'], 'ws')}" if "ws" in PUBLISHED.get(row["name"], {}) else ""]
        cells += ["; ".join(p for p in published if p) or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- **{row['name']}**: {row['error']}" for row in report["rows"] if row.get("error")]
    notes += [f"- **{row['name']}** seed {r['seed']}: {r['error']}" for row in report["rows"] for r in row["runs"]
              if r.get("status") == "failed"]
    text = "\n".join(lines)
    text += (f"\n\nMean ± population std over seeds ({report['settings']['seeds']} asked); training time: median of "
             "the trainings run start to end in one go (a resumed one is left out). Tile AUC: "
             + ("tumour tiles inside the lesions of the tumour test slides vs every tile of the normal test slides "
                "(the DPA paper's protocol on our tiles); slide AUC and FROC as `wsi-ad evaluate camelyon16`."
                if slides else "test/<anomalous> vs test/good tiles of the anomalib Folder dataset.")
             + " Published values are the DPA paper's on the real Camelyon16 at the paper's scale (GPU): beside, not "
               "comparable to, a CPU setting or other data.")
    if notes:
        text += "\n\nFailures:\n" + "\n".join(notes)
    return text


def plot_rocs(path: Path, report: dict) -> Path | None:
    """One tile ROC curve per row (its first finished seed) in one PNG; None when no row has a curve."""
    from pipelines.report import plot_roc_curves

    curves = []
    for row in report["rows"]:
        first = next((r for r in row["runs"] if r.get("status") == "ok" and r.get("roc")), None)
        if first is not None:
            curves.append((f"{row['name']} (AUC {first['tile_auc']:.3f})", first["roc"]["fpr"], first["roc"]["tpr"]))
    if not curves:
        return None
    return plot_roc_curves(path, curves, title="Tile-level ROC, seed of each row's first run",
                           xlabel="false positive rate (normal tiles)", ylabel="true positive rate (tumour tiles)")


# -- the run ------------------------------------------------------------------------------------------------------

def compare(data: str | Path, out: str | Path, rows: dict[str, Path], *, seeds: int = 3, tune: bool = False,
            tune_slides: int = 2, tune_space: str | Path | None = None, device: str = "auto",
            workers: int | None = None, image_mpp: float | None = None, protocol: str = "all-tiles",
            dpa_split: str | Path | None = None, echo=print) -> dict:
    """Run the comparison (module docstring); returns the report also written to ``OUT/compare.json``.
    ``image_mpp``: µm/px of tile images (``data.image_mpp`` of every row; tile folders only); ``tune_space``: the
    search space of ``--tune`` (default: each detector's own)."""
    if seeds < 1:
        raise CompareError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    data_kind(data)                      # a bad --data is refused before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompareError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise CompareError(f"--out {out}: the folder is not writable")
    started = time.perf_counter()
    if protocol not in ("all-tiles", "dpa-paper"):
        raise CompareError(f"unknown protocol {protocol!r} (known: all-tiles, dpa-paper)")
    if protocol == "dpa-paper" and image_mpp is not None:
        raise CompareError("--image-mpp does not apply to --protocol dpa-paper (its 192 px blocks are at 10x)")
    dataset = open_data(data, out, echo, workers, protocol=protocol, dpa_split=dpa_split)
    if tune and dataset.kind != "slides" and not isinstance(dataset, _BlockData):
        raise CompareError("--tune needs a Camelyon16-like folder of slides (tumour training slides with lesion "
                           "annotations give the validation anomalies)")
    report = {"data": {"path": str(data), "kind": dataset.kind, "train": [str(p) for p in dataset.train_paths],
                       "protocol": protocol},
              "settings": {"seeds": seeds, "tune": tune, "device": device, "image_mpp": image_mpp,
                           "rows": {k: str(v) for k, v in rows.items()}},
              "rows": []}

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_text_atomic(out / "compare.json", json.dumps(report, indent=2, default=str))
        write_text_atomic(out / "compare.md", table(report) + "\n")

    for name, path in rows.items():
        row = {"name": name, "config": str(path), "detector": None, "error": None, "runs": [], "summary": {}}
        report["rows"].append(row)
        try:
            base = Config.from_yaml(path)
        except (ConfigError, OSError) as exc:
            row["error"] = str(exc) if str(path) in str(exc) else f"config {path}: {exc}"
            echo(f"{name}: {row['error']}")
            save()
            continue
        row["detector"] = base.detector
        if image_mpp is not None or protocol == "dpa-paper":    # the paper's blocks are cropped, never resized
            base = replace(base, data=replace(base.data, image_mpp=image_mpp))
        row["runs"] = _seeds(name, base, dataset, out / "runs" / name, seeds, device, echo)
        row["summary"] = summarize(row["runs"])
        save()
        if tune:
            row["tuned"] = _tuned(name, base, dataset, out, seeds, tune_slides, tune_space, device, workers, echo)
            save()
    curve = plot_rocs(out / "roc.png", report)
    report["roc_png"] = str(curve) if curve else None
    save()
    echo("")
    echo(table(report))
    echo(f"\n{out / 'compare.md'}, {out / 'compare.json'}" + (f", {curve}" if curve else ""))
    return report


def _seeds(name: str, base: Config, dataset: _Data, runs_dir: Path, seeds: int, device: str, echo) -> list[dict]:
    runs = []
    for k in range(seeds):
        seed = base.train.seed + k
        config = replace(base, train=replace(base.train, seed=seed, device=device))
        label = f"{name} seed {seed}"
        echo(f"{label}: training {config.detector} ...")
        try:
            record = run_one(config, dataset, runs_dir / f"seed{seed}", device, echo)
        except Exception as exc:  # noqa: BLE001 - one row's failure is recorded, the table goes on
            reason = str(exc) if isinstance(exc, WsiAdError) else f"{type(exc).__name__}: {exc}"
            runs.append({"seed": seed, "status": "failed", "error": reason,
                         "traceback": None if isinstance(exc, WsiAdError) else traceback.format_exc(limit=5)})
            echo(f"{label}: FAILED ({reason})")
            continue
        runs.append({**record, "status": "ok"})
        extra = "".join(f", {key} {record[key]:.3f}" for key in ("slide_auc", "froc") if record.get(key) is not None)
        auc = record.get("tile_auc")
        echo(f"{label}: tile AUC {'–' if auc is None else f'{auc:.3f}'}{extra}, trained in "
             f"{record['train_seconds']:.0f} s, {record['score_tiles_per_s']:.0f} tiles/s"
             + (" (reused)" if record.get("reused") else ""))
    return runs


def _tuned(name: str, base: Config, dataset: _SlideData | _BlockData, out: Path, seeds: int, tune_slides: int,
           tune_space, device: str, workers: int | None, echo) -> dict:
    """The row's weakly-supervised column: select on tumour training tiles (the dpa-paper protocol: on the blocks,
    :func:`pipelines.dpa_protocol.select_on_blocks`), then train the winner with the seeds."""
    from pipelines.camelyon16 import _select
    from pipelines.dpa_protocol import select_on_blocks

    say = lambda line: echo(f"{name} tune: {line}")  # noqa: E731
    try:
        if isinstance(dataset, _BlockData):
            config, selection = select_on_blocks(dataset.layout, out / "tune" / name, base, space=tune_space,
                                                 split_dir=dataset.split_dir, slides_per_fold=tune_slides,
                                                 device=device, blocks=dataset.blocks, echo=say)
        else:
            config, selection = _select(dataset.layout, out / "tune" / name, dataset.train_paths, base, tune_space,
                                        tune_slides, {"workers": workers, "scheduler": None}, say)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        reason = str(exc) if isinstance(exc, WsiAdError) else f"{type(exc).__name__}: {exc}"
        echo(f"{name} tune: FAILED ({reason})")
        return {"error": reason, "runs": [], "summary": {}}
    runs = _seeds(f"{name} (WS)", config, dataset, out / "runs" / f"{name}-ws", seeds, device, echo)
    return {"selection": selection, "runs": runs, "summary": summarize(runs)}


# -- command line -------------------------------------------------------------------------------------------------

def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="a Camelyon16-like folder of slides (training/normal, testing/images, "
                             "testing/lesion_annotations, testing/reference.csv; e.g. `wsi-ad synth` output) or an "
                             "anomalib Folder dataset of tiles (train/good, test/good, test/<anomalous>)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: compare.md, compare.json, roc.png, runs/<row>/seed<k>/ (re-runs resume)")
    parser.add_argument("--detectors", default=None,
                        help="comma-separated detectors, each with its shipped config of --configs "
                             f"(known: {', '.join(CONFIGS['cpu'])}); default: all of them unless --config is given")
    parser.add_argument("--configs", default="cpu", choices=sorted(CONFIGS),
                        help="scale of the shipped configs: cpu (minutes each on 2 CPU cores) or paper (the published "
                             "settings: a GPU job, hours per detector)")
    parser.add_argument("--config", dest="extra", action="append", default=[], metavar="NAME=CONFIG.yaml",
                        help="one more row named NAME with this config (repeatable), e.g. "
                             "dpa_adv_0.1=configs/ablations/dpa_adv_0.1_cpu.yaml")
    parser.add_argument("--seeds", type=int, default=3, help="trainings per row, seeds train.seed + 0..N-1 (default 3)")
    parser.add_argument("--tune", action="store_true",
                        help="also select each row's hyperparameters by the weakly-supervised protocol (tumour tiles "
                             "of --tune-slides tumour training slides) and report the selected setting beside it")
    parser.add_argument("--tune-slides", type=int, default=2,
                        help="tumour training slides used by --tune; with --protocol dpa-paper, a fold (default 2)")
    parser.add_argument("--tune-space", type=Path,
                        help="search space YAML or packaged name of --tune (default: each detector's own)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training and scoring device")
    parser.add_argument("--workers", type=int, default=None, help="local Dask workers for the slide pipeline")
    parser.add_argument("--protocol", choices=("all-tiles", "dpa-paper"), default="all-tiles",
                        help="slides only: all-tiles (every tile of the slides) or dpa-paper (the DPA paper's blocks "
                             "and tile AUC, as `evaluate camelyon16 --protocol dpa-paper`) (default: %(default)s)")
    parser.add_argument("--dpa-split", type=Path, metavar="DIR",
                        help="the official block lists of the DPA paper for --protocol dpa-paper (default: lists "
                             "built by the paper's rules)")
    parser.add_argument("--image-mpp", type=float, default=None,
                        help="µm/px of the tile images of an anomalib folder (e.g. 0.243 for Camelyon16 level 0): "
                             "every row's tiles are resized to its magnification, for training and scoring")


def run_compare(args: argparse.Namespace) -> int:
    detectors = args.detectors
    if detectors is None and not args.extra:
        detectors = ",".join(CONFIGS[args.configs])
    rows = parse_rows(detectors, args.configs, args.extra)
    report = compare(args.data, args.out, rows, seeds=args.seeds, tune=args.tune, tune_slides=args.tune_slides,
                     tune_space=args.tune_space, device=args.device, workers=args.workers, image_mpp=args.image_mpp,
                     protocol=args.protocol, dpa_split=args.dpa_split)
    if not any(r.get("status") == "ok" for row in report["rows"] for r in row["runs"]):
        print("wsi-ad: error: no row trained and scored (see the failures above)", file=sys.stderr)
        return 1
    return 0
