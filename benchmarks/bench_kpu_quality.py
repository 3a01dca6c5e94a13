"""KPU quality: does one RLEKF model's KPU rank frames by their true force error
as well as DP-GEN's 4-model committee does?  And is the calibration right?

Data: 32-atom fcc Cu labelled by ASE's EMT.  Training frames at 300 K; held-out
"hot" frames at 1200 K and 1400 K (labelled, never trained on); 300 K
validation frames for the calibration fit.

* ALKPU: one model trained with RLEKF; per frame the max per-atom KPU and the
  paper's force KPU, against the true max atomic force error of that model.
* DP-GEN baseline: four Adam models (different seeds) on the same data and
  descriptor; per frame DP-GEN's max force deviation (max over atoms of
  sqrt(mean over models |F_m - <F>|^2)), against the true max atomic force
  error of model 0 (the one DP-GEN drives MD with).
* Spearman rank correlation of each uncertainty with its error, per
  temperature and pooled.
* Calibration: fit on the 300 K validation frames, then observed vs predicted
  RMS force error per decile of per-atom KPU on the hot frames.

    .venv/bin/python benchmarks/bench_kpu_quality.py [--out benchmarks/out/kpu_quality]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_rlekf_vs_adam import opt_name, parse_opt  # noqa: E402  (the --rlekf-opt syntax of that benchmark)
BIN = Path(sys.executable).parent
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

BASE = {
    "model": {
        "type_map": ["Cu"],
        "descriptor": {"type": "se_e2_a", "sel": [80], "rcut_smth": 4.0, "rcut": 5.0,
                       "neuron": [16, 32], "axis_neuron": 8, "seed": 1},
        "fitting_net": {"neuron": [64, 64], "seed": 1},
    },
    "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 3e-5, "decay_steps": 200},
    "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
    "training": {
        "training_data": {"systems": ["../data/train"], "batch_size": 1},
        "numb_steps": 1000, "disp_freq": 200, "save_freq": 100000, "seed": 1,
    },
}


def train(run: Path, config: dict) -> Path:
    graph = run / "graph.pb"
    if graph.exists():
        return graph
    run.mkdir(parents=True, exist_ok=True)
    (run / "input.json").write_text(json.dumps(config, indent=1))
    subprocess.run([str(BIN / "dp"), "train", "input.json"], cwd=run, env=ENV, check=True, capture_output=True)
    subprocess.run([str(BIN / "dp"), "freeze", "-o", "graph.pb"], cwd=run, env=ENV, check=True, capture_output=True)
    return graph


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "kpu_quality"))
    ap.add_argument("--rlekf-steps", type=int, default=600)
    ap.add_argument("--adam-steps", type=int, default=6000)
    ap.add_argument("--hot-frames", type=int, default=40)
    ap.add_argument("--rlekf-opt", default="", metavar="KEY=VALUE[,KEY=VALUE]",
                    help="RLEKF optimizer keys on top of the defaults (e.g. the paper's settings: "
                    "force_normaliser=natoms,kalman_lambda=0.98,kalman_nue=0.9987); the run, JSON and "
                    "PNG are named after them, and the committee and data are shared")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    import dpdata

    from alkpu_plugin.reference import md_frames

    sets = {"train": (300, 100, 1), "valid300": (300, 20, 2),
            "hot1200": (1200, args.hot_frames, 3), "hot1400": (1400, args.hot_frames, 4)}
    for name, (temp, n, seed) in sets.items():
        if not (data / name).exists():
            md_frames(temp, n, seed=seed, interval=20).to("deepmd/npy", str(data / name))

    timings = {}
    tic = time.time()
    cfg = copy.deepcopy(BASE)
    extra = parse_opt(args.rlekf_opt) if args.rlekf_opt else {}
    tag = opt_name(extra).replace("=", "_").replace(",", "-")  # named as bench_rlekf_vs_adam's runs
    cfg["optimizer"] = {"type": "RLEKF", "blocksize": 2048, **extra}
    cfg["training"]["numb_steps"] = args.rlekf_steps
    rlekf_graph = train(out / ("rlekf_" + tag if tag else "rlekf"), cfg)
    cfg_rlekf = cfg["optimizer"]
    timings["rlekf_train_s"] = time.time() - tic
    committee = []
    tic = time.time()
    for k in range(4):
        cfg = copy.deepcopy(BASE)
        cfg["optimizer"] = {"type": "Adam"}
        cfg["training"]["numb_steps"] = args.adam_steps
        cfg["learning_rate"]["decay_steps"] = max(1, args.adam_steps // 30)
        for part in ("descriptor", "fitting_net"):
            cfg["model"][part]["seed"] = 100 + k
        cfg["training"]["seed"] = 200 + k
        committee.append(train(out / f"adam{k}", cfg))
    timings["committee_train_s"] = time.time() - tic

    from deepmd.infer import DeepPot

    from alkpu_plugin.calibration import calibrate, deciles
    from alkpu_plugin.kpu_engine import KPUEngine

    engine = KPUEngine(rlekf_graph, seed=0)
    cal, _, _ = calibrate(engine, dpdata.LabeledSystem(str(data / "valid300"), fmt="deepmd/npy"), progress=False)
    engine.calibration = cal
    pots = [DeepPot(str(g)) for g in committee]

    results = {"rlekf_optimizer": cfg_rlekf, "calibration": cal, "timings": timings, "per_temperature": {}}
    pooled = {k: [] for k in ("kpu_max", "kpu_paper", "err_rlekf", "devi", "err_adam0")}
    hot_kpu, hot_sq = [], []
    tic = time.time()
    for name in ("hot1200", "hot1400"):
        system = dpdata.LabeledSystem(str(data / name), fmt="deepmd/npy")
        res = engine.compute(system, progress=False)
        _, frames = engine._frames(system, res.frames)
        pred = np.array([engine.jacobian.predict(f)[1] for f in frames])
        err = np.linalg.norm(pred - system["forces"], axis=2)  # (F, N) per-atom error
        hot_kpu.append(res.atom_kpu)
        hot_sq.append(err**2)
        forces = np.array([p.eval(system["coords"], system["cells"], system["atom_types"])[1]
                           .reshape(system.get_nframes(), -1, 3) for p in pots])
        mean = forces.mean(axis=0)
        devi = np.sqrt(((forces - mean) ** 2).sum(axis=3).mean(axis=0)).max(axis=1)
        err0 = np.linalg.norm(forces[0] - system["forces"], axis=2).max(axis=1)
        row = {
            "frames": int(system.get_nframes()),
            "spearman_kpu_max_vs_max_error": spearman(res.atom_kpu.max(axis=1), err.max(axis=1)),
            "spearman_kpu_paper_vs_max_error": spearman(res.force_kpu, err.max(axis=1)),
            "spearman_committee_devi_vs_max_error": spearman(devi, err0),
            "rlekf_force_rmse": float(np.sqrt(np.mean((pred - system["forces"]) ** 2))),
            "adam0_force_rmse": float(np.sqrt(np.mean((forces[0] - system["forces"]) ** 2))),
            "mean_max_sigma_calibrated": float(res.atom_sigma.max(axis=1).mean()),
            "mean_max_error_rlekf": float(err.max(axis=1).mean()),
            "mean_committee_max_devi": float(devi.mean()),
        }
        results["per_temperature"][name] = row
        for k, v in zip(pooled, (res.atom_kpu.max(axis=1), res.force_kpu, err.max(axis=1), devi, err0)):
            pooled[k].append(v)
    timings["evaluation_s"] = time.time() - tic
    pooled = {k: np.concatenate(v) for k, v in pooled.items()}
    results["pooled"] = {
        "spearman_kpu_max_vs_max_error": spearman(pooled["kpu_max"], pooled["err_rlekf"]),
        "spearman_kpu_paper_vs_max_error": spearman(pooled["kpu_paper"], pooled["err_rlekf"]),
        "spearman_committee_devi_vs_max_error": spearman(pooled["devi"], pooled["err_adam0"]),
    }
    results["hot_deciles"] = deciles(np.concatenate(hot_kpu), np.concatenate(hot_sq), cal)
    name = "kpu_quality" + ("_" + tag if tag else "")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4.2))
    ax[0].scatter(pooled["kpu_max"], pooled["err_rlekf"], s=10)
    ax[0].set(xscale="log", xlabel="max per-atom KPU", ylabel="max atomic force error (eV/Å)",
              title=f"ALKPU, Spearman {results['pooled']['spearman_kpu_max_vs_max_error']:.2f}")
    ax[1].scatter(pooled["devi"], pooled["err_adam0"], s=10, color="C1")
    ax[1].set(xlabel="committee max force deviation (eV/Å)", ylabel="max atomic force error (eV/Å)",
              title=f"DP-GEN committee, Spearman {results['pooled']['spearman_committee_devi_vs_max_error']:.2f}")
    dec = results["hot_deciles"]
    ax[2].plot([d["decile"] for d in dec], [d["observed_rms_error"] for d in dec], "o-", label="observed")
    ax[2].plot([d["decile"] for d in dec], [d["predicted_rms_error"] for d in dec], "s--", label="predicted (calibrated KPU)")
    ax[2].set(xlabel="decile of per-atom KPU (hot frames)", ylabel="RMS atomic force error (eV/Å)",
              title="calibration on held-out 1200/1400 K atoms")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
