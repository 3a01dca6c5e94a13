"""The ``alkpu`` command."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

__all__ = ["main"]


def _frames_arg(text: str | None):
    if not text:
        return None
    start, _, stop = text.partition(":")
    return range(int(start or 0), int(stop)) if stop else [int(start)]


def _refuse_existing(paths, overwrite: bool) -> None:
    existing = [str(p) for p in paths if p is not None and Path(p).exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"alkpu: error: {', '.join(existing)} already exist(s); choose another output or pass --overwrite"
        )


def _detect_fmt(path: str, fmt: str | None, default: str, command: str = "alkpu") -> str:
    """The dpdata format of ``path``: ``fmt`` when given (-f), else recognised from the files
    (a deepmd/npy or deepmd/raw system, a DP-GEN traj/ of <step>.lammpstrj, a LAMMPS dump),
    else ``default``; a directory recognised as none of them is refused with the -f to pass."""
    if fmt:
        return fmt
    p = Path(path)
    if p.is_dir():
        if (p / "type.raw").is_file():
            if any(q.is_dir() and q.name.startswith("set.") for q in p.iterdir()):
                return "deepmd/npy"
            if (p / "coord.raw").is_file():
                return "deepmd/raw"
        if any(re.fullmatch(r"\d+\.lammpstrj", q.name) for q in p.iterdir()):
            return "lammps/dump"
        if default == "lammps/dump" and any(p.iterdir()):  # (an empty traj/: "the trajectory is empty")
            print(f"{command}: error: {p} is neither a DP-GEN traj/ directory (<step>.lammpstrj files) nor a "
                  "deepmd/npy system (type.raw and set.*/); pass its dpdata format with -f, e.g. "
                  "-f deepmd/npy, -f vasp/outcar, -f lammps/dump", file=sys.stderr)
            raise SystemExit(2)
        return default
    if p.is_file() and p.suffix in (".lammpstrj", ".dump") or p.name.startswith("dump"):
        return "lammps/dump"
    return default


class _Progress:
    """Progress lines for long KPU computations whose output is not a terminal (a log file, a
    batch job): ``label: done/total frames, elapsed, left`` about every ``every`` seconds."""

    def __init__(self, label: str, total: int, every: float = 30.0):
        import time

        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        import time

        now = time.perf_counter()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        print(f"{self.label}: {done}/{self.total} frames, {elapsed:.0f} s elapsed"
              + (f", about {left:.0f} s left" if done < self.total else ""), file=sys.stderr, flush=True)


def _with_progress_lines(engine, label: str, chunk_s: float = 30.0):
    """Make ``engine.compute`` print progress lines when stderr is not a terminal.

    A terminal gets the engine's own progress bar. Otherwise the frames are computed in
    chunks (P factorised once, as for all the frames together, so the numbers are the same)
    with a line after each chunk; chunks grow to about ``chunk_s`` seconds each.
    """
    if sys.stderr.isatty():
        return engine
    import time

    import numpy as np

    from .kpu_engine import KPUResult

    compute = engine.compute

    def chunked(system, frames=None, steps=None, progress=None):
        idx = list(range(system.get_nframes())) if frames is None else list(frames)
        if len(idx) < 2:
            return compute(system, frames=idx, steps=steps, progress=False)
        if getattr(engine, "factorize", False):
            natoms = int(np.asarray(system["atom_types"]).size)
            engine.kf.factorize(expected_rows=len(idx) * (3 * natoms + 1 + (9 if engine.virial else 0)))
        report = _Progress(label, len(idx), every=chunk_s)
        report(0)
        parts, at, size = [], 0, 1
        while at < len(idx):
            tic = time.perf_counter()
            parts.append(compute(system, frames=idx[at:at + size], steps=steps, progress=False))
            at += size
            report(at)
            per_frame = (time.perf_counter() - tic) / size
            size = max(1, min(len(idx) - at, int(chunk_s / max(per_frame, 1e-3))))
        if len(parts) == 1:
            return parts[0]
        return KPUResult.concatenate(parts)

    engine.compute = chunked
    return engine


def cmd_kpu(args) -> int:
    from .kpu_engine import InputError, KPUEngine, KPUResult, load_configurations
    from .model_devi import write_result

    out = Path(args.output) if args.output else None
    detail = Path(args.detail) if args.detail else None
    _refuse_existing([out, detail], args.overwrite)
    if args.merge:
        parts = [KPUResult.load(p) for p in args.merge]
        result = KPUResult.concatenate(parts)
    else:
        if not args.model or not args.system:
            raise InputError("--model and --system are needed (or --merge PARTS)")
        fmt = _detect_fmt(args.system, args.fmt, "lammps/dump", "alkpu kpu")
        engine = KPUEngine(args.model, args.kalman_state, seed=args.seed, rows_per_pass=args.rows_per_pass,
                           memory_limit=args.memory_limit,
                           density_factor=args.density_factor)
        system, steps = load_configurations(args.system, fmt, engine.type_map)
        _with_progress_lines(engine, "alkpu kpu")
        result = engine.compute(system, frames=_frames_arg(args.frames), steps=steps)
    if detail is not None:
        result.save(detail)
    if out is not None:
        write_result(out, result)
    unit = "eV/A (calibrated)" if result.calibration else "sqrt(KPU), uncalibrated"
    outside = int(result.out_of_domain.sum())
    print(
        f"KPU of {len(result.frames)} frames: force KPU mean {result.force_kpu.mean():.4g}, "
        f"max per-atom uncertainty {result.atom_sigma.max():.4g} [{unit}]"
        + (f"; {outside} frame(s) outside the model's domain (failed)" if outside else "")
        + (f" -> {out}" if out else "") + (f", {detail}" if detail else "")
    )
    if outside:
        first = next(i for i, reason in enumerate(result.domain) if reason)
        print(f"  e.g. step {int(result.steps[first])}: {result.domain[first]}")
    if result.calibration:
        from .calibration import EXTRAPOLATION_FACTOR, beyond_calibration

        beyond = int((beyond_calibration(result.calibration, result.atom_kpu, EXTRAPOLATION_FACTOR)
                      & ~result.out_of_domain).sum())
        if beyond:
            print(f"  {beyond} frame(s) with an atom's KPU beyond twice the largest the calibration was fitted on: "
                  "their sigma is an extrapolation and likely too low (alkpu run counts them as candidates)")
    return 0


def cmd_calibrate(args) -> int:
    import dpdata

    from .calibration import calibrate, deciles, save_calibration
    from .kpu_engine import KPUEngine

    fmt = _detect_fmt(args.system, args.fmt, "deepmd/npy", "alkpu calibrate")
    engine = KPUEngine(args.model, args.kalman_state, seed=args.seed, rows_per_pass=args.rows_per_pass,
                       memory_limit=args.memory_limit, density_factor=args.density_factor)
    system = dpdata.LabeledSystem(args.system, fmt=fmt)
    _with_progress_lines(engine, "alkpu calibrate")
    cal, kpu, sq = calibrate(engine, system, frames=_frames_arg(args.frames), form=args.form)
    path = save_calibration(engine.state_path, cal)
    report = {"calibration": cal, "saved": str(path)}
    if args.holdout:
        held = dpdata.LabeledSystem(args.holdout, fmt=_detect_fmt(args.holdout, args.fmt, "deepmd/npy"))
        engine.calibration = cal
        _, kpu_h, sq_h = calibrate(engine, held)
        report["holdout_deciles"] = deciles(kpu_h, sq_h, cal)
    text = json.dumps(report, indent=1)
    if args.report:
        from .atomic import atomic_write_text

        atomic_write_text(args.report, text)
    print(text)
    return 0


def cmd_run(args) -> int:
    from .dpgen.command import run_checked

    run_checked(args.param, args.machine)  # every input check, then the loop
    return 0


def cmd_lmp_kpu(args) -> int:
    """LAMMPS, then KPU of its trajectory: one DP-GEN exploration task in kpu mode."""
    import resource
    import shlex
    import subprocess
    import time

    def cpu(who):
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    rest = [a for a in args.rest if a != "--"]
    wall0 = time.perf_counter()
    proc = subprocess.run(shlex.split(args.lmp) + rest)
    if proc.returncode != 0:
        return proc.returncode
    wall1, kpu_cpu0 = time.perf_counter(), cpu(resource.RUSAGE_SELF)
    from .kpu_engine import KPUEngine, load_configurations
    from .model_devi import devi_values, write_result
    from .runfiles import TIMING_FILE

    engine = KPUEngine(args.model, args.kalman_state, seed=args.seed, rows_per_pass=args.rows_per_pass,
                       memory_limit=args.memory_limit, density_factor=args.density_factor)
    start_wall = time.perf_counter()
    source = Path("traj") if Path("traj").is_dir() else Path("all.lammpstrj")
    system, steps = load_configurations(source, "lammps/dump", engine.type_map)
    read_wall = time.perf_counter()
    result = engine.compute(system, steps=steps, progress=False)
    compute_wall = time.perf_counter()
    write_result("model_devi.out", result, devi_values(result, args.relative_to, args.select_hook))
    result.save("kpu.npz")
    done = time.perf_counter()
    timing = {"lmp_cpu_s": cpu(resource.RUSAGE_CHILDREN), "lmp_wall_s": wall1 - wall0,
              "kpu_cpu_s": cpu(resource.RUSAGE_SELF) - kpu_cpu0, "kpu_wall_s": done - wall1,
              "frames": len(result.frames),
              # where the KPU's wall time went: imports and engine, reading the trajectory,
              # the rows, their quadratic forms, the domain check, writing the results
              "kpu_start_wall_s": start_wall - wall1, "kpu_read_wall_s": read_wall - start_wall,
              "kpu_rows_wall_s": engine.timing["rows_s"], "kpu_quadratic_wall_s": engine.timing["quadratic_s"],
              "kpu_domain_wall_s": engine.timing["domain_s"],
              "kpu_other_wall_s": compute_wall - read_wall - engine.timing["rows_s"]
              - engine.timing["quadratic_s"] - engine.timing["domain_s"],
              "kpu_write_wall_s": done - compute_wall}
    from .atomic import atomic_write_text

    atomic_write_text(TIMING_FILE, json.dumps({k: round(v, 3) for k, v in timing.items()}))
    return 0


def cmd_report(args) -> int:
    """Tables, figures and report.json of a DP-GEN run directory."""
    from .report import ReportError, write_report

    run_dir = Path(args.run_dir)
    try:
        out = write_report(run_dir, args.output or run_dir / "report", validation=args.validation,
                           overwrite=args.overwrite)
    except ReportError as exc:
        raise SystemExit(f"alkpu report: error: {exc}") from None
    print(f"report of {run_dir} -> {out / 'index.html'} (also index.md, report.json)")
    return 0

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alkpu", description="Active learning by Kalman prediction uncertainty (ALKPU) for DeePMD.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("kpu", help="KPU of configurations; writes DP-GEN's model_devi.out")
    p.add_argument("-m", "--model", help="frozen model (dp freeze output)")
    p.add_argument("-k", "--kalman-state", help="its Kalman state (default: found from the model)")
    p.add_argument("-s", "--system", help="configurations (a DP-GEN traj/ directory, a LAMMPS dump, ...)")
    p.add_argument("-f", "--fmt", default=None,
                   help="dpdata format of --system (default: deepmd/npy or deepmd/raw when the directory is "
                   "such a system, else lammps/dump)")
    p.add_argument("-o", "--output", default="model_devi.out", help="DP-GEN model_devi.out to write ('' for none)")
    p.add_argument("--detail", help="also write every number (per-atom KPU, energy KPU, ...) to this .npz")
    p.add_argument("--frames", help="only frames START:STOP (for splitting a trajectory into tasks)")
    p.add_argument("--merge", nargs="+", help="merge --detail files of parts instead of computing")
    p.add_argument("--seed", type=int, default=0, help="seed of the paper's N/2 atom draw")
    p.add_argument("--rows-per-pass", type=int, default=None,
                   help="force components per graph evaluation (default: as many as --memory-limit allows)")
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GB the KPU of a frame may use beyond the model, P and the frame's arrays (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--density-factor", type=float, default=None,
                   help="frames whose density lies beyond the training range by more than this factor "
                   "are outside the model's domain (default 1.3; 0 switches the density check off)")
    p.set_defaults(func=cmd_kpu)

    p = sub.add_parser("calibrate", help="fit per-atom KPU to squared force errors (eV/A)")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-k", "--kalman-state")
    p.add_argument("-s", "--system", required=True, help="labelled frames to fit on")
    p.add_argument("-f", "--fmt", default=None,
                   help="dpdata format of --system and --holdout (default: recognised, else deepmd/npy)")
    p.add_argument("--holdout", help="labelled frames for the per-decile check")
    p.add_argument("--frames", help="only frames START:STOP of --system")
    p.add_argument("--form", choices=("power", "line"), default="power",  # calibration.FORMS
                   help="|dF|^2 = a KPU^p (power, the default, as `alkpu run` fits; the line where the "
                   "exponent leaves 0.5-3) or a KPU + b (line, Theorem 4.3)")
    p.add_argument("--rows-per-pass", type=int, default=None, help="as in `alkpu kpu`")
    p.add_argument("--memory-limit", type=float, default=None, help="as in `alkpu kpu`")
    p.add_argument("--density-factor", type=float, default=None, help="as in `alkpu kpu`")
    p.add_argument("--report", help="write the JSON report here too")
    p.add_argument("--seed", type=int, default=0, help="as in `alkpu kpu`")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("run", help="DP-GEN's loop (`dpgen run`), with ALKPU when param.json has \"uncertainty\": \"kpu\"")
    p.add_argument("param")
    p.add_argument("machine")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("lmp-kpu", help="(used by `alkpu run`) run LAMMPS, then write model_devi.out from KPU")
    p.add_argument("--lmp", default="lmp", help="the LAMMPS command")
    p.add_argument("--model", required=True)
    p.add_argument("--kalman-state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-pass", type=int, default=None)
    p.add_argument("--memory-limit", type=float, default=None, help="as in `alkpu kpu`")
    p.add_argument("--relative-to", type=float, help="write frame KPU / this value (KPU_train) instead of sigma")
    p.add_argument("--select-hook", help='"module:function" giving the values to write (see kpu/select_hook)')
    p.add_argument("--density-factor", type=float, default=None, help="as in `alkpu kpu`")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then LAMMPS's own arguments")
    p.set_defaults(func=cmd_lmp_kpu)

    p = sub.add_parser("report", help="report of a DP-GEN run directory: rounds (Table 2), KPU histograms, "
                       "validation RMSE, calibration, cost; HTML, Markdown and JSON")
    p.add_argument("run_dir", help="the directory where `alkpu run` (or `dpgen run`) ran")
    p.add_argument("--validation", help="labelled systems, one subdirectory per temperature (e.g. 1200K/); "
                   "default RUN_DIR/validation if it exists")
    p.add_argument("-o", "--output", help="output directory (default RUN_DIR/report)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty output directory")
    p.set_defaults(func=cmd_report)

    # handled before parsing (see main): listed here for `alkpu -h`
    sub.add_parser("label", help="label configurations with an ASE calculator (DP-GEN fp_style custom); "
                   "`alkpu label -h` for its options")
    return parser


# OpenBLAS's worker threads busy-wait for about 2^28 cycles (~0.1 s) after each call
# before they sleep. The KPU engine alternates TensorFlow (force rows) and BLAS
# (quadratic forms) every frame, so on a few cores the spinning threads slow the next
# phase (docs/kpu.md, "Threads": frames back to back at blocksize 1024 on 2 cores,
# 0.69-0.75 s per frame with the default, 0.55-0.64 s with 2^4 cycles). Set before numpy
# and scipy load their OpenBLAS; a value the user has set is kept.
_KPU_COMMANDS = ("kpu", "calibrate", "lmp-kpu")


def _quiet_blas_threads(argv) -> None:
    if argv[:1] and argv[0] in _KPU_COMMANDS:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_blas_threads(argv)
    from dargs.dargs import ArgumentError

    from .deepmd_tf.frozen import StateNotFoundError
    from .kalman import KalmanStateError, LayoutMismatchError
    from .dpgen.jobs import FailedLabelsError, JobFailedError
    from .kpu_engine import InputError

    if argv[:1] == ["label"]:  # its options are the labeller's own
        from .labelling import main as label_main

        return label_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, KalmanStateError, LayoutMismatchError, StateNotFoundError,
            FileNotFoundError, ValueError, ArgumentError, JobFailedError, FailedLabelsError) as exc:
        print(f"alkpu {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
