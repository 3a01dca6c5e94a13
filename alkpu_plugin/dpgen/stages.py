"""What each DP-GEN step costs, and a progress line a person can follow.

Every step of ``alkpu run`` (either mode) is timed and appended to
``alkpu-stages.jsonl`` in the run directory, one JSON object per line:
``{"iter", "stage", "wall_s", "cpu_s", "self_cpu_s"}``.

``cpu_s`` is the busy CPU time of the whole machine over the step (from
``/proc/stat``: user + nice + system + irq + softirq + steal, all cores).
With dpdispatcher's Shell machine the jobs are detached processes that no
per-process counter of ours sees, so on a machine that runs nothing else this
is the honest total of what the step cost; ``self_cpu_s`` is this driver
process alone. Where ``/proc/stat`` does not exist, ``cpu_s`` falls back to
the driver's own and its waited-for children's CPU time.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
import time
from pathlib import Path

from ..atomic import append_line
from ..runfiles import STAGES_FILE, STEP_NAMES, count_lines

__all__ = ["STAGES_FILE", "machine_cpu_seconds", "StageLog", "timed_dpgen_steps"]


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return _own_cpu()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def seed_step(seed: int, ii: int, name: str) -> None:
    """Seed Python's and NumPy's global generators for one step.

    DP-GEN draws the model seeds, LAMMPS velocity seeds and the fp selection from
    them unseeded; seeding each step from (seed, iteration, step) makes a run
    repeatable, and the same in both modes where the steps do the same thing.
    """
    import random

    import numpy as np

    random.seed(f"{seed}:{ii}:{name}")
    np.random.seed(np.random.SeedSequence([seed, ii, STEP_NAMES.index(name) if name in STEP_NAMES else 99])
                   .generate_state(1)[0])


def _temps(jdata: dict, ii: int) -> str:
    jobs = jdata.get("model_devi_jobs", [])
    if ii < len(jobs) and jobs[ii].get("temps"):
        return "/".join(f"{t:g}" for t in jobs[ii]["temps"]) + " K"
    return ""


class StageLog:
    """Times steps into ``alkpu-stages.jsonl`` and prints one progress line per step."""

    def __init__(self, run_dir: str | os.PathLike = ".", jdata: dict | None = None, stream=None,
                 seed: int | None = None):
        self.path = Path(run_dir) / STAGES_FILE
        self.jdata = jdata or {}
        self.stream = stream if stream is not None else sys.stdout
        self.seed = seed

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, ii: int, name: str):
        temps = _temps(self.jdata, ii)
        head = f"[alkpu] iter {ii:03d}{' ' + temps if temps else ''} | {name:<16}"
        self._say(f"{head} ...")
        if self.seed is not None:
            seed_step(self.seed, ii, name)
        wall0, cpu0, self0 = time.perf_counter(), machine_cpu_seconds(), _own_cpu()
        yield
        wall = time.perf_counter() - wall0
        record = {"iter": ii, "stage": name, "wall_s": round(wall, 3),
                  "cpu_s": round(machine_cpu_seconds() - cpu0, 3),
                  "self_cpu_s": round(_own_cpu() - self0, 3)}
        append_line(self.path, json.dumps(record))
        extra = self._summary(ii, name)
        self._say(f"{head} done in {wall:.1f} s (CPU {record['cpu_s']:.1f} s){extra}")

    def _summary(self, ii: int, name: str) -> str:
        """Frames explored / selected, when the step has just produced them."""
        it = f"iter.{ii:06d}"
        try:
            if name == "run_model_devi":
                files = glob.glob(os.path.join(it, "01.model_devi", "task.*", "model_devi.out"))
                return f"; {count_lines(files)} frames explored in {len(files)} task(s)"
            if name == "make_fp":
                fp = os.path.join(it, "02.fp")
                counts = {kind: count_lines(glob.glob(os.path.join(fp, f"{kind}.shuffled.*.out")))
                          for kind in ("rest_accurate", "candidate", "rest_failed")}
                tasks = len(glob.glob(os.path.join(fp, "task.*")))
                return (f"; reliable {counts['rest_accurate']}, selected {counts['candidate']}, "
                        f"discarded {counts['rest_failed']} -> {tasks} to label")
        except OSError:
            return ""
        return ""


@contextlib.contextmanager
def timed_dpgen_steps(log: StageLog):
    """Wrap DP-GEN's nine step functions (as ``run_iter`` calls them) with ``log.stage``."""
    import dpgen.generator.run as dprun

    originals = {name: getattr(dprun, name) for name in STEP_NAMES}

    def wrap(name, func):
        def timed(ii, *args, **kwargs):
            with log.stage(ii, name):
                return func(ii, *args, **kwargs)
        return timed

    try:
        for name, func in originals.items():
            setattr(dprun, name, wrap(name, func))
        yield
    finally:
        for name, func in originals.items():
            setattr(dprun, name, func)


@contextlib.contextmanager
def check_interval(seconds: float | None):
    """Make dpdispatcher poll job status every ``seconds`` (its default is 30 s)."""
    if seconds is None:
        yield
        return
    from dpdispatcher import Submission

    original = Submission.run_submission

    def run_submission(self, *args, **kwargs):
        kwargs.setdefault("check_interval", seconds)
        return original(self, *args, **kwargs)

    Submission.run_submission = run_submission
    try:
        yield
    finally:
        Submission.run_submission = original
