"""Set up a run directory for examples/cu-qe: initial data labelled by pw.x.

    .venv/bin/python examples/cu-qe/prepare.py [RUNDIR] [--frames N]
    cd RUNDIR && PATH=$PWD/../.venv/bin:$PATH alkpu run param.json machine.json

RUNDIR (default ``cu-qe-run``) gets:

* ``param.json`` and ``machine.json``, copied from this folder;
* ``confs/POSCAR``: the conventional 4-atom fcc Cu cell (a = 3.61 Å), where exploration starts;
* ``data/init`` (deepmd/npy): N frames of a short EMT molecular dynamics run of that cell
  (``alkpu_plugin.reference.md_frames``), each labelled by ``pw.x``;
* ``init-labels/frame.*``: the pw.x input and output of each of those frames.

The pw.x inputs are written by DP-GEN's own pwscf writer (``make_pwscf_input``) from the
``user_fp_params``, ``fp_pp_path``/``fp_pp_files`` and ``mass_map`` of param.json, and run with the
``fp`` command and environment of machine.json, so the initial data and the frames DP-GEN labels
during the loop come from the same DFT settings. Results are read with dpdata's ``qe/pw/scf``,
the reader DP-GEN's post_fp uses too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTALL_HINT = ("Quantum ESPRESSO's pw.x is not on PATH: `make qe` (run by `make test`) installs it, "
                "or `apt-get install quantum-espresso quantum-espresso-data`")


def load_example():
    """(param, machine) of this example, as dicts."""
    return (json.loads((HERE / "param.json").read_text()),
            json.loads((HERE / "machine.json").read_text()))


def check_qe(param: dict) -> None:
    """Fail with one clear message when pw.x or the pseudopotentials are missing."""
    if shutil.which("pw.x") is None:
        raise RuntimeError(INSTALL_HINT)
    for name in param["fp_pp_files"]:
        if not (Path(param["fp_pp_path"]) / name).is_file():
            raise RuntimeError(f"pseudopotential {name} not found in {param['fp_pp_path']} "
                               "(Debian package quantum-espresso-data)")


def pw_input(frame, param: dict) -> str:
    """pw.x input for one dpdata frame, written as DP-GEN's make_fp_pwscf writes it."""
    from dpgen.generator.lib.pwscf import make_pwscf_input

    data = frame.data
    data["atom_masses"] = [param["mass_map"][param["type_map"].index(n)] for n in data["atom_names"]]
    pps = [param["fp_pp_files"][param["type_map"].index(n)] for n in data["atom_names"]]
    return make_pwscf_input(data, pps, param["user_fp_params"], user_input=True)


def label(system, param: dict, machine: dict, workdir: Path):
    """Label every frame of a dpdata System with pw.x; returns a dpdata LabeledSystem."""
    import dpdata

    check_qe(param)
    fp = machine["fp"]
    env = {**os.environ, **fp["resources"].get("envs", {})}
    labelled = None
    for i in range(system.get_nframes()):
        task = Path(workdir) / f"frame.{i:03d}"
        task.mkdir(parents=True, exist_ok=True)
        for name in param["fp_pp_files"]:
            link = task / name
            if not link.exists():
                link.symlink_to(Path(param["fp_pp_path"]).resolve() / name)
        (task / "input").write_text(pw_input(system.sub_system([i]), param))
        start = time.perf_counter()
        with open(task / "output", "w") as out:
            # as dpdispatcher runs DP-GEN's fp command: in the task, log to `output`
            proc = subprocess.run(fp["command"], shell=True, cwd=task, env=env, stdout=out, check=False,
                                  stderr=subprocess.STDOUT)
        text = (task / "output").read_text()
        if proc.returncode != 0 or text.count("JOB DONE") != 1:
            raise RuntimeError(f"pw.x failed in {task} (exit {proc.returncode}):\n{text[-2000:]}")
        frame = dpdata.LabeledSystem(str(task / "output"), fmt="qe/pw/scf", type_map=param["type_map"])
        print(f"{task.name}: {frame['energies'][0]:.4f} eV in {time.perf_counter() - start:.1f} s",
              flush=True)
        labelled = frame if labelled is None else labelled + frame
    return labelled


def prepare(rundir, frames: int = 4, temperature: float = 600.0, seed: int = 0,
            param: dict | None = None, machine: dict | None = None,
            start=None, md_options: dict | None = None, examples=None) -> Path:
    """Write a complete run directory (param.json, machine.json, confs/POSCAR, data/init).

    ``start`` (a dpdata System, default the 4-atom Cu cell) is written as confs/POSCAR;
    ``md_options`` go to :func:`alkpu_plugin.reference.md_frames`, whose frames pw.x labels;
    ``examples`` (a ``load_example`` function) gives the default param and machine.
    """
    import dpdata

    from alkpu_plugin.reference import fcc_cell, md_frames

    example_param, example_machine = (examples or load_example)()
    param = example_param if param is None else param
    machine = example_machine if machine is None else machine
    check_qe(param)
    rundir = Path(rundir)
    rundir.mkdir(parents=True, exist_ok=True)
    (rundir / "param.json").write_text(json.dumps(param, indent=4))
    (rundir / "machine.json").write_text(json.dumps(machine, indent=4))
    (rundir / "remote").mkdir(exist_ok=True)
    (rundir / "confs").mkdir(exist_ok=True)
    if start is None:
        start = dpdata.System(fcc_cell("Cu", 1), fmt="ase/structure")
    start.to("vasp/poscar", str(rundir / "confs" / "POSCAR"))
    # structures only: EMT moves the atoms, pw.x gives the labels
    structures = md_frames(temperature, frames, **{"size": 1, "interval": 5, "equilibrate": 20, "seed": seed,
                                                   **(md_options or {})})
    structures = dpdata.System(data={k: structures.data[k] for k in
                                     ("atom_names", "atom_numbs", "atom_types", "orig", "cells", "coords")})
    labelled = label(structures, param, machine, rundir / "init-labels")
    labelled.to("deepmd/npy", str(rundir / param["init_data_prefix"] / param["init_data_sys"][0]))
    return rundir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rundir", nargs="?", default="cu-qe-run")
    parser.add_argument("--frames", type=int, default=4, help="initial frames to label (default 4)")
    args = parser.parse_args()
    try:
        rundir = prepare(args.rundir, args.frames)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    print(f"ready: cd {rundir} && alkpu run param.json machine.json  (dp, lmp, alkpu, pw.x on PATH)")


if __name__ == "__main__":
    main()
