"""Shared fixtures: small Cu data labelled by ASE's EMT, and running real `dp`."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "DP_INTRA_OP_PARALLELISM_THREADS": "2",
    "DP_INTER_OP_PARALLELISM_THREADS": "1",
    "OMP_NUM_THREADS": "2",
}

# a small se_e2_a model: ~3.5k weights, trains in seconds
TINY_INPUT = {
    "model": {
        "type_map": ["Cu"],
        "descriptor": {"type": "se_e2_a", "sel": [60], "rcut_smth": 3.5, "rcut": 4.5,
                       "neuron": [8, 16], "axis_neuron": 4, "seed": 1},
        "fitting_net": {"neuron": [32, 32], "seed": 1},
    },
    "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 3e-5, "decay_steps": 100},
    "optimizer": {"type": "RLEKF", "blocksize": 1024},
    "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
    "training": {
        "training_data": {"systems": ["DATA/train"], "batch_size": 1},
        "validation_data": {"systems": ["DATA/valid"], "batch_size": 1, "numb_btch": 10},
        "numb_steps": 100, "disp_freq": 50, "save_freq": 50, "seed": 3,
    },
}


@pytest.fixture(scope="session")
def cu_data(tmp_path_factory):
    """40 training and 10 validation frames of 32-atom fcc Cu, EMT at 300 K."""
    from alkpu_plugin.reference import md_frames

    root = tmp_path_factory.mktemp("cu_emt")
    md_frames(300, 40, seed=1).to("deepmd/npy", str(root / "train"))
    md_frames(300, 10, seed=2).to("deepmd/npy", str(root / "valid"))
    return root


def make_input(cu_data, **changes):
    """TINY_INPUT with data paths filled in and nested keys changed ("a/b": v)."""
    data = copy.deepcopy(TINY_INPUT)
    for key, value in changes.items():
        node = data
        *path, last = key.split("/")
        for part in path:
            node = node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    tr = data["training"]
    tr["training_data"]["systems"] = [str(cu_data / "train")]
    tr["validation_data"]["systems"] = [str(cu_data / "valid")]
    return data


def run_dp(cwd, *args, input_data=None, check=True, python_code=None, env=None):
    """Run the real `dp` command in ``cwd`` (``env``: variables added); returns the CompletedProcess."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    if input_data is not None:
        (cwd / "input.json").write_text(json.dumps(input_data, indent=1))
    env = {**os.environ, **QUIET_ENV, **(env or {})}
    cmd = [str(BIN / "dp"), *args] if python_code is None else [sys.executable, "-c", python_code, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_lcurve(path):
    import numpy as np

    return np.loadtxt(path, ndmin=2)


#: the paper's RLEKF settings (ALGORITHMS.md), whose forces wait on a plateau for a few hundred
#: steps; the optimizer's defaults are docs/rlekf.md#the-defaults
PAPER_SETTINGS = {"optimizer/force_normaliser": "natoms", "optimizer/kalman_lambda": 0.98,
                  "optimizer/kalman_nue": 0.9987}


@pytest.fixture(scope="session")
def trained_model(cu_data, tmp_path_factory):
    """A tiny RLEKF model trained 200 steps on the 300 K data, frozen: (dir, graph.pb)."""
    root = tmp_path_factory.mktemp("rlekf_model")
    run_dp(root, "train", "input.json",
           input_data=make_input(cu_data, **{"training/numb_steps": 200, "training/disp_freq": 100,
                                             "training/save_freq": 200}))
    run_dp(root, "freeze", "-o", "graph.pb")
    return root, root / "graph.pb"


@pytest.fixture(scope="session")
def hot_and_cold(tmp_path_factory):
    """Fresh labelled frames at 300 K and at 1200 K (8 each), one deepmd/npy system per
    temperature named as `alkpu report` reads validation sets: 300K/, 1200K/."""
    from alkpu_plugin.reference import md_frames

    root = tmp_path_factory.mktemp("cu_hot_cold")
    md_frames(300, 8, seed=11).to("deepmd/npy", str(root / "300K"))
    md_frames(1200, 8, seed=12).to("deepmd/npy", str(root / "1200K"))
    return root


#: seed of the kill schedule of ``killed_run`` (ALKPU_KILL_SEED=<n> draws other moments)
KILL_SEED = int(os.environ.get("ALKPU_KILL_SEED", "17"))


@pytest.fixture(scope="session")
def killed_run(tmp_path_factory):
    """Two real `alkpu run`s in kpu mode of one seeded param.json (iteration 0 whole, iteration 1's
    training continuing the model and its Kalman state), side by side: one uninterrupted, one
    SIGKILLed at 10 moments of a seeded schedule (inside training, calibration, LAMMPS, KPU,
    labelling, between steps; the whole process group, or the driver alone so that its jobs run on;
    always once after the training's checkpoint at step 25 of 50, with its job) and started again
    each time. Every job runs through a guard that records a second copy started
    in a directory where one runs. Returns a dict: root, reference, kills, duplicates, stamp (mtime
    of iteration 0's frozen model when the first kill after its training came), seconds."""
    import time

    from .dpgen_run import alkpu_run, guard_commands, kill_schedule, make_workdir, run_with_kills

    base = tmp_path_factory.mktemp("kpu")
    duplicates = base / "duplicates.txt"
    roots = []
    for name in ("run", "reference"):
        root = make_workdir(base / name, training_reuse_iter=1, training_reuse_numb_steps=40, seed=1)
        param = json.loads((root / "param.json").read_text())
        param["default_training_param"]["training"]["save_freq"] = 25  # a checkpoint inside training
        (root / "param.json").write_text(json.dumps(param, indent=1))
        guard_commands(root, duplicates)
        roots.append(root)
    root, reference = roots
    t0 = time.perf_counter()
    ref = alkpu_run(reference)
    frozen = root / "iter.000000" / "00.train" / "000" / "frozen_model.pb"
    try:
        kills, _ = run_with_kills(root, kill_schedule(KILL_SEED), watch=frozen)
    finally:
        ref_out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, ref_out[-5000:]
    stamp = next(k["watched_mtime"] for k in kills if k["record"] >= (0, 1))
    return {"root": root, "reference": reference, "kills": kills, "duplicates": duplicates, "stamp": stamp,
            "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="session")
def finished_run(killed_run):
    """A real `alkpu run` in kpu mode (iteration 0 whole, iteration 1's training), killed 10 times
    and resumed: (root, mtime of the first training's frozen model). Shared by test_alkpu_run,
    test_report, test_diverse_selection and test_plateau_guard."""
    return killed_run["root"], killed_run["stamp"]


@pytest.hookimpl(wrapper=True)  # a wrapper runs before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs ``-n N --dist loadgroup``): all tests of a file on one
    worker, and every file that uses the session's ``killed_run`` on one worker, so that module and
    session fixtures are built once. Without xdist the marker does nothing."""
    shared = {item.nodeid.split("::")[0] for item in items if "killed_run" in getattr(item, "fixturenames", ())}
    for item in items:
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group("killed_run" if path in shared else path))
    return (yield)
