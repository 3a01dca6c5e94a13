"""Names and digests of Kalman state files beside DeePMD-kit checkpoints (no TensorFlow)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

__all__ = ["STATE_SUFFIX", "state_path_for_checkpoint", "weights_digest"]

STATE_SUFFIX = ".kalman.npz"


def weights_digest(flat: np.ndarray) -> str:
    """sha256 of the flat weights as little-endian float64."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype="<f8").tobytes()).hexdigest()


def state_path_for_checkpoint(prefix: str | os.PathLike) -> Path:
    """The Kalman state beside checkpoint ``prefix`` (links resolved).

    ``model.ckpt`` (DeePMD-kit's links to the newest checkpoint) resolves to
    ``model.ckpt-<step>`` through ``model.ckpt.index``, so the state found is
    the one written with that very checkpoint.
    """
    prefix = Path(prefix)
    index = prefix.with_name(prefix.name + ".index")
    if index.is_symlink() or index.exists():
        real = Path(os.path.realpath(index))
        candidate = real.with_name(real.name[: -len(".index")] + STATE_SUFFIX)
        if candidate.exists():
            return candidate
    return prefix.with_name(prefix.name + STATE_SUFFIX)
