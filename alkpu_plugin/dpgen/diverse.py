"""`"selection": "diverse"`: DP-GEN's fp tasks chosen as a diverse batch by virtual Kalman updates.

DP-GEN's make_fp labels the first ``fp_task_max`` of each system's shuffled candidates
(:mod:`.ordering`). In this mode the candidates are ordered instead: the
first ``fp_task_max`` are the greedy batch of :mod:`alkpu_plugin.kalman.diverse_batch`
over the candidates of all exploration tasks of the system, the others follow in DP-GEN's
random order. Counts, files and the labels' bookkeeping stay DP-GEN's own.

A frame is represented by the three force components of its most uncertain atom (the
atom whose per-atom value DP-GEN's selection compares with the trust levels): for a batch
of one frame the choice is DP-GEN's largest value, and each later frame is scored with P
updated as if the frames before it had been labelled. The measurement noise of those
virtual updates is the calibration's noise floor: with sigma_i^2 = a KPU_i + b per atom,
b / (3 a) per component, the KPU below which labelling cannot teach the model more than
the irreducible error. Without a positive one, 1e-6 of the largest candidate value.

At most ``diverse_candidates`` candidates of a system (those of largest uncertainty) enter
the greedy choice; their rows are computed in the process that runs make_fp, with the
model and Kalman state of the iteration (P is loaded there once per iteration).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text

log = logging.getLogger("dpgen")

RECORD = "diverse_selection.{system}.json"


class DiverseChooser:
    """Orders one iteration's candidate lists (``[[task_dir, step], ...]``) for make_fp."""

    def __init__(self, ii: int, jdata: dict, kpu: dict, train_dir: Path, fp_dir: Path):
        self.ii = ii
        self.jdata = jdata
        self.kpu = kpu
        self.train_dir = Path(train_dir)
        self.fp_dir = Path(fp_dir)
        self.pool = int(kpu.get("diverse_candidates", 200))
        self._engine = None
        self.records: dict[str, dict] = {}

    @property
    def engine(self):
        if self._engine is None:
            from ..kpu_engine import KPUEngine

            self._engine = KPUEngine(self.train_dir / "graph.000.pb", self.train_dir / "kalman.000.npz",
                                     seed=int(self.kpu.get("seed", 0)), virial=False,
                                     memory_limit=float(self.kpu.get("memory_limit", 2.0)))
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.jacobian.close()
            self._engine = None

    def _task_values(self, task: str) -> tuple[dict, dict]:
        """Per step of a task: its frame value (max per-atom sigma) and its top atom."""
        from ..kpu_engine import KPUResult

        result = KPUResult.load(Path(task) / "kpu.npz")
        sigma = result.atom_sigma
        steps = [int(s) for s in result.steps]
        value = dict(zip(steps, sigma.max(axis=1)))
        top = dict(zip(steps, np.argmax(result.atom_kpu, axis=1)))
        return value, top

    def order(self, candidates: list) -> None:
        """Reorder ``candidates`` in place: the greedy batch first, then the rest."""
        if not candidates:
            return
        import dpdata

        from ..kalman.diverse_batch import gram, greedy_batch

        system = Path(candidates[0][0]).name.split(".")[1]
        k = int(self.jdata.get("fp_task_max", len(candidates)))
        values, tops = {}, {}
        for task in sorted({c[0] for c in candidates}):
            values[task], tops[task] = self._task_values(task)
        ranked = sorted(range(len(candidates)),
                        key=lambda i: -values[candidates[i][0]][int(candidates[i][1])])
        pool = ranked[: self.pool]
        engine = self.engine
        rows, groups = [], []
        type_map = self.jdata["type_map"]
        for n, i in enumerate(pool):
            task, step = candidates[i][0], int(candidates[i][1])
            conf = dpdata.System(str(Path(task) / "traj" / f"{step}.lammpstrj"), fmt="lammps/dump",
                                 type_map=type_map)
            _, frames = engine._frames(conf, [0])
            atom = int(tops[task][step])
            rows.append(engine.jacobian.force_rows(frames[0], np.arange(3 * atom, 3 * atom + 3)))
            groups.append(np.arange(3 * n, 3 * n + 3))
        K = gram(engine.kf, np.vstack(rows))
        noise, source = self._noise(K)
        batch = greedy_batch(K, groups, k, noise)
        chosen = [pool[f] for f in batch.frames]
        entry = lambda i: [str(candidates[i][0]), int(candidates[i][1])]  # noqa: E731
        self.records[system] = record = {
            "system": system,
            "candidates": len(candidates),
            "pool": len(pool),
            "fp_task_max": k,
            "noise": noise,
            "noise_from": source,
            "chosen": [entry(i) for i in chosen],
            "gains": batch.gains,
            "kpu_when_chosen": batch.kpu,
            "repeats_skipped": [entry(pool[f]) for f in batch.redundant],
        }
        taken = set(chosen)
        candidates[:] = [candidates[i] for i in chosen] + [c for i, c in enumerate(candidates) if i not in taken]
        self.fp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.fp_dir / RECORD.format(system=system), json.dumps(record, indent=1))
        log.info("ALKPU iter.%06d system %s: %d of %d candidates chosen as a diverse batch "
                 "(noise %.3g from %s; %d skipped as repeats of chosen frames)", self.ii, system,
                 len(chosen), len(candidates), noise, source, len(batch.redundant))

    def _noise(self, K: np.ndarray) -> tuple[float, str]:
        cal = self.engine.calibration or {}
        cal = cal.get("line") or cal  # a power-law calibration keeps the line's noise floor
        a, b = float(cal.get("a", 0.0) or 0.0), float(cal.get("b", 0.0) or 0.0)
        if a > 0 and b > 0:
            return b / (3 * a), "calibration b / (3 a)"
        top = float(np.max(np.diag(K))) if K.size else 1.0
        return max(1e-6 * top, 1e-300), "1e-6 x the largest candidate KPU"
