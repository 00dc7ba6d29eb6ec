"""``wsi-ad evaluate camelyon16``: the paper's protocol end to end on a folder laid out like Camelyon16.

::

    DATA/training/normal/*.tif            normal training slides (train the model on their tiles)
    DATA/training/tumor/*.tif             tumour training slides (a few pick hyperparameters with --tune)
    DATA/training/lesion_annotations/*.xml
    DATA/testing/images/*.tif             test slides (scored and evaluated)
    DATA/testing/lesion_annotations/*.xml
    DATA/testing/reference.csv            Test_001,Tumor,IDC,Macro / Test_003,Normal,,

Steps (each reuses what a previous run finished, in ``RUN``):

1. without ``--model``: preprocess the normal training slides (``RUN/training_normal``); with ``--tune``,
   preprocess ``--tune-slides`` tumour training slides and select hyperparameters on their tumour tiles
   (:mod:`wsi_ad.tuning`; never used for training); train on N tiles per normal slide → ``RUN/model.pt``;
2. ``wsi-ad process`` on the test slides with the model (``RUN/testing``: stores, heatmaps, overlays with
   the lesion outlines, report);
3. metrics (:mod:`wsi_ad.metrics`): slide-level ROC AUC with bootstrap CI and Macro/Micro splits; tile-level
   ROC AUC, tumour tiles (footprint inside the lesion polygons) of tumour test slides vs all tiles of normal
   test slides, as in the paper; FROC of the official protocol with detections at heatmap local maxima;
4. ``RUN/results.json`` and ``RUN/results.md``: our numbers beside the paper's and the challenge's.

Runs unchanged on the real Camelyon16 (GPU advised: the paper's schedule is ~100k iterations) and, small,
on ``wsi-ad synth`` output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipelines.process import BatchConfig, discover, run_batch
from wsi_ad.atomic import write_text_atomic
from wsi_ad.config import Config
from wsi_ad.errors import WsiAdError

#: Published numbers printed beside ours (source in ``source``).
REFERENCE_RESULTS = (
    {"metric": "tile_auc", "value": 0.934, "who": "DPA paper (Shvetsova et al.), Camelyon16, 64 px tiles at 10x",
     "source": "Shvetsova et al., Anomaly Detection with Deep Perceptual Autoencoders, Table 2"},
    {"metric": "slide_auc", "value": 0.925, "who": "Camelyon16 challenge winner (HMS & MIT)",
     "source": "Camelyon16 leaderboard; Bejnordi et al., JAMA 2017"},
    {"metric": "slide_auc", "value": 0.966, "who": "pathologist without time constraint",
     "source": "Bejnordi et al., JAMA 2017"},
    {"metric": "froc", "value": 0.705, "who": "Camelyon16 challenge winner (HMS & MIT)",
     "source": "Camelyon16 leaderboard; Bejnordi et al., JAMA 2017"},
)


@dataclass(frozen=True)
class Camelyon16Layout:
    """The folders of a dataset laid out like the official Camelyon16 release."""

    root: Path

    @property
    def training_normal(self) -> Path:
        return self.root / "training" / "normal"

    @property
    def training_tumor(self) -> Path:
        return self.root / "training" / "tumor"

    @property
    def training_annotations(self) -> Path:
        return self.root / "training" / "lesion_annotations"

    @property
    def testing_images(self) -> Path:
        return self.root / "testing" / "images"

    @property
    def testing_annotations(self) -> Path:
        return self.root / "testing" / "lesion_annotations"

    @property
    def reference(self) -> Path:
        return self.root / "testing" / "reference.csv"

    def check(self, *, training: bool, tumor_training: bool = False) -> None:
        """Raise a :class:`WsiAdError` naming every part of the layout that is missing."""
        needed = [self.testing_images, self.testing_annotations, self.reference]
        if training:
            needed.append(self.training_normal)
        if tumor_training:
            needed += [self.training_tumor, self.training_annotations]
        missing = [str(p.relative_to(self.root)) for p in needed if not p.exists()]
        if missing:
            raise WsiAdError(f"{self.root}: not laid out like Camelyon16, missing {', '.join(missing)} "
                             "(see `wsi-ad evaluate camelyon16 --help`)")


def run_camelyon16(data: str | Path, run: str | Path, *, model: str | Path | None = None,
                   config: Config | None = None, tune: bool = False, tune_space: str | Path | None = None,
                   tune_slides: int = 2, tiles_per_slide: int | None = None, device: str = "auto",
                   workers: int | None = None, scheduler: str | None = None, echo=print) -> dict:
    """Run the protocol (module docstring); returns the results also written to ``RUN/results.json``."""
    from wsi_ad.detectors.loop import train

    started = time.perf_counter()
    layout, run = Camelyon16Layout(Path(data)), Path(run)
    layout.check(training=model is None, tumor_training=model is None and tune)
    run.mkdir(parents=True, exist_ok=True)
    cluster = {"workers": workers, "scheduler": scheduler}
    timings: dict[str, float] = {}
    selection = None

    def indent(line: str) -> None:
        echo("    " + line)

    if model is None:
        step = time.perf_counter()
        echo("Preprocessing the normal training slides ...")
        prepared = run_batch([layout.training_normal], run / "training_normal", BatchConfig(), echo=indent, **cluster)
        normal_stores = [Path(r["store"]) for r in prepared.results if r["status"] == "ok" and r.get("n_tiles")]
        if not normal_stores:
            raise WsiAdError(f"no normal training slide gave tiles ({prepared.n_failed} failed); see "
                             f"{prepared.report_html}")
        timings["preprocess_training"] = time.perf_counter() - step
        config = config or Config()
        if tune:
            step = time.perf_counter()
            config, selection = _select(layout, run, normal_stores, config, tune_space, tune_slides, cluster, echo)
            timings["tune"] = time.perf_counter() - step
        if tiles_per_slide is not None:
            config = replace(config, data=replace(config.data, tiles_per_slide=tiles_per_slide))
        step = time.perf_counter()
        echo(f"Training on {len(normal_stores)} normal slides → {run / 'model.pt'} ...")
        trained = train(normal_stores, run / "model.pt", config, progress=False, echo=indent)
        model = trained.checkpoint
        timings["train"] = time.perf_counter() - step

    step = time.perf_counter()
    echo("Scoring the test slides ...")
    batch = BatchConfig(model=Path(model), device=device, annotations_dir=layout.testing_annotations,
                        labels=layout.reference)
    tested = run_batch([layout.testing_images], run / "testing", batch, echo=indent, **cluster)
    timings["process_testing"] = time.perf_counter() - step

    step = time.perf_counter()
    metrics = evaluate_run(tested.results, layout)
    timings["metrics"] = time.perf_counter() - step
    results = {
        "data": str(layout.root), "run": str(run), "model": str(model),
        "model_id": next((r["model_id"] for r in tested.results if r.get("model_id")), None),
        "hyperparameter_selection": selection,
        "slide": tested.metrics,
        "tile": metrics["tile"],
        "froc": metrics["froc"],
        "failed_slides": [{"slide_id": r["slide_id"], "error": r.get("error")} for r in tested.results
                          if r["status"] == "failed"],
        "reference_results": list(REFERENCE_RESULTS),
        "report": str(tested.report_html),
        "seconds": {key: round(value, 1) for key, value in timings.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(run / "results.json", json.dumps(results, indent=2, default=_json_default))
    table = results_table(results)
    write_text_atomic(run / "results.md", table + "\n")
    echo("")
    echo(table)
    echo(f"\nResults: {run / 'results.json'}, {run / 'results.md'}; report: {tested.report_html}")
    return results


def _select(layout: Camelyon16Layout, run: Path, normal_stores: list[Path], base: Config, space, n_slides: int,
            cluster: dict, echo) -> tuple[Config, dict]:
    """Weakly-supervised selection on the tumour tiles of ``n_slides`` tumour training slides."""
    from wsi_ad.config import Config as _Config
    from wsi_ad.tuning import load_space, tune

    tumor_slides = discover([layout.training_tumor])[:n_slides]
    echo(f"Preprocessing {len(tumor_slides)} tumour training slide(s) for hyperparameter selection ...")
    prepared = run_batch(tumor_slides, run / "training_tumor", BatchConfig(), echo=lambda line: echo("    " + line),
                         **cluster)
    tumor_stores = [Path(r["store"]) for r in prepared.results if r["status"] == "ok" and r.get("n_tiles")]
    if not tumor_stores:
        raise WsiAdError("--tune: no tumour training slide gave tiles")
    echo("Selecting hyperparameters (3-fold cross-validation by slide, one anomaly type) ...")
    outcome = tune(normal_stores, tumor_stores, layout.training_annotations, run / "tune", base_config=base,
                   space=load_space(space, detector=base.detector), echo=lambda line: echo("    " + line))
    summary = {"results": str(outcome.results_path), "best_config": str(outcome.best_config_path),
               "best": outcome.best, "notes": outcome.notes}
    return _Config.from_yaml(outcome.best_config_path), summary


def evaluate_run(results: list[dict], layout: Camelyon16Layout) -> dict:
    """Tile-level AUC and FROC of a scored run over the test slides (slides that failed are left out)."""
    from wsi_ad.annotations import read_asap_xml
    from wsi_ad.heatmap import load_heatmap
    from wsi_ad.metrics import (
        MetricsError,
        detections_from_heatmap,
        evaluation_mask,
        froc,
        normalize_slide_id,
        read_reference_csv,
        tile_auc,
        tile_labels,
    )
    from wsi_ad.scoring import load_scores
    from wsi_ad.store import SlideStore

    reference = {row.key: row for row in read_reference_csv(layout.reference)}
    tumor_tiles: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    normal_tiles: dict[str, np.ndarray] = {}
    detections: dict[str, np.ndarray] = {}
    masks: dict = {}
    skipped: list[str] = []
    for result in results:
        key = normalize_slide_id(result["slide_id"])
        row = reference.get(key)
        if result["status"] != "ok" or not result.get("model_id") or row is None:
            skipped.append(result["slide_id"])
            continue
        store = SlideStore.open(result["store"])
        scores = load_scores(store, result["model_id"])
        heatmap = load_heatmap(store, result["model_id"])
        xml = layout.testing_annotations / f"{result['slide_id']}.xml"
        offset = ((heatmap.tile0[0] - heatmap.level0_per_cell[0]) / 2, (heatmap.tile0[1] - heatmap.level0_per_cell[1]) / 2)
        detections[result["slide_id"]] = detections_from_heatmap(
            heatmap.values, heatmap.level0_per_cell,
            origin=(heatmap.origin_level0[0] + offset[0], heatmap.origin_level0[1] + offset[1]))
        if row.is_tumor:
            if not xml.exists():
                raise WsiAdError(f"{xml}: annotation of tumour test slide {result['slide_id']} not found")
            annotations = read_asap_xml(xml)
            tiles = store.require("tiles")
            labels = tile_labels(np.asarray(tiles["coords"][:]), tuple(tiles.attrs["geometry"]["tile0"]), annotations)
            tumor_tiles[result["slide_id"]] = (scores, labels)
            masks[result["slide_id"]] = evaluation_mask(annotations, (result["width"], result["height"]),
                                                        mpp0=result["mpp"])
        else:
            normal_tiles[result["slide_id"]] = scores
            masks[result["slide_id"]] = None
    tile = tile_auc(tumor_tiles, normal_tiles) if tumor_tiles and normal_tiles else \
        {"auc": None, "note": "needs tumour and normal test slides with tiles"}
    try:
        froc_result = froc(detections, masks).as_dict()
    except MetricsError as exc:             # e.g. no lesion larger than an ITC among the evaluated slides
        froc_result = {"score": None, "note": str(exc)}
    tile["min_tumor_overlap"] = 1.0
    return {"tile": tile, "froc": froc_result, "skipped": skipped}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def results_table(results: dict) -> str:
    """A markdown table: each metric, ours, and the published numbers beside it."""
    slide = (results.get("slide") or {}).get("overall", {})
    ours = {"slide_auc": slide.get("auc"), "tile_auc": results["tile"].get("auc"), "froc": results["froc"].get("score")}
    ci = f" (95% CI {_fmt(slide.get('ci_low'))}–{_fmt(slide.get('ci_high'))})" if slide.get("auc") is not None else ""
    counts = {
        "slide_auc": f"{slide.get('n_tumor', 0)} tumour / {slide.get('n_normal', 0)} normal slides",
        "tile_auc": f"{results['tile'].get('n_tumor_tiles', 0)} tumour / {results['tile'].get('n_normal_tiles', 0)} normal tiles",
        "froc": f"{results['froc'].get('n_lesions', 0)} lesions on {results['froc'].get('n_slides', 0)} slides",
    }
    names = {"slide_auc": "slide-level ROC AUC", "tile_auc": "tile-level ROC AUC", "froc": "FROC score"}
    lines = ["| metric | ours | on | published | by |", "|---|---|---|---|---|"]
    for metric in ("slide_auc", "tile_auc", "froc"):
        published = [r for r in REFERENCE_RESULTS if r["metric"] == metric]
        first = True
        for ref in published:
            mine = (_fmt(ours[metric]) + (ci if metric == "slide_auc" else "")) if first else ""
            lines.append(f"| {names[metric] if first else ''} | {mine} | {counts[metric] if first else ''} | "
                         f"{ref['value']:.3f} | {ref['who']} |")
            first = False
    for split in ("macro", "micro"):
        block = (results.get("slide") or {}).get(split) or {}
        if block.get("auc") is not None:
            lines.append(f"| slide AUC, {split} vs normal | {_fmt(block['auc'])} | {block['n_tumor']} / "
                         f"{block['n_normal']} slides | | |")
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
