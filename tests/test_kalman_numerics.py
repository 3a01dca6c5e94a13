"""The Kalman filter over 10^4 adversarial updates: P stays symmetric positive semidefinite, KPU >= 0.

And a block that loses definiteness (made so on purpose, or driven there in
float32) is detected, reported with a KalmanNumericsWarning naming the block and
the update, and repaired; training continues.
"""

import warnings

import numpy as np
import pytest

from alkpu_plugin.kalman import BlockLayout, FilterOptions, KalmanFilter, KalmanNumericsWarning

TENSORS = [("a", (8,)), ("b", (30,)), ("c", (20,))]  # blocks of 8, 30 and 20 weights
NUPDATES = 10_000
EVERY = 50  # eigenvalue checks every EVERY updates


def _unit(v):
    return v / np.linalg.norm(v)


def source(name, n, rng):
    g0 = _unit(rng.normal(size=n))

    def near():  # cos(g, g0) = 1 / sqrt(1 + 1e-6) > 0.999999
        d = rng.normal(size=n)
        d -= (d @ g0) * g0
        return _unit(g0 + 1e-3 * _unit(d))

    return {
        "repeated": lambda t: (g0, 0.1),
        "parallel": lambda t: (near(), 0.1),
        "norm1e6_repeated": lambda t: (1e6 * g0, 0.1),
        "norm1e-8": lambda t: (1e-8 * _unit(rng.normal(size=n)), 0.1),
        "mixed_norms_parallel": lambda t: ((1e6 if t % 2 else 1e-8) * near(), 0.1),
        "innovations_1e-12_1e8": lambda t: (_unit(rng.normal(size=n)), 1e8 if t % 2 else 1e-12),
    }[name]


def layout():
    return BlockLayout.build(TENSORS, 30)


def drive(name, dtype, lam1, nu, safeguards=True, seed=3, defer=None):
    """Run NUPDATES updates; returns the filter and the worst figures seen at the checks."""
    lay = layout()
    extra = {} if defer is None else {"defer": defer}
    kf = KalmanFilter(lay, FilterOptions(lambda1=lam1, nu=nu, p_dtype=dtype),
                      check_every=None if safeguards else 0, **extra)
    if not safeguards:
        kf.safeguards = False  # the filter as it was without safeguards
    rng = np.random.default_rng(seed)
    src = source(name, lay.n, rng)
    qrng = np.random.default_rng(11)
    worst = {"asym": 0.0, "eig": np.inf, "kpu": np.inf, "nonfinite": None}
    lam = lam1
    for t in range(1, NUPDATES + 1):
        g, innov = src(t)
        with np.errstate(all="ignore"):
            delta = kf.update(g, innov)
        lam = nu * lam + 1 - nu
        if not np.all(np.isfinite(delta)):
            worst["nonfinite"] = t
            return kf, worst
        if t % EVERY == 0:
            for i in range(len(kf.blocks)):
                P = kf.block(i)
                worst["asym"] = max(worst["asym"], np.abs(P - P.T).max() / np.abs(P).max())
                ev = np.linalg.eigvalsh(P)
                # smallest eigenvalue over the largest, in units of the block's tolerance n * eps
                worst["eig"] = min(worst["eig"], ev[0] / ev[-1] / kf.tolerance[i])
            worst["kpu"] = min(worst["kpu"], float(kf.quadratic(qrng.normal(size=(4, lay.n))).min()))
    assert kf.lam == pytest.approx(lam, rel=1e-12)  # the trainer's schedule lambda <- nu lambda + 1 - nu
    return kf, worst


SCENARIOS = ["repeated", "parallel", "norm1e6_repeated", "norm1e-8", "mixed_norms_parallel",
             "innovations_1e-12_1e8"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_long_run_stays_symmetric_psd(name, dtype):
    # the default schedule (lambda -> 1 from 0.98); lambda already 1 - 1e-9 for the two hardest
    hardest = name in ("mixed_norms_parallel", "norm1e6_repeated")
    for lam1, nu in [(1.0 - 1e-9, 1.0)] if hardest else [(0.98, 0.9987)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KalmanNumericsWarning)
            kf, worst = drive(name, dtype, lam1, nu)
        assert worst["nonfinite"] is None, worst
        assert worst["asym"] == 0.0  # only the upper triangle is stored: symmetric by construction
        assert worst["eig"] >= -1.0, (name, dtype, lam1, worst)  # lambda_min >= -n eps lambda_max
        assert worst["kpu"] >= 0.0 and np.isfinite(worst["kpu"])
        assert kf.quadratic(np.ones(kf.layout.n)) > 0.0
        # float64 never needs a repair in these sequences
        if dtype == "float64":
            assert kf.repairs == [], kf.repairs[:3]


@pytest.mark.parametrize("defer", [1, 16])
def test_float32_without_safeguards_goes_indefinite_and_the_resolution_floor_prevents_it(defer):
    """Huge and tiny near-parallel gradients: float32 P loses definiteness without the safeguards.

    With downdates applied one by one (defer 1) or sixteen at a time (the default).
    """
    _, bare = drive("mixed_norms_parallel", "float32", 1.0 - 1e-9, 1.0, safeguards=False, defer=defer)
    # far below round-off (lambda_min < -1000 n eps lambda_max) with KPU < 0 for random
    # gradients, or non-finite weight increments
    assert bare["nonfinite"] is not None or (bare["eig"] < -1e3 and bare["kpu"] < 0), bare
    with warnings.catch_warnings():
        warnings.simplefilter("error", KalmanNumericsWarning)
        kf, worst = drive("mixed_norms_parallel", "float32", 1.0 - 1e-9, 1.0, defer=defer)
    assert worst["nonfinite"] is None and worst["eig"] >= -1.0 and worst["kpu"] >= 0.0
    assert kf.floor_events > 0 and kf.repairs == []


def test_repeated_repairs_warn_at_powers_of_two():
    kf, rng = trained("float64")
    a, b = kf.layout.blocks[1]
    g = np.zeros(kf.layout.n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KalmanNumericsWarning)
        for _ in range(5):
            u = _unit(rng.normal(size=b - a))
            _spoil(kf, 1, u, 0.5)
            g[a:b] = u
            kf.update(g, 0.1)
    assert [r["block"] for r in kf.repairs] == [1] * 5
    texts = [str(w.message) for w in caught if issubclass(w.category, KalmanNumericsWarning)]
    assert [t.split("Repair ")[1].split(" ")[0] for t in texts] == ["1", "2", "4"]


def trained(dtype="float64", updates=200):
    lay = layout()
    kf = KalmanFilter(lay, FilterOptions(p_dtype=dtype))
    rng = np.random.default_rng(5)
    for _ in range(updates):
        kf.update(rng.normal(size=lay.n), 0.1)
    return kf, rng


def _spoil(kf, index, u, depth):
    """Subtract (depth + lambda_max) u u^T from block ``index`` in place: eigenvalue -depth there."""
    S = kf.blocks[index]
    full = kf.block(index) / kf.scale
    lmax = np.linalg.eigvalsh(full)[-1]
    bad = full - (depth * lmax + u @ full @ u) * np.outer(u, u)
    np.copyto(S, bad, casting="unsafe")
    assert np.linalg.eigvalsh(kf.block(index))[0] < 0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_indefinite_block_probed_by_the_gradient_is_repaired_before_use(dtype):
    kf, rng = trained(dtype)
    a, b = kf.layout.blocks[1]
    u = _unit(rng.normal(size=b - a))
    _spoil(kf, 1, u, 0.5)
    g = np.zeros(kf.layout.n)
    g[a:b] = u
    assert kf.quadratic(g) < 0  # what KPU would say without the repair
    ev = np.linalg.eigvalsh(kf.block(1))
    before = [kf.blocks[i].copy() for i in (0, 2)]  # the gradient is zero there
    with pytest.warns(KalmanNumericsWarning, match=r"block 1 of P \(weights 8\.\.37, 30 x 30, "
                      + dtype + r"\) lost positive definiteness at update 201: H\^T P H = .* < 0"):
        delta = kf.update(g, 0.1)
    assert np.all(np.isfinite(delta))
    rep = kf.repairs[-1]
    assert rep["update"] == 201 and rep["block"] == 1
    assert rep["min_eig_ratio"] == pytest.approx(ev[0] / ev[-1], rel=1e-4) and rep["min_eig_ratio"] < -0.4
    # the repaired block is positive definite with its floor; the others were not touched
    ev = np.linalg.eigvalsh(kf.block(1))
    assert ev[0] > 0 and ev[0] >= 0.5 * kf.tolerance[1] * ev[-1]
    assert kf.positive_definite(1)
    for i, S in zip((0, 2), before):
        np.testing.assert_array_equal(kf.blocks[i], S)
    # training continues: KPU >= 0 for any gradient, and no further repair
    for _ in range(300):
        kf.update(rng.normal(size=kf.layout.n), 0.1)
    assert len(kf.repairs) == 1
    assert np.all(kf.quadratic(rng.normal(size=(50, kf.layout.n))) > 0)
    assert kf.quadratic(g) > 0


def test_indefinite_block_the_gradients_miss_is_found_by_the_periodic_test():
    kf, rng = trained("float64")
    kf.check_interval = [40, 40, 40]
    a, b = kf.layout.blocks[2]
    _spoil(kf, 2, _unit(rng.normal(size=b - a)), 0.1)
    g_other = np.zeros(kf.layout.n)
    with pytest.warns(KalmanNumericsWarning, match=r"block 2 of P .* at update (\d+): Cholesky test failed"):
        for _ in range(40):
            g_other[: kf.layout.blocks[1][1]] = rng.normal(size=kf.layout.blocks[1][1])
            kf.update(g_other, 0.1)  # gradients on blocks 0 and 1 only
    (rep,) = kf.repairs
    # block 2 is tested at the updates t with (t + 2) % 40 == 0
    assert rep["block"] == 2 and rep["update"] == 238 and rep["reason"] == "Cholesky test failed"
    assert not kf.indefinite(2) and kf.positive_definite(2)


def test_non_finite_block_is_reset_to_p0():
    kf, rng = trained("float32")
    kf.blocks[0][2, 3] = np.nan
    g = rng.normal(size=kf.layout.n)
    with pytest.warns(KalmanNumericsWarning, match=r"block 0 .* H\^T P H is not finite; .* reset to p0 I"):
        kf.update(g, 0.1)
    assert np.all(np.isfinite(kf.dense()))
    assert kf.quadratic(g) > 0
    assert kf.repairs[-1]["action"].startswith("reset to p0 I")


def test_healthy_filter_is_not_touched_by_the_checks():
    """The checks change nothing on a normal run: same numbers as with the periodic test off."""
    lay = layout()
    rng = np.random.default_rng(9)
    G = rng.normal(size=(3000, lay.n))
    a = KalmanFilter(lay, FilterOptions(), check_every=7)
    b = KalmanFilter(lay, FilterOptions(), check_every=0)
    for g in G:
        np.testing.assert_array_equal(a.update(g, 0.2), b.update(g, 0.2))
    assert a.repairs == [] and a.check() == []
    for x, y in zip(a.blocks, b.blocks):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="check_every must be >= 0"):
        KalmanFilter(lay, check_every=-1)
