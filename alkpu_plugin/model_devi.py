"""DP-GEN's ``model_devi.out``: the contract between KPU and DP-GEN's selection.

Seven columns, as LAMMPS writes them for a committee: ``step max_devi_v
min_devi_v avg_devi_v max_devi_f min_devi_f avg_devi_f``.  DP-GEN's selection
(``make_fp``) reads columns 0, 1 and 4.  With KPU:

* the virial columns are the max/min/mean over the nine virial components of
  the virial uncertainty per atom (eV when calibrated), the scale of DP-GEN's
  committee virial deviation, so ``model_devi_v_trust_lo/hi`` select;
* the force columns are the max/min/mean over atoms of the per-atom force
  uncertainty (eV/A when calibrated);
* a frame whose KPU lies beyond the calibration's range is written at least at the
  lower trust level (:mod:`alkpu_plugin.dpgen.extrapolation`): a candidate;
* a frame outside the model's domain (:mod:`alkpu_plugin.domain`) gets
  :data:`OUT_OF_DOMAIN` in both max columns (1 and 4), above any trust level:
  DP-GEN counts it as failed, never as accurate.

Without a calibration the columns hold √KPU (and √KPU / N for the virial), not
eV/Å: a second header line says so (:data:`UNCALIBRATED`), since DP-GEN's trust
levels in eV/Å mean nothing against them.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write

__all__ = ["HEADER", "UNCALIBRATED", "OUT_OF_DOMAIN", "BEYOND_CALIBRATION", "write_model_devi", "write_result",
           "read_model_devi", "devi_values", "raised_frames", "ModelDeviError"]

HEADER = "%12s" % "step" + "".join("%19s" % c for c in (
    "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f"))

#: the second header line of a file written without a calibration
UNCALIBRATED = ("# uncalibrated: columns hold sqrt(KPU), not eV/A; do not compare them with trust levels "
                "in eV/A (alkpu calibrate -m MODEL -s LABELLED_FRAMES fits the scale)")

#: written in the max columns of frames outside the model's domain
OUT_OF_DOMAIN = 1.0e10

#: the comment line of a file whose frames beyond the calibrated KPU range were raised to the lower
#: trust level (:mod:`alkpu_plugin.dpgen.extrapolation`); :func:`raised_frames` reads the count back
BEYOND_CALIBRATION = ("# {n} frame(s) beyond {factor:g} x the calibration's largest KPU ({kpu_max:.4g}) written at "
                      "least at model_devi_f_trust_lo ({lo:g}): their calibrated sigma under-predicts there "
                      "(kpu.npz keeps it)")


def write_model_devi(path: str | os.PathLike, steps, atom_sigma, virial_sigma=None,
                     out_of_domain=None, note: str | None = None, at_least=None) -> Path:
    """Write the file atomically.

    ``atom_sigma``: per-frame, per-atom force uncertainties (F, N) (or (F, 1) per
    frame); ``virial_sigma``: (F, 9) per-atom virial uncertainties, or None for
    zero virial columns; ``out_of_domain``: (F,) flags of frames to mark as failed;
    ``note``: a comment line written under the column header; ``at_least``: (F,) lower
    bounds of the max force column (0 where none).
    """
    sigma = np.asarray(atom_sigma, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.int64)
    if sigma.ndim != 2 or sigma.shape[0] != steps.shape[0]:
        raise ValueError("atom_sigma must be (frames, atoms) with one step per frame")
    table = np.zeros((steps.size, 7))
    table[:, 0] = steps
    if virial_sigma is not None:
        vs = np.asarray(virial_sigma, dtype=np.float64).reshape(steps.size, -1)
        table[:, 1] = vs.max(axis=1)
        table[:, 2] = vs.min(axis=1)
        table[:, 3] = vs.mean(axis=1)
    table[:, 4] = sigma.max(axis=1)
    table[:, 5] = sigma.min(axis=1)
    table[:, 6] = sigma.mean(axis=1)
    if at_least is not None:
        floor = np.asarray(at_least, dtype=np.float64).reshape(-1)
        if floor.shape[0] != steps.size:
            raise ValueError("at_least must have one value per frame")
        table[:, 4] = np.maximum(table[:, 4], floor)
    if out_of_domain is not None:
        bad = np.asarray(out_of_domain, dtype=bool).reshape(-1)
        if bad.shape[0] != steps.size:
            raise ValueError("out_of_domain must have one flag per frame")
        table[bad, 1] = OUT_OF_DOMAIN
        table[bad, 4] = OUT_OF_DOMAIN
    buf = io.StringIO()
    buf.write("#" + HEADER[1:] + "\n")
    if note:
        buf.write(note if note.startswith("#") else "# " + note)
        buf.write("\n")
    for row in table:
        buf.write("%12d" % row[0] + "".join("%19.6e" % v for v in row[1:]) + "\n")
    return atomic_write(path, lambda fh: fh.write(buf.getvalue()), binary=False)


def write_result(path: str | os.PathLike, result, values=None) -> Path:
    """``model_devi.out`` of a :class:`~alkpu_plugin.kpu_engine.KPUResult`.

    ``values`` replaces the force columns' per-atom values (see :func:`devi_values`).
    Without a calibration (and without ``values``) the file says it holds √KPU.
    """
    note = UNCALIBRATED if values is None and not result.calibration else None
    return write_model_devi(path, result.steps, result.atom_sigma if values is None else values,
                            result.virial_sigma, result.out_of_domain, note)


def raised_frames(path: str | os.PathLike) -> int:
    """How many frames of a model_devi.out were raised to the lower trust level (0 if none)."""
    import re

    with open(path) as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            found = re.match(r"# (\d+) frame\(s\) beyond ", line)
            if found:
                return int(found.group(1))
    return 0


class ModelDeviError(ValueError):
    """A model_devi.out that DP-GEN's selection cannot read as it should."""


def read_model_devi(path: str | os.PathLike, frames: int | None = None) -> np.ndarray:
    """The table as DP-GEN reads it (frames x 7).

    A file that is not such a table (truncated in a line, other columns, numbers
    that are not numbers, steps that do not increase) or, with ``frames``, holds
    another number of frames (truncated at a line end) raises :class:`ModelDeviError`
    naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelDeviError(f"{path} does not exist")
    try:
        table = np.loadtxt(path, ndmin=2)
    except ValueError as exc:
        raise ModelDeviError(f"{path} is damaged (not a table of numbers: {exc})") from None
    if table.size and table.shape[1] != 7:
        raise ModelDeviError(f"{path} is damaged: {table.shape[1]} columns, DP-GEN's model_devi.out has 7")
    if table.size and (not np.all(np.isfinite(table)) or np.any(np.diff(table[:, 0]) <= 0)):
        raise ModelDeviError(f"{path} is damaged: a number that is not finite, or steps that do not increase")
    if frames is not None and len(table) != frames:
        raise ModelDeviError(f"{path} is damaged (truncated?): {len(table)} frames, the exploration wrote {frames}")
    return table


def devi_values(result, relative_to: float | None = None, hook: str | None = None) -> np.ndarray:
    """What goes into the force columns for a KPU result (frames, atoms) or (frames, 1).

    Default: the per-atom force uncertainty; ``relative_to``: the paper's frame
    KPU / KPU_train; ``hook``: a user function ``"module:function"`` of the result.
    """
    if hook:
        import importlib

        module, _, name = hook.partition(":")
        values = np.asarray(getattr(importlib.import_module(module), name)(result), dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[0] != len(result.steps) or not np.all(np.isfinite(values)):
            raise ValueError(f"select hook {hook} must return finite (frames,) or (frames, atoms) values")
        return values
    if relative_to:
        return (np.asarray(result.force_kpu) / relative_to)[:, None]
    return result.atom_sigma
