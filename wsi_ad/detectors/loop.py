"""The one training loop of every detector: seeded batches, atomic resumable checkpoints, progress, loss curves.

``train(paths, out, config)`` builds the detector named by ``config.detector`` (seeded with
``train.seed``), lets it :meth:`~wsi_ad.detectors.base.Detector.fit` on normal tiles, then calls its
``train_step`` ``num_steps`` times on batches of ``train.batch_size`` tiles, each a pure function of
(seed, step) (:class:`~wsi_ad.tile_pool.TilePool`, random flips/rotations of ``data``). A fit-only
detector (``num_steps == 0``) is fitted and saved.

Resume: when the checkpoint file already exists with the same training configuration (runtime-only keys
such as ``checkpoint_every`` may differ), training continues from its step with its state, training state
(optimizer states) and loss history, and ends with the weights an uninterrupted run would have.
Checkpoints are written every ``train.checkpoint_every`` steps, at the detector's own boundaries
(e.g. the end of a progressive-growing phase) and at the end, each atomically.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsi_ad import __version__
from wsi_ad.atomic import write_bytes_atomic, write_text_atomic
from wsi_ad.config import Config, training_identity
from wsi_ad.detectors import build, get
from wsi_ad.detectors.base import TrainingDivergedError
from wsi_ad.detectors.checkpoint import CheckpointError, load_checkpoint, model_id, save_checkpoint
from wsi_ad.device import select_device
from wsi_ad.tile_pool import DataError, TilePool, augment, contamination_sources, discover_sources, to_tensor

#: The history columns every run has; the detector's named losses follow them.
HISTORY_KEYS = ("iteration", "phase", "tiles_per_s")


@dataclass
class TrainResult:
    checkpoint: Path
    model_id: str
    iterations: int        # training steps done
    resumed_from: int      # step the run started at (0: fresh)
    complete: bool
    final_loss: float | None
    seconds: float
    contamination: dict | None = None  # what a contamination experiment mixed in (the checkpoint's record)


def loss_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """The loss curve files beside a checkpoint: ``<stem>.loss.csv`` and ``<stem>.loss.png``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".loss.csv"), checkpoint.with_name(checkpoint.stem + ".loss.png")


def write_loss_curve(checkpoint: str | os.PathLike, history: dict[str, list], boundaries: Sequence[tuple[int, str]] = (),
                     png: bool = True) -> None:
    """Write the loss history as CSV (one column per history key) and, optionally, a PNG plot of every
    column named ``*loss*``, one panel each (log scale when positive), with the phase ``boundaries`` ((step,
    label) pairs) marked, atomically."""
    csv_path, png_path = loss_paths(checkpoint)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(list(history))
    for row in zip(*history.values(), strict=True):
        writer.writerow(row)
    write_text_atomic(csv_path, buffer.getvalue())
    if not png or not history["iteration"]:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    curves = [k for k in history if "loss" in k]
    fig = Figure(figsize=(7, 1.2 + 1.6 * max(1, len(curves))), dpi=100)
    axes = fig.subplots(max(1, len(curves)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, curves, strict=False):       # one panel per loss: their scales differ (GAN terms)
        values = [v for v in history[key] if v is not None]
        ax.plot(history["iteration"], [float("nan") if v is None else v for v in history[key]], lw=1)
        ax.set_ylabel(key, fontsize=7)
        if values and all(v > 0 for v in values):
            ax.set_yscale("log")
        for step, _ in boundaries:
            ax.axvline(step, color="0.8", lw=0.8)
    for step, label in boundaries:
        axes[0].text(step, 1.0, f" {label}", transform=axes[0].get_xaxis_transform(), va="top", fontsize=7)
    axes[-1].set_xlabel("iteration")
    fig.suptitle("training losses", fontsize=9)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    write_bytes_atomic(png_path, out.getvalue())


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def train(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: Config | None = None,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    stop_after: int | None = None,
    overwrite: bool = False,
    contaminate_from: Sequence[str | os.PathLike] | None = None,
    annotations: str | os.PathLike | None = None,
) -> TrainResult:
    """Train the detector of ``config`` (default: the paper's DPA) on the normal tiles of ``paths`` (slide
    stores, folders of stores, folders of PNG/JPEG tiles) and write the checkpoint ``out``, resuming it if
    present.

    ``stop_after``: stop (with a checkpoint) once this many steps are done, as if killed there.
    ``overwrite``: discard an existing checkpoint instead of resuming it.
    ``contaminate_from``, ``annotations``: where the known tumour tiles of a contamination experiment come from
    (``data.contaminate`` > 0; annotated tumour slide stores or tumour tile images, see
    :func:`~wsi_ad.tile_pool.contamination_sources`); what was mixed in is written into the checkpoint
    (``contamination``).
    Raises :class:`~wsi_ad.detectors.checkpoint.CheckpointError` when ``out`` holds a checkpoint of another
    configuration, :class:`~wsi_ad.tile_pool.DataError` for unusable training data.
    """
    config = config or Config()
    config.validate()
    t0 = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; --out names the checkpoint file to write")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise CheckpointError(f"{out}: cannot write the checkpoint there ({out.parent} is not a writable folder)")
    detector_cls = get(config.detector)
    total = detector_cls.num_steps_of(config)
    spec = detector_cls.input_spec_of(config)
    device = select_device(config.train.device)

    resume = None
    if out.exists() and not overwrite:
        resume = load_checkpoint(out)
        diff = _diff_keys(training_identity(Config.from_dict(resume["config"])), training_identity(config))
        if diff:
            raise CheckpointError(
                f"{out} holds a checkpoint trained with a different configuration (differs in {', '.join(diff)}); "
                "use another --out, or --overwrite to start afresh"
            )
        if resume["complete"]:
            echo(f"{out}: training already complete ({resume['iteration']} iterations)")
            return TrainResult(out, model_id(resume), int(resume["iteration"]), int(resume["iteration"]), True,
                               _last_loss(resume["history"]), time.perf_counter() - t0, resume.get("contamination"))

    sources = discover_sources(paths, config.data.magnification, spec.tile_px, config.data.image_mpp,
                               tiles_per_slide=config.data.tiles_per_slide, seed=config.train.seed)
    contamination = None
    if config.data.contaminate > 0:
        contamination = contamination_sources(
            config.data.contaminate, sum(len(s) for s in sources), list(contaminate_from or []), annotations,
            config.data.magnification, spec.tile_px, config.data.image_mpp, config.train.seed)
        sources = sources + contamination.sources
        if resume is not None and resume.get("contamination") != contamination.record:
            raise CheckpointError(
                f"{out} was trained with other contamination tiles ({_contamination_summary(resume.get('contamination'))}"
                f"; now {_contamination_summary(contamination.record)}); give the same --contaminate-from and "
                "--annotations, or --overwrite to start afresh")
    elif contaminate_from or annotations:
        raise DataError("tumour tiles to mix in were given (--contaminate-from / --annotations) but the contamination "
                        "fraction is 0 (--contaminate FRACTION, or data.contaminate in the config)")
    torch.manual_seed(config.train.seed)
    detector = build(config, device)
    pool = TilePool(sources, config.data.buffer_tiles, config.train.seed)
    echo(f"training {config.detector} on {pool.total} tiles from {len(sources)} source(s), {total} iterations on {device}")
    if contamination is not None:
        record = contamination.record
        echo(f"contamination: {record['tumor_tiles']} known tumour tiles mixed into {record['normal_tiles']} normal "
             f"ones ({record['obtained_fraction']:.2%} of the pool)")

    if resume is not None:
        detector.load_state_dict(resume["state"], resume.get("training_state"))
        history = {k: list(v) for k, v in resume["history"].items()}
        iteration = int(resume["iteration"])
        echo(f"resuming {out} at iteration {iteration}")
    else:
        detector.fit(pool)
        history = {k: [] for k in HISTORY_KEYS}
        iteration = 0
    start_iteration = iteration
    boundaries = sorted(detector.checkpoint_steps())
    phase_marks = [(0, detector.phase(0))] + [(b, detector.phase(b)) for b in boundaries if b < total]

    def payload(complete: bool) -> dict:
        return {"wsi_ad_version": __version__, "detector": config.detector, "config": config.to_dict(),
                "state": detector.state_dict(), "training_state": None if complete else detector.training_state_dict(),
                "iteration": iteration, "complete": complete, "history": history,
                "contamination": None if contamination is None else contamination.record}

    from tqdm.auto import tqdm

    # Tiny-width convolutions on the CPU hit denormal floats and slow down ~4x; flush them to zero.
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    bar = tqdm(total=total, initial=iteration, disable=not progress, unit="it", dynamic_ncols=True)
    window: dict[str, float] = {}
    window_n, window_t = 0, time.perf_counter()
    batch_size = config.train.batch_size
    tiles_per_step = batch_size * detector.batches_per_step
    last_finite: tuple[int, dict[str, float]] | None = None
    must_save = set(boundaries) | {total}
    stopped = False
    detector.train()
    try:
        while iteration < total:
            rng = np.random.default_rng([config.train.seed, 17, iteration])
            tiles = augment(pool.batch(iteration, tiles_per_step), rng, config.data.flips, config.data.rot90)
            phase = detector.phase(iteration)
            try:
                detector.before_step(pool, iteration)
                values = detector.train_step(to_tensor(tiles, device), iteration)
            except TrainingDivergedError as exc:       # the detector's own guard (e.g. an exploding loss)
                raise _diverged(out, iteration, str(exc), last_finite) from None
            bad = sorted(k for k, v in values.items() if "loss" in k and not np.isfinite(float(v)))
            if bad:
                raise _diverged(out, iteration, ", ".join(f"{k} = {values[k]}" for k in bad), last_finite)
            last_finite = (iteration, {k: float(v) for k, v in values.items()})
            iteration += 1
            for key, value in values.items():
                window[key] = window.get(key, 0.0) + float(value)
            window_n += 1
            bar.update(1)
            if iteration % config.train.log_every == 0 or iteration in must_save:
                elapsed = time.perf_counter() - window_t
                rate = window_n * tiles_per_step / max(elapsed, 1e-9)
                means = {k: v / window_n for k, v in window.items()}
                row = {"iteration": iteration, "phase": phase, "tiles_per_s": round(rate, 1), **means}
                logged = len(history["iteration"])
                for key, value in row.items():
                    history.setdefault(key, [None] * logged).append(value)
                for values in history.values():         # a key logged before but not in this row (another phase)
                    if len(values) == logged:
                        values.append(None)
                bar.set_postfix({"phase": phase, **{k: f"{v:.4g}" for k, v in means.items()}, "tiles_s": f"{rate:.0f}"})
                window, window_n, window_t = {}, 0, time.perf_counter()
            at_stop = stop_after is not None and iteration >= stop_after
            if iteration in must_save or iteration % config.train.checkpoint_every == 0 or at_stop:
                state = payload(iteration >= total)
                broken = _nonfinite(state["state"])
                if broken:                 # finite losses but weights gone bad by the last step: keep the old file
                    raise _diverged(out, iteration, f"weights {broken} are not finite", last_finite)
                save_checkpoint(out, state)
                write_loss_curve(out, history, phase_marks, png=iteration >= total or at_stop)
            if at_stop and iteration < total:
                stopped = True
                break
    finally:
        bar.close()
        if flush:
            torch.set_flush_denormal(False)
    if not stopped and (total == 0 or not out.exists()):
        save_checkpoint(out, payload(True))
        write_loss_curve(out, history, phase_marks)
    final = load_checkpoint(out)
    return TrainResult(out, model_id(final), iteration, start_iteration, not stopped, _last_loss(history),
                       time.perf_counter() - t0, final.get("contamination"))


def _contamination_summary(record: dict | None) -> str:
    if not record:
        return "none"
    where = ", ".join(str(src.get("slide_id") or f"{src.get('images')} images") for src in record["sources"])
    return f"{record['tumor_tiles']} tumour tiles from {where}"


def _diverged(out: Path, iteration: int, what: str, last_finite) -> TrainingDivergedError:
    """The error for training that went bad at ``iteration`` (``what``: the values), with the last finite losses and
    what is kept on disk."""
    kept = f"{out} keeps its last checkpoint" if out.exists() else "no checkpoint was written"
    before = ("; the last finite values (iteration " + str(last_finite[0]) + "): " +
              ", ".join(f"{k} {v:.4g}" for k, v in last_finite[1].items())) if last_finite else ""
    return TrainingDivergedError(
        f"training diverged at iteration {iteration}: {what}{before}; {kept}. Lower the learning rate or change "
        "the seed, and run again with --overwrite")


def _nonfinite(state, prefix: str = "") -> str | None:
    """The name of the first tensor in a (nested) state dict holding NaN or inf, or None."""
    if isinstance(state, torch.Tensor):
        return prefix or "tensor" if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    if isinstance(state, dict):
        for key, value in state.items():
            found = _nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
    return None


def _last_loss(history: dict[str, list]) -> float | None:
    """The last logged value of the history's first loss column (``loss`` when there is one)."""
    keys = [k for k in history if "loss" in k]
    key = "loss" if "loss" in keys else (keys[0] if keys else None)
    values = [v for v in history.get(key, []) if v is not None] if key else []
    return float(values[-1]) if values else None
