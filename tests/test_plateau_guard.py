"""The plateau check: a model whose RLEKF training ended on the initial plateau is reported by
`alkpu run` (or stops it); a trained one is not."""

import logging

import pytest

from alkpu_plugin.dpgen.driver import PlateauError, check_plateau
from alkpu_plugin.kalman import read_meta

from .conftest import PAPER_SETTINGS, make_input, run_dp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plateau_model(cu_data, tmp_path_factory):
    """10 `dp train` steps of the paper's settings: the forces are not learned yet."""
    root = tmp_path_factory.mktemp("plateau")
    run_dp(root, "train", "input.json",
           input_data=make_input(cu_data, **{"training/numb_steps": 10, "training/save_freq": 10,
                                             **PAPER_SETTINGS}))
    return root


def test_plateau_is_reported(plateau_model, caplog):
    meta = read_meta(plateau_model / "model.ckpt.kalman.npz")
    fit = meta["extra"]["force_fit"]
    assert not fit["learned"] and fit["on"] == "validation" and fit["ratio"] >= 0.8
    with caplog.at_level(logging.WARNING, logger="dpgen"):
        check_plateau(0, meta, {})
    assert "iter.000000: the model stopped on RLEKF's plateau" in caplog.text
    assert f"{fit['ratio']:.2f} x the RMS of the label forces" in caplog.text
    with pytest.raises(PlateauError, match=r"kpu/numb_steps .* delete the lines after `0 0` in record.dpgen"):
        check_plateau(0, meta, {"on_plateau": "stop"})


def test_a_short_kpu_iteration_with_the_defaults_passes(finished_run, caplog):
    root, _ = finished_run  # `alkpu run`: 50 RLEKF steps of a tiny model with the defaults
    meta = read_meta(root / "iter.000000" / "00.train" / "kalman.000.npz")
    fit = meta["extra"]["force_fit"]
    assert fit["on"] == "training" and fit["learned"] and fit["ratio"] < 0.8
    with caplog.at_level(logging.WARNING, logger="dpgen"):
        check_plateau(0, meta, {"on_plateau": "stop"})
    assert "plateau" not in caplog.text


def test_a_trained_model_passes(trained_model, caplog):
    root, _ = trained_model  # 200 steps, validation forces learned
    meta = read_meta(root / "model.ckpt.kalman.npz")
    assert meta["extra"]["force_fit"]["learned"]
    with caplog.at_level(logging.WARNING, logger="dpgen"):
        check_plateau(0, meta, {"on_plateau": "stop"})
    assert "plateau" not in caplog.text
