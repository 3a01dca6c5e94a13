"""The Kalman core against independent dense computations written here."""

import numpy as np
import pytest

from alkpu_plugin.kalman import (
    BlockLayout,
    FilterOptions,
    KalmanFilter,
    KalmanStateError,
    LayoutMismatchError,
    load_state,
    save_state,
)
from alkpu_plugin.kalman import rlekf

# ---------------------------------------------------------------- a tiny MLP
SHAPES = [("w1", (3, 7)), ("b1", (7,)), ("w2", (7, 4)), ("b2", (4,)), ("w3", (4, 1)), ("b3", (1,))]


def mlp(weights, x):
    w1, b1, w2, b2, w3, b3 = weights
    h1 = np.tanh(x @ w1 + b1)
    h2 = np.tanh(h1 @ w2 + b2)
    return float((h2 @ w3 + b3)[0])


def mlp_grad(weights, x):
    """Analytic gradient of the scalar output w.r.t. every weight, as a list."""
    w1, b1, w2, b2, w3, b3 = weights
    a1 = x @ w1 + b1
    h1 = np.tanh(a1)
    a2 = h1 @ w2 + b2
    h2 = np.tanh(a2)
    g_w3 = h2[:, None]
    g_b3 = np.ones(1)
    d2 = w3[:, 0] * (1 - h2**2)
    g_w2 = np.outer(h1, d2)
    g_b2 = d2
    d1 = (w2 @ d2) * (1 - h1**2)
    g_w1 = np.outer(x, d1)
    g_b1 = d1
    return [g_w1, g_b1, g_w2, g_b2, g_w3, g_b3]


def data(k, rng):
    x = rng.normal(size=(k, 3))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    return x, y


def init_weights(rng):
    return [rng.normal(scale=0.5, size=s) for _, s in SHAPES]


def test_auto_lambda1_by_weight_count():
    assert rlekf.AUTO_LAMBDA_MIN_WEIGHTS == 20_000
    assert rlekf.auto_lambda1(7_106) == rlekf.auto_lambda1(19_999) == 0.98
    assert rlekf.auto_lambda1(20_000) == rlekf.auto_lambda1(411_091) == 0.95


def test_layout_gathers_small_and_splits_large():
    lay = BlockLayout.build([("a", (3,)), ("b", (4,)), ("c", (25,)), ("d", (2,)), ("e", (1,))], 10)
    # a+b=7 <= 10 gathered; c (25) closes the group and is split 10/10/5; d+e gathered
    assert lay.blocks == ((0, 7), (7, 17), (17, 27), (27, 32), (32, 35))
    assert lay.n == 35
    lay2 = BlockLayout.build([("a", (10,)), ("b", (10,))], 10)
    assert lay2.blocks == ((0, 10), (10, 20))
    with pytest.raises(ValueError, match="blocksize must be a positive integer"):
        BlockLayout.build([("a", (3,))], 0)


def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(0)
    lay = BlockLayout.build(SHAPES, 8)
    w = init_weights(rng)
    flat = lay.pack(w)
    for a, b in zip(w, lay.unpack(flat)):
        np.testing.assert_array_equal(a, b)


def dense_ekffm(w_flat, P, lam, nu, H, innov):
    """Algorithm 1, written out with a dense P."""
    a = 1.0 / (lam + H @ P @ H)
    K = P @ H
    w_new = w_flat + a * innov * K
    P_new = (P - a * np.outer(K, K)) / lam
    return w_new, P_new, nu * lam + 1 - nu


def blockdiag_rlekf(w_flat, Ps, blocks, lam, nu, H, innov):
    """The block-diagonal update built by hand: A = 1 / sum_l (lam + H_l' P_l H_l)."""
    A = 1.0 / sum(lam + H[a:b] @ P @ H[a:b] for (a, b), P in zip(blocks, Ps))
    w_new = w_flat.copy()
    P_new = []
    for (a, b), P in zip(blocks, Ps):
        K = P @ H[a:b]
        w_new[a:b] += A * innov * K
        P_new.append((P - A * np.outer(K, K)) / lam)
    return w_new, P_new, nu * lam + 1 - nu


def run_core(layout, weights, xs, ys, options, **kw):
    kf = KalmanFilter(layout, options, **kw)
    flat = layout.pack(weights)
    for x, y in zip(xs, ys):
        wts = layout.unpack(flat)
        H = layout.pack(mlp_grad(wts, x))
        innov = y - mlp(wts, x)
        flat = flat + kf.update(H, innov)
    return kf, flat


# the paper's schedule, and the `dp train` defaults (docs/rlekf.md#the-defaults)
@pytest.mark.parametrize("lambda1, nu", [(0.98, 0.9987), (0.95, 0.997)])
def test_single_block_equals_dense_ekffm(lambda1, nu):
    rng = np.random.default_rng(1)
    weights = init_weights(rng)
    xs, ys = data(60, rng)
    layout = BlockLayout.build(SHAPES, 10_000)
    assert len(layout.blocks) == 1
    opts = FilterOptions(lambda1=lambda1, nu=nu, p0=1.0)
    kf, flat = run_core(layout, weights, xs, ys, opts)

    w = layout.pack(weights)
    P = np.eye(layout.n)
    lam = lambda1
    for x, y in zip(xs, ys):
        wts = layout.unpack(w)
        H = layout.pack(mlp_grad(wts, x))
        w, P, lam = dense_ekffm(w, P, lam, nu, H, y - mlp(wts, x))
    np.testing.assert_allclose(flat, w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(kf.dense(), P, rtol=0, atol=1e-10)
    assert kf.lam == pytest.approx(lam, abs=1e-15)
    assert kf.lam == pytest.approx(1 - (1 - lambda1) * nu**60, abs=1e-14)
    # and the filter learnt something
    err0 = np.mean([(y - mlp(weights, x)) ** 2 for x, y in zip(xs, ys)])
    err1 = np.mean([(y - mlp(layout.unpack(flat), x)) ** 2 for x, y in zip(xs, ys)])
    assert err1 < 0.5 * err0


@pytest.mark.parametrize("blocksize, defer", [(5, 16), (8, 16), (20, 16), (8, 1), (8, 3), (8, 64)])
def test_blocks_equal_hand_built_block_diagonal(blocksize, defer):
    """Downdates applied at once (defer 1) or deferred (16 by default, 64 > the 40 updates)."""
    rng = np.random.default_rng(2)
    weights = init_weights(rng)
    xs, ys = data(40, rng)
    layout = BlockLayout.build(SHAPES, blocksize)
    assert len(layout.blocks) > 1
    opts = FilterOptions(lambda1=0.97, nu=0.99, p0=0.3)
    kf, flat = run_core(layout, weights, xs, ys, opts, defer=defer)
    assert kf._npending == 40 % defer  # downdates still pending: kf.block() applies them

    w = layout.pack(weights)
    Ps = [0.3 * np.eye(b - a) for a, b in layout.blocks]
    lam = 0.97
    for x, y in zip(xs, ys):
        wts = layout.unpack(w)
        H = layout.pack(mlp_grad(wts, x))
        w, Ps, lam = blockdiag_rlekf(w, Ps, layout.blocks, lam, 0.99, H, y - mlp(wts, x))
    np.testing.assert_allclose(flat, w, rtol=0, atol=1e-10)
    for i, P in enumerate(Ps):
        np.testing.assert_allclose(kf.block(i), P, rtol=0, atol=1e-10)


def test_last_update_terms_equal_dense():
    """The terms an update records (for diagnostics) are those of the dense block formula."""
    rng = np.random.default_rng(5)
    weights = init_weights(rng)
    layout = BlockLayout.build(SHAPES, 8)
    kf = KalmanFilter(layout, FilterOptions(lambda1=0.97, nu=0.99, p0=0.3))
    for x, y in zip(*data(6, rng)):  # P no longer a multiple of I
        kf.update(layout.pack(mlp_grad(weights, x)), y - mlp(weights, x))
    Ps = [kf.block(i) for i in range(len(layout.blocks))]
    lam = kf.lam
    x = rng.normal(size=3)
    H = layout.pack(mlp_grad(weights, x))
    kf.update(H, 0.1)
    hph = [float(H[a:b] @ P @ H[a:b]) for (a, b), P in zip(layout.blocks, Ps)]
    rec = kf.last_update
    assert rec["noise"] == pytest.approx(len(layout.blocks) * lam, rel=1e-12)
    np.testing.assert_allclose(rec["hph_blocks"], hph, rtol=1e-10)
    assert rec["hph"] == pytest.approx(sum(hph), rel=1e-10)
    assert rec["A"] == pytest.approx(1.0 / (len(layout.blocks) * lam + sum(hph)), rel=1e-10)


def test_quadratic_form_equals_dense():
    rng = np.random.default_rng(3)
    weights = init_weights(rng)
    xs, ys = data(30, rng)
    layout = BlockLayout.build(SHAPES, 8)
    kf, _ = run_core(layout, weights, xs, ys, FilterOptions())
    G = rng.normal(size=(17, layout.n))
    P = kf.dense()
    expected = np.einsum("ij,jk,ik->i", G, P, G)
    np.testing.assert_allclose(kf.quadratic(G), expected, rtol=1e-12)
    assert kf.quadratic(G[3]) == pytest.approx(expected[3], rel=1e-12)
    # factorised for queries (Cholesky per block, trmm): the same numbers, and no more updates
    assert kf.factorize() == len(layout.blocks)
    np.testing.assert_allclose(kf.quadratic(G), expected, rtol=1e-10)
    assert kf.quadratic(G[3]) == pytest.approx(expected[3], rel=1e-10)
    # only the blocks that pay for themselves within expected_rows (b <= 3 * rows):
    # factorised and symmetric blocks mixed in one call
    mixed, _ = run_core(layout, weights, xs, ys, FilterOptions())
    sizes = [b - a for a, b in layout.blocks]
    assert 0 < mixed.factorize(expected_rows=2) == sum(s <= 6 for s in sizes) < len(sizes)
    np.testing.assert_allclose(mixed.quadratic(G), expected, rtol=1e-10)
    np.testing.assert_allclose(kf.dense(), P, rtol=1e-10, atol=1e-14)
    with pytest.raises(RuntimeError, match="factorised"):
        kf.update(G[0], 0.1)


def test_float32_p_tracks_float64():
    rng = np.random.default_rng(4)
    weights = init_weights(rng)
    xs, ys = data(40, rng)
    layout = BlockLayout.build(SHAPES, 8)
    kf64, w64 = run_core(layout, weights, xs, ys, FilterOptions())
    kf32, w32 = run_core(layout, weights, xs, ys, FilterOptions(p_dtype="float32"))
    assert kf32.blocks[0].dtype == np.float32
    np.testing.assert_allclose(w32, w64, rtol=0, atol=1e-4)
    np.testing.assert_allclose(kf32.dense(), kf64.dense(), rtol=0, atol=1e-3 * np.abs(kf64.dense()).max())


def test_float32_full_blocks_are_symmetric_and_threads_change_no_bit(monkeypatch):
    """A float32 P is stored in full and its products are split over threads by block:
    both triangles stay equal, and the split changes no bit of the result."""
    from alkpu_plugin.kalman import ekffm

    rng = np.random.default_rng(8)
    weights = init_weights(rng)
    xs, ys = data(70, rng)  # more than DEFER updates: flushes happen
    layout = BlockLayout.build(SHAPES, 6)  # blocks of 6 and smaller: several groups
    assert len(set(layout.block_sizes)) > 1
    opts = FilterOptions(p_dtype="float32")
    serial, w_serial = run_core(layout, weights, xs, ys, opts)
    monkeypatch.setattr(ekffm, "_THREAD_MIN_BYTES", 0)
    monkeypatch.setattr(ekffm, "_threads", lambda: 3)
    threaded, w_threaded = run_core(layout, weights, xs, ys, opts)
    np.testing.assert_array_equal(w_threaded, w_serial)
    for a, b in zip(threaded.blocks, serial.blocks):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, a.T)
    kf64, w64 = run_core(layout, weights, xs, ys, FilterOptions())
    np.testing.assert_allclose(w_threaded, w64, rtol=0, atol=1e-4)


def _update_in_child(kf, H, queue):
    queue.put(kf.update(H, 0.1))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_filter_used_before_a_fork_updates_in_the_child(monkeypatch):
    """The thread pool of the batched products does not survive fork(); the child makes its own."""
    import multiprocessing

    from alkpu_plugin.kalman import ekffm

    monkeypatch.setattr(ekffm, "_THREAD_MIN_BYTES", 0)
    monkeypatch.setattr(ekffm, "_threads", lambda: 2)
    layout = BlockLayout.build(SHAPES, 6)
    kf = KalmanFilter(layout, FilterOptions(p_dtype="float32"))
    H = np.random.default_rng(3).normal(size=layout.n)
    kf.update(H, 0.1)  # the pool exists now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_update_in_child, args=(kf, H, queue))
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    np.testing.assert_array_equal(queue.get(timeout=10), kf.update(H, 0.1))


def test_float32_state_with_stale_lower_triangles_loads(tmp_path):
    """A state whose blocks hold only their upper triangles (the lower ones stale, as a filter
    that keeps upper triangles writes them) loads to the same P and the same next update."""
    rng = np.random.default_rng(9)
    weights = init_weights(rng)
    xs, ys = data(30, rng)
    layout = BlockLayout.build(SHAPES, 8)
    kf, _ = run_core(layout, weights, xs, ys, FilterOptions(p_dtype="float32"))
    path = save_state(tmp_path / "s.kalman.npz", kf)
    with np.load(path) as data_:
        arrays = {k: data_[k] for k in data_.files}
    for k in arrays:
        if k.startswith("P_"):
            S = arrays[k].copy()
            S[np.tril_indices_from(S, -1)] = 7.0  # garbage below the diagonal
            arrays[k] = S
    np.savez(path, **arrays)
    kf2, _ = load_state(path, layout)
    np.testing.assert_array_equal(kf2.dense(), kf.dense())
    H = rng.normal(size=layout.n)
    np.testing.assert_array_equal(kf2.update(H, 0.2), kf.update(H, 0.2))


def test_scale_renormalisation_is_transparent():
    rng = np.random.default_rng(5)
    layout = BlockLayout.build(SHAPES, 8)
    kf = KalmanFilter(layout, FilterOptions(lambda1=0.5, nu=1.0))  # scale doubles each update
    ref = np.eye(layout.n)
    lam = 0.5
    for _ in range(45):  # 2**45 > 1e12 forces a renormalisation
        H = rng.normal(size=layout.n) * 1e-7
        kf.update(H, 0.0)
        Pd = ref
        A = 1.0 / (len(layout.blocks) * lam + sum(H[a:b] @ Pd[a:b, a:b] @ H[a:b] for a, b in layout.blocks))
        new = np.zeros_like(ref)
        for a, b in layout.blocks:
            K = Pd[a:b, a:b] @ H[a:b]
            new[a:b, a:b] = (Pd[a:b, a:b] - A * np.outer(K, K)) / lam
        ref = new
    assert kf.scale < 1e12
    np.testing.assert_allclose(kf.dense(), ref, rtol=1e-9)


def test_rejects_bad_options_and_inputs():
    layout = BlockLayout.build(SHAPES, 8)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"kalman_lambda .* must be in \(0, 1\]"):
            FilterOptions(lambda1=bad)
    kf = KalmanFilter(layout)
    with pytest.raises(ValueError, match="gradient has 3 entries"):
        kf.update(np.ones(3), 1.0)
    H = np.ones(layout.n)
    H[0] = np.nan
    with pytest.raises(FloatingPointError):
        kf.update(H, 1.0)


def test_state_roundtrip_and_refusal(tmp_path):
    rng = np.random.default_rng(6)
    weights = init_weights(rng)
    xs, ys = data(20, rng)
    layout = BlockLayout.build(SHAPES, 8)
    kf, _ = run_core(layout, weights, xs, ys, FilterOptions(p0=0.5))
    path = save_state(tmp_path / "s.kalman.npz", kf, extra={"step": 7})
    kf2, extra = load_state(path, layout)
    assert extra == {"step": 7}
    assert (kf2.lam, kf2.scale, kf2.nupdates) == (kf.lam, kf.scale, kf.nupdates)
    for a, b in zip(kf.blocks, kf2.blocks):
        np.testing.assert_array_equal(a, b)
    # continuing from the loaded state == continuing the original
    H = rng.normal(size=layout.n)
    np.testing.assert_array_equal(kf.update(H, 0.3), kf2.update(H, 0.3))
    # a state saved with downdates pending holds them applied
    assert kf._npending > 0
    P = kf.dense()
    kf3, _ = load_state(save_state(tmp_path / "s.kalman.npz", kf), layout)
    np.testing.assert_allclose(kf3.dense(), P, rtol=0, atol=1e-15 * np.abs(P).max())
    # another model's layout is refused with a message naming the difference
    other = BlockLayout.build(SHAPES[:-1] + [("b3", (2,))], 8)
    with pytest.raises(LayoutMismatchError, match="does not belong to this model: tensor b3 has shape"):
        load_state(path, other)
    with pytest.raises(LayoutMismatchError, match="blocksize 8 != 16"):
        load_state(path, BlockLayout.build(SHAPES, 16))
    # not a state file
    junk = tmp_path / "junk.npz"
    junk.write_text("nope")
    with pytest.raises(KalmanStateError, match="is not a Kalman state file"):
        load_state(junk)
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.npz", "s.kalman.npz"]


def test_sign_trick_scalar_measurement():
    y = np.array([[1.0, -2.0, 0.5]])
    yhat = np.array([[0.5, -1.0, 0.5]])
    s = rlekf.signs(y, yhat, 2.0)
    np.testing.assert_array_equal(s, [[1.0, -1.0, 1.0]])
    # innov = sqrt(B) mean |p (y - yhat) / c|
    assert rlekf.innovation(y, yhat, 2.0, 4.0) == pytest.approx(np.mean([1.0, 2.0, 0.0]) / 4.0)
    y2 = np.vstack([y, y])
    assert rlekf.innovation(y2, np.vstack([yhat, yhat]), 2.0, 4.0) == pytest.approx(np.sqrt(2) * 1.0 / 4.0)
    assert rlekf.force_normalisers(32, 6) == (32.0, 576.0)
    assert rlekf.force_normalisers(32, 6, per_natoms=False) == (1.0, 18.0)
    g = rlekf.draw_force_groups(np.random.default_rng(0), 32, 4, 6)
    assert g.shape == (4, 6) and len(set(g.ravel())) == 24
