"""Which of DP-GEN's candidates are labelled: the order of its candidate lists in make_fp.

DP-GEN's make_fp sorts each system's frames into accurate, candidate and failed by the trust
levels (its counts and ``*.shuffled.*.out`` files), shuffles the candidates and labels the first
``fp_task_max``. :func:`ordered_candidates` lets a chooser reorder each candidate list right after
that shuffle, so that the labelled frames are the chooser's first ``fp_task_max``; everything else
(counts, files, the labels' bookkeeping) stays DP-GEN's own.

Choosers (``kpu/selection``):

* ``"top"``, :class:`TopChooser`: the candidates of largest selection value first (the value DP-GEN
  compared with the trust levels, column 4 of ``model_devi.out``), DP-GEN's random order among equal
  values and for the rest;
* ``"diverse"``, :class:`alkpu_plugin.dpgen.diverse.DiverseChooser`: a greedy batch by virtual
  Kalman updates.
"""

from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text

log = logging.getLogger("dpgen")

TOP_RECORD = "top_selection.{system}.json"


def _task_values(task: str) -> dict[int, float]:
    """Step -> the value DP-GEN's selection read for it (column 4 of model_devi.out)."""
    table = np.loadtxt(Path(task) / "model_devi.out", ndmin=2)
    return {int(row[0]): float(row[4]) for row in table}


class TopChooser:
    """Orders one iteration's candidate lists (``[[task_dir, step], ...]``) by value, largest first."""

    def __init__(self, ii: int, jdata: dict, fp_dir: Path):
        self.ii = ii
        self.jdata = jdata
        self.fp_dir = Path(fp_dir)

    def order(self, candidates: list) -> None:
        if not candidates:
            return
        system = Path(candidates[0][0]).name.split(".")[1]
        k = int(self.jdata.get("fp_task_max", len(candidates)))
        values = {task: _task_values(task) for task in sorted({c[0] for c in candidates})}
        # the sort is stable: equal values keep DP-GEN's shuffled order
        candidates.sort(key=lambda c: -values[c[0]][int(c[1])])
        value = [values[c[0]][int(c[1])] for c in candidates]
        record = {
            "system": system,
            "candidates": len(candidates),
            "fp_task_max": k,
            "chosen": [[str(c[0]), int(c[1])] for c in candidates[:k]],
            "values": value[:k],
            "smallest_candidate_value": value[-1],
        }
        self.fp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.fp_dir / TOP_RECORD.format(system=system), json.dumps(record, indent=1))
        log.info("ALKPU iter.%06d system %s: the %d most uncertain of %d candidates labelled "
                 "(values %.3g to %.3g)", self.ii, system, len(record["chosen"]), len(candidates),
                 record["values"][0], record["values"][-1])

    def close(self) -> None:
        pass


def chooser_for(selection: str, ii: int, jdata: dict, kpu: dict, iter_dir: Path):
    """The chooser of ``kpu/selection``, or None for DP-GEN's own random draw."""
    if selection == "top":
        return TopChooser(ii, jdata, Path(iter_dir) / "02.fp")
    if selection == "diverse":
        from .diverse import DiverseChooser

        return DiverseChooser(ii, jdata, kpu, Path(iter_dir) / "00.train", Path(iter_dir) / "02.fp")
    return None


@contextmanager
def ordered_candidates(chooser):
    """Within this block DP-GEN's make_fp orders its candidate lists by ``chooser.order``."""
    import dpgen.generator.run as dprun

    captured: list = []

    def capture(select):
        def wrapped(*args, **kwargs):
            out = select(*args, **kwargs)
            captured.append(out[1])  # (accurate, candidate, failed, counter, ...)
            return out
        return wrapped

    class _Random:
        """DP-GEN's `random` with a shuffle that orders the candidate lists."""

        def __getattr__(self, name):
            return getattr(random, name)

        def shuffle(self, x, *args):
            random.shuffle(x, *args)
            if any(x is c for c in captured):
                chooser.order(x)

    saved = {name: getattr(dprun, name) for name in
             ("random", "_select_by_model_devi_standard", "_select_by_model_devi_adaptive_trust_low")}
    dprun.random = _Random()
    dprun._select_by_model_devi_standard = capture(saved["_select_by_model_devi_standard"])
    dprun._select_by_model_devi_adaptive_trust_low = capture(
        saved["_select_by_model_devi_adaptive_trust_low"])
    try:
        yield chooser
    finally:
        for name, value in saved.items():
            setattr(dprun, name, value)
        chooser.close()
