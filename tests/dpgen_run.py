"""Helpers that run a real `alkpu run` (DP-GEN in kpu mode) in a fresh directory.

Used by the session fixture ``finished_run`` (conftest.py) and by test_alkpu_run.py.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import dpdata

from .conftest import QUIET_ENV
from .test_dpgen_params import PARAM

ALKPU = str(Path(sys.executable).parent / "alkpu")


def make_workdir(root: Path, *, substitute: dict | None = None, type_map: list | None = None,
                 descriptor: dict | None = None, fitting_net: dict | None = None, **changes) -> Path:
    """A DP-GEN run directory on fcc Cu-32: 20 EMT frames at 300 K, the lattice as POSCAR,
    test_dpgen_params.PARAM in kpu mode with short training and exploration, a Shell machine.

    ``substitute`` (e.g. ``{"Ni": 0.5}``) makes it a random alloy (data and POSCAR share the
    species of every site) with ``type_map`` (default: Cu, then the substitutes) and its masses;
    ``descriptor`` / ``fitting_net`` update those keys of the model; other keywords replace
    top-level keys of param.json (None: leave the key out).
    """
    from ase.data import atomic_masses, atomic_numbers

    from alkpu_plugin.reference import fcc_cell, md_frames

    root.mkdir(parents=True, exist_ok=True)
    type_map = list(type_map or ["Cu", *(substitute or {})])
    init = md_frames(300, 20, seed=1, substitute=substitute, type_map=type_map)
    init.to("deepmd/npy", str(root / "data" / "init"))
    (root / "confs").mkdir()
    lattice = fcc_cell("Cu", 2)
    if substitute:  # md_frames keeps the lattice's atom order: the data's species, site by site
        lattice.set_chemical_symbols([init["atom_names"][t] for t in init["atom_types"]])
    poscar = dpdata.System(lattice, fmt="ase/structure")
    poscar.sort_atom_names(type_map=type_map)
    poscar.to("vasp/poscar", str(root / "confs" / "POSCAR"))
    p = copy.deepcopy(PARAM)
    if type_map != PARAM["type_map"]:
        p["type_map"] = type_map
        p["mass_map"] = [round(float(atomic_masses[atomic_numbers[e]]), 3) for e in type_map]
    p["default_training_param"]["model"]["descriptor"].update(descriptor or {})
    p["default_training_param"]["model"]["fitting_net"].update(fitting_net or {})
    p["uncertainty"] = "kpu"
    p["check_interval"] = 2  # dpdispatcher polls every 2 s instead of 30 (jobs here take seconds)
    p["default_training_param"]["training"].update({"numb_steps": 50, "disp_freq": 25, "save_freq": 50})
    p["fp_params"] = {"input_fmt": "deepmd/npy", "input_fn": "input",
                      "output_fmt": "deepmd/npy", "output_fn": "labelled"}
    p["model_devi_f_trust_lo"], p["model_devi_f_trust_hi"] = 0.02, 50.0
    p["model_devi_jobs"][0]["nsteps"] = 50
    p.update(changes)
    p = {k: v for k, v in p.items() if v is not None}  # None: leave the key out
    (root / "param.json").write_text(json.dumps(p, indent=1))

    def machine(command):
        return {"command": command,
                "machine": {"batch_type": "Shell", "context_type": "LocalContext", "local_root": "./",
                            "remote_root": str(root / "remote")},
                "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "group_size": 1}}

    (root / "remote").mkdir()
    (root / "machine.json").write_text(json.dumps(
        {"api_version": "1.0", "train": machine("dp"), "model_devi": machine("lmp"),
         "fp": machine("alkpu label -i input -o labelled")}, indent=1))
    return root


def alkpu_run(root, **kw):
    return subprocess.Popen([ALKPU, "run", "param.json", "machine.json"], cwd=root,
                            env={**os.environ, **QUIET_ENV, "TF_CPP_MIN_LOG_LEVEL": "3",
                                 # the jobs' shells find dp, lmp and alkpu of this environment
                                 "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def records(root):
    path = Path(root) / "record.dpgen"
    return [tuple(map(int, ln.split())) for ln in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------ kills and their comparison
def kalman_arrays(path):
    """Every array of a Kalman state file (meta decoded as JSON)."""
    import numpy as np

    with np.load(path) as d:
        out = {k: d[k] for k in d.files if k != "meta"}
        out["meta"] = json.loads(bytes(d["meta"]).decode())
    return out


def run_outcome(root):
    """What a finished run must reproduce: record.dpgen, every model_devi.out, every iteration's
    Kalman state, the training data made by post_fp (relative path -> content)."""
    import numpy as np

    root = Path(root)
    out = {"record.dpgen": (root / "record.dpgen").read_text()}
    for p in sorted(root.glob("iter.*/01.model_devi/task.*/model_devi.out")):
        out[str(p.relative_to(root))] = np.loadtxt(p, ndmin=2)
    for p in sorted(root.glob("iter.*/00.train/kalman.000.npz")):
        out[str(p.relative_to(root))] = kalman_arrays(p)
    for p in sorted(root.glob("iter.*/02.fp/data.*/**/*")):
        if p.is_file():
            out[str(p.relative_to(root))] = np.load(p) if p.suffix == ".npy" else p.read_text()
    return out


def outcome_differences(a, b, rtol=0.0, atol=0.0):
    """Names of the entries of two run_outcome()s that differ (beyond rtol/atol for numbers)."""
    import numpy as np

    def same(x, y):
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, np.ndarray) and x.dtype.kind in "fc":
            return x.shape == np.shape(y) and np.allclose(x, y, rtol=rtol, atol=atol)
        if isinstance(x, np.ndarray):
            return np.array_equal(x, y)
        return x == y

    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or not same(a[k], b[k])]


def max_difference(a, b):
    """The largest absolute and relative difference between the float arrays of two outcomes."""
    import numpy as np

    worst = [0.0, 0.0]

    def walk(x, y):
        if isinstance(x, dict):
            for k in x:
                if k in y:
                    walk(x[k], y[k])
        elif isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.shape == np.shape(y):
            d = np.abs(x - y)
            if d.size:
                worst[0] = max(worst[0], float(d.max()))
                worst[1] = max(worst[1], float((d / np.maximum(np.abs(x), 1e-300)).max()))

    for k in set(a) & set(b):
        walk(a[k], b[k])
    return tuple(worst)


GUARD = """#!/bin/sh
# a job's command, refused when another copy runs in the same directory (the lock dies with it)
exec 9>>.alkpu-test-running
if ! flock -n 9; then echo "$PWD" >> "{duplicates}"; exit 1; fi
"$@"
"""


def guard_commands(root: Path, duplicates: Path) -> None:
    """Run every job's command of machine.json through GUARD: a second copy of a job in one
    directory while the first runs is refused and written to ``duplicates``."""
    guard = root / "guard.sh"
    guard.write_text(GUARD.format(duplicates=duplicates))
    machine = json.loads((root / "machine.json").read_text())
    for step in ("train", "model_devi", "fp"):
        machine[step]["command"] = f"sh {guard} {machine[step]['command']}"
    (root / "machine.json").write_text(json.dumps(machine, indent=1))


def _stages_done(root):
    path = Path(root) / "alkpu-stages.jsonl"
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done.add((rec["iter"], rec["stage"]))
            except (ValueError, KeyError):
                pass
    return done


def _remote_has(root, pattern, contains=None):
    for p in (Path(root) / "remote").glob(pattern):
        if contains is None:
            return True
        try:
            if contains in p.read_text(errors="replace"):
                return True
        except OSError:
            pass
    return False


def _last(root):
    done = records(root)
    return done[-1] if done else None


#: moments of a one-exploration kpu run (iteration 0 whole, iteration 1's reuse training), in the
#: order they come: (name, kind, the last line of record.dpgen, what else shows the moment, longest
#: extra delay in s). A moment the polling missed counts as reached once the record is past it.
MOMENTS = [
    ("training 0", "training", (0, 0), lambda r: _remote_has(r, "*/000/lcurve.out"), 1.0),
    ("training 0 after its checkpoint", "training", (0, 0),
     lambda r: _remote_has(r, "*/000/model.ckpt-25.kalman.npz") and _remote_has(r, "*/000/model.ckpt.index"), 0.3),
    ("after run_train 0", "between", (0, 1), None, 0.3),
    ("calibration 0", "kpu", (0, 1), lambda r: (0, "post_train") in _stages_done(r), 1.0),
    ("after post_train 0", "between", (0, 2), None, 0.3),
    ("LAMMPS 0", "exploration", (0, 3), lambda r: _remote_has(r, "*/task.*/log.lammps"), 1.0),
    ("KPU 0", "kpu", (0, 3), lambda r: _remote_has(r, "*/task.*/log.lammps", "Total wall time"), 1.5),
    ("after run_model_devi 0", "between", (0, 4), None, 0.3),
    ("after make_fp 0", "between", (0, 6), None, 0.3),
    ("labelling 0", "labelling", (0, 6), lambda r: _remote_has(r, "*/task.*/labelled"), 1.0),
    ("after post_fp 0", "between", (0, 8), None, 0.3),
    ("training 1", "training", (1, 0), lambda r: _remote_has(r, "*/000/lcurve.out"), 2.0),
    ("calibration 1", "kpu", (1, 1), lambda r: (1, "post_train") in _stages_done(r), 1.0),
]


def _reached(root, at, extra):
    last = _last(root)
    if last is None:
        return False
    return last > at or (last == at and (extra is None or extra(root)))


#: always in the schedule, killing the whole group: the training job dies after a checkpoint, so
#: it is run again with DP-GEN's `dp train --restart` (the run needs "save_freq" below numb_steps)
CHECKPOINT_KILL = "training 0 after its checkpoint"


def kill_schedule(seed: int, n: int = 10):
    """``n`` of MOMENTS (in run order: CHECKPOINT_KILL and n - 1 drawn), each with a delay and
    whether the driver's whole process group is killed (its jobs too) or the driver alone (its
    jobs run on, orphaned)."""
    import random

    rng = random.Random(seed)
    forced = next(i for i, m in enumerate(MOMENTS) if m[0] == CHECKPOINT_KILL)
    others = [i for i in range(len(MOMENTS)) if i != forced]
    picked = sorted([forced, *rng.sample(others, n - 1)])
    return [(name, kind, at, extra, rng.uniform(0, most), name != CHECKPOINT_KILL and rng.random() < 0.3)
            for name, kind, at, extra, most in (MOMENTS[i] for i in picked)]


def run_with_kills(root, schedule, timeout=900, watch=None):
    """Run `alkpu run` in ``root``, SIGKILL it at every moment of ``schedule``, start it again each
    time (the same command), then let it finish. Returns what each kill hit (with the mtime of the
    file ``watch``, when it exists) and the last output."""
    import signal
    import time

    log = []
    deadline = time.time() + timeout
    proc = alkpu_run(root)
    for name, kind, at, extra, delay, driver_only in schedule:
        while not _reached(root, at, extra):
            if proc.poll() is not None:  # it finished (or failed) before this moment
                out = proc.stdout.read()
                raise AssertionError(f"the run ended before the moment {name!r} ({proc.returncode}):\n{out[-4000:]}")
            assert time.time() < deadline, f"moment {name!r} not reached"
            time.sleep(0.05)
        time.sleep(delay)
        at = _last(root)
        if driver_only:
            os.kill(proc.pid, signal.SIGKILL)  # its jobs run on
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.append({"moment": name, "kind": kind, "record": at, "delay_s": round(delay, 2),
                    "driver_only": driver_only,
                    "watched_mtime": watch.stat().st_mtime_ns if watch is not None and watch.exists() else None})
        proc = alkpu_run(root)
    out, _ = proc.communicate(timeout=max(60, deadline - time.time()))
    assert proc.returncode == 0, out[-5000:]
    return log, out


FAIL = """#!/bin/sh
# fail.sh once|while MARKER COMMAND...: fail (exit 3) once and remove MARKER, or fail while MARKER exists
mode=$1; marker=$2; shift 2
if [ -e "$marker" ]; then
  [ "$mode" = once ] && rm -f "$marker"
  echo "simulated failure ($mode $marker)" >&2
  exit 3
fi
exec "$@"
"""

LABEL_SOME = """#!/bin/sh
# a labeller that gives no labels (and exits 0, as a DFT code that did not converge) in tasks *1
case "$(basename "$PWD")" in
  *1) echo "SCF did not converge (simulated)"; exit 0 ;;
esac
exec "$@"
"""


def wrap_command(root: Path, step: str, script: str, *args, retry_count: int | None = None) -> Path:
    """Put ``script`` (FAIL or LABEL_SOME) with ``args`` before machine.json's ``step`` command."""
    path = root / f"{step}-wrapper.sh"
    path.write_text(script)
    machine = json.loads((root / "machine.json").read_text())
    machine[step]["command"] = " ".join(["sh", str(path), *map(str, args), machine[step]["command"]])
    if retry_count is not None:
        machine[step]["machine"]["retry_count"] = retry_count
    (root / "machine.json").write_text(json.dumps(machine, indent=1))
    return path
