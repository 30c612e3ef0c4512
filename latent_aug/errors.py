"""Exceptions raised by latent_aug.

Every error subclasses :class:`LatentAugError` *and* the builtin that matches it, so
``except ValueError`` in user code keeps working.
"""

from __future__ import annotations

import difflib


class LatentAugError(Exception):
    """Base class of every error raised by latent_aug."""


class SplitNotFoundError(LatentAugError, ValueError):
    """The ``split`` name does not name a usable split point of the model."""


class NotACutPointError(LatentAugError, ValueError):
    """The split module does not cut the model into encoder and head (a skip crosses it)."""


class UnsupportedLayerError(LatentAugError, TypeError):
    """A layer on the reconstruction path has no registered decoder."""


class AlreadyWrappedError(LatentAugError, RuntimeError):
    """The model is already wrapped by latent_aug."""


class NoTrainingForwardError(LatentAugError, RuntimeError):
    """``aux_loss`` was called without a preceding training-mode forward."""


class TargetError(LatentAugError, ValueError):
    """Targets passed to ``aux_loss`` do not fit the logits (shape, dtype or range)."""


class ConfigError(LatentAugError, ValueError):
    """A configuration value is out of range or inconsistent."""


class NonFiniteLossError(LatentAugError, FloatingPointError):
    """A loss term became NaN or inf (only raised when ``check_finite=True``)."""


class DatasetNotFoundError(LatentAugError, FileNotFoundError):
    """A dataset is missing from the data directory."""


class TracingError(LatentAugError, RuntimeError):
    """torch.fx could not trace the model; use the explicit ``encoder=``/``head=`` form."""


def close_matches(name: str, candidates: list[str], n: int = 3) -> str:
    """Return ``" Did you mean: a, b?"`` for the closest names, or an empty string."""
    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(h) for h in hits)}?" if hits else ""
