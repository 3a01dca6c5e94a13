#!/usr/bin/env python
"""Benchmark: RLEKF vs Adam in ``dp train`` (DeePMD-kit TF backend), same model and data.

What it does
------------
1. Makes 32-atom fcc Cu data labelled by ASE's EMT (``alkpu_plugin.reference.md_frames``):
   training and validation frames at 300 K, cached under ``<outdir>/data``.
2. Runs the real ``dp train`` twice, in ``<outdir>/adam`` and ``<outdir>/rlekf``, with the
   same input except the ``optimizer`` section and the step counts.
3. Parses each run's ``lcurve.out`` and ``dp`` log: the timestamp of every
   ``Batch N: val:`` line gives wall time vs step (validation included, start-up excluded);
   step times come from the optimizers' own timing lines (RLEKF: ``s/batch (TF passes ..,
   Kalman updates ..)`` excluding the first interval; Adam: ``average training time``).
4. Computes step times, the RLEKF time split, final validation force RMSE, time to reach
   Adam's final validation force RMSE, P memory, and peak RSS of each ``dp`` process
   (``/usr/bin/time -v`` when available, else psutil polling).
5. Writes ``<outdir>/rlekf_vs_adam.json`` and ``<outdir>/rlekf_vs_adam.png``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_rlekf_vs_adam.py            # full: 6000 Adam / 600 RLEKF steps
    .venv/bin/python benchmarks/bench_rlekf_vs_adam.py --quick    # smoke run: 300 / 60 steps
    .venv/bin/python benchmarks/bench_rlekf_vs_adam.py --rlekf-opt force_normaliser=none --trace \
        --system CuNi --size 3 --outdir benchmarks/out/rlekf_vs_adam_cuni108

``--fitting 240,240,240`` and ``--axis-neuron 12`` set DP-GEN's usual model size; ``--rlekf-opt KEY=VALUE[,KEY=VALUE]`` (repeatable) adds an RLEKF run with those ``optimizer``
keys beside the one with the defaults; ``--system CuNi`` makes half of the sites Ni (the same
nets per type); ``--size`` sets the fcc repeats per side (2: 32 atoms, 3: 108); ``--trace``
writes each RLEKF run's per-update trace (``ALKPU_RLEKF_TRACE``) to its ``trace.jsonl``;
``--hot-frames N`` adds each RLEKF model's KPU ranking on N frames at 1200 K.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "out" / "rlekf_vs_adam"

# a Cu model of DP-GEN's embedding size: se_e2_a [25, 50, 100], fitting [50, 50, 50]
MODEL = {
    "type_map": ["Cu"],
    "descriptor": {
        "type": "se_e2_a", "sel": [90], "rcut_smth": 5.8, "rcut": 6.0,
        "neuron": [25, 50, 100], "axis_neuron": 16, "seed": 1,
    },
    "fitting_net": {"neuron": [50, 50, 50], "seed": 1},
}
LOSS = {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1}

SYSTEMS = {
    # the frames' keyword arguments for alkpu_plugin.reference.md_frames, and the model's types
    "Cu": {"frames": {"element": "Cu", "a": 3.61}, "type_map": ["Cu"]},
    "CuNi": {"frames": {"element": "Cu", "a": 3.56, "substitute": {"Ni": 0.5}}, "type_map": ["Cu", "Ni"]},
}


def model_for(system: str, fitting: list[int] | None = None, axis_neuron: int | None = None) -> dict:
    """The Cu model above (with ``fitting`` as the fitting net's neurons and ``axis_neuron``);
    for two species the same nets per type."""
    model = json.loads(json.dumps(MODEL))
    if fitting:
        model["fitting_net"]["neuron"] = list(fitting)
    if axis_neuron:
        model["descriptor"]["axis_neuron"] = int(axis_neuron)
    types = SYSTEMS[system]["type_map"]
    model["type_map"] = types
    total = model["descriptor"]["sel"][0]
    # a random alloy holds more than its share of one type around some atoms: 2/3 of the total each
    model["descriptor"]["sel"] = [total if len(types) == 1 else -(-2 * total // 3)] * len(types)
    return model


def frames_kw(system: str, size: int) -> dict:
    return {**SYSTEMS[system]["frames"], "size": size, "type_map": SYSTEMS[system]["type_map"]}


INT_KEYS = ("blocksize", "force_updates", "atoms_per_update", "seed")


def parse_opt(text: str) -> dict:
    """``KEY=VALUE[,KEY=VALUE]`` as optimizer keys (numbers where they parse as numbers)."""
    settings = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        try:
            settings[key] = int(value) if key in INT_KEYS else float(value)
        except ValueError:
            settings[key] = value
    return settings


def opt_name(settings: dict) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def kpu_quality(run: Path, data: Path, nframes: int, env: dict, dp: str, kw: dict) -> dict:
    """Spearman(max per-atom KPU, max atomic force error) and force RMSE on hot frames."""
    import dpdata
    from scipy.stats import spearmanr

    from alkpu_plugin.kpu_engine import KPUEngine
    from alkpu_plugin.reference import md_frames

    hot = data / f"hot1200_{nframes}"
    if not hot.exists():
        md_frames(1200, nframes, seed=13, interval=20, **kw).to("deepmd/npy", str(hot))
    subprocess.run([dp, "freeze", "-o", "graph.pb"], cwd=run, env=env, check=True, capture_output=True)
    engine = KPUEngine(run / "graph.pb", seed=0, virial=False)
    system = dpdata.LabeledSystem(str(hot), fmt="deepmd/npy")
    res = engine.compute(system, progress=False)
    _, frames = engine._frames(system, res.frames)
    pred = np.array([engine.jacobian.predict(f)[1] for f in frames])
    err = np.linalg.norm(pred - system["forces"], axis=2)
    return {"frames": int(system.get_nframes()),
            "spearman_max_atom_kpu_vs_max_error": float(spearmanr(res.atom_kpu.max(axis=1), err.max(axis=1)).statistic),
            "force_rmse": float(np.sqrt(np.mean((pred - system["forces"]) ** 2)))}

LCURVE_COLS = ["step", "rmse_val", "rmse_trn", "rmse_e_val", "rmse_e_trn",
               "rmse_f_val", "rmse_f_trn", "lr"]

TS = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]"
RE_VAL = re.compile(TS + r" DEEPMD INFO\s+Batch\s+(\d+): val:")
RE_RLEKF_STEP = re.compile(
    r"batch\s+(\d+): ([\d.eE+-]+) s/batch \(TF passes ([\d.eE+-]+) s, "
    r"Kalman updates ([\d.eE+-]+) s\), wall ([\d.eE+-]+) s"
)
RE_ADAM_AVG = re.compile(r"average training time: ([\d.eE+-]+) s/batch(?: \(exclude first (\d+) batches\))?")
RE_P = re.compile(
    r"built RLEKF training: (\d+) weights in (\d+) blocks \(blocksize (\d+)\), P ([\d.]+) MB in (\w+)"
)
RE_TRAINED = re.compile(r"RLEKF trained (\d+) steps \((\d+) Kalman updates in all\)")


# --------------------------------------------------------------------------- data
def make_data(datadir: Path, ntrain: int, nvalid: int, temperature: float,
              system: str = "Cu", size: int = 2) -> dict:
    """EMT-labelled frames, cached (regenerated when the settings change)."""
    spec = {"temperature": temperature, "ntrain": ntrain, "nvalid": nvalid,
            "train_seed": 1, "valid_seed": 2, "natoms": 4 * size**3, "calculator": "ASE EMT"}
    if system != "Cu":
        spec["system"] = system
    marker = datadir / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec \
            and (datadir / "train" / "type.raw").exists() and (datadir / "valid" / "type.raw").exists():
        print(f"[data] using cached data in {datadir}", flush=True)
        return spec
    from alkpu_plugin.reference import md_frames

    if datadir.exists():
        shutil.rmtree(datadir)
    datadir.mkdir(parents=True)
    tic = time.time()
    kw = frames_kw(system, size)
    md_frames(temperature, ntrain, seed=1, **kw).to("deepmd/npy", str(datadir / "train"))
    md_frames(temperature, nvalid, seed=2, **kw).to("deepmd/npy", str(datadir / "valid"))
    marker.write_text(json.dumps(spec, indent=1))
    print(f"[data] {ntrain} + {nvalid} frames labelled by EMT in {time.time() - tic:.1f} s", flush=True)
    return spec


def make_input(datadir: Path, optimizer: dict, steps: int, disp_freq: int,
               decay_steps: int, nvalid: int, seed: int, system: str = "Cu",
               fitting: list[int] | None = None, axis_neuron: int | None = None) -> dict:
    return {
        "model": model_for(system, fitting, axis_neuron),
        "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 3e-5, "decay_steps": decay_steps},
        "optimizer": optimizer,
        "loss": dict(LOSS),
        "training": {
            "training_data": {"systems": [str(datadir / "train")], "batch_size": 1},
            # batch_size 1 x numb_btch nvalid: every display evaluates each validation frame once
            "validation_data": {"systems": [str(datadir / "valid")], "batch_size": 1, "numb_btch": nvalid},
            "numb_steps": steps,
            "disp_freq": disp_freq,
            "save_freq": steps,
            "seed": seed,
            "disp_training": True,
            "time_training": True,
        },
    }


# --------------------------------------------------------------------------- running
def thread_env(threads: int) -> dict:
    return {
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "OMP_NUM_THREADS": str(threads),
        "DP_INTRA_OP_PARALLELISM_THREADS": str(threads),
        "DP_INTER_OP_PARALLELISM_THREADS": "1",
    }


def _poll_rss(pid: int, result: dict, stop: threading.Event) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    peak = 0
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            for p in procs:
                try:
                    peak = max(peak, p.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            break
        result["peak_rss_bytes"] = peak
        stop.wait(0.2)


def run_dp_train(workdir: Path, jdata: dict, env_extra: dict) -> dict:
    """Run ``dp train input.json`` in ``workdir``; log to ``workdir/dp.log``."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "input.json").write_text(json.dumps(jdata, indent=1))
    dp = Path(sys.executable).parent / "dp"
    if not dp.exists():
        dp = Path(shutil.which("dp") or "dp")
    cmd = [str(dp), "train", "input.json"]
    gnu_time = Path("/usr/bin/time")
    use_time = gnu_time.exists()
    if use_time:
        cmd = [str(gnu_time), "-v", "-o", "time.txt", *cmd]
    env = {**os.environ, **env_extra}
    info: dict = {"cmd": " ".join(cmd), "cwd": str(workdir)}
    print(f"[run] {workdir.name}: {' '.join(cmd)}", flush=True)
    tic = time.time()
    with open(workdir / "dp.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        poll: dict = {}
        stop = threading.Event()
        poller = None
        if not use_time:
            poller = threading.Thread(target=_poll_rss, args=(proc.pid, poll, stop), daemon=True)
            poller.start()
        rc = proc.wait()
        stop.set()
        if poller is not None:
            poller.join()
    info["process_wall_s"] = time.time() - tic
    info["returncode"] = rc
    if rc != 0:
        tail = (workdir / "dp.log").read_text()[-4000:]
        raise RuntimeError(f"dp train failed in {workdir} (rc {rc}):\n{tail}")
    if use_time:
        text = (workdir / "time.txt").read_text()
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        info["peak_rss_mb"] = int(m.group(1)) * 1024 / 1e6 if m else None
        info["peak_rss_method"] = "/usr/bin/time -v (max RSS of the dp process)"
    else:
        info["peak_rss_mb"] = poll.get("peak_rss_bytes", 0) / 1e6 or None
        info["peak_rss_method"] = "psutil polling every 0.2 s"
    print(f"[run] {workdir.name}: done in {info['process_wall_s']:.1f} s", flush=True)
    return info


# --------------------------------------------------------------------------- parsing
def read_lcurve(path: Path) -> dict[str, list[float]]:
    arr = np.loadtxt(path, comments="#", ndmin=2)
    names = LCURVE_COLS if arr.shape[1] == len(LCURVE_COLS) else None
    if names is None:
        header = [ln for ln in path.read_text().splitlines() if ln.startswith("# step")][0]
        names = header[1:].split()
    return {n: arr[:, i].tolist() for i, n in enumerate(names)}


def _ts(s: str) -> float:
    return dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_log(path: Path) -> dict:
    val_ts: dict[int, float] = {}
    rlekf_lines = []
    out: dict = {}
    for line in path.read_text(errors="replace").splitlines():
        m = RE_VAL.search(line)
        if m:
            val_ts.setdefault(int(m.group(2)), _ts(m.group(1)))
            continue
        m = RE_RLEKF_STEP.search(line)
        if m:
            rlekf_lines.append([float(g) for g in m.groups()])
            continue
        m = RE_ADAM_AVG.search(line)
        if m:
            out["adam_avg_s_per_step"] = float(m.group(1))
            out["adam_avg_excluded_first"] = int(m.group(2)) if m.group(2) else 0
            continue
        m = RE_P.search(line)
        if m:
            out["rlekf_weights"] = int(m.group(1))
            out["rlekf_blocks"] = int(m.group(2))
            out["rlekf_blocksize"] = int(m.group(3))
            out["P_MB"] = float(m.group(4))
            out["P_dtype"] = m.group(5)
            continue
        m = RE_TRAINED.search(line)
        if m:
            out["rlekf_steps_trained"] = int(m.group(1))
            out["rlekf_kalman_updates"] = int(m.group(2))
    if val_ts:
        t0 = min(val_ts.values())
        out["val_wall_s"] = {step: t - t0 for step, t in sorted(val_ts.items())}
    out["rlekf_timing_lines"] = rlekf_lines  # [step, s/batch, tf, kalman, wall]
    return out


def summarise(name: str, lc: dict, log: dict, run: dict, steps: int, disp_freq: int) -> dict:
    steps_lc = [int(s) for s in lc["step"]]
    wall = [log["val_wall_s"].get(s) for s in steps_lc]
    res: dict = {
        "steps": steps,
        "disp_freq": disp_freq,
        "n_lcurve_points": len(steps_lc),
        "final_rmse_f_val": lc["rmse_f_val"][-1],
        "final_rmse_e_val": lc["rmse_e_val"][-1],
        "initial_rmse_f_val": lc["rmse_f_val"][0],
        "min_rmse_f_val": min(lc["rmse_f_val"]),
        "train_wall_s": wall[-1],
        "wall_s_per_step_incl_validation": (wall[-1] / steps_lc[-1]) if wall[-1] else None,
        "process_wall_s": run["process_wall_s"],
        "peak_rss_MB": run["peak_rss_mb"],
        "peak_rss_method": run["peak_rss_method"],
        "curve": {"step": steps_lc, "wall_s": wall, "rmse_f_val": lc["rmse_f_val"],
                  "rmse_e_val": lc["rmse_e_val"], "rmse_f_trn": lc["rmse_f_trn"], "lr": lc["lr"]},
    }
    # validation cost: time between display points minus the pure training time of that interval
    if name == "adam":
        res["s_per_step"] = log.get("adam_avg_s_per_step")
        res["s_per_step_source"] = (
            "DeePMD-kit 'average training time' (train op only, excludes first "
            f"{log.get('adam_avg_excluded_first', 0)} batches)"
        )
    else:
        lines = np.asarray(log["rlekf_timing_lines"], dtype=float)
        use = lines[1:] if len(lines) > 1 else lines  # exclude the first interval (warm-up)
        res["s_per_step"] = float(use[:, 1].mean())
        res["tf_passes_s_per_step"] = float(use[:, 2].mean())
        res["kalman_updates_s_per_step"] = float(use[:, 3].mean())
        res["median_s_per_step"] = float(np.median(use[:, 1]))
        res["median_tf_passes_s_per_step"] = float(np.median(use[:, 2]))
        res["median_kalman_updates_s_per_step"] = float(np.median(use[:, 3]))
        res["first_interval_s_per_step"] = float(lines[0, 1])
        # intervals much slower than typical (e.g. a stall of the machine): listed so that they
        # can be told apart from the steady cost
        med = np.median(use[:, 1])
        slow = use[use[:, 1] > 2.0 * med]
        res["slow_intervals"] = [
            {"end_step": int(x[0]), "s_per_step": x[1], "tf_passes": x[2], "kalman": x[3], "wall_s": x[4]}
            for x in slow
        ]
        res["slow_intervals_extra_wall_s"] = float(sum(x[1] - med for x in slow) * disp_freq)
        res["timing_intervals"] = {
            "end_step": [int(x) for x in lines[:, 0]], "s_per_step": lines[:, 1].tolist(),
            "tf_passes": lines[:, 2].tolist(), "kalman": lines[:, 3].tolist(), "wall_s": lines[:, 4].tolist(),
        }
        res["s_per_step_source"] = (
            "RLEKF 's/batch' log lines, mean over intervals excluding the first "
            f"({len(use)} intervals of {disp_freq} steps)"
        )
        for k in ("P_MB", "P_dtype", "rlekf_weights", "rlekf_blocks", "rlekf_blocksize",
                  "rlekf_kalman_updates"):
            if k in log:
                res[k] = log[k]
    if res["s_per_step"] and res["wall_s_per_step_incl_validation"]:
        res["validation_and_other_overhead_fraction"] = 1 - res["s_per_step"] / res["wall_s_per_step_incl_validation"]
    return res


def time_to_target(res: dict, target: float) -> dict:
    c = res["curve"]
    for step, wall, r in zip(c["step"], c["wall_s"], c["rmse_f_val"]):
        if r <= target:
            return {"reached": True, "step": step, "wall_s": wall, "rmse_f_val": r}
    return {"reached": False, "step": None, "wall_s": None, "rmse_f_val": None}


def trace_summary(path: Path, span: int = 10) -> list[dict]:
    """Medians of an RLEKF trace (ALKPU_RLEKF_TRACE) per span of ``span`` steps and kind of
    update: H^T P H over the noise term L*lambda, the innovation, |delta w|."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for start in range(0, max(r["step"] for r in rows) + 1, span):
        row = {"steps": f"{start}-{start + span - 1}"}
        for kind in ("energy", "force"):
            sel = [r for r in rows if r["kind"] == kind and start <= r["step"] < start + span]
            if sel:
                row[f"{kind}_hph_over_noise"] = float(np.median([r["hph"] / r["noise"] for r in sel]))
                row[f"{kind}_innovation"] = float(np.median([r["innovation"] for r in sel]))
                row[f"{kind}_delta_norm"] = float(np.median([r["delta_norm"] for r in sel]))
        out.append(row)
    return out


# --------------------------------------------------------------------------- plot
COLORS = ("tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def run_label(name: str, blocksize: int) -> str:
    if name == "adam":
        return "Adam"
    opts = name.split(":", 1)[1] if ":" in name else ""
    if "blocksize=" in opts:  # the run's own blocksize replaces the common one
        return f"RLEKF ({opts})"
    return f"RLEKF (blocksize {blocksize}" + (f", {opts})" if opts else ")")


def plot(results: dict, target: float, path: Path, title: str, blocksize: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    styles = {"adam": ("tab:blue", "o")}
    for i, name in enumerate(n for n in results if n != "adam"):
        styles[name] = (COLORS[i % len(COLORS)], "sv^D"[i % 4])
    for key, (color, marker) in styles.items():
        label = run_label(key, blocksize)
        c = results[key]["curve"]
        ax = axes[0]
        rate = f"{results[key]['s_per_step']:.3g} s/step"
        ax.plot(c["wall_s"], c["rmse_f_val"], marker=marker, ms=3, color=color, label=f"{label}: {rate}")
        # intervals that ran much slower than the median (stalls), shaded
        ends = {s: w for s, w in zip(c["step"], c["wall_s"])}
        shaded = False
        for x in results[key].get("slow_intervals", []):
            end = x["end_step"]
            if end in ends:
                ax.axvspan(ends[end] - x["wall_s"], ends[end], color=color, alpha=0.08, lw=0,
                           label=None if shaded else f"{label.split()[0]} intervals > 2x median s/step")
                shaded = True
        ax = axes[1]
        steps = np.asarray(c["step"], dtype=float)
        ax.plot(np.maximum(steps, 1), c["rmse_f_val"], marker=marker, ms=3, color=color, label=label)
    for ax in axes:
        ax.axhline(target, color="gray", ls="--", lw=1, label="target: Adam final")
        ax.set_yscale("log")
        ax.set_ylabel("validation force RMSE (eV/Å)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_xlabel("wall time since first validation (s), validation included")
    axes[1].set_xlabel("training step (log; step 0 drawn at 1)")
    axes[1].set_xscale("log")
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.01 + 0.04 * len(labels), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- machine
def machine_info(threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads_used": threads,
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_GB"] = int(line.split()[1]) * 1024 / 1e9
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        for pkg in ("deepmd-kit", "tensorflow", "tensorflow-cpu", "numpy", "alkpu-plugin"):
            try:
                info[f"version_{pkg}"] = version(pkg)
            except Exception:
                pass
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outdir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--adam-steps", type=int, default=None, help="default 6000 (300 with --quick)")
    ap.add_argument("--rlekf-steps", type=int, default=None, help="default 600 (60 with --quick)")
    ap.add_argument("--points", type=int, default=30, help="lcurve points per run (sets disp_freq)")
    ap.add_argument("--ntrain", type=int, default=200)
    ap.add_argument("--nvalid", type=int, default=30)
    ap.add_argument("--temperature", type=float, default=300.0)
    ap.add_argument("--blocksize", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1, help="training/seed (also RLEKF's seed)")
    ap.add_argument("--system", choices=sorted(SYSTEMS), default="Cu",
                    help="Cu, or CuNi: half of the sites Ni, the same nets per type")
    ap.add_argument("--size", type=int, default=2, help="fcc cell repeats per side (2: 32 atoms, 3: 108)")
    ap.add_argument("--fitting", type=lambda t: [int(x) for x in t.split(",")], default=None,
                    metavar="N,N,N", help="fitting net neurons (default 50,50,50; DP-GEN's examples use 240,240,240)")
    ap.add_argument("--axis-neuron", type=int, default=None, help="descriptor axis_neuron (default 16)")
    ap.add_argument("--rlekf-opt", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="one more RLEKF run with these optimizer keys (repeatable)")
    ap.add_argument("--trace", action="store_true",
                    help="each RLEKF run writes its per-update trace (ALKPU_RLEKF_TRACE) to trace.jsonl")
    ap.add_argument("--hot-frames", type=int, default=0,
                    help="KPU ranking of each RLEKF model on this many 1200 K frames (0: none)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="OMP_NUM_THREADS and DP_INTRA_OP_PARALLELISM_THREADS for dp")
    ap.add_argument("--quick", action="store_true", help="smoke run: 300 Adam / 60 RLEKF steps")
    ap.add_argument("--only", action="append", default=None, metavar="RUN",
                    help="rerun only this run (adam, rlekf, or rlekf:KEY=VALUE,..; repeatable), "
                    "reusing the others' finished run directories")
    ap.add_argument("--reparse", action="store_true",
                    help="run nothing: re-read the finished runs in --outdir and rewrite the JSON and PNG")
    args = ap.parse_args(argv)
    adam_steps = args.adam_steps or (300 if args.quick else 6000)
    rlekf_steps = args.rlekf_steps or (60 if args.quick else 600)
    out = args.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.reparse:
        data_spec = json.loads((out / "data" / "spec.json").read_text())
    else:
        data_spec = make_data(out / "data", args.ntrain, args.nvalid, args.temperature, args.system, args.size)
    decay_steps = max(1, adam_steps // 30)
    plans = {
        "adam": ({"type": "Adam"}, adam_steps),
        "rlekf": ({"type": "RLEKF", "blocksize": args.blocksize}, rlekf_steps),
    }
    for text in args.rlekf_opt:
        settings = parse_opt(text)
        plans[f"rlekf:{opt_name(settings)}"] = ({"type": "RLEKF", "blocksize": args.blocksize, **settings},
                                                rlekf_steps)
    env = thread_env(args.threads)
    dp = str(Path(sys.executable).parent / "dp")
    results: dict = {}
    inputs: dict = {}
    for name, (opt, steps) in plans.items():
        disp = max(1, steps // args.points)
        jdata = make_input(out / "data", opt, steps, disp, decay_steps, args.nvalid, args.seed, args.system,
                           args.fitting, args.axis_neuron)
        inputs[name] = jdata
        workdir = out / name.replace(":", "_").replace("=", "_").replace(",", "-")
        reuse = args.reparse or (args.only and name not in args.only)
        if reuse and (workdir / "run.json").exists():
            run = json.loads((workdir / "run.json").read_text())
            print(f"[run] {name}: reusing {workdir}", flush=True)
        else:
            run_env = dict(env)
            if args.trace and name != "adam":
                run_env["ALKPU_RLEKF_TRACE"] = str(workdir / "trace.jsonl")
            run = run_dp_train(workdir, jdata, run_env)
            if name != "adam" and args.hot_frames:
                run["hot_1200K"] = kpu_quality(workdir, out / "data", args.hot_frames, {**os.environ, **env}, dp,
                                               frames_kw(args.system, args.size))
            (workdir / "run.json").write_text(json.dumps(run, indent=1))
        lc = read_lcurve(workdir / "lcurve.out")
        log = parse_log(workdir / "dp.log")
        results[name] = summarise(name, lc, log, run, steps, disp)
        if "hot_1200K" in run:
            results[name]["hot_1200K"] = run["hot_1200K"]
        if (workdir / "trace.jsonl").exists():
            results[name]["trace_by_10_steps"] = trace_summary(workdir / "trace.jsonl")

    target = results["adam"]["final_rmse_f_val"]
    for name in plans:
        results[name]["time_to_target"] = time_to_target(results[name], target)
    a = results["adam"]
    ttt_a = a["time_to_target"]
    comparison = {"target_rmse_f_val": target, "runs": {}}
    for name in plans:
        if name == "adam":
            continue
        r = results[name]
        ttt_r = r["time_to_target"]
        comparison["runs"][name] = {
            "rlekf_over_adam_step_time": r["s_per_step"] / a["s_per_step"] if a["s_per_step"] else None,
            "time_to_target_ratio_rlekf_over_adam": (
                ttt_r["wall_s"] / ttt_a["wall_s"] if ttt_r["reached"] and ttt_a["wall_s"] else None
            ),
            "time_to_target_half_of_adam": bool(ttt_r["reached"] and ttt_r["wall_s"] <= 0.5 * ttt_a["wall_s"]),
        }
    natoms = data_spec.get("natoms", 32)
    fitting = ",".join(str(n) for n in (args.fitting or MODEL["fitting_net"]["neuron"]))
    title = (f"dp train, {args.system} {natoms} atoms (EMT), se_e2_a [25,50,100] + fitting [{fitting}], batch 1")
    report = {
        "benchmark": "RLEKF vs Adam, dp train (DeePMD-kit TF backend)",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "adam_steps": adam_steps, "rlekf_steps": rlekf_steps, "quick": args.quick,
            "reparse_only": args.reparse, "only": args.only, "system": args.system, "size": args.size,
            "fitting": args.fitting or MODEL["fitting_net"]["neuron"],
            "axis_neuron": args.axis_neuron or MODEL["descriptor"]["axis_neuron"],
            "decay_steps": decay_steps, "blocksize": args.blocksize, "seed": args.seed,
            "data": data_spec, "env": env, "inputs": inputs,
            "validation_note": (
                "validation_data batch_size 1, numb_btch = nvalid: DeePMD-kit draws numb_btch "
                "sequential batches from a reshuffled epoch of the validation system, so each "
                "display evaluates every validation frame exactly once; the reported RMSE is the "
                "mean of the per-frame RMSEs (atom-weighted), not the RMSE pooled over frames"
            ),
            "wall_time_note": (
                "wall_s: timestamp of the 'Batch N: val:' log line minus that of step 0's; "
                "includes validation, excludes process start-up and graph building"
            ),
        },
        "machine": machine_info(args.threads),
        "results": results,
        "comparison": comparison,
    }
    (out / "rlekf_vs_adam.json").write_text(json.dumps(report, indent=1))
    plot(results, target, out / "rlekf_vs_adam.png", title, args.blocksize)

    names = list(plans)
    fmt = lambda t: f"{t['wall_s']:.1f} s @{t['step']}" if t["reached"] else "not reached"
    rows = [
        ("steps", lambda r: f"{r['steps']:d}"),
        ("s/step (pure)", lambda r: f"{r['s_per_step']:.4f}"),
        ("s/step (wall, incl. valid.)", lambda r: f"{r['wall_s_per_step_incl_validation']:.4f}"),
        ("final rmse_f_val (eV/A)", lambda r: f"{r['final_rmse_f_val']:.4g}"),
        ("time to Adam's final", lambda r: fmt(r["time_to_target"])),
        ("training wall (s)", lambda r: f"{r['train_wall_s']:.1f}"),
        ("peak RSS (MB)", lambda r: f"{r['peak_rss_MB'] or float('nan'):.1f}"),
        ("P memory (MB)", lambda r: f"{r.get('P_MB', float('nan')):.1f}"),
        ("Spearman at 1200 K", lambda r: f"{r['hot_1200K']['spearman_max_atom_kpu_vs_max_error']:.3f}"
         if "hot_1200K" in r else ""),
    ]
    print()
    for name in names:
        print(f"{run_label(name, args.blocksize)}")
        for label, cell in rows:
            print(f"  {label:28s} {cell(results[name])}")
    for name, c in comparison["runs"].items():
        ratio = c["time_to_target_ratio_rlekf_over_adam"]
        print(f"{name}: time to Adam's final RMSE / Adam's = {ratio if ratio is None else round(ratio, 3)}")
    print(f"\nwrote {out / 'rlekf_vs_adam.json'} and {out / 'rlekf_vs_adam.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
