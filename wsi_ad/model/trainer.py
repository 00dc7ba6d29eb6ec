"""The training loop: progressive (or flat) schedule, Adam per stage, atomic resumable checkpoints.

Resume: when the checkpoint file already exists with the same training configuration (runtime-only keys
such as ``checkpoint_every`` may differ), training continues from its iteration with its weights,
feature statistics, loss history and (within a stage) Adam state. Batches are pure functions of
(seed, iteration), so an interrupted-and-resumed run draws the same tiles as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
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
from wsi_ad.model.autoencoder import AutoencoderConfig, ProgressiveAutoencoder
from wsi_ad.model.backbones import build_backbone
from wsi_ad.model.checkpoint import CheckpointError, load_checkpoint, model_id, save_checkpoint
from wsi_ad.model.data import TilePool, augment, discover_sources, to_tensor
from wsi_ad.model.perceptual import PerceptualLoss, feature_stats
from wsi_ad.model.schedule import Stage, flat_stages, loss_sizes, progressive_stages, resize_batch, stage_loss

HISTORY_KEYS = ("iteration", "stage", "alpha", "loss", "tiles_per_s")


@dataclass
class TrainResult:
    checkpoint: Path
    model_id: str
    iterations: int        # global iterations done
    resumed_from: int      # iteration the run started at (0: fresh)
    complete: bool
    final_loss: float | None
    seconds: float


def select_device(name: str = "auto") -> torch.device:
    """``auto``: cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device cuda requested but CUDA is not available")
    return torch.device(name)


def build_schedule(config: Config) -> list[Stage]:
    t, m = config.train, config.model
    if t.progressive:
        return progressive_stages(t.iterations, t.start_size, m.image_size)
    total = t.flat_iterations if t.flat_iterations is not None else sum(int(v) for v in t.iterations.values())
    return flat_stages(total, m.image_size)


def autoencoder_config(config: Config) -> AutoencoderConfig:
    m = config.model
    return AutoencoderConfig(m.image_size, m.latent_size, m.latent_channels, tuple(m.channels))


def loss_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """The loss curve files beside a checkpoint: ``<stem>.loss.csv`` and ``<stem>.loss.png``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".loss.csv"), checkpoint.with_name(checkpoint.stem + ".loss.png")


def write_loss_curve(checkpoint: str | os.PathLike, history: dict[str, list], stages: Sequence[Stage], png: bool = True) -> None:
    """Write the loss history as CSV (columns ``HISTORY_KEYS``) and, optionally, a PNG plot, atomically."""
    csv_path, png_path = loss_paths(checkpoint)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HISTORY_KEYS)
    for row in zip(*(history[k] for k in HISTORY_KEYS), strict=True):
        writer.writerow(row)
    write_text_atomic(csv_path, buffer.getvalue())
    if not png or not history["iteration"]:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot(history["iteration"], history["loss"], lw=1)
    boundary = 0
    for stage in stages:
        if stage.iterations:
            ax.axvline(boundary, color="0.8", lw=0.8)
            ax.text(boundary, 1.0, f" {stage.name}", transform=ax.get_xaxis_transform(), va="top", fontsize=7)
        boundary += stage.iterations
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative perceptual L1")
    ax.set_yscale("log")
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
) -> TrainResult:
    """Train a DPA on the normal tiles of ``paths`` and write the checkpoint ``out`` (resuming it if present).

    ``stop_after``: stop (with a checkpoint) once this many global iterations are done, as if killed there.
    ``overwrite``: discard an existing checkpoint instead of resuming it.
    """
    config = config or Config()
    config.validate()
    t0 = time.perf_counter()
    out = Path(out)
    stages = build_schedule(config)
    total = sum(s.iterations for s in stages)
    sizes = loss_sizes(stages)
    device = select_device(config.train.device)
    cuda = device.type == "cuda"

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
                               _last(resume["history"]["loss"]), time.perf_counter() - t0)

    sources = discover_sources(paths, config.data.magnification, config.model.image_size, config.data.image_mpp,
                               tiles_per_slide=config.data.tiles_per_slide, seed=config.train.seed)
    torch.manual_seed(config.train.seed)
    model = ProgressiveAutoencoder(autoencoder_config(config))
    extractor = build_backbone(config.backbone.name, sizes, weights=config.backbone.weights,
                               download=config.backbone.download, layers=config.backbone.layers)
    pool = TilePool(sources, config.data.buffer_tiles, config.train.seed)
    echo(f"training on {pool.total} tiles from {len(sources)} source(s), {total} iterations on {device}")

    if resume is not None:
        model.load_state_dict(resume["model"])
        stats = {int(s): (v["mean"], v["std"]) for s, v in resume["feature_stats"].items()}
        history = {k: list(resume["history"][k]) for k in HISTORY_KEYS}
        iteration = int(resume["iteration"])
        echo(f"resuming {out} at iteration {iteration}")
    else:
        extractor.to(device)
        images = to_tensor(pool.sample(config.data.stats_tiles), device)
        stats = {s: feature_stats(extractor, resize_batch(images, s), s) for s in sizes}
        del images
        history = {k: [] for k in HISTORY_KEYS}
        iteration = 0
    start_iteration = iteration

    loss_fn = PerceptualLoss(extractor, stats).to(device)
    model.to(device)
    if cuda and config.train.channels_last:
        model.to(memory_format=torch.channels_last)
        loss_fn.to(memory_format=torch.channels_last)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and config.train.amp
                else contextlib.nullcontext())

    def payload(optimizer, complete: bool) -> dict:
        return {
            "wsi_ad_version": __version__,
            "config": config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "feature_stats": {str(s): {"mean": m.cpu(), "std": sd.cpu()} for s, (m, sd) in stats.items()},
            "iteration": iteration,
            "complete": complete,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "history": history,
        }

    from tqdm.auto import tqdm

    # Tiny-width convolutions on the CPU hit denormal floats and slow down ~4x; flush them to zero.
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    bar = tqdm(total=total, initial=iteration, disable=not progress, unit="it", dynamic_ncols=True)
    window_loss, window_n, window_t = 0.0, 0, time.perf_counter()
    batch_size = config.train.batch_size
    stage_start = 0
    stopped = False
    optimizer = None
    try:
        for stage in stages:
            stage_end = stage_start + stage.iterations
            if iteration >= stage_end:
                stage_start = stage_end
                continue
            optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr, betas=tuple(config.train.betas))
            if resume is not None and resume.get("optimizer") and stage_start < iteration == int(resume["iteration"]):
                optimizer.load_state_dict(resume["optimizer"])
            model.train()
            while iteration < stage_end:
                alpha = stage.alpha(iteration - stage_start)
                rng = np.random.default_rng([config.train.seed, 17, iteration])
                tiles = augment(pool.batch(iteration, batch_size), rng, config.data.flips, config.data.rot90)
                x = to_tensor(tiles, device)
                if cuda and config.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    loss = stage_loss(model, loss_fn, x, stage.size, alpha).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                iteration += 1
                window_loss += float(loss.detach())
                window_n += 1
                bar.update(1)
                if iteration % config.train.log_every == 0 or iteration == stage_end:
                    elapsed = time.perf_counter() - window_t
                    rate = window_n * batch_size / max(elapsed, 1e-9)
                    mean_loss = window_loss / window_n
                    row = (iteration, stage.name, round(alpha, 6), mean_loss, round(rate, 1))
                    for key, value in zip(HISTORY_KEYS, row, strict=True):
                        history[key].append(value)
                    bar.set_postfix(stage=stage.name, alpha=f"{alpha:.3f}", loss=f"{mean_loss:.4f}", tiles_s=f"{rate:.0f}")
                    window_loss, window_n, window_t = 0.0, 0, time.perf_counter()
                at_stop = stop_after is not None and iteration >= stop_after
                if iteration == stage_end or iteration % config.train.checkpoint_every == 0 or at_stop:
                    done = iteration >= total
                    save_checkpoint(out, payload(None if iteration == stage_end else optimizer, done))
                    write_loss_curve(out, history, stages, png=done or at_stop)
                if at_stop and iteration < total:
                    stopped = True
                    break
            if stopped:
                break
            stage_start = stage_end
    finally:
        bar.close()
        if flush:
            torch.set_flush_denormal(False)
    if not stopped and (total == 0 or not out.exists()):
        save_checkpoint(out, payload(None, True))
        write_loss_curve(out, history, stages)
    final = load_checkpoint(out)
    return TrainResult(out, model_id(final), iteration, start_iteration, not stopped,
                       _last(history["loss"]), time.perf_counter() - t0)


def _last(values: list) -> float | None:
    return float(values[-1]) if values else None
