"""Calibrating KPU to a force error in eV/A (the paper's Theorem 4.3).

Theorem 4.3: E[(y - h(w_k, x))^2] ~ KPU_k(x) / lambda_{k+1} + sigma^2.  The
absolute scale of KPU depends on normalisers, training length and P_0, so the
scale is fitted on labelled frames, per atom::

    |F_i - F_i^model|^2  ~  a * KPU_i + b          (a > 0, b >= 0: noise floor)

(least squares; b is dropped when the fit makes it negative).  A power law
``a * KPU_i^p`` (:func:`fit_power`) is the alternative for errors that grow
faster than KPU, and :func:`conformal_quantile` turns either fit into
intervals |dF_i| <= q * sigma_i with a chosen coverage on held-out atoms.  Where the
labelled frames carry virials, the virial is fitted the same way, per component
(``|dW_ab|^2 ~ a_v * kpu_ab + b_v``, stored under ``"virial"``); without
virial labels the virial uncertainty uses the force scale ``a`` (the scale of P
is the same for every output).  The fit is stored beside the Kalman state as ``<state>.calibration.json`` together with the digest
of the weights it was made for, and used only with those weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .kalman import read_meta

__all__ = ["fit", "fit_power", "fit_forces", "FORMS", "fit_virial", "predicted_sq_error", "conformal_quantile", "interval_coverage",
           "calibration_path", "load_calibration", "save_calibration", "deciles",
           "calibrate", "force_errors", "virial_errors", "CalibrationError", "fitted_kpu_max",
           "beyond_calibration", "EXTRAPOLATION_FACTOR"]


def fit(atom_kpu: np.ndarray, sq_error: np.ndarray) -> dict:
    """Fit sq_error ~ a * atom_kpu + b over atoms."""
    x = np.asarray(atom_kpu, dtype=np.float64).ravel()
    y = np.asarray(sq_error, dtype=np.float64).ravel()
    if x.size < 2 or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise ValueError("calibration needs at least two finite (KPU, error) pairs")
    A = np.stack([x, np.ones_like(x)], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    if b < 0 or a <= 0:
        a, b = float(x @ y / (x @ x)), 0.0
    return {"a": float(a), "b": float(b), "n_atoms": int(x.size),
            "model": "|dF_i|^2 = a * KPU_i + b", "unit": "eV^2/A^2"}


def fit_power(atom_kpu: np.ndarray, sq_error: np.ndarray, bins: int = 20) -> dict:
    """Fit sq_error ~ a * atom_kpu**p over atoms (a power law: p = 1 is Theorem 4.3's line).

    A single atom's squared error scatters over orders of magnitude around its mean, so the
    law is fitted to the means of ``bins`` equal-count bins of KPU: least squares of
    log(mean error) on log(mean KPU). Out of the regime it was fitted in, a p above 1 says
    the error grows faster than KPU, as it does where a model extrapolates.
    """
    x = np.asarray(atom_kpu, dtype=np.float64).ravel()
    y = np.asarray(sq_error, dtype=np.float64).ravel()
    if x.size < 2 * bins or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)) or np.any(x <= 0):
        raise ValueError(f"a power-law calibration needs at least {2 * bins} finite atoms with KPU > 0")
    order = np.argsort(x, kind="stable")
    parts = np.array_split(order, bins)
    mx = np.array([x[i].mean() for i in parts])
    my = np.array([y[i].mean() for i in parts])
    keep = my > 0
    if keep.sum() < 2:
        raise ValueError("a power-law calibration needs errors above zero in at least two KPU bins")
    p, log_a = np.polyfit(np.log(mx[keep]), np.log(my[keep]), 1)
    return {"a": float(np.exp(log_a)), "b": 0.0, "p": float(p), "n_atoms": int(x.size),
            "model": "|dF_i|^2 = a * KPU_i^p", "unit": "eV^2/A^2"}


#: forms of the force calibration: the power law (the default; the line where it fails) or the line
FORMS = ("power", "line")
POWER_BINS = 8  # KPU bins of the power-law fit (768 atoms: 96 a bin)
POWER_RANGE = (0.5, 3.0)  # exponents outside it are taken as a failed fit


def fit_forces(atom_kpu: np.ndarray, sq_error: np.ndarray, form: str = "power") -> dict:
    """The force calibration ``alkpu run`` and ``alkpu calibrate`` use.

    ``"power"``: |dF|^2 = a KPU^p on the means of :data:`POWER_BINS` KPU bins. On the hotter
    rung of the label-efficiency benchmark it predicted the top KPU decile's error where the
    line fell 20 % short (docs/benchmarks.md). The line is kept beside it under ``"line"``
    (the diverse selection's noise floor b / 3a, the virial fallback), and replaces it when the
    atoms are too few for the bins or p leaves :data:`POWER_RANGE` (``"fallback"`` says why).
    ``"line"``: Theorem 4.3's a KPU + b alone.
    """
    if form not in FORMS:
        raise ValueError(f"unknown calibration form {form!r}: use one of {', '.join(FORMS)}")
    line = fit(atom_kpu, sq_error)
    reach = {"kpu_max": float(np.max(atom_kpu))}
    if form == "line":
        return {**line, **reach}
    try:
        power = fit_power(atom_kpu, sq_error, bins=POWER_BINS)
    except ValueError as err:
        return {**line, **reach, "fallback": f"power law not fitted ({err}); the line is used"}
    if not POWER_RANGE[0] <= power["p"] <= POWER_RANGE[1]:
        return {**line, **reach, "fallback": f"power law exponent {power['p']:.3g} outside "
                f"{POWER_RANGE[0]}-{POWER_RANGE[1]}; the line is used"}
    return {**power, **reach, "line": line}


#: frames whose largest atomic KPU exceeds this many times the calibration's largest count as
#: beyond its range (the default of ``kpu/extrapolation`` and what ``alkpu kpu`` reports)
EXTRAPOLATION_FACTOR = 2.0


def fitted_kpu_max(calibration: dict) -> float | None:
    """The largest atomic KPU among the atoms the calibration was fitted on (``"kpu_max"``; from
    the deciles for a calibration saved without it), or None when it does not say."""
    if calibration.get("kpu_max") is not None:
        return float(calibration["kpu_max"])
    rows = calibration.get("deciles") or []
    return max((float(r["kpu_max"]) for r in rows), default=None)


def beyond_calibration(calibration: dict, atom_kpu: np.ndarray, factor: float) -> np.ndarray:
    """(F,) True for frames whose largest atomic KPU exceeds ``factor`` times the largest the
    calibration was fitted on.

    There the calibrated sigma is an extrapolation of a fit made on the training frames, and it
    under-predicts: in the demo's first model (fitted at 300 K) frames beyond twice the fitted
    KPU had a largest atomic force error 5-13 times their largest sigma (round medians;
    docs/benchmarks.md).
    All False when ``factor`` is 0 or the calibration does not say its range.
    """
    kpu = np.asarray(atom_kpu, dtype=np.float64)
    top = fitted_kpu_max(calibration)
    if not factor or top is None:
        return np.zeros(kpu.shape[0], dtype=bool)
    return kpu.reshape(kpu.shape[0], -1).max(axis=1) > factor * top


def predicted_sq_error(calibration: dict, kpu) -> np.ndarray:
    """a * KPU^p + b (p = 1 unless the calibration is a power law), in the calibration's unit."""
    kpu = np.asarray(kpu, dtype=np.float64)
    p = float(calibration.get("p", 1.0))
    scaled = kpu if p == 1.0 else np.power(np.maximum(kpu, 0.0), p)
    return calibration["a"] * scaled + calibration.get("b", 0.0)


def conformal_quantile(atom_kpu: np.ndarray, sq_error: np.ndarray, calibration: dict,
                       coverage: float = 0.9) -> float:
    """The factor q for which |dF_i| <= q * sigma_i holds for a share ``coverage`` of new atoms.

    Split-conformal: on atoms the calibration was not fitted on, the scores
    |dF_i| / sigma_i (sigma_i^2 the calibration's prediction) are sorted and the
    ceil((n + 1) * coverage)-th smallest is q (infinite when there are too few atoms).
    The guarantee holds for atoms exchangeable with these; a hotter regime can break it.
    """
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must lie between 0 and 1, got {coverage}")
    sigma = np.sqrt(np.maximum(predicted_sq_error(calibration, np.ravel(atom_kpu)), 1e-300))
    scores = np.sort(np.sqrt(np.maximum(np.ravel(sq_error), 0.0)) / sigma)
    k = int(np.ceil((scores.size + 1) * coverage))
    return float(scores[k - 1]) if k <= scores.size else float("inf")


def interval_coverage(atom_kpu: np.ndarray, sq_error: np.ndarray, calibration: dict, q: float) -> float:
    """Share of atoms whose force error lies within q * sigma_i."""
    sigma = np.sqrt(np.maximum(predicted_sq_error(calibration, np.ravel(atom_kpu)), 0.0))
    return float(np.mean(np.sqrt(np.maximum(np.ravel(sq_error), 0.0)) <= q * sigma))


def fit_virial(virial_kpu: np.ndarray, sq_error: np.ndarray) -> dict:
    """Fit |dW_ab|^2 ~ a_v * kpu_ab + b_v over virial components (eV^2)."""
    out = fit(virial_kpu, sq_error)
    out.pop("n_atoms")
    out.update(n_components=int(np.asarray(virial_kpu).size), model="|dW_ab|^2 = a * kpu_ab + b",
               unit="eV^2")
    return out


def deciles(atom_kpu: np.ndarray, sq_error: np.ndarray, calibration: dict) -> list[dict]:
    """Observed vs predicted RMS force error (eV/A) per KPU decile of atoms."""
    x = np.asarray(atom_kpu).ravel()
    y = np.asarray(sq_error).ravel()
    order = np.argsort(x, kind="stable")
    rows = []
    for k, idx in enumerate(np.array_split(order, 10)):
        if idx.size == 0:
            continue
        pred = predicted_sq_error(calibration, x[idx])
        rows.append({
            "decile": k + 1, "atoms": int(idx.size),
            "kpu_min": float(x[idx].min()), "kpu_max": float(x[idx].max()),
            "observed_rms_error": float(np.sqrt(y[idx].mean())),
            "predicted_rms_error": float(np.sqrt(max(pred.mean(), 0.0))),
        })
    return rows


def calibration_path(state_path: str | os.PathLike) -> Path:
    real = Path(os.path.realpath(state_path))
    name = real.name[: -len(".npz")] if real.name.endswith(".npz") else real.name
    return real.with_name(name + ".calibration.json")


def _weights_of(state_path) -> str | None:
    return read_meta(state_path).get("extra", {}).get("weights_sha256")


def save_calibration(state_path: str | os.PathLike, calibration: dict) -> Path:
    path = calibration_path(state_path)
    data = {**calibration, "weights_sha256": _weights_of(state_path)}
    return atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=1)), binary=False)


class CalibrationError(ValueError):
    """A calibration file exists but cannot be used (damaged)."""


def load_calibration(state_path: str | os.PathLike) -> dict | None:
    """The calibration saved for this state's weights, or None (none saved, or saved for other weights).

    A damaged file raises :class:`CalibrationError` rather than silently giving uncalibrated values.
    """
    path = calibration_path(state_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("a"), (int, float)):
            raise ValueError("no fitted scale 'a'")
    except (OSError, ValueError) as exc:
        raise CalibrationError(
            f"the KPU calibration {path} is damaged "
            f"({'truncated or not JSON: ' if isinstance(exc, json.JSONDecodeError) else ''}{exc}). "
            "Delete it, then fit it again: `alkpu calibrate -m MODEL -s LABELLED_FRAMES` (an `alkpu run` "
            "fits it again by itself before its next exploration)."
        ) from None
    if data.get("weights_sha256") != _weights_of(state_path):
        return None
    return data


def force_errors(engine, system, result) -> np.ndarray:
    """Squared per-atom force errors |F_i - F_i^model|^2 (F, N) of a labelled system."""
    _, frame_list = engine._frames(system, result.frames)
    sq = []
    for i, frame in zip(result.frames, frame_list):
        _, force = engine.jacobian.predict(frame)
        sq.append(((system["forces"][i] - force) ** 2).sum(axis=1))
    return np.array(sq)


def virial_errors(engine, system, result) -> tuple[np.ndarray, np.ndarray] | None:
    """(virial KPU (F, 9), squared virial errors (F, 9)) of a labelled system, or None
    when the system has no virial labels or the result no virial KPU."""
    if result.virial_kpu is None or "virials" not in system.data:
        return None
    _, frame_list = engine._frames(system, result.frames)
    sq = []
    for i, frame in zip(result.frames, frame_list):
        label = np.asarray(system["virials"][i], dtype=np.float64).reshape(9)
        sq.append((label - engine.jacobian.predict_virial(frame)) ** 2)
    return np.asarray(result.virial_kpu), np.array(sq)


def calibrate(engine, system, frames=None, progress=None,
              form: str = "power") -> tuple[dict, np.ndarray, np.ndarray]:
    """Per-atom KPU and squared force errors of a labelled dpdata system, and the fit
    (:func:`fit_forces` in ``form``).

    The fit includes the virial (``"virial"``) when the system carries virial labels.
    Returns (calibration, atom_kpu (F, N), sq_error (F, N)).
    """
    result = engine.compute(system, frames=frames, progress=progress)
    sq = force_errors(engine, system, result)
    cal = fit_forces(result.atom_kpu, sq, form)
    virial = virial_errors(engine, system, result)
    if virial is not None:
        cal["virial"] = fit_virial(*virial)
    return cal, result.atom_kpu, sq
