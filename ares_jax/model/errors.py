"""Exceptions for bad checkpoints: each names the file, tensor or field at fault.

All are ``ValueError`` subclasses, so callers that only care "the input is bad" can catch that;
a missing file or directory is a plain ``FileNotFoundError``.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be used as it is."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture (or one of its options) is not implemented."""


class MissingTensorError(CheckpointError):
    """A tensor the architecture needs is absent from the checkpoint."""


class TensorShapeError(CheckpointError):
    """A tensor's shape disagrees with the shape implied by the checkpoint's config."""


class CorruptFileError(CheckpointError):
    """A file is truncated, or its contents do not parse."""
