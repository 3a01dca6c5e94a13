"""`make demo`, one round: examples/cu-emt end to end (data, alkpu run, alkpu report).

Real parts throughout: EMT data, `dp train` (RLEKF), `dp freeze`, LAMMPS, KPU, DP-GEN's selection,
EMT labels through DP-GEN's custom fp style, dpdispatcher's Shell machine, the report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import QUIET_ENV

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "cu-emt" / "demo.py"
ENV = {**os.environ, **QUIET_ENV, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run([sys.executable, str(DEMO), str(work), "--rounds", "1"], env=ENV,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return work, proc.stdout


def test_one_round_of_the_demo_runs_end_to_end(one_round):
    work, out = one_round
    param = json.loads((work / "param.json").read_text())
    assert param["uncertainty"] == "kpu" and len(param["model_devi_jobs"]) == 1
    shipped = json.loads((DEMO.parent / "param.json").read_text())
    assert param["model_devi_jobs"][0] == shipped["model_devi_jobs"][0]
    # the loop: iteration 0 complete, iteration 1 trained, then no exploration job left
    records = [tuple(map(int, ln.split())) for ln in (work / "record.dpgen").read_text().splitlines()]
    assert records[-1] == (1, 2)
    table = np.loadtxt(work / "iter.000000" / "01.model_devi" / "task.000.000000" / "model_devi.out", ndmin=2)
    assert table.shape[0] == shipped["model_devi_jobs"][0]["nsteps"] // shipped["model_devi_jobs"][0]["trj_freq"] + 1
    # every step timed, and the progress a person follows in the terminal
    stages = [json.loads(ln) for ln in (work / "alkpu-stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages if s["iter"] == 0] == [
        "make_train", "run_train", "post_train", "kpu_calibration", "make_model_devi", "run_model_devi",
        "post_model_devi", "make_fp", "run_fp", "post_fp"]
    assert all(s["wall_s"] >= 0 and s["cpu_s"] >= 0 for s in stages)
    assert next(s for s in stages if s["stage"] == "run_train")["cpu_s"] > 1.0
    assert "[alkpu] iter 000 300 K | run_model_devi   done in" in out
    assert f"{table.shape[0]} frames explored in 1 task(s)" in out
    timing = json.loads((work / "iter.000000" / "01.model_devi" / "task.000.000000" / "alkpu_timing.json").read_text())
    assert timing["frames"] == table.shape[0] and timing["kpu_cpu_s"] > 0 and timing["lmp_cpu_s"] > 0
    # the report of the run
    report = json.loads((work / "report" / "report.json").read_text())
    assert (work / "report" / "index.html").is_file() and (work / "report" / "index.md").is_file()
    assert list((work / "report").glob("*.png"))
    assert sorted(s["name"] for s in report["validation"]["sets"]) == sorted(
        p.name for p in (work / "validation").iterdir())
    first = report["rounds"][0]
    assert first["temps"] == [300.0] and first["frames_explored"] == table.shape[0]
    assert first["labelled"] == len(list((work / "iter.000000" / "02.fp").glob("task.*")))
    # every round's model on every held-out temperature
    assert {(r["iteration"], r["set"]) for r in report["validation"]["rmse"]} == {
        (i, s["name"]) for i in (0, 1) for s in report["validation"]["sets"]}


def test_the_demo_never_replaces_a_different_param(one_round):
    work, _ = one_round
    before = (work / "param.json").read_text()
    proc = subprocess.run([sys.executable, str(DEMO), str(work), "--rounds", "2"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "param.json exists and differs" in proc.stderr + proc.stdout
    assert (work / "param.json").read_text() == before
