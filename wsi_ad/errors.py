"""The project's error types: one base class, so callers can catch everything wsi-ad raises on bad input.

The command line prints these as one line (no traceback); a batch records them per slide and goes on.
"""

from __future__ import annotations

import os


class WsiAdError(Exception):
    """Base class of every error wsi-ad raises on bad input or bad configuration."""


class InputFileError(WsiAdError):
    """An input file cannot be used. The message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class SlideError(InputFileError):
    """A slide file cannot be opened or read."""


class MissingMppError(SlideError):
    """The slide carries no usable resolution metadata and the caller gave no ``mpp`` override."""


class AnnotationError(InputFileError):
    """An annotation file (ASAP XML) is missing, malformed or unsafe."""


def load_error_reason(exc: BaseException) -> str:
    """One line saying why loading a file or a state dict failed: "not a torch file ..." for an unpickling
    error of ``torch.load(weights_only=True)`` (torch's own text advises ``weights_only=False``, which is no
    fix for a user), else the first line of the error."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return "not a torch file of tensors and plain data"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
