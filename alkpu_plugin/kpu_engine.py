"""The KPU engine: Kalman Prediction Uncertainty of configurations, from a frozen model.

Inputs are what an RLEKF training leaves behind: the frozen model (``dp
freeze``) and its Kalman state (found from the model, see
:mod:`alkpu_plugin.deepmd_tf.frozen`).  Configurations come in any format
dpdata reads.  Per frame the engine gives

* ``force_kpu``: the paper's force KPU (mean over N/2 seeded random atoms and
  their 3 components);
* ``atom_kpu``: per-atom KPU_i = sum over components, for every atom;
* ``energy_kpu``: G_E^T P G_E;
* ``virial_kpu``: G_W^T P G_W for the nine virial components W_ab;
* ``domain``: why a frame lies outside the model's domain (``""`` inside:
  :mod:`alkpu_plugin.domain`);
* with a calibration (:mod:`alkpu_plugin.calibration`), ``atom_sigma`` in eV/A
  and ``virial_sigma`` in eV per atom (DP-GEN's scale for the virial deviation).

All force components of a frame are differentiated in vectorised passes and
each block of P is read once per frame for the energy, virial and force rows;
results do not depend on how frames are split between processes (atoms for the
paper's value are drawn from (seed, frame index)).
"""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .atomic import atomic_write
from .kalman import kpu as kpu_math
from .kalman import load_state

__all__ = ["KPUEngine", "KPUResult", "FrameKPU", "load_configurations", "InputError"]


class InputError(ValueError):
    """Configurations that cannot be evaluated (reported before any work)."""


# --------------------------------------------------------------------- inputs
def _dump_timesteps(path: Path) -> list[int]:
    steps, take = [], False
    with open(path) as fh:
        for line in fh:
            if take:
                steps.append(int(line.split()[0]))
                take = False
            elif line.startswith("ITEM: TIMESTEP"):
                take = True
    return steps


def load_configurations(path: str | os.PathLike, fmt: str, type_map: Sequence[str] | None = None):
    """A dpdata System and the MD step of each frame.

    ``path`` may be a DP-GEN ``traj/`` directory of ``<step>.lammpstrj`` files
    (steps from the file names), a LAMMPS dump (steps from its TIMESTEP items),
    or anything dpdata reads with ``fmt`` (steps = frame indices).
    """
    import dpdata

    path = Path(path)
    if not path.exists():
        raise InputError(f"configurations {path} do not exist")
    kwargs = {"type_map": list(type_map)} if type_map and fmt.startswith("lammps") else {}
    if path.is_dir() and fmt == "lammps/dump":
        files = sorted(
            (p for p in path.iterdir() if re.fullmatch(r"\d+\.lammpstrj", p.name)),
            key=lambda p: int(p.stem),
        )
        if not files:
            raise InputError(f"no <step>.lammpstrj files in {path}: the trajectory is empty")
        system = dpdata.System(str(files[0]), fmt=fmt, **kwargs)
        for p in files[1:]:
            system.append(dpdata.System(str(p), fmt=fmt, **kwargs))
        steps = [int(p.stem) for p in files]
    else:
        try:
            system = dpdata.System(str(path), fmt=fmt, **kwargs)
        except Exception as exc:  # dpdata raises many kinds
            raise InputError(f"dpdata could not read {path} as {fmt!r}: {exc}") from exc
        steps = list(range(system.get_nframes()))
        if fmt == "lammps/dump" and path.is_file():
            ts = _dump_timesteps(path)
            if len(ts) == system.get_nframes():
                steps = ts
    if system.get_nframes() == 0:
        raise InputError(f"{path} holds no frames: the trajectory is empty")
    return system, steps


# -------------------------------------------------------------------- results
@dataclass
class KPUResult:
    """Per-frame KPU of one system (frames in the order given)."""

    frames: np.ndarray  # frame indices in the source
    steps: np.ndarray
    force_kpu: np.ndarray  # (F,) paper's value
    energy_kpu: np.ndarray  # (F,)
    atom_kpu: np.ndarray  # (F, N)
    calibration: dict | None = None
    meta: dict = field(default_factory=dict)
    virial_kpu: np.ndarray | None = None  # (F, 9), W_ab a-major
    domain: list[str] | None = None  # per frame: why it is outside the model's domain, "" if inside

    @property
    def natoms(self) -> int:
        return int(self.atom_kpu.shape[1])

    @property
    def out_of_domain(self) -> np.ndarray:
        """(F,) True for frames outside the model's domain."""
        if self.domain is None:
            return np.zeros(len(self.frames), dtype=bool)
        return np.array([bool(r) for r in self.domain], dtype=bool)

    @property
    def atom_sigma(self) -> np.ndarray:
        """Per-atom force uncertainty: sqrt(a KPU_i^p + b) eV/A calibrated (p = 1 unless the
        calibration is a power law), else sqrt(KPU_i)."""
        if self.calibration:
            from .calibration import predicted_sq_error

            return np.sqrt(np.maximum(predicted_sq_error(self.calibration, self.atom_kpu), 0.0))
        return np.sqrt(self.atom_kpu)

    @property
    def virial_sigma(self) -> np.ndarray | None:
        """(F, 9) virial uncertainty per atom, sqrt(a_v kpu_ab + b_v) / N (eV when calibrated).

        DP-GEN compares the committee's virial deviation divided by the number of
        atoms with its virial trust levels; this is the same scale. Without a virial
        fit (:mod:`alkpu_plugin.calibration`) the force line's scale ``a`` is used, and
        without any calibration sqrt(kpu_ab) / N.
        """
        if self.virial_kpu is None:
            return None
        a, b = 1.0, 0.0
        if self.calibration:
            vir = self.calibration.get("virial") or {}
            line = self.calibration.get("line") or self.calibration  # a power law keeps its line
            a, b = vir.get("a", line["a"]), vir.get("b", 0.0)
        return np.sqrt(np.maximum(a * np.asarray(self.virial_kpu) + b, 0.0)) / self.natoms

    def save(self, path: str | os.PathLike) -> Path:
        """All arrays and metadata in one .npz (written atomically)."""
        meta = {**self.meta, "calibration": self.calibration, "domain": self.domain}
        arrays = dict(frames=self.frames, steps=self.steps, force_kpu=self.force_kpu,
                      energy_kpu=self.energy_kpu, atom_kpu=self.atom_kpu, atom_sigma=self.atom_sigma,
                      out_of_domain=self.out_of_domain)
        if self.virial_kpu is not None:
            arrays.update(virial_kpu=self.virial_kpu, virial_sigma=self.virial_sigma)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        return atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KPUResult":
        """A result saved by :meth:`save`; a missing, truncated or foreign file raises
        :class:`InputError` naming it."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"the KPU result {path} does not exist")
        try:
            with np.load(path) as d:
                meta = json.loads(bytes(d["meta"]).decode())
                calibration = meta.pop("calibration", None)
                domain = meta.pop("domain", None)
                virial = d["virial_kpu"] if "virial_kpu" in d.files else None
                result = cls(d["frames"], d["steps"], d["force_kpu"], d["energy_kpu"], d["atom_kpu"],
                             calibration, meta, virial, domain)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(
                f"the KPU result {path} is damaged ({type(exc).__name__}: {exc}); it is not a complete file "
                "written by `alkpu kpu --detail` (or an exploration task's kpu.npz). Compute it again: "
                "`alkpu kpu ... --detail FILE` (in a DP-GEN run, the exploration task that wrote it)"
            ) from None
        n = len(result.frames)
        if not (len(result.steps) == len(result.force_kpu) == len(result.energy_kpu) == len(result.atom_kpu) == n):
            raise InputError(f"the KPU result {path} is damaged: its arrays hold different numbers of frames; "
                             "compute it again with `alkpu kpu ... --detail FILE`")
        return result

    @classmethod
    def concatenate(cls, parts: Iterable["KPUResult"]) -> "KPUResult":
        parts = sorted(parts, key=lambda p: int(p.frames[0]) if len(p.frames) else 0)
        first = parts[0]
        virial = None
        if all(p.virial_kpu is not None for p in parts):
            virial = np.concatenate([p.virial_kpu for p in parts])
        domain = None
        if any(p.domain is not None for p in parts):
            domain = [r for p in parts for r in (p.domain or [""] * len(p.frames))]
        return cls(
            np.concatenate([p.frames for p in parts]),
            np.concatenate([p.steps for p in parts]),
            np.concatenate([p.force_kpu for p in parts]),
            np.concatenate([p.energy_kpu for p in parts]),
            np.concatenate([p.atom_kpu for p in parts]),
            first.calibration,
            first.meta,
            virial,
            domain,
        )


@dataclass(frozen=True)
class FrameKPU:
    """KPU of one frame: the paper's force value, every component, energy, virial."""

    force: float  # the paper's frame value
    components: np.ndarray  # (3N,) kpu of every force component, atom-major
    energy: float
    virial: np.ndarray | None  # (9,) or None


# --------------------------------------------------------------------- engine
class KPUEngine:
    """KPU of configurations for one frozen RLEKF model.

    Parameters
    ----------
    model
        Frozen model (``dp freeze`` output).
    kalman_state
        Its Kalman state; found from the model when omitted.
    seed
        Seed of the paper's atom draw.
    rows_per_pass
        Force components per graph evaluation; ``None`` (default): as many as fit
        ``memory_limit``.
    memory_limit
        GB the rows and their quadratic forms may use beyond the model, P and the
        frame's own arrays (default 2).
    calibration
        A calibration dict, or ``None`` to use the one stored beside the state.
    factorize
        Replace P's blocks by their Cholesky factors when a computation has
        enough rows to pay for it (halves the quadratic-form work; the loaded
        state is only read, never saved).
    """

    def __init__(self, model, kalman_state=None, *, seed: int = 0, rows_per_pass: int | None = None,
                 memory_limit: float | None = None,
                 calibration: dict | None = None, factorize: bool = True, virial: bool = True,
                 density_factor: float | None = None):
        import time

        tic = time.perf_counter()
        from .calibration import load_calibration
        from .deepmd_tf.frozen import find_kalman_state
        from .deepmd_tf.jacobian import DEFAULT_MEMORY_GB, ModelJacobian
        from .domain import DEFAULT_DENSITY_FACTOR

        self.model = Path(model)
        self.state_path = find_kalman_state(model, kalman_state)
        self.kf, self.extra = load_state(self.state_path)
        self.memory_limit = DEFAULT_MEMORY_GB if memory_limit is None else float(memory_limit)
        if self.memory_limit <= 0:
            raise InputError(f"memory_limit must be a positive number of GB, got {memory_limit}")
        # the rows' intermediates get two thirds of the budget, the rows awaiting their
        # quadratic forms the rest
        self.jacobian = ModelJacobian(model, self.kf.layout, rows_per_pass=rows_per_pass,
                                      memory_limit=self.memory_limit * 2 / 3)
        self.seed = int(seed)
        self.factorize = bool(factorize)
        self.virial = bool(virial)
        self.density_factor = DEFAULT_DENSITY_FACTOR if density_factor is None else float(density_factor)
        self.calibration = calibration if calibration is not None else load_calibration(self.state_path)
        #: wall seconds: building the engine, then summed over frames: the rows (graph
        #: evaluations), their quadratic forms, the domain check
        self.timing = {"start_s": time.perf_counter() - tic, "rows_s": 0.0, "quadratic_s": 0.0,
                       "domain_s": 0.0, "frames": 0}

    @property
    def type_map(self) -> list[str]:
        return self.jacobian.type_map

    def _frames(self, system, frames):
        from .deepmd_tf.jacobian import Frame

        nframes = system.get_nframes()
        if nframes == 0:
            raise InputError("the trajectory is empty: no frames to evaluate")
        idx = np.arange(nframes) if frames is None else np.asarray(list(frames), dtype=int)
        if idx.size == 0:
            raise InputError("no frames selected")
        if idx.min() < 0 or idx.max() >= nframes:
            raise InputError(f"frame indices outside 0..{nframes - 1}")
        coords = system["coords"][idx]
        bad = np.where(~np.isfinite(coords).all(axis=(1, 2)))[0]
        if bad.size:
            raise InputError(
                f"frame(s) {idx[bad][:5].tolist()} have NaN or infinite coordinates; "
                "remove them (e.g. the MD run blew up) and try again"
            )
        atype = self.jacobian.types_for(system["atom_names"], system["atom_types"])
        nopbc = bool(system.nopbc) if hasattr(system, "nopbc") else False
        cells = system["cells"][idx]
        return idx, [Frame(c, None if nopbc else b, atype) for c, b in zip(coords, cells)]

    def frame_kpu(self, frame, index: int) -> FrameKPU:
        """KPU of one frame: energy, virial (unless switched off) and every force component.

        Rows are streamed: chunks from the jacobian are copied into a batch of rows
        (a third of ``memory_limit``), and each batch's quadratic forms read every
        block of P once.
        """
        head = 1 + (9 if self.virial else 0)
        kpu = np.empty(head + 3 * frame.atype.size)
        n = self.kf.layout.n
        batch = int(min(kpu.size, max(1, self.memory_limit * 1e9 / 3 // (8 * n))))
        buf = np.empty((batch, n))
        where: list[tuple[int, int, int]] = []  # (row in buf, first output row, rows)
        quadratic = [0.0]

        def flush():
            tic = time.perf_counter()
            used = where[-1][0] + where[-1][2]
            values = kpu_math.component_kpu(self.kf, buf[:used], rows_per_pass=used)
            for at, start, m in where:
                kpu[start : start + m] = values[at : at + m]
            where.clear()
            quadratic[0] += time.perf_counter() - tic

        def sink(start, rows):
            done = 0
            while done < rows.shape[0]:
                at = where[-1][0] + where[-1][2] if where else 0
                m = min(batch - at, rows.shape[0] - done)
                buf[at : at + m] = rows[done : done + m]
                where.append((at, start + done, m))
                done += m
                if at + m == batch:
                    flush()

        tic = time.perf_counter()
        self.jacobian.rows_into(frame, sink, energy=True, virial=self.virial)
        if where:
            flush()
        self.timing["quadratic_s"] += quadratic[0]
        self.timing["rows_s"] += time.perf_counter() - tic - quadratic[0]
        self.timing["frames"] += 1
        comp = kpu[head:]
        atoms = kpu_math.paper_atoms(frame.atype.size, self.seed, index)
        return FrameKPU(kpu_math.paper_force_kpu(comp, atoms), comp, float(kpu[0]),
                        kpu[1:head].copy() if self.virial else None)

    def domain_reasons(self, frame_list) -> list[str]:
        """Why each frame lies outside the model's domain (:mod:`alkpu_plugin.domain`)."""
        from .domain import frame_reasons

        coords = np.stack([f.coord for f in frame_list])
        cells = None if frame_list[0].box is None else np.stack([f.box for f in frame_list])
        return frame_reasons(coords, cells, self.jacobian.rcut, self.extra.get("domain"),
                             self.density_factor)

    def compute(self, system, frames: Iterable[int] | None = None, steps: Sequence[int] | None = None,
                progress: bool | None = None) -> KPUResult:
        """KPU of ``frames`` (default all) of a dpdata System; inputs are checked first."""
        from tqdm.auto import tqdm

        idx, frame_list = self._frames(system, frames)
        all_steps = np.arange(system.get_nframes()) if steps is None else np.asarray(steps)
        tic = time.perf_counter()
        domain = self.domain_reasons(frame_list)
        self.timing["domain_s"] += time.perf_counter() - tic
        if self.factorize:
            # Cholesky factors of the blocks that pay for themselves over these rows
            per_frame = 3 * int(frame_list[0].atype.size) + 1 + (9 if self.virial else 0)
            self.kf.factorize(expected_rows=len(frame_list) * per_frame)
        force, energy, atom, virial = [], [], [], []
        for i, frame in zip(idx, tqdm(frame_list, desc="KPU", unit="frame",
                                      disable=None if progress is None else not progress)):
            one = self.frame_kpu(frame, int(i))
            force.append(one.force)
            energy.append(one.energy)
            atom.append(kpu_math.atom_kpu(one.components))
            virial.append(one.virial)
        meta = {
            "model": str(self.model),
            "kalman_state": str(self.state_path),
            "seed": self.seed,
            "natoms": int(frame_list[0].atype.size),
            "force_kpu": "mean of kpu_{i,a} over N/2 random atoms and 3 components (paper)",
            "force_rows": self.jacobian.path,
            "density_factor": self.density_factor,
            "training_domain": self.extra.get("domain"),
        }
        return KPUResult(idx, all_steps[idx], np.array(force), np.array(energy), np.array(atom),
                         self.calibration, meta, np.array(virial) if self.virial else None, domain)
