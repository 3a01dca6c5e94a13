"""Calibration forms on synthetic data with a known law: the fits recover it, and the
conformal factor gives the coverage asked for on atoms it was not fitted on."""

import numpy as np
import pytest

from alkpu_plugin import calibration as cal


def _atoms(law, n=40_000, seed=0):
    """KPU spread over four decades; squared errors |dF|^2 of three Gaussian components
    whose mean is law(KPU), as a model's force error scatters around its variance."""
    rng = np.random.default_rng(seed)
    kpu = 10 ** rng.uniform(-2, 2, n)
    sq = law(kpu) * rng.chisquare(3, n) / 3
    return kpu, sq


def test_linear_fit_recovers_a_and_b():
    kpu, sq = _atoms(lambda k: 2.5e-3 * k + 4e-3)
    fit = cal.fit(kpu, sq)
    assert fit["a"] == pytest.approx(2.5e-3, rel=0.03)
    assert fit["b"] == pytest.approx(4e-3, rel=0.15)
    assert np.allclose(cal.predicted_sq_error(fit, kpu), fit["a"] * kpu + fit["b"])


@pytest.mark.parametrize("p", [1.0, 1.7, 3.0])
def test_power_fit_recovers_exponent_and_scale(p):
    kpu, sq = _atoms(lambda k: 1e-3 * k ** p, seed=int(10 * p))
    fit = cal.fit_power(kpu, sq)
    assert fit["p"] == pytest.approx(p, abs=0.03)
    assert fit["a"] == pytest.approx(1e-3, rel=0.1)
    # the deciles of a power law predict what is observed; a straight line does not
    rows = cal.deciles(kpu, sq, fit)
    ratio = np.array([r["predicted_rms_error"] / r["observed_rms_error"] for r in rows])
    assert np.all(np.abs(ratio - 1) < 0.1)
    if p == 3.0:
        line = cal.deciles(kpu, sq, cal.fit(kpu, sq))
        assert line[0]["predicted_rms_error"] > 3 * line[0]["observed_rms_error"]


def test_conformal_intervals_cover_what_they_promise():
    kpu, sq = _atoms(lambda k: 1e-3 * k ** 1.5, n=20_000, seed=3)
    fit = cal.fit_power(kpu[:10_000], sq[:10_000])
    q90 = cal.conformal_quantile(kpu[:10_000], sq[:10_000], fit, 0.9)
    q50 = cal.conformal_quantile(kpu[:10_000], sq[:10_000], fit, 0.5)
    assert 0 < q50 < q90 < np.inf
    assert cal.interval_coverage(kpu[10_000:], sq[10_000:], fit, q90) == pytest.approx(0.9, abs=0.01)
    assert cal.interval_coverage(kpu[10_000:], sq[10_000:], fit, q50) == pytest.approx(0.5, abs=0.015)
    # with fewer atoms than the coverage needs, no finite factor is promised
    assert cal.conformal_quantile(kpu[:5], sq[:5], fit, 0.9) == np.inf


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 40"):
        cal.fit_power(np.ones(10), np.ones(10))
    with pytest.raises(ValueError, match="KPU > 0"):
        cal.fit_power(np.zeros(100), np.ones(100))
    with pytest.raises(ValueError, match="coverage"):
        cal.conformal_quantile(np.ones(10), np.ones(10), {"a": 1.0}, 1.5)


def test_default_form_is_the_power_law_with_the_line_beside_it():
    kpu, sq = _atoms(lambda k: 2e-3 * k ** 1.4, seed=5)
    out = cal.fit_forces(kpu, sq)
    assert out["p"] == pytest.approx(1.4, abs=0.03) and "fallback" not in out
    assert out["line"] == cal.fit(kpu, sq)
    assert cal.fit_forces(kpu, sq, "line") == {**cal.fit(kpu, sq), "kpu_max": kpu.max()}
    with pytest.raises(ValueError, match="unknown calibration form 'cubic'"):
        cal.fit_forces(kpu, sq, "cubic")


@pytest.mark.parametrize("law, n, why", [
    (lambda k: 1e-3 * k ** 4, 40_000, "exponent 4"),      # outside 0.5-3: taken as a failed fit
    (lambda k: 1e-3 * k, 10, "at least 16"),               # too few atoms for the bins
])
def test_the_line_replaces_a_power_law_that_failed(law, n, why):
    kpu, sq = _atoms(law, n=n, seed=7)
    out = cal.fit_forces(kpu, sq)
    assert "p" not in out and why in out["fallback"]
    assert out["a"] == cal.fit(kpu, sq)["a"]
