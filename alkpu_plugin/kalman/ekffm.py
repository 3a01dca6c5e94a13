"""EKF with fading memory (EKFfm, the paper's Algorithm 1) on a block-diagonal P.

For a scalar measurement with gradient H (length n) and innovation
``innov = y - h(w)``::

    A   = 1 / (L * lambda + sum_l H_l^T P_l H_l)        (L blocks; L = 1 is Algorithm 1)
    K_l = P_l H_l
    w_l += A * innov * K_l
    P_l  = (P_l - A K_l K_l^T) / lambda
    lambda <- nu * lambda + 1 - nu

Implementation notes (the update is memory-bandwidth bound: its cost is the
passes it makes over P):

* each block is stored as ``P_l = scale * S_l`` with one shared scalar
  ``scale``: the division by lambda is a scalar operation, not a pass over P;
* blocks of the same size are stored together in one array, and the
  products S_l H_l are computed group by group. A float32 P is stored in full
  (both triangles, exactly symmetric) and a group's products are one batched
  product (NumPy ``einsum``, split over the process's CPUs, since it releases
  the GIL): OpenBLAS ``ssymv`` reads blocks of a few hundred rows at a
  fraction of the memory rate, and this reads the whole block faster than
  ``ssymv`` reads half of it. A float64 P keeps only its upper triangle valid
  and uses BLAS ``dsymv`` per block, which reads half of each block at close
  to the memory rate;
* the rank-one downdates are deferred: the filter keeps
  ``S_l^eff = S_l - sum_j w_lj w_lj^T`` with up to ``defer`` pending
  vectors (``w = sqrt(A s) v``), computes ``S_l^eff H_l`` as the stored product minus the pending
  terms (O(n defer)), and applies them together as one in-place BLAS update
  per block (``gemm`` on a full block, ``syrk`` on an upper triangle: one read
  and write of what is stored) when ``defer`` are pending or P is read. The
  result is the same update in another order of the same sums (round-off
  apart);
* the gradient and weights are float64; P is float64 by default, float32 on
  request (the scalars A, lambda and scale are always float64).

Numerical safeguards (docs/rlekf.md, "Numerical safeguards"):

* symmetry is structural: single-block reads use the upper triangle only, and
  every write to a full block (downdate, floor, repair) is symmetric;
* every update checks, at no extra cost, that ``H_l^T S_l H_l`` (computed for K_l
  anyway) is finite and >= 0 for every block; a negative or non-finite value
  proves the block indefinite (or damaged) and it is repaired before it is used,
  so the denominator ``L lambda + sum_l H_l^T P_l H_l`` stays >= L lambda > 0;
* the downdate removes ``A s |v_l|^2 <= lambda_max(S_l) <= trace(S_l)`` from a
  semidefinite block; more than the (tracked) trace proves it indefinite: repaired first;
* resolution floor: when ``H_l^T S_l H_l < f |H_l|^2`` with ``f = eps * trace(S_l)``
  (the gradient probes a direction below what P's type resolves, where a round-off
  negative eigenvalue would grow at each such update), ``f I`` is added to S_l first
  (process noise on that block, O(n_l); counted in ``floor_events``);
* every ``10 * n_l`` updates (at least 100) block l gets a Cholesky test of
  ``S_l + tol * max(diag S_l) I`` with ``tol = n_l * eps`` (eps of P's type): it
  fails only when an eigenvalue is below about ``-tol`` times the largest;
* the repair raises every eigenvalue of the block below ``tol`` times its largest
  to that floor (the nearest matrix with that floor; a block with non-finite
  entries or no positive eigenvalue is reset to ``p0 I``), records it in
  :attr:`KalmanFilter.repairs` and warns with :class:`KalmanNumericsWarning`
  naming the block and the update (the first repair of a block and then its 2nd,
  4th, 8th, ...).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas, lapack

from .layout import BlockLayout

__all__ = ["KalmanFilter", "FilterOptions", "KalmanNumericsWarning"]

_BLAS = {
    np.dtype(np.float64): (blas.dsymv, blas.dgemm, blas.dsymm, blas.dsyrk),
    np.dtype(np.float32): (blas.ssymv, blas.sgemm, blas.ssymm, blas.ssyrk),
}
_POTRF = {np.dtype(np.float64): lapack.dpotrf, np.dtype(np.float32): lapack.spotrf}
_TRI = {  # for a factorised P: triangular matrix-vector / matrix-matrix products
    np.dtype(np.float64): (blas.dtrmv, blas.dtrmm),
    np.dtype(np.float32): (blas.strmv, blas.strmm),
}

# fold ``scale`` into the blocks when it leaves this range (rare: with the
# default lambda_1, nu the product of 1/lambda_k converges to about 5e6)
_SCALE_LIMIT = 1e12

# the periodic definiteness test of a block of n weights runs every
# max(_CHECK_MIN, _CHECK_PER_WEIGHT * n) updates: its Cholesky costs n^3/3
# flops against about 2 n^2 memory accesses per update, so the share of the
# time it takes does not grow with the block
_CHECK_PER_WEIGHT = 10
_CHECK_MIN = 100
# a downdate that removes more than this times the block's trace proves it indefinite
_TRACE_SLACK = 1.01
# rank-one downdates kept pending before one BLAS call per block applies them: a rank-32
# update of a block costs about one pass over it, like a rank-one update, while the
# pending terms cost O(n) per update and pending vector
DEFER = 32
# groups of blocks at least this large (bytes) get their products split over threads
_THREAD_MIN_BYTES = 1 << 23
# blocks per batched product inside a thread (their pending vectors stay in cache between uses)
_SUB_BLOCKS = 16


class KalmanNumericsWarning(RuntimeWarning):
    """A block of P was found indefinite (or non-finite) and was repaired."""


@dataclass(frozen=True)
class FilterOptions:
    """Hyper-parameters of the filter (defaults: ALGORITHMS.md, [code])."""

    lambda1: float = 0.98
    nu: float = 0.9987
    p0: float = 1.0
    p_dtype: str = "float64"

    def __post_init__(self) -> None:
        if not (0.0 < self.lambda1 <= 1.0):
            raise ValueError(
                f"kalman_lambda (lambda_1) must be in (0, 1], got {self.lambda1}"
            )
        if not (0.0 <= self.nu <= 1.0):
            raise ValueError(f"kalman_nue (nu) must be in [0, 1], got {self.nu}")
        if not (self.p0 > 0.0):
            raise ValueError(f"p0 must be positive, got {self.p0}")
        if self.p_dtype not in ("float64", "float32"):
            raise ValueError(f'p_dtype must be "float64" or "float32", got {self.p_dtype!r}')


class _Group:
    """The blocks of one size, stored together.

    ``S[j]`` holds block ``index[j]``: the Fortran-ordered view ``S[j].T`` is the block BLAS
    works on in place (when it is stored in full it is symmetric, so ``S[j]`` is the same
    matrix); ``start[j]`` is the position of that block's first weight in the flat vector;
    ``W[j, :k]`` are its k pending downdates, ``S_eff = S - W[j, :k].T W[j, :k]``; ``h`` and
    ``v`` are buffers for the update's gradients and products.
    """

    def __init__(self, index: list[int], ranges: list[tuple[int, int]], m: int, defer: int, dtype):
        self.index = np.asarray(index, dtype=np.intp)
        self.start = np.asarray([a for a, _ in ranges], dtype=np.int64)
        self.S = np.zeros((len(index), m, m), dtype=dtype)
        self.S[:, np.arange(m), np.arange(m)] = 1.0
        self.W = np.zeros((len(index), defer, m), dtype=dtype)
        self.h = np.empty((len(index), m), dtype=dtype)
        self.v = np.empty((len(index), m), dtype=dtype)


def _threads() -> int:
    """CPUs this process may use (at most ``OMP_NUM_THREADS`` when that is set)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, n)


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="alkpu-kalman")
    return _POOL


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool when needed."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pending_terms(W: np.ndarray, h: np.ndarray, out: np.ndarray) -> None:
    """``out[j] -= sum_r W[j, r] (W[j, r] . h[j])`` for every j (the pending downdates)."""
    coef = np.matmul(W, h[:, :, None])  # (count, k, 1)
    out -= np.matmul(coef.transpose(0, 2, 1), W)[:, 0, :]


def _chunk_products(S: np.ndarray | None, W: np.ndarray, k: int, h: np.ndarray, out: np.ndarray) -> None:
    """``out[j] = S[j] h[j] - pending terms`` over a run of blocks, a few blocks at a time so
    that each block's ``k`` pending vectors are read from memory once. ``S`` None: ``out``
    already holds ``S[j] h[j]``."""
    for a in range(0, h.shape[0], _SUB_BLOCKS):
        b = a + _SUB_BLOCKS
        if S is not None:
            np.einsum("bij,bj->bi", S[a:b], h[a:b], out=out[a:b])
        if k:
            _pending_terms(W[a:b, :k], h[a:b], out[a:b])


def _batched_products(S: np.ndarray | None, W: np.ndarray, k: int, h: np.ndarray,
                      out: np.ndarray) -> np.ndarray:
    """:func:`_chunk_products` for a whole group, split over threads when the group is large
    (NumPy's einsum and matmul release the GIL; the products are bound by reading S)."""
    count = h.shape[0]
    nbytes = (S.nbytes if S is not None else 0) + W[:, :k].nbytes
    nthreads = min(_threads(), count) if nbytes >= _THREAD_MIN_BYTES else 1
    if nthreads <= 1:
        _chunk_products(S, W, k, h, out)
        return out
    cuts = np.linspace(0, count, nthreads + 1).astype(int)
    jobs = [
        _pool().submit(_chunk_products, None if S is None else S[a:b], W[a:b], k, h[a:b], out[a:b])
        for a, b in zip(cuts[:-1], cuts[1:])
    ]
    for job in jobs:
        job.result()
    return out


class KalmanFilter:
    """Block-diagonal EKFfm state and its update.

    Parameters
    ----------
    layout
        Which weights form which block.
    options
        lambda_1, nu, p0 and the storage type of P.
    defer
        Rank-one downdates kept pending before they are applied together
        (module notes); 1 applies each at once.
    """

    def __init__(
        self,
        layout: BlockLayout,
        options: FilterOptions | None = None,
        *,
        check_every: int | None = None,
        defer: int = DEFER,
    ):
        self.layout = layout
        self.options = options or FilterOptions()
        self.dtype = np.dtype(self.options.p_dtype)
        self._symv, self._gemm, self._symm, self._syrk = _BLAS[self.dtype]
        if int(defer) < 1:
            raise ValueError(f"defer must be >= 1, got {defer}")
        self.defer = int(defer)
        # S_l, grouped by block size; self._blocks[l] is the Fortran-ordered view of S_l
        sizes = layout.block_sizes
        by_size: dict[int, list[int]] = {}
        for i, m in enumerate(sizes):
            by_size.setdefault(m, []).append(i)
        self._groups = [
            _Group(idx, [layout.blocks[i] for i in idx], m, self.defer, self.dtype)
            for m, idx in by_size.items()
        ]
        self._blocks: list[np.ndarray] = [None] * len(sizes)  # type: ignore[list-item]
        self._where: list[tuple[int, int]] = [(0, 0)] * len(sizes)
        for g, group in enumerate(self._groups):
            for j, i in enumerate(group.index):
                self._blocks[i] = group.S[j].T
                self._where[i] = (g, j)
        self._sizes = np.asarray(sizes, dtype=np.float64)
        # runs of blocks that are consecutive both in a group and in the flat weight vector:
        # (group, first row, last row + 1, first weight); a few per tensor group of the layout
        self._runs: list[tuple[int, int, int, int]] = []
        for g, group in enumerate(self._groups):
            first = group.start
            m = group.h.shape[1]
            breaks = np.flatnonzero(np.diff(first) != m) + 1
            for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(first)]):
                self._runs.append((g, int(a), int(b), int(first[a])))
        # float32: full blocks and batched products; float64: upper triangles and symv (module notes)
        self._full = self.dtype == np.float32
        # pending downdates: S_l^eff = S_l - sum_j w_lj w_lj^T, j < _npending
        self._npending = 0
        self.scale = float(self.options.p0)
        self.lam = float(self.options.lambda1)
        self.nupdates = 0
        # per block: True once S_l holds its Cholesky factor U_l (S_l = U_l^T U_l), see factorize()
        self.factored: list[bool] = [False] * len(self._blocks)
        # numerical safeguards: tolerance n_l * eps per block, periodic test interval
        eps = float(np.finfo(self.dtype).eps)
        self.tolerance: list[float] = [m * eps for m in sizes]
        self._tolerance = np.asarray(self.tolerance)
        if check_every is None:
            self.check_interval = [max(_CHECK_MIN, _CHECK_PER_WEIGHT * m) for m in sizes]
        else:
            if int(check_every) < 0:
                raise ValueError(f"check_every must be >= 0 (0: no periodic test), got {check_every}")
            self.check_interval = [int(check_every)] * len(self._blocks)
        #: one dict per repair: update, block, reason, min_eig_ratio, action
        self.repairs: list[dict] = []
        #: updates at which a block got its resolution floor added (see update())
        self.floor_events = 0
        #: False switches every safeguard off (the bare update, for comparisons only)
        self.safeguards = True
        self.last_update: dict = {}  # the terms of the newest update (see update())
        # trace of each S_l, kept up to date by the updates; recomputed when marked stale
        self._traces = self._sizes.copy()
        self._stale = np.zeros(len(self._blocks), dtype=bool)

    # ------------------------------------------------------- stored blocks
    @property
    def blocks(self) -> tuple[np.ndarray, ...]:
        """The blocks S_l (P_l = scale * S_l), pending downdates applied.

        Their upper triangles hold S_l (a float32 P also keeps the lower ones). They are views
        of the filter's storage: change them in place (symmetrically), or with :meth:`set_block`.
        """
        self.flush()
        return tuple(self._blocks)

    def set_block(self, index: int, S: np.ndarray) -> None:
        """Store ``S`` as block ``index`` (what counts is its upper triangle)."""
        self.flush()
        g, j = self._where[index]
        self._blocks[index] = self._groups[g].S[j].T  # its storage again, also after factorize()
        m = self._blocks[index].shape[0]
        S = np.asarray(S)
        if S.shape != (m, m):
            raise ValueError(f"block {index} is {m} x {m}, got an array of shape {S.shape}")
        if self._full:  # the upper triangle, mirrored
            upper = np.triu(S)
            S = upper + np.triu(upper, 1).T
        np.copyto(self._blocks[index], S, casting="unsafe")
        self.factored[index] = False
        self._stale[index] = True

    def flush(self) -> None:
        """Apply the pending rank-one downdates to the stored blocks (one BLAS call per block)."""
        k = self._npending
        if not k:
            return
        for group in self._groups:
            for j, i in enumerate(group.index):
                if self.factored[i]:
                    continue
                # S <- S - W^T W in place (W[j, :k].T and the block are Fortran-ordered)
                Wt = group.W[j, :k].T
                if self._full:
                    self._gemm(-1.0, Wt, Wt, beta=1.0, c=self._blocks[i], trans_b=1, overwrite_c=1)
                else:
                    self._syrk(-1.0, Wt, beta=1.0, c=self._blocks[i], trans=0, lower=0, overwrite_c=1)
        self._npending = 0

    def _pending(self, index: int) -> np.ndarray:
        """The pending downdates of block ``index`` as rows w_j (k, m): S_eff = S - sum_j w_j w_j^T."""
        g, j = self._where[index]
        return self._groups[g].W[j, : self._npending, :]

    def _pending_factor(self, index: int) -> np.ndarray:
        """The pending downdates of block ``index`` as the columns of a Fortran-ordered (m, k) view."""
        return self._pending(index).T

    def _sv(self, index: int, h: np.ndarray) -> np.ndarray:
        """``S_l^eff h`` for block ``index``: symv with the stored block minus the pending terms."""
        v = self._symv(1.0, self._blocks[index], h)
        if self._npending:
            W = self._pending(index)
            v -= (W @ h) @ W
        return v

    def _symv_each(self, group: _Group, h: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``S_l h_l`` for every block of ``group`` from the upper triangles (one symv each)."""
        for j, i in enumerate(group.index):
            out[j] = self._symv(1.0, self._blocks[i], h[j])
        return out

    # ------------------------------------------------------------------ update
    def update(self, H: np.ndarray, innovation: float) -> np.ndarray:
        """One scalar-measurement update; returns the weight increment.

        Parameters
        ----------
        H
            Gradient of the (scalar) prediction with respect to the flat
            weights, length ``layout.n``.
        innovation
            ``y - h(w)`` for that scalar measurement.

        Returns
        -------
        numpy.ndarray
            ``A * innovation * K`` (float64, length n): add it to the weights.
        """
        if any(self.factored):
            raise RuntimeError("this filter was factorised for queries (factorize()); it cannot be updated")
        H = np.asarray(H, dtype=np.float64).reshape(-1)
        if H.shape[0] != self.layout.n:
            raise ValueError(f"gradient has {H.shape[0]} entries, model has {self.layout.n}")
        if not np.all(np.isfinite(H)) or not np.isfinite(innovation):
            raise FloatingPointError(
                "non-finite gradient or innovation in the Kalman update "
                "(the model diverged or the data hold NaN/inf)"
            )
        t = self.nupdates + 1  # the number of this update
        guard = self.safeguards
        k = self._npending
        nblocks = len(self._blocks)
        # K_l / scale = S_l^eff H_l for every block, one product per group of equal blocks:
        # the gradients into group.h, the products into group.v
        for g, a, b, start in self._runs:  # each block's gradient, (count, m) per group
            group = self._groups[g]
            group.h[a:b] = H[start:start + (b - a) * group.h.shape[1]].reshape(b - a, -1)
        q = np.empty(nblocks)
        hh = np.empty(nblocks)
        for group in self._groups:
            h, v = group.h, group.v
            if self._full:
                _batched_products(group.S, group.W, k, h, v)
            else:  # symv per block, then the pending terms
                _batched_products(None, group.W, k, h, self._symv_each(group, h, v))
            q[group.index] = np.einsum("bm,bm->b", h, v, dtype=np.float64)
            hh[group.index] = np.einsum("bm,bm->b", h, h, dtype=np.float64)

        def h_of(i: int) -> np.ndarray:
            g, j = self._where[i]
            return self._groups[g].h[j]

        def redo(i: int, v: np.ndarray) -> None:
            g, j = self._where[i]
            self._groups[g].v[j] = v
            q[i] = max(float(np.dot(h_of(i), v)), 0.0)

        if guard:
            damaged = ~(q >= 0.0)
            for i in np.flatnonzero(damaged):  # negative or NaN: S_l is indefinite or damaged
                reason = (f"H^T P H = {q[i] * self.scale:.3g} < 0 along this update's gradient"
                          if np.isfinite(q[i]) else "H^T P H is not finite")
                redo(i, self._repair_and_redo(i, t, reason, h_of(i)))
            floor = self._tolerance * self._all_traces() / self._sizes  # n eps mean eigenvalue
            for i in np.flatnonzero(~damaged & (q < floor * hh)):
                # h probes a direction where P is below the resolution of its type; a
                # round-off negative eigenvalue there would grow at every such update.
                # Add floor * I to S_l first (process noise on this block; O(n)).
                S = self._blocks[i]
                S[np.diag_indices_from(S)] += floor[i]
                self._traces[i] += floor[i] * S.shape[0]
                self.floor_events += 1
                redo(i, self._sv(i, h_of(i)))
        lam = self.lam
        s = self.scale
        A = 1.0 / (nblocks * lam + s * q.sum())
        # For a semidefinite S_l the downdate removes A s |v_l|^2 <= |v_l|^2 / q_l
        # <= lambda_max(S_l) <= trace(S_l). More than the trace: S_l is indefinite
        # and the downdate would blow the negative part up; repair it first.
        vv = np.empty(nblocks)
        for group in self._groups:
            vv[group.index] = np.einsum("bm,bm->b", group.v, group.v, dtype=np.float64)
        if guard:
            traces = self._all_traces()
            over = np.flatnonzero(A * s * vv > _TRACE_SLACK * traces)
            for i in over:
                reason = (f"the update would remove {A * s * vv[i]:.3g} from a block whose trace is "
                          f"{self._trace(i):.3g} (in units of scale = {s:.3g})")
                g, j = self._where[i]
                redo(i, self._repair_and_redo(i, t, reason, h_of(i)))
                v = self._groups[g].v[j]
                vv[i] = float(np.dot(v, v))
            if len(over):
                A = 1.0 / (nblocks * lam + s * q.sum())
        # the terms of this update, for diagnostics: noise L*lambda, H^T P H, the gain factor A
        self.last_update = {"noise": nblocks * lam, "hph": s * float(q.sum()), "A": A,
                            "hph_blocks": (s * q).tolist()}
        gain = A * float(innovation) * s
        delta = np.empty(self.layout.n)
        for g, a, b, start in self._runs:
            v = self._groups[g].v[a:b]
            delta[start:start + v.size] = v.ravel()
        delta *= gain
        root = np.sqrt(A * s)
        for group in self._groups:
            # S <- S - A s v v^T (P = s S), pending until flush(): w = sqrt(A s) v
            np.multiply(group.v, root, out=group.W[:, k, :])
        self._traces -= A * s * vv
        self._npending = k + 1
        if self._npending == self.defer:
            self.flush()
        self.scale = s / lam
        self.lam = self.options.nu * lam + 1.0 - self.options.nu
        self.nupdates += 1
        self._renormalise()
        if guard:
            every = np.asarray(self.check_interval, dtype=np.int64)
            due = np.flatnonzero((every > 0) & ((t + np.arange(nblocks)) % np.maximum(every, 1) == 0))
            for i in due:
                self.check_block(int(i))
        return delta

    # --------------------------------------------------------- safeguards
    def indefinite(self, index: int) -> bool:
        """True when block ``index`` is not positive semidefinite within its tolerance.

        A Cholesky factorisation of ``S + tol * max(diag S) I`` (a copy;
        ``tol = n * eps``) succeeds exactly when every eigenvalue of S is above
        ``-tol * max(diag S)``; non-finite entries count as indefinite.
        Costs n^3/3 flops.
        """
        if self.factored[index]:
            return False  # a Cholesky factor: U^T U is semidefinite by construction
        C = self._effective(index)
        dmax = float(np.diagonal(C).max())
        if not np.isfinite(dmax) or dmax <= 0.0:
            return True
        C.flat[:: C.shape[0] + 1] += self.tolerance[index] * dmax
        _, info = _POTRF[self.dtype](C, lower=0, clean=0, overwrite_a=1)
        return info != 0

    def positive_definite(self, index: int) -> bool:
        """True when a Cholesky factorisation of block ``index`` (a copy) succeeds."""
        if self.factored[index]:
            return True
        _, info = _POTRF[self.dtype](self._effective(index), lower=0, clean=0, overwrite_a=1)
        return info == 0

    def _effective(self, index: int) -> np.ndarray:
        """A copy of block ``index`` with the pending downdates applied (the stored one is left as it is)."""
        C = np.array(self._blocks[index], order="F", copy=True)
        k = self._npending
        if self._npending:
            self._syrk(-1.0, self._pending_factor(index), beta=1.0, c=C, trans=0, lower=0, overwrite_c=1)
        return C

    def check_block(self, index: int) -> bool:
        """Test block ``index`` (:meth:`indefinite`) and repair it if needed; True if repaired."""
        self._stale[index] = True  # recompute the tracked trace (no drift)
        if self.indefinite(index):
            self._repair(index, self.nupdates, "Cholesky test failed")
            return True
        return False

    def check(self) -> list[int]:
        """Test every block now, repair those that need it; returns their indices."""
        return [i for i in range(len(self._blocks)) if self.check_block(i)]

    def _repair_and_redo(self, index: int, update: int, reason: str, h: np.ndarray) -> np.ndarray:
        """Repair block ``index``; its S h again."""
        self._repair(index, update, reason)
        return self._sv(index, h)

    def _repair(self, index: int, update: int, reason: str) -> None:
        """Make block ``index`` positive definite again (see the module notes); warn."""
        S = self.blocks[index]
        m = S.shape[0]
        tol = self.tolerance[index]
        U = np.triu(S).astype(np.float64)
        full = U + np.triu(U, 1).T
        ratio = float("nan")
        if np.all(np.isfinite(full)):
            w, V = np.linalg.eigh(full)
            wmax = float(w[-1])
        else:
            wmax = 0.0
        if wmax > 0.0:
            ratio = float(w[0]) / wmax
            floor = tol * wmax
            new = (V * np.maximum(w, floor)) @ V.T
            action = f"its eigenvalues below {tol:.3g} x the largest raised to that floor"
        else:
            new = np.eye(m) * (self.options.p0 / self.scale)
            action = f"reset to p0 I (p0 = {self.options.p0:g})"
        np.copyto(S, new, casting="unsafe")
        self._stale[index] = True
        count = sum(1 for r in self.repairs if r["block"] == index) + 1
        self.repairs.append(
            {"update": int(update), "block": int(index), "reason": reason,
             "min_eig_ratio": ratio, "action": action}
        )
        if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th, ... repair of this block
            a, b = self.layout.blocks[index]
            hint = (" (float32 P cannot resolve this P; \"p_dtype\": \"float64\" can)"
                    if self.dtype == np.float32 and count > 1 else "")
            warnings.warn(
                f"Kalman filter: block {index} of P (weights {a}..{b - 1}, {m} x {m}, "
                f"{self.dtype.name}) lost positive definiteness at update {update}: {reason}; "
                f"smallest/largest eigenvalue {ratio:.3g}; repaired: {action}. "
                f"Repair {count} of this block{hint}.",
                KalmanNumericsWarning,
                stacklevel=3,
            )

    def _renormalise(self) -> None:
        if 1.0 / _SCALE_LIMIT < self.scale < _SCALE_LIMIT:
            return
        self.flush()
        for group in self._groups:
            group.S *= self.scale
        self._traces *= self.scale
        self.scale = 1.0

    def _trace(self, index: int) -> float:
        """Trace of S_l^eff (tracked; recomputed from the block when marked stale)."""
        if self._stale[index]:
            trace = float(np.diagonal(self._blocks[index]).sum(dtype=np.float64))
            k = self._npending
            if k:  # the trace of S^eff: minus |w_j|^2 of the pending downdates
                W = self._pending(index).astype(np.float64)
                trace -= float(np.einsum("ij,ij->", W, W))
            self._traces[index] = trace
            self._stale[index] = False
        return float(self._traces[index])

    def _all_traces(self) -> np.ndarray:
        for i in np.flatnonzero(self._stale):
            self._trace(int(i))
        return self._traces

    # --------------------------------------------------------------- queries
    def factorize(self, expected_rows: int | None = None) -> int:
        """Replace each block S_l by its Cholesky factor U_l (S_l = U_l^T U_l), for queries.

        ``g^T P g = scale * |U g|^2`` then costs one triangular product
        (``trmm``: b^2 multiply-adds per row and block) instead of a symmetric
        one (``symm``: 2 b^2). Meant for a filter loaded only to be queried
        (the KPU engine): :meth:`update` refuses afterwards. A block that is not
        numerically positive definite keeps its ``symm`` path. Returns the
        number of blocks factorised. The factorisation costs b^3/3 per block,
        once, and saves b^2 per row: with ``expected_rows`` only the blocks
        that pay for themselves within that many rows (b <= 3 * rows) are
        factorised.
        """
        from scipy.linalg import lapack

        potrf = lapack.dpotrf if self.dtype == np.float64 else lapack.spotrf
        done = 0
        for i, S in enumerate(self.blocks):
            if self.factored[i]:
                done += 1
                continue
            if expected_rows is not None and S.shape[0] > 3 * expected_rows:
                continue
            U, info = potrf(S, lower=0, clean=1, overwrite_a=0)
            if info == 0 and np.all(np.isfinite(np.diagonal(U))):
                self._blocks[i] = np.asfortranarray(U)
                self.factored[i] = True
                done += 1
        return done

    def quadratic(self, G: np.ndarray) -> np.ndarray:
        """``g^T P g`` for every row g of G (shape (m, n) or (n,)).

        Each block of P is read once for all m rows (one BLAS ``symm``; on a
        factorised block one ``trmm``, U times the block's rows as columns),
        which is what makes many KPU components per model evaluation cheap; a
        single row uses ``symv`` (``trmv``).
        """
        G = np.asarray(G, dtype=np.float64)
        single = G.ndim == 1
        G2 = np.atleast_2d(G)
        if G2.shape[1] != self.layout.n:
            raise ValueError(f"gradients have {G2.shape[1]} entries, model has {self.layout.n}")
        out = np.zeros(G2.shape[0], dtype=np.float64)
        trmv, trmm = _TRI[self.dtype]
        if G2.shape[0] == 1:  # one vector: symv reads half of each block, no copies
            for (a, b), S, fac in zip(self.layout.blocks, self.blocks, self.factored):
                h = G2[0, a:b].astype(self.dtype, copy=fac)
                if fac:
                    Uh = trmv(S, h, lower=0, overwrite_x=1)  # U h
                    out[0] += float(np.dot(Uh, Uh))
                else:
                    out[0] += float(np.dot(h, self._symv(1.0, S, h)))
            out *= self.scale
            return out[0] if single else out
        for (a, b), S, fac in zip(self.layout.blocks, self.blocks, self.factored):
            # the block's rows as columns, (b - a, m) in Fortran order: one copy that
            # the BLAS call overwrites
            gT = np.array(G2[:, a:b].T, dtype=self.dtype, order="F")
            if fac:
                Ug = trmm(1.0, S, gT, side=0, lower=0, trans_a=0, overwrite_b=1)  # U g^T
                out += np.einsum("ij,ij->j", Ug, Ug, dtype=np.float64)
            else:
                Sg = self._symm(1.0, S, gT, side=0)  # S g^T from S's upper triangle
                out += np.einsum("ij,ij->j", Sg, gT, dtype=np.float64)
        out *= self.scale
        return out[0] if single else out

    def block(self, index: int) -> np.ndarray:
        """Block ``index`` of P as a full symmetric float64 matrix (a copy)."""
        S = self.blocks[index]
        U = np.triu(S).astype(np.float64)
        if self.factored[index]:
            return self.scale * (U.T @ U)
        return self.scale * (U + np.triu(U, 1).T)

    def dense(self) -> np.ndarray:
        """The whole P as a dense n x n matrix (small models and tests only)."""
        n = self.layout.n
        P = np.zeros((n, n))
        for i, (a, b) in enumerate(self.layout.blocks):
            P[a:b, a:b] = self.block(i)
        return P

    @property
    def nbytes(self) -> int:
        return int(sum(S.nbytes for S in self._blocks))
