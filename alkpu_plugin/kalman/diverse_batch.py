"""Diverse batches by virtual Kalman updates (Theorem 4.2; ALGORITHMS.md §5 and §7).

To the filter, labelling a frame is a measurement of its rows G_f (force components,
for instance) with noise ``noise``; it would update P to

    P' = P - P G_f^T (G_f P G_f^T + noise I)^-1 G_f P

and reduce the weights' entropy by ½ log det(I + G_f P G_f^T / noise). A batch chosen
one frame at a time, each candidate scored with the P updated by the frames already
chosen ("virtual updates"), avoids taking two frames that teach the same thing.

P' is never formed: with K = G P G^T, the Gram matrix of all candidates' rows in the P
metric, the updated Gram matrix after choosing the rows B is

    K' = K - K[:, B] (K[B, B] + noise I)^-1 K[B, :]

which is one step of a block pivoted Cholesky factorisation of K + noise I: the chosen
frames are the pivots, and each step adds the columns V = K'[:, B] L^-T
(L L^T = K'[B, B] + noise I) to a factor. Each step costs O(M r) for M candidate rows
and r rows per frame; K itself costs one product with P per block.

A frame whose rows lie in the span of the rows already chosen (an exact duplicate, a
frame equal to a combination of chosen ones) would still score above zero with
noise > 0, since a second measurement halves the remaining variance again; its label
adds no new direction, so it is never chosen: a noise-free factor of K is kept beside
the noisy one and a frame whose residual trace is at most ``span_tol`` of its KPU is
skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .ekffm import KalmanFilter

__all__ = ["DiverseBatch", "gram", "greedy_batch"]


def gram(kf: KalmanFilter, rows: np.ndarray) -> np.ndarray:
    """K = G P G^T for the rows G (M, n): one product with each block of P."""
    G = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    if G.shape[1] != kf.layout.n:
        raise ValueError(f"rows have {G.shape[1]} entries, the model has {kf.layout.n} weights")
    K = np.zeros((G.shape[0], G.shape[0]))
    for i, (a, b) in enumerate(kf.layout.blocks):
        Gb = G[:, a:b]
        K += Gb @ (kf.block(i) @ Gb.T)
    return 0.5 * (K + K.T)


@dataclass
class DiverseBatch:
    """The frames chosen, in order, with what each one was worth when chosen."""

    frames: list[int] = field(default_factory=list)
    #: ½ log det(I + K'_ff / noise) of each chosen frame, with the P of the frames before it
    gains: list[float] = field(default_factory=list)
    #: trace of each chosen frame's KPU block when chosen (its KPU after the virtual updates)
    kpu: list[float] = field(default_factory=list)
    #: frames never chosen because their rows lie in the span of chosen rows
    redundant: list[int] = field(default_factory=list)

    @property
    def total_gain(self) -> float:
        return float(sum(self.gains))


def _groups(groups: Sequence[Sequence[int]] | np.ndarray, m: int) -> list[np.ndarray]:
    if isinstance(groups, np.ndarray) and groups.ndim == 1 and groups.size == m:
        # a frame label per row
        labels = np.asarray(groups)
        return [np.flatnonzero(labels == f) for f in range(int(labels.max()) + 1)] if m else []
    return [np.asarray(g, dtype=np.int64) for g in groups]


def greedy_batch(K: np.ndarray, groups, k: int, noise: float, span_tol: float = 1e-8,
                 eligible: np.ndarray | None = None) -> DiverseBatch:
    """Choose up to ``k`` frames greedily by entropy reduction under virtual Kalman updates.

    ``K`` is the Gram matrix of all candidate rows (:func:`gram`); ``groups`` gives each
    frame's rows (a list of row-index arrays, or one frame label per row); ``noise`` (> 0)
    is the measurement noise in the units of K (the filter's own is λ). ``eligible`` (one
    bool per frame) limits which frames may be chosen; the others still count if given.
    Fewer than ``k`` frames come back when no eligible frame adds a new direction.
    """
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square Gram matrix, got shape {K.shape}")
    if not noise > 0:
        raise ValueError(f"noise must be > 0, got {noise}")
    frames = _groups(groups, K.shape[0])
    nf = len(frames)
    allowed = np.ones(nf, bool) if eligible is None else np.asarray(eligible, bool).copy()
    # the diagonal blocks of the noisy (C) and the noise-free (R) conditional Gram matrices
    C = [K[np.ix_(f, f)].copy() for f in frames]
    R = [c.copy() for c in C]
    start = np.array([max(float(np.trace(c)), 0.0) for c in C])
    V = np.zeros((K.shape[0], 0))  # K - V V^T: the Gram matrix after the virtual updates
    W = np.zeros((K.shape[0], 0))  # K - W W^T: after projecting out the chosen rows' span
    out = DiverseBatch()
    for _ in range(min(k, nf)):
        best, best_gain = -1, -np.inf
        for f in np.flatnonzero(allowed):
            if np.trace(R[f]) <= span_tol * start[f]:
                allowed[f] = False
                out.redundant.append(int(f))
                continue
            ev = np.linalg.eigvalsh(C[f])
            gain = 0.5 * float(np.sum(np.log1p(np.maximum(ev, 0.0) / noise)))
            if gain > best_gain:
                best, best_gain = int(f), gain
        if best < 0:
            break
        rows = frames[best]
        out.frames.append(best)
        out.gains.append(best_gain)
        out.kpu.append(float(np.trace(C[best])))
        allowed[best] = False
        # noisy factor: V_new = K'[:, B] L^-T with L L^T = K'[B, B] + noise I
        col = K[:, rows] - V @ V[rows].T
        L = np.linalg.cholesky(C[best] + noise * np.eye(rows.size))
        Vn = np.linalg.solve(L, col.T).T
        V = np.hstack([V, Vn])
        # noise-free factor, through the eigenvalues that are not round-off
        colr = K[:, rows] - W @ W[rows].T
        ev, Q = np.linalg.eigh(0.5 * (R[best] + R[best].T))
        keep = ev > max(span_tol * start[best], 0.0) + 1e-300
        Wn = colr @ (Q[:, keep] / np.sqrt(ev[keep]))
        W = np.hstack([W, Wn])
        for f, idx in enumerate(frames):
            if allowed[f]:
                C[f] -= Vn[idx] @ Vn[idx].T
                R[f] -= Wn[idx] @ Wn[idx].T
    return out
