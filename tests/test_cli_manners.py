"""Command-line manners that need no model: the format of --system recognised (or -f asked for),
an uncalibrated model_devi.out that says so, and progress lines when stderr is not a terminal."""

import numpy as np
import pytest

from alkpu_plugin import cli
from alkpu_plugin.kpu_engine import KPUResult
from alkpu_plugin.model_devi import HEADER, UNCALIBRATED, read_model_devi, write_result


def test_format_recognised_or_minus_f_asked_for(tmp_path, capsys):
    npy = tmp_path / "npy"
    (npy / "set.000").mkdir(parents=True)
    (npy / "type.raw").write_text("0\n")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "type.raw").write_text("0\n")
    (raw / "coord.raw").write_text("0 0 0\n")
    traj = tmp_path / "traj"
    traj.mkdir()
    (traj / "100.lammpstrj").write_text("")
    other = tmp_path / "other"
    other.mkdir()
    (other / "frames.xyz").write_text("")
    assert cli._detect_fmt(str(npy), None, "lammps/dump") == "deepmd/npy"
    assert cli._detect_fmt(str(raw), None, "lammps/dump") == "deepmd/raw"
    assert cli._detect_fmt(str(traj), None, "lammps/dump") == "lammps/dump"
    assert cli._detect_fmt(str(npy), "deepmd/npy", "lammps/dump") == "deepmd/npy"  # -f wins
    assert cli._detect_fmt(str(other), "extxyz", "lammps/dump") == "extxyz"
    with pytest.raises(SystemExit) as exc:
        cli._detect_fmt(str(other), None, "lammps/dump", "alkpu kpu")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alkpu kpu: error: {other} is neither a DP-GEN traj/ directory")
    assert "-f deepmd/npy" in err
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty traj/ is read as one, and refused later as an empty trajectory
    assert cli._detect_fmt(str(empty), None, "lammps/dump") == "lammps/dump"


def result(n=3, natoms=4, calibration=None):
    rng = np.random.default_rng(1)
    return KPUResult(np.arange(n), np.arange(n) * 10, rng.random(n), rng.random(n), rng.random((n, natoms)) + 1,
                     calibration, {}, rng.random((n, 9)), [""] * n)


def test_uncalibrated_model_devi_says_so(tmp_path):
    write_result(tmp_path / "raw.out", result())
    lines = (tmp_path / "raw.out").read_text().splitlines()
    assert lines[0] == "#" + HEADER[1:] and lines[1] == UNCALIBRATED
    assert read_model_devi(tmp_path / "raw.out").shape == (3, 7)  # what DP-GEN reads
    write_result(tmp_path / "cal.out", result(calibration={"a": 1e-9, "b": 0.0}))
    assert "uncalibrated" not in (tmp_path / "cal.out").read_text()
    write_result(tmp_path / "rel.out", result(), values=np.ones((3, 1)))  # relative rule: not sqrt(KPU)
    assert "uncalibrated" not in (tmp_path / "rel.out").read_text()


def test_frames_beyond_the_calibrated_range_are_named(tmp_path, capsys):
    """`alkpu kpu` says when frames lie beyond twice the largest KPU the calibration saw."""
    # atom KPU is 1-2 (result()); the calibration saw up to 0.8 (frames beyond 1.6) or 10 (none)
    for kpu_max, beyond in ((0.8, None), (10.0, 0)):
        part = tmp_path / f"part{kpu_max}.npz"
        one = result(calibration={"a": 1e-4, "b": 0.0, "kpu_max": kpu_max})
        one.save(part)
        assert cli.main(["kpu", "--merge", str(part), "-o", ""]) == 0
        out = capsys.readouterr().out
        n = int(((one.atom_kpu.max(axis=1)) > 2 * kpu_max).sum())
        if beyond is None:
            assert n > 0 and f"  {n} frame(s) with an atom's KPU beyond twice the largest" in out
        else:
            assert "beyond twice" not in out


class FakeEngine:
    factorize = False
    virial = True

    def __init__(self, full):
        self.full, self.calls = full, []

    def compute(self, system, frames=None, steps=None, progress=None):
        idx = list(frames)
        self.calls.append(idx)
        f = self.full
        return KPUResult(f.frames[idx], f.steps[idx], f.force_kpu[idx], f.energy_kpu[idx], f.atom_kpu[idx],
                         f.calibration, f.meta, f.virial_kpu[idx], [f.domain[i] for i in idx])


class FakeSystem:
    def __init__(self, n):
        self.n = n

    def get_nframes(self):
        return self.n


def test_progress_lines_off_a_terminal(monkeypatch, capsys):
    full = result(n=7)
    engine = FakeEngine(full)
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: False, raising=False)
    cli._with_progress_lines(engine, "alkpu kpu", chunk_s=0.0)
    out = engine.compute(FakeSystem(7))
    assert sum(engine.calls, []) == list(range(7)) and len(engine.calls) > 1  # in chunks
    for key in ("frames", "steps", "force_kpu", "energy_kpu", "atom_kpu", "virial_kpu"):
        np.testing.assert_array_equal(getattr(out, key), getattr(full, key))
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("alkpu kpu: 7/7 frames, ") and len(err) >= 2
