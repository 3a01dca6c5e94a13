#!/usr/bin/env python
"""Benchmark: what a smaller RLEKF blocksize (or float32 P) costs in accuracy, in ``dp train``.

The data and model are those of ``bench_rlekf_vs_adam.py`` (its defaults: 32-atom Cu labelled
by EMT, 200 training + 30 validation frames at 300 K, se_e2_a [25, 50, 100] + fitting
[50, 50, 50], 91,751 weights, batch 1, seed 1). Only RLEKF is run, once per setting, with the
same seed and the same number of steps:

    bs256      blocksize 256,  float64 P
    bs1024     blocksize 1024, float64 P
    bs1024f32  blocksize 1024, float32 P
    bs4096     blocksize 4096, float64 P

Per run it records P's size (from the ``built RLEKF training ... P ... MB`` log line), the step
time (RLEKF's own ``s/batch`` lines, mean and median over the intervals after the first), the
validation energy RMSE per atom and force RMSE at a middle lcurve point (2/3 of the steps) and
the last one, the first step whose force RMSE is below 0.1 eV/Å (the end of the plateau), the
training wall time (step-0 to last validation line) and the ``dp`` process wall time, and the
load average before and after (the runs are sensitive to other jobs on the machine).

Writes ``<outdir>/blocksize.json`` and prints a markdown table. Run from the repository root::

    .venv/bin/python benchmarks/bench_blocksize.py --threads 1            # 450 steps, all four
    .venv/bin/python benchmarks/bench_blocksize.py --runs bs256 bs1024    # a subset
    .venv/bin/python benchmarks/bench_blocksize.py --steps 20 --outdir benchmarks/out/blocksize_probe
    .venv/bin/python benchmarks/bench_blocksize.py --reparse              # re-read finished runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rlekf_vs_adam import (  # noqa: E402  (same data, model, runner and parsers)
    machine_info,
    make_data,
    make_input,
    parse_log,
    read_lcurve,
    run_dp_train,
    summarise,
    thread_env,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "out" / "blocksize"

RUNS = {
    "bs256": {"blocksize": 256, "p_dtype": "float64"},
    "bs1024": {"blocksize": 1024, "p_dtype": "float64"},
    "bs1024f32": {"blocksize": 1024, "p_dtype": "float32"},
    "bs4096": {"blocksize": 4096, "p_dtype": "float64"},
}
# bench_rlekf_vs_adam.py's decay_steps (6000 Adam steps // 30); RLEKF ignores the learning rate
DECAY_STEPS = 200


def at_step(res: dict, step: int) -> dict:
    """The lcurve point at ``step`` (or the last one before it)."""
    c = res["curve"]
    i = max(j for j, s in enumerate(c["step"]) if s <= step)
    return {"step": c["step"][i], "rmse_e_val": c["rmse_e_val"][i], "rmse_f_val": c["rmse_f_val"][i],
            "wall_s": c["wall_s"][i]}


def first_below(res: dict, threshold: float) -> int | None:
    """First lcurve step whose validation force RMSE is below ``threshold`` (the end of the plateau)."""
    c = res["curve"]
    return next((s for s, f in zip(c["step"], c["rmse_f_val"]) if f < threshold), None)


def table(results: dict, steps: int, mid: int, threshold: float) -> str:
    head = ("| run | blocksize | p_dtype | blocks | P (MB) | s/step mean (median) | TF / Kalman s/step (median) "
            f"| first step F < {threshold:g} | E RMSE/atom (eV) @{mid} | F RMSE (eV/Å) @{mid} "
            f"| E RMSE/atom (eV) @{steps} | F RMSE (eV/Å) @{steps} | training wall (s) | `dp` wall (s) |")
    lines = [head, "| " + " | ".join(["---"] * 3 + ["---:"] * 11) + " |"]
    for name, r in results.items():
        m, e = r["mid"], r["end"]
        lines.append(
            f"| {name} | {r['rlekf_blocksize']} | {r['P_dtype']} | {r['rlekf_blocks']} | {r['P_MB']:.1f} "
            f"| {r['s_per_step']:.3f} ({r['median_s_per_step']:.3f}) "
            f"| {r['median_tf_passes_s_per_step']:.3f} / {r['median_kalman_updates_s_per_step']:.3f} "
            f"| {r['first_step_f_below']} | {m['rmse_e_val']:.2e} | {m['rmse_f_val']:.4f} | {e['rmse_e_val']:.2e} | {e['rmse_f_val']:.4f} "
            f"| {r['train_wall_s']:.0f} | {r['process_wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outdir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=450, help="RLEKF steps of every run (default 450)")
    ap.add_argument("--disp-freq", type=int, default=25, help="lcurve / timing interval (default 25)")
    ap.add_argument("--mid-step", type=int, default=None,
                    help="the middle lcurve point reported (default: 2/3 of the steps, on the lcurve grid)")
    ap.add_argument("--f-threshold", type=float, default=0.1,
                    help="report the first step whose validation force RMSE is below this (eV/A; default 0.1)")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--ntrain", type=int, default=200)
    ap.add_argument("--nvalid", type=int, default=30)
    ap.add_argument("--temperature", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1, help="training/seed (also RLEKF's seed)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="OMP_NUM_THREADS and DP_INTRA_OP_PARALLELISM_THREADS for dp (use 1 on a "
                         "machine shared with other jobs: the BLAS updates of many small blocks slow "
                         "down many times with 2 threads there)")
    ap.add_argument("--reparse", action="store_true",
                    help="run nothing: re-read the finished runs in --outdir and rewrite the JSON")
    args = ap.parse_args(argv)
    out = args.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps, disp = args.steps, args.disp_freq
    # the forces sit on a plateau (~0.3 eV/A) for the first ~220-280 steps; 2/3 of 450 is after it
    mid = args.mid_step if args.mid_step is not None else (2 * steps // 3) // disp * disp

    if args.reparse:
        data_spec = json.loads((out / "data" / "spec.json").read_text())
    else:
        data_spec = make_data(out / "data", args.ntrain, args.nvalid, args.temperature)
    env = thread_env(args.threads)
    results: dict = {}
    inputs: dict = {}
    for name in args.runs:
        opt = {"type": "RLEKF", **RUNS[name]}
        jdata = make_input(out / "data", opt, steps, disp, DECAY_STEPS, args.nvalid, args.seed)
        inputs[name] = jdata
        workdir = out / name
        if args.reparse:
            run = json.loads((workdir / "run.json").read_text())
        else:
            load_before = os.getloadavg()
            run = run_dp_train(workdir, jdata, env)
            run["loadavg_before"] = load_before
            run["loadavg_after"] = os.getloadavg()
            (workdir / "run.json").write_text(json.dumps(run, indent=1))
        res = summarise(name, read_lcurve(workdir / "lcurve.out"), parse_log(workdir / "dp.log"),
                        run, steps, disp)
        res["optimizer"] = opt
        res["mid"] = at_step(res, mid)
        res["end"] = at_step(res, steps)
        res["first_step_f_below"] = first_below(res, args.f_threshold)
        res["loadavg_before"] = run.get("loadavg_before")
        res["loadavg_after"] = run.get("loadavg_after")
        results[name] = res

    command = " ".join([Path(sys.executable).name, *sys.argv])
    runs_command = command
    if args.reparse and (out / "blocksize.json").exists():
        old = json.loads((out / "blocksize.json").read_text())
        runs_command = old.get("runs_command", old.get("command", command))
    report = {
        "benchmark": "RLEKF blocksize / p_dtype vs accuracy, dp train (DeePMD-kit TF backend)",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "runs_command": runs_command,
        "settings": {
            "steps": steps, "disp_freq": disp, "mid_step": mid, "f_threshold": args.f_threshold, "seed": args.seed,
            "runs": {n: RUNS[n] for n in args.runs}, "data": data_spec, "env": env, "inputs": inputs,
            "notes": (
                "RMSEs are lcurve validation values (mean of the 30 per-frame RMSEs; energy per atom); "
                "s/step from RLEKF's s/batch lines excluding the first interval; training wall: "
                "step-0 to last 'Batch N: val:' line, validation included; loadavg: os.getloadavg() "
                "before and after each run"
            ),
        },
        "machine": machine_info(args.threads),
        "results": results,
    }
    (out / "blocksize.json").write_text(json.dumps(report, indent=1))
    print()
    print(table(results, steps, mid, args.f_threshold))
    print()
    for name, r in results.items():
        lb, la = r["loadavg_before"], r["loadavg_after"]
        if lb and la:
            print(f"{name}: load average (1 min) {lb[0]:.1f} before, {la[0]:.1f} after")
    print(f"\nwrote {out / 'blocksize.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
