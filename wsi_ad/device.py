"""Device selection for training and scoring, shared by every detector."""

from __future__ import annotations

import torch

from wsi_ad.errors import WsiAdError

DEVICES = ("auto", "cuda", "cpu")


class DeviceError(WsiAdError):
    """A device was asked for that this machine does not have."""


def select_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``: ``auto`` is cuda when available, else cpu.

    Raises :class:`DeviceError` for ``cuda`` on a machine without CUDA, or a name outside :data:`DEVICES`."""
    if name not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda requested but CUDA is not available")
    return torch.device(name)
