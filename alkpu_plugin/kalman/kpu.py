"""Kalman Prediction Uncertainty (the paper's Definition 3.1, Algorithms 2 and 3).

For an output h of the network, with G = dh/dw at the trained weights::

    KPU(x) = G^T P G = sum_l G_l^T P_l G_l            (block-diagonal P; Algorithm 2)

computed with the raw gradient (no normaliser), without the 1/lambda factor.

Force KPU (Algorithm 3): kpu_{i,a} = (dF_{i,a}/dw)^T P (dF_{i,a}/dw) per atom i and
component a.  From the same numbers:

* the paper's frame value: the mean of kpu_{i,a} over N/2 atoms drawn at random
  (seeded) and their 3 components;
* per-atom values KPU_i = sum_a kpu_{i,a}, the analogue of DP-GEN's per-atom
  force deviation (whose square is the sum over components of the variance).

Batching: :meth:`KalmanFilter.quadratic` reads each block of P once for all
rows given to it.
"""

from __future__ import annotations

import numpy as np

from .ekffm import KalmanFilter

__all__ = [
    "component_kpu",
    "atom_kpu",
    "paper_force_kpu",
    "paper_atoms",
    "bruteforce_kpu",
]


def component_kpu(kf: KalmanFilter, rows: np.ndarray, rows_per_pass: int = 512) -> np.ndarray:
    """g^T P g for every row of ``rows`` (m, n)."""
    rows = np.atleast_2d(rows)
    out = np.empty(rows.shape[0])
    for start in range(0, rows.shape[0], rows_per_pass):
        out[start : start + rows_per_pass] = kf.quadratic(rows[start : start + rows_per_pass])
    return out


def atom_kpu(kpu_components: np.ndarray) -> np.ndarray:
    """Per-atom KPU_i = sum over the 3 components (input: 3N values, atom-major)."""
    return np.asarray(kpu_components).reshape(-1, 3).sum(axis=1)


def paper_atoms(natoms: int, seed: int, frame_index: int) -> np.ndarray:
    """The N/2 atoms (at least one) whose components the paper's force KPU averages.

    Seeded by (seed, frame index), so a frame gets the same atoms whichever
    process or chunk computes it.
    """
    rng = np.random.default_rng([int(seed), int(frame_index)])
    return np.sort(rng.choice(natoms, size=max(1, natoms // 2), replace=False))


def paper_force_kpu(kpu_components: np.ndarray, atoms: np.ndarray) -> float:
    """Mean of kpu_{i,a} over ``atoms`` and their 3 components."""
    return float(np.asarray(kpu_components).reshape(-1, 3)[atoms].mean())


def bruteforce_kpu(kf: KalmanFilter, g: np.ndarray) -> float:
    """g^T P g for one gradient, block by block with dense matrices (tests only)."""
    g = np.asarray(g, dtype=np.float64)
    total = 0.0
    for i, (a, b) in enumerate(kf.layout.blocks):
        total += float(g[a:b] @ (kf.block(i) @ g[a:b]))
    return total
