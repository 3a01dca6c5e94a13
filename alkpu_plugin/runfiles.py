"""Names in a DP-GEN run directory that both the driver (writing) and the report (reading) use.

A leaf: no imports from the rest of the package.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["STEP_NAMES", "STAGES_FILE", "TIMING_FILE", "count_lines"]

# DP-GEN's nine steps, in record.dpgen's order
STEP_NAMES = ("make_train", "run_train", "post_train", "make_model_devi", "run_model_devi",
              "post_model_devi", "make_fp", "run_fp", "post_fp")
STAGES_FILE = "alkpu-stages.jsonl"  # wall and CPU seconds of every step, one JSON object per line
TIMING_FILE = "alkpu_timing.json"  # what LAMMPS and KPU cost in one exploration task


def count_lines(paths: Iterable[str | os.PathLike]) -> int:
    """Lines that are neither blank nor comments, over all ``paths`` (DP-GEN's selection files)."""
    n = 0
    for path in paths:
        with open(path) as fh:
            n += sum(1 for line in fh if line.strip() and not line.lstrip().startswith("#"))
    return n
