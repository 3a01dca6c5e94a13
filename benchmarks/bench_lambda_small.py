"""Benchmark: the first fading-memory factor (``kalman_lambda``) on a small two-species model.

The model of ``examples/cuni-emt`` (se_e2_a and fitting with ``resnet_dt``, a net per species,
7,106 weights) trained from scratch by the real ``dp train`` on 10 Cu50Ni50 frames at 300 K
(EMT), as a first DP-GEN iteration trains it, once per lambda_1 and seed, with the optimizer's
other keys at their defaults (``"force_normaliser": "none"``, ``"kalman_nue": 0.997``), and once
with the paper's settings. Reported per run: the validation force RMSE on 10 frames at 1200 K and
the training energy RMSE per atom at the last step, and the largest training energy RMSE after
the first quarter of the steps (a training that is unstable jumps there).

    python benchmarks/bench_lambda_small.py                      # about 5 minutes on 2 cores
    python benchmarks/bench_lambda_small.py --lambdas 0.95,0.98 --seeds 0

Output: ``benchmarks/out/lambda_small/lambda_small.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_label_efficiency import SYSTEMS, training_input as example_input  # noqa: E402

BIN = Path(sys.executable).parent
TYPE_MAP = SYSTEMS["CuNi"]["type_map"]
PAPER = {"force_normaliser": "natoms", "kalman_lambda": 0.98, "kalman_nue": 0.9987}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DP_INTRA_OP_PARALLELISM_THREADS": "1",
       "DP_INTER_OP_PARALLELISM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


def make_data(out: Path) -> dict[str, Path]:
    from alkpu_plugin.reference import md_frames

    paths = {"train": out / "data" / "train", "valid": out / "data" / "valid-1200K"}
    if not paths["train"].exists():
        frames = SYSTEMS["CuNi"]["frames"]  # the label-efficiency benchmark's Cu50Ni50 cells
        md_frames(300, 10, seed=1, type_map=TYPE_MAP, **frames).to("deepmd/npy", str(paths["train"]))
        md_frames(1200, 10, seed=2, type_map=TYPE_MAP, **frames).to("deepmd/npy", str(paths["valid"]))
    return paths


def training_input(paths: dict[str, Path], optimizer: dict, steps: int) -> dict:
    data, example_optimizer = example_input("CuNi")  # examples/cuni-emt's model, loss, learning rate
    data["optimizer"] = {**example_optimizer, **optimizer}
    data["training"] = {
        "training_data": {"systems": [str(paths["train"])], "batch_size": 1},
        "validation_data": {"systems": [str(paths["valid"])], "batch_size": 1, "numb_btch": 10},
        "numb_steps": steps, "disp_freq": 20, "save_freq": steps, "seed": 0,
    }
    return data


def run(run_dir: Path, data: dict) -> dict:
    lcurve = run_dir / "lcurve.out"
    if not lcurve.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "input.json").write_text(json.dumps(data, indent=1))
        with open(run_dir / "dp.log", "w") as log:
            subprocess.run([str(BIN / "dp"), "train", "input.json"], cwd=run_dir, env=ENV,
                           stdout=log, stderr=subprocess.STDOUT, check=True)
    lc = np.loadtxt(lcurve, ndmin=2)  # step, rmse_val, rmse_trn, e_val, e_trn, f_val, f_trn
    step, e_trn, f_val = lc[:, 0], lc[:, 4], lc[:, 5]
    late = step > step[-1] / 4
    return {"force_rmse_1200K_first": float(f_val[0]), "force_rmse_1200K_last": float(f_val[-1]),
            "train_energy_rmse_last": float(e_trn[-1]), "train_energy_rmse_max_late": float(e_trn[late].max())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambdas", default="0.95,0.96,0.97,0.98")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--no-paper", action="store_true", help="skip the run with the paper's settings")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once (each one thread)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "lambda_small"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    paths = make_data(out)
    settings = {f"kalman_lambda={lam}": {"kalman_lambda": float(lam)} for lam in args.lambdas.split(",")}
    if not args.no_paper:
        settings["paper's settings"] = dict(PAPER)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = {(name, seed): (out / "runs" / f"{name.replace(' ', '_').replace(chr(39), '')}_seed{seed}",
                           training_input(paths, {**opt, "seed": seed}, args.steps))
            for name, opt in settings.items() for seed in seeds}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {key: pool.submit(run, *job) for key, job in jobs.items()}
        results = {key: f.result() for key, f in futures.items()}
    table = ["| setting | 1200 K force RMSE at the last step (eV/Å), per seed | training energy RMSE at the "
             "last step (eV/atom) | largest after the first quarter (eV/atom) |", "| --- | --- | --- | --- |"]
    for name in settings:
        rows = [results[(name, s)] for s in seeds]
        cell = lambda key, fmt: " / ".join(fmt.format(r[key]) for r in rows)  # noqa: E731
        table.append(f"| {name} | {cell('force_rmse_1200K_last', '{:.3f}')} | "
                     f"{cell('train_energy_rmse_last', '{:.2g}')} | {cell('train_energy_rmse_max_late', '{:.2g}')} |")
    first = results[(next(iter(settings)), seeds[0])]["force_rmse_1200K_first"]
    print("\n".join(table))
    print(f"\n1200 K force RMSE at step 0: {first:.3f} eV/Å; seeds {', '.join(map(str, seeds))}; "
          f"{args.steps} steps.")
    summary = {"settings": settings, "seeds": seeds, "steps": args.steps,
               "runs": {f"{name} seed {seed}": r for (name, seed), r in results.items()}}
    (out / "lambda_small.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
