"""An iteration whose RLEKF training ended on the initial plateau: `alkpu run` says so (or stops)."""

import logging

import pytest

from alkpu_plugin.dpgen.driver import PlateauError, check_plateau
from alkpu_plugin.kalman import read_meta

pytestmark = pytest.mark.slow


def test_plateau_of_a_short_kpu_iteration_is_reported(finished_run, caplog):
    root, _ = finished_run  # 40 RLEKF steps of a tiny model: forces not learned yet
    meta = read_meta(root / "iter.000000" / "00.train" / "kalman.000.npz")
    fit = meta["extra"]["force_fit"]
    assert not fit["learned"] and fit["on"] == "training" and fit["ratio"] >= 0.8
    with caplog.at_level(logging.WARNING, logger="dpgen"):
        check_plateau(0, meta, {})
    assert "iter.000000: the model stopped on RLEKF's plateau" in caplog.text
    assert f"{fit['ratio']:.2f} x the RMS of the label forces" in caplog.text
    with pytest.raises(PlateauError, match=r"kpu/numb_steps .* delete the lines after `0 0` in record.dpgen"):
        check_plateau(0, meta, {"on_plateau": "stop"})


def test_a_trained_model_passes(trained_model, caplog):
    root, _ = trained_model  # 200 steps, validation forces learned
    meta = read_meta(root / "model.ckpt.kalman.npz")
    assert meta["extra"]["force_fit"]["learned"]
    with caplog.at_level(logging.WARNING, logger="dpgen"):
        check_plateau(0, meta, {"on_plateau": "stop"})
    assert "plateau" not in caplog.text
