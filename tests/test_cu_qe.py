"""examples/cu-qe and examples/cuni-qe: one ALKPU iteration labelled by Quantum ESPRESSO
through DP-GEN's pwscf style.

Real parts: pw.x for the initial data (each example's prepare.py) and for the selected frame
(DP-GEN's make_fp_pwscf / run_fp / post_fp; one pseudopotential for Cu, two for the Cu-Ni alloy),
RLEKF training (a two-species resnet_dt model for Cu-Ni), LAMMPS + KPU exploration, DP-GEN's
selection, and iteration 1's training on the new frame. Needs pw.x: `make test` installs it.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dpdata
import numpy as np
import pytest

from .conftest import QUIET_ENV
from .dpgen_run import records

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALKPU = str(Path(sys.executable).parent / "alkpu")

# per example: atoms per type in the initial frames and in the explored (labelled) frame, the
# pseudopotentials its pw.x inputs name, and whether the model has resnet_dt in both nets
CASES = {
    "cu-qe": {"init_numbs": [4], "explored_numbs": [4], "pseudo": ["Cu.pz-d-rrkjus.UPF"], "resnet": False},
    "cuni-qe": {"init_numbs": [2, 2], "explored_numbs": [4, 4],
                "pseudo": ["Cu.pz-d-rrkjus.UPF", "Ni.pz-nd-rrkjus.UPF"], "resnet": True},
}


def load_prepare(example):
    spec = importlib.util.spec_from_file_location(f"{example}_prepare".replace("-", "_"),
                                                  EXAMPLES / example / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=list(CASES))
def qe_run(request, tmp_path_factory):
    """The example's param with smaller numbers, run to the end: (root, param, prepare, case)."""
    if shutil.which("pw.x") is None:
        pytest.fail("pw.x (Quantum ESPRESSO) is not on PATH. `make test` installs it (target `qe`: "
                    "apt-get install quantum-espresso quantum-espresso-data); this test does not skip.")
    example = request.param
    prepare = load_prepare(example)
    param, machine = prepare.load_example()
    param["default_training_param"]["training"].update({"numb_steps": 30, "disp_freq": 15, "save_freq": 30})
    param["model_devi_jobs"][0].update({"nsteps": 30, "trj_freq": 10})
    # every explored frame is a candidate (the upper level too: a 30-step model's calibrated
    # uncertainty can exceed the examples' upper levels, which would discard every frame)
    param["model_devi_f_trust_lo"], param["model_devi_f_trust_hi"] = 1e-3, 1e3
    param["seed"] = 1
    param["fp_task_max"] = 1
    root = tmp_path_factory.mktemp(example) / "run"
    seconds = {}
    start = time.perf_counter()
    prepare.prepare(root, frames=3, param=param, machine=machine)
    seconds["init labels"] = time.perf_counter() - start
    start = time.perf_counter()
    with open(root / "alkpu.log", "w") as log:
        proc = subprocess.Popen([ALKPU, "run", "param.json", "machine.json"], cwd=root,
                                env={**os.environ, **QUIET_ENV, "TF_CPP_MIN_LOG_LEVEL": "3",
                                     # the jobs' shells find dp, lmp and alkpu of this environment
                                     "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its job shells
                proc.wait()
    assert proc.returncode == 0, (root / "alkpu.log").read_text()[-5000:]
    seconds["alkpu run"] = time.perf_counter() - start
    seconds["pw.x wall per label"] = [  # pw.x's own clock, initial data and 02.fp
        float(line.split("CPU")[1].split("s WALL")[0]) for out in sorted(root.glob("*/*/output"))
        + sorted(root.glob("iter.*/02.fp/task.*/output"))
        for line in out.read_text().splitlines() if line.strip().startswith("PWSCF") and "WALL" in line]
    print(f"{example} timings: {seconds}")
    return root, param, prepare, CASES[example]


def _settings(text):
    """A pw.x input up to its cell, without the atom count (the explored cell may be larger)."""
    head = text.split("CELL_PARAMETERS")[0]
    return [ln for ln in head.splitlines() if not ln.strip().lower().startswith("nat")]


def test_selected_frame_is_labelled_by_pw_x_through_dpgen_pwscf(qe_run):
    root, param, prepare, case = qe_run
    assert records(root)[-1] == (1, 2)  # one exploration job: iteration 1 stops after training
    init = dpdata.LabeledSystem(str(root / "data" / "init"), fmt="deepmd/npy")
    assert init.get_nframes() == 3 and list(init["atom_numbs"]) == case["init_numbs"]
    fp = root / "iter.000000" / "02.fp"
    tasks = sorted(fp.glob("task.*"))
    assert len(tasks) == 1  # fp_task_max
    init_input = (root / "init-labels" / "frame.000" / "input").read_text()
    pw_input = getattr(prepare, "pw_input", None) or prepare.cu_qe().pw_input
    for task in tasks:
        # DP-GEN's make_fp_pwscf wrote the input: the same settings as the initial data's
        text = (task / "input").read_text()
        assert text == pw_input(dpdata.System(str(task / "POSCAR"), fmt="vasp/poscar"), param)
        assert _settings(text) == _settings(init_input)
        assert "tprnfor=.TRUE." in text and "occupations='smearing'" in text
        assert all(name in text for name in case["pseudo"])
        assert all((task / name).exists() for name in param["fp_pp_files"])
        output = (task / "output").read_text()
        assert "Program PWSCF" in output and output.count("JOB DONE") == 1
    # post_fp collected exactly what dpdata reads from the pw.x outputs
    labelled = dpdata.LabeledSystem(str(fp / "data.000"), fmt="deepmd/npy")
    assert labelled.get_nframes() == len(tasks)
    assert labelled["atom_names"] == param["type_map"] and list(labelled["atom_numbs"]) == case["explored_numbs"]
    for i, task in enumerate(tasks):
        direct = dpdata.LabeledSystem(str(task / "output"), fmt="qe/pw/scf", type_map=param["type_map"])
        np.testing.assert_allclose(labelled["energies"][i], direct["energies"][0], rtol=0, atol=1e-8)
        np.testing.assert_allclose(labelled["forces"][i], direct["forces"][0], rtol=0, atol=1e-8)
        np.testing.assert_allclose(labelled["coords"][i], direct["coords"][0], atol=1e-5)
    # eV, on the initial data's scale per atom (same pseudopotentials and cutoffs, same composition)
    per_atom = labelled["energies"] / sum(case["explored_numbs"])
    assert np.all(np.abs(per_atom - init["energies"].mean() / sum(case["init_numbs"])) < 0.3)
    assert np.all(np.isfinite(labelled["forces"])) and np.abs(labelled["forces"]).max() > 1e-3
    assert np.abs(labelled["forces"]).max() < 10.0


def test_new_frame_is_in_the_next_training(qe_run):
    root, _, _, case = qe_run
    train = root / "iter.000001" / "00.train" / "000"
    used = json.loads((train / "input.json").read_text())
    model = used["model"]
    assert bool(model["descriptor"].get("resnet_dt")) == bool(model["fitting_net"].get("resnet_dt")) == case["resnet"]
    systems = used["training"]["training_data"]["systems"]
    assert "../data.iters/iter.000000/02.fp/data.000" in systems
    new = dpdata.LabeledSystem(str(train / "../data.iters/iter.000000/02.fp/data.000"), fmt="deepmd/npy")
    assert new.get_nframes() == 1
    np.testing.assert_array_equal(
        new["energies"], dpdata.LabeledSystem(str(root / "iter.000000" / "02.fp" / "data.000"),
                                              fmt="deepmd/npy")["energies"])
    assert (root / "iter.000001" / "00.train" / "graph.000.pb").is_file()  # trained on it
