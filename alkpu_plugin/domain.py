"""Configurations outside the model's domain: found from the structure, not from KPU.

A configuration whose atoms have no neighbour inside the cut-off, or whose cell
has a density far from anything the model was trained on (an exploded or
collapsed box), gives small descriptors, small weight gradients and so a small
KPU: the uncertainty alone would call it reliable. Such frames are flagged here
and DP-GEN counts them as failed.

* :func:`training_domain` summarises training frames (their range of number
  densities), at training time; the summary travels in the Kalman state;
* :func:`frame_reasons` says, per frame, why it lies outside (``""`` when it
  does not).

A leaf module: NumPy and ASE's neighbour list only.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["DEFAULT_DENSITY_FACTOR", "training_domain", "merge_domains", "frame_reasons"]

#: a frame is outside when its density is below min / factor or above max * factor
#: of the training frames' densities (1.3: 30 % beyond the densest or loosest cell)
DEFAULT_DENSITY_FACTOR = 1.3


def _densities(coords_natoms: int, cells: np.ndarray) -> np.ndarray:
    volume = np.abs(np.linalg.det(np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)))
    with np.errstate(divide="ignore"):
        return np.where(volume > 0, coords_natoms / volume, np.nan)


def training_domain(systems: Iterable[tuple[int, np.ndarray, bool]]) -> dict | None:
    """Range of number densities (atoms/A^3) of training frames.

    ``systems``: (atoms per frame, cells (F, 3, 3) or (F, 9), non-periodic?) per
    system. Returns ``None`` when no frame is periodic.
    """
    values = []
    nframes = 0
    for natoms, cells, nopbc in systems:
        if nopbc:
            continue
        rho = _densities(int(natoms), cells)
        rho = rho[np.isfinite(rho)]
        values.append(rho)
        nframes += rho.size
    if not nframes:
        return None
    values = np.concatenate(values)
    return {"density": [float(values.min()), float(values.max())], "frames": int(nframes)}


def merge_domains(a: dict | None, b: dict | None) -> dict | None:
    """The union of two training domains (a model trained further on new data)."""
    if not a or not b:
        return a or b
    return {"density": [min(a["density"][0], b["density"][0]), max(a["density"][1], b["density"][1])],
            "frames": int(a.get("frames", 0)) + int(b.get("frames", 0))}


def _isolated(coord: np.ndarray, cell: np.ndarray | None, rcut: float) -> np.ndarray:
    """Indices of atoms with no other atom (or periodic image) within ``rcut``."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    natoms = coord.shape[0]
    box = None if cell is None else np.asarray(cell, dtype=float).reshape(3, 3)
    lengths = None if box is None else np.diag(box)
    if natoms > 1 and (box is None or (np.count_nonzero(box - np.diag(lengths)) == 0
                                       and np.all(lengths > rcut))):
        # the nearest other atom (minimum image in an orthorhombic box longer than rcut):
        # a k-d tree query, much cheaper than every neighbour within rcut
        from scipy.spatial import cKDTree

        if box is None:
            tree, points = cKDTree(coord), coord
        else:
            points = np.mod(coord, lengths)
            points[points >= lengths] = 0.0  # mod can round up to the length itself
            tree = cKDTree(points, boxsize=lengths)
        dist, _ = tree.query(points, k=2, distance_upper_bound=float(rcut))
        return np.nonzero(~np.isfinite(dist[:, 1]))[0]
    if cell is None:
        atoms = Atoms(positions=coord, pbc=False)
    else:
        atoms = Atoms(positions=coord, cell=np.asarray(cell).reshape(3, 3), pbc=True)
    first = neighbor_list("i", atoms, float(rcut), self_interaction=False)
    counts = np.bincount(first, minlength=natoms)
    return np.nonzero(counts == 0)[0]


def frame_reasons(coords: np.ndarray, cells: np.ndarray | None, rcut: float | None,
                  domain: dict | None, density_factor: float = DEFAULT_DENSITY_FACTOR) -> list[str]:
    """Why each frame lies outside the model's domain; ``""`` for frames inside.

    ``cells`` is ``None`` for non-periodic frames; ``rcut`` the model's cut-off
    (no neighbour check without it); ``domain`` from :func:`training_domain` (no
    density check without it).
    """
    coords = np.asarray(coords, dtype=np.float64)
    out = []
    lo = hi = None
    if domain and cells is not None and density_factor:
        lo = domain["density"][0] / float(density_factor)
        hi = domain["density"][1] * float(density_factor)
    for f in range(coords.shape[0]):
        reasons = []
        cell = None if cells is None else np.asarray(cells[f]).reshape(3, 3)
        if lo is not None:
            rho = float(_densities(coords.shape[1], cell)[0])
            if not (lo <= rho <= hi):
                reasons.append(
                    f"density {rho:.4g} atoms/A^3 outside {lo:.4g}..{hi:.4g} (training data "
                    f"{domain['density'][0]:.4g}..{domain['density'][1]:.4g}, factor {density_factor:g})")
        if rcut:
            lonely = _isolated(coords[f], cell, rcut)
            if lonely.size:
                reasons.append(f"{lonely.size} atom(s) with no neighbour within rcut {float(rcut):g} A "
                               f"(first: atom {int(lonely[0])})")
        out.append("; ".join(reasons))
    return out
