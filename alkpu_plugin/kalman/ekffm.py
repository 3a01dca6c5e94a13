"""EKF with fading memory (EKFfm, the paper's Algorithm 1) on a block-diagonal P.

For a scalar measurement with gradient H (length n) and innovation
``innov = y - h(w)``::

    A   = 1 / (L * lambda + sum_l H_l^T P_l H_l)        (L blocks; L = 1 is Algorithm 1)
    K_l = P_l H_l
    w_l += A * innov * K_l
    P_l  = (P_l - A K_l K_l^T) / lambda
    lambda <- nu * lambda + 1 - nu

Implementation notes (the update is memory-bandwidth bound: every entry of P
is read and written once per update):

* each block is stored as ``P_l = scale * S_l`` with one shared scalar
  ``scale``: the division by lambda is a scalar operation, not a pass over P;
* S_l is symmetric and only its upper triangle is kept valid: K_l comes from
  BLAS ``symv`` and the rank-one downdate is an in-place BLAS ``syr``
  (each touches half of the block);
* the gradient and weights are float64; P is float64 by default, float32 on
  request (the scalars A, lambda and scale are always float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas

from .layout import BlockLayout

__all__ = ["KalmanFilter", "FilterOptions"]

_BLAS = {
    np.dtype(np.float64): (blas.dsymv, blas.dsyr, blas.dsymm, blas.dscal),
    np.dtype(np.float32): (blas.ssymv, blas.ssyr, blas.ssymm, blas.sscal),
}
_TRI = {  # for a factorised P: triangular matrix-vector / matrix-matrix products
    np.dtype(np.float64): (blas.dtrmv, blas.dtrmm),
    np.dtype(np.float32): (blas.strmv, blas.strmm),
}

# fold ``scale`` into the blocks when it leaves this range (rare: with the
# default lambda_1, nu the product of 1/lambda_k converges to about 5e6)
_SCALE_LIMIT = 1e12


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
    """

    def __init__(self, layout: BlockLayout, options: FilterOptions | None = None):
        self.layout = layout
        self.options = options or FilterOptions()
        self.dtype = np.dtype(self.options.p_dtype)
        self._symv, self._syr, self._symm, self._scal = _BLAS[self.dtype]
        # S_l in Fortran order so that BLAS works in place on them
        self.blocks: list[np.ndarray] = [
            np.asfortranarray(np.eye(m, dtype=self.dtype)) for m in layout.block_sizes
        ]
        self.scale = float(self.options.p0)
        self.lam = float(self.options.lambda1)
        self.nupdates = 0
        # per block: True once S_l holds its Cholesky factor U_l (S_l = U_l^T U_l), see factorize()
        self.factored: list[bool] = [False] * len(self.blocks)

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
        vs: list[np.ndarray] = []
        quad = 0.0
        for (a, b), S in zip(self.layout.blocks, self.blocks):
            h = H[a:b].astype(self.dtype, copy=False)
            v = self._symv(1.0, S, h)  # S_l H_l (upper triangle)
            vs.append(v)
            quad += float(np.dot(h, v))
        lam = self.lam
        s = self.scale
        A = 1.0 / (len(self.blocks) * lam + s * quad)
        delta = np.empty(self.layout.n, dtype=np.float64)
        coef = A * float(innovation) * s
        for (a, b), S, v in zip(self.layout.blocks, self.blocks, vs):
            delta[a:b] = coef * v
            # S <- S - A s v v^T  (in place, upper triangle);  P = s S
            self._syr(-A * s, v, a=S, overwrite_a=1)
        self.scale = s / lam
        self.lam = self.options.nu * lam + 1.0 - self.options.nu
        self.nupdates += 1
        self._renormalise()
        return delta

    def _renormalise(self) -> None:
        if 1.0 / _SCALE_LIMIT < self.scale < _SCALE_LIMIT:
            return
        for S in self.blocks:
            self._scal(self.scale, S.reshape(-1, order="F"))
        self.scale = 1.0

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
        return int(sum(S.nbytes for S in self.blocks))
