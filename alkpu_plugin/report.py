"""`alkpu report RUN_DIR`: what an active-learning run did, round by round.

Reads a DP-GEN run directory (``alkpu run`` or ``dpgen run``: ``param.json``,
``record.dpgen``, ``iter.*/``) and writes, into one folder:

* ``report.json``: every number (built first; the page and the figures are
  rendered from this data only),
* a self-contained ``index.html`` (figures embedded) that leads with a
  summary: a few sentences, the Table-2 rows and the figure of validation
  force RMSE per round beside the frames labelled per round; then the
  calibration, the histograms of the selection values and the cost, with the
  long tables folded away; ``index.md`` holds the same tables unfolded,
* PNG figures: that summary figure, observed vs predicted force error per KPU
  decile, histograms of the selection values (column 4 of ``model_devi.out``)
  with the trust levels on one shared axis, energy and force RMSE per round.

Per round (the paper's Table 2): temperatures, frames explored (rows of all
``model_devi.out``), reliable / selected / discarded (DP-GEN's
``rest_accurate`` / ``candidate`` / ``rest_failed`` files), labelled (``02.fp``
task directories). Validation: each subdirectory of ``RUN_DIR/validation`` (or
``--validation DIR``) is a labelled system named after its temperature
(``1200K/``); every round's ``graph.000.pb`` is evaluated on it with DeePMD's
``DeepPot``.

This module reads files only; it imports nothing of the driver.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np

from .model_devi import OUT_OF_DOMAIN, raised_frames
from .runfiles import STAGES_FILE, STEP_NAMES, TIMING_FILE, count_lines

__all__ = [
    "ReportError", "build_report", "write_report", "stage_times", "fmt",
    "plot_progress", "plot_histograms", "plot_validation", "plot_calibration", "render_markdown",
    "render_html", "write_pages", "FIGURES",
]

CATEGORIES = ("training", "md", "uncertainty", "labelling")
STAGE_CATEGORY = {
    "make_train": "training", "run_train": "training", "post_train": "training",
    "kpu_calibration": "uncertainty",
    "make_model_devi": "md", "run_model_devi": "md", "post_model_devi": "md",
    "make_fp": "labelling", "run_fp": "labelling", "post_fp": "labelling",
}
FIGURES = {
    "progress": "progress.png",
    "histograms": "kpu_histograms.png",
    "validation": "validation_rmse.png",
    "calibration": "calibration.png",
}
OWN_FILES = ("report.json", "index.md", "index.html", *FIGURES.values())


class ReportError(ValueError):
    """A run directory (or option) the report cannot use; the message names the fix."""


def fmt(value) -> str:
    """A number as the page shows it (the tests format report.json's numbers with this too)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------- reading
def _iter_name(ii: int) -> str:
    return f"iter.{ii:06d}"


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _check_run_dir(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory; pass the directory in which "
                          "`alkpu run param.json machine.json` ran")
    missing = [name for name in ("param.json", "record.dpgen") if not (run_dir / name).is_file()]
    if missing:
        fix = ("pass the directory in which `alkpu run param.json machine.json` (or `dpgen run`) ran"
               if len(missing) == 2 or "record.dpgen" in missing else
               "copy the param file given to `alkpu run` there under the name param.json")
        raise ReportError(f"{run_dir} is not a DP-GEN run directory ({' and '.join(missing)} "
                          f"missing); {fix}")
    try:
        return json.loads((run_dir / "param.json").read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{run_dir / 'param.json'} is not valid JSON ({exc}); the report reads "
                          "the param.json that `alkpu run` ran with") from exc


def _record(run_dir: Path) -> tuple[int, int] | None:
    lines = [ln.split() for ln in (run_dir / "record.dpgen").read_text().splitlines() if ln.strip()]
    return (int(lines[-1][0]), int(lines[-1][1])) if lines else None


def _iterations(run_dir: Path) -> list[int]:
    out = []
    for p in run_dir.glob("iter.*"):
        m = re.fullmatch(r"iter\.(\d+)", p.name)
        if m and p.is_dir():
            out.append(int(m.group(1)))
    return sorted(out)


def _level(value, systems: list[int]) -> list[float]:
    """DP-GEN's trust level for the round's systems (a number, a list or a dict per system)."""
    if value is None:
        return []
    if isinstance(value, list):
        vals = [value[s] for s in systems if s < len(value)] if systems else value
    elif isinstance(value, dict):
        vals = [value[str(s)] for s in systems if str(s) in value] if systems else list(value.values())
    else:
        vals = [value]
    return sorted({float(v) for v in vals})


def _selection(param: dict) -> dict:
    """What column 4 of model_devi.out holds, and where the trust levels come from."""
    mode = param.get("uncertainty", "committee")
    kpu = param.get("kpu") or {}
    if mode == "kpu":
        if kpu.get("select_hook"):
            return {"uncertainty": mode, "trust": kpu.get("trust", "calibrated"),
                    "quantity": f"value of select_hook {kpu['select_hook']}", "unit": ""}
        if kpu.get("trust") == "relative":
            return {"uncertainty": mode, "trust": "relative",
                    "quantity": "frame force KPU / KPU_train", "unit": ""}
        return {"uncertainty": mode, "trust": "calibrated",
                "quantity": "max per-atom force uncertainty (calibrated KPU)", "unit": "eV/Å"}
    return {"uncertainty": "committee", "trust": "committee",
            "quantity": "max force deviation of the committee", "unit": "eV/Å"}


def _trust(param: dict, selection: dict, cur_job: dict, systems: list[int]) -> tuple[list, list]:
    if selection["trust"] == "relative":
        kpu = param.get("kpu") or {}
        return _level(kpu.get("eps_lo"), []), _level(kpu.get("eps_hi"), [])
    lo = cur_job.get("model_devi_f_trust_lo")
    hi = cur_job.get("model_devi_f_trust_hi")
    lo = param.get("model_devi_f_trust_lo") if lo is None else lo
    hi = param.get("model_devi_f_trust_hi") if hi is None else hi
    return _level(lo, systems), _level(hi, systems)


def _histogram(values: np.ndarray) -> dict | None:
    n = values.size
    if n == 0:
        return None
    nbins = int(min(40, max(8, math.ceil(2 * n ** (1 / 3)))))
    log = bool(np.all(values > 0))
    below = 0
    lo, hi = float(values.min()), float(values.max())
    if log:
        # values far below the bulk (e.g. ~1e-15 for an unperturbed start frame, whose forces
        # vanish by symmetry) are counted apart instead of stretching the log axis
        floor = float(np.median(values)) * 1e-3
        if lo < floor:
            below = int((values < floor).sum())
            lo = float(values[values >= floor].min())
        if lo == hi:
            lo, hi = lo / 1.5, hi * 1.5
        edges = np.logspace(math.log10(lo), math.log10(hi), nbins + 1)
        edges[0], edges[-1] = lo, hi
    else:
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, nbins + 1)
        edges[0], edges[-1] = min(lo, values.min()), max(hi, values.max())  # no value falls outside
    counts, _ = np.histogram(values[values >= edges[0]], bins=edges)
    return {"log_x": log, "bin_edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "below": below}


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _round(run_dir: Path, ii: int, param: dict, selection: dict, record) -> dict:
    it = run_dir / _iter_name(ii)
    train, md, fp = it / "00.train", it / "01.model_devi", it / "02.fp"
    jobs = param.get("model_devi_jobs") or []
    cur_job = (_load_json(md / "cur_job.json") if (md / "cur_job.json").is_file() else None) or (
        jobs[ii] if ii < len(jobs) else {})
    temps = cur_job.get("temps")
    notes = []

    # status, from record.dpgen
    if record is None or ii > record[0]:
        status, last_step = "in progress", None
    elif ii < record[0] or record[1] == len(STEP_NAMES) - 1:
        status, last_step = "complete", STEP_NAMES[-1]
    else:
        last_step = STEP_NAMES[record[1]]
        status = "stopped" if ii >= len(jobs) and record[1] >= 2 else "in progress"
    if status == "in progress":
        notes.append(f"iteration {ii} is in progress (last finished step: {last_step or 'none'}); "
                     "it is reported up to what exists")
    elif status == "stopped":
        notes.append(f"iteration {ii}: training only (model_devi_jobs has no job {ii}, so the run "
                     f"ended after {last_step})")

    # exploration
    tasks = sorted(p for p in md.glob("task.*") if p.is_dir()) if md.is_dir() else []
    outs = [t / "model_devi.out" for t in tasks if (t / "model_devi.out").is_file()]
    systems = sorted({int(t.name.split(".")[1]) for t in tasks if t.name.count(".") >= 2
                      and t.name.split(".")[1].isdigit()})
    if tasks and len(outs) < len(tasks):
        notes.append(f"iteration {ii}: {len(tasks) - len(outs)} of {len(tasks)} exploration tasks "
                     "have no model_devi.out yet")
    values = None
    if outs:
        columns = []
        for p in outs:
            try:
                table = np.loadtxt(p, ndmin=2)
            except ValueError:  # a line being written (LAMMPS appends while it runs)
                notes.append(f"iteration {ii}: {p.relative_to(run_dir)} could not be read; left out")
                continue
            if table.size:
                columns.append(table[:, 4])
        values = np.concatenate(columns) if columns else np.zeros(0)
    explored = int(values.size) if values is not None else None
    # frames outside the model's domain carry a sentinel, not an uncertainty: counted apart,
    # with the reasons the KPU engine recorded in kpu.npz
    outside, outside_reasons = None, []
    if values is not None:
        inside = values < OUT_OF_DOMAIN
        outside = int((~inside).sum())
        values = values[inside]
        for t in tasks:
            if outside and (t / "kpu.npz").is_file() and len(outside_reasons) < 3:
                try:
                    with np.load(t / "kpu.npz") as d:
                        reasons = json.loads(bytes(d["meta"]).decode()).get("domain") or []
                except (OSError, ValueError, KeyError):
                    continue
                outside_reasons += [f"{t.name}: {r}" for r in reasons if r][: 3 - len(outside_reasons)]
        if outside:
            notes.append(f"iteration {ii}: {outside} explored frame(s) outside the model's domain, counted "
                         "as failed" + (f" (e.g. {outside_reasons[0]})" if outside_reasons else ""))

    # frames made candidates because their KPU lay beyond the calibrated range (kpu/extrapolation)
    beyond = None
    if outs:
        beyond = 0
        for p in outs:
            try:
                beyond += raised_frames(p)
            except OSError:
                pass
        if beyond:
            notes.append(f"iteration {ii}: {beyond} explored frame(s) beyond the calibrated KPU range counted as "
                         "candidates (kpu/extrapolation)")

    # DP-GEN's selection and the labelled tasks
    counts = {}
    for key, stem in (("reliable", "rest_accurate"), ("selected", "candidate"), ("discarded", "rest_failed")):
        files = sorted(fp.glob(f"{stem}.shuffled.*.out")) if fp.is_dir() else []
        counts[key] = count_lines(files) if files else None
    labelled = (len([p for p in fp.glob("task.*") if p.is_dir()])
                if fp.is_dir() and counts["selected"] is not None else None)

    lo, hi = _trust(param, selection, cur_job, systems)
    model = train / "graph.000.pb"
    calibration = _load_json(train / "kalman.000.calibration.json")
    if calibration is not None:
        calibration = {k: calibration[k] for k in ("a", "b", "n_atoms", "fitted_on", "deciles")
                       if k in calibration}
    kpu_train = _load_json(train / "kalman.000.kpu_train.json")
    stats = None
    if values is not None and values.size:
        stats = {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}
    return {
        "iteration": ii, "status": status, "last_step": last_step,
        "temps": [float(t) for t in temps] if temps else None,
        "frames_explored": explored, "exploration_tasks": len(tasks),
        "outside_domain": outside, "outside_domain_examples": outside_reasons,
        "beyond_calibration": beyond,
        **counts, "labelled": labelled,
        "trust_lo": lo, "trust_hi": hi,
        "values": stats,
        "histogram": _histogram(values) if values is not None else None,
        "model": str(model.relative_to(run_dir)) if model.exists() else None,
        "calibration": calibration, "kpu_train": kpu_train,
        "notes": notes,
    }


# ------------------------------------------------------------ stage times
def stage_times(run_dir) -> dict:
    """CPU and wall seconds per iteration and category, from ``alkpu-stages.jsonl``.

    Categories: training (make/run/post_train), md (the model_devi steps less the
    KPU part of the exploration tasks, from their ``alkpu_timing.json``),
    uncertainty (kpu_calibration plus that KPU part), labelling (the fp steps).
    With tasks run in parallel, the KPU wall time is counted as its share of
    the run_model_devi step. Returns ``{}`` when the run has no stage log.
    """
    run_dir = Path(run_dir)
    path = run_dir / STAGES_FILE
    if not path.is_file():
        return {}
    per_iter: dict[int, dict] = {}
    stages: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            ii, name = int(rec["iter"]), str(rec["stage"])
            cpu, wall = float(rec.get("cpu_s", 0.0)), float(rec.get("wall_s", 0.0))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
        cat = STAGE_CATEGORY.get(name, "other")
        row = per_iter.setdefault(ii, {c: {"cpu_s": 0.0, "wall_s": 0.0} for c in CATEGORIES})
        row.setdefault(cat, {"cpu_s": 0.0, "wall_s": 0.0})
        row[cat]["cpu_s"] += cpu
        row[cat]["wall_s"] += wall
        st = stages.setdefault(ii, {})
        st[name] = {"cpu_s": st.get(name, {}).get("cpu_s", 0.0) + cpu,
                    "wall_s": st.get(name, {}).get("wall_s", 0.0) + wall}
    iterations = []
    for ii in sorted(per_iter):
        row = per_iter[ii]
        timings = [t for t in (_load_json(p) for p in
                               sorted((run_dir / _iter_name(ii) / "01.model_devi").glob(f"task.*/{TIMING_FILE}")))
                   if isinstance(t, dict)]
        kpu_cpu = sum(float(t.get("kpu_cpu_s", 0.0)) for t in timings)
        kpu_wall = sum(float(t.get("kpu_wall_s", 0.0)) for t in timings)
        task_wall = sum(float(t.get("lmp_wall_s", 0.0)) + float(t.get("kpu_wall_s", 0.0)) for t in timings)
        run_md_wall = stages.get(ii, {}).get("run_model_devi", {}).get("wall_s", 0.0)
        if task_wall > 0:
            kpu_wall = min(kpu_wall, run_md_wall * kpu_wall / task_wall)
        kpu_cpu = min(kpu_cpu, row["md"]["cpu_s"])
        kpu_wall = min(kpu_wall, row["md"]["wall_s"])
        row["md"]["cpu_s"] -= kpu_cpu
        row["md"]["wall_s"] -= kpu_wall
        row["uncertainty"]["cpu_s"] += kpu_cpu
        row["uncertainty"]["wall_s"] += kpu_wall
        total = {k: sum(v[k] for v in row.values()) for k in ("cpu_s", "wall_s")}
        iterations.append({"iteration": ii, **{c: {k: round(v, 3) for k, v in row[c].items()} for c in row},
                           "total": {k: round(v, 3) for k, v in total.items()},
                           "kpu_in_exploration": {"cpu_s": round(kpu_cpu, 3), "wall_s": round(kpu_wall, 3),
                                                  "tasks_timed": len(timings)}})
    cats = [c for c in (*CATEGORIES, "other") if any(c in it for it in iterations)]
    totals = {c: {k: round(sum(it[c][k] for it in iterations if c in it), 3) for k in ("cpu_s", "wall_s")}
              for c in (*cats, "total")}
    return {"source": STAGES_FILE, "categories": cats, "iterations": iterations, "total": totals}


# -------------------------------------------------------------- validation
def _temperature(name: str) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)\s*K", name) or re.search(r"(\d+(?:\.\d+)?)", name)
    return float(m.group(1)) if m else None


def _load_set(path: Path) -> list:
    """Labelled dpdata systems under one validation directory."""
    import dpdata

    systems = []
    for raw in sorted(path.rglob("type.raw")):
        systems.append(dpdata.LabeledSystem(str(raw.parent), fmt="deepmd/npy"))
    if not systems:
        fmts = {".hdf5": "deepmd/hdf5", ".h5": "deepmd/hdf5", ".xyz": "quip/gap/xyz", ".extxyz": "quip/gap/xyz"}
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in fmts):
            ms = dpdata.MultiSystems.from_file(str(f), fmt=fmts[f.suffix], labeled=True)
            systems.extend(ms.systems.values())
    systems = [s for s in systems if s.get_nframes() and "energies" in s.data and "forces" in s.data]
    if not systems:
        raise ReportError(f"validation set {path} holds no labelled system (energies and forces); "
                          "put a deepmd/npy system there, e.g. system.to('deepmd/npy', "
                          f"'{path}')")
    return systems


def _validation_sets(run_dir: Path, validation) -> tuple[Path | None, list[dict]]:
    if validation is None:
        root = run_dir / "validation"
        if not root.is_dir():
            return None, []
    else:
        root = Path(validation)
        if not root.is_dir():
            raise ReportError(f"--validation {root}: no such directory; it should hold one labelled "
                              "system per temperature, e.g. DIR/300K/, DIR/1200K/ (deepmd/npy)")
    sets = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        systems = _load_set(sub)
        sets.append({"name": sub.name, "path": str(sub), "temperature": _temperature(sub.name),
                     "frames": int(sum(s.get_nframes() for s in systems)),
                     "atoms": sorted({int(s.get_natoms()) for s in systems}), "_systems": systems})
    if not sets:
        raise ReportError(f"validation directory {root} has no subdirectory; put one labelled system "
                          "per temperature there, e.g. 300K/ and 1200K/ (deepmd/npy)")
    sets.sort(key=lambda s: (s["temperature"] is None, s["temperature"] or 0.0, s["name"]))
    return root, sets


def _errors(dp, system) -> tuple[np.ndarray, np.ndarray]:
    """Per-atom energy errors (frames,) and force errors (frames*atoms*3,) of one system."""
    type_map = dp.get_type_map()
    names = system["atom_names"]
    try:
        atype = np.array([type_map.index(names[t]) for t in system["atom_types"]], dtype=int)
    except ValueError as exc:
        raise ReportError(f"validation system with elements {names}: an element is not in the "
                          f"model's type_map {type_map}") from exc
    nf, na = system.get_nframes(), system.get_natoms()
    cells = None if system.nopbc else system["cells"].reshape(nf, 9)
    e, f, _ = dp.eval(system["coords"].reshape(nf, -1), cells, atype)
    de = (np.asarray(e).reshape(nf) - system["energies"].reshape(nf)) / na
    df = np.asarray(f).reshape(nf, na, 3) - system["forces"].reshape(nf, na, 3)
    return de, df.ravel()


def _validate(run_dir: Path, rounds: list[dict], sets: list[dict]) -> list[dict]:
    if not sets:
        return []
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from deepmd.infer import DeepPot

    rows = []
    for rnd in rounds:
        if rnd["model"] is None:
            continue
        dp = DeepPot(str(run_dir / rnd["model"]))
        for s in sets:
            de, df = zip(*(_errors(dp, system) for system in s["_systems"]))
            de, df = np.concatenate(de), np.concatenate(df)
            rows.append({"iteration": rnd["iteration"], "set": s["name"], "temperature": s["temperature"],
                         "frames": int(de.size),
                         "energy_rmse_per_atom": float(np.sqrt(np.mean(de ** 2))),
                         "force_rmse": float(np.sqrt(np.mean(df ** 2)))})
        del dp
    return rows


# ------------------------------------------------------------------ report
def build_report(run_dir, validation=None) -> dict:
    """Every number of the report, as written to report.json."""
    run_dir = Path(run_dir)
    param = _check_run_dir(run_dir)
    record = _record(run_dir)
    selection = _selection(param)
    rounds = [_round(run_dir, ii, param, selection, record) for ii in _iterations(run_dir)]
    notes = [n for r in rounds for n in r.pop("notes")]
    if not rounds:
        notes.append("no iteration directory yet (the run has not started its first step)")
    val_root, sets = _validation_sets(run_dir, validation)
    rmse = _validate(run_dir, rounds, sets)
    if val_root is None:
        notes.append("no validation sets: put labelled systems in RUN_DIR/validation/<T>K/ "
                     "(deepmd/npy) or pass --validation DIR")
    times = stage_times(run_dir)
    data = {
        "run_dir": str(run_dir.resolve()),
        "record": {"iteration": record[0], "step": STEP_NAMES[record[1]]} if record else None,
        "selection": selection,
        "rounds": rounds,
        "validation": {
            "dir": str(val_root) if val_root else None,
            "sets": [{k: v for k, v in s.items() if not k.startswith("_")} for s in sets],
            "rmse": rmse,
            "units": {"energy_rmse_per_atom": "eV/atom", "force_rmse": "eV/Å"},
        },
        "stage_times": times or None,
        "figures": {},
        "notes": notes,
    }
    # JSON round trip: the page and figures see exactly what report.json holds
    return json.loads(json.dumps(data))


# ----------------------------------------------------------------- figures
def _figure(nplots: int, ncols: int = 3, size=(4.2, 3.2), sharex: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, nplots))
    nrows = math.ceil(nplots / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = []
    for k in range(nplots):
        share = axes[0] if sharex and axes else None
        axes.append(fig.add_subplot(nrows, ncols, k + 1, sharex=share))
    return fig, axes


def _temps_text(temps) -> str:
    return "/".join(fmt(t) for t in temps) + " K" if temps else "–"


def _readable_log_axis(axis) -> None:
    """At most a handful of labelled ticks on a log axis (1, 2, 5 per decade when the range is
    short, whole decades otherwise), none on the minor ticks, so the labels never overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 else 99
    subs = (1.0, 2.0, 5.0) if decades < 2 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=6))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}" if 1e-3 <= v < 1e4 else f"{v:.0e}"))
    axis.set_minor_formatter(NullFormatter())


def _hot_set(data: dict) -> dict | None:
    """The validation set at the highest temperature (the last one when none has a temperature)."""
    sets = data["validation"]["sets"]
    if not sets:
        return None
    with_t = [s for s in sets if s["temperature"] is not None]
    return max(with_t, key=lambda s: s["temperature"]) if with_t else sets[-1]


def plot_progress(data: dict):
    """The loop at a glance: force RMSE per round on every validation set (the hottest drawn
    boldest) beside the frames labelled per round."""
    rounds = [r for r in data["rounds"] if r["labelled"] is not None or r["selected"] is not None]
    rows = data["validation"]["rmse"]
    if not rounds and not rows:
        return None
    fig, axes = _figure(2 if rows else 1, ncols=2, size=(4.8, 3.4))
    if rows:
        ax = axes[0]
        hot = _hot_set(data)
        for s in data["validation"]["sets"]:
            mine = sorted((r for r in rows if r["set"] == s["name"]), key=lambda r: r["iteration"])
            bold = hot is not None and s["name"] == hot["name"]
            ax.plot([r["iteration"] for r in mine], [r["force_rmse"] for r in mine], "o-",
                    label=s["name"], linewidth=2.5 if bold else 1.2, markersize=5 if bold else 3,
                    alpha=1.0 if bold else 0.6)
        ax.set_yscale("log")
        _readable_log_axis(ax.yaxis)
        ax.set_xlabel("iteration (model trained at its start)")
        ax.set_ylabel("validation force RMSE (eV/Å)")
        ax.set_title("did the error fall?", fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, title="validation set", title_fontsize=8)
    ax = axes[-1]
    its = [r["iteration"] for r in rounds]
    ax.bar(its, [r["selected"] or 0 for r in rounds], color="#c6d6ea", label="selected (candidates)")
    ax.bar(its, [r["labelled"] or 0 for r in rounds], color="#4c72b0", width=0.5, label="labelled")
    if its:
        ax.set_xticks(its, [f"{ii}\n{_temps_text(r['temps'])}" if r["temps"] else str(ii)
                            for ii, r in zip(its, rounds)], fontsize=7 if len(its) > 6 else 8)
    ax.set_xlabel("iteration and exploration temperature")
    ax.set_ylabel("frames")
    ax.set_title("where did the loop label?", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_histograms(data: dict):
    """One panel per explored round, on one shared x axis: counts per bin (bars) and the trust
    levels (vertical lines)."""
    rounds = [r for r in data["rounds"] if r["histogram"]]
    if not rounds:
        return None
    fig, axes = _figure(len(rounds), size=(4.0, 2.8), sharex=True)
    sel = data["selection"]
    for ax, r in zip(axes, rounds):
        h = r["histogram"]
        edges = np.array(h["bin_edges"])
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="#4c72b0",
               edgecolor="white", linewidth=0.5)
        if h["log_x"]:
            ax.set_xscale("log")
        for lo in r["trust_lo"]:
            ax.axvline(lo, color="#2ca02c", linestyle="--", label=f"trust lo {fmt(lo)}")
        for hi in r["trust_hi"]:
            ax.axvline(hi, color="#d62728", linestyle="--", label=f"trust hi {fmt(hi)}")
        if h.get("below"):
            ax.text(0.02, 0.97, f"{h['below']} frame(s) below {fmt(edges[0])} not drawn",
                    transform=ax.transAxes, fontsize=7, va="top")
        ax.set_title(f"iteration {r['iteration']}, {_temps_text(r['temps'])}: {r['frames_explored']} frames",
                     fontsize=9)
        unit = f" ({sel['unit']})" if sel["unit"] else ""
        ax.set_xlabel(sel["quantity"] + unit, fontsize=8)
        ax.set_ylabel("frames")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in axes:
        if ax.get_xscale() == "log":
            _readable_log_axis(ax.xaxis)
            break  # the x axis is shared: its locator and formatters too
    return fig


def plot_validation(data: dict):
    """Energy and force RMSE against the round, one line per validation set."""
    rows = data["validation"]["rmse"]
    if not rows:
        return None
    fig, (ax_e, ax_f) = _figure(2, ncols=2, size=(4.6, 3.4))
    for s in data["validation"]["sets"]:
        mine = sorted((r for r in rows if r["set"] == s["name"]), key=lambda r: r["iteration"])
        its = [r["iteration"] for r in mine]
        ax_e.plot(its, [r["energy_rmse_per_atom"] for r in mine], "o-", label=s["name"])
        ax_f.plot(its, [r["force_rmse"] for r in mine], "o-", label=s["name"])
    ax_e.set_ylabel("energy RMSE (eV/atom)")
    ax_f.set_ylabel("force RMSE (eV/Å)")
    for ax in (ax_e, ax_f):
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    return fig


def plot_calibration(data: dict):
    """Observed vs predicted RMS force error per KPU decile, one line per round, and y = x."""
    rounds = [r for r in data["rounds"] if r["calibration"] and r["calibration"].get("deciles")]
    if not rounds:
        return None
    fig, (ax,) = _figure(1, size=(4.8, 4.2))
    lo, hi = math.inf, -math.inf
    for r in rounds:
        d = r["calibration"]["deciles"]
        pred = [x["predicted_rms_error"] for x in d]
        obs = [x["observed_rms_error"] for x in d]
        ax.plot(pred, obs, "o-", label=f"iteration {r['iteration']}")
        lo, hi = min(lo, *pred, *obs), max(hi, *pred, *obs)
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", label="y = x")
    ax.set_xlabel("predicted RMS force error (eV/Å)")
    ax.set_ylabel("observed RMS force error (eV/Å)")
    ax.set_title("calibration per KPU decile of atoms", fontsize=9)
    ax.legend(fontsize=7, ncols=2 if len(rounds) > 5 else 1)
    return fig


PLOTS = {"progress": plot_progress, "calibration": plot_calibration, "histograms": plot_histograms,
         "validation": plot_validation}


# ------------------------------------------------------------------- pages
def _summary_text(data: dict) -> list[str]:
    """A few sentences: what ran, what it labelled, where the error went."""
    rounds = data["rounds"]
    explored = [r for r in rounds if r["frames_explored"] is not None]
    out = []
    if explored:
        labelled = sum(r["labelled"] or 0 for r in explored)
        temps = sorted({t for r in explored for t in (r["temps"] or [])})
        span = f" at {fmt(temps[0])}–{fmt(temps[-1])} K" if len(temps) > 1 else (
            f" at {fmt(temps[0])} K" if temps else "")
        with_labels = sum(1 for r in explored if r["labelled"])
        out.append(f"{len(explored)} exploration round(s){span}: "
                   f"{sum(r['frames_explored'] for r in explored)} frames explored, "
                   f"{sum(r['selected'] or 0 for r in explored)} selected, {labelled} labelled "
                   f"(in {with_labels} of the {len(explored)} rounds).")
    hot = _hot_set(data)
    if hot is not None:
        mine = sorted((r for r in data["validation"]["rmse"] if r["set"] == hot["name"]),
                      key=lambda r: r["iteration"])
        if mine:
            first, last = mine[0], mine[-1]
            out.append(f"Validation force RMSE on {hot['name']} ({hot['frames']} held-out frames): "
                       f"{fmt(first['force_rmse'])} eV/Å with the model of iteration {first['iteration']}, "
                       f"{fmt(last['force_rmse'])} eV/Å with that of iteration {last['iteration']}.")
    sel = data["selection"]
    out.append(f"Selection by {sel['quantity']} (uncertainty: {sel['uncertainty']}, trust: {sel['trust']}).")
    return out


def _sections(data: dict) -> list[dict]:
    """The report's sections in page order: id, title, header, rows (numbers formatted with fmt),
    figure key, and whether the page folds the table away (long tables, details)."""
    sel = data["selection"]
    out = []

    def add(key, title, header, rows, figure=None, folded=False, text=None):
        out.append({"id": key, "title": title, "header": header, "rows": rows, "figure": figure,
                    "folded": folded, "text": text})

    rows = [[fmt(r["iteration"]), _temps_text(r["temps"]), fmt(r["frames_explored"]), fmt(r["reliable"]),
             fmt(r["selected"]), fmt(r["discarded"]), fmt(r.get("outside_domain")), fmt(r["labelled"]),
             r["status"]] for r in data["rounds"]]
    add("rounds", "Rounds (Table 2)",
        ["iteration", "temperature", "explored", "reliable", "selected", "discarded",
         "outside domain", "labelled", "status"], rows, "progress",
        text="Reliable / selected / discarded are DP-GEN's accurate / candidate / failed frames; "
             "labelled are the candidates sent to the labeller (at most fp_task_max per round).")
    cal = [r for r in data["rounds"] if r["calibration"]]
    if cal:
        rows = [[fmt(r["iteration"]), fmt(r["calibration"].get("a")), fmt(r["calibration"].get("p", 1.0)),
                 fmt(r["calibration"].get("b")), fmt(r["calibration"].get("n_atoms")),
                 str(r["calibration"].get("fitted_on", "–"))] for r in cal]
        add("calibration", "KPU calibration |ΔF_i|² = a·KPU_i^p + b (eV²/Å²)",
            ["iteration", "a", "p", "b", "atoms", "fitted on"], rows, "calibration", folded=True,
            text="Points on the dotted line: the calibrated uncertainty predicts the observed error; "
                 "above it, the model is worse than its uncertainty says.")
    unit = f" ({sel['unit']})" if sel["unit"] else ""
    rows = [[fmt(r["iteration"]), fmt(r["frames_explored"]),
             fmt(r["values"]["min"]) if r["values"] else "–",
             fmt(r["values"]["median"]) if r["values"] else "–",
             fmt(r["values"]["max"]) if r["values"] else "–",
             ", ".join(fmt(v) for v in r["trust_lo"]) or "–", ", ".join(fmt(v) for v in r["trust_hi"]) or "–"]
            for r in data["rounds"] if r["histogram"]]
    add("selection", f"Selection values: {sel['quantity']}{unit}",
        ["iteration", "frames", "min", "median", "max", "trust lo", "trust hi"], rows, "histograms", folded=True,
        text="Frames left of the green line are reliable, between the lines selected, right of the red "
             "line discarded.")
    times = data["stage_times"]
    if times:
        cats = [*times["categories"], "total"]
        add("cost", "Cost: CPU s / wall s", cats,
            [[f"{fmt(times['total'][c]['cpu_s'])} / {fmt(times['total'][c]['wall_s'])}" for c in cats]])
        rows = [[fmt(it["iteration"]), *(f"{fmt(it[c]['cpu_s'])} / {fmt(it[c]['wall_s'])}" for c in cats)]
                for it in times["iterations"]]
        rows.append(["all", *(f"{fmt(times['total'][c]['cpu_s'])} / {fmt(times['total'][c]['wall_s'])}"
                              for c in cats)])
        add("stage_times", "Cost per iteration: CPU s / wall s", ["iteration", *cats], rows, folded=True)
    val = data["validation"]
    if val["rmse"]:
        rows = [[fmt(r["iteration"]), r["set"], fmt(r["frames"]), fmt(r["energy_rmse_per_atom"]),
                 fmt(r["force_rmse"])] for r in val["rmse"]]
        add("validation", "Validation RMSE (graph.000.pb of each round)",
            ["iteration", "set", "frames", "energy RMSE (eV/atom)", "force RMSE (eV/Å)"], rows,
            "validation", folded=True)
    rows = [[fmt(r["iteration"]), fmt(d["decile"]), fmt(d["atoms"]), fmt(d["kpu_min"]), fmt(d["kpu_max"]),
             fmt(d["observed_rms_error"]), fmt(d["predicted_rms_error"])]
            for r in cal for d in r["calibration"].get("deciles", [])]
    if rows:
        add("deciles", "Observed vs predicted RMS force error per KPU decile (eV/Å)",
            ["iteration", "decile", "atoms", "KPU min", "KPU max", "observed", "predicted"], rows, folded=True)
    ktrain = [r for r in data["rounds"] if r["kpu_train"]]
    if ktrain:
        rows = [[fmt(r["iteration"]), fmt(r["kpu_train"].get("kpu_train")), fmt(r["kpu_train"].get("frames"))]
                for r in ktrain]
        add("kpu_train", "KPU_train (relative trust)", ["iteration", "KPU_train", "frames"], rows, folded=True)
    return out


def render_markdown(data: dict) -> str:
    lines = ["# ALKPU run report", "", f"Run: `{data['run_dir']}`  ", f"Uncertainty: {data['selection']['uncertainty']}"
             f" (trust: {data['selection']['trust']})  "]
    if data["record"]:
        lines.append(f"Last finished step: iteration {data['record']['iteration']}, {data['record']['step']}")
    lines += ["", "## Summary", "", *_summary_text(data), ""]
    if data["notes"]:
        lines += ["## Notes", "", *(f"* {n}" for n in data["notes"]), ""]
    for sec in _sections(data):
        header = sec["header"]
        lines += [f"## {sec['title']}", ""]
        fig = sec["figure"]
        if fig and fig in data["figures"] and fig != "validation":
            lines += [f"![{fig}]({data['figures'][fig]})", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in sec["rows"]]
        lines.append("")
        if fig == "validation" and fig in data["figures"]:
            lines += [f"![{fig}]({data['figures'][fig]})", ""]
    return "\n".join(lines)


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
          "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;"
          "text-align:right}th{background:#eee}img{max-width:100%;display:block;margin:0.5em 0}"
          "#summary{background:#f4f7fb;border:1px solid #d5deea;padding:0.2em 1em 0.5em;margin-bottom:1.5em}"
          "details{margin:0.3em 0 1em}summary{cursor:pointer;color:#333}.lead{font-size:1.05em}"
          ".muted{color:#555;font-size:0.9em}")


def render_html(data: dict, images: dict[str, bytes]) -> str:
    """One self-contained page: the summary (Table 2 and the figures that answer "did the loop label
    where the model was wrong, and did the error fall") first, long tables folded in details."""
    esc = html.escape

    def table(header, rows):
        return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>\n"
                + "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
                + "</table>")

    def image(key):
        if key not in images:
            return ""
        b64 = base64.b64encode(images[key]).decode("ascii")
        return f"<img alt=\"{key}\" src=\"data:image/png;base64,{b64}\">"

    sel = data["selection"]
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>ALKPU run report</title>",
             f"<style>{_STYLE}</style></head><body>", "<h1>ALKPU run report</h1>"]
    sections = _sections(data)
    rounds = sections[0]
    parts.append("<section id=\"summary\"><h2>Summary</h2>")
    parts += [f"<p class=\"lead\">{esc(t)}</p>" for t in _summary_text(data)]
    parts.append(table(rounds["header"], rounds["rows"]))
    parts.append(f"<p class=\"muted\">{esc(rounds['text'])}</p>")
    parts.append(image("progress"))
    parts.append("</section>")
    if data["notes"]:
        parts += ["<h2>Notes</h2><ul>", *(f"<li>{esc(n)}</li>" for n in data["notes"]), "</ul>"]
    # sections with something to show (a figure or a short table) get a heading; long tables
    # without one of their own are folded at the end
    shown = [sec for sec in sections[1:] if not sec["folded"] or sec["text"]]
    rest = [sec for sec in sections[1:] if sec["folded"] and not sec["text"]]
    for sec in shown:
        parts.append(f"<h2 id=\"{sec['id']}\">{esc(sec['title'])}</h2>")
        if sec["text"]:
            parts.append(f"<p class=\"muted\">{esc(sec['text'])}</p>")
        if sec["figure"]:
            parts.append(image(sec["figure"]))
        if sec["folded"]:
            parts.append(f"<details><summary>table ({len(sec['rows'])} rows)</summary>")
        parts.append(table(sec["header"], sec["rows"]))
        if sec["folded"]:
            parts.append("</details>")
    if rest:
        parts.append("<h2 id=\"details\">More tables</h2>")
    for sec in rest:
        parts.append(f"<details id=\"{sec['id']}\"><summary>{esc(sec['title'])} ({len(sec['rows'])} rows)"
                     "</summary>")
        parts.append(table(sec["header"], sec["rows"]))
        if sec["figure"]:
            parts.append(image(sec["figure"]))
        parts.append("</details>")
    parts.append(f"<p class=\"muted\">Run: <code>{esc(data['run_dir'])}</code>; uncertainty: "
                 f"{esc(sel['uncertainty'])} (trust: {esc(sel['trust'])})"
                 + (f"; last finished step: iteration {data['record']['iteration']}, "
                    f"{esc(data['record']['step'])}" if data["record"] else "")
                 + ". Every number is in report.json.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_pages(data: dict, out_dir) -> Path:
    """Render the figures and pages of report data (as :func:`build_report` returns it) into out_dir."""
    out_dir = Path(out_dir)
    images = {}
    for key, plot in PLOTS.items():
        fig = plot(data)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        images[key] = buf.getvalue()
        data["figures"][key] = FIGURES[key]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OWN_FILES:  # a previous report's files (--overwrite)
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
    from .atomic import atomic_write, atomic_write_text

    for key, png in images.items():
        atomic_write(out_dir / FIGURES[key], lambda fh, png=png: fh.write(png))
    atomic_write_text(out_dir / "report.json", json.dumps(data, indent=1, ensure_ascii=False))
    atomic_write_text(out_dir / "index.md", render_markdown(data))
    atomic_write_text(out_dir / "index.html", render_html(data, images))
    return out_dir


def write_report(run_dir, out_dir=None, validation=None, overwrite: bool = False) -> Path:
    """Build the report and write report.json, the figures, index.md and index.html; returns out_dir."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ReportError(f"{out_dir} exists and is not empty; choose another output (-o) or pass --overwrite")
    return write_pages(build_report(run_dir, validation), out_dir)
