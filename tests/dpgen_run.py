"""Helpers that run a real `alkpu run` (DP-GEN in kpu mode) in a fresh directory.

Used by the session fixture ``finished_run`` (conftest.py) and by test_alkpu_run.py.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import dpdata

from .conftest import QUIET_ENV
from .test_dpgen_params import PARAM

ALKPU = str(Path(sys.executable).parent / "alkpu")


def make_workdir(root: Path, *, substitute: dict | None = None, type_map: list | None = None,
                 descriptor: dict | None = None, fitting_net: dict | None = None, **changes) -> Path:
    """A DP-GEN run directory on fcc Cu-32: 20 EMT frames at 300 K, the lattice as POSCAR,
    test_dpgen_params.PARAM in kpu mode with short training and exploration, a Shell machine.

    ``substitute`` (e.g. ``{"Ni": 0.5}``) makes it a random alloy (data and POSCAR share the
    species of every site) with ``type_map`` (default: Cu, then the substitutes) and its masses;
    ``descriptor`` / ``fitting_net`` update those keys of the model; other keywords replace
    top-level keys of param.json (None: leave the key out).
    """
    from ase.data import atomic_masses, atomic_numbers

    from alkpu_plugin.reference import fcc_cell, md_frames

    root.mkdir(parents=True, exist_ok=True)
    type_map = list(type_map or ["Cu", *(substitute or {})])
    init = md_frames(300, 20, seed=1, substitute=substitute, type_map=type_map)
    init.to("deepmd/npy", str(root / "data" / "init"))
    (root / "confs").mkdir()
    lattice = fcc_cell("Cu", 2)
    if substitute:  # md_frames keeps the lattice's atom order: the data's species, site by site
        lattice.set_chemical_symbols([init["atom_names"][t] for t in init["atom_types"]])
    poscar = dpdata.System(lattice, fmt="ase/structure")
    poscar.sort_atom_names(type_map=type_map)
    poscar.to("vasp/poscar", str(root / "confs" / "POSCAR"))
    p = copy.deepcopy(PARAM)
    if type_map != PARAM["type_map"]:
        p["type_map"] = type_map
        p["mass_map"] = [round(float(atomic_masses[atomic_numbers[e]]), 3) for e in type_map]
    p["default_training_param"]["model"]["descriptor"].update(descriptor or {})
    p["default_training_param"]["model"]["fitting_net"].update(fitting_net or {})
    p["uncertainty"] = "kpu"
    p["check_interval"] = 2  # dpdispatcher polls every 2 s instead of 30 (jobs here take seconds)
    p["default_training_param"]["training"].update({"numb_steps": 50, "disp_freq": 25, "save_freq": 50})
    p["fp_params"] = {"input_fmt": "deepmd/npy", "input_fn": "input",
                      "output_fmt": "deepmd/npy", "output_fn": "labelled"}
    p["model_devi_f_trust_lo"], p["model_devi_f_trust_hi"] = 0.02, 50.0
    p["model_devi_jobs"][0]["nsteps"] = 50
    p.update(changes)
    p = {k: v for k, v in p.items() if v is not None}  # None: leave the key out
    (root / "param.json").write_text(json.dumps(p, indent=1))

    def machine(command):
        return {"command": command,
                "machine": {"batch_type": "Shell", "context_type": "LocalContext", "local_root": "./",
                            "remote_root": str(root / "remote")},
                "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "group_size": 1}}

    (root / "remote").mkdir()
    (root / "machine.json").write_text(json.dumps(
        {"api_version": "1.0", "train": machine("dp"), "model_devi": machine("lmp"),
         "fp": machine("alkpu label -i input -o labelled")}, indent=1))
    return root


def alkpu_run(root, **kw):
    return subprocess.Popen([ALKPU, "run", "param.json", "machine.json"], cwd=root,
                            env={**os.environ, **QUIET_ENV, "TF_CPP_MIN_LOG_LEVEL": "3",
                                 # the jobs' shells find dp, lmp and alkpu of this environment
                                 "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def records(root):
    path = Path(root) / "record.dpgen"
    return [tuple(map(int, ln.split())) for ln in path.read_text().splitlines()] if path.exists() else []
