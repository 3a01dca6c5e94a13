"""Frames beyond the calibrated range are candidates, whatever their calibrated sigma.

The calibration of each round is fitted on training frames (:mod:`alkpu_plugin.calibration`),
where the model's errors are small and flat; beyond the largest KPU it saw, its sigma is an
extrapolation that under-predicts the error of a model meeting new configurations. In the demo
(examples/cu-emt) the first model, fitted at 300 K, explored 500-1200 K frames whose largest
atomic KPU was 3 to 15 times the largest of its fit (median of a round; up to 40): their
largest force error was 0.1-0.5 eV/A against a largest sigma of 0.02-0.06, so DP-GEN counted
them accurate (docs/benchmarks.md).

With ``kpu/extrapolation`` = e (default 2), a frame whose largest atomic KPU exceeds e times the
largest KPU the calibration was fitted on is written to ``model_devi.out`` at least at its
system's ``model_devi_f_trust_lo``: DP-GEN then counts it as a candidate (a failed frame stays
failed), and labels it when ``fp_task_max`` leaves room. Its sigma itself stays in ``kpu.npz``;
a comment line of ``model_devi.out`` says how many frames were raised. This is the paper's
relative rule (KPU against its training value) as a floor under the calibrated one.

Applied by the driver before DP-GEN's selection (``make_fp``), from each task's ``kpu.npz``, so
that running it again writes the same file. Not applied with ``kpu/trust "relative"``, a
``select_hook``, or DP-GEN's adaptive lower trust level (which takes a number of candidates
whatever the values).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("dpgen")


def trust_lo(ii: int, jdata: dict, system: int) -> float:
    """The lower force trust level DP-GEN's make_fp uses for ``system`` in iteration ``ii``:
    the exploration job's own, else param.json's, per system when a list or dict."""
    jobs = jdata.get("model_devi_jobs", [])
    job = jobs[ii] if ii < len(jobs) else {}
    value = job.get("model_devi_f_trust_lo")
    if value is None:
        value = jdata["model_devi_f_trust_lo"]
    if isinstance(value, list):
        value = value[system]
    elif isinstance(value, dict):
        value = value[str(system)]
    return float(value)


def factor_of(kpu: dict) -> float:
    """``kpu/extrapolation`` (0: the rule is off)."""
    from ..calibration import EXTRAPOLATION_FACTOR

    return float(kpu.get("extrapolation", EXTRAPOLATION_FACTOR))


def applies(jdata: dict, kpu: dict) -> bool:
    return (bool(factor_of(kpu)) and kpu.get("trust", "calibrated") == "calibrated"
            and not kpu.get("select_hook") and not jdata.get("model_devi_adapt_trust_lo", False))


def raise_beyond_calibration(ii: int, jdata: dict, kpu: dict, explore_dir: Path) -> int:
    """Rewrite the model_devi.out of every task under ``explore_dir`` whose frames lie beyond the
    calibrated range (see the module); returns how many frames were raised to a candidate."""
    from ..calibration import beyond_calibration, fitted_kpu_max
    from ..kpu_engine import KPUResult
    from ..model_devi import BEYOND_CALIBRATION, write_model_devi

    if not applies(jdata, kpu):
        return 0
    factor = factor_of(kpu)
    raised = 0
    for task in sorted(Path(explore_dir).glob("task.*")):
        detail = task / "kpu.npz"
        if not detail.exists():
            continue
        result = KPUResult.load(detail)
        if not result.calibration:
            continue
        lo = trust_lo(ii, jdata, int(task.name.split(".")[1]))
        beyond = beyond_calibration(result.calibration, result.atom_kpu, factor) & ~result.out_of_domain
        sigma = result.atom_sigma
        below = beyond & (sigma.max(axis=1) < lo)
        if not below.any():
            continue
        note = BEYOND_CALIBRATION.format(n=int(below.sum()), factor=factor, kpu_max=fitted_kpu_max(result.calibration), lo=lo)
        write_model_devi(task / "model_devi.out", result.steps, sigma, result.virial_sigma, result.out_of_domain,
                         note, at_least=np.where(below, lo, 0.0))
        raised += int(below.sum())
    if raised:
        log.info("ALKPU iter.%06d: %d explored frame(s) beyond %g x the calibrated KPU range counted as "
                 "candidates (kpu/extrapolation)", ii, raised, factor)
    return raised
