"""Frames beyond the calibrated KPU range become DP-GEN candidates (kpu/extrapolation)."""

import numpy as np
import pytest

from alkpu_plugin.calibration import beyond_calibration, fit_forces, fitted_kpu_max
from alkpu_plugin.dpgen.extrapolation import raise_beyond_calibration, trust_lo
from alkpu_plugin.kpu_engine import KPUResult
from alkpu_plugin.model_devi import OUT_OF_DOMAIN, raised_frames, read_model_devi, write_result

# |dF|^2 = 1e-6 KPU + 1e-4, fitted on atoms whose KPU reached 1000
CAL = {"a": 1e-6, "b": 1e-4, "kpu_max": 1000.0}


def test_the_fit_records_its_largest_kpu_and_frames_beyond_a_factor_of_it_are_flagged():
    rng = np.random.default_rng(0)
    kpu = rng.uniform(10, 500, 400)
    cal = fit_forces(kpu, 1e-6 * kpu ** 1.5)
    assert cal["kpu_max"] == pytest.approx(kpu.max())
    assert fit_forces(kpu, 1e-6 * kpu, "line")["kpu_max"] == pytest.approx(kpu.max())
    frames = np.array([[100, 900.0], [100, 1100.0], [2100.0, 5.0]])  # per atom
    assert beyond_calibration(CAL, frames, 2.0).tolist() == [False, False, True]
    assert beyond_calibration(CAL, frames, 1.0).tolist() == [False, True, True]
    assert not beyond_calibration(CAL, frames, 0).any()  # switched off
    # a calibration saved without the key: its deciles say the range; with neither, no flag
    assert fitted_kpu_max({"a": 1.0, "deciles": [{"kpu_max": 3.0}, {"kpu_max": 7.5}]}) == 7.5
    assert not beyond_calibration({"a": 1.0}, frames, 2.0).any()


def task(root, name, kpu_per_atom, domain=None):
    """An exploration task as `alkpu lmp-kpu` leaves it: kpu.npz and model_devi.out."""
    kpu = np.asarray(kpu_per_atom, dtype=float)
    n = len(kpu)
    result = KPUResult(np.arange(n), np.arange(n) * 10, kpu.mean(axis=1), np.ones(n), kpu, dict(CAL), {},
                       None, domain or [""] * n)
    path = root / "01.model_devi" / name
    path.mkdir(parents=True)
    result.save(path / "kpu.npz")
    write_result(path / "model_devi.out", result)
    return path


def dpgen_selection(tasks, lo, hi):
    """DP-GEN 0.14's own classification of the frames of one system's tasks: sets of (task, step)."""
    from dpgen.generator.run import _select_by_model_devi_standard

    out = _select_by_model_devi_standard([str(t) for t in tasks], lo, hi, 1e10, 1e10, None, "lammps")
    accurate, candidate, failed = ({(t, int(s)) for t, s in group} for group in out[:3])
    return candidate, accurate, failed


def test_frames_beyond_the_range_become_candidates_and_dpgen_counts_stay_true(tmp_path):
    # sigma = sqrt(1e-6 KPU + 1e-4): 0.0105 at KPU 10, 0.0387 at 1400, 0.0469 at 2100, 0.0592 at 3400,
    # 0.30 at 9e4
    kpus = [[10, 10], [1400, 10], [2100, 10], [3400, 10], [9e4, 10], [2500, 10]]
    domain = ["", "", "", "", "", "no neighbour inside rcut"]
    jdata = {"model_devi_f_trust_lo": [0.05, 0.06], "model_devi_f_trust_hi": 0.25,
             "model_devi_jobs": [{"sys_idx": [0, 1]}]}
    sys0 = task(tmp_path, "task.000.000000", kpus, domain)
    sys1 = task(tmp_path, "task.001.000000", kpus, domain)
    before = {t: read_model_devi(t / "model_devi.out") for t in (sys0, sys1)}
    assert raised_frames(sys0 / "model_devi.out") == 0

    raised = raise_beyond_calibration(0, jdata, {}, tmp_path / "01.model_devi")

    # frames beyond 2 x 1000 with sigma under their system's trust_lo: KPU 2100 on both systems,
    # 3400 (sigma 0.059) on system 1 only
    assert raised == 3
    for t, lo, up in ((sys0, 0.05, [2]), (sys1, 0.06, [2, 3])):
        table = read_model_devi(t / "model_devi.out", 6)
        old = before[t]
        for row in range(5):
            if row in up:
                assert table[row, 4] == pytest.approx(lo)  # raised to the lower trust level
            else:  # inside the range, or already above the level: as the job wrote it
                assert table[row, 4] == pytest.approx(old[row, 4])
        assert table[5, 4] == OUT_OF_DOMAIN  # outside the model's domain stays failed
        assert np.array_equal(table[:, [0, 1, 2, 3, 5, 6]], old[:, [0, 1, 2, 3, 5, 6]])
        assert f"{len(up)} frame(s) beyond 2 x the calibration's largest KPU" in (t / "model_devi.out").read_text()
        assert raised_frames(t / "model_devi.out") == len(up)  # what alkpu report counts
        candidate, accurate, failed = dpgen_selection([t], lo, 0.25)
        assert {s for _, s in candidate} == {20, 30}
        assert {s for _, s in accurate} == {0, 10}
        assert {s for _, s in failed} == {40, 50}
    # the result file keeps the calibrated sigma
    assert KPUResult.load(sys0 / "kpu.npz").atom_sigma.max(axis=1)[2] == pytest.approx(np.sqrt(2.1e-3 + 1e-4))

    # running it again writes the same files; switched off, nothing is raised
    first = (sys0 / "model_devi.out").read_text()
    assert raise_beyond_calibration(0, jdata, {}, tmp_path / "01.model_devi") == 3
    assert (sys0 / "model_devi.out").read_text() == first
    assert raise_beyond_calibration(0, jdata, {"extrapolation": 0}, tmp_path / "01.model_devi") == 0
    assert raise_beyond_calibration(0, jdata, {"trust": "relative"}, tmp_path / "01.model_devi") == 0
    assert raise_beyond_calibration(0, {**jdata, "model_devi_adapt_trust_lo": True}, {},
                                    tmp_path / "01.model_devi") == 0


def test_the_trust_level_is_the_one_dpgen_uses_for_the_system_and_iteration():
    jdata = {"model_devi_f_trust_lo": {"0": 0.05, "1": 0.07},
             "model_devi_jobs": [{}, {"model_devi_f_trust_lo": 0.1}]}
    assert trust_lo(0, jdata, 1) == 0.07
    assert trust_lo(1, jdata, 1) == 0.1  # the job's own level
    assert trust_lo(5, {"model_devi_f_trust_lo": 0.05}, 0) == 0.05  # past the list of jobs
