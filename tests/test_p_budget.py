"""P's memory budget: sizes, "auto" blocksize, the error before anything is built or submitted,
and the analytic weight count of se_e2_a models against real `dp train` layouts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alkpu_plugin.dpgen.model_size import UnsupportedModel, model_tensors, weight_count
from alkpu_plugin.dpgen.params import ParamError, split_param
from alkpu_plugin.kalman import BlockLayout, read_meta
from alkpu_plugin.kalman import budget
from alkpu_plugin.kalman.budget import PMemoryError, auto_blocksize, p_bytes, plan_p

from .conftest import make_input, run_dp
from .test_dpgen_params import with_keys

# 4 tensors, 10 + 6 + 20 + 3 = 39 weights
TENSORS = [("a", (2, 5)), ("b", (6,)), ("c", (4, 5)), ("d", (3,))]


def squares(layout):
    return sum(n * n for n in layout.block_sizes)


# ------------------------------------------------------------------ budget.py
@pytest.mark.parametrize("blocksize", [1, 7, 16, 20, 39, 100])
def test_p_bytes_is_the_sum_of_squared_blocks(blocksize):
    layout = BlockLayout.build(TENSORS, blocksize)
    assert p_bytes(TENSORS, blocksize, "float64") == 8 * squares(layout)
    assert p_bytes(TENSORS, blocksize, "float32") == 4 * squares(layout)


def test_p_bytes_by_hand():
    # blocksize 16: groups a+b (16), c (20 -> 16 + 4), d (3): 16^2 + 16^2 + 4^2 + 3^2
    assert p_bytes(TENSORS, 16) == 8 * (256 + 256 + 16 + 9)
    # one block of 39 once the blocksize holds everything
    assert p_bytes(TENSORS, 39, "float32") == 4 * 39 * 39


def test_auto_blocksize_is_the_largest_candidate_that_fits():
    cands = (40, 16, 8, 4)
    sizes = {bs: p_bytes(TENSORS, bs) for bs in cands}
    assert sizes[40] > sizes[16] > sizes[8] > sizes[4]
    assert auto_blocksize(TENSORS, sizes[40], candidates=cands) == 40
    assert auto_blocksize(TENSORS, sizes[40] - 1, candidates=cands) == 16
    assert auto_blocksize(TENSORS, sizes[8], candidates=cands) == 8
    assert auto_blocksize(TENSORS, sizes[4] - 1, candidates=cands) is None
    # float32 halves P
    assert auto_blocksize(TENSORS, sizes[40] // 2, "float32", candidates=cands) == 40
    # no limit: the largest candidate up to AUTO_BLOCKSIZE_MAX
    assert auto_blocksize(TENSORS, None) == budget.AUTO_BLOCKSIZE_MAX == 1024
    assert auto_blocksize(TENSORS, None, candidates=cands, largest=16) == 16


def test_auto_blocksize_halves_while_float32_p_exceeds_its_cap():
    cands = (40, 16, 8, 4)
    f32 = {bs: p_bytes(TENSORS, bs, "float32") for bs in cands}
    assert auto_blocksize(TENSORS, None, candidates=cands, p_max=f32[40]) == 40
    assert auto_blocksize(TENSORS, None, candidates=cands, p_max=f32[40] - 1) == 16
    assert auto_blocksize(TENSORS, None, candidates=cands, p_max=f32[8]) == 8
    # the cap is in float32 whatever p_dtype is asked; the limit is in p_dtype
    assert auto_blocksize(TENSORS, 10**6, "float64", candidates=cands, p_max=f32[16]) == 16
    assert auto_blocksize(TENSORS, p_bytes(TENSORS, 8, "float64"), "float64", candidates=cands,
                          p_max=f32[16]) == 8
    # no candidate under the cap: the smallest that fits the limit, or None
    assert auto_blocksize(TENSORS, None, candidates=cands, p_max=f32[4] - 1) == 4
    assert auto_blocksize(TENSORS, p_bytes(TENSORS, 4) - 1, candidates=cands, p_max=f32[4] - 1) is None


@pytest.mark.parametrize("fitting, axis, type_map, expected", [
    ([50, 50, 50], 16, ["Cu"], 1024),             # the benchmarks' Cu-32 model, 91,751 weights
    ([50, 50, 50], 16, ["Cu", "Ni"], 1024),       # their Cu-Ni model, 196,402 weights
    ([240, 240, 240], 12, ["Cu"], 512),           # DP-GEN's size, 411,091 weights: 1.68 GB at 1024
    ([240, 240, 240], 12, ["Cu", "Ni"], 256),     # the same with two species
])
def test_auto_blocksize_of_real_model_sizes(fitting, axis, type_map, expected):
    model = {"type_map": type_map,
             "descriptor": {"type": "se_e2_a", "sel": [60] * len(type_map), "rcut_smth": 0.5, "rcut": 5.0,
                            "neuron": [25, 50, 100], "axis_neuron": axis},
             "fitting_net": {"neuron": fitting}}
    tensors = model_tensors(model, type_map)
    plan = plan_p(tensors, "auto", "auto", limit_gb=12.0)
    assert plan.blocksize == expected
    assert p_bytes(tensors, expected, "float32") <= 1e9
    if expected < 1024:
        assert p_bytes(tensors, 2 * expected, "float32") > 1e9


def test_limit_defaults_to_half_the_physical_memory(monkeypatch):
    values = {"SC_PHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(budget.os, "sysconf", lambda name: values[name])
    limit, source = budget.resolve_limit(None, "optimizer/p_memory_limit")
    assert limit == 1000 * 4096 // 2
    assert "half of this machine's" in source and "optimizer/p_memory_limit" in source
    assert budget.resolve_limit(2.5) == (2_500_000_000, "set by p_memory_limit")
    with pytest.raises(ValueError, match="positive"):
        budget.resolve_limit(0.0)


def test_plan_reports_size_and_step_cost():
    plan = plan_p(TENSORS, 16, "float64", limit_gb=1.0, force_updates=4)
    assert plan.n_weights == 39 and plan.blocksize == 16 and plan.nblocks == 4
    assert plan.p_bytes == p_bytes(TENSORS, 16)
    # five updates, each reading half of P and applying 1/32 of a rank-32 syrk (read + write of that half)
    assert plan.seconds_per_step == pytest.approx(plan.p_bytes * 5 * (0.5 + 1 / 32) / budget.BANDWIDTH)
    # a float32 P is read whole, and its deferred downdates read and write it whole
    plan32 = plan_p(TENSORS, 16, "float32", limit_gb=1.0, force_updates=4)
    assert plan32.seconds_per_step == pytest.approx(plan32.p_bytes * 5 * (1 + 2 / 32) / budget.BANDWIDTH)
    text = plan.describe()
    assert "39 weights" in text and "blocksize 16" in text and "s per step" in text
    auto = plan_p(TENSORS, "auto", "float64", limit_gb=p_bytes(TENSORS, 128) / 1e9)
    assert auto.blocksize == 1024  # every candidate >= 39 gives the one 39 x 39 block


def test_auto_p_dtype_is_float64_up_to_its_threshold(monkeypatch):
    entries = BlockLayout.build(TENSORS, 16).nbytes_p  # 537 entries, 4296 bytes in float64
    # a P at the threshold stays float64; one entry more goes to float32
    monkeypatch.setattr(budget, "AUTO_FLOAT64_MAX", 8 * entries)
    assert plan_p(TENSORS, 16, "auto", limit_gb=1.0).p_dtype == "float64"
    monkeypatch.setattr(budget, "AUTO_FLOAT64_MAX", 8 * entries - 1)
    plan = plan_p(TENSORS, 16, "auto", limit_gb=1.0)
    assert plan.p_dtype == "float32" and plan.p_bytes == 4 * entries
    # a float64 P over the limit but under the threshold: float32, which fits
    monkeypatch.setattr(budget, "AUTO_FLOAT64_MAX", 10**9)
    plan = plan_p(TENSORS, 16, "auto", limit_gb=(8 * entries - 1) / 1e9)
    assert plan.p_dtype == "float32"
    # "auto" blocksize with "auto" p_dtype: the largest blocksize whose float32 P fits
    limit = p_bytes(TENSORS, 39, "float32")
    plan = plan_p(TENSORS, "auto", "auto", limit_gb=limit / 1e9)
    assert plan.blocksize == 1024 and plan.p_dtype == "float32" and plan.p_bytes == limit
    # nothing fits even in float32: the error lists the settings that do
    with pytest.raises(PMemoryError, match="float32"):
        plan_p(TENSORS, 39, "auto", limit_gb=(limit - 1) / 1e9)
    with pytest.raises(ValueError, match='"auto"'):
        plan_p(TENSORS, 16, "float16")


def test_auto_p_dtype_of_real_model_sizes():
    # the threshold between Cu-32's model at blocksize 1024 (0.74 GB in float64) and the
    # DP-GEN-size one (3.35 GB): the first stays float64, the second is float32
    assert budget.resolve_p_dtype(740_600_000 // 8) == "float64"
    assert budget.resolve_p_dtype(3_350_000_000 // 8) == "float32"
    assert budget.resolve_p_dtype(10**9 // 8) == "float64"
    assert budget.resolve_p_dtype(10**9 // 8 + 1) == "float32"
    assert budget.resolve_p_dtype(100, limit_bytes=799) == "float32"


WIDE = [("w1", (100, 100)), ("b1", (100,)), ("w2", (100, 50))]  # 15100 weights


def test_over_the_limit_is_one_error_listing_what_fits():
    sizes = {bs: p_bytes(WIDE, bs) for bs in budget.CANDIDATE_BLOCKSIZES}
    limit = (sizes[2048] + sizes[4096]) / 2  # float64 fits at 2048 and below
    with pytest.raises(PMemoryError) as err:
        plan_p(WIDE, 5120, "float64", limit_gb=limit / 1e9, key_prefix="optimizer/")
    msg = str(err.value)
    assert "15100 weights at optimizer/blocksize 5120 in float64" in msg
    assert f"would take {sizes[5120] / 1e9:.3g} GB" in msg
    assert f"over the limit of {limit / 1e9:.3g} GB (set by optimizer/p_memory_limit)" in msg
    assert "raise optimizer/p_memory_limit (GB)" in msg
    # each candidate and p_dtype that fits, with its P size; none that does not
    for bs, nbytes in sizes.items():
        f64 = f"{nbytes / 1e9:.3g} GB in float64"
        f32 = f"{nbytes / 2 / 1e9:.3g} GB in float32"
        if nbytes <= limit:
            assert f"blocksize {bs}: {f64}, {f32}" in msg
        elif nbytes / 2 <= limit:
            assert f"blocksize {bs}: {f32}" in msg and f64 not in msg
        else:
            assert f"blocksize {bs}:" not in msg
    assert "blocksize 2048: " in msg and "blocksize 10240: " not in msg


def test_candidates_with_the_same_blocks_are_listed_together():
    one_block = p_bytes(TENSORS, 100)  # every candidate holds the 39 weights in one block
    with pytest.raises(PMemoryError) as err:
        plan_p(TENSORS, 100, "float64", limit_gb=one_block / 2 / 1e9)
    msg = str(err.value)
    assert "blocksize 10240/8192/5120/4096/2048/1024/512/256/128: " in msg
    assert f"{one_block / 2 / 1e9:.3g} GB in float32" in msg
    # "auto" when nothing fits
    with pytest.raises(PMemoryError, match=r'blocksize "auto".*39 weights.*No blocksize down to 128 fits'):
        plan_p(TENSORS, "auto", "float64", limit_gb=1e-12)


def test_kalman_budget_imports_no_tensorflow():
    code = ("import sys, alkpu_plugin.kalman.budget; "
            "assert 'tensorflow' not in sys.modules and 'deepmd' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------ model_size.py
BIG = {  # the DP-GEN-size Cu model of docs/memory.md
    "type_map": ["Cu"],
    "descriptor": {"type": "se_a", "sel": [90], "rcut_smth": 0.5, "rcut": 6.0,
                   "neuron": [25, 50, 100], "axis_neuron": 12, "resnet_dt": False},
    "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True},
}


def test_weight_count_by_hand():
    emb = (1 * 25 + 25) + (25 * 50 + 50) + (50 * 100 + 100)
    fit = (1200 * 240 + 240) + 2 * (240 * 240 + 240 + 240) + (240 + 1)
    assert weight_count(BIG) == emb + fit == 411091
    # resnet_dt in the embedding: idt only where the width doubles (25 -> 50 -> 100)
    rdt = {**BIG, "descriptor": {**BIG["descriptor"], "resnet_dt": True}}
    assert weight_count(rdt) == emb + fit + 50 + 100
    # two types, one net per (centre, neighbour) pair, minus the excluded pair (both ways)
    two = {**BIG, "type_map": ["Cu", "Ni"],
           "descriptor": {**BIG["descriptor"], "sel": [45, 45], "exclude_types": [[0, 1]]}}
    assert weight_count(two) == 2 * emb + 2 * fit
    two["descriptor"]["type_one_side"] = True
    assert weight_count(two) == 2 * emb + 2 * fit
    two["descriptor"]["exclude_types"] = []
    two["descriptor"]["type_one_side"] = False
    assert weight_count(two) == 4 * emb + 2 * fit


@pytest.mark.parametrize("model", [
    {"descriptor": {"type": "se_e2_r", "sel": [10], "rcut": 4.0}, "fitting_net": {}},
    {"descriptor": {"type": "se_e2_a", "sel": [10], "rcut": 4.0}, "fitting_net": {"type": "dipole"}},
    {"descriptor": {"type": "se_e2_a", "sel": [10], "rcut": 4.0}, "fitting_net": {},
     "type_embedding": {"neuron": [8]}},
])
def test_other_models_are_not_counted(model):
    with pytest.raises(UnsupportedModel):
        model_tensors(model, ["Cu"])


# ---------------------------------------------------- against the real dp train
@pytest.fixture(scope="module")
def cuni_data(tmp_path_factory):
    """12 training and 4 validation frames of 32-atom fcc Cu with half the atoms Ni (EMT, 300 K)."""
    from alkpu_plugin.reference import md_frames

    root = tmp_path_factory.mktemp("cuni_emt")
    kw = {"substitute": {"Ni": 0.5}, "type_map": ["Cu", "Ni"]}
    md_frames(300, 12, seed=5, **kw).to("deepmd/npy", str(root / "train"))
    md_frames(300, 4, seed=6, **kw).to("deepmd/npy", str(root / "valid"))
    return root


def tiny(data, ntypes=1, **changes):
    base = {
        "model/descriptor/neuron": [4, 8],
        "model/fitting_net/neuron": [8, 8],
        "training/numb_steps": 2, "training/disp_freq": 1, "training/save_freq": 2,
        "training/validation_data/numb_btch": 1,
    }
    if ntypes == 2:
        base.update({"model/type_map": ["Cu", "Ni"], "model/descriptor/sel": [40, 40]})
    return make_input(data, **{**base, **changes})


def real_layout(cwd):
    return read_meta(cwd / "model.ckpt.kalman.npz")["layout"]


CASES = {
    "one species": (1, {}),
    "two species, type_one_side, resnet_dt": (2, {"model/descriptor/type_one_side": True,
                                                  "model/descriptor/resnet_dt": True,
                                                  "model/fitting_net/resnet_dt": True}),
    "two species, pairs, resnet_dt": (2, {"model/descriptor/type_one_side": False,
                                          "model/descriptor/resnet_dt": True,
                                          "model/fitting_net/resnet_dt": True}),
    "two species, pairs, excluded pair, no resnet_dt": (2, {"model/descriptor/type_one_side": False,
                                                            "model/descriptor/exclude_types": [[0, 1]],
                                                            "model/fitting_net/resnet_dt": False}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_analytic_weights_are_the_real_layout(case, cu_data, cuni_data, tmp_path):
    ntypes, changes = CASES[case]
    data = tiny(cu_data if ntypes == 1 else cuni_data, ntypes, **changes)
    run_dp(tmp_path, "train", "input.json", input_data=data)
    layout = real_layout(tmp_path)
    predicted = model_tensors(data["model"])
    assert [(n, list(s)) for n, s in predicted] == list(zip(layout["names"], layout["shapes"]))
    real = BlockLayout.from_dict(layout)
    assert weight_count(data["model"]) == real.n
    assert p_bytes(predicted, real.blocksize) == 8 * real.nbytes_p


@pytest.mark.slow
def test_dp_train_stops_before_building_p_when_it_does_not_fit(cu_data, tmp_path):
    data = tiny(cu_data, **{"optimizer/p_memory_limit": 1e-6, "optimizer/p_dtype": "float64"})
    proc = run_dp(tmp_path, "train", "input.json", input_data=data, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    n = weight_count(data["model"])
    assert "RLEKFInputError" in out and f"{n} weights at optimizer/blocksize 1024 in float64" in out
    assert "over the limit of 1e-06 GB (set by optimizer/p_memory_limit)" in out
    assert "No blocksize down to 128 fits" in out
    # stopped before training: no step, no checkpoint, no Kalman state
    assert "start RLEKF training" not in out
    names = os.listdir(tmp_path)
    assert not [x for x in names if x.startswith("model.ckpt") or x.endswith(".kalman.npz")], names
    assert "lcurve.out" not in names


@pytest.mark.slow
def test_dp_train_auto_blocksize_takes_the_largest_that_fits(cu_data, tmp_path):
    model = tiny(cu_data)["model"]
    tensors = model_tensors(model)
    # a limit between the P at 256 and at 512 (the model has a few hundred weights): "auto" takes 256
    lo, hi = p_bytes(tensors, 256), p_bytes(tensors, 512)
    assert lo < hi
    limit = (lo + hi) / 2 / 1e9
    data = tiny(cu_data, **{"optimizer/blocksize": "auto", "optimizer/p_memory_limit": limit,
                            "optimizer/p_dtype": "float64"})
    proc = run_dp(tmp_path, "train", "input.json", input_data=data)
    assert real_layout(tmp_path)["blocksize"] == 256
    assert "blocksize 256" in proc.stdout + proc.stderr
    # restart with "auto" keeps the state's blocksize even under a limit that would now pick another
    data = tiny(cu_data, **{"optimizer/blocksize": "auto", "optimizer/p_memory_limit": 1.0,
                            "training/numb_steps": 4})
    (tmp_path / "input.json").write_text(json.dumps(data))
    run_dp(tmp_path, "train", "input.json", "--restart", "model.ckpt")
    meta = read_meta(tmp_path / "model.ckpt.kalman.npz")
    assert meta["layout"]["blocksize"] == 256 and meta["extra"]["step"] == 4


@pytest.mark.slow
def test_dp_train_auto_p_dtype_is_float32_when_float64_does_not_fit(cu_data, tmp_path):
    tensors = model_tensors(tiny(cu_data)["model"])
    f64 = p_bytes(tensors, 1024, "float64")
    # the default p_dtype ("auto") under a limit that float64 exceeds and float32 meets
    data = tiny(cu_data, **{"optimizer/p_memory_limit": 0.75 * f64 / 1e9})
    proc = run_dp(tmp_path, "train", "input.json", input_data=data)
    meta = read_meta(tmp_path / "model.ckpt.kalman.npz")
    assert meta["options"]["p_dtype"] == "float32"
    assert "float32" in proc.stdout + proc.stderr
    # without the limit the same small P stays float64
    run_dp(tmp_path / "b", "train", "input.json", input_data=tiny(cu_data))
    assert read_meta(tmp_path / "b" / "model.ckpt.kalman.npz")["options"]["p_dtype"] == "float64"


# -------------------------------------------------------------- alkpu run
def test_kpu_param_with_p_over_the_limit_stops_before_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    param = with_keys(uncertainty="kpu", kpu={"optimizer": {"p_memory_limit": 0.01, "blocksize": 4096,
                                                             "p_dtype": "float64"}})
    n = weight_count(param["default_training_param"]["model"], param["type_map"])
    size = p_bytes(model_tensors(param["default_training_param"]["model"], param["type_map"]), 4096)
    with pytest.raises(ParamError) as err:
        split_param(param)
    msg = str(err.value)
    assert f"would take {size / 1e9:.3g} GB: {n} weights at kpu/optimizer/blocksize 4096 in float64" in msg
    assert "limit of 0.01 GB (set by kpu/optimizer/p_memory_limit)" in msg
    assert "blocksize 256: " in msg and "raise kpu/optimizer/p_memory_limit" in msg
    assert os.listdir(tmp_path) == []
    # the same model with "auto" runs, and so does the default limit
    split_param(with_keys(uncertainty="kpu", kpu={"optimizer": {"p_memory_limit": 0.01, "blocksize": "auto"}}))
    split_param(with_keys(uncertainty="kpu"))


def test_kpu_param_with_an_uncounted_descriptor_leaves_the_check_to_dp_train(caplog):
    param = with_keys(uncertainty="kpu", kpu={"optimizer": {"p_memory_limit": 1e-9}})
    param["default_training_param"]["model"]["descriptor"] = {
        "type": "se_e2_r", "sel": [60], "rcut_smth": 3.5, "rcut": 4.5, "neuron": [8, 16]}
    with caplog.at_level("INFO", logger="dpgen"):
        split_param(param)
    assert "checked by dp train" in caplog.text and "se_e2_r" in caplog.text


def test_committee_mode_is_not_checked():
    split_param(with_keys(kpu={"optimizer": {"p_memory_limit": 1e-9}}))


def test_table_script_matches_the_budget_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "p_memory_table.py"
    spec = importlib.util.spec_from_file_location("p_memory_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.rows
    table = {(r["blocksize"], r["p_dtype"]): r for r in rows()}
    t = model_tensors(BIG)
    assert table[(5120, "float64")]["weights"] == 411091
    assert table[(1024, "float32")]["p_bytes"] == p_bytes(t, 1024, "float32")
    assert np.all([r["fits_2gb"] == (r["p_bytes"] <= 2e9) for r in table.values()])
