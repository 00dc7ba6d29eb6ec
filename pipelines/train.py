"""``wsi-ad train``: train a Deep Perceptual Autoencoder on normal tiles (argument parsing and reporting only;
the work is :func:`wsi_ad.model.trainer.train`).

``pipelines/cli.py`` wires them as the ``train`` subcommand::

    train = sub.add_parser("train", help=...)
    add_train_arguments(train)
    train.set_defaults(handler=run_train)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsi_ad.config import Config
from wsi_ad.model.backbones import list_backbones


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` subcommand's arguments to ``parser``."""
    parser.add_argument("paths", type=Path, nargs="+",
                        help="slide stores (*.zarr), folders of stores (the --out of `wsi-ad process`) or "
                             "folders of PNG/JPEG tiles (e.g. an anomalib Folder dataset's train/good)")
    parser.add_argument("--out", type=Path, required=True,
                        help="checkpoint file to write; an existing one of the same configuration is resumed. "
                             "The loss curve goes beside it as <stem>.loss.csv and <stem>.loss.png")
    parser.add_argument("--config", type=Path, help="YAML config (default: the paper's Camelyon16 setting; "
                                                     "see configs/camelyon16_paper.yaml, configs/demo_cpu.yaml)")
    parser.add_argument("--backbone", choices=list_backbones(), help="perceptual-loss feature extractor "
                                                                     "(overrides the config; default vgg19)")
    parser.add_argument("--backbone-weights", type=Path, help="pretrained backbone weight file (default: the "
                                                              "backbone's registered source, e.g. the torch hub cache)")
    parser.add_argument("--download-weights", action="store_true",
                        help="allow downloading missing backbone weights (vgg19: 548 MB from download.pytorch.org)")
    parser.add_argument("--no-progressive", action="store_true",
                        help="train at full size from the start (flat schedule) instead of progressive growing")
    parser.add_argument("--iterations", type=int, help="flat schedule: number of iterations (implies --no-progressive)")
    parser.add_argument("--batch-size", type=int, help="tiles per iteration (overrides the config)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config)")
    parser.add_argument("--checkpoint-every", type=int, help="save every K iterations (overrides the config)")
    parser.add_argument("--image-mpp", type=float,
                        help="µm/px of PNG/JPEG tiles, to resize them to the training magnification")
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file (or the defaults) with the command-line overrides applied, validated."""
    config = Config.from_yaml(args.config) if getattr(args, "config", None) else Config()
    if args.backbone:
        if args.backbone != config.backbone.name:
            config.backbone.layers = None  # the config's layer names belong to its own backbone
        config.backbone.name = args.backbone
    if args.backbone_weights:
        config.backbone.weights = str(args.backbone_weights)
    if args.download_weights:
        config.backbone.download = True
    if args.no_progressive or args.iterations is not None:
        config.train.progressive = False
    if args.iterations is not None:
        config.train.flat_iterations = args.iterations
    for attr, section, key in (("batch_size", "train", "batch_size"), ("device", "train", "device"),
                               ("seed", "train", "seed"), ("checkpoint_every", "train", "checkpoint_every"),
                               ("image_mpp", "data", "image_mpp")):
        value = getattr(args, attr, None)
        if value is not None:
            setattr(getattr(config, section), key, value)
    config.validate()
    return config


def run_train(args: argparse.Namespace) -> int:
    """Run ``wsi-ad train``; returns the exit status (0: trained or already complete). Raises
    :class:`wsi_ad.errors.WsiAdError` on bad input, which the CLI prints as one line."""
    from wsi_ad.model.trainer import loss_paths, train

    config = config_from_args(args)

    def echo(message: str) -> None:
        print(message, file=sys.stderr)

    result = train(args.paths, args.out, config, progress=not args.no_progress, echo=echo, overwrite=args.overwrite)
    csv_path, png_path = loss_paths(result.checkpoint)
    print(json.dumps({
        "checkpoint": str(result.checkpoint), "model_id": result.model_id, "iterations": result.iterations,
        "resumed_from": result.resumed_from, "complete": result.complete, "final_loss": result.final_loss,
        "seconds": round(result.seconds, 1), "loss_csv": str(csv_path), "loss_png": str(png_path),
    }, indent=2))
    return 0
