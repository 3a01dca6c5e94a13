"""RLEKF's scalar measurement for a vector label (the sign trick, Algorithm 4).

Given labels y (m components per frame, B frames), predictions yhat(w), a
prefactor p and normalisers c (error) and c_g (gradient)::

    e      = p * (y - yhat) / c                 per component
    s      = sign(e)   (+1 where e == 0)
    innov  = sqrt(B) * mean(|e|)                scalar innovation, >= 0
    z(w)   = sum s * p * yhat(w) / c_g          scalarised prediction; H = grad_w z

The network adapter builds ``z`` in its own framework (it needs ``s`` on the
graph); this module is the numerical definition both sides share.

Normalisers (ALGORITHMS.md, DeePMD-kit's ``KFOptimizerWrapper``): the energy
update uses c = c_g = N (atoms in the frame); a force update over n_g atoms
uses c = N for the error and c_g = 3 n_g N for H.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "AUTO_LAMBDA_MIN_WEIGHTS",
    "auto_lambda1",
    "signs",
    "innovation",
    "energy_normalisers",
    "force_normalisers",
    "draw_force_groups",
]


#: ``kalman_lambda`` "auto": models with at least this many weights start from lambda_1 0.95
AUTO_LAMBDA_MIN_WEIGHTS = 20_000


def auto_lambda1(n_weights: int) -> float:
    """The first fading-memory factor ``kalman_lambda`` "auto" gives a model of ``n_weights``.

    0.95 from :data:`AUTO_LAMBDA_MIN_WEIGHTS` weights on, 0.98 (the paper's) below.  With
    force errors not divided by N, the faster forgetting learns the forces of models of 92k-411k
    weights in a third to half of the steps the paper's 0.98 needs; on a 7k-weight two-species
    model trained on 10 frames it made the training unstable on every seed tried, where 0.98
    was stable (docs/rlekf.md, "The defaults").
    """
    return 0.95 if int(n_weights) >= AUTO_LAMBDA_MIN_WEIGHTS else 0.98


def signs(y: np.ndarray, yhat: np.ndarray, prefactor: float) -> np.ndarray:
    """+1/-1 per component: the sign of p * (y - yhat) (+1 at zero)."""
    e = prefactor * (np.asarray(y, dtype=np.float64) - np.asarray(yhat, dtype=np.float64))
    return np.where(e < 0.0, -1.0, 1.0)


def innovation(y: np.ndarray, yhat: np.ndarray, prefactor: float, c: float) -> float:
    """sqrt(B) * mean |p (y - yhat) / c| over all components of a (B, ...) batch."""
    y = np.asarray(y, dtype=np.float64)
    e = prefactor * (y - np.asarray(yhat, dtype=np.float64)) / c
    nframes = y.shape[0] if y.ndim > 0 else 1
    return float(np.sqrt(nframes) * np.mean(np.abs(e)))


def energy_normalisers(natoms: int) -> tuple[float, float]:
    """(c, c_g) of the energy update."""
    return float(natoms), float(natoms)


def force_normalisers(natoms: int, atoms_per_update: int, per_natoms: bool = True) -> tuple[float, float]:
    """(c, c_g) of a force update over ``atoms_per_update`` atoms: (N, 3 n_g N), or (1, 3 n_g)
    when the force error is not divided by the number of atoms N (``per_natoms`` false)."""
    n = float(natoms) if per_natoms else 1.0
    return n, float(3 * atoms_per_update) * n


def draw_force_groups(
    rng: np.random.Generator, natoms: int, nupdates: int, atoms_per_update: int
) -> np.ndarray:
    """Atom indices for ``nupdates`` force updates, shape (nupdates, n_g).

    Drawn without replacement when the frame has enough atoms (so one batch
    never repeats an atom), with replacement otherwise.
    """
    total = nupdates * atoms_per_update
    replace = total > natoms
    return rng.choice(natoms, size=total, replace=replace).reshape(
        nupdates, atoms_per_update
    )
