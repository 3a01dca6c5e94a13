"""Our keys in a DP-GEN param.json: separated, checked, and DP-GEN validates the rest."""

import copy

import pytest
from dargs.dargs import ArgumentKeyError, ArgumentValueError

from alkpu_plugin.dpgen.params import ParamError, split_param

# a complete DP-GEN 0.14 param.json (LAMMPS exploration, custom fp style)
PARAM = {
    "type_map": ["Cu"],
    "mass_map": [63.546],
    "init_data_prefix": "data",
    "init_data_sys": ["init"],
    "sys_configs_prefix": "confs",
    "sys_configs": [["POSCAR"]],
    "numb_models": 4,
    "default_training_param": {
        "model": {"descriptor": {"type": "se_e2_a", "sel": [60], "rcut_smth": 3.5, "rcut": 4.5,
                                 "neuron": [8, 16], "axis_neuron": 4},
                  "fitting_net": {"neuron": [32, 32]}},
        "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 3e-5, "decay_steps": 100},
        "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {"numb_steps": 400, "disp_freq": 100, "save_freq": 400},
    },
    "model_devi_dt": 0.002,
    "model_devi_skip": 0,
    "model_devi_f_trust_lo": 0.05,
    "model_devi_f_trust_hi": 0.15,
    "model_devi_clean_traj": False,
    "model_devi_jobs": [{"sys_idx": [0], "temps": [300], "press": [1.0], "trj_freq": 10,
                         "nsteps": 100, "ensemble": "nvt"}],
    "fp_style": "custom",
    "fp_task_max": 10,
    "fp_task_min": 1,
    "fp_params": {"input_fmt": "ase/json", "input_fn": "input.json", "output_fmt": "ase/json",
                  "output_fn": "output.json"},
}


def with_keys(**keys):
    p = copy.deepcopy(PARAM)
    p.update(keys)
    return p


def test_committee_is_the_default_and_the_param_is_dpgens():
    dpgen, settings = split_param(PARAM)
    assert settings.uncertainty == "committee" and not settings.is_kpu
    assert dpgen == PARAM


def test_one_key_switches_to_kpu_and_is_removed_before_dpgen():
    dpgen, settings = split_param(with_keys(uncertainty="kpu"))
    assert settings.is_kpu
    assert "uncertainty" not in dpgen and "kpu" not in dpgen
    assert dpgen == PARAM
    assert settings.kpu["trust"] == "calibrated" and settings.kpu["kpu_train_frames"] == 20
    _, s2 = split_param(with_keys(uncertainty="kpu", kpu={"trust": "relative", "eps_lo": 1.0, "eps_hi": 2.0,
                                                          "optimizer": {"blocksize": 1024}}))
    assert s2.kpu["eps_hi"] == 2.0 and s2.kpu["optimizer"]["blocksize"] == 1024


def test_dpgen_still_rejects_its_own_unknown_keys():
    with pytest.raises(ArgumentKeyError, match="undefined key `uncertanity`"):
        split_param(with_keys(uncertanity="kpu"))


@pytest.mark.parametrize(
    "keys, error, message",
    [
        ({"uncertainty": "kpu", "train_backend": "pytorch"}, ParamError,
         r'runs on DeePMD-kit\'s TensorFlow backend; this param.json sets "train_backend": "pytorch"'),
        ({"uncertainty": "kpu", "kpu": {"trust": "relative"}}, ParamError,
         r'trust "relative" needs kpu/eps_lo and kpu/eps_hi'),
        ({"uncertainty": "kpu", "kpu": {"trust": "relative", "eps_lo": 3.0, "eps_hi": 2.0}}, ParamError,
         r"eps_lo \(3.0\) must be >= 0 and not above kpu/eps_hi \(2.0\)"),
        ({"uncertainty": "kpu", "kpu": {"trsut": "relative"}}, ArgumentKeyError,
         r"undefined key `trsut` is not allowed in strict mode. Did you mean: trust\?"),
        ({"uncertainty": "kpu", "kpu": {"optimizer": {"blocksize": 0}}}, ArgumentValueError,
         "blocksize must be a positive integer"),
        ({"uncertainty": "kpu", "kpu": {"optimizer": {"kalman_lamda": 0.9}}}, ArgumentKeyError,
         "undefined key `kalman_lamda`"),
        ({"uncertainty": "bayes"}, ArgumentValueError, 'uncertainty must be "committee" or "kpu"'),
        ({"uncertainty": "kpu", "model_devi_f_trust_lo": 0.3}, ParamError,
         r"model_devi_f_trust_lo \(0.3\) is above model_devi_f_trust_hi \(0.15\)"),
        ({"uncertainty": "kpu", "kpu": {"selection": "best"}}, ArgumentValueError,
         'selection must be "top" or "random" or "diverse"'),
        ({"uncertainty": "kpu", "kpu": {"extrapolation": 0.5}}, ArgumentValueError,
         r"extrapolation must be 0 \(off\) or >= 1"),
        ({"uncertainty": "kpu", "kpu": {"selection": "diverse"}, "model_devi_merge_traj": True}, ParamError,
         r'kpu/selection "diverse" reads each candidate .* and model_devi_merge_traj'),
    ],
)
def test_bad_kpu_input_is_one_clear_error(keys, error, message):
    with pytest.raises(error, match=message):
        split_param(with_keys(**keys))


def test_missing_trust_levels_in_calibrated_mode():
    p = with_keys(uncertainty="kpu")
    del p["model_devi_f_trust_hi"]
    with pytest.raises(ParamError, match="model_devi_f_trust_hi missing"):
        split_param(p)


def test_reused_model_without_its_kalman_state_stops_before_its_jobs(tmp_path, monkeypatch):
    """DP-GEN continues training at iteration 1, but iteration 0 left no Kalman state."""
    import json

    from alkpu_plugin.dpgen import driver

    monkeypatch.chdir(tmp_path)
    (tmp_path / "iter.000000" / "00.train" / "000").mkdir(parents=True)
    task = tmp_path / "iter.000001" / "00.train" / "000"
    task.mkdir(parents=True)
    (task / "input.json").write_text(json.dumps({"optimizer": {"type": "RLEKF"}}))
    jdata = with_keys(training_reuse_iter=1)
    assert driver._continues(1, jdata) and not driver._continues(0, jdata)
    with pytest.raises(FileNotFoundError, match="its Kalman state .*kalman.000.npz is missing"):
        driver.set_init_state(1, jdata)
    assert json.loads((task / "input.json").read_text()) == {"optimizer": {"type": "RLEKF"}}
    # and it is never looked for when DP-GEN trains from scratch
    driver.set_init_state(1, with_keys())


def energy_kpu_hook(result):
    """A user selection function: select by energy KPU instead of forces."""
    return result.energy_kpu


def wrong_length_hook(result):
    return [1.0] * (len(result.steps) + 1)


def test_select_hook_values_and_command(tmp_path, monkeypatch):
    import numpy as np

    from alkpu_plugin.dpgen import driver
    from alkpu_plugin.kpu_engine import KPUResult
    from alkpu_plugin.model_devi import devi_values, read_model_devi, write_model_devi

    result = KPUResult(np.arange(3), np.array([0, 10, 20]), np.array([1.0, 2.0, 3.0]),
                       np.array([5.0, 6.0, 7.0]), np.array([[4.0, 9.0], [1.0, 1.0], [16.0, 0.0]]))
    np.testing.assert_allclose(devi_values(result), [[2, 3], [1, 1], [4, 0]])
    np.testing.assert_allclose(devi_values(result, relative_to=2.0), [[0.5], [1.0], [1.5]])
    hook = "tests.test_dpgen_params:energy_kpu_hook"
    values = devi_values(result, hook=hook)
    write_model_devi(tmp_path / "model_devi.out", result.steps, values)
    np.testing.assert_allclose(read_model_devi(tmp_path / "model_devi.out")[:, 4], [5.0, 6.0, 7.0])
    with pytest.raises(ValueError, match="must return finite"):
        devi_values(result, hook="tests.test_dpgen_params:wrong_length_hook")
    # the driver passes the hook to the exploration tasks
    _, settings = split_param(with_keys(uncertainty="kpu", kpu={"select_hook": hook}))
    monkeypatch.chdir(tmp_path)
    md = driver.kpu_mdata(0, PARAM, {"model_devi_command": "lmp"}, settings.kpu)
    assert f"--select-hook {hook} --" in md["model_devi_command"]
