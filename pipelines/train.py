"""``wsi-ad train``: train any registered detector on normal tiles (argument parsing and reporting only; the
work is :func:`wsi_ad.detectors.loop.train`).

``pipelines/cli.py`` wires them as the ``train`` subcommand::

    train = sub.add_parser("train", help=...)
    add_train_arguments(train)
    train.set_defaults(handler=run_train)

Options shared by every detector are flags; anything in a detector's own section is set with
``--set SECTION.KEY=VALUE`` (the value read as YAML), e.g. ``--set dpa.flat_iterations=200``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from wsi_ad.config import Config, ConfigError


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` subcommand's arguments to ``parser``."""
    parser.add_argument("paths", type=Path, nargs="+",
                        help="slide stores (*.zarr), folders of stores (the --out of `wsi-ad process`) or "
                             "folders of PNG/JPEG tiles (e.g. an anomalib Folder dataset's train/good)")
    parser.add_argument("--out", type=Path, required=True,
                        help="checkpoint file to write; an existing one of the same configuration is resumed. "
                             "The loss curve goes beside it as <stem>.loss.csv and <stem>.loss.png")
    parser.add_argument("--config", type=Path,
                        help="YAML config or packaged name, `wsi-ad configs` (default: the paper setting of --detector; see "
                                                     "configs/camelyon16_paper.yaml, configs/demo_cpu.yaml)")
    parser.add_argument("--detector", help="detector to train (`wsi-ad detectors` lists them; default: the "
                                           "config's, else dpa). With --config, the two must agree")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key, value as YAML (e.g. dpa.flat_iterations=200, "
                             "dpa.progressive=false, data.rot90=true); repeatable")
    parser.add_argument("--backbone-weights", type=Path, help="pretrained backbone weight file (default: the "
                                                              "backbone's registered source, e.g. the torch hub cache)")
    parser.add_argument("--download-weights", action="store_true",
                        help="allow downloading missing backbone weights (vgg19: 548 MB from download.pytorch.org)")
    parser.add_argument("--batch-size", type=int, help="tiles per iteration (overrides the config)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config)")
    parser.add_argument("--checkpoint-every", type=int, help="save every K iterations (overrides the config)")
    parser.add_argument("--image-mpp", type=float,
                        help="µm/px of PNG/JPEG tiles, to resize them to the training magnification")
    parser.add_argument("--contaminate", type=float, metavar="FRACTION",
                        help="a contamination experiment: make FRACTION (e.g. 0.05) of the training pool known tumour "
                             "tiles from --contaminate-from (sets data.contaminate; recorded in the checkpoint)")
    parser.add_argument("--contaminate-from", type=Path, nargs="+", metavar="PATH", default=[],
                        help="where the tumour tiles come from: stores (or folders of stores) of annotated tumour "
                             "slides, their tiles inside a lesion of --annotations; or folders of PNG/JPEG tumour tiles")
    parser.add_argument("--annotations", type=Path, metavar="DIR",
                        help="ASAP XML lesion annotations (<slide id>.xml) of the --contaminate-from stores")
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` (a config dict) with ``SECTION.KEY=VALUE`` overrides applied; ConfigError for a malformed one."""
    for item in overrides:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. dpa.flat_iterations=200")
        if section not in data or not isinstance(data[section], dict):
            raise ConfigError(f"--set {item!r}: no config section {section!r} (sections: "
                              f"{', '.join(k for k, v in data.items() if isinstance(v, dict))})")
        try:
            data[section][key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from exc
    return data


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file (or the detector's defaults) with the command-line overrides applied, validated."""
    detector = getattr(args, "detector", None)
    if getattr(args, "config", None):
        config = Config.from_yaml(args.config)
        if detector and detector != config.detector:
            raise ConfigError(f"--detector {detector} but {args.config} configures {config.detector!r}")
    else:
        config = Config(detector=detector) if detector else Config()
    data = apply_overrides(config.to_dict(), getattr(args, "overrides", []) or [])
    for attr, section, key in (("batch_size", "train", "batch_size"), ("device", "train", "device"),
                               ("seed", "train", "seed"), ("checkpoint_every", "train", "checkpoint_every"),
                               ("image_mpp", "data", "image_mpp"), ("contaminate", "data", "contaminate")):
        value = getattr(args, attr, None)
        if value is not None:
            data[section][key] = value
    config = Config.from_dict(data)
    config.set_backbone_weights(getattr(args, "backbone_weights", None), getattr(args, "download_weights", False))
    return config


def run_train(args: argparse.Namespace) -> int:
    """Run ``wsi-ad train``; returns the exit status (0: trained or already complete). Raises
    :class:`wsi_ad.errors.WsiAdError` on bad input, which the CLI prints as one line."""
    from wsi_ad.detectors.loop import loss_paths, train

    config = config_from_args(args)

    def echo(message: str) -> None:
        print(message, file=sys.stderr)

    result = train(args.paths, args.out, config, progress=not args.no_progress, echo=echo, overwrite=args.overwrite,
                   contaminate_from=args.contaminate_from, annotations=args.annotations)
    csv_path, png_path = loss_paths(result.checkpoint)
    contamination = result.contamination
    print(json.dumps({
        "detector": config.detector, "checkpoint": str(result.checkpoint), "model_id": result.model_id,
        "iterations": result.iterations, "resumed_from": result.resumed_from, "complete": result.complete,
        "final_loss": result.final_loss, "seconds": round(result.seconds, 1), "loss_csv": str(csv_path),
        "loss_png": str(png_path) if png_path.exists() else None,  # no curve for a fit-only detector
        "contamination": None if contamination is None else {
            k: contamination[k] for k in ("fraction", "tumor_tiles", "normal_tiles", "obtained_fraction")},
    }, indent=2))
    return 0


def run_detectors(args: argparse.Namespace) -> int:
    """``wsi-ad detectors``: one line per registered detector (name, input, summary); ``--verbose`` adds the
    paper, the config section's keys with their defaults, the score units and the search parameters."""
    from wsi_ad.detectors import get, input_spec, names

    width = max(10, *(len(n) for n in names()))
    for name in names():
        cls = get(name)
        spec = input_spec(Config(detector=name))
        print(f"{name:<{width}} {spec.tile_px} px at {spec.magnification}  {cls.summary}")
        if getattr(args, "verbose", False):
            print(f"{'':<{width}} paper: {cls.paper}")
            print(f"{'':<{width}} score: {cls.score_units}")
            print(f"{'':<{width}} config section '{name}': {json.dumps(Config(detector=name).to_dict()[name], default=str)}")
            print(f"{'':<{width}} search parameters: {', '.join(sorted(cls.search_parameters)) or 'none'}")
    return 0
