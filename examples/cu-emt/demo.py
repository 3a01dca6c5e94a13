"""The embedded default: the whole ALKPU loop on one machine, EMT standing in for DFT.

A scaled-down version of the ALKPU paper's Cu experiment (its Table 2): fcc Cu-32,
a temperature ladder 300 -> 500 -> 800 -> 1200 -> 1400 K, one RLEKF model, KPU as
uncertainty, ASE's EMT as the labeller, dpdispatcher's Shell machine as the cluster.

    python examples/cu-emt/demo.py [WORKDIR] [--rounds N] [--uncertainty kpu|committee]
                                   [--committee-steps FIRST,REUSE]

1. WORKDIR/data/init: 30 EMT-labelled MD frames at 300 K (the initial data);
   WORKDIR/confs/POSCAR: the starting structure; WORKDIR/validation/<T>K: 20
   held-out EMT frames at every temperature of the ladder;
2. WORKDIR/param.json and machine.json: this directory's, with ``--rounds`` /
   ``--uncertainty`` applied (``committee`` is DP-GEN's own 4-model run);
3. ``alkpu run param.json machine.json`` in WORKDIR (running it again continues
   from record.dpgen);
4. ``alkpu report WORKDIR``: tables, figures and report.json in WORKDIR/report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
INIT = {"temperature": 300, "frames": 30, "seed": 1}
VALIDATION_FRAMES = 20


def demo_param(rounds: int | None, uncertainty: str, committee_steps: str | None = None,
               kpu_keys: list[str] | None = None) -> dict:
    param = json.loads((HERE / "param.json").read_text())
    if rounds is not None:
        if not 1 <= rounds <= len(param["model_devi_jobs"]):
            raise SystemExit(f"--rounds must be between 1 and {len(param['model_devi_jobs'])}")
        param["model_devi_jobs"] = param["model_devi_jobs"][:rounds]
    param["uncertainty"] = uncertainty
    if uncertainty == "committee":
        param.pop("kpu", None)
        if committee_steps:
            try:
                first, reuse = (int(x) for x in committee_steps.split(","))
            except ValueError:
                raise SystemExit(f"--committee-steps takes FIRST,REUSE (two integers), not {committee_steps!r}")
            param["default_training_param"]["training"]["numb_steps"] = first
            param["training_reuse_numb_steps"] = reuse
    elif committee_steps:
        raise SystemExit("--committee-steps applies to --uncertainty committee only")
    for item in kpu_keys or []:
        if uncertainty != "kpu":
            raise SystemExit("--kpu applies to --uncertainty kpu only")
        key, sep, value = item.partition("=")
        try:
            param["kpu"][key] = json.loads(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise SystemExit(f"--kpu takes KEY=VALUE with a JSON value (e.g. extrapolation=0), not {item!r}")
    return param


def prepare(work: Path, param: dict) -> None:
    """Initial data, starting structure and held-out frames, each made once."""
    import dpdata

    from alkpu_plugin.reference import fcc_cell, md_frames

    init = work / "data" / "init"
    if not init.exists():
        print(f"[demo] initial data: {INIT['frames']} EMT frames at {INIT['temperature']} K -> {init}", flush=True)
        md_frames(INIT["temperature"], INIT["frames"], seed=INIT["seed"]).to("deepmd/npy", str(init))
    poscar = work / "confs" / "POSCAR"
    if not poscar.exists():
        poscar.parent.mkdir(parents=True, exist_ok=True)
        dpdata.System(fcc_cell("Cu", 2), fmt="ase/structure").to("vasp/poscar", str(poscar))
    temps = sorted({t for job in json.loads((HERE / "param.json").read_text())["model_devi_jobs"]
                    for t in job["temps"]})
    for k, temp in enumerate(temps):
        out = work / "validation" / f"{temp:g}K"
        if not out.exists():
            print(f"[demo] validation: {VALIDATION_FRAMES} EMT frames at {temp:g} K -> {out}", flush=True)
            md_frames(temp, VALIDATION_FRAMES, seed=1000 + k, interval=20).to("deepmd/npy", str(out))


def write_inputs(work: Path, param: dict) -> None:
    """param.json / machine.json into WORKDIR; never replaces a different one."""
    for name, text in (("param.json", json.dumps(param, indent=2)),
                       ("machine.json", (HERE / "machine.json").read_text())):
        path = work / name
        if path.exists():
            if json.loads(path.read_text()) != json.loads(text):
                raise SystemExit(
                    f"{path} exists and differs from what this demo would write (other --rounds or "
                    "--uncertainty?); use another WORKDIR, or remove it to start over"
                )
            continue
        path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default="demo-run")
    parser.add_argument("--rounds", type=int, help="only the first N exploration rounds of the ladder")
    parser.add_argument("--uncertainty", choices=("kpu", "committee"), default="kpu")
    parser.add_argument("--committee-steps", metavar="FIRST,REUSE",
                        help="Adam steps of the committee's first training and of each continued one "
                        "(numb_steps and training_reuse_numb_steps; the param.json's are 4000,2000)")
    parser.add_argument("--kpu", action="append", metavar="KEY=VALUE",
                        help="set a key of the param.json's kpu block (a JSON value), e.g. extrapolation=0; "
                        "repeatable")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    param = demo_param(args.rounds, args.uncertainty, args.committee_steps, args.kpu)
    write_inputs(work, param)
    prepare(work, param)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    alkpu = shutil.which("alkpu", path=env["PATH"])
    print(f"[demo] alkpu run param.json machine.json  (in {work})", flush=True)
    rc = subprocess.call([alkpu, "run", "param.json", "machine.json"], cwd=work, env=env)
    if rc != 0:
        print(f"[demo] alkpu run failed (exit {rc}); see {work}/dpgen.log", file=sys.stderr)
        return rc
    if args.no_report:
        return 0
    print(f"[demo] alkpu report {work}", flush=True)
    return subprocess.call([alkpu, "report", str(work), "--overwrite"], cwd=work, env=env)


if __name__ == "__main__":
    sys.exit(main())
