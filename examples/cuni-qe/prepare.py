"""Set up a run directory for examples/cuni-qe: a Cu-Ni alloy labelled by pw.x.

    .venv/bin/python examples/cuni-qe/prepare.py [RUNDIR] [--frames N]
    cd RUNDIR && PATH=$PWD/../.venv/bin:$PATH alkpu run param.json machine.json

RUNDIR (default ``cuni-qe-run``) gets:

* ``param.json`` and ``machine.json``, copied from this folder;
* ``confs/POSCAR``: where exploration starts: 8 atoms, two conventional fcc cells side by side
  (a = 3.56 A), four of the eight sites, drawn at random, holding Ni;
* ``data/init`` (deepmd/npy): N frames of a short EMT molecular dynamics run of the 4-atom
  conventional cell with two Cu and two Ni atoms (``alkpu_plugin.reference.md_frames``), each
  labelled by ``pw.x``;
* ``init-labels/frame.*``: the pw.x input and output of each of those frames.

The pw.x inputs are written and run by examples/cu-qe/prepare.py's functions: DP-GEN's own
pwscf writer (``make_pwscf_input``) from the ``user_fp_params``, ``fp_pp_path``/``fp_pp_files``
and ``mass_map`` of param.json, and the ``fp`` command of machine.json, so the initial data and
the frames DP-GEN labels during the loop come from the same DFT settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TYPE_MAP = ["Cu", "Ni"]
A = 3.56  # lattice constant (A) of the EMT dynamics and of the starting structure


def cu_qe():
    """examples/cu-qe/prepare.py as a module (check_qe, pw_input, label)."""
    spec = importlib.util.spec_from_file_location("cu_qe_prepare", HERE.parent / "cu-qe" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_example():
    """(param, machine) of this example, as dicts."""
    return (json.loads((HERE / "param.json").read_text()),
            json.loads((HERE / "machine.json").read_text()))


def starting_structure(seed: int = 2):
    """The 8-atom exploration cell as a dpdata System: Cu4Ni4 on an fcc lattice, sites drawn with
    ``seed`` (the default 2 gives an arrangement other than the layered one of the initial data)."""
    import dpdata

    from alkpu_plugin.reference import fcc_cell

    cell = fcc_cell("Cu", 1, A).repeat((2, 1, 1))
    symbols = np.array(cell.get_chemical_symbols(), dtype=object)
    symbols[np.random.default_rng(seed).permutation(len(cell))[: len(cell) // 2]] = "Ni"
    cell.set_chemical_symbols(symbols.tolist())
    structure = dpdata.System(cell, fmt="ase/structure")
    structure.sort_atom_names(type_map=TYPE_MAP)
    return structure


def prepare(rundir, frames: int = 4, temperature: float = 600.0, seed: int = 0,
            param: dict | None = None, machine: dict | None = None) -> Path:
    """Write a complete run directory (param.json, machine.json, confs/POSCAR, data/init):
    examples/cu-qe's preparation with this example's files, alloy frames and starting cell."""
    return cu_qe().prepare(rundir, frames, temperature, seed, param, machine, start=starting_structure(),
                           md_options={"a": A, "substitute": {"Ni": 0.5}, "type_map": TYPE_MAP},
                           examples=load_example)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rundir", nargs="?", default="cuni-qe-run")
    parser.add_argument("--frames", type=int, default=4, help="initial frames to label (default 4)")
    args = parser.parse_args()
    try:
        rundir = prepare(args.rundir, args.frames)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    print(f"ready: cd {rundir} && alkpu run param.json machine.json  (dp, lmp, alkpu, pw.x on PATH)")


if __name__ == "__main__":
    main()
