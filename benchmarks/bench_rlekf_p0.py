#!/usr/bin/env python
"""RLEKF's initial plateau against the initial covariance p0 (P_0 = p0 I) and other settings.

The model of bench_rlekf_vs_adam.py (Cu, se_e2_a 25/50/100, fitting 50/50/50, 91,751
weights, blocksize 1024) is trained by the real ``dp train`` with RLEKF once per p0 on
32-atom fcc Cu frames labelled by EMT at 300 K (200 training, 30 validation frames),
everything else at its default. Written: ``<outdir>/p0_table.json`` with the validation
force RMSE at every lcurve line of each run, the label forces' RMS, and the first step
at which the validation force RMSE is below half of that RMS. With ``--hot-frames N``, also
the quality of the final model's KPU: N frames at 1200 K (EMT, never trained on), the Spearman
rank correlation of each frame's max per-atom KPU with its max atomic force error, and the
force RMSE there.

    .venv/bin/python benchmarks/bench_rlekf_p0.py                     # p0 = 1, 100, 1e4, 1e6
    .venv/bin/python benchmarks/bench_rlekf_p0.py --p0 1 1e4 --steps 300 --hot-frames 40
    .venv/bin/python benchmarks/bench_rlekf_p0.py --opt pref_f=32 --opt p0=1 --hot-frames 40
    .venv/bin/python benchmarks/bench_rlekf_p0.py --system CuNi --size 3 --outdir benchmarks/out/rlekf_cuni108 \
        --opt force_normaliser=natoms --opt force_normaliser=none --steps 300 --hot-frames 20

``--opt KEY=VALUE[,KEY=VALUE]`` (repeatable) runs with those ``optimizer`` keys instead of one
p0 each; a run's folder and table entry are named by its settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_rlekf_vs_adam import LOSS, SYSTEMS, frames_kw, kpu_quality, model_for, opt_name, parse_opt  # noqa: E402


def training_input(settings: dict, steps: int, disp: int, system: str = "Cu") -> dict:
    return {
        "model": model_for(system),
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 3e-8, "decay_steps": 5000},
        "loss": LOSS,
        "optimizer": {"type": "RLEKF", "blocksize": 1024, "seed": 1, **settings},
        "training": {"training_data": {"systems": ["../data/train"], "batch_size": 1},
                     "validation_data": {"systems": ["../data/valid"], "batch_size": 1, "numb_btch": 10},
                     "numb_steps": steps, "disp_freq": disp, "save_freq": steps, "seed": 1},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outdir", type=Path, default=REPO / "benchmarks" / "out" / "rlekf_p0")
    ap.add_argument("--p0", type=float, nargs="+", default=[1.0, 100.0, 1e4, 1e6])
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="optimizer keys of one run (repeat for more runs; replaces --p0)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--disp", type=int, default=20)
    ap.add_argument("--hot-frames", type=int, default=0, help="1200 K frames for the KPU ranking (0: none)")
    ap.add_argument("--system", choices=sorted(SYSTEMS), default="Cu",
                    help="Cu, or CuNi: fcc with half of the sites Ni (two species)")
    ap.add_argument("--size", type=int, default=2, help="fcc cell repeats per side (2: 32 atoms, 3: 108)")
    args = ap.parse_args()
    from alkpu_plugin.reference import md_frames

    out = args.outdir
    data = out / "data"
    kw = frames_kw(args.system, args.size)
    if not (data / "valid").exists():
        md_frames(300, 200, seed=11, **kw).to("deepmd/npy", str(data / "train"))
        md_frames(300, 30, seed=12, **kw).to("deepmd/npy", str(data / "valid"))
    valid = np.concatenate([np.load(f).ravel() for f in sorted((data / "valid").glob("set.*/force.npy"))])
    rms = float(np.sqrt(np.mean(valid**2)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    dp = str(Path(sys.executable).parent / "dp")
    table = {"label_force_rms": rms, "steps": args.steps, "runs": {}}
    variants = [parse_opt(o) for o in args.opt] or [{"p0": p0} for p0 in args.p0]
    for settings in variants:
        name = opt_name(settings)
        key = f"{settings['p0']:g}" if list(settings) == ["p0"] else name
        run = out / (f"p0_{key}" if list(settings) == ["p0"] else name.replace("=", "_").replace(",", "-"))
        run.mkdir(parents=True, exist_ok=True)
        (run / "input.json").write_text(json.dumps(training_input(settings, args.steps, args.disp, args.system), indent=1))
        with open(run / "train.log", "w") as log:
            subprocess.run([dp, "train", "input.json"], cwd=run, env=env, stdout=log,
                           stderr=subprocess.STDOUT, check=True)
        lc = np.loadtxt(run / "lcurve.out", ndmin=2)
        steps, f_val, e_val = lc[:, 0].astype(int), lc[:, 5], lc[:, 3]
        below = np.flatnonzero(f_val < 0.5 * rms)
        table["runs"][key] = {
            "settings": settings,
            "step": steps.tolist(), "rmse_f_val": f_val.tolist(), "rmse_e_val": e_val.tolist(),
            "first_step_below_half_rms": int(steps[below[0]]) if below.size else None,
        }
        if args.hot_frames:
            table["runs"][key]["hot_1200K"] = kpu_quality(run, data, args.hot_frames, env, dp, kw)
            print(f"{key}: 1200 K {table['runs'][key]['hot_1200K']}", flush=True)
        print(f"{key}: force RMSE {f_val[-1]:.3g} eV/A at step {steps[-1]}, below half the "
              f"label RMS ({rms:.3g}) from step {table['runs'][key]['first_step_below_half_rms']}",
              flush=True)
        (out / "p0_table.json").write_text(json.dumps(table, indent=1))
    (out / "p0_table.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
