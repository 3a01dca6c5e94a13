"""Does the loop label when its model is wrong, and not otherwise? An audit of a finished run.

For every exploration round of an `alkpu run` work folder whose labels come from ASE's EMT (the
examples cu-emt and cuni-emt), every explored frame is labelled here by EMT and its largest atomic
force error under that round's model (``00.train/graph.000.pb``) is compared with what the round
did with it: DP-GEN's class (accurate / candidate / failed, from ``model_devi.out`` and the trust
levels), its largest calibrated sigma (``kpu.npz``), whether its KPU lay beyond the calibrated
range (``kpu/extrapolation``) and whether it was labelled. A committee run (DP-GEN's own, four
models) is audited the same way with its max force deviation as sigma and model 0's errors.

    .venv/bin/python benchmarks/bench_selection_audit.py WORK [--out audit.json]

Per round: frames whose error is above the lower trust level but were counted accurate
("missed"), frames counted candidates whose error is below it ("needless"), and the median of
the largest error and of the largest sigma.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def frame_errors(task: Path, graph, type_map: list[str], steps) -> np.ndarray:
    """Largest atomic force error (eV/A) of each frame of an exploration task, against EMT."""
    import dpdata
    from ase import Atoms
    from ase.calculators.emt import EMT

    out = []
    for step in steps:
        s = dpdata.System(str(task / "traj" / f"{int(step)}.lammpstrj"), fmt="lammps/dump", type_map=type_map)
        symbols = [s["atom_names"][t] for t in s["atom_types"]]
        atoms = Atoms(symbols, positions=s["coords"][0], cell=s["cells"][0], pbc=True)
        atoms.calc = EMT()
        ref = atoms.get_forces()
        _, force, _ = graph.eval(s["coords"][0].reshape(1, -1), s["cells"][0].reshape(1, -1),
                                 [graph.get_type_map().index(n) for n in symbols])
        out.append(float(np.linalg.norm(force.reshape(-1, 3) - ref, axis=1).max()))
    return np.array(out)


def labelled_steps(fp_dir: Path) -> set[tuple[str, int]]:
    """(task name, step) of the frames labelled in a round (DP-GEN's candidate.shuffled files and
    its fp tasks: the first fp_task_max candidates of each system)."""
    chosen = set()
    for task in fp_dir.glob("task.*"):
        conf = task / "conf.dump"
        if conf.is_symlink():  # ../../01.model_devi/task.S.T/traj/STEP.lammpstrj
            target = Path(conf.readlink())
            chosen.add((target.parts[-3], int(target.stem)))
    return chosen


def audit(work: Path) -> dict:
    from deepmd.infer import DeepPot

    from alkpu_plugin.calibration import beyond_calibration
    from alkpu_plugin.dpgen.extrapolation import factor_of, trust_lo
    from alkpu_plugin.kpu_engine import KPUResult

    param = json.loads((work / "param.json").read_text())
    kpu_keys = param.get("kpu", param.get("alkpu", {}).get("kpu", {}))
    factor = factor_of(kpu_keys)
    rounds = []
    for it_dir in sorted(work.glob("iter.*")):
        ii = int(it_dir.name.split(".")[1])
        tasks = sorted((it_dir / "01.model_devi").glob("task.*"))
        graph_path = it_dir / "00.train" / "graph.000.pb"
        if not tasks or not graph_path.exists() or not (tasks[0] / "model_devi.out").exists():
            continue
        graph = DeepPot(str(graph_path))
        labelled = labelled_steps(it_dir / "02.fp")
        hi_param = param["model_devi_f_trust_hi"]
        rows = []
        for task in tasks:
            system = int(task.name.split(".")[1])
            lo = trust_lo(ii, param, system)
            hi = float(hi_param[system] if isinstance(hi_param, list) else hi_param)
            table = np.loadtxt(task / "model_devi.out", ndmin=2)
            if (task / "kpu.npz").exists():
                result = KPUResult.load(task / "kpu.npz")
                steps, sigma = result.steps, result.atom_sigma.max(axis=1)
                beyond = (beyond_calibration(result.calibration, result.atom_kpu, factor)
                          if result.calibration else np.zeros(len(sigma), bool))
            else:  # a committee: its max force deviation, model 0's errors
                steps, sigma, beyond = table[:, 0].astype(int), table[:, 4], np.zeros(len(table), bool)
            err = frame_errors(task, graph, param["type_map"], steps)
            for k, step in enumerate(steps):
                value = table[k, 4]
                cls = "failed" if value >= hi else "candidate" if value >= lo else "accurate"
                rows.append({"task": task.name, "step": int(step), "error": float(err[k]), "sigma": float(sigma[k]),
                             "beyond": bool(beyond[k]), "class": cls, "trust_lo": lo,
                             "labelled": (task.name, int(step)) in labelled})
        err = np.array([r["error"] for r in rows])
        wrong = err > np.array([r["trust_lo"] for r in rows])
        cls = np.array([r["class"] for r in rows])
        rounds.append({
            "iteration": ii, "frames": len(rows),
            "temps": sorted({t for j in param["model_devi_jobs"][ii:ii + 1] for t in j.get("temps", [])}),
            "wrong": int(wrong.sum()),
            "accurate": int((cls == "accurate").sum()), "candidate": int((cls == "candidate").sum()),
            "failed": int((cls == "failed").sum()),
            "beyond": int(sum(r["beyond"] for r in rows)),
            "labelled": int(sum(r["labelled"] for r in rows)),
            "missed": int((wrong & (cls == "accurate")).sum()),
            # candidates only because their KPU lay beyond the calibrated range, and how many were wrong
            "raised": int(sum(r["beyond"] and r["sigma"] < r["trust_lo"] and r["class"] == "candidate" for r in rows)),
            "raised_wrong": int(sum(r["beyond"] and r["sigma"] < r["trust_lo"] and r["class"] == "candidate" and w
                                    for r, w in zip(rows, wrong))),
            "needless": int((~wrong & (cls == "candidate")).sum()),
            "labelled_wrong": int(sum(r["labelled"] and w for r, w in zip(rows, wrong))),
            "median_error": float(np.median(err)), "median_sigma": float(np.median([r["sigma"] for r in rows])),
            "frames_detail": rows,
        })
    return {"work": str(work), "extrapolation": factor, "rounds": rounds}


def markdown(result: dict) -> str:
    lines = ["| round | T (K) | frames | wrong (error > trust_lo) | accurate / candidate / failed | beyond range "
             "| raised by it (of them wrong) | missed | needless | labelled (of them wrong) "
             "| median error / sigma (eV/Å) |",
             "| ---: | --- | ---: | ---: | --- | ---: | --- | ---: | ---: | --- | --- |"]
    for r in result["rounds"]:
        lines.append(f"| {r['iteration']} | {', '.join(str(t) for t in r['temps'])} | {r['frames']} | {r['wrong']} "
                     f"| {r['accurate']} / {r['candidate']} / {r['failed']} | {r['beyond']} "
                     f"| {r['raised']} ({r['raised_wrong']}) | {r['missed']} "
                     f"| {r['needless']} | {r['labelled']} ({r['labelled_wrong']}) "
                     f"| {r['median_error']:.3f} / {r['median_sigma']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", help="an alkpu run work folder (EMT labels)")
    parser.add_argument("--out", help="JSON output (default WORK/selection_audit.json)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    result = audit(work)
    out = Path(args.out) if args.out else work / "selection_audit.json"
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
