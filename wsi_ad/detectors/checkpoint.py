"""Checkpoint I/O for every detector: one ``torch.save`` file, written atomically, read with ``weights_only=True``.

Contents (tensors, numbers, strings, lists and dicts only), format 2::

    format            CHECKPOINT_FORMAT (2)
    wsi_ad_version    str
    detector          the registered detector name, e.g. "dpa"
    config            Config.to_dict() (wsi_ad.config): {"detector": ..., <detector>: {...}, "data": ..., "train": ...}
    state             Detector.state_dict(): what scoring needs (weights, statistics, memory banks)
    training_state    Detector.training_state_dict() (optimizer states; None when the run is complete)
    iteration         training steps done (the next one to run)
    complete          bool: every step ran
    history           {"iteration": [...], "phase": [...], "tiles_per_s": [...], <loss name>: [...], ...}
    contamination     None, or what a contamination experiment mixed into the training tiles (config
                      data.contaminate > 0; wsi_ad.tile_pool.contamination_sources: fraction, tile counts, sources)

Format 1 (wsi-ad before the detector interface, always the DPA) is read and upgraded on load
(:func:`wsi_ad.detectors.dpa.config.upgrade_format1`): its config becomes the ``dpa`` section with the ``shallow`` network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from wsi_ad.atomic import atomic_path
from wsi_ad.errors import WsiAdError, load_error_reason

if TYPE_CHECKING:
    from wsi_ad.detectors.base import Detector

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


class CheckpointError(WsiAdError):
    """A checkpoint is missing, unreadable or of another format."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary sibling, then rename)."""
    payload = {"format": CHECKPOINT_FORMAT, **payload}
    try:
        with atomic_path(path) as temp:
            torch.save(payload, temp)
    except (OSError, RuntimeError) as exc:  # torch reports an unwritable file as a RuntimeError
        raise CheckpointError(f"{path}: cannot write the checkpoint: {load_error_reason(exc)}") from exc
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``, upgraded to the current format;
    :class:`CheckpointError` when unusable."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: cannot read checkpoint: the file is empty")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated, or not written by wsi-ad train?): "
                              f"{load_error_reason(exc)}") from exc
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: not a wsi-ad checkpoint (formats {READABLE_FORMATS})")
    required = ("config", "model") if payload["format"] == 1 else ("detector", "config", "state")
    missing = [key for key in required if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a complete wsi-ad checkpoint (no {', '.join(missing)})")
    if payload["format"] == 1:  # always a DPA
        from wsi_ad.detectors.dpa.config import upgrade_format1

        try:
            payload = upgrade_format1(payload, CHECKPOINT_FORMAT)
        except KeyError as exc:
            raise CheckpointError(f"{path}: not a complete wsi-ad checkpoint (no {exc})") from exc
    return payload


def _tensors(prefix: str, value: Any):
    """(name, tensor or plain value) pairs of a nested state, in a stable order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(f"{prefix}.{key}" if prefix else str(key), value[key])
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _tensors(f"{prefix}[{i}]", item)
    else:
        yield prefix, value


def model_id(payload: dict[str, Any]) -> str:
    """A stable id of a trained model, ``<detector>-<12 hex digits>``: sha256 of its config (runtime-only keys
    left out) and its scoring state (not of optimizer states or history), e.g. ``dpa-3f2a9c1d0b4e``. Names
    ``scores/<model_id>`` and ``heatmap/<model_id>`` in slide stores."""
    from wsi_ad.config import Config, training_identity

    digest = hashlib.sha256()
    identity = training_identity(Config.from_dict(payload["config"]))
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    for name, value in _tensors("", payload["state"]):
        buffer = io.BytesIO()
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            buffer.write(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            buffer.write(t.numpy().tobytes())
        else:
            buffer.write(f"{name}={value!r}".encode())
        digest.update(buffer.getvalue())
    return f"{payload['detector']}-{digest.hexdigest()[:12]}"


def detector_from_payload(payload: dict[str, Any], device: torch.device | str | None = None,
                          backbone_weights: str | os.PathLike | None = None) -> tuple[Detector, Any]:
    """(detector in eval mode with the payload's state, its Config) for a loaded checkpoint."""
    from wsi_ad.config import Config
    from wsi_ad.detectors import build
    from wsi_ad.device import select_device

    config = Config.from_dict(payload["config"])
    if backbone_weights is not None:
        config.set_backbone_weights(backbone_weights)
    device = select_device("auto") if device is None else torch.device(device)
    detector = build(config, device)
    try:
        detector.load_state_dict(payload["state"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit its {config.detector} config: "
                              f"{load_error_reason(exc)}") from exc
    detector.eval()
    return detector, config
