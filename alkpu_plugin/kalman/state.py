"""Saving and loading a Kalman state.

One ``.npz`` file (uncompressed zip of arrays) holds:

* ``P_000``, ``P_001``, ...: the stored blocks S_l (P_l = scale * S_l; a
  block is read from its upper triangle, see :mod:`.ekffm`);
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
import zlib
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


def _named(path: Path) -> str:
    """``path``, and the file it links to when it is a symbolic link."""
    return f"{path} (a link to {os.path.realpath(path)})" if path.is_symlink() else str(path)


def _damaged(path: Path, exc: BaseException) -> KalmanStateError:
    return KalmanStateError(
        f"{_named(path)} is not a Kalman state file that can be read: it is damaged (truncated, or "
        f"not a zip archive: {type(exc).__name__}: {exc}). Copy it again from where it was written "
        "(model.ckpt-<step>.kalman.npz beside the training checkpoint), or train again."
    )


# what numpy and zipfile raise on a truncated, corrupted or foreign file
_READ_ERRORS = (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error)


def _open(path: Path) -> np.lib.npyio.NpzFile:
    """``np.load`` of a state file, with one clear error for a file that is not a readable .npz."""
    try:
        data = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise _damaged(path, exc) from exc
    if not isinstance(data, np.lib.npyio.NpzFile) or "meta" not in data.files:
        if isinstance(data, np.lib.npyio.NpzFile):
            data.close()
        raise KalmanStateError(
            f"{_named(path)} is not a Kalman state file: it holds no 'meta' entry "
            "(an array file written by something else?)"
        )
    return data


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a state file, without reading P."""
    path = Path(path)
    if not path.is_file():
        raise KalmanStateError(f"Kalman state {_named(path)} does not exist")
    with _open(path) as data:
        try:
            meta = json.loads(bytes(data["meta"]).decode())
        except _READ_ERRORS as exc:
            raise _damaged(path, exc) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise KalmanStateError(
            f"{_named(path)} has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
            f"expected {FORMAT!r}"
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
        raise KalmanStateError(f"{_named(path)} is damaged: its layout fingerprint does not match its layout")
    if layout is not None:
        layout.check_same(saved_layout, what=f"Kalman state {path}")
    kf = KalmanFilter(saved_layout, FilterOptions(**meta["options"]))
    with _open(path) as data:
        for i, m in enumerate(saved_layout.block_sizes):
            try:
                S = data[f"P_{i:03d}"]
            except _READ_ERRORS as exc:
                raise _damaged(path, exc) from exc
            if S.shape != (m, m) or S.dtype != kf.dtype:
                raise KalmanStateError(
                    f"{_named(path)}: block {i} has shape {S.shape} and type {S.dtype}, "
                    f"expected {(m, m)} {kf.dtype}"
                )
            kf.set_block(i, S)
    kf.lam = float(meta["lambda"])
    kf.scale = float(meta["scale"])
    kf.nupdates = int(meta["nupdates"])
    return kf, meta["extra"]
