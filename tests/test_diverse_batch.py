"""Diverse batches by virtual Kalman updates: the greedy pivoted Cholesky against a dense
reference that really updates P after each chosen frame."""

import numpy as np
import pytest

from alkpu_plugin.kalman import BlockLayout, KalmanFilter
from alkpu_plugin.kalman.diverse_batch import gram, greedy_batch


def _filter(seed=0, updates=40):
    """A filter with a non-trivial block-diagonal P: three blocks, a few real updates."""
    layout = BlockLayout.build([("a", (7, 3)), ("b", (9,)), ("c", (30,))], 16)
    kf = KalmanFilter(layout)
    rng = np.random.default_rng(seed)
    for _ in range(updates):
        kf.update(rng.normal(size=layout.n), float(rng.normal()))
    return kf


def _dense_reference(P, rows, groups, k, noise, span_tol=1e-8):
    """Score every frame with the current P, take the best, update P as a Kalman
    measurement of that frame's rows with the given noise; frames whose rows lie in the
    span of the chosen rows (residual in the P metric) are not taken."""
    P = P.copy()
    P0 = P.copy()
    chosen, gains = [], []
    for _ in range(k):
        best, best_gain = -1, -np.inf
        S = np.concatenate([groups[c] for c in chosen]) if chosen else np.zeros(0, int)
        for f, idx in enumerate(groups):
            if f in chosen:
                continue
            G = rows[idx]
            K0 = G @ P0 @ G.T
            if S.size:
                GS = rows[S]
                resid = K0 - G @ P0 @ GS.T @ np.linalg.pinv(GS @ P0 @ GS.T) @ GS @ P0 @ G.T
                if np.trace(resid) <= span_tol * np.trace(K0):
                    continue
            _, logdet = np.linalg.slogdet(np.eye(idx.size) + G @ P @ G.T / noise)
            if 0.5 * logdet > best_gain:
                best, best_gain = f, 0.5 * logdet
        if best < 0:
            break
        G = rows[groups[best]]
        gain = P @ G.T @ np.linalg.inv(G @ P @ G.T + noise * np.eye(G.shape[0]))
        P = P - gain @ G @ P
        P = 0.5 * (P + P.T)
        chosen.append(best)
        gains.append(best_gain)
    return chosen, gains


@pytest.mark.parametrize("noise", [1e-3, 0.3, 10.0])
@pytest.mark.parametrize("rows_per_frame", [1, 3])
def test_greedy_batch_equals_a_dense_reference_that_updates_p(noise, rows_per_frame):
    kf = _filter(seed=1)
    rng = np.random.default_rng(2)
    nframes = 14
    # correlated candidates: frames share directions, so the virtual updates change the order
    basis = rng.normal(size=(6, kf.layout.n))
    rows = rng.normal(size=(nframes * rows_per_frame, 6)) @ basis + 0.3 * rng.normal(
        size=(nframes * rows_per_frame, kf.layout.n))
    groups = [np.arange(f * rows_per_frame, (f + 1) * rows_per_frame) for f in range(nframes)]
    K = gram(kf, rows)
    P = kf.dense()
    np.testing.assert_allclose(K, rows @ P @ rows.T, rtol=1e-12, atol=1e-12 * np.abs(K).max())
    batch = greedy_batch(K, groups, 8, noise)
    ref_frames, ref_gains = _dense_reference(P, rows, groups, 8, noise)
    assert batch.frames == ref_frames
    np.testing.assert_allclose(batch.gains, ref_gains, rtol=1e-8, atol=1e-12)
    # gains never increase along the batch
    assert np.all(np.diff(batch.gains) <= 1e-12)
    # the first pick is the top frame by its own KPU; the batch is not the top-k by own KPU
    own = [0.5 * np.linalg.slogdet(np.eye(rows_per_frame) + K[np.ix_(g, g)] / noise)[1] for g in groups]
    assert batch.frames[0] == int(np.argmax(own))
    assert batch.frames != [int(f) for f in np.argsort(own)[::-1][:8]]


@pytest.mark.parametrize("noise", [1e-6, 1.0, 1e4])
def test_a_duplicated_frame_is_never_chosen_twice(noise):
    kf = _filter(seed=3)
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(10 * 3, kf.layout.n))
    groups = [np.arange(3 * f, 3 * f + 3) for f in range(10)]
    # frames 10 and 11 repeat frames 2 and 7 (the same configuration twice in the pool)
    rows = np.vstack([rows, rows[groups[2]], rows[groups[7]]])
    groups += [np.arange(30, 33), np.arange(33, 36)]
    batch = greedy_batch(gram(kf, rows), groups, len(groups), noise)
    picked = {2: 0, 7: 0}
    for f in batch.frames:
        if f in (2, 10):
            picked[2] += 1
        if f in (7, 11):
            picked[7] += 1
    assert picked == {2: 1, 7: 1}, batch.frames
    assert len(batch.frames) == 10 and len(set(batch.frames)) == 10
    assert sorted(batch.redundant) in ([2, 7], [2, 11], [10, 7], [10, 11])
    # with a large noise the virtual updates barely change P: the order is that of the KPU
    if noise >= 1e4:
        distinct = [f for f in range(10)]
        kpu = [np.trace(gram(kf, rows[groups[f]])) for f in distinct]
        assert batch.frames[:3] == [distinct[i] for i in np.argsort(kpu)[::-1][:3]]


def test_eligible_frames_and_bad_arguments():
    kf = _filter(seed=5)
    rows = np.random.default_rng(6).normal(size=(8, kf.layout.n))
    K = gram(kf, rows)
    labels = np.repeat(np.arange(4), 2)  # a frame label per row
    eligible = np.array([True, False, True, True])
    batch = greedy_batch(K, labels, 4, 0.5, eligible=eligible)
    assert sorted(batch.frames) == [0, 2, 3]
    with pytest.raises(ValueError, match="noise must be > 0"):
        greedy_batch(K, labels, 2, 0.0)
    with pytest.raises(ValueError, match="rows have 5 entries"):
        gram(kf, np.ones((2, 5)))
