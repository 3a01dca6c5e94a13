"""`dpgen run` switches to ALKPU by one key, and every input error stops before any directory or job.

Fast tests: the hook's reach and cost, the preflight's messages (one per problem), both commands
on bad input. Slow ones (the real `dpgen run`): a kpu iteration equal to `alkpu run`'s, and
committee mode equal to DP-GEN without the plugin.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import QUIET_ENV
from .dpgen_run import ALKPU, make_workdir, records

BIN = Path(sys.executable).parent
DPGEN = str(BIN / "dpgen")
TESTS = Path(__file__).parent
ENV = {**os.environ, **QUIET_ENV, "TF_CPP_MIN_LOG_LEVEL": "3",
       "PATH": str(BIN) + os.pathsep + os.environ["PATH"]}


def python(code, env=None, cwd=None):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env or ENV,
                          cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ------------------------------------------------------------------ the hook
def test_hook_costs_well_under_20_ms_to_import():
    """The entry point as dpdata loads it, in a process that has imported dpgen (best of 3)."""
    code = """
import time, dpgen, numpy
from importlib import metadata
(ep,) = [e for e in metadata.entry_points(group="dpdata.plugins") if e.name == "alkpu_dpgen_run"]
t = time.perf_counter(); ep.load(); print(time.perf_counter() - t)
"""
    best = min(float(python(code).split()[-1]) for _ in range(3))
    assert best < 0.020, f"{best * 1e3:.1f} ms"


def test_hook_reaches_only_dpgens_run_step():
    code = """
import sys
{imports}
import types
run = sys.modules.get("dpgen.generator.run")
hooked = run is not None and type(run) is not types.ModuleType
print(hooked)
if hooked:
    own = run.__dict__
    assert run.gen_run.__wrapped__ is own["gen_run"]
    assert run.run_iter is own["run_iter"] and run.make_train is own["make_train"]
    if "dpgen.main" in sys.modules:
        assert sys.modules["dpgen.main"].gen_run.__wrapped__ is own["gen_run"]
print(sum(type(f).__name__ == "_Finder" for f in sys.meta_path))
"""
    cases = {
        # the dpgen command: dpgen, then dpdata (from dpgen.auto_test), then dpgen.generator.run
        "import dpgen.main": ("True", "0"),
        # dpdata first imported from the top of dpgen/generator/run.py, while it loads
        "import dpgen.generator.run": ("True", "0"),
        # a program that imports dpdata (and maybe DP-GEN's functions) without the dpgen package first
        "import dpdata": ("False", "0"),
        "import dpdata, dpgen.generator.run": ("False", "0"),
    }
    for imports, expected in cases.items():
        assert tuple(python(code.format(imports=imports)).split()[-2:]) == expected, imports
    off = {**ENV, "ALKPU_DPGEN_HOOK": "0"}
    assert python(code.format(imports="import dpgen.main"), env=off).split()[-2:] == ["False", "0"]


class Args:
    def __init__(self, param, machine="machine.json", debug=False):
        self.PARAM, self.MACHINE, self.debug = param, machine, debug


def test_without_our_keys_dpgens_own_run_step_runs(tmp_path):
    from alkpu_plugin.dpgen import hook

    calls = []

    def gen_run(args):
        calls.append(args)
        return "dpgen's"

    param = tmp_path / "param.json"
    param.write_text(json.dumps({"type_map": ["Cu"]}))
    wrapped = hook._wrapped(gen_run, sys.modules[__name__])
    args = Args(str(param))
    assert wrapped(args) == "dpgen's" and calls == [args]
    (tmp_path / "broken.json").write_text("{")  # DP-GEN says what is wrong with it
    assert wrapped(Args(str(tmp_path / "broken.json"))) == "dpgen's"


def test_unexpected_dpgen_internals_name_alkpu_run(tmp_path, capsys, monkeypatch):
    from alkpu_plugin.dpgen import hook

    monkeypatch.chdir(tmp_path)
    (tmp_path / "param.json").write_text(json.dumps({"uncertainty": "kpu"}))

    def gen_run(args):  # a DP-GEN whose run step does something else
        return args

    class Module:
        pass

    with pytest.raises(SystemExit) as exc:
        hook._wrapped(gen_run, Module())(Args("param.json"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dpgen run: error: the installed DP-GEN") and "alkpu run param.json machine.json" in err
    assert os.listdir(tmp_path) == ["param.json"]


# ------------------------------------------------------------------ preflight
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory (data, POSCAR, param.json in kpu mode, Shell machine.json) that passes."""
    return make_workdir(tmp_path_factory.mktemp("preflight") / "run")


def _edit(root, dest, param=None, machine=None):
    p = json.loads((root / "param.json").read_text())
    m = json.loads((root / "machine.json").read_text())
    if param:
        param(p)
    if machine:
        machine(m)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "param.json").write_text(json.dumps(p, indent=1))
    (dest / "machine.json").write_text(json.dumps(m, indent=1))
    return dest / "param.json", dest / "machine.json"


def _set(path, value):
    def edit(d):
        *keys, last = path.split("/")
        for k in keys:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[last] = value
    return edit


def _typo_descriptor(p):
    d = p["default_training_param"]["model"]["descriptor"]
    d["rcut_smoth"] = d.pop("rcut_smth")


def _pwscf_without_pseudo(p):
    p["fp_style"] = "pwscf"
    p["fp_pp_path"] = "pseudo"
    p["fp_pp_files"] = ["Cu.pz-d-rrkjus.UPF"]
    p["user_fp_params"] = {"control": {"calculation": "scf"}, "system": {"ecutwfc": 30}, "electrons": {}}
    del p["fp_params"]


def _other_species_data(p):
    p["init_data_sys"] = ["init_ni"]


CASES = {
    "misspelled training key": (
        dict(param=_typo_descriptor),
        ["default_training_param: DeePMD-kit rejects the training input",
         "undefined key `rcut_smoth`", "Did you mean: rcut_smth?", "dp doc-train-input"]),
    "unknown RLEKF key (kpu block)": (
        dict(param=_set("kpu", {"optimizer": {"kalman_lamda": 0.9}})),
        ["undefined key `kalman_lamda`", "Did you mean: kalman_lambda?"]),
    "unknown RLEKF key (training input, committee mode)": (
        dict(param=lambda p: (p.update(uncertainty="committee"),
                              p["default_training_param"].update(optimizer={"type": "RLEKF", "blocksiz": 1024}))),
        ["default_training_param: DeePMD-kit rejects", "undefined key `blocksiz`", "Did you mean: blocksize?"]),
    "P over budget": (
        dict(param=_set("kpu", {"optimizer": {"p_memory_limit": 1e-6}})),
        ["P, the Kalman covariance", "kpu/optimizer/p_memory_limit"]),
    "missing init data": (
        dict(param=_set("init_data_sys", ["init", "nothere"])),
        ['init_data_sys[1] "nothere"', "does not exist", "Correct init_data_prefix or init_data_sys"]),
    "init data with a species outside type_map": (
        dict(param=_other_species_data),
        ['init_data_sys[0] "init_ni"', "has species ['Ni']", "Add them to type_map"]),
    "configurations with a species outside type_map": (
        dict(param=lambda p: (p.update(sys_configs=[["POSCAR_NI"]]))),
        ['sys_configs[0] "POSCAR_NI"', "has species ['Ni']", "type_map ['Cu'] lacks"]),
    "missing fp file": (
        dict(param=_pwscf_without_pseudo),
        ["fp_pp_path \"pseudo\"", "is not a directory", "fp_pp_files"]),
    "misspelled machine key": (
        dict(machine=lambda m: m["train"]["resources"].update(cpu_per_nod=1)),
        ["machine.json train/resources", "undefined key `cpu_per_nod`", "Did you mean: cpu_per_node?"]),
    "unknown batch type": (
        dict(machine=_set("fp/machine/batch_type", "Slurmm")),
        ['machine.json fp/machine/batch_type "Slurmm" is not one of', "Slurm"]),
    "machine entry without resources": (
        dict(machine=lambda m: m["model_devi"].pop("resources")),
        ["machine.json model_devi/resources is missing"]),
}


@pytest.fixture(scope="module")
def extra_inputs(workdir):
    """A Ni-labelled copy of the data and a Ni POSCAR, for the type-map cases."""
    import dpdata

    if not (workdir / "data" / "init_ni").exists():
        s = dpdata.LabeledSystem(str(workdir / "data" / "init"), fmt="deepmd/npy")
        s.data["atom_names"] = ["Ni"]
        s.to("deepmd/npy", str(workdir / "data" / "init_ni"))
        text = (workdir / "confs" / "POSCAR").read_text().splitlines()
        text[5] = text[5].replace("Cu", "Ni")
        (workdir / "confs" / "POSCAR_NI").write_text("\n".join(text) + "\n")
    return workdir


@pytest.mark.parametrize("case", list(CASES))
def test_each_input_error_is_named_before_anything_is_made(case, extra_inputs, tmp_path, monkeypatch):
    import dpdispatcher  # noqa: F401  (its log file appears where it is first imported, as in `dpgen run`)
    import dpgen  # noqa: F401  (dpgen.log too; run alone, this test would otherwise import it in root)

    from alkpu_plugin.dpgen.preflight import PreflightError, preflight

    root = extra_inputs
    edits, expected = CASES[case]
    param, machine = _edit(root, tmp_path / "in", **edits)
    before = sorted(os.listdir(root))
    monkeypatch.chdir(root)
    with pytest.raises(PreflightError) as exc:
        preflight(str(param), str(machine))
    assert len(exc.value.problems) == 1, exc.value.problems
    for text in expected:
        assert text in str(exc.value), str(exc.value)
    assert sorted(os.listdir(root)) == before  # no directory, no file


def test_a_good_input_passes_in_both_modes(workdir, tmp_path, monkeypatch):
    from alkpu_plugin.dpgen.preflight import preflight

    monkeypatch.chdir(workdir)
    checked = preflight("param.json", "machine.json")
    assert checked.settings.is_kpu and "uncertainty" not in checked.jdata
    param, machine = _edit(workdir, tmp_path / "c", param=_set("uncertainty", "committee"))
    assert not preflight(str(param), str(machine)).settings.is_kpu


def test_several_problems_one_message_each_in_both_commands(workdir, tmp_path):
    """`alkpu run` and `dpgen run` print the same list, exit 2, and make nothing."""
    def bad(p):
        _typo_descriptor(p)
        p["init_data_sys"] = ["nothere"]
        p["kpu"] = {"optimizer": {"p_memory_limit": 1e-6}}

    outs = []
    for command in ([ALKPU, "run"], [DPGEN, "run"]):
        run_dir = tmp_path / Path(command[0]).name
        run_dir.mkdir()
        for name in ("data", "confs", "remote"):
            (run_dir / name).symlink_to(workdir / name)
        _edit(workdir, run_dir, param=bad, machine=lambda m: m["train"]["resources"].update(cpu_per_nod=1))
        proc = subprocess.run([*command, "param.json", "machine.json"], cwd=run_dir, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        name = "alkpu run" if command[0] == ALKPU else "dpgen run"
        (message,) = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{name}: error:")]
        assert message == f"{name}: error: 4 problems in the input (nothing was made or submitted):"
        listed = proc.stderr.split(message, 1)[1]
        for text in ("P, the Kalman covariance", "undefined key `rcut_smoth`", '"nothere": ',
                     "undefined key `cpu_per_nod`"):
            assert text in listed
        outs.append(listed.split("\n\n")[0].replace(str(run_dir), "RUN"))
        assert not [p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()]
        assert not (run_dir / "record.dpgen").exists()
    assert outs[0] == outs[1]


def test_switch_turned_off_leaves_dpgen_alone(workdir, tmp_path):
    run_dir = tmp_path / "off"
    run_dir.mkdir()
    _edit(workdir, run_dir)
    proc = subprocess.run([DPGEN, "run", "param.json", "machine.json"], cwd=run_dir,
                          env={**ENV, "ALKPU_DPGEN_HOOK": "0"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "undefined key `uncertainty` is not allowed in strict mode" in proc.stderr
    assert not list(run_dir.glob("iter.*"))


# ------------------------------------------------------------------ the real `dpgen run`
def _run(command, root, env=None, timeout=900):
    proc = subprocess.run(command, cwd=root, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc


def _numbers_close(x: Path, y: Path) -> bool:
    """The calibration fit and the virial sigma it scales agree to rounding (about 1e-15
    relative: a least-squares fit's sums need not add up in the same order twice)."""
    import numpy as np

    def close(u, v):
        if isinstance(u, dict) and isinstance(v, dict):
            return u.keys() == v.keys() and all(close(u[k], v[k]) for k in u)
        if isinstance(u, list) and isinstance(v, list):
            return len(u) == len(v) and all(close(i, j) for i, j in zip(u, v))
        if isinstance(u, float) or isinstance(v, float):
            return bool(np.isclose(u, v, rtol=1e-9, atol=0))
        return u == v

    if x.suffix == ".json":
        return close(json.loads(x.read_text()), json.loads(y.read_text()))
    if x.suffix == ".npz":
        u, v = np.load(x, allow_pickle=True), np.load(y, allow_pickle=True)

        def same(a, b):
            if a.dtype.kind == "f":
                return a.shape == b.shape and np.allclose(a, b, rtol=1e-9, atol=0)
            if a.dtype == np.uint8 and not np.array_equal(a, b):  # JSON text (the result's meta)
                return close(json.loads(a.tobytes()), json.loads(b.tobytes()))
            return np.array_equal(a, b)

        return u.files == v.files and all(same(u[k], v[k]) for k in u.files)
    return False


def _compare_runs(a, b, rounding=False):
    from .test_alkpu_run import compare_run_dirs

    compare_run_dirs(a, b, skip=("train.log", "model_devi.log", "output", "checkpoint", "alkpu_timing.json"),
                     close=_numbers_close if rounding else None)


@pytest.mark.slow
def test_dpgen_run_with_the_key_is_alkpu_run(tmp_path):
    """One kpu iteration (and the next training) by `dpgen run` and by `alkpu run`, same seed."""
    common = {"seed": 1, "fp_task_max": 2}
    a = make_workdir(tmp_path / "dpgen", **common)
    b = make_workdir(tmp_path / "alkpu", **common)
    out = _run([DPGEN, "run", "param.json", "machine.json"], a).stdout
    assert "[alkpu] iter 000" in out  # ALKPU's progress lines: the switch took the run
    _run([ALKPU, "run", "param.json", "machine.json"], b)
    assert records(a)[-1] == (1, 2)
    it0 = a / "iter.000000" / "00.train"
    assert json.loads((it0 / "000" / "input.json").read_text())["optimizer"]["type"] == "RLEKF"
    assert (it0 / "kalman.000.npz").exists() and not (it0 / "001").exists()
    _compare_runs(a, b, rounding=True)  # models, Kalman states, model_devi.out, selection, labels: equal


@pytest.mark.slow
def test_committee_mode_is_dpgen_without_the_plugin(tmp_path):
    """`dpgen run` with "uncertainty": "committee" writes what DP-GEN alone writes (the plugin's entry
    points hidden from the dpgen process and its jobs), byte for byte."""
    common = {"numb_models": 2, "fp_task_max": 2}
    a = make_workdir(tmp_path / "with", uncertainty="committee", **common)  # check_interval 2 (ours)
    b = make_workdir(tmp_path / "without", uncertainty=None, check_interval=None, **common)
    launch = [sys.executable, str(TESTS / "dpgen_launch.py"), "--seed", "7"]
    _run([*launch, "run", "param.json", "machine.json"], a)
    without = {**ENV, "PYTHONPATH": str(TESTS / "without_plugin")}
    _run([*launch, "--check-interval", "2", "run", "param.json", "machine.json"], b, env=without)
    assert not (b / "alkpu-stages.jsonl").exists() and (a / "alkpu-stages.jsonl").exists()
    _compare_runs(a, b)
