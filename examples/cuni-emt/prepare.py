"""Set up a run directory for examples/cuni-emt: a random fcc Cu-Ni alloy, EMT standing in for DFT.

    .venv/bin/python examples/cuni-emt/prepare.py [RUNDIR]
    cd RUNDIR && PATH=$PWD/../.venv/bin:$PATH alkpu run param.json machine.json
    .venv/bin/alkpu report RUNDIR

RUNDIR (default ``cuni-emt-run``) gets:

* ``param.json`` and ``machine.json``, copied from this folder (``--ladder``, ``--trj-freq`` and
  ``--trust`` change the exploration rounds and trust levels of the param.json);
* ``data/init`` (deepmd/npy): 30 EMT-labelled MD frames at 300 K of a 108-atom fcc cell
  (3 x 3 x 3 conventional cells, a = 3.56 A) in which half of the sites, drawn at random,
  hold Ni (``alkpu_plugin.reference.md_frames``);
* ``confs/POSCAR``: the same alloy on the ideal lattice, where exploration starts;
* ``validation/<T>K``: 10 held-out EMT frames at each exploration temperature, of the same
  composition with another random arrangement, which ``alkpu report`` uses for the
  validation RMSE.

Files that exist are kept, so running it again is harmless.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
TYPE_MAP = ["Cu", "Ni"]
ALLOY = {"element": "Cu", "substitute": {"Ni": 0.5}, "size": 3, "a": 3.56, "seed": 1}
INIT = {"temperature": 300, "frames": 30}
VALIDATION_FRAMES = 10


def alloy_frames(temperature: float, frames: int, **kw):
    """EMT-labelled MD frames of the example's alloy (the sites of the Ni atoms are drawn with the seed)."""
    from alkpu_plugin.reference import md_frames

    options = {**ALLOY, "interval": 10, **kw}
    return md_frames(temperature, frames, type_map=TYPE_MAP, **options)


def starting_structure(system):
    """The ideal fcc lattice of ``ALLOY`` with the species of ``system``'s atoms, as a dpdata System."""
    import dpdata

    from alkpu_plugin.reference import fcc_cell

    cell = fcc_cell(ALLOY["element"], ALLOY["size"], ALLOY["a"])
    # md_frames keeps the lattice's atom order: atom i of every frame sits on site i
    cell.set_chemical_symbols([system["atom_names"][t] for t in system["atom_types"]])
    structure = dpdata.System(cell, fmt="ase/structure")
    structure.sort_atom_names(type_map=TYPE_MAP)
    return structure


def example_param(ladder: list[float] | None = None, trj_freq: int | None = None,
                  trust: tuple[float, float] | None = None) -> dict:
    """This folder's param.json, with another temperature ladder (one exploration round per
    temperature, the first round's other settings), frame interval or force trust levels."""
    param = json.loads((HERE / "param.json").read_text())
    if ladder:
        first = param["model_devi_jobs"][0]
        param["model_devi_jobs"] = [{**first, "temps": [t]} for t in ladder]
    if trj_freq:
        for job in param["model_devi_jobs"]:
            job["trj_freq"] = trj_freq
    if trust:
        param["model_devi_f_trust_lo"], param["model_devi_f_trust_hi"] = trust
    return param


def prepare(rundir, param: dict | None = None) -> Path:
    """Write the run directory; returns its path. ``param`` (default: this folder's) is written
    as its param.json; one already there that differs stops it, untouched."""
    rundir = Path(rundir).resolve()
    param = param or example_param()
    text = json.dumps(param, indent=1) + "\n"
    if (rundir / "param.json").exists() and json.loads((rundir / "param.json").read_text()) != param:
        raise SystemExit(f"{rundir / 'param.json'} exists and differs from the one asked for: use another "
                         "RUNDIR, or delete it to write it anew")
    rundir.mkdir(parents=True, exist_ok=True)
    if not (rundir / "param.json").exists():
        (rundir / "param.json").write_text(text)
    if not (rundir / "machine.json").exists():
        shutil.copy(HERE / "machine.json", rundir / "machine.json")
    init = rundir / param["init_data_prefix"] / param["init_data_sys"][0]
    if not init.exists():
        print(f"initial data: {INIT['frames']} EMT frames at {INIT['temperature']} K -> {init}", flush=True)
        alloy_frames(INIT["temperature"], INIT["frames"]).to("deepmd/npy", str(init))
    poscar = rundir / param["sys_configs_prefix"] / param["sys_configs"][0][0]
    if not poscar.exists():
        import dpdata

        poscar.parent.mkdir(parents=True, exist_ok=True)
        starting_structure(dpdata.LabeledSystem(str(init), fmt="deepmd/npy")).to("vasp/poscar", str(poscar))
    temps = sorted({t for job in param["model_devi_jobs"] for t in job["temps"]})
    for k, temp in enumerate(temps):
        out = rundir / "validation" / f"{temp:g}K"
        if not out.exists():
            print(f"validation: {VALIDATION_FRAMES} EMT frames at {temp:g} K -> {out}", flush=True)
            # another seed: another random arrangement of the same composition, and new frames
            alloy_frames(temp, VALIDATION_FRAMES, interval=20, seed=1000 + k).to("deepmd/npy", str(out))
    return rundir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rundir", nargs="?", default="cuni-emt-run")
    parser.add_argument("--ladder", metavar="T1,T2,...", help="exploration temperatures, one round each "
                        "(default: 600,1000)")
    parser.add_argument("--trj-freq", type=int, help="MD steps between explored frames (default 50)")
    parser.add_argument("--trust", metavar="LO,HI", help="model_devi_f_trust_lo/hi in eV/A (default 0.05,0.3)")
    args = parser.parse_args()
    try:
        ladder = [int(t) if float(t).is_integer() else float(t) for t in args.ladder.split(",")] if args.ladder else None
        trust = tuple(float(t) for t in args.trust.split(",")) if args.trust else None
    except ValueError:
        raise SystemExit("--ladder and --trust take numbers separated by commas") from None
    if trust is not None and (len(trust) != 2 or trust[0] > trust[1]):
        raise SystemExit("--trust takes LO,HI with LO <= HI")
    rundir = prepare(args.rundir, example_param(ladder, args.trj_freq, trust))
    print(f"ready: cd {rundir} && alkpu run param.json machine.json  (dp, lmp, alkpu on PATH)")


if __name__ == "__main__":
    main()
