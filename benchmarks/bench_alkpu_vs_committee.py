"""ALKPU vs DP-GEN's 4-model committee on the embedded demo (examples/cu-emt).

Runs the demo twice in OUT (default benchmarks/out/cu-emt): ``kpu/`` (one RLEKF model, KPU)
and ``committee/`` (DP-GEN's own run: four Adam models, max force deviation), with the same
initial data, MD settings, trust levels, label budget (fp_task_max), EMT labeller, seeds and
held-out validation frames. Then reads both with ``alkpu report``'s ``build_report`` and
prints / writes (OUT/comparison.json, OUT/comparison.md):

* labels used (EMT calls = DP-GEN fp tasks),
* CPU seconds per stage (training, MD, uncertainty, labelling; machine-wide busy CPU time
  over each step, see alkpu_plugin/dpgen/stages.py) and wall seconds,
* validation force / energy RMSE of the final model at every temperature.

    .venv/bin/python benchmarks/bench_alkpu_vs_committee.py [--out DIR] [--rounds N] [--kpu KEY=VALUE]

Run it on an otherwise idle machine: the CPU times are machine-wide. A finished run is not
re-run (delete its folder to measure again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "cu-emt" / "demo.py"
MODES = ("kpu", "committee")


def run_demo(work: Path, mode: str, rounds: int | None, committee_steps: str | None = None,
             kpu_keys: list[str] | None = None) -> None:
    cmd = [sys.executable, str(DEMO), str(work), "--uncertainty", mode, "--no-report"]
    if mode == "kpu":
        cmd += [f"--kpu={item}" for item in kpu_keys or []]
    if rounds:
        cmd += ["--rounds", str(rounds)]
    if committee_steps and mode == "committee":
        cmd += ["--committee-steps", committee_steps]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def summarise(work: Path) -> dict:
    from alkpu_plugin.report import build_report

    data = build_report(work)
    rounds = data["rounds"]
    final = max((r["iteration"] for r in rounds if r["model"]), default=None)
    rmse = {row["set"]: {"force_rmse": row["force_rmse"], "energy_rmse_per_atom": row["energy_rmse_per_atom"]}
            for row in data["validation"]["rmse"] if row["iteration"] == final}
    times = data["stage_times"]["total"]
    return {
        "rounds": len([r for r in rounds if r["frames_explored"]]),
        "frames_explored": sum(r["frames_explored"] or 0 for r in rounds),
        "selected": sum(r["selected"] or 0 for r in rounds),
        "labels": sum(r["labelled"] or 0 for r in rounds),
        "labels_per_round": [r["labelled"] for r in rounds if r["labelled"] is not None],
        "final_iteration": final,
        "cpu_s": {k: v["cpu_s"] for k, v in times.items()},
        "wall_s": {k: v["wall_s"] for k, v in times.items()},
        "final_rmse": rmse,
        "rmse_per_round": data["validation"]["rmse"],
        "lcurve": lcurves(work),
    }


def lcurves(work: Path) -> dict:
    """Per training (iteration/model): training force RMSE at the last line of lcurve.out and
    the mean over the last fifth of its lines before that, to see whether a training levelled
    off (the two close) or was still falling when it stopped."""
    out = {}
    for path in sorted(work.glob("iter.*/00.train/00[0-9]/lcurve.out")):
        import numpy as np

        names = path.read_text().splitlines()[0].lstrip("#").split()
        table = np.loadtxt(path, ndmin=2)
        if "rmse_f_trn" not in names or len(table) < 5:
            continue
        col = table[:, names.index("rmse_f_trn")]
        tail = col[-max(2, len(col) // 5):-1]
        out[f"{path.parts[-4]}/{path.parts[-2]}"] = {"steps": int(table[-1, 0]), "last": float(col[-1]),
                                                     "last_fifth_mean": float(tail.mean())}
    return out


def markdown(result: dict) -> str:
    k, c = result["kpu"], result["committee"]
    cats = [x for x in ("training", "md", "uncertainty", "labelling", "total") if x in k["cpu_s"]]
    lines = ["| | ALKPU (1 RLEKF model, KPU) | DP-GEN committee (4 Adam models) | ratio |", "|---|---|---|---|"]
    lines.append(f"| labels (EMT calls) | {k['labels']} | {c['labels']} | {k['labels'] / max(c['labels'], 1):.2f} |")
    lines.append(f"| frames selected | {k['selected']} | {c['selected']} | |")
    for cat in cats:
        a, b = k["cpu_s"].get(cat, 0.0), c["cpu_s"].get(cat, 0.0)
        ratio = f"{a / b:.2f}" if b else "–"
        lines.append(f"| CPU {cat} (s) | {a:.0f} | {b:.0f} | {ratio} |")
    a, b = k["wall_s"]["total"], c["wall_s"]["total"]
    lines.append(f"| wall total (s) | {a:.0f} | {b:.0f} | {a / b:.2f} |")
    for name in sorted(k["final_rmse"], key=lambda s: float(s.rstrip("K"))):
        fk, fc = k["final_rmse"][name]["force_rmse"], c["final_rmse"].get(name, {}).get("force_rmse")
        ek, ec = (k["final_rmse"][name]["energy_rmse_per_atom"],
                  c["final_rmse"].get(name, {}).get("energy_rmse_per_atom"))
        lines.append(f"| final force RMSE {name} (eV/Å) | {fk:.4f} | {fc:.4f} | {fk / fc:.2f} |")
        lines.append(f"| final energy RMSE {name} (meV/atom) | {1e3 * ek:.2f} | {1e3 * ec:.2f} | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "cu-emt"))
    parser.add_argument("--rounds", type=int, help="only the first N rounds of the ladder")
    parser.add_argument("--only", choices=MODES,
                        help="run one of the two (compared with the other's earlier run, if any)")
    parser.add_argument("--committee-steps", metavar="FIRST,REUSE",
                        help="Adam steps of the committee's first and continued trainings "
                        "(the demo's: 4000,2000)")
    parser.add_argument("--kpu", action="append", metavar="KEY=VALUE",
                        help="a key of the kpu run's kpu block (JSON value), e.g. extrapolation=0; repeatable")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    for mode in MODES:
        if args.only in (None, mode):
            run_demo(out / mode, mode, args.rounds, args.committee_steps, args.kpu)
    if not all((out / mode / "record.dpgen").exists() for mode in MODES):
        return 0  # --only with the other run not there yet: nothing to compare
    result = {mode: summarise(out / mode) for mode in MODES}
    result["machine"] = {"cpus": os.cpu_count()}
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "comparison.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
