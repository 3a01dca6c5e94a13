"""Quick start: one RLEKF model, its KPU, and what KPU says about hotter frames.

1. labels 32-atom fcc Cu MD frames with ASE's EMT (300 K for training; 300, 800
   and 1400 K for testing);
2. trains a small DeePMD model with ``dp train`` and ``"optimizer": {"type": "RLEKF"}``;
3. freezes it with ``dp freeze``;
4. calibrates KPU on 300 K frames (``alkpu calibrate``) and computes it for the test
   frames (``alkpu kpu``), writing DP-GEN's ``model_devi.out`` per temperature;
5. prints, per temperature, the mean per-frame max force uncertainty next to the
   model's true max atomic force error.

    .venv/bin/python examples/quickstart.py [workdir]     (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

INPUT = {
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
        "training_data": {"systems": ["data/train"], "batch_size": 1},
        "validation_data": {"systems": ["data/valid"], "batch_size": 1, "numb_btch": 10},
        "numb_steps": 400, "disp_freq": 100, "save_freq": 400, "seed": 1,
    },
}


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(cmd, cwd) -> None:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    import dpdata

    from alkpu_plugin.reference import md_frames

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart-run").resolve()
    work.mkdir(parents=True, exist_ok=True)
    step(f"1. EMT-labelled Cu frames in {work}/data")
    temps = {"train": (300, 60, 1), "valid": (300, 10, 2), "t300": (300, 10, 3),
             "t800": (800, 10, 4), "t1400": (1400, 10, 5)}
    for name, (temp, n, seed) in temps.items():
        if not (work / "data" / name).exists():
            md_frames(temp, n, seed=seed).to("deepmd/npy", str(work / "data" / name))
        print(f"   {name}: {n} frames at {temp} K")

    step("2-3. dp train with RLEKF, dp freeze")
    (work / "input.json").write_text(json.dumps(INPUT, indent=1))
    if not (work / "graph.pb").exists():
        run([BIN / "dp", "train", "input.json"], work)
        run([BIN / "dp", "freeze", "-o", "graph.pb"], work)
    lc = np.loadtxt(work / "lcurve.out", ndmin=2)
    print(f"   validation force RMSE: {lc[0, 5]:.3f} eV/A at step 0 -> {lc[-1, 5]:.3f} eV/A at step {int(lc[-1, 0])}")
    print("   Kalman state:", os.readlink(work / "model.ckpt.kalman.npz"))

    step("4. alkpu calibrate, alkpu kpu")
    run([BIN / "alkpu", "calibrate", "-m", "graph.pb", "-s", "data/valid", "--report", "calibration.json"], work)
    for name in ("t300", "t800", "t1400"):
        run([BIN / "alkpu", "kpu", "-m", "graph.pb", "-s", f"data/{name}", "-f", "deepmd/npy",
             "-o", f"model_devi.{name}.out", "--detail", f"kpu.{name}.npz", "--overwrite"], work)

    step("5. force uncertainty vs true error (means over frames of the per-frame max over atoms)")
    from deepmd.infer import DeepPot

    from alkpu_plugin.kpu_engine import KPUResult

    pot = DeepPot(str(work / "graph.pb"))
    print(f"   {'T (K)':>6} {'KPU sigma (eV/A)':>17} {'true error (eV/A)':>18} {'force KPU (paper)':>18}")
    for name in ("t300", "t800", "t1400"):
        system = dpdata.LabeledSystem(str(work / "data" / name), fmt="deepmd/npy")
        _, force, _ = pot.eval(system["coords"], system["cells"], system["atom_types"])
        err = np.linalg.norm(force.reshape(system["forces"].shape) - system["forces"], axis=2).max(axis=1)
        res = KPUResult.load(work / f"kpu.{name}.npz")
        print(f"   {name[1:]:>6} {res.atom_sigma.max(axis=1).mean():17.3f} {err.mean():18.3f} "
              f"{res.force_kpu.mean():18.4g}")
    print(f"\nDP-GEN-style files: {work}/model_devi.t*.out")


if __name__ == "__main__":
    main()
