"""KPU cost against the number of atoms: seconds per frame, per force component, memory.

Two models, trained with real ``dp train`` (RLEKF, a few steps, blocksize 1024)
on 32-atom EMT frames and frozen with ``dp freeze``:

* ``Cu``: one species, the ALKPU paper's Cu model (se_e2_a [25, 25, 25], axis 16,
  sel 90, rcut 6 A, fitting [50, 50, 50]);
* ``CuNi``: two species, the DP-GEN-example size (se_e2_a [25, 50, 100], axis 16,
  ``type_one_side``, sel [56, 56], rcut 6 A, fitting [50, 50, 50]: 183k weights).

For each model and each size (fcc cells of 32 to 2,048 atoms (192: the size of a
two-species DFT system a user brought), positions displaced
by 0.1 A, Cu-Ni a random 50/50 alloy), in one fresh process:
:class:`alkpu_plugin.kpu_engine.KPUEngine` with its defaults (memory limit 2 GB),
P's blocks Cholesky-factorised as ``alkpu kpu`` does for a trajectory; one frame
as warm-up (graph building at that size), then ``engine.frame_kpu`` (energy,
9 virial and all 3N force rows and their KPU) timed on further frames; apart, the
time of the quadratic forms within a frame, of the nine virial rows, and of one
energy + force evaluation (``engine.jacobian.predict``, the model as LAMMPS runs
it); the process's peak RSS and its RSS before the first frame (model, P and
TensorFlow loaded): the difference is the memory the KPU of a frame adds.

Threads as ``alkpu kpu`` sets them (``OPENBLAS_THREAD_TIMEOUT=4``), 2 intra-op
threads. Results go to ``<out>/scale.json``; the markdown table is printed at the
end, and again from the JSON alone with ``--table``::

    .venv/bin/python benchmarks/bench_scale.py [--models Cu CuNi] [--sizes 32 108 ...] [--frames 2]
    .venv/bin/python benchmarks/bench_scale.py --models Cu --sizes 32 108 --rows-through-T pair
    .venv/bin/python benchmarks/bench_scale.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_descriptors import ENV, ONE_SPECIES, TRAIN_AND_FREEZE, _rss_gb, make_data, scaled_input  # noqa: E402

#: fcc repetitions of the 4-atom cubic cell for each size
REPEATS = {32: (2, 2, 2), 108: (3, 3, 3), 192: (4, 4, 3), 256: (4, 4, 4), 500: (5, 5, 5), 1024: (8, 8, 4), 2048: (8, 8, 8)}
MODELS = ("Cu", "CuNi")
#: further timed frames (up to --frames) only while the timed ones took less than this
REPEAT_WITHIN_S = 60.0


def model_input(name: str, data: Path) -> dict:
    if name == "Cu":
        inp = scaled_input(ONE_SPECIES, data)
        inp["training"]["training_data"]["systems"] = [str(data / "cu_train")]
        return inp
    inp = scaled_input("se_e2_a", data)
    inp["model"]["descriptor"].update({"neuron": [25, 50, 100], "type_one_side": True, "sel": [56, 56]})
    inp["training"]["training_data"]["systems"] = [str(data / "train")]
    return inp


def train(name: str, out: Path) -> Path:
    """``dp train`` + ``dp freeze`` of one model (once; reused when its graph exists)."""
    run = out / "models" / name
    graph = run / "graph.pb"
    if graph.exists():
        return graph
    run.mkdir(parents=True, exist_ok=True)
    (run / "input.json").write_text(json.dumps(model_input(name, make_data(out, 1)), indent=1))
    proc = subprocess.run([sys.executable, "-c", TRAIN_AND_FREEZE], cwd=run, capture_output=True,
                          text=True, env={**os.environ, **ENV})
    (run / "dp.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not graph.exists():
        raise SystemExit(f"dp train / dp freeze of {name} failed, see {run / 'dp.log'}")
    return graph


def frame_of(natoms: int, two_species: bool, seed: int):
    import numpy as np
    from ase.build import bulk

    from alkpu_plugin.deepmd_tf.jacobian import Frame

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(REPEATS[natoms])
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    types = np.zeros(len(atoms), np.int32)
    if two_species:
        types[np.random.default_rng(natoms).permutation(len(atoms))[: len(atoms) // 2]] = 1
    return Frame(atoms.positions, np.array(atoms.cell), types)


def measure(graph: str, name: str, natoms: int, nframes: int, path: str | None = None) -> dict:
    """One model at one size (meant to run in a fresh process); ``path`` "dense" or "pair"
    fixes how the rows' embedding part through T is made (default: the engine's choice)."""
    import numpy as np

    from alkpu_plugin.kpu_engine import KPUEngine

    engine = KPUEngine(graph, seed=0)
    jac = engine.jacobian
    if path:
        jac._structure.force_path = path
    engine.kf.factorize(expected_rows=100 * (3 * natoms + 10))
    res = {"model": name, "natoms": natoms, "weights": int(engine.kf.layout.n), "path": jac.path,
           "memory_limit_gb": engine.memory_limit, "base_rss_gb": _rss_gb()}
    two = name != "Cu"
    tic = time.perf_counter()
    engine.frame_kpu(frame_of(natoms, two, 0), 0)
    res["first_frame_s"] = time.perf_counter() - tic
    # time the quadratic forms inside frame_kpu
    quad = [0.0]
    plain = engine.kf.quadratic

    def timed(G):
        t0 = time.perf_counter()
        out = plain(G)
        quad[0] += time.perf_counter() - t0
        return out

    engine.kf.quadratic = timed
    times, quads = [], []
    for index in range(1, nframes + 1):
        frame = frame_of(natoms, two, index)
        quad[0] = 0.0
        tic = time.perf_counter()
        engine.frame_kpu(frame, index)
        times.append(time.perf_counter() - tic)
        quads.append(quad[0])
        if sum(times) > REPEAT_WITHIN_S:
            break
    frame = frame_of(natoms, two, 1)
    tic = time.perf_counter()
    jac.virial_rows(frame)
    res["virial_rows_s"] = time.perf_counter() - tic
    evals = []
    for _ in range(3):
        tic = time.perf_counter()
        jac.predict(frame)
        evals.append(time.perf_counter() - tic)
    structure = jac._structure
    res["rows_through_T"] = getattr(structure, "last_path", None)  # dense dT/dw or per pair
    res.update(kpu_s=float(np.median(times)), kpu_s_each=times, quadratic_s=float(np.median(quads)),
               eval_s=float(min(evals)), peak_rss_gb=_rss_gb())
    res["s_per_component"] = res["kpu_s"] / (3 * natoms)
    res["extra_rss_gb"] = res["peak_rss_gb"] - res["base_rss_gb"]
    res["kpu_over_eval"] = res["kpu_s"] / res["eval_s"]
    return res


def _in_process(graph: Path, name: str, natoms: int, nframes: int, path: str | None = None) -> dict:
    code = ("import json,sys; sys.path.insert(0, %r); import bench_scale as b; "
            "print('RESULT ' + json.dumps(b.measure(%r, %r, %d, %d, %r)))"
            % (str(Path(__file__).parent), str(graph), name, natoms, nframes, path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **ENV})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    return {"model": name, "natoms": natoms,
            "error": f"exit status {proc.returncode}:\n" + (proc.stdout + proc.stderr)[-3000:]}


def table(results: dict) -> str:
    cols = ["model", "atoms", "rows through T", "KPU s/frame", "ms per force component", "peak RSS GB (added by KPU)",
            "E+F eval s", "KPU / eval", "of which quadratic forms s", "virial rows s", "load"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['natoms']} | failed: {r['error'].splitlines()[0][:100]} |"
                         + " |" * (len(cols) - 3))
            continue
        load = "-".join(f"{x:.1f}" for x in r.get("load_average", []))
        lines.append(
            f"| {r['model']} ({r['weights']:,} weights) | {r['natoms']} | {r.get('rows_through_T') or '-'}"
            f"{' (fixed)' if r.get('forced') else ''} | "
            f"{r['kpu_s']:.2f} | "
            f"{1e3 * r['s_per_component']:.2f} | {r['peak_rss_gb']:.2f} ({r['extra_rss_gb']:+.2f}) | "
            f"{r['eval_s']:.3f} | {r['kpu_over_eval']:.0f} | {r['quadratic_s']:.2f} | "
            f"{r['virial_rows_s']:.2f} | {load} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "scale")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--sizes", nargs="+", type=int, default=sorted(REPEATS), choices=sorted(REPEATS))
    ap.add_argument("--frames", type=int, default=2, help="timed frames per size (after a warm-up frame)")
    ap.add_argument("--rows-through-T", choices=["dense", "pair"], default=None,
                    help="fix how the rows' embedding part through T is made (default: the engine's choice)")
    ap.add_argument("--table", action="store_true", help="print the table of the saved results and stop")
    args = ap.parse_args()
    path = args.out / "scale.json"
    if args.table:
        print(table(json.loads(path.read_text())))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    saved = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for name in args.models:
        graph = train(name, args.out)
        for natoms in args.sizes:
            res = _in_process(graph, name, natoms, args.frames, args.rows_through_T)
            res["load_average"] = list(os.getloadavg())
            res["forced"] = args.rows_through_T
            print(json.dumps({k: v for k, v in res.items() if k != "kpu_s_each"}), flush=True)
            key = (name, natoms, args.rows_through_T)
            saved["runs"] = [r for r in saved["runs"] if (r["model"], r["natoms"], r.get("forced")) != key] + [res]
            saved["runs"].sort(key=lambda r: (MODELS.index(r["model"]), r["natoms"], r.get("forced") or ""))
            saved.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.node()}, {os.cpu_count()} CPUs",
                         command="benchmarks/bench_scale.py " + " ".join(sys.argv[1:]))
            path.write_text(json.dumps(saved, indent=1))
    print(table(saved))


if __name__ == "__main__":
    main()
