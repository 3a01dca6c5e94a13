"""A paper-scale exploration round: Cu-108, 30,000 MD steps, about 3,000 frames, through ``alkpu lmp-kpu``.

The ALKPU paper's reference round: 3,000 Cu-108 frames whose KPU took 0.28 h on
7 jobs. Here, as DP-GEN makes an exploration round: one task per temperature
(10 temperatures, 300-1200 K, NVT, 3,000 steps of 2 fs, a frame every 10 steps:
301 frames per task), each task's ``input.lammps`` written by DP-GEN's own
``make_lammps_input`` with the one model, its start a 108-atom fcc Cu cell
(``conf.lmp``, dpdata's lammps/lmp). Each task runs what ``alkpu run`` submits
for it::

    alkpu lmp-kpu --lmp lmp --model ../graph.pb --kalman-state ../kalman.npz -- -i input.lammps -v restart 0

one task after another (``--jobs``: several at a time), in this process's
environment (2 intra-op threads, as the tests run ``dp``). The model is
bench_scale.py's ``Cu`` model (the paper's size: 26,651 weights, blocksize 1024),
trained with real ``dp train`` (RLEKF) and uncalibrated (the cost does not depend
on the calibration). Per task ``alkpu_timing.json`` gives the CPU and wall
seconds of LAMMPS and of the KPU, and where the KPU's wall time went (start,
reading the trajectory, rows, quadratic forms, domain check, writing).

    .venv/bin/python benchmarks/bench_paper_round.py [--tasks 10] [--nsteps 3000] [--jobs 1]
    .venv/bin/python benchmarks/bench_paper_round.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_descriptors import ENV  # noqa: E402
from bench_scale import train  # noqa: E402

BIN = Path(sys.executable).parent
TEMPS = [300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200]
PARTS = ("start", "read", "rows", "quadratic", "domain", "other", "write")


def make_tasks(out: Path, graph: Path, ntasks: int, nsteps: int) -> list[Path]:
    import dpdata
    from ase.build import bulk
    from dpgen.generator.lib.lammps import make_lammps_input

    round_dir = out / "round"
    if round_dir.exists():
        shutil.rmtree(round_dir)
    round_dir.mkdir(parents=True)
    shutil.copy(graph, round_dir / "graph.pb")
    shutil.copy(graph.parent / "model.ckpt.kalman.npz", round_dir / "kalman.npz")
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    tasks = []
    for k, temp in enumerate((TEMPS * (ntasks // len(TEMPS) + 1))[:ntasks]):
        task = round_dir / f"task.000.{k:06d}"
        (task / "traj").mkdir(parents=True)  # DP-GEN's dump goes to traj/<step>.lammpstrj
        dpdata.System(cell, fmt="ase/structure").to("lammps/lmp", str(task / "conf.lmp"))
        text = make_lammps_input("nvt", "conf.lmp", ["../graph.pb"], nsteps, 0.002, 10, 10, [63.546],
                                 temp, {}, pres=1.0, deepmd_version="3.2.0")
        (task / "input.lammps").write_text(text)
        tasks.append(task)
    return tasks


def run_task(task: Path) -> dict:
    cmd = [str(BIN / "alkpu"), "lmp-kpu", "--lmp", str(BIN / "lmp"), "--model", "../graph.pb",
           "--kalman-state", "../kalman.npz", "--", "-i", "input.lammps", "-v", "restart", "0"]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=task, capture_output=True, text=True, env={**os.environ, **ENV})
    (task / "lmp-kpu.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (task / "alkpu_timing.json").exists():
        return {"task": task.name, "error": (proc.stdout + proc.stderr)[-2000:]}
    timing = json.loads((task / "alkpu_timing.json").read_text())
    return {"task": task.name, "wall_s": time.perf_counter() - tic, **timing}


def summary(tasks: list[dict]) -> dict:
    ok = [t for t in tasks if "error" not in t]
    tot = {k: sum(t.get(k, 0.0) for t in ok) for k in ("lmp_cpu_s", "lmp_wall_s", "kpu_cpu_s", "kpu_wall_s",
                                                          "frames")}
    tot.update({f"kpu_{p}_wall_s": sum(t.get(f"kpu_{p}_wall_s", 0.0) for t in ok) for p in PARTS})
    tot["tasks"], tot["failed"] = len(ok), len(tasks) - len(ok)
    tot["kpu_s_per_frame"] = tot["kpu_wall_s"] / max(1, tot["frames"])
    tot["kpu_cpu_over_md_cpu"] = tot["kpu_cpu_s"] / max(1e-9, tot["lmp_cpu_s"])
    return tot


def table(res: dict) -> str:
    s = res["summary"]
    h = lambda x: f"{x:.0f} s ({x / 3600:.2f} h)"  # noqa: E731
    lines = [
        "| stage | CPU | wall |", "| --- | --- | --- |",
        f"| MD (LAMMPS, {s['tasks']} tasks, {res['nsteps'] * s['tasks']:,} steps) | {h(s['lmp_cpu_s'])} | "
        f"{h(s['lmp_wall_s'])} |",
        f"| KPU ({s['frames']:,} frames of 108 atoms) | {h(s['kpu_cpu_s'])} | {h(s['kpu_wall_s'])} |",
    ]
    for p in PARTS:
        lines.append(f"| KPU: {p} | | {s[f'kpu_{p}_wall_s']:.0f} s |")
    lines.append(f"| KPU CPU / MD CPU | {s['kpu_cpu_over_md_cpu']:.2f} | |")
    lines.append(f"| KPU wall per frame | | {s['kpu_s_per_frame']:.2f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "paper_round")
    ap.add_argument("--models-from", type=Path, default=ROOT / "benchmarks" / "out" / "scale",
                    help="where bench_scale.py keeps (or trains) its models")
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--nsteps", type=int, default=3000)
    ap.add_argument("--jobs", type=int, default=1, help="tasks at a time")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    path = args.out / "paper_round.json"
    if args.table:
        print(table(json.loads(path.read_text())))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    graph = train("Cu", args.models_from)
    tasks = make_tasks(args.out, graph, args.tasks, args.nsteps)
    tic = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = []
        for res in pool.map(run_task, tasks):
            print(json.dumps(res)[:400], flush=True)
            results.append(res)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()}, {os.cpu_count()} CPUs",
           "command": "benchmarks/bench_paper_round.py " + " ".join(sys.argv[1:]), "nsteps": args.nsteps,
           "jobs": args.jobs, "round_wall_s": time.perf_counter() - tic, "load_average": list(os.getloadavg()),
           "tasks": results, "summary": summary(results)}
    path.write_text(json.dumps(out, indent=1))
    print(table(out))


if __name__ == "__main__":
    main()
