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
   (:mod:`wsi_ad.tuning`; never used for training); train on N tiles per normal slide → ``RUN/model.pt``.
   With ``--protocol dpa-paper`` the model is trained (``--seeds`` times) on the paper's blocks instead
   (:mod:`pipelines.dpa_protocol`, ``RUN/dpa_paper``), and ``--tune`` selects on blocks as the paper did: three
   folds, the official ``cv_folds`` anomalies with ``--dpa-split`` (else ``--tune-slides`` tumour training slides
   a fold drawn with the config's seed), the normal blocks split by slide;
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

from pipelines.dpa_protocol import FEW_BLOCKS
from pipelines.process import BatchConfig, discover, run_batch
from wsi_ad.atomic import write_text_atomic
from wsi_ad.config import Config
from wsi_ad.errors import WsiAdError
from wsi_ad.metrics import read_reference_csv
from wsi_ad.slide import find_slides

#: Published numbers printed beside ours (source in ``source``).
REFERENCE_RESULTS = (
    {"metric": "tile_auc", "value": 0.934, "who": "DPA paper (Shvetsova et al.), Camelyon16, 64 px tiles at 10x, "
                                                  "measured by its dpa-paper protocol",
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
                   workers: int | None = None, scheduler: str | None = None, slide_classifier: str | None = None,
                   protocol: str = "all-tiles", seeds: int = 1, dpa_split: str | Path | None = None,
                   tune_selection: str = "weakly-supervised", tune_tiles: int | None = None, echo=print) -> dict:
    """Run the protocol (module docstring); returns the results also written to ``RUN/results.json``.

    ``slide_classifier="rf"`` also scores the training slides (normal and tumour) with the model and classifies the
    test slides with a random forest on their heatmap features (:mod:`wsi_ad.slide_classifier`), reported as
    ``slide_rf`` beside the slide AUC of each reducer (``slide_reducers``)."""
    if slide_classifier not in (None, "rf"):
        raise WsiAdError(f"unknown slide classifier {slide_classifier!r} (known: rf)")
    if protocol not in PROTOCOLS:
        raise WsiAdError(f"unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    if seeds < 1:
        raise WsiAdError(f"--seeds must be >= 1, got {seeds}")
    if (seeds > 1 or dpa_split is not None) and protocol != "dpa-paper":
        raise WsiAdError("--seeds and --dpa-split belong to --protocol dpa-paper")
    from wsi_ad.detectors.loop import train

    started = time.perf_counter()
    layout, run = Camelyon16Layout(Path(data)), Path(run)
    layout.check(training=model is None or slide_classifier is not None,
                 tumor_training=(model is None and tune and tune_selection == "weakly-supervised")
                 or slide_classifier is not None)
    read_reference_csv(layout.reference)        # a bad row is an error now, not after hours of scoring
    run.mkdir(parents=True, exist_ok=True)
    cluster = {"workers": workers, "scheduler": scheduler}
    timings: dict[str, float] = {}
    selection = None

    def indent(line: str) -> None:
        echo("    " + line)

    paper = None
    if protocol == "dpa-paper":
        from pipelines.dpa_protocol import make_blocks, run_dpa_paper, select_on_blocks, undefined_reason

        step = time.perf_counter()
        config = config or Config()
        if model is None:
            blocks = make_blocks(layout, run / "dpa_paper", dpa_split, echo)
            if tune:                        # on the blocks, as the paper selected (its cv_folds)
                config, selection = select_on_blocks(layout, run / "dpa_paper", config, space=tune_space,
                                                     split_dir=dpa_split, selection=tune_selection,
                                                     slides_per_fold=tune_slides, max_anomaly_blocks=tune_tiles,
                                                     device=device, blocks=blocks, echo=echo)
                timings["tune"] = time.perf_counter() - step
            paper = run_dpa_paper(layout, run / "dpa_paper", config, seeds=seeds, device=device, split_dir=dpa_split,
                                  blocks=blocks, echo=echo)
            first = next((r["checkpoint"] for r in paper["runs"] if r.get("status") == "ok"), None)
            model = Path(first) if first else None  # no test block: the slide metrics get a model of all tiles
        else:                               # evaluate the given model on the protocol's blocks
            from pipelines.compare import _FolderData

            folder, manifest = make_blocks(layout, run / "dpa_paper", dpa_split, echo)
            paper = {"protocol": manifest["protocol"], "blocks": manifest, "runs": [], "auc_mean": None,
                     "auc_std": None, "n_seeds": 0, "note": undefined_reason(manifest),
                     "n_normal_tiles": manifest["counts"]["test/good"], "n_tumor_tiles": manifest["counts"]["test/tumor"]}
            if paper["note"] is None:
                record = _FolderData(folder).evaluate(Path(model), run / "dpa_paper" / "given", device, echo)
                paper.update(runs=[{**record, "status": "ok"}], auc_mean=record["tile_auc"], auc_std=0.0, n_seeds=1)
        timings["dpa_paper"] = time.perf_counter() - step
    if model is None:
        step = time.perf_counter()
        normal_stores = _normal_training_stores(layout, run, cluster, echo)
        timings["preprocess_training"] = time.perf_counter() - step
        config = config or Config()
        if tune and selection is None:      # (dpa-paper selected on its blocks already)
            step = time.perf_counter()
            config, selection = _select(layout, run, normal_stores, config, tune_space, tune_slides, cluster, echo,
                                        tune_selection, ALL_TILES_TUNE_TILES if tune_tiles is None else tune_tiles)
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
    if find_slides([layout.testing_images]):
        tested = run_batch([layout.testing_images], run / "testing", batch, echo=indent, **cluster)
        tested_results, report = tested.results, tested.report_html
    else:                                       # nothing to score: every reference slide is "not found"
        echo(f"    no slide files in {layout.testing_images}")
        tested_results, report = [], None
    timings["process_testing"] = time.perf_counter() - step

    step = time.perf_counter()
    metrics = evaluate_run(tested_results, layout)
    reducers = slide_reducer_aucs(tested_results, layout)
    timings["metrics"] = time.perf_counter() - step
    slide_rf = None
    if slide_classifier == "rf":
        step = time.perf_counter()
        echo("Scoring the training slides for the slide classifier ...")
        scored = BatchConfig(model=Path(model), device=device)
        training = {label: run_batch([folder], run / name, scored, echo=indent, **cluster).results
                    for label, folder, name in ((0, layout.training_normal, "training_normal"),
                                                (1, layout.training_tumor, "training_tumor"))}
        slide_rf = slide_forest(training, tested_results, layout)
        timings["slide_classifier"] = time.perf_counter() - step
    results = {
        "data": str(layout.root), "run": str(run), "model": str(model),
        "model_id": next((r["model_id"] for r in tested_results if r.get("model_id")), None),
        "hyperparameter_selection": selection,
        "slide": metrics["slide"],
        "slide_reducers": reducers,
        "slide_rf": slide_rf,
        "protocol": protocol,
        "tile": {**metrics["tile"], "protocol": "all-tiles: every tile fully inside a lesion of a tumour test slide "
                                               "against every tile of the normal test slides"},
        "tile_dpa_paper": _paper_summary(paper),
        "froc": metrics["froc"],
        "froc_official": metrics["froc_official"],
        "slides": metrics["slides"],
        "slide_statuses": SLIDE_STATUSES,
        "reference_results": list(REFERENCE_RESULTS),
        "report": str(report) if report else None,
        "seconds": {key: round(value, 1) for key, value in timings.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(run / "results.json", json.dumps(results, indent=2, default=_json_default))
    table = results_table(results)
    write_text_atomic(run / "results.md", table + "\n")
    echo("")
    echo(table)
    echo(f"\nResults: {run / 'results.json'}, {run / 'results.md'}" + (f"; report: {report}" if report else ""))
    return results


def _normal_training_stores(layout: Camelyon16Layout, run: Path, cluster: dict, echo) -> list[Path]:
    """Preprocess the normal training slides into ``run/training_normal`` (a re-run reuses them); their stores with
    tiles. Raises ``WsiAdError`` when none gave tiles."""
    echo("Preprocessing the normal training slides ...")
    prepared = run_batch([layout.training_normal], run / "training_normal", BatchConfig(),
                         echo=lambda line: echo("    " + line), **cluster)
    stores = [Path(r["store"]) for r in prepared.results if r["status"] == "ok" and r.get("n_tiles")]
    if not stores:
        raise WsiAdError(f"no normal training slide gave tiles ({prepared.n_failed} failed); see {prepared.report_html}")
    return stores


#: ``--tune-tiles`` by default with the all-tiles protocol: validation tumour tiles in all (dpa-paper: every block of
#: the fold's tumour slides, up to 50 a slide, as the official folds).
ALL_TILES_TUNE_TILES = 64

#: ``--protocol``: how the tile AUC is measured (the slide AUC and FROC are measured on whole slides in both).
PROTOCOLS = ("all-tiles", "dpa-paper")


def _paper_summary(paper: dict | None) -> dict | None:
    """The dpa-paper protocol's block of ``results.json`` (its per-seed AUCs, no ROC points)."""
    if paper is None:
        return None
    return {"protocol": paper["protocol"], "auc_mean": paper["auc_mean"], "auc_std": paper["auc_std"],
            "note": paper.get("note"),
            "n_seeds": paper["n_seeds"], "aucs": [r.get("tile_auc") for r in paper["runs"] if r.get("status") == "ok"],
            "n_normal_tiles": paper["n_normal_tiles"], "n_tumor_tiles": paper["n_tumor_tiles"],
            "blocks": paper["blocks"], "failed_seeds": [r for r in paper["runs"] if r.get("status") != "ok"],
            "checkpoints": [r.get("checkpoint") for r in paper["runs"] if r.get("status") == "ok"]}


def _heatmaps(results: list[dict]) -> dict[str, tuple]:
    """{slide id: (Heatmap, tile scores)} of every scored slide of a batch (slides without a heatmap left out)."""
    from wsi_ad.heatmap import load_heatmap
    from wsi_ad.scoring import load_scores

    out = {}
    for r in results:
        if r.get("status") == "ok" and r.get("model_id") and r.get("slide_score") is not None:
            out[r["slide_id"]] = (load_heatmap(r["store"], r["model_id"]), load_scores(r["store"], r["model_id"]))
    return out


def slide_reducer_aucs(tested_results: list[dict], layout: Camelyon16Layout) -> dict:
    """Slide AUC over the whole reference of each reducer (``max``, ``topk_mean``, ``percentile`` with their default
    parameters), each computed as the run computes its slide score: on the stored heatmap's interior cells, the
    tissue rim of the run's ``edge_cells`` left out (:func:`wsi_ad.heatmap.heatmap_slide_score`); an unscored slide
    counted wrong as in ``slide``."""
    from wsi_ad.heatmap import DEFAULT_EDGE_CELLS, heatmap_slide_score
    from wsi_ad.metrics import slide_auc_report

    reference = read_reference_csv(layout.reference)
    heatmaps = _heatmaps(tested_results)
    out = {}
    for reducer in ("max", "topk_mean", "percentile"):
        scores = {sid: heatmap_slide_score(heatmap.values, reducer,
                                           edge_cells=int(heatmap.reducer_params.get("edge_cells", DEFAULT_EDGE_CELLS)))
                  for sid, (heatmap, _) in heatmaps.items()}
        scores = {sid: s for sid, s in scores.items() if np.isfinite(s)}
        try:
            out[reducer] = slide_auc_report(reference, scores, missing="wrong")["overall"]["auc"]
        except WsiAdError as exc:
            out[reducer] = None
            out[f"{reducer}_note"] = f"undefined: {exc}"
    return out


def slide_forest(training: dict[int, list[dict]], tested_results: list[dict], layout: Camelyon16Layout) -> dict:
    """The Camelyon16 winner's slide classification (:mod:`wsi_ad.slide_classifier`): thresholds from the training
    normal slides' tile scores, 28 heatmap features a slide, a random forest fitted on the training slides
    (``training``: {0: normal batch results, 1: tumour batch results}), each test slide's probability of metastasis
    and their slide AUC over the whole reference (an unscored slide counted wrong)."""
    from wsi_ad.metrics import slide_auc_report
    from wsi_ad.slide_classifier import FEATURE_NAMES, SlideForest, heatmap_features, thresholds_from_normals

    def features(heatmap) -> np.ndarray:
        cell_um = (heatmap.level0_per_cell[0] * heatmap.mpp_x, heatmap.level0_per_cell[1] * heatmap.mpp_y)
        return heatmap_features(heatmap.values, cell_um, thresholds)

    train = {label: _heatmaps(results) for label, results in training.items()}
    thresholds = thresholds_from_normals([tiles for _, tiles in train[0].values()])
    x, y = [], []
    for label, heatmaps in train.items():
        for heatmap, _ in heatmaps.values():
            x.append(features(heatmap))
            y.append(label)
    forest = SlideForest(seed=0).fit(np.stack(x), y)
    tested = _heatmaps(tested_results)
    probabilities = dict(zip(tested, forest.predict(np.stack([features(h) for h, _ in tested.values()])),
                             strict=True)) if tested else {}
    report = slide_auc_report(read_reference_csv(layout.reference), probabilities, missing="wrong")
    importances = dict(zip(FEATURE_NAMES, forest.forest_.feature_importances_.round(4).tolist(), strict=True))
    return {"auc": report["overall"]["auc"], "overall": report["overall"], "thresholds": list(thresholds),
            "n_training_slides": {"normal": len(train[0]), "tumor": len(train[1])},
            "probabilities": {sid: float(p) for sid, p in probabilities.items()},
            "feature_importances": importances,
            "method": "random forest (200 trees, seed 0, balanced) on 28 heatmap features; thresholds: the 99th and "
                      "99.9th percentile of the training normal slides' tile scores"}


def _held_magnifications(space, stores: list[Path]):
    """``space`` without the ``magnification`` values that some store lacks (``tiles/<mag>``), and those values.
    Raises ``WsiAdError`` when none is left."""
    from dataclasses import replace as _replace

    from wsi_ad.store import SlideStore

    wanted = space.params.get("magnification")
    if not wanted:
        return space, []
    held = set(wanted)
    for store in stores:
        held &= set(SlideStore.open(store).require("tiles").keys())
    kept = [m for m in wanted if m in held]
    if not kept:
        raise WsiAdError(f"the search space's magnifications {wanted} are in none of the stores (tiles/<mag>)")
    return _replace(space, params={**space.params, "magnification": kept}), [m for m in wanted if m not in held]


def _select(layout: Camelyon16Layout, run: Path, normal_stores: list[Path], base: Config, space, n_slides: int,
            cluster: dict, echo, selection: str = "weakly-supervised", anomaly_tiles: int | None = 64
            ) -> tuple[Config, dict]:
    """Hyperparameter selection (:func:`wsi_ad.tuning.tune`): ``weakly-supervised`` on the tumour tiles (at most
    ``anomaly_tiles`` in all) of ``n_slides`` tumour training slides drawn with the base config's seed, or
    ``unsupervised`` (the DPA paper's other criterion: the lowest score of held-out normal tiles; no tumour slide
    is read)."""
    from wsi_ad.config import Config as _Config
    from wsi_ad.tuning import load_space, tune

    tumor_slides, tumor_stores = [], []
    if selection == "weakly-supervised":
        every = discover([layout.training_tumor])
        # drawn at random (seeded), not the first by name: slide names follow the centre and the scanner
        picked = np.random.default_rng(base.train.seed).choice(len(every), min(n_slides, len(every)), replace=False)
        tumor_slides = [every[i] for i in sorted(picked)]
        echo(f"Preprocessing {len(tumor_slides)} tumour training slide(s) for hyperparameter selection "
             f"({', '.join(p.stem for p in tumor_slides)}, drawn with seed {base.train.seed}) ...")
        prepared = run_batch(tumor_slides, run / "training_tumor", BatchConfig(), echo=lambda line: echo("    " + line),
                             **cluster)
        tumor_stores = [Path(r["store"]) for r in prepared.results if r["status"] == "ok" and r.get("n_tiles")]
        if not tumor_stores:
            raise WsiAdError("--tune: no tumour training slide gave tiles")
        echo("Selecting hyperparameters (3-fold cross-validation by slide, one anomaly type) ...")
    else:
        echo("Selecting hyperparameters without anomalies (lowest score of held-out normal tiles, 3 folds) ...")
    search, dropped = _held_magnifications(load_space(space, detector=base.detector), normal_stores + tumor_stores)
    if dropped:
        echo(f"    magnification(s) {', '.join(dropped)} of the search space left out: the stores hold "
             f"{', '.join(search.params['magnification'])} only")
    outcome = tune(normal_stores, tumor_stores or None, layout.training_annotations if tumor_stores else None,
                   run / "tune", selection=selection, base_config=base, space=search, max_anomaly_tiles=anomaly_tiles,
                   echo=lambda line: echo("    " + line))
    summary = {"selection": selection, "results": str(outcome.results_path),
               "best_config": str(outcome.best_config_path), "best": outcome.best, "notes": outcome.notes,
               "tumor_slides": [p.stem for p in tumor_slides], "anomaly_tiles": anomaly_tiles if tumor_stores else 0,
               "magnifications_left_out": dropped}
    return _Config.from_yaml(outcome.best_config_path), summary


#: What each per-slide ``status`` of the evaluation means.
SLIDE_STATUSES = {
    "scored": "scored: in every metric",
    "failed": "failed in `wsi-ad process`: no slide score (counted wrong in the slide AUC), no tiles, lesions missed",
    "no tiles": "no tissue tiles: no slide score (counted wrong in the slide AUC), lesions missed",
    "not found": "no slide file of this id in testing/images: counted like a failed slide",
    "unreadable": "its store could not be read back: counted like a failed slide",
}


#: The two ways the FROC's lesions are measured (``evaluate_run``'s ``froc`` and ``froc_official``).
FROC_PROTOCOLS = {
    "slide-mpp": "per-slide µm/px: each slide's own level-0 µm/px sizes the 75 µm dilation and the 275 µm "
                 "isolated-tumour-cell limit",
    "official": "official: 0.243 µm/px for every slide, as Evaluation_FROC.py",
}


def evaluate_run(results: list[dict], layout: Camelyon16Layout, roc: bool = False) -> dict:
    """Slide AUC, tile AUC and FROC of a scored run, with the whole reference as the denominator.

    Every row of ``reference.csv`` is evaluated, whatever happened to its slide (``SLIDE_STATUSES``): a slide
    without a score counts as a wrong answer in the slide AUC (:func:`wsi_ad.metrics.slide_auc_report`,
    ``missing="wrong"``; the AUC of the scored slides alone is ``scored_only``), the lesions of a tumour slide
    without detections count as missed in the FROC and a normal slide without detections still counts in its
    false positives per slide (:func:`wsi_ad.metrics.froc`), and a slide without tiles adds none to the tile
    AUC (named in ``slides_without_tiles``). A metric that the data leave undefined (one class of tiles, no
    lesion larger than an isolated-tumour-cell cluster) is ``None`` with a ``note`` saying why; it never stops
    the evaluation. Returns ``{"slide", "tile", "froc", "froc_official", "slides"}``: ``froc`` measures each
    slide's lesions with its own µm/px, ``froc_official`` with 0.243 µm/px for every slide as the official script
    (:data:`FROC_PROTOCOLS`; the same on slides scanned at 0.243 µm/px); ``slides`` has one entry per reference row
    (``slide_id``, ``label``, ``metastasis``, ``status``, ``slide_score``, ``n_tiles``, ``n_tumor_tiles``,
    ``n_lesions``, ``n_itc``, ``note``). With ``roc``, ``tile`` also holds the tile ROC curve (``roc``: ``fpr``,
    ``tpr``, at most 400 points)."""
    from wsi_ad.metrics import (
        CAMELYON16_MPP,
        DEFAULT_FROC_EXCLUDE,
        MetricsError,
        evaluation_mask,
        froc,
        normalize_slide_id,
        read_reference_csv,
        slide_auc_report,
        tile_auc,
    )

    reference = read_reference_csv(layout.reference)
    by_key = {normalize_slide_id(r["slide_id"]): r for r in results}
    entries: list[dict] = []
    slide_scores: dict[str, float] = {}
    tumor_tiles: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    normal_tiles: dict[str, np.ndarray] = {}
    detections: dict[str, np.ndarray] = {}
    masks: dict = {}
    official_masks: dict = {}
    no_mask: list[str] = []
    for row in reference:
        result = by_key.get(row.key)
        entry = {"slide_id": row.slide_id, "label": row.label, "metastasis": row.metastasis, "status": "scored",
                 "slide_score": None, "n_tiles": None, "n_tumor_tiles": None, "n_lesions": None, "n_itc": None,
                 "note": None}
        entries.append(entry)
        scored = _read_scored_slide(result, entry)
        if scored is not None:
            slide_scores[row.slide_id] = entry["slide_score"]
        if normalize_slide_id(row.slide_id) in DEFAULT_FROC_EXCLUDE:
            _note(entry, "left out of the FROC, as in the official evaluation")
        if not row.is_tumor:
            masks[row.slide_id] = official_masks[row.slide_id] = None
            if scored is not None:
                normal_tiles[row.slide_id] = scored["scores"]
                detections[row.slide_id] = scored["detections"]
            continue
        mask, annotations = _lesion_mask(layout, row.slide_id, result, entry)
        if mask is None:
            no_mask.append(row.slide_id)
            continue
        masks[row.slide_id] = mask
        official_masks[row.slide_id] = mask if mask.mpp0 == CAMELYON16_MPP else evaluation_mask(
            annotations, mask.level0_size, mpp0=CAMELYON16_MPP)
        entry["n_lesions"], entry["n_itc"] = mask.n_lesions, len(mask.itc_labels)
        if mask.n_regions == 0:
            _note(entry, "its annotations hold no tumour region on the slide: no lesion to find, and every "
                         "detection on it is a false positive")
        if scored is not None:
            detections[row.slide_id] = scored["detections"]
            from wsi_ad.metrics import tile_labels

            labels = tile_labels(scored["coords"], scored["tile0"], annotations)
            tumor_tiles[row.slide_id] = (scored["scores"], labels)
            entry["n_tumor_tiles"] = int((labels == 1).sum())

    slide = slide_auc_report(reference, slide_scores, missing="wrong")
    slide["auc"] = slide["overall"]["auc"]
    keys = {row.key for row in reference}
    slide["unexpected"] = sorted(r["slide_id"] for r in results if normalize_slide_id(r["slide_id"]) not in keys)
    without = [e["slide_id"] for e in entries if e["status"] != "scored"]
    try:
        tile = tile_auc(tumor_tiles, normal_tiles)
    except MetricsError as exc:             # one class of tiles (e.g. every lesion smaller than a tile)
        n_pos = sum(int((labels == 1).sum()) for _, labels in tumor_tiles.values())
        tile = {"auc": None, "note": f"undefined: {exc}", "n_tumor_tiles": n_pos,
                "n_normal_tiles": sum(int(s.size) for s in normal_tiles.values()),
                "n_tumor_slides": len(tumor_tiles), "n_normal_slides": len(normal_tiles)}
    if roc and tile.get("auc") is not None:
        from wsi_ad.metrics import roc_points

        pos = np.concatenate([s[y == 1] for s, y in tumor_tiles.values()])
        neg = np.concatenate(list(normal_tiles.values()))
        points = roc_points(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg], max_points=400)
        tile["roc"] = {"fpr": points["fpr"], "tpr": points["tpr"]}
    tile["min_tumor_overlap"] = 1.0
    tile["slides_without_tiles"] = without
    def froc_block(masks: dict, protocol: str) -> dict:
        try:
            block = froc(detections, masks).as_dict()
        except MetricsError as exc:         # e.g. no lesion larger than an ITC among the reference slides
            n_itc = sum(len(m.itc_labels) for m in masks.values() if m is not None)
            if n_itc:
                exc = f"{exc} ({n_itc} isolated-tumour-cell cluster(s), which the official evaluation neither " \
                      "counts nor penalizes)"
            block = {"score": None, "note": f"undefined: {exc}", "n_lesions": 0,
                     "n_slides": sum(normalize_slide_id(s) not in DEFAULT_FROC_EXCLUDE for s in masks),
                     "missing": [s for s in without if s in masks]}
        block["protocol"] = protocol
        if no_mask:
            block["not_evaluable"] = no_mask
            block["not_evaluable_note"] = "tumour slides whose lesions are unknown (no readable annotation file)"
        return block

    return {"slide": slide, "tile": tile, "froc": froc_block(masks, FROC_PROTOCOLS["slide-mpp"]),
            "froc_official": froc_block(official_masks, FROC_PROTOCOLS["official"]), "slides": entries}


def _note(entry: dict, text: str) -> None:
    entry["note"] = f"{entry['note']}; {text}" if entry["note"] else text


def _read_scored_slide(result: dict | None, entry: dict) -> dict | None:
    """Scores, tile coordinates and heatmap detections of one slide of the run, or None (``entry``'s status
    and note then say why)."""
    from wsi_ad.heatmap import load_heatmap
    from wsi_ad.metrics import detections_from_heatmap
    from wsi_ad.scoring import load_scores
    from wsi_ad.store import SlideStore

    if result is None:
        entry.update(status="not found", note="no slide file of this id in testing/images")
        return None
    entry["n_tiles"] = result.get("n_tiles")
    if result["status"] == "failed":
        entry.update(status="failed", note=f"{result.get('failed_task')}: {result.get('error')}")
        return None
    if not result.get("model_id") or result.get("slide_score") is None:
        entry.update(status="no tiles", note="no tissue tiles to score" + "".join(
            f"; {w}" for w in result.get("warnings", [])[:1]))
        return None
    try:
        store = SlideStore.open(result["store"])
        scores = load_scores(store, result["model_id"])
        heatmap = load_heatmap(store, result["model_id"])
        tiles = store.require("tiles")
        coords, tile0 = np.asarray(tiles["coords"][:]), tuple(tiles.attrs["geometry"]["tile0"])
    except (WsiAdError, OSError, KeyError) as exc:
        entry.update(status="unreadable", note=f"{result['store']}: {exc}")
        return None
    entry["slide_score"] = float(result["slide_score"])
    offset = ((heatmap.tile0[0] - heatmap.level0_per_cell[0]) / 2, (heatmap.tile0[1] - heatmap.level0_per_cell[1]) / 2)
    found = detections_from_heatmap(heatmap.values, heatmap.level0_per_cell,
                                    origin=(heatmap.origin_level0[0] + offset[0], heatmap.origin_level0[1] + offset[1]))
    return {"scores": scores, "coords": coords, "tile0": tile0, "detections": found}


def _lesion_mask(layout: Camelyon16Layout, slide_id: str, result: dict | None, entry: dict):
    """(evaluation mask, annotations) of a tumour reference slide from its ASAP XML, or (None, None) with a
    note in ``entry``. The slide's level-0 size and µm/px come from the run; for a slide that could not be
    opened they are the annotations' extent (plus the dilation margin) and the Camelyon16 0.243 µm/px."""
    from wsi_ad.annotations import AnnotationError, annotation_file, read_asap_xml
    from wsi_ad.metrics import CAMELYON16_MPP, DILATION_UM, MetricsError, evaluation_mask

    try:
        xml = annotation_file(layout.testing_annotations, slide_id)
        if xml is None:
            _note(entry, f"tumour slide without {slide_id}.xml in {layout.testing_annotations}: its lesions are unknown, "
                 "it is left out of the FROC and the tile AUC")
            return None, None
        annotations = read_asap_xml(xml)
    except AnnotationError as exc:
        _note(entry, f"its lesions are unknown ({exc}), it is left out of the FROC and the tile AUC")
        return None, None
    size = (result or {}).get("width"), (result or {}).get("height")
    mpp = (result or {}).get("mpp") or CAMELYON16_MPP
    if not all(size):
        margin = 4 * DILATION_UM / mpp
        points = np.concatenate([a.vertices for a in annotations]) if annotations else np.zeros((1, 2))
        size = tuple(int(np.ceil(points[:, i].max() + margin)) + 1 for i in (0, 1))
        _note(entry, f"lesions counted on the annotations alone (slide size unknown; {mpp} µm/px)")
    try:
        return evaluation_mask(annotations, size, mpp0=mpp), annotations
    except MetricsError as exc:
        _note(entry, f"its lesions are unknown ({exc}), it is left out of the FROC and the tile AUC")
        return None, None


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def results_table(results: dict) -> str:
    """Markdown: each metric, ours (or why it is undefined), and the published numbers beside it; then every
    reference slide that is not in every metric, with its status and reason."""
    slide_block = results.get("slide") or {}
    slide = slide_block.get("overall", {})
    blocks = {"slide_auc": slide, "tile_auc": results["tile"], "froc": results["froc"]}
    ours = {"slide_auc": slide.get("auc"), "tile_auc": results["tile"].get("auc"), "froc": results["froc"].get("score")}
    ci = f" (95% CI {_fmt(slide.get('ci_low'))}–{_fmt(slide.get('ci_high'))})" if slide.get("auc") is not None else ""
    unscored = len(slide_block.get("missing") or [])
    counts = {
        "slide_auc": f"{slide.get('n_tumor', 0)} tumour / {slide.get('n_normal', 0)} normal slides"
                     + (f", {unscored} unscored counted wrong" if unscored and slide_block.get("missing_counted_as") == "wrong"
                        else ""),
        "tile_auc": f"{results['tile'].get('n_tumor_tiles', 0)} tumour / {results['tile'].get('n_normal_tiles', 0)} normal tiles",
        "froc": f"{results['froc'].get('n_lesions', 0)} lesion(s) on {results['froc'].get('n_slides', 0)} slides",
    }
    names = {"slide_auc": "slide-level ROC AUC", "tile_auc": "tile-level ROC AUC (all-tiles protocol)",
             "froc": "FROC score (per-slide µm/px)"}
    lines = ["| metric | ours | on | published | by |", "|---|---|---|---|---|"]
    paper = results.get("tile_dpa_paper")
    for metric in ("slide_auc", "tile_auc", "froc"):
        published = [r for r in REFERENCE_RESULTS if r["metric"] == metric]
        if metric == "tile_auc" and paper is not None:
            # the paper's 0.934 goes beside the number measured its way; the all-tiles one stands alone
            spread = f" ± {paper['auc_std']:.3f}" if paper["n_seeds"] > 1 else ""
            value = "undefined" if paper["auc_mean"] is None else f"{paper['auc_mean']:.3f}{spread}"
            for ref in published:
                lines.append(f"| tile-level ROC AUC (dpa-paper protocol) | {value} | "
                             f"{paper['n_tumor_tiles']} tumour / {paper['n_normal_tiles']} normal tiles, "
                             f"{paper['n_seeds']} seed(s), {paper['blocks']['source']} | {ref['value']:.3f} | "
                             f"{ref['who']} |")
            published = [{"value": None, "who": ""}]
        first = True
        for ref in published:
            if first:
                mine = _fmt(ours[metric]) + (ci if metric == "slide_auc" else "") if ours[metric] is not None \
                    else "undefined"
            value = "" if ref["value"] is None else f"{ref['value']:.3f}"
            lines.append(f"| {names[metric] if first else ''} | {mine if first else ''} | "
                         f"{counts[metric] if first else ''} | {value} | {ref['who']} |")
            first = False
        official = results.get("froc_official")
        if metric == "froc" and official is not None:
            lines.append(f"| FROC score (official: 0.243 µm/px) | "
                         f"{_fmt(official['score']) if official.get('score') is not None else 'undefined'} | "
                         f"{official.get('n_lesions', 0)} lesion(s) on {official.get('n_slides', 0)} slides | | |")
    for reducer, auc in (results.get("slide_reducers") or {}).items():
        if not reducer.endswith("_note"):
            lines.append(f"| slide AUC, reducer `{reducer}` | {_fmt(auc)} | {counts['slide_auc']} | | |")
    rf = results.get("slide_rf")
    if rf:
        lines.append(f"| slide AUC, random forest on 28 heatmap features | {_fmt(rf['auc'])} | {counts['slide_auc']}; "
                     f"trained on {rf['n_training_slides']['tumor']} tumour / {rf['n_training_slides']['normal']} "
                     "normal training slides | | |")
    scored_only = slide_block.get("scored_only") or {}
    if unscored and scored_only.get("auc") is not None:
        lines.append(f"| slide AUC, scored slides only | {_fmt(scored_only['auc'])} | {scored_only['n_tumor']} / "
                     f"{scored_only['n_normal']} slides | | |")
    for split in ("macro", "micro"):
        block = slide_block.get(split) or {}
        if block.get("auc") is not None:
            lines.append(f"| slide AUC, {split} vs normal | {_fmt(block['auc'])} | {block['n_tumor']} / "
                         f"{block['n_normal']} slides | | |")
    notes = [f"- {names[metric]} undefined: {blocks[metric].get('note', '').removeprefix('undefined: ')}"
             for metric in ("slide_auc", "tile_auc", "froc") if ours[metric] is None]
    if paper is not None and paper.get("note"):
        notes.append(f"- tile-level ROC AUC (dpa-paper protocol) undefined: {paper['note'].removeprefix('undefined: ')}")
    if paper is not None and paper["auc_mean"] is not None and paper["n_tumor_tiles"] < FEW_BLOCKS:
        notes.append(f"- the dpa-paper tile AUC rests on {paper['n_tumor_tiles']} tumour tile(s) (the paper's test set: "
                     "817): read it as coarse")
    if paper is not None and paper["blocks"].get("not_stain_normalised"):
        notes.append("- dpa-paper blocks not stain-normalised (no stain fit): "
                     + ", ".join(paper["blocks"]["not_stain_normalised"]))
    if notes:
        lines += ["", *notes]
    selection = results.get("hyperparameter_selection") or {}
    if selection.get("best"):
        best = selection["best"]
        criterion = (f"validation tile AUC {best['auc_mean']:.3f} ± {best['auc_std']:.3f}" if best.get("auc_mean")
                     is not None else f"mean score of the held-out normal tiles {best['normal_score_mean']:.4g}")
        where = ("on the dpa-paper blocks, " + str(len(selection.get("folds") or [])) + " folds split by normal slide"
                 if selection.get("protocol") == "dpa-paper" else "on the tiles of the normal training slides, "
                                                                  "3 folds by slide")
        if selection.get("tumor_slides"):
            where += ", anomalies from " + ", ".join(selection["tumor_slides"])
        lines += ["", f"Hyperparameters: {selection['selection']} selection {where}: "
                      f"{json.dumps(best['params'], default=str)} ({criterion}); {selection['best_config']}"]
    unexpected = slide_block.get("unexpected") or []
    if unexpected:
        lines += ["", f"Slides in testing/images but not in reference.csv (not evaluated): {', '.join(unexpected)}"]
    partial = [e for e in results.get("slides", []) if e["status"] != "scored" or e.get("note")]
    if partial:
        lines += ["", f"Reference slides not in every metric ({len(partial)} of {len(results['slides'])}):", "",
                  "| slide | label | status | why |", "|---|---|---|---|"]
        lines += [f"| {e['slide_id']} | {e['label']} | {e['status']} | {(e.get('note') or '').replace('|', '/')} |"
                  for e in partial]
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
