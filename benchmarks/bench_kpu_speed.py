"""KPU speed: the batched engine against the paper's per-component algorithm.

Model: the paper's Cu model (se_e2_a, rcut 6.0 / smoothing 5.8 A, embedding
[25, 25, 25], fitting [50, 50, 50], axis 16: 26,651 weights), trained briefly
with RLEKF on 108-atom Cu EMT frames, at blocksize 10240 (P about 1.8 GB in
float64) and at blocksize 1024.  Timing does not depend on how well the model
is trained.

Per frame it measures
* paper: for N/2 random atoms x 3 components, one backward pass and one
  quadratic form (reading every block of P) per component (the passes and the
  quadratic forms timed as two loops);
* engine, same numbers: the same N/2 x 3 components through the engine
  (rows from the se_e2_a structure; P's blocks Cholesky-factorised once per
  loaded state, then U g^T per block by one trmm; the one-off factorisation time
  is reported apart);
* the same rows by generic autodiff (pfor over components), for comparison;
* engine, whole frame: the energy and all 3N force components (what `alkpu kpu`
  computes per frame; one quadratic-form call for all of them);
* one energy + force evaluation of the model, for scale;
* frame_kpu over 10 frames back to back, as ``alkpu kpu`` runs them, in fresh
  processes with OpenBLAS's default thread spin and with the short one that
  ``alkpu kpu`` sets (``OPENBLAS_THREAD_TIMEOUT=4``);
and checks that engine and paper agree (max relative difference). Each timed
phase starts after a short pause (:func:`settle`).

    .venv/bin/python benchmarks/bench_kpu_speed.py [--frames 2] [--out benchmarks/out/kpu_speed]
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def model_input(blocksize: int) -> dict:
    return {
        "model": {
            "type_map": ["Cu"],
            "descriptor": {"type": "se_e2_a", "sel": [90], "rcut_smth": 5.8, "rcut": 6.0,
                           "neuron": [25, 25, 25], "axis_neuron": 16, "seed": 1},
            "fitting_net": {"neuron": [50, 50, 50], "seed": 1},
        },
        "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 3e-5, "decay_steps": 500},
        "optimizer": {"type": "RLEKF", "blocksize": blocksize},
        "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {
            "training_data": {"systems": ["../data/train"], "batch_size": 1},
            "numb_steps": 20, "disp_freq": 10, "save_freq": 20, "seed": 3,
        },
    }


def prepare(out: Path, blocksize: int) -> Path:
    from alkpu_plugin.reference import md_frames

    data = out / "data"
    if not (data / "train").exists():
        md_frames(300, 20, size=3, seed=1).to("deepmd/npy", str(data / "train"))
        md_frames(900, 10, size=3, seed=2).to("deepmd/npy", str(data / "test"))
    run = out / f"bs{blocksize}"
    graph = run / "graph.pb"
    if not graph.exists():
        run.mkdir(parents=True, exist_ok=True)
        (run / "input.json").write_text(json.dumps(model_input(blocksize), indent=1))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        subprocess.run([str(BIN / "dp"), "train", "input.json"], cwd=run, env=env, check=True,
                       capture_output=True)
        subprocess.run([str(BIN / "dp"), "freeze", "-o", "graph.pb"], cwd=run, env=env, check=True,
                       capture_output=True)
    return graph


def settle(seconds: float = 0.5) -> None:
    """Pause before a timed phase.

    numpy and scipy each ship their own OpenBLAS, and TensorFlow has its own thread
    pool; after a call, idle worker threads keep spinning for a while and, on few
    cores, slow whatever runs next (measured here: the engine's rows 0.47 s right
    after a loop of scipy symv calls, 0.30-0.36 s otherwise). Each phase starts
    after that has passed.
    """
    time.sleep(seconds)


def dgemm_rate(n: int = 3072) -> float:
    """Best of three n x n float64 GEMMs (scipy's BLAS), GFLOP/s: the machine's arithmetic ceiling."""
    from scipy.linalg import blas

    a = np.random.default_rng(0).standard_normal((n, n)).T  # Fortran order
    best = np.inf
    for _ in range(3):
        settle()
        tic = time.perf_counter()
        blas.dgemm(1.0, a, a)
        best = min(best, time.perf_counter() - tic)
    return 2 * n ** 3 / best / 1e9


def measure(graph: Path, test: Path, nframes: int, seed: int = 0) -> dict:
    import dpdata

    from alkpu_plugin.kalman import kpu as kpu_math
    from alkpu_plugin.kalman import load_state
    from alkpu_plugin.kpu_engine import KPUEngine

    engine = KPUEngine(graph, seed=seed, rows_per_pass=96)
    kf = engine.kf  # as saved: the paper's algorithm reads these blocks with symv
    # the engine's copy, Cholesky-factorised once per loaded state (what compute() does)
    fkf, _ = load_state(engine.state_path)
    tic = time.perf_counter()
    fkf.factorize()
    factorize_s = time.perf_counter() - tic
    system = dpdata.System(str(test), fmt="deepmd/npy")
    _, frames = engine._frames(system, range(nframes))
    natoms = frames[0].atype.size
    out = {"weights": kf.layout.n, "blocks": list(kf.layout.block_sizes),
           "p_bytes": kf.nbytes, "natoms": natoms, "frames": nframes}
    t = {"paper_grad": 0.0, "paper_quad": 0.0, "same_grad": 0.0, "same_quad": 0.0, "generic_grad": 0.0,
         "all_grad": 0.0, "all_quad": 0.0, "eval": 0.0}
    worst = worst_rows = 0.0
    engine.frame_kpu(frames[0], 0)  # warm-up (graph compilation)
    engine.jacobian.use_structured = False
    engine.jacobian.force_rows(frames[0], np.arange(3))
    engine.jacobian.use_structured = True
    engine.jacobian.force_row_bruteforce(frames[0], 0)
    for index, frame in enumerate(frames):
        atoms = kpu_math.paper_atoms(natoms, seed, index)
        comps = (3 * atoms[:, None] + np.arange(3)).ravel()
        # the paper's algorithm: one backward pass per component, then one quadratic form
        # (BLAS symv per block, reading each block once) per component; each phase timed
        # in its own loop (its best case: no other library's BLAS threads in between)
        settle()
        tic = time.perf_counter()
        grads = [engine.jacobian.force_row_bruteforce(frame, int(c)) for c in comps]
        t["paper_grad"] += time.perf_counter() - tic
        settle()
        tic = time.perf_counter()
        paper = np.array([float(kf.quadratic(g)) for g in grads])
        t["paper_quad"] += time.perf_counter() - tic
        del grads
        # the engine on the same components
        settle()
        tic = time.perf_counter()
        rows = engine.jacobian.force_rows(frame, comps)
        toc = time.perf_counter()
        same = kpu_math.component_kpu(fkf, rows)
        t["same_grad"] += toc - tic
        t["same_quad"] += time.perf_counter() - toc
        worst = max(worst, float(np.max(np.abs(same - paper) / np.abs(paper))))
        # the same rows by generic autodiff (pfor over components), for comparison
        engine.jacobian.use_structured = False
        settle()
        tic = time.perf_counter()
        generic = engine.jacobian.force_rows(frame, comps)
        t["generic_grad"] += time.perf_counter() - tic
        engine.jacobian.use_structured = True
        worst_rows = max(worst_rows, float(np.max(np.abs(generic - rows).max(axis=1)
                                                  / np.abs(generic).max(axis=1))))
        # the engine on a whole frame, as `alkpu kpu` computes it: dE/dw and all 3N force
        # components, one quadratic-form call
        settle()
        tic = time.perf_counter()
        rows = engine.jacobian.force_rows(frame, energy=True)
        toc = time.perf_counter()
        kpu_math.component_kpu(fkf, rows)
        t["all_grad"] += toc - tic
        t["all_quad"] += time.perf_counter() - toc
        tic = time.perf_counter()
        engine.jacobian.predict(frame)
        t["eval"] += time.perf_counter() - tic
    per = {k: v / nframes for k, v in t.items()}
    paper_total = per["paper_grad"] + per["paper_quad"]
    # what bounds the quadratic forms: the paper's symv reads one triangle of every block
    # per component (memory-bound); the engine's trmm does b^2 flops per row and
    # factorised block (compute-bound)
    sizes = np.array(kf.layout.block_sizes, dtype=float)
    ncomp = 3 * len(kpu_math.paper_atoms(natoms, seed, 0))
    bound = {"paper_quad_GB_per_s": ncomp * float((sizes * (sizes + 1) / 2).sum()) * 8 / per["paper_quad"] / 1e9,
             "speedup_if_rows_were_free": paper_total / per["same_quad"],
             "dgemm_3072_GFLOP_per_s": dgemm_rate()}
    if all(fkf.factored):
        bound["engine_quad_GFLOP_per_s"] = ncomp * float((sizes ** 2).sum()) / per["same_quad"] / 1e9
    out["quad_bound"] = bound
    same_total = per["same_grad"] + per["same_quad"]
    all_total = per["all_grad"] + per["all_quad"]
    out.update({
        "seconds_per_frame": per,
        "paper_total": paper_total,
        "engine_same_total": same_total,
        "engine_all_total": all_total,
        "speedup_same_numbers": paper_total / same_total,
        "speedup_all_atoms_vs_paper_half": paper_total / all_total,
        "kpu_over_eval_all_atoms": all_total / per["eval"],
        "max_relative_difference": worst,
        "structured_rows": engine.jacobian.structured_reason is None,
        "structured_vs_generic_rows_max_relative_difference": worst_rows,
        "factorize_once_s": factorize_s,
        "factorized_blocks": int(sum(fkf.factored)),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    })
    engine.jacobian.close()
    return out


def frame_loop(graph: Path, test: Path, nframes: int, seed: int = 0) -> dict:
    """Seconds per frame of ``KPUEngine.frame_kpu`` over frames back to back, as
    ``alkpu kpu`` runs them (no pauses; P factorised for that many frames' rows)."""
    import dpdata

    from alkpu_plugin.kpu_engine import KPUEngine

    engine = KPUEngine(graph, seed=seed)
    _, frames = engine._frames(dpdata.System(str(test), fmt="deepmd/npy"), range(nframes))
    engine.kf.factorize(expected_rows=nframes * (3 * frames[0].atype.size + 1))
    engine.frame_kpu(frames[0], 0)  # warm-up
    tic = time.perf_counter()
    for index, frame in enumerate(frames):
        engine.frame_kpu(frame, index)
    return {"frames": nframes, "seconds_per_frame": (time.perf_counter() - tic) / nframes,
            "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}


def _in_process(function: str, graph: Path, test: Path, nframes: int, env: dict) -> dict:
    """Run one of this file's measurements in a fresh process (peak memory per run; and
    OpenBLAS reads its settings when it is loaded)."""
    code = ("import json,sys; sys.path.insert(0, %r); from bench_kpu_speed import %s; "
            "print(json.dumps(%s(%r, %r, %d)))" % (str(Path(__file__).parent), function, function,
                                                   str(graph), str(test), nframes))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--blocksizes", type=int, nargs="+", default=[10240, 1024])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "kpu_speed"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "runs": {}}
    for bs in args.blocksizes:
        graph = prepare(out, bs)
        test = out / "data" / "test"
        # OpenBLAS threads as `alkpu kpu` sets them (OPENBLAS_THREAD_TIMEOUT=4: idle
        # threads sleep at once); the paper's algorithm runs under the same setting
        plain = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
        res = _in_process("measure", graph, test, args.frames, {**plain, "OPENBLAS_THREAD_TIMEOUT": "4"})
        # frame_kpu back to back (10 frames): with OpenBLAS's default spin time, and with
        # the short one
        res["frame_loop"] = {
            "openblas_default": _in_process("frame_loop", graph, test, 10, plain),
            "as_alkpu_kpu": _in_process("frame_loop", graph, test, 10,
                                        {**plain, "OPENBLAS_THREAD_TIMEOUT": "4"}),
        }
        results["runs"][f"blocksize_{bs}"] = res
        print(f"blocksize {bs}: paper {res['paper_total']:.2f} s/frame, engine (same numbers) "
              f"{res['engine_same_total']:.2f} s ({res['speedup_same_numbers']:.1f}x), whole frame "
              f"{res['engine_all_total']:.2f} s; max rel diff {res['max_relative_difference']:.1e}; "
              f"frame loop {res['frame_loop']['openblas_default']['seconds_per_frame']:.2f} s/frame, "
              f"{res['frame_loop']['as_alkpu_kpu']['seconds_per_frame']:.2f} as alkpu kpu")
    (out / "kpu_speed.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
