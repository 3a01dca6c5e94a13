"""Saving and loading a Kalman state.

One ``.npz`` file (uncompressed zip of arrays) holds:

* ``P_000``, ``P_001``, ...: the stored blocks S_l (P_l = scale * S_l; only the
  upper triangle is meaningful, see :mod:`.ekffm`);
* ``meta``: JSON with the format version, the layout (names, shapes,
  blocksize) and its fingerprint, the filter options, lambda, scale and the
  update count, plus free-form ``extra`` entries that the trainer adds
  (random-number-generator states, training step, digest of the weights the
  state was saved with, calibration, ...).

Writes go to a temporary file in the same directory and are renamed into place,
so a file with the final name is always complete.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from .ekffm import FilterOptions, KalmanFilter
from .layout import BlockLayout

__all__ = ["save_state", "load_state", "read_meta", "KalmanStateError", "FORMAT"]

FORMAT = "alkpu-kalman-state/1"


class KalmanStateError(ValueError):
    """A file is not a usable Kalman state."""


def save_state(path: str | os.PathLike, kf: KalmanFilter, extra: dict[str, Any] | None = None) -> Path:
    """Write ``kf`` (and ``extra``) to ``path`` atomically."""
    if any(getattr(kf, "factored", ())):
        raise ValueError("a filter factorised for queries (factorize()) is not a Kalman state; not saved")
    path = Path(path)
    meta = {
        "format": FORMAT,
        "layout": kf.layout.to_dict(),
        "fingerprint": kf.layout.fingerprint,
        "options": {
            "lambda1": kf.options.lambda1,
            "nu": kf.options.nu,
            "p0": kf.options.p0,
            "p_dtype": kf.options.p_dtype,
        },
        "lambda": kf.lam,
        "scale": kf.scale,
        "nupdates": kf.nupdates,
        "extra": extra or {},
    }
    arrays = {f"P_{i:03d}": S for i, S in enumerate(kf.blocks)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a state file, without reading P."""
    path = Path(path)
    if not path.is_file():
        raise KalmanStateError(f"Kalman state {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise KalmanStateError(f"{path} is not a Kalman state file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise KalmanStateError(
            f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    return meta


def load_state(
    path: str | os.PathLike, layout: BlockLayout | None = None
) -> tuple[KalmanFilter, dict[str, Any]]:
    """Read a state; if ``layout`` is given, refuse a state of another model.

    Returns the filter and the ``extra`` dictionary saved with it.
    """
    meta = read_meta(path)
    saved_layout = BlockLayout.from_dict(meta["layout"])
    if saved_layout.fingerprint != meta["fingerprint"]:
        raise KalmanStateError(f"{path}: layout fingerprint does not match its layout")
    if layout is not None:
        layout.check_same(saved_layout, what=f"Kalman state {path}")
    kf = KalmanFilter(saved_layout, FilterOptions(**meta["options"]))
    with np.load(path, allow_pickle=False) as data:
        for i, m in enumerate(saved_layout.block_sizes):
            S = data[f"P_{i:03d}"]
            if S.shape != (m, m) or S.dtype != kf.dtype:
                raise KalmanStateError(
                    f"{path}: block {i} has shape {S.shape} and type {S.dtype}, "
                    f"expected {(m, m)} {kf.dtype}"
                )
            kf.blocks[i] = np.asfortranarray(S)
    kf.lam = float(meta["lambda"])
    kf.scale = float(meta["scale"])
    kf.nupdates = int(meta["nupdates"])
    return kf, meta["extra"]
