"""KPU engine: exactness, outputs, determinism, chunking, ranking, bad input."""

import json
import os
import subprocess
import sys

import dpdata
import numpy as np
import pytest

from alkpu_plugin.kalman import kpu as kpu_math
from alkpu_plugin.model_devi import read_model_devi

from .conftest import QUIET_ENV, run_dp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(trained_model):
    from alkpu_plugin.kpu_engine import KPUEngine

    _, graph = trained_model
    return KPUEngine(graph, seed=7, rows_per_pass=40)


def alkpu(cwd, *args):
    return subprocess.run([sys.executable, "-m", "alkpu_plugin.cli", *args], cwd=cwd,
                          env={**os.environ, **QUIET_ENV}, capture_output=True, text=True, timeout=600)


def test_batched_kpu_equals_one_component_at_a_time(engine, cu_data):
    system = dpdata.System(str(cu_data / "valid"), fmt="deepmd/npy")
    idx, frames = engine._frames(system, [3])
    frame = frames[0]
    # the reference P: the state as saved, loaded afresh (the engine may factorise its copy)
    from alkpu_plugin.kalman import load_state

    ref, _ = load_state(engine.state_path)
    assert not any(ref.factored)
    rows = engine.jacobian.force_rows(frame)
    symm = kpu_math.component_kpu(ref, rows, rows_per_pass=40)  # symm on the unfactorised blocks
    engine.kf.factorize()
    assert all(engine.kf.factored)
    one = engine.frame_kpu(frame, 3)  # trmm on the Cholesky factors
    paper, comp, energy_kpu = one.force, one.components, one.energy
    # brute force: one backward pass and one dense quadratic form per component
    for c in [0, 1, 2, 17, 40, 95]:
        g = engine.jacobian.force_row_bruteforce(frame, c)
        brute = kpu_math.bruteforce_kpu(ref, g)
        assert comp[c] == pytest.approx(brute, rel=1e-6)
        assert symm[c] == pytest.approx(brute, rel=1e-6)
    atoms = kpu_math.paper_atoms(32, 7, 3)
    assert atoms.size == 16 and len(set(atoms)) == 16
    brute = np.mean([kpu_math.bruteforce_kpu(ref, engine.jacobian.force_row_bruteforce(frame, 3 * a + k))
                     for a in atoms for k in range(3)])
    assert paper == pytest.approx(brute, rel=1e-6)
    g_e = engine.jacobian.energy_row(frame)
    assert energy_kpu == pytest.approx(kpu_math.bruteforce_kpu(ref, g_e), rel=1e-6)
    assert np.all(comp > 0)


def _generic_rows(jacobian, frame, components=None):
    jacobian.use_structured = False
    try:
        return jacobian.force_rows(frame, components)
    finally:
        jacobian.use_structured = True


def _row_rel(a, b):
    return float(np.max(np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)))


def test_structured_rows_equal_generic_autodiff(engine, cu_data):
    # the se_e2_a structure (embedding [8, 16]: a doubling layer; fitting with idt)
    assert engine.jacobian.structured_reason is None
    system = dpdata.System(str(cu_data / "valid"), fmt="deepmd/npy")
    _, frames = engine._frames(system, [5])
    rows = engine.jacobian.force_rows(frames[0])
    assert engine.jacobian.structured_reason is None  # passed its self-check
    assert _row_rel(rows, _generic_rows(engine.jacobian, frames[0])) < 1e-10
    assert engine.compute(system, frames=[5]).meta["force_rows"] == "se_e2_a structure"
    # with energy=True, dE/dw comes first and the force rows are unchanged, on both paths
    g_e = engine.jacobian.energy_row(frames[0])
    both = engine.jacobian.force_rows(frames[0], energy=True)
    assert both.shape == (rows.shape[0] + 1, rows.shape[1])
    np.testing.assert_array_equal(both[0], g_e)
    np.testing.assert_array_equal(both[1:], rows)
    engine.jacobian.use_structured = False
    try:
        generic = engine.jacobian.force_rows(frames[0], np.arange(4), energy=True)
    finally:
        engine.jacobian.use_structured = True
    np.testing.assert_array_equal(generic[0], g_e)
    assert _row_rel(generic[1:], rows[:4]) < 1e-10


def test_structured_rows_in_a_cell_smaller_than_the_cutoff(engine):
    # 4-atom fcc cell (3.61 A) and rcut 4.5 A: atoms see their own periodic images
    from ase.build import bulk

    from alkpu_plugin.deepmd_tf.jacobian import Frame

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=4)
    frame = Frame(atoms.get_positions(), np.asarray(atoms.get_cell()), np.zeros(4, dtype=np.int32))
    rows = engine.jacobian.force_rows(frame)
    assert engine.jacobian.structured_reason is None
    generic = _generic_rows(engine.jacobian, frame)
    assert _row_rel(rows, generic) < 1e-10
    for c in (0, 7):
        brute = engine.jacobian.force_row_bruteforce(frame, c)
        assert float(np.abs(rows[c] - brute).max() / np.abs(brute).max()) < 1e-10


def test_structured_rows_fall_back_when_their_self_check_fails(trained_model, cu_data):
    from alkpu_plugin.deepmd_tf.frozen import find_kalman_state
    from alkpu_plugin.deepmd_tf.jacobian import Frame, ModelJacobian
    from alkpu_plugin.kalman import BlockLayout, read_meta

    _, graph = trained_model
    layout = BlockLayout.from_dict(read_meta(find_kalman_state(graph))["layout"])
    jac = ModelJacobian(graph, layout)
    assert jac.structured_reason is None
    with jac.graph.as_default():  # a structure that disagrees with the graph's forces
        jac._structure.forces = jac._structure.forces * 1.001
    system = dpdata.System(str(cu_data / "valid"), fmt="deepmd/npy")
    frame = Frame(system["coords"][0], system["cells"][0], np.zeros(32, dtype=np.int32))
    with pytest.warns(RuntimeWarning, match="differ from the frozen graph"):
        rows = jac.force_rows(frame, np.arange(6), energy=True)
    assert jac.structured_reason == "the se_e2_a structure's forces differ from the frozen graph's"
    assert jac.path.startswith("generic autodiff")
    np.testing.assert_array_equal(rows[0], jac.energy_row(frame))
    for c in (0, 5):
        np.testing.assert_allclose(rows[1 + c], jac.force_row_bruteforce(frame, c), rtol=1e-10, atol=1e-14)
    jac.close()


def test_models_the_structure_does_not_cover_use_generic_autodiff(trained_model):
    from deepmd.tf.env import tf

    from alkpu_plugin.deepmd_tf.frozen import _graph_def, find_kalman_state, frozen_weights
    from alkpu_plugin.deepmd_tf.rows import training_script
    from alkpu_plugin.deepmd_tf.rows.se_e2_a import unsupported_reason
    from alkpu_plugin.kalman import BlockLayout, read_meta

    _, graph = trained_model
    layout = BlockLayout.from_dict(read_meta(find_kalman_state(graph))["layout"])
    values = frozen_weights(graph, layout.names)
    graph_def = _graph_def(graph)
    assert unsupported_reason(graph_def, layout, values) is None
    script = training_script(graph_def)

    def with_script(change):
        edited = tf.GraphDef()
        edited.CopyFrom(graph_def)
        new = json.loads(json.dumps(script))
        change(new)
        for node in edited.node:
            if node.name == "train_attr/training_script":
                node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(json.dumps(new)))
        return edited

    two = with_script(lambda s: s["model"].update(type_map=["Cu", "Ag"]))
    assert "weights not named" in unsupported_reason(two, layout, values)  # no nets for the second type
    gelu = with_script(lambda s: s["model"]["fitting_net"].update(activation_function="gelu"))
    assert "tanh" in unsupported_reason(gelu, layout, values)
    assert "float64" in unsupported_reason(graph_def, layout, [v.astype(np.float32) for v in values])


def test_atom_order_does_not_matter(engine, cu_data):
    from alkpu_plugin.deepmd_tf.jacobian import Frame

    system = dpdata.System(str(cu_data / "valid"), fmt="deepmd/npy")
    _, frames = engine._frames(system, [0])
    f = frames[0]
    perm = np.random.default_rng(0).permutation(32)
    shuffled = Frame(f.coord[perm], f.box, f.atype[perm])
    rows = engine.jacobian.force_rows(f, np.array([0, 1, 2]))
    target = int(np.where(perm == 0)[0][0])
    rows_s = engine.jacobian.force_rows(shuffled, np.array([3 * target, 3 * target + 1, 3 * target + 2]))
    np.testing.assert_allclose(rows_s, rows, rtol=1e-10, atol=1e-12)


def test_cli_writes_model_devi_and_detail(trained_model, cu_data, tmp_path):
    root, graph = trained_model
    # a LAMMPS dump as DP-GEN writes them: one file per step in traj/
    traj = tmp_path / "traj"
    traj.mkdir()
    system = dpdata.System(str(cu_data / "valid"), fmt="deepmd/npy")
    for k in range(4):
        system[k].to("lammps/dump", str(traj / f"{k * 50}.lammpstrj"))
    proc = alkpu(tmp_path, "kpu", "-m", str(graph), "-s", "traj", "-o", "model_devi.out", "--detail", "kpu.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = read_model_devi(tmp_path / "model_devi.out")
    assert table.shape == (4, 7)
    np.testing.assert_array_equal(table[:, 0], [0, 50, 100, 150])
    assert np.all(table[:, 1] >= table[:, 3]) and np.all(table[:, 3] >= table[:, 2]) and np.all(table[:, 2] > 0)
    assert np.all(table[:, 4] >= table[:, 6]) and np.all(table[:, 6] >= table[:, 5]) and np.all(table[:, 5] > 0)
    header = (tmp_path / "model_devi.out").read_text().splitlines()[0].split()
    assert header == ["#", "step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f"]
    from alkpu_plugin.kpu_engine import KPUResult

    detail = KPUResult.load(tmp_path / "kpu.npz")
    assert detail.atom_kpu.shape == (4, 32)
    np.testing.assert_allclose(table[:, 4], np.sqrt(detail.atom_kpu).max(axis=1), rtol=1e-6)
    # virial columns: sqrt(kpu_ab) / N over the nine components (no calibration here)
    assert detail.virial_kpu.shape == (4, 9)
    np.testing.assert_allclose(table[:, 1], np.sqrt(detail.virial_kpu).max(axis=1) / 32, rtol=1e-6)
    np.testing.assert_allclose(table[:, 3], np.sqrt(detail.virial_kpu).mean(axis=1) / 32, rtol=1e-6)
    assert not detail.out_of_domain.any() and detail.domain == [""] * 4
    # the same frames through deepmd/npy give the same numbers (dump -> dpdata round trip)
    proc = alkpu(tmp_path, "kpu", "-m", str(graph), "-s", str(cu_data / "valid"), "-f", "deepmd/npy",
                 "--frames", "0:4", "-o", "", "--detail", "npy.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(KPUResult.load(tmp_path / "npy.npz").atom_kpu, detail.atom_kpu, rtol=1e-6)
    # two separate processes on halves of the trajectory, merged: the same file
    for name, frames in (("a.npz", "0:2"), ("b.npz", "2:4")):
        proc = alkpu(tmp_path, "kpu", "-m", str(graph), "-s", "traj", "--frames", frames, "-o", "", "--detail", name)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = alkpu(tmp_path, "kpu", "--merge", "b.npz", "a.npz", "-o", "merged.out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "merged.out").read_text() == (tmp_path / "model_devi.out").read_text()
    # existing outputs are not overwritten
    before = (tmp_path / "model_devi.out").read_bytes()
    proc = alkpu(tmp_path, "kpu", "-m", str(graph), "-s", "traj", "-o", "model_devi.out")
    assert proc.returncode != 0 and "already exist" in proc.stderr
    assert (tmp_path / "model_devi.out").read_bytes() == before


def test_deterministic_and_chunked_equals_single(engine, cu_data, tmp_path):
    from alkpu_plugin.kpu_engine import KPUEngine, KPUResult

    system = dpdata.System(str(cu_data / "valid"), fmt="deepmd/npy")
    whole = engine.compute(system)
    again = engine.compute(system)
    np.testing.assert_array_equal(whole.force_kpu, again.force_kpu)
    parts = [engine.compute(system, frames=range(a, b)) for a, b in [(0, 3), (3, 7), (7, 10)]]
    paths = [p.save(tmp_path / f"part{i}.npz") for i, p in enumerate(parts)]
    merged = KPUResult.concatenate([KPUResult.load(p) for p in reversed(paths)])
    for key in ("frames", "force_kpu", "energy_kpu", "atom_kpu"):
        np.testing.assert_allclose(getattr(merged, key), getattr(whole, key), rtol=1e-12)
    # another seed draws other atoms for the paper's value; per-atom values are unchanged
    other = KPUEngine(engine.model, seed=8).compute(system, frames=range(3))
    assert not np.allclose(other.force_kpu, whole.force_kpu[:3])
    np.testing.assert_allclose(other.atom_kpu, whole.atom_kpu[:3], rtol=1e-10)


def test_kpu_ranks_hot_frames_above_fresh_room_temperature_frames(engine, hot_and_cold):
    cold = engine.compute(dpdata.System(str(hot_and_cold / "300K"), fmt="deepmd/npy"))
    hot = engine.compute(dpdata.System(str(hot_and_cold / "1200K"), fmt="deepmd/npy"))
    assert hot.force_kpu.mean() > cold.force_kpu.mean()
    assert hot.atom_kpu.max(axis=1).mean() > cold.atom_kpu.max(axis=1).mean()


def test_calibration_gives_ev_per_angstrom(engine, trained_model, cu_data, hot_and_cold, tmp_path):
    from alkpu_plugin.calibration import calibrate, deciles, fit_forces, load_calibration, save_calibration

    train = dpdata.LabeledSystem(str(cu_data / "valid"), fmt="deepmd/npy")
    cal, kpu, sq = calibrate(engine, train, form="line")
    assert cal["a"] > 0 and cal["b"] >= 0 and cal["n_atoms"] == 320
    # the fit reproduces the mean squared error on its own data (least squares)
    assert np.mean(cal["a"] * kpu + cal["b"]) == pytest.approx(sq.mean(), rel=1e-6)
    # the default form, as `alkpu run` fits it: the power law on the same atoms with the line
    # beside it, or (this briefly trained model gives p = 0.4) the line, saying why
    power = fit_forces(kpu, sq)
    if "p" in power:
        assert 0.5 <= power["p"] <= 3.0 and (power["line"]["a"], power["line"]["b"]) == (cal["a"], cal["b"])
    else:
        assert "outside 0.5-3.0" in power["fallback"] and (power["a"], power["b"]) == (cal["a"], cal["b"])
    rows = deciles(kpu, sq, cal)
    assert len(rows) == 10 and all(r["observed_rms_error"] > 0 for r in rows)
    path = save_calibration(engine.state_path, cal)
    assert load_calibration(engine.state_path)["a"] == cal["a"]
    try:
        from alkpu_plugin.kpu_engine import KPUEngine

        calibrated = KPUEngine(engine.model)
        res = calibrated.compute(dpdata.System(str(hot_and_cold / "300K"), fmt="deepmd/npy"), frames=[0])
        np.testing.assert_allclose(res.atom_sigma, np.sqrt(cal["a"] * res.atom_kpu + cal["b"]))
        assert res.atom_sigma.max() < 1.0  # eV/A scale, not raw KPU
    finally:
        path.unlink()


def test_bad_inputs_fail_cleanly(trained_model, cu_data, tmp_path):
    root, graph = trained_model
    system_dir = cu_data / "valid"
    # NaN coordinates
    bad = dpdata.System(str(system_dir), fmt="deepmd/npy")
    bad.data["coords"][2, 5, 1] = np.nan
    bad.to("deepmd/npy", str(tmp_path / "nan"))
    proc = alkpu(tmp_path, "kpu", "-m", str(graph), "-s", "nan", "-f", "deepmd/npy", "-o", "out1")
    assert proc.returncode == 2 and "frame(s) [2] have NaN" in proc.stderr
    assert not (tmp_path / "out1").exists()
    # element missing from the model's type map
    alloy = dpdata.System(str(system_dir), fmt="deepmd/npy")
    alloy.data["atom_names"] = ["Cu", "Ag"]
    alloy.data["atom_numbs"] = [31, 1]
    alloy.data["atom_types"] = np.array([0] * 31 + [1])
    alloy.to("deepmd/npy", str(tmp_path / "alloy"))
    proc = alkpu(tmp_path, "kpu", "-m", str(graph), "-s", "alloy", "-f", "deepmd/npy", "-o", "out2")
    assert proc.returncode == 2 and "['Ag'] are not in the model's type map ['Cu']" in proc.stderr
    assert not (tmp_path / "out2").exists()
    # empty trajectory
    (tmp_path / "traj").mkdir()
    proc = alkpu(tmp_path, "kpu", "-m", str(graph), "-s", "traj", "-o", "out3")
    assert proc.returncode == 2 and "trajectory is empty" in proc.stderr
    assert not (tmp_path / "out3").exists()
    # a Kalman state of another model
    other = tmp_path / "other"
    cfg = json.loads((root / "input.json").read_text())
    cfg["model"]["fitting_net"]["neuron"] = [16, 16]
    cfg["training"]["numb_steps"] = 3
    run_dp(other, "train", "input.json", input_data=cfg)
    proc = alkpu(tmp_path, "kpu", "-m", str(graph), "-k", str(other / "model.ckpt.kalman.npz"),
                 "-s", str(system_dir), "-f", "deepmd/npy", "-o", "out4")
    assert proc.returncode == 2 and "does not belong to model" in proc.stderr
    assert not (tmp_path / "out4").exists()


def test_dpdata_driver_labels_and_exports_kpu(trained_model, cu_data, tmp_path, engine):
    root, graph = trained_model
    system = dpdata.System(str(cu_data / "valid"), fmt="deepmd/npy")[:3]
    labelled = system.predict(str(graph), driver="alkpu", seed=7)
    assert isinstance(labelled, dpdata.LabeledSystem)
    assert labelled["kpu_atom"].shape == (3, 32) and labelled["kpu_force"].shape == (3,)
    direct = engine.compute(system)
    np.testing.assert_allclose(labelled["kpu_atom"], direct.atom_kpu, rtol=1e-10)
    np.testing.assert_allclose(labelled["kpu_force"], direct.force_kpu, rtol=1e-10)
    # energies and forces are the model's (DeePMD-kit's own inference agrees)
    from deepmd.infer import DeepPot

    e, f, _ = DeepPot(str(graph)).eval(system["coords"], system["cells"], system["atom_types"])
    np.testing.assert_allclose(labelled["energies"], e.ravel(), rtol=1e-10)
    np.testing.assert_allclose(labelled["forces"], f.reshape(3, 32, 3), atol=1e-10)
    # exported to deepmd/npy with the KPU arrays, and read back
    labelled.to("deepmd/npy", str(tmp_path / "out"))
    assert (tmp_path / "out" / "set.000" / "kpu_atom.npy").is_file()
    back = dpdata.LabeledSystem(str(tmp_path / "out"), fmt="deepmd/npy")
    np.testing.assert_allclose(back["kpu_atom"], labelled["kpu_atom"])
    # slicing keeps the per-frame arrays aligned
    np.testing.assert_allclose(labelled[1]["kpu_atom"], labelled["kpu_atom"][1:2])


def test_kpu_commands_set_a_short_openblas_spin_before_numpy_loads():
    # OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when it is loaded (with numpy or scipy), so
    # the command must set it before anything imports numpy
    code = ("import sys, os; from alkpu_plugin import cli; assert 'numpy' not in sys.modules; "
            "cli._quiet_blas_threads(sys.argv[1:]); print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    for argv, expected in [(["kpu"], "4"), (["lmp-kpu"], "4"), (["calibrate"], "4"), (["run"], "None")]:
        proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [expected]
    # a value the user has set is kept
    proc = subprocess.run([sys.executable, "-c", code, "kpu"], env={**env, "OPENBLAS_THREAD_TIMEOUT": "20"},
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["20"]
