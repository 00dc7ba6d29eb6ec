"""The DPA paper's Camelyon16 tile protocol (``wsi-ad evaluate camelyon16 --protocol dpa-paper``).

Shvetsova et al., "Anomaly detection in medical imaging with deep perceptual autoencoders" (IEEE Access 2021),
official code ``ninatu/anomaly_detection`` (its ``folds/`` lists, :mod:`wsi_ad.dpa_split`). The paper did not score
every tile of every slide. It took at most 50 blocks of 768 x 768 px at level 0 (40x) per slide, tumour blocks
fully inside a lesion, normal test blocks from the normal test slides only (4,000 from 80 slides; 817 tumour blocks
from 24 tumour test slides; Test_114 left out), resized each block to 192 x 192 px (10x) and gave the model a
64 x 64 px crop: a random crop for training, the centre crop for testing. Its 0.934 tile ROC AUC is measured on
those 4,817 tiles. This module measures the same way:

1. the block lists: the official ones when their folder is given (``--dpa-split``, e.g.
   ``shared/data/camelyon16/dpa_split``), else lists built by the paper's rules from the dataset itself
   (:func:`rule_lists`: per slide, up to 50 random, seeded 768 px blocks of a non-overlapping grid with at least
   half their area tissue (the pipeline's tile rule and Otsu mask); on tumour test slides, blocks fully inside the
   lesion polygons);
2. each block read from its slide at level 0, stain-normalised as the pipeline normalises the slide's tiles
   (the slide's Vahadane fit on its whole tissue, mapped to the reference stain), resized to 192 px (area
   average) and written as PNG into an anomalib Folder (``train/good``, ``test/good``, ``test/tumor``);
3. ``seeds`` trainings on ``train/good`` (random 64 px crops, the pool's augmentation), each scored on the centre
   crops of ``test/`` (:func:`pipelines.compare.run_one`): tile AUC mean ± std (population std, as the paper).

A slide that a list names but the dataset lacks, or that cannot be read, is recorded and skipped; the protocol
stops only when no training block is left. Without a normal or a tumour test block its tile AUC is undefined,
with the reason, and nothing is trained on the blocks. Every output is written atomically and a re-run reuses the
blocks and the finished trainings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from wsi_ad.atomic import write_text_atomic
from wsi_ad.config import Config
from wsi_ad.dpa_split import Block, read_dpa_split
from wsi_ad.errors import WsiAdError

#: The paper's block: 768 px at level 0, resized to 192 px (10x), a 64 px crop of it the model's input.
BLOCK_PX = 768
BLOCK_RESIZED_PX = 192
BLOCKS_PER_SLIDE = 50
#: Test slides the paper (and the official FROC) leaves out.
EXCLUDED_SLIDES = frozenset({"test_114"})
PROTOCOL = ("dpa-paper: <= 50 blocks of 768 px at 40x a slide, resized to 192 px (10x), random 64 px crops for "
            "training, the centre crop for testing; normal test tiles from normal test slides only")


@dataclass(frozen=True)
class BlockLists:
    """The blocks of the protocol: ``train`` (normal training slides), ``test_normal``, ``test_tumor`` (test
    slides), and where they come from (``source``)."""

    train: list[Block]
    test_normal: list[Block]
    test_tumor: list[Block]
    source: str


def official_lists(split_dir: str | Path) -> BlockLists:
    """The official lists of ``split_dir`` (:func:`wsi_ad.dpa_split.read_dpa_split`), Test_114 left out."""
    split = read_dpa_split(split_dir)

    def keep(blocks):
        return [b for b in blocks if b.slide not in EXCLUDED_SLIDES]

    return BlockLists(keep(split.normal_train), keep(split.normal_test), keep(split.anomaly_test),
                      f"official lists ({split_dir})")


def _tissue_blocks(path: Path, rng: np.random.Generator, annotations=None, n: int = BLOCKS_PER_SLIDE) -> list[tuple]:
    """Up to ``n`` random blocks (level-0 x, y) of a non-overlapping 768 px grid with >= 50 % tissue; with
    ``annotations``, only blocks fully inside the lesions."""
    from wsi_ad.metrics import tile_labels
    from wsi_ad.slide import open_slide
    from wsi_ad.tissue import mask_slide

    with open_slide(path) as slide:
        mask, _ = mask_slide(slide)
        width, height = slide.dimensions
        xs, ys = np.meshgrid(np.arange(0, width - BLOCK_PX + 1, BLOCK_PX), np.arange(0, height - BLOCK_PX + 1, BLOCK_PX))
        corners = np.stack([xs.ravel(), ys.ravel()], axis=1)
        if not len(corners):
            return []
        boxes = np.column_stack([corners, np.full((len(corners), 2), BLOCK_PX)])
        keep = mask.tissue_fraction(boxes, (slide.mpp_x, slide.mpp_y)) >= 0.5
    if annotations is not None:
        keep &= tile_labels(corners, (BLOCK_PX, BLOCK_PX), annotations) == 1
    chosen = corners[keep]
    if len(chosen) > n:
        chosen = chosen[np.sort(rng.choice(len(chosen), n, replace=False))]
    return [(int(x), int(y)) for x, y in chosen]


def rule_lists(layout, seed: int = 0, echo=print) -> BlockLists:
    """Block lists built by the paper's rules from a Camelyon16-like ``layout`` (module docstring): every normal
    training slide, and every test slide of ``reference.csv`` (tumour slides: blocks inside the lesions of
    ``testing/lesion_annotations``; a tumour slide without annotations is skipped), seeded by ``seed`` and slide."""
    from wsi_ad.annotations import annotation_file, read_asap_xml
    from wsi_ad.metrics import read_reference_csv
    from wsi_ad.slide import find_slides, slide_id_of

    def rng(slide_id: str) -> np.random.Generator:
        return np.random.default_rng([seed, *slide_id.encode()])

    train = []
    for path in find_slides([layout.training_normal]):
        sid = slide_id_of(path).lower()
        train += [Block(sid, "normal", x, y, (BLOCK_PX, BLOCK_PX)) for x, y in _tissue_blocks(path, rng(sid))]
    test_normal, test_tumor = [], []
    files = {slide_id_of(p).lower(): p for p in find_slides([layout.testing_images])}
    for row in read_reference_csv(layout.reference):
        sid = row.slide_id.lower()
        if sid in EXCLUDED_SLIDES or sid not in files:
            continue
        if row.is_tumor:
            xml = annotation_file(layout.testing_annotations, row.slide_id)
            if xml is None:
                echo(f"    {row.slide_id}: no lesion annotations, no tumour blocks")
                continue
            blocks = _tissue_blocks(files[sid], rng(sid), read_asap_xml(xml))
            test_tumor += [Block(sid, "tumor", x, y, (BLOCK_PX, BLOCK_PX)) for x, y in blocks]
        else:
            test_normal += [Block(sid, "normal", x, y, (BLOCK_PX, BLOCK_PX)) for x, y in _tissue_blocks(files[sid], rng(sid))]
    return BlockLists(train, test_normal, test_tumor, f"built by the paper's rules (seed {seed})")


def _read_block(slide, block: Block, normalizer) -> np.ndarray:
    """The block at level 0, stain-normalised (``normalizer``), resized to 192 px by area averaging:
    (192, 192, 3) uint8."""
    from PIL import Image

    region = normalizer(slide.read_level(0, (block.x, block.y), block.size))
    return np.asarray(Image.fromarray(region).resize((BLOCK_RESIZED_PX, BLOCK_RESIZED_PX), Image.BOX))


def _extract(groups: dict[Path, list[Block]], files: dict[str, Path], echo) -> tuple[dict, set, dict, dict]:
    """Write every block of ``groups`` (folder -> blocks) as ``<folder>/<slide>_x<x>_y<y>.png`` (192 px,
    :func:`_read_block`), each slide normalised by its stain fitted on its whole tissue; files already there are
    kept. Returns (blocks written per folder, slides missing from ``files``, failed slides with the reason, each
    slide's stain-fit method)."""
    from PIL import Image

    from wsi_ad.slide import open_slide
    from wsi_ad.stain import DEFAULT_TARGET, StainNormalizer, fit_slide_stain
    from wsi_ad.tissue import mask_slide

    missing, failed, counts, stain = set(), {}, {}, {}
    for folder, blocks in groups.items():
        folder.mkdir(parents=True, exist_ok=True)
        by_slide: dict[str, list[Block]] = {}
        for block in blocks:
            by_slide.setdefault(block.slide, []).append(block)
        written = 0
        for sid, slide_blocks in sorted(by_slide.items()):
            if sid not in files:
                missing.add(sid)
                continue
            if sid in failed:
                continue
            todo = [b for b in slide_blocks if not (folder / block_file_name(b)).is_file()]
            try:
                if todo:
                    with open_slide(files[sid]) as slide:
                        width, height = slide.dimensions
                        outside = [b for b in todo if b.x + b.size[0] > width or b.y + b.size[1] > height]
                        if outside:         # a list made for another slide of this name: none of its blocks is used
                            raise WsiAdError(f"{len(outside)} of its {len(slide_blocks)} listed blocks lie outside "
                                             f"the slide ({width} x {height} px), e.g. at ({outside[0].x}, "
                                             f"{outside[0].y}): not the slide the list names")
                        fit = fit_slide_stain(slide, mask_slide(slide)[0])
                        stain[sid] = fit.method
                        normalizer = StainNormalizer(fit, DEFAULT_TARGET)
                        for b in todo:
                            target = folder / block_file_name(b)
                            tmp = target.with_name(f".{target.stem}.tmp.png")     # hidden: never read as a tile
                            Image.fromarray(_read_block(slide, b, normalizer)).save(tmp)
                            tmp.replace(target)
                written += len(slide_blocks)
            except WsiAdError as exc:
                failed[sid] = str(exc)
                echo(f"    {sid}: FAILED ({exc})")
        counts[folder] = written
    return counts, missing, failed, stain


def block_file_name(block: Block) -> str:
    """The PNG name of a block in the protocol's folders: ``<slide>_x<x>_y<y>.png`` (level-0 px)."""
    return f"{block.slide}_x{block.x}_y{block.y}.png"


def slide_of_file(path: Path) -> str:
    """The slide id of a block PNG (:func:`block_file_name`)."""
    return path.name.rsplit("_x", 1)[0]


def _slide_files(layout) -> dict[str, Path]:
    """Every slide file of the layout by lower-case slide id (training normal and tumour, testing)."""
    from wsi_ad.slide import find_slides, slide_id_of

    folders = [f for f in (layout.training_normal, layout.training_tumor, layout.testing_images) if f.is_dir()]
    return {slide_id_of(p).lower(): p for p in find_slides(folders)}


def build_block_folder(layout, lists: BlockLists, out: str | Path, echo=print) -> tuple[Path, dict]:
    """Extract every block of ``lists`` into ``out/blocks`` (an anomalib Folder of 192 px PNGs: ``train/good``,
    ``test/good``, ``test/tumor``), each normalised as the pipeline normalises a slide's tiles: the slide's stain
    fitted on its whole tissue (:func:`wsi_ad.stain.fit_slide_stain` on the Otsu mask) and mapped to the reference
    stain at level 0, before the resize. Returns (``out/blocks``, the manifest also written to ``out/blocks.json``:
    source, counts, each slide's stain-fit method, missing and failed slides). Finished files are kept by a re-run.
    Raises ``WsiAdError`` when no training block could be made; a folder without normal or tumour test blocks is
    returned as it is (the caller reports the tile AUC undefined).
    """
    out = Path(out)
    blocks_dir = out / "blocks"
    groups = {"train/good": lists.train, "test/good": lists.test_normal, "test/tumor": lists.test_tumor}
    written, missing, failed, stain = _extract({blocks_dir / k: v for k, v in groups.items()}, _slide_files(layout),
                                               echo)
    counts = {k: written[blocks_dir / k] for k in groups}
    if not counts["train/good"]:
        raise WsiAdError(f"dpa-paper protocol: no training block could be made ({len(lists.train)} listed; slides "
                         f"missing from the dataset: {len(missing)}; failed: {len(failed)}"
                         + (f", e.g. {next(iter(failed))}: {next(iter(failed.values()))}" if failed else "") + ")")
    echo(f"    {counts['train/good']} training, {counts['test/good']} normal and {counts['test/tumor']} tumour test "
         f"blocks ({lists.source})")
    unnormalised = sorted(sid for sid, method in stain.items() if method == "identity")
    if unnormalised:
        echo(f"    warning: no stain fit for {', '.join(unnormalised)}: their blocks are not stain-normalised")
    manifest = {"protocol": PROTOCOL, "source": lists.source, "counts": counts,
                "listed": {"train": len(lists.train), "test_normal": len(lists.test_normal),
                           "test_tumor": len(lists.test_tumor)},
                "stain_fit": stain, "not_stain_normalised": unnormalised,
                "missing_slides": sorted(missing), "failed_slides": failed}
    write_text_atomic(out / "blocks.json", json.dumps(manifest, indent=2))
    return blocks_dir, manifest


def undefined_reason(manifest: dict) -> str | None:
    """Why the protocol's tile AUC is undefined (no normal or no tumour test block), or None."""
    counts, listed = manifest["counts"], manifest["listed"]
    if counts["test/tumor"] == 0:
        return (f"undefined: no tumour test block ({listed['test_tumor']} listed; a tumour block must be a whole "
                f"{BLOCK_PX} px block of the slide's {BLOCK_PX} px grid inside a lesion, so lesions below about "
                f"{2 * BLOCK_PX * 0.243 / 1000:.1f} mm across rarely give one: use larger lesions or slides)")
    if counts["test/good"] == 0:
        return f"undefined: no normal test block ({listed['test_normal']} listed)"
    return None


def make_blocks(layout, out: str | Path, split_dir: str | Path | None = None, echo=print) -> tuple[Path, dict]:
    """The protocol's block folder of ``layout`` in ``out`` (:func:`build_block_folder`) from the official lists of
    ``split_dir``, or from lists built by the paper's rules (:func:`rule_lists`) when it is None."""
    echo("dpa-paper protocol: " + ("reading the official block lists ..." if split_dir else
                                   "building block lists by the paper's rules ..."))
    lists = official_lists(split_dir) if split_dir else rule_lists(layout, echo=echo)
    return build_block_folder(layout, lists, out, echo=echo)


#: The shape of the official selection folds (``cv_folds/K``): three folds, each validating on up to 50 blocks of each
#: of two training tumour slides and on a fifth of the normal training blocks.
SELECTION_FOLDS = 3
#: Fewer tumour blocks than this in a selection fold or the test set: the run warns that its AUC is coarse.
FEW_BLOCKS = 30
SELECTION_SLIDES_PER_FOLD = 2
NORMAL_GROUPS = 5


def normal_slide_groups(slides, seed: int = 0, folds: int = SELECTION_FOLDS) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(training slides, validation slides) of each selection fold, split by slide: the normal training slides,
    shuffled with ``seed``, dealt into :data:`NORMAL_GROUPS` groups (fewer with fewer slides); fold k validates on
    group k and trains on every other slide. This keeps the official folds' share (a fifth of the normal blocks
    held out per fold) without their leak: the official folds split the blocks, not the slides, so every
    validation block's slide is also trained on. Raises ``WsiAdError`` with fewer than two slides."""
    slides = sorted(set(slides))
    if len(slides) < 2:
        raise WsiAdError(f"hyperparameter selection by slide needs at least 2 normal training slides with blocks, got "
                         f"{len(slides)}")
    order = np.random.default_rng([int(seed), 5]).permutation(len(slides))
    groups = [sorted(slides[i] for i in part) for part in np.array_split(order, min(NORMAL_GROUPS, len(slides)))]
    return [(tuple(s for s in slides if s not in groups[k]), tuple(groups[k])) for k in range(min(folds, len(groups)))]


def rule_selection_anomalies(layout, seed: int = 0, slides_per_fold: int = SELECTION_SLIDES_PER_FOLD,
                             folds: int = SELECTION_FOLDS, echo=print) -> list[list[Block]]:
    """Each fold's validation anomalies by the official folds' rule, for data without the official lists:
    ``slides_per_fold`` annotated tumour training slides drawn at random for each fold (seeded by ``seed`` and the
    fold, so folds may share a slide, as the official ones do), and the blocks fully inside their lesions (up to 50
    a slide, :func:`_tissue_blocks`). Raises ``WsiAdError`` when no tumour training slide has annotations."""
    from wsi_ad.annotations import annotation_file, read_asap_xml
    from wsi_ad.slide import find_slides, slide_id_of

    if slides_per_fold < 1:
        raise WsiAdError(f"--tune-slides must be >= 1, got {slides_per_fold}")
    annotated = []
    for path in find_slides([layout.training_tumor]):
        xml = annotation_file(layout.training_annotations, slide_id_of(path))
        if xml is None:
            echo(f"    {slide_id_of(path)}: no lesion annotations, not a selection slide")
        else:
            annotated.append((path, xml))
    if not annotated:
        raise WsiAdError(f"weakly-supervised selection: no tumour training slide in {layout.training_tumor} has its "
                         f"lesion annotations in {layout.training_annotations}")
    cache: dict[str, list[Block]] = {}
    chosen = []
    for k in range(folds):
        picked = np.random.default_rng([int(seed), 19, k]).choice(len(annotated), min(slides_per_fold, len(annotated)),
                                                                   replace=False)
        blocks = []
        for i in sorted(picked):
            path, xml = annotated[i]
            sid = slide_id_of(path).lower()
            if sid not in cache:
                rng = np.random.default_rng([int(seed), *sid.encode()])
                cache[sid] = [Block(sid, "tumor", x, y, (BLOCK_PX, BLOCK_PX))
                              for x, y in _tissue_blocks(path, rng, read_asap_xml(xml))]
                if not cache[sid]:
                    echo(f"    {sid}: no whole {BLOCK_PX} px grid block inside its lesions, no validation block")
            blocks += cache[sid]
        chosen.append(blocks)
    return chosen


def _link_folder(folder: Path, files: list[Path]) -> Path:
    """``folder`` holding a symbolic link to each of ``files`` (a fold's training blocks without copying them);
    kept when it already links exactly those names, else rebuilt beside it and renamed into place."""
    import shutil

    wanted = sorted(f.name for f in files)
    if folder.is_dir() and sorted(p.name for p in folder.iterdir()) == wanted:
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        (tmp / f.name).symlink_to(f.resolve())
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _block_pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))


def select_on_blocks(layout, run: str | Path, config: Config, *, space=None, split_dir: str | Path | None = None,
                     selection: str = "weakly-supervised", slides_per_fold: int = SELECTION_SLIDES_PER_FOLD,
                     max_anomaly_blocks: int | None = None, device: str | None = None, blocks=None,
                     echo=print) -> tuple[Config, dict]:
    """Hyperparameter selection on the protocol's blocks, as the DPA paper ran it (its ``cv_folds``): for each of
    three folds, every candidate of ``space`` (default: the detector's) trains on the 64 px crops of the fold's
    normal training blocks and is scored on the centre crops of its held-out normal blocks and (weakly-supervised)
    its validation anomalies; the best mean tile AUC over the folds wins (``unsupervised``: the lowest mean score
    of the held-out normal blocks). :func:`wsi_ad.tuning.tune_image_folds` runs the search into ``run/tune``.

    - Validation anomalies: the official folds' lists (``cv_folds/K/anomaly/test.txt`` of ``split_dir``: 50 blocks
      of each of two training tumour slides), else :func:`rule_selection_anomalies` (``slides_per_fold`` tumour
      training slides drawn with the config's seed); at most ``max_anomaly_blocks`` a fold (seeded; None: all).
      They are extracted like every block, into ``selection/tumor`` beside the block folder.
    - Normal blocks: the protocol's training blocks, split by slide (:func:`normal_slide_groups`), not by block as
      the official folds are; each fold's training blocks are a folder of links, ``selection/folds/K/train``.

    ``blocks``: the (folder, manifest) of :func:`make_blocks` when already made (else made in ``run``); the
    search's outputs go to ``run/tune``. Returns (the winner's
    :class:`Config`, the summary recorded in ``results.json``). Raises ``WsiAdError`` when a fold has no
    validation anomaly block, :class:`wsi_ad.tuning.TuneError` when no candidate could be evaluated."""
    from wsi_ad.tuning import ImageFold, ImageTileSample, load_space, tune_image_folds

    run = Path(run)
    folder, _ = blocks or make_blocks(layout, run, split_dir, echo)
    material = Path(folder).parent / "selection"         # shared by every search on these blocks
    seed = config.train.seed
    supervised = selection == "weakly-supervised"
    by_slide: dict[str, list[Path]] = {}
    for f in _block_pngs(folder / "train" / "good"):
        by_slide.setdefault(slide_of_file(f), []).append(f)
    pairs = normal_slide_groups(by_slide, seed)
    anomaly_files: list[list[Path]] = [[] for _ in pairs]
    source = None
    if supervised:
        if split_dir:
            from wsi_ad.dpa_split import read_dpa_split

            lists = [fold["anomaly_val"] for fold in read_dpa_split(split_dir).folds]
            source = f"the official folds' validation anomalies ({split_dir}/cv_folds)"
        else:
            lists = rule_selection_anomalies(layout, seed, slides_per_fold, len(pairs), echo)
            source = (f"{slides_per_fold} tumour training slide(s) a fold drawn with seed {seed}, their blocks inside "
                      "the lesions")
        echo(f"dpa-paper selection: validation anomalies from {source} ...")
        unique = list({(b.slide, b.x, b.y): b for blocks_k in lists for b in blocks_k}.values())
        tumor_dir = material / "tumor"
        _, missing, failed, _ = _extract({tumor_dir: unique}, _slide_files(layout), echo)
        for k in range(len(pairs)):
            files = [tumor_dir / block_file_name(b) for b in lists[k] if (tumor_dir / block_file_name(b)).is_file()]
            if max_anomaly_blocks is not None and len(files) > max_anomaly_blocks:
                keep = np.random.default_rng([int(seed), 23, k]).choice(len(files), max_anomaly_blocks, replace=False)
                files = [files[i] for i in sorted(keep)]
            if not files:
                slides = sorted({b.slide for b in lists[k]})
                raise WsiAdError(f"dpa-paper selection: fold {k} has no validation anomaly block (its tumour slides: "
                                 f"{', '.join(slides) or 'none'}; missing from the dataset: "
                                 f"{', '.join(sorted(missing & set(slides))) or 'none'}; failed: "
                                 f"{', '.join(sorted(set(failed) & set(slides))) or 'none'}; a block must be a whole "
                                 f"{BLOCK_PX} px grid block inside a lesion)")
            anomaly_files[k] = files
            empty = sorted({b.slide for b in lists[k]} - {slide_of_file(f) for f in files})
            echo(f"    fold {k}: {len(files)} validation tumour block(s) of "
                 f"{', '.join(sorted({slide_of_file(f) for f in files}))}"
                 + (f" ({', '.join(empty)}: none)" if empty else "")
                 + (f"; warning: an AUC on fewer than {FEW_BLOCKS} tumour blocks is coarse (the official folds: "
                    "100)" if len(files) < FEW_BLOCKS else ""))
    folds = []
    for k, (train_slides, validation_slides) in enumerate(pairs):
        train_dir = _link_folder(material / "folds" / str(k) / "train",
                                 [f for s in train_slides for f in by_slide[s]])
        folds.append(ImageFold(
            k, (train_dir,), ImageTileSample([f for s in validation_slides for f in by_slide[s]]),
            ImageTileSample(anomaly_files[k]) if supervised else None, frozenset(train_slides),
            frozenset(validation_slides), frozenset(slide_of_file(f) for f in anomaly_files[k])))
    search = load_space(space, detector=config.detector)
    dropped = search.params.get("magnification", [])
    if dropped:                             # the blocks are at 10x by the protocol
        from dataclasses import replace as _replace

        search = _replace(search, params={k: v for k, v in search.params.items() if k != "magnification"})
        echo(f"    the search space's magnification(s) {', '.join(dropped)} left out: the protocol's blocks are at 10x")
    echo(f"Selecting hyperparameters on the blocks ({len(folds)} folds split by normal slide, "
         + ("weakly-supervised" if supervised else "unsupervised") + ") ...")
    settings = {"protocol": PROTOCOL, "anomalies": source, "normal_split": "by slide (normal_slide_groups)",
                "seed": seed, "slides_per_fold": slides_per_fold if supervised and not split_dir else None,
                "max_anomaly_blocks": max_anomaly_blocks}
    outcome = tune_image_folds(folds, run / "tune", selection=selection, base_config=config, space=search,
                               device=device, settings=settings, echo=lambda line: echo("    " + line))
    summary = {"selection": selection, "protocol": "dpa-paper", "results": str(outcome.results_path),
               "best_config": str(outcome.best_config_path), "best": outcome.best, "notes": outcome.notes,
               "anomalies": source,
               "tumor_slides": sorted({s for f in folds for s in f.anomaly_slides}),
               "anomaly_tiles": sum(len(f.anomalies) for f in folds if f.anomalies is not None),
               "folds": [{"fold": f.index, "train_slides": len(f.train_slides),
                          "validation_slides": sorted(f.validation_slides), "normal_blocks": len(f.normals),
                          "anomaly_slides": sorted(f.anomaly_slides),
                          "anomaly_blocks": len(f.anomalies) if f.anomalies is not None else 0} for f in folds],
               "magnifications_left_out": dropped}
    return Config.from_yaml(outcome.best_config_path), summary


def run_dpa_paper(layout, run: str | Path, config: Config, *, seeds: int = 1, device: str = "auto",
                  split_dir: str | Path | None = None, blocks=None, echo=print) -> dict:
    """The whole protocol (module docstring) into ``run``: blocks (``blocks``: the (folder, manifest) of
    :func:`make_blocks` when already made), ``seeds`` trainings of ``config`` (seed, seed + 1, ...) and their tile
    AUCs. Returns ``{"protocol", "blocks", "runs", "summary", "auc_mean",
    "auc_std", "n_seeds"}``; ``runs`` are :func:`pipelines.compare.run_one` records (``checkpoint`` the model)."""
    from pipelines.compare import _FolderData, _seeds, summarize

    if seeds < 1:
        raise WsiAdError(f"--seeds must be >= 1, got {seeds}")
    run = Path(run)
    folder, manifest = blocks or make_blocks(layout, run, split_dir, echo)
    undefined = undefined_reason(manifest)
    if undefined:
        echo(f"    dpa-paper tile AUC {undefined}")
        return {"protocol": PROTOCOL, "blocks": manifest, "runs": [], "summary": {}, "auc_mean": None,
                "auc_std": None, "n_seeds": 0, "note": undefined,
                "n_normal_tiles": manifest["counts"]["test/good"], "n_tumor_tiles": manifest["counts"]["test/tumor"]}
    # the 192 px blocks are at the model's magnification (10x): cropped, never resized again
    config = replace(config, data=replace(config.data, image_mpp=None))
    runs = _seeds("dpa-paper", config, _FolderData(folder), run / "runs", seeds, device,
                  lambda line: echo("    " + line))
    summary = summarize(runs)
    tile = summary["tile_auc"]
    if tile["mean"] is None:
        raise WsiAdError("dpa-paper protocol: no training finished: " + "; ".join(
            r.get("error", "") for r in runs if r.get("status") != "ok"))
    return {"protocol": PROTOCOL, "blocks": manifest, "runs": runs, "summary": summary, "auc_mean": tile["mean"],
            "auc_std": tile["std"], "n_seeds": tile["n"],
            "n_normal_tiles": manifest["counts"]["test/good"], "n_tumor_tiles": manifest["counts"]["test/tumor"]}
