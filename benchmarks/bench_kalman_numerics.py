"""Numerics of the Kalman filter over long adversarial sequences, and the cost of its safeguards.

Two parts:

``stress``
    Drives :class:`alkpu_plugin.kalman.KalmanFilter` (the trainer's update,
    the trainer's lambda schedule) with 10^4 updates per scenario on four
    blocks of 50, 560, 250 and 600 weights, in float64 and float32, for two
    schedules (the default lambda_1 = 0.98, nu = 0.9987, and lambda already
    1 - 1e-9 with nu = 1). Scenarios: the same gradient repeated, near-parallel
    gradients (cosine with the first > 0.999999), gradients of norm 1e6 and
    1e-8 (random and repeated), norms 1e6 and 1e-8 alternating on near-parallel
    directions, innovations 1e-12 and 1e8, gradients confined to 5 directions.
    Every ``--every`` updates it records, per block, the symmetry
    |P - P^T| / |P|, the smallest eigenvalue over the largest, and g^T P g for
    8 random g; and the repairs the filter made (with ``--no-repair`` the
    safeguards are switched off, to see what goes wrong without them).

``timing``
    The time of one update of a single 1024-weight block (float64 and
    float32), with the safeguards as shipped and with the periodic test
    switched off, and the time of one periodic test (a Cholesky of the block)
    divided by its interval.

Run (one BLAS thread, as the figures in docs/rlekf.md were measured)::

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_kalman_numerics.py stress
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_kalman_numerics.py timing
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from alkpu_plugin.kalman import BlockLayout, FilterOptions, KalmanFilter, KalmanNumericsWarning

TENSORS = [("a", (50,)), ("b", (560,)), ("c", (250,)), ("d", (600,))]  # blocks 50, 560, 250, 600
SCHEDULES = {"default": (0.98, 0.9987), "lam=1-1e-9": (1.0 - 1e-9, 1.0)}
SCENARIOS = ["repeated", "parallel", "norm1e6", "norm1e6_rep", "norm1e-8", "norm1e-8_rep",
             "mixed_norms", "innov1e-12", "innov1e8", "rank5"]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def gradient_source(name: str, n: int, rng: np.random.Generator):
    """A function t -> (gradient, innovation) for scenario ``name``."""
    g0 = _unit(rng.normal(size=n))
    basis = np.linalg.qr(rng.normal(size=(n, 5)))[0]

    def near(t):  # cos(g, g0) = 1 / sqrt(1 + 1e-6) > 0.999999
        d = rng.normal(size=n)
        d -= (d @ g0) * g0
        return _unit(g0 + 1e-3 * _unit(d))

    table = {
        "repeated": lambda t: (g0, 0.1),
        "parallel": lambda t: (near(t), 0.1),
        "norm1e6": lambda t: (1e6 * _unit(rng.normal(size=n)), 0.1),
        "norm1e6_rep": lambda t: (1e6 * g0, 0.1),
        "norm1e-8": lambda t: (1e-8 * _unit(rng.normal(size=n)), 0.1),
        "norm1e-8_rep": lambda t: (1e-8 * g0, 0.1),
        "mixed_norms": lambda t: ((1e6 if t % 2 else 1e-8) * near(t), 0.1),
        "innov1e-12": lambda t: (_unit(rng.normal(size=n)), 1e-12),
        "innov1e8": lambda t: (_unit(rng.normal(size=n)), 1e8),
        "rank5": lambda t: (basis @ rng.normal(size=5), 0.1),
    }
    return table[name]


def block_health(kf: KalmanFilter) -> tuple[float, float]:
    """(largest |P - P^T| / |P|, smallest eigenvalue / largest) over the blocks."""
    sym, ratio = 0.0, np.inf
    for i in range(len(kf.blocks)):
        P = kf.block(i)
        sym = max(sym, float(np.abs(P - P.T).max() / np.abs(P).max()))
        ev = np.linalg.eigvalsh(P)
        ratio = min(ratio, float(ev[0] / ev[-1]))
    return sym, ratio


def run_scenario(name, dtype, schedule, nupdates, every, repair=True, tensors=TENSORS, seed=7):
    lam1, nu = SCHEDULES[schedule]
    layout = BlockLayout.build(tensors, max(s[0] for _, s in tensors))
    kf = KalmanFilter(layout, FilterOptions(lambda1=lam1, nu=nu, p_dtype=dtype),
                      check_every=None if repair else 0)
    if not repair:  # switch the per-update test off too: the filter as it was without safeguards
        kf.safeguards = False
    rng = np.random.default_rng(seed)
    source = gradient_source(name, layout.n, rng)
    qrng = np.random.default_rng(1)
    out = {"sym": 0.0, "ratio": np.inf, "kpu_min": np.inf, "first_negative": None,
           "nonfinite": None}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KalmanNumericsWarning)
        for t in range(1, nupdates + 1):
            g, innov = source(t)
            delta = kf.update(g, innov)
            if out["nonfinite"] is None and not np.all(np.isfinite(delta)):
                out["nonfinite"] = t
            if t % every == 0 or t == nupdates:
                sym, ratio = block_health(kf)
                kpu = kf.quadratic(qrng.normal(size=(8, layout.n)))
                out["sym"] = max(out["sym"], sym)
                out["ratio"] = min(out["ratio"], ratio)
                out["kpu_min"] = min(out["kpu_min"], float(kpu.min()))
                if ratio < 0 and out["first_negative"] is None:
                    out["first_negative"] = t
    out["seconds"] = time.perf_counter() - t0
    out["repairs"] = len(kf.repairs)
    out["first_repair"] = kf.repairs[0]["update"] if kf.repairs else None
    out["warnings"] = sum(issubclass(w.category, KalmanNumericsWarning) for w in caught)
    out["tol"] = max(kf.tolerance)
    return out


def stress(args) -> None:
    print(f"{args.updates} updates per scenario; blocks "
          f"{[s[0] for _, s in TENSORS]}; checks every {args.every} updates; "
          f"safeguards {'off' if args.no_repair else 'on'}")
    print(f"{'P':8s} {'schedule':10s} {'scenario':13s} {'max sym':>8s} {'min eig ratio':>14s} "
          f"{'first <0':>8s} {'min KPU':>9s} {'repairs':>7s} {'1st rep':>7s} {'warned':>6s} {'s':>4s}")
    for dtype in args.dtypes:
        for schedule in SCHEDULES:
            for name in args.scenarios or SCENARIOS:
                r = run_scenario(name, dtype, schedule, args.updates, args.every, not args.no_repair)
                print(f"{dtype:8s} {schedule:10s} {name:13s} {r['sym']:8.1e} {r['ratio']:14.2e} "
                      f"{str(r['first_negative']):>8s} {r['kpu_min']:9.2e} {r['repairs']:7d} "
                      f"{str(r['first_repair']):>7s} {r['warnings']:6d} {r['seconds']:4.0f}", flush=True)


def _time(fn, repeat, number):
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def timing(args) -> None:
    n = 1024
    layout = BlockLayout.build([("w", (n,))], n)
    rng = np.random.default_rng(0)
    G = rng.normal(size=(64, n))
    for dtype in ("float64", "float32"):
        kfs = {"shipped": KalmanFilter(layout, FilterOptions(p_dtype=dtype)),
               "no periodic test": KalmanFilter(layout, FilterOptions(p_dtype=dtype), check_every=0)}
        for kf in kfs.values():
            for i in range(300):
                kf.update(G[i % 64], 0.1)
        best = {k: np.inf for k in kfs}
        for _ in range(args.rounds):  # interleaved, best of rounds: robust to a loaded machine
            for k, kf in kfs.items():
                it = iter(range(10**9))
                best[k] = min(best[k], _time(lambda: kf.update(G[next(it) % 64], 0.1), 1, 200))
        kf = kfs["shipped"]
        chol = _time(lambda: kf.indefinite(0), 3, 3)
        every = kf.check_interval[0]
        line = ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in best.items())
        print(f"{dtype}: update of one {n}-block: {line}; periodic test {chol * 1e3:.1f} ms every "
              f"{every} updates = {chol / every * 1e6:.2f} us per update "
              f"({chol / every / best['no periodic test'] * 100:.2f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stress")
    s.add_argument("--updates", type=int, default=10_000)
    s.add_argument("--every", type=int, default=250, help="health check interval (updates)")
    s.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    s.add_argument("--scenarios", nargs="*", choices=SCENARIOS)
    s.add_argument("--no-repair", action="store_true", help="switch the safeguards off")
    t = sub.add_parser("timing")
    t.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    stress(args) if args.what == "stress" else timing(args)


if __name__ == "__main__":
    main()
