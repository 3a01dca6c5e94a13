"""Supported descriptors and options: the path of the force rows and KPU cost per frame.

For every model input of ``tests/test_descriptors.py`` (se_e2_a and each of its
options, se_e2_r, se_e3, se_atten, hybrid; two species, Cu-Ni) and one
single-species se_e2_a model, at the size of the ALKPU paper's Cu model (:func:`scaled_input`),
in one fresh process per case:

* real ``dp train`` (RLEKF, a few steps, blocksize 1024) on 32-atom Cu-Ni EMT
  frames and ``dp freeze`` (their peak RSS and wall time);
* :class:`alkpu_plugin.kpu_engine.KPUEngine` on the frozen model: the path its
  force rows take (``engine.jacobian.path``), the weight count, a check of a few
  force rows and their KPU, and the energy row, against the brute-force path (one
  backward pass and one dense quadratic form per output);
* seconds per frame of ``engine.frame_kpu`` (energy, 9 virial and all 3N force
  rows, one quadratic-form call) at 32 and 108 atoms, after a warm-up (one graph
  evaluation of each kind at that size), the median over a few frames,
  with P's blocks Cholesky-factorised first as ``alkpu kpu`` does for a long
  trajectory (the one-off factorisation is timed apart), and one energy + force
  evaluation of the model (``engine.jacobian.predict``) for scale; apart, the time
  of the nine virial rows and of the quadratic forms of a frame's rows;
* the process's peak RSS after the 32-atom frames and after the 108-atom ones.

Threads as ``alkpu kpu`` sets them (``OPENBLAS_THREAD_TIMEOUT=4``) and as the tests
run ``dp`` (2 intra-op threads). Results go to ``<out>/descriptors.json``; the
markdown table (ready to paste into docs/kpu.md) is printed at the end, and again
from the JSON alone with ``--table``::

    .venv/bin/python benchmarks/bench_descriptors.py [--cases se_e2_a hybrid ...] [--frames 3]
    .venv/bin/python benchmarks/bench_descriptors.py --update --cases se_e3   # rerun rows
    .venv/bin/python benchmarks/bench_descriptors.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

# the tests' model inputs, and their `dp train` + `dp freeze` in one process
from tests.test_descriptors import CASES, TRAIN_AND_FREEZE, model_input  # noqa: E402

ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "DP_INTRA_OP_PARALLELISM_THREADS": "2",
    "DP_INTER_OP_PARALLELISM_THREADS": "1",
    "OMP_NUM_THREADS": "2",
    "OPENBLAS_THREAD_TIMEOUT": "4",
}

#: the single-species case (not in the tests' CASES): the paper-sized Cu model's shape
ONE_SPECIES = "se_e2_a, Cu only"
BLOCKSIZE = 1024
TRAIN_STEPS = 4
SIZES = {2: 32, 3: 108}  # md_frames size -> atoms
#: further timed frames (up to --frames) only while the timed ones took less than this in all
REPEAT_WITHIN_S = 30.0

# Sizes: the shape of the ALKPU paper's Cu model (embedding [25, 25, 25], axis 16, fitting
# [50, 50, 50], rcut 6 A; bench_kpu_speed.py's model), with per-type sel for two species.
# rcut 6 A holds up to 79 neighbours in these Cu-Ni frames (at most 50 of one species),
# rcut 4.5 A up to 41 (27).
EMBEDDING = [25, 25, 25]
FITTING = [50, 50, 50]
SCALE = {
    "se_e2_a": {"rcut": 6.0, "rcut_smth": 5.8, "sel": [56, 56], "neuron": EMBEDDING, "axis_neuron": 16},
    "se_e2_r": {"rcut": 6.0, "rcut_smth": 5.8, "sel": [56, 56], "neuron": EMBEDDING},
    # DeePMD-kit's se_e3 example uses a small embedding net; three-body at a shorter cut-off
    "se_e3": {"rcut": 4.5, "rcut_smth": 4.0, "sel": [28, 28], "neuron": [2, 4, 8]},
    # DPA-1 with the attention of DeePMD-kit's se_atten example (width 128, two layers)
    "se_atten": {"rcut": 6.0, "rcut_smth": 5.8, "sel": 100, "neuron": EMBEDDING, "axis_neuron": 16,
                 "attn": 128, "attn_layer": 2},
}
# in a hybrid: se_e2_a as above plus a short-range se_e2_r
HYBRID_SE_R = {"rcut": 4.5, "rcut_smth": 4.0, "sel": [28, 28], "neuron": [10, 20, 40]}
# force components per graph evaluation (`alkpu kpu --rows-per-pass`): the engine's default 96,
# fewer where generic autodiff at 96 went past 10 GB (se_e3 at 108 atoms; se_atten past 20 GB)
ROWS_PER_PASS = {"se_atten": 8, "se_e3": 24}


def scaled_input(name: str, data: Path) -> dict:
    """The tests' input for case ``name`` at the size of the paper's model.

    Each descriptor gets the cut-off, sel and network sizes of :data:`SCALE` (options
    of the case kept), the fitting net :data:`FITTING`; a per-layer ``trainable`` list
    keeps its final-layer flag and repeats its last hidden-layer flag for the added
    hidden layer. Blocksize :data:`BLOCKSIZE`, :data:`TRAIN_STEPS` steps.
    """
    if name == ONE_SPECIES:
        inp = model_input("se_e2_a", data)
        inp["model"]["type_map"] = ["Cu"]
        inp["model"]["descriptor"].update({**SCALE["se_e2_a"], "sel": [90]})
    else:
        inp = model_input(name, data)
        desc = inp["model"]["descriptor"]
        if desc["type"] == "hybrid":
            for sub in desc["list"]:
                sub.update(SCALE["se_e2_a"] if sub["type"] == "se_e2_a" else HYBRID_SE_R)
        else:
            desc.update(SCALE[desc["type"]])
    fit = inp["model"]["fitting_net"]
    fit["neuron"] = list(FITTING)
    if isinstance(fit.get("trainable"), list):
        hidden, final = fit["trainable"][:-1], fit["trainable"][-1]
        hidden = (hidden + [hidden[-1]] * len(FITTING))[: len(FITTING)]
        fit["trainable"] = hidden + [final]
    inp["optimizer"]["blocksize"] = BLOCKSIZE
    tr = inp["training"]
    tr.update({"numb_steps": TRAIN_STEPS, "disp_freq": TRAIN_STEPS, "save_freq": TRAIN_STEPS})
    return inp


def make_data(out: Path, nframes: int) -> Path:
    """Cu-Ni (and Cu-only) EMT frames: training at 32 atoms, test frames at 32 and 108."""
    import dpdata

    from alkpu_plugin.reference import md_frames

    data = out / "data"
    alloy = {"substitute": {"Ni": 0.5}, "type_map": ["Cu", "Ni"]}
    todo = {"train": (2, 6, 5, alloy), "cu_train": (2, 6, 5, {})}
    for size in SIZES:
        todo[f"test_{SIZES[size]}"] = (size, nframes + 1, 6, alloy)
        todo[f"cu_test_{SIZES[size]}"] = (size, nframes + 1, 6, {})
    for key, (size, n, seed, kw) in todo.items():
        if not (data / key / "type.raw").exists() or \
                dpdata.System(str(data / key), fmt="deepmd/npy").get_nframes() < n:
            md_frames(600, n, size=size, seed=seed, **kw).to("deepmd/npy", str(data / key))
    return data


# ------------------------------------------------------------------ one case
def _rss_gb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1e6  # kB on Linux


def _watch_memory(res: dict, limit_gb: float) -> None:
    """Stop this process, reporting what it has measured, when its RSS passes ``limit_gb``
    (the machine is shared: a case must not make the kernel kill other jobs)."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def watch():
        while True:
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * page / 1e9
            if rss > limit_gb:
                try:
                    res["error"] = f"stopped: RSS {rss:.1f} GB passed the limit of {limit_gb:g} GB"
                    print("RESULT " + json.dumps(res), flush=True)
                finally:
                    os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def _rel(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a) - b).max() / max(float(np.abs(b).max()), 1e-300))


def run_case(name: str, out: Path, nframes: int, max_rss_gb: float) -> dict:
    """Train, freeze and measure one case (meant to run in a fresh process)."""
    import dpdata
    import numpy as np

    data = out / "data"
    run = out / "runs" / name.replace(", ", "_").replace(" ", "_")
    run.mkdir(parents=True, exist_ok=True)
    prefix = "cu_" if name == ONE_SPECIES else ""
    inp = scaled_input(name, data)
    inp["training"]["training_data"]["systems"] = [str(data / f"{prefix}train")]
    (run / "input.json").write_text(json.dumps(inp, indent=1))
    res = {"case": name, "input": inp["model"]}
    env = {**os.environ, **ENV}
    tic = time.perf_counter()
    (run / "graph.pb").unlink(missing_ok=True)
    # real `dp train` and `dp freeze` (in a child process: its peak RSS is kept apart)
    proc = subprocess.run([sys.executable, "-c", TRAIN_AND_FREEZE], cwd=run, env=env,
                          capture_output=True, text=True)
    (run / "dp.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (run / "graph.pb").exists():
        res["error"] = "dp train / dp freeze failed:\n" + (proc.stdout + proc.stderr)[-3000:]
        return res
    res["train_freeze_s"] = time.perf_counter() - tic
    res["train_peak_rss_gb"] = _rss_gb(resource.RUSAGE_CHILDREN)

    from alkpu_plugin.kalman import kpu as kpu_math
    from alkpu_plugin.kpu_engine import KPUEngine

    _watch_memory(res, max_rss_gb)
    kind = inp["model"]["descriptor"]["type"]
    engine = KPUEngine(run / "graph.pb", seed=0, rows_per_pass=ROWS_PER_PASS.get(kind, 96))
    jac = engine.jacobian
    res.update(weights=int(engine.kf.layout.n), p_gb=engine.kf.nbytes / 1e9,
               blocks=len(engine.kf.layout.block_sizes), rows_per_pass=jac.rows_per_pass,
               path=jac.path)
    res["sizes"] = {}
    for size, natoms in SIZES.items():
        system = dpdata.System(str(data / f"{prefix}test_{natoms}"), fmt="deepmd/npy")
        _, frames = engine._frames(system, range(nframes + 1))
        one = res["sizes"][str(natoms)] = {"natoms": natoms}
        if size == min(SIZES):
            # a few force rows, their KPU and the energy row against the brute-force path
            # (P as saved: before the factorisation below)
            frame = frames[0]
            types = frame.atype
            atoms = [int(np.flatnonzero(types == t)[0]) for t in np.unique(types)] + [natoms - 1]
            comps = np.array([3 * a + k for a in atoms for k in (0, 2)])
            rows = jac.force_rows(frame, comps, energy=True)
            brute = np.array([jac.force_row_bruteforce(frame, int(c)) for c in comps])
            kpu = kpu_math.component_kpu(engine.kf, rows)
            dense = np.array([kpu_math.bruteforce_kpu(engine.kf, g) for g in (rows[0], *brute)])
            res["check"] = {"components": comps.tolist(),
                            "force_rows_rel": _rel(rows[1:], brute),
                            "energy_row_rel": _rel(rows[0], jac.energy_row(frame)),
                            "kpu_rel": _rel(kpu, dense)}
            # P's blocks factorised as `alkpu kpu` does for a long trajectory
            tic = time.perf_counter()
            res["factorized_blocks"] = engine.kf.factorize(expected_rows=100 * (3 * 108 + 10))
            res["factorize_s"] = time.perf_counter() - tic
        # warm-up: graph building and the first allocations at this size, one graph
        # evaluation of each kind with a few components (the quadratic forms, plain BLAS,
        # need none)
        tic = time.perf_counter()
        jac.force_rows(frames[0], np.arange(3), energy=True, virial=engine.virial)
        one["warmup_s"] = time.perf_counter() - tic
        times, evals = [], []
        for index, frame in enumerate(frames[1:], start=1):
            tic = time.perf_counter()
            engine.frame_kpu(frame, index)
            times.append(time.perf_counter() - tic)
            if sum(times) > REPEAT_WITHIN_S:
                break
        # where the time goes: the nine virial rows (generic autodiff on every model) and the
        # quadratic forms of a frame's rows, each once
        tic = time.perf_counter()
        rows = jac.virial_rows(frames[1])
        one["virial_rows_s"] = time.perf_counter() - tic
        rows = np.zeros((1 + 9 + 3 * natoms, engine.kf.layout.n))
        rows[:] = np.random.default_rng(0).standard_normal(rows.shape[1])
        tic = time.perf_counter()
        kpu_math.component_kpu(engine.kf, rows)
        one["quadratic_forms_s"] = time.perf_counter() - tic
        del rows
        jac.predict(frames[0])
        for frame in frames[1:] * 3:
            tic = time.perf_counter()
            jac.predict(frame)
            evals.append(time.perf_counter() - tic)
        one.update(kpu_s=float(np.median(times)), kpu_s_each=times, eval_s=float(np.min(evals)),
                   peak_rss_gb=_rss_gb())
    res["path"] = jac.path
    jac.close()
    return res


# ------------------------------------------------------------------- driver
def _in_process(name: str, out: Path, nframes: int, max_rss_gb: float) -> dict:
    code = ("import json,sys; sys.path.insert(0, %r); import bench_descriptors as b; "
            "print('RESULT ' + json.dumps(b.run_case(%r, b.Path(%r), %d, %r)))"
            % (str(Path(__file__).parent), name, str(out), nframes, max_rss_gb))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **ENV})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    if proc.returncode != 0:
        return {"case": name, "error": f"exit status {proc.returncode} (negative: killed by that "
                f"signal, e.g. -9 when out of memory):\n" + (proc.stdout + proc.stderr)[-3000:]}
    return {"case": name, "error": "no result:\n" + (proc.stdout + proc.stderr)[-3000:]}


def _label(res: dict) -> str:
    """The case as a table row title."""
    labels = {
        "se_e2_a": "se_e2_a (se_a)", ONE_SPECIES: "se_e2_a, one species",
        "resnet_dt": "se_e2_a, resnet_dt (descriptor and fitting)",
        "type_one_side": "se_e2_a, type_one_side true", "exclude_types": "se_e2_a, exclude_types [[0, 1]]",
        "activation": "se_e2_a, gelu / softplus activations", "float32": "se_e2_a, precision float32",
        "set_davg_zero": "se_e2_a, set_davg_zero", "partly_frozen": "se_e2_a, a frozen fitting layer (trainable false)",
        "one_side_excluded": "se_e2_a, type_one_side with exclude_types",
        "combined": "se_e2_a, resnet_dt + type_one_side + exclude_types + set_davg_zero + frozen layer",
        "combined_gelu": "se_e2_a, resnet_dt + exclude_types + gelu", "se_e2_r": "se_e2_r", "se_e3": "se_e3",
        "se_atten": "se_atten (DPA-1)", "hybrid": "hybrid (se_e2_a + se_e2_r)",
    }
    return labels.get(res["case"], res["case"])


def table(results: dict) -> str:
    """Markdown table of the results (what docs/kpu.md shows); "-" where a case stopped."""
    cols = ["model", "trains with RLEKF", "KPU = brute force (max rel. diff.)", "force rows", "weights",
            "KPU s/frame (peak RSS GB), 32 atoms", "108 atoms", "E+F eval s, 32 / 108", "load"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for res in results["cases"]:
        label = _label(res)
        if res.get("rows_per_pass", 96) != 96:
            label += f" (`--rows-per-pass {res['rows_per_pass']}`)"
        trained = "yes" if "train_freeze_s" in res else "no"
        exact = "-"
        if "check" in res:
            c = res["check"]
            worst = max(c["force_rows_rel"], c["energy_row_rel"], c["kpu_rel"])
            exact = f"yes ({worst:.0e})" if worst <= 1e-6 else f"NO ({worst:.0e})"
        path = res.get("path", "-")
        path = "generic autodiff" if path.startswith("generic") else path
        weights = f"{res['weights']:,}" if "weights" in res else "-"
        sizes = res.get("sizes", {})
        cell = {n: f"{sizes[n]['kpu_s']:.2f} ({sizes[n]['peak_rss_gb']:.1f})" if "kpu_s" in sizes.get(n, {})
                else "-" for n in ("32", "108")}
        ev = " / ".join(f"{sizes[n]['eval_s']:.3f}" if "eval_s" in sizes.get(n, {}) else "-"
                        for n in ("32", "108"))
        load = "-".join(f"{x:.1f}" for x in res.get("load_average", [])) or "-"
        row = [label, trained, exact, path, weights, cell["32"], cell["108"], ev, load]
        if "error" in res:
            row[-1] += " — " + res["error"].splitlines()[0][:120]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe(results: dict) -> str:
    """The model sizes and settings, one paragraph (goes with the table)."""
    st = results["settings"]
    sc = st["scale"]
    loads = [x for r in results["cases"] for x in r.get("load_average", [])] or [float("nan")]
    a = sc["se_e2_a"]
    return (f"Models: se_e2_a embedding {a['neuron']}, axis_neuron {a['axis_neuron']}, rcut {a['rcut']} A, "
            f"sel {a['sel']} ([90] with one species); fitting net {st['fitting']}; se_e2_r as se_e2_a "
            f"without axis; se_e3 {sc['se_e3']['neuron']}, rcut {sc['se_e3']['rcut']} A, sel "
            f"{sc['se_e3']['sel']}; se_atten sel {sc['se_atten']['sel']}, attention width "
            f"{sc['se_atten']['attn']} x {sc['se_atten']['attn_layer']} layers; hybrid: the se_e2_a "
            f"plus se_e2_r {st['hybrid_se_e2_r']['neuron']} at rcut {st['hybrid_se_e2_r']['rcut']} A. "
            f"RLEKF blocksize {st['blocksize']}, {st['train_steps']} training steps; KPU per frame: "
            f"energy, 9 virial and 3N force rows, median of up to {st['timed_frames']} frames "
            f"(fewer once {st.get('repeat_within_s', REPEAT_WITHIN_S):g} s are spent) after a warm-up, "
            f"P's blocks Cholesky-factorised; peak RSS of the measuring process. "
            f"{st['data']}. Machine: {results['machine']['cpus']} cores, "
            f"{results['machine']['memory_gb']:.0f} GiB; 1-minute load average "
            f"{min(loads):.1f}-{max(loads):.1f} over the cases; "
            + (f"rows {', '.join(results['updated']['cases'])} rerun in "
               if "updated" in results else "")
            + f"{results.get('total_s', 0) / 60:.0f} min in all.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=[ONE_SPECIES, *CASES],
                    help=f"case names (default: {ONE_SPECIES!r} and all of the tests' CASES)")
    ap.add_argument("--frames", type=int, default=3,
                    help="timed frames per size, after a warm-up; the median is reported (default 3; "
                         f"frames after the first only while the timed ones took < {REPEAT_WITHIN_S:g} s)")
    ap.add_argument("--max-rss-gb", type=float, default=10.0,
                    help="stop a case whose measuring process passes this RSS (default 10)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "descriptors"))
    ap.add_argument("--table", action="store_true", help="print the table of an earlier run and stop")
    ap.add_argument("--update", action="store_true",
                    help="rerun only --cases and replace them in an earlier run's JSON")
    args = ap.parse_args()
    out = Path(args.out)
    path = out / "descriptors.json"
    if args.table:
        results = json.loads(path.read_text())
        print(describe(results) + "\n\n" + table(results))
        return
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    make_data(out, args.frames)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                    "load_average_at_start": os.getloadavg()},
        "settings": {"blocksize": BLOCKSIZE, "train_steps": TRAIN_STEPS, "scale": SCALE,
                     "hybrid_se_e2_r": HYBRID_SE_R, "fitting": FITTING, "timed_frames": args.frames,
                     "repeat_within_s": REPEAT_WITHIN_S,
                     "rows_per_pass": ROWS_PER_PASS, "max_rss_gb": args.max_rss_gb,
                     "env": ENV, "data": "Cu-Ni (50/50 random) and Cu fcc, EMT, 600 K"},
        "cases": [],
    }
    if args.update and path.exists():
        earlier = json.loads(path.read_text())
        results["cases"] = [r for r in earlier["cases"] if r["case"] not in args.cases]
        results["updated"] = {"from": earlier.get("date"), "cases": args.cases}
    order = [ONE_SPECIES, *CASES]
    for name in args.cases:
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        res = _in_process(name, out, args.frames, args.max_rss_gb)
        res["case_wall_s"] = time.perf_counter() - t0
        # the machine's 1-minute load average before and after the case (other jobs slow the
        # generic path most)
        res["load_average"] = [load0, os.getloadavg()[0]]
        results["cases"] = sorted([r for r in results["cases"] if r["case"] != name] + [res],
                                  key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
        summary = (f"{res.get('path', '?')}; {res.get('weights', '?')} weights; KPU s/frame "
                   + ", ".join(f"{k}: {v['kpu_s']:.2f}" for k, v in res.get("sizes", {}).items()
                               if "kpu_s" in v))
        if "error" in res:
            summary += "; " + res["error"].splitlines()[0]
        print(f"{name}: {summary} ({res['case_wall_s']:.0f} s)", flush=True)
        results["load_average_at_end"] = os.getloadavg()
        results["total_s"] = time.perf_counter() - tic
        path.write_text(json.dumps(results, indent=1))
    print()
    print(describe(results))
    print()
    print(table(results))
    print(f"\ntotal {results['total_s'] / 60:.1f} min; {path}")


if __name__ == "__main__":
    main()
