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
* S_l is symmetric and only its upper triangle is kept valid: K_l comes from
  BLAS ``symv`` (which reads half of the block);
* the rank-one downdates are deferred: the filter keeps
  ``S_l^eff = S_l - sum_j c_j v_lj v_lj^T`` with up to ``defer`` pending
  vectors, computes ``S_l^eff H_l`` as ``symv`` minus the pending terms
  (O(n defer)), and applies them together as one in-place BLAS ``syrk`` (one
  read and write of the upper triangle) when ``defer`` are pending or P is
  read. The result is the same update in another order of the same sums
  (round-off apart); an update then costs about half a pass over P instead of
  one and a half (symv plus an immediate ``syr``);
* the gradient and weights are float64; P is float64 by default, float32 on
  request (the scalars A, lambda and scale are always float64).

Numerical safeguards (docs/rlekf.md, "Numerical safeguards"):

* symmetry is structural: only the upper triangle is stored and used, so P is
  exactly symmetric;
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

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas, lapack

from .layout import BlockLayout

__all__ = ["KalmanFilter", "FilterOptions", "KalmanNumericsWarning"]

_BLAS = {
    np.dtype(np.float64): (blas.dsymv, blas.dsyrk, blas.dsymm, blas.dscal),
    np.dtype(np.float32): (blas.ssymv, blas.ssyrk, blas.ssymm, blas.sscal),
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
# rank-one downdates kept pending before one syrk applies them: a rank-16 syrk
# costs about one rank-one syr (both are bound by the pass over P)
DEFER = 16


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
        self._symv, self._syrk, self._symm, self._scal = _BLAS[self.dtype]
        # S_l in Fortran order so that BLAS works in place on them
        self._blocks: list[np.ndarray] = [
            np.asfortranarray(np.eye(m, dtype=self.dtype)) for m in layout.block_sizes
        ]
        if int(defer) < 1:
            raise ValueError(f"defer must be >= 1, got {defer}")
        self.defer = int(defer)
        # pending downdates: S_l^eff = S_l - sum_j c_j V_l[:, j] V_l[:, j]^T, j < _npending
        self._pending_c = np.zeros(self.defer)
        self._pending_v: list[np.ndarray] = [
            np.zeros((m, self.defer), dtype=self.dtype, order="F") for m in layout.block_sizes
        ]
        self._npending = 0
        self.scale = float(self.options.p0)
        self.lam = float(self.options.lambda1)
        self.nupdates = 0
        # per block: True once S_l holds its Cholesky factor U_l (S_l = U_l^T U_l), see factorize()
        self.factored: list[bool] = [False] * len(self._blocks)
        # numerical safeguards: tolerance n_l * eps per block, periodic test interval
        eps = float(np.finfo(self.dtype).eps)
        self.tolerance: list[float] = [m * eps for m in layout.block_sizes]
        if check_every is None:
            self.check_interval = [max(_CHECK_MIN, _CHECK_PER_WEIGHT * m) for m in layout.block_sizes]
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
        # trace of each S_l, kept up to date by the updates; recomputed whenever the
        # block array is not the one it was computed from (e.g. set by load_state)
        self.last_update: dict = {}  # the terms of the newest update (see update())
        self._traces: list[float] = [0.0] * len(self._blocks)
        self._trace_src: list[np.ndarray | None] = [None] * len(self._blocks)

    # ------------------------------------------------------- stored blocks
    @property
    def blocks(self) -> list[np.ndarray]:
        """The blocks S_l (P_l = scale * S_l, upper triangles), pending downdates applied."""
        self.flush()
        return self._blocks

    def flush(self) -> None:
        """Apply the pending rank-one downdates to the stored blocks (one ``syrk`` per block)."""
        k = self._npending
        if not k:
            return
        for i, S in enumerate(self._blocks):
            # S <- S - W W^T  (upper triangle, in place)
            self._syrk(-1.0, self._pending_factor(i), beta=1.0, c=S, trans=0, lower=0, overwrite_c=1)
        self._npending = 0

    def _pending_factor(self, index: int) -> np.ndarray:
        """W with W W^T = sum_j c_j v_j v_j^T over the pending downdates of block ``index``."""
        k = self._npending
        root = np.sqrt(self._pending_c[:k]).astype(self.dtype)
        return np.asfortranarray(self._pending_v[index][:, :k] * root)

    def _sv(self, index: int, h: np.ndarray) -> np.ndarray:
        """``S_l^eff h`` for block ``index``: symv with the stored block minus the pending terms."""
        v = self._symv(1.0, self._blocks[index], h)
        k = self._npending
        if k:
            V = self._pending_v[index][:, :k]
            v -= V @ (self._pending_c[:k].astype(self.dtype) * (h @ V))
        return v

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
        hs: list[np.ndarray] = []
        vs: list[np.ndarray] = []
        qs: list[float] = []
        for i, (a, b) in enumerate(self.layout.blocks):
            h = H[a:b].astype(self.dtype, copy=False)
            v = self._sv(i, h)  # S_l H_l (upper triangle, pending downdates)
            q = float(np.dot(h, v))
            if not guard:
                pass
            elif not q >= 0.0:  # negative or NaN: S_l is indefinite or damaged
                reason = (f"H^T P H = {q * self.scale:.3g} < 0 along this update's gradient"
                          if np.isfinite(q) else "H^T P H is not finite")
                v, q = self._repair_and_redo(i, t, reason, h)
            else:
                floor = self.tolerance[i] * self._trace(i) / h.shape[0]  # n eps mean eigenvalue
                if q < floor * float(np.dot(h, h)):
                    # h probes a direction where P is below the resolution of its type; a
                    # round-off negative eigenvalue there would grow at every such update.
                    # Add floor * I to S_l first (process noise on this block; O(n)).
                    S = self._blocks[i]
                    S.flat[:: S.shape[0] + 1] += floor
                    self._traces[i] += floor * S.shape[0]
                    self.floor_events += 1
                    v = self._sv(i, h)
                    q = max(float(np.dot(h, v)), 0.0)
            hs.append(h)
            vs.append(v)
            qs.append(q)
        lam = self.lam
        s = self.scale
        A = 1.0 / (len(self._blocks) * lam + s * sum(qs))
        # For a semidefinite S_l the downdate removes A s |v_l|^2 <= |v_l|^2 / q_l
        # <= lambda_max(S_l) <= trace(S_l). More than the trace: S_l is indefinite
        # and the downdate would blow the negative part up; repair it first.
        vv = [float(np.dot(v, v)) for v in vs]
        redo = False
        for i in range(len(self._blocks) if guard else 0):
            removal = A * s * vv[i]
            if removal > _TRACE_SLACK * self._trace(i):
                reason = (f"the update would remove {removal:.3g} from a block whose trace is "
                          f"{self._trace(i):.3g} (in units of scale = {s:.3g})")
                vs[i], qs[i] = self._repair_and_redo(i, t, reason, hs[i])
                vv[i] = float(np.dot(vs[i], vs[i]))
                redo = True
        if redo:
            A = 1.0 / (len(self._blocks) * lam + s * sum(qs))
        # the terms of this update, for diagnostics: noise L*lambda, H^T P H, the gain factor A
        self.last_update = {"noise": len(self._blocks) * lam, "hph": s * sum(qs), "A": A,
                            "hph_blocks": [s * q for q in qs]}
        delta = np.empty(self.layout.n, dtype=np.float64)
        coef = A * float(innovation) * s
        k = self._npending
        self._pending_c[k] = A * s
        for i, ((a, b), v) in enumerate(zip(self.layout.blocks, vs)):
            delta[a:b] = coef * v
            # S <- S - A s v v^T (P = s S), pending until flush()
            self._pending_v[i][:, k] = v
            self._traces[i] -= A * s * vv[i]
        self._npending = k + 1
        if self._npending == self.defer:
            self.flush()
        self.scale = s / lam
        self.lam = self.options.nu * lam + 1.0 - self.options.nu
        self.nupdates += 1
        self._renormalise()
        for i, every in enumerate(self.check_interval):
            if every and guard and (t + i) % every == 0:
                self.check_block(i)
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
        self._trace_src[index] = None  # recompute the tracked trace (no drift)
        if self.indefinite(index):
            self._repair(index, self.nupdates, "Cholesky test failed")
            return True
        return False

    def check(self) -> list[int]:
        """Test every block now, repair those that need it; returns their indices."""
        return [i for i in range(len(self._blocks)) if self.check_block(i)]

    def _repair_and_redo(self, index: int, update: int, reason: str, h: np.ndarray) -> tuple[np.ndarray, float]:
        """Repair block ``index``; its S h and h^T S h again."""
        self._repair(index, update, reason)
        v = self._sv(index, h)
        return v, max(float(np.dot(h, v)), 0.0)

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
        self._trace_src[index] = None
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
        for i, S in enumerate(self.blocks):
            self._scal(self.scale, S.reshape(-1, order="F"))
            self._traces[i] *= self.scale
        self.scale = 1.0

    def _trace(self, index: int) -> float:
        S = self._blocks[index]
        if self._trace_src[index] is not S:
            trace = float(np.diagonal(S).sum(dtype=np.float64))
            k = self._npending
            if k:  # the trace of S^eff: minus c_j |v_j|^2 of the pending downdates
                V = self._pending_v[index][:, :k].astype(np.float64)
                trace -= float(self._pending_c[:k] @ np.einsum("ij,ij->j", V, V))
            self._traces[index] = trace
            self._trace_src[index] = S
        return self._traces[index]

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
                self.blocks[i] = np.asfortranarray(U)
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
