"""Benchmark: the time of one Kalman update (``KalmanFilter.update``) on real model layouts.

The layouts are those ``dp train`` builds for three se_e2_a + fitting models (the weight count and
blocks come from ``alkpu_plugin.dpgen.model_size``, which equals the trainer's layout), with P at
the blocksize and storage type ``"auto"`` gives them:

* ``cu32``: embedding [25, 50, 100], axis_neuron 16, fitting [50, 50, 50], one species:
  91,751 weights, 98 blocks of <= 1024, float64 (0.74 GB), and float32 for comparison;
* ``cuni``: the same with two species: 196,402 weights, 1024, float32 (0.79 GB);
* ``dpgen``: fitting [240, 240, 240], axis_neuron 12, one species: 411,091 weights, 809 blocks of
  <= 512, float32 (0.84 GB).

Each case makes ``--warmup`` updates with random gradients and then times ``--updates`` more (so
that the deferred downdates are applied as often as in training), ``--repeats`` times; the best
and the median of the repeats are reported in ms per update. ``--compare REV`` also times the
filter of that git revision (``alkpu_plugin/kalman/ekffm.py`` read with ``git show``) on the same
gradients, and checks that both return the same increments to float32 round-off.

    python benchmarks/bench_kalman_update.py                      # about 1 minute on 2 cores
    python benchmarks/bench_kalman_update.py --compare 8880f3c    # against an earlier filter

Output: ``benchmarks/out/kalman_update/kalman_update.json`` and a markdown table on stdout.
Run it on an otherwise idle machine: the update is bound by memory bandwidth.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alkpu_plugin.dpgen.model_size import model_tensors  # noqa: E402
from alkpu_plugin.kalman import ekffm  # noqa: E402
from alkpu_plugin.kalman.layout import BlockLayout  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "kalman_update"


def _model(type_map, fitting, axis):
    return {"type_map": type_map,
            "descriptor": {"type": "se_e2_a", "sel": [60] * len(type_map), "rcut_smth": 0.5, "rcut": 5.0,
                           "neuron": [25, 50, 100], "axis_neuron": axis},
            "fitting_net": {"neuron": fitting}}


# name: (model, blocksize, p_dtype)
CASES = {
    "cu32": (_model(["Cu"], [50, 50, 50], 16), 1024, "float64"),
    "cu32-f32": (_model(["Cu"], [50, 50, 50], 16), 1024, "float32"),
    "cuni": (_model(["Cu", "Ni"], [50, 50, 50], 16), 1024, "float32"),
    "dpgen": (_model(["Cu"], [240, 240, 240], 12), 512, "float32"),
    "dpgen-1024": (_model(["Cu"], [240, 240, 240], 12), 1024, "float32"),
}


def _module_at(rev: str):
    """ekffm.py of git revision ``rev``, imported under its own name."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:alkpu_plugin/kalman/ekffm.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "ekffm_rev.py"
    path.write_text(text.replace("from .layout import", "from alkpu_plugin.kalman.layout import"))
    spec = importlib.util.spec_from_file_location("alkpu_plugin.kalman._ekffm_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def time_updates(module, layout, p_dtype, warmup, updates, repeats, seed=0):
    kf = module.KalmanFilter(layout, module.FilterOptions(p_dtype=p_dtype, lambda1=0.95))
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=layout.n) * 0.01 for _ in range(8)]
    for i in range(warmup):
        kf.update(grads[i % 8], 0.1)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        for i in range(updates):
            delta = kf.update(grads[i % 8], 0.1)
        times.append((time.perf_counter() - tic) / updates)
    return times, delta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--updates", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", metavar="REV", help="also time the filter of this git revision")
    args = ap.parse_args(argv)
    other = _module_at(args.compare) if args.compare else None
    rows = []
    for name in args.cases.split(","):
        model, blocksize, p_dtype = CASES[name]
        layout = BlockLayout.build(model_tensors(model, model["type_map"]), blocksize)
        p_gb = layout.nbytes_p * np.dtype(p_dtype).itemsize / 1e9
        row = {"case": name, "weights": layout.n, "blocks": len(layout.blocks), "blocksize": blocksize,
               "p_dtype": p_dtype, "p_gb": round(p_gb, 3)}
        times, delta = time_updates(ekffm, layout, p_dtype, args.warmup, args.updates, args.repeats)
        row["ms_best"], row["ms_median"] = 1e3 * min(times), 1e3 * float(np.median(times))
        if other is not None:
            t2, d2 = time_updates(other, layout, p_dtype, args.warmup, args.updates, args.repeats)
            row["compare"] = args.compare
            row["compare_ms_best"], row["compare_ms_median"] = 1e3 * min(t2), 1e3 * float(np.median(t2))
            row["max_rel_diff"] = float(np.abs(delta - d2).max() / np.abs(d2).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "kalman_update.json").write_text(json.dumps(rows, indent=1))
    head = "| case | weights | blocks | P | ms/update, best (median) |"
    sep = "| --- | ---: | ---: | --- | ---: |"
    if other is not None:
        head += f" at {args.compare} | max. rel. difference |"
        sep += " ---: | ---: |"
    print("\n" + head + "\n" + sep)
    for r in rows:
        line = (f"| {r['case']} | {r['weights']:,} | {r['blocks']} (≤ {r['blocksize']}) | "
                f"{r['p_gb']:.2f} GB {r['p_dtype']} | {r['ms_best']:.1f} ({r['ms_median']:.1f}) |")
        if other is not None:
            line += f" {r['compare_ms_best']:.1f} ({r['compare_ms_median']:.1f}) | {r['max_rel_diff']:.1e} |"
        print(line)


if __name__ == "__main__":
    main()
