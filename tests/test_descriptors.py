"""Real DeePMD inputs: every se_e2_a option and the other TF descriptors, on two species.

For each model input: real `dp train` (RLEKF, a few steps) and `dp freeze`, then the
KPU engine's rows against the brute-force path (one backward pass per output):
force rows, the energy row and the nine virial rows, the KPU values against dense
quadratic forms, and the virial rows against finite differences of the model's
own virial.
"""

import copy

import dpdata
import numpy as np
import pytest

from alkpu_plugin.kalman import kpu as kpu_math
from alkpu_plugin.kalman import load_state

from .conftest import run_dp

pytestmark = pytest.mark.slow

SE_A = {"type": "se_e2_a", "sel": [24, 24], "rcut_smth": 3.0, "rcut": 4.0, "neuron": [4, 8],
        "axis_neuron": 4, "seed": 1}
BASE = {
    "model": {"type_map": ["Cu", "Ni"], "descriptor": SE_A, "fitting_net": {"neuron": [8, 8], "seed": 1}},
    "learning_rate": {"type": "exp", "start_lr": 0.001, "stop_lr": 3e-5, "decay_steps": 100},
    "optimizer": {"type": "RLEKF", "blocksize": 512},
    "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
    "training": {"training_data": {"systems": [], "batch_size": 1},
                 "numb_steps": 3, "disp_freq": 3, "save_freq": 3, "seed": 3},
}

# name: (descriptor changes, fitting changes, "model" changes)
CASES = {
    "se_e2_a": ({}, {}, {}),
    "resnet_dt": ({"resnet_dt": True}, {"resnet_dt": True}, {}),
    "type_one_side": ({"type_one_side": True}, {}, {}),
    "exclude_types": ({"exclude_types": [[0, 1]]}, {}, {}),
    "activation": ({"activation_function": "gelu"}, {"activation_function": "softplus"}, {}),
    "float32": ({"precision": "float32"}, {"precision": "float32"}, {}),
    "set_davg_zero": ({"set_davg_zero": True}, {}, {}),
    "partly_frozen": ({}, {"trainable": [True, False, True]}, {}),
    "one_side_excluded": ({"type_one_side": True, "exclude_types": [[0, 1]]}, {}, {}),
    "combined": ({"resnet_dt": True, "type_one_side": True, "exclude_types": [[1, 1]],
                  "set_davg_zero": True, "neuron": [4, 4, 8]},
                 {"resnet_dt": True, "trainable": [False, True, True]}, {}),
    "combined_gelu": ({"resnet_dt": True, "exclude_types": [[0, 1]], "activation_function": "gelu",
                       "neuron": [4, 8, 8]}, {"resnet_dt": True}, {}),
    "se_e2_r": ({"type": "se_e2_r", "axis_neuron": None}, {}, {}),
    "se_e3": ({"type": "se_e3", "sel": [12, 12], "axis_neuron": None}, {}, {}),
    "se_atten": ({"type": "se_atten", "sel": 48, "attn": 8, "attn_layer": 1, "attn_dotr": True,
                  "attn_mask": False}, {}, {}),
    "hybrid": ({"type": "hybrid", "list": [
        {"type": "se_e2_a", "sel": [24, 24], "rcut_smth": 3.0, "rcut": 4.0, "neuron": [4, 8],
         "axis_neuron": 4, "seed": 1},
        {"type": "se_e2_r", "sel": [12, 12], "rcut_smth": 2.0, "rcut": 3.0, "neuron": [4, 8], "seed": 1}]},
        {}, {}),
}


# the force rows' path: the se_e2_a structure serves tanh float64 se_e2_a models
GENERIC = {"activation", "float32", "combined_gelu", "se_e2_r", "se_e3", "se_atten", "hybrid"}


# the real `dp train` then `dp freeze`, in one process (one TensorFlow start-up)
TRAIN_AND_FREEZE = """
from deepmd.main import main
main(["train", "input.json"])
from deepmd.tf.env import tf
tf.reset_default_graph()
main(["freeze", "-o", "graph.pb"])
"""


@pytest.fixture(scope="module")
def cuni_data(tmp_path_factory):
    from alkpu_plugin.reference import md_frames

    root = tmp_path_factory.mktemp("cuni")
    md_frames(600, 6, substitute={"Ni": 0.5}, type_map=["Cu", "Ni"], seed=5).to("deepmd/npy", str(root / "train"))
    md_frames(600, 2, substitute={"Ni": 0.5}, type_map=["Cu", "Ni"], seed=6).to("deepmd/npy", str(root / "test"))
    return root


def model_input(name, data):
    desc_changes, fit_changes, model_changes = CASES[name]
    inp = copy.deepcopy(BASE)
    model = inp["model"]
    if desc_changes.get("type") == "hybrid":
        model["descriptor"] = copy.deepcopy(desc_changes)
    else:
        model["descriptor"].update(desc_changes)
    model["descriptor"] = {k: v for k, v in model["descriptor"].items() if v is not None}
    model["fitting_net"].update(fit_changes)
    model.update(model_changes)
    inp["training"]["training_data"]["systems"] = [str(data / "train")]
    return inp


@pytest.fixture(scope="module")
def models(cuni_data, tmp_path_factory):
    """Trained and frozen on first use, one directory per case."""
    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            run_dp(root, input_data=model_input(name, cuni_data), python_code=TRAIN_AND_FREEZE)
            made[name] = root / "graph.pb"
        return made[name]

    return get


def _rel(a, b):
    scale = max(float(np.abs(b).max()), 1e-300)
    return float(np.abs(a - b).max()) / scale


def _along(jac, frame, fetch, seed=1, eps=1e-5):
    """A random weight direction d and central differences of the graph's ``fetch``
    (a function of the fetched tensors' values) along it: what rows @ d should equal."""
    feed, order = jac._feed(frame)
    direction = np.random.default_rng(seed).normal(size=jac.layout.n)
    parts = jac.layout.unpack(direction)

    def at(step):
        shifted = dict(feed)
        for w, p in zip(jac._weights, parts):
            shifted[w] = jac._weight_feed[w] + step * p
        return fetch(jac, shifted, order)

    return direction, (at(eps) - at(-eps)) / (2 * eps)


def _virial(jac, feed, order):
    return jac.sess.run(jac._virial, feed_dict=feed)


@pytest.mark.parametrize("name", list(CASES))
def test_rows_and_kpu_equal_the_brute_force_path(name, models, cuni_data):
    from alkpu_plugin.kpu_engine import KPUEngine

    engine = KPUEngine(models(name), seed=2, rows_per_pass=24)
    expected = "generic autodiff" if name in GENERIC else "se_e2_a structure"
    assert engine.jacobian.path.startswith(expected), engine.jacobian.path
    ref, _ = load_state(engine.state_path)  # P as saved (the engine may factorise its copy)
    system = dpdata.System(str(cuni_data / "test"), fmt="deepmd/npy")
    _, frames = engine._frames(system, [1])
    frame = frames[0]
    comps = np.array([0, 5, 3 * 17 + 2, 3 * 31 + 1])
    assert set(frame.atype[comps // 3]) == {0, 1}  # atoms of both species
    rows = engine.jacobian.force_rows(frame, comps, energy=True, virial=True)
    assert rows.shape == (1 + 9 + comps.size, engine.kf.layout.n)
    assert engine.jacobian.path.startswith(expected), engine.jacobian.path  # passed its self-check
    # the brute-force path: one backward pass per output
    brute = np.array([engine.jacobian.force_row_bruteforce(frame, int(c)) for c in comps])
    assert _rel(rows[10:], brute) < 1e-6
    assert _rel(rows[0], engine.jacobian.energy_row(frame)) < 1e-6
    # KPU from the engine (all components, energy, virial) against dense quadratic forms
    one = engine.frame_kpu(frame, 1)
    for k, c in enumerate(comps):
        assert one.components[c] == pytest.approx(kpu_math.bruteforce_kpu(ref, brute[k]), rel=1e-6)
    assert one.energy == pytest.approx(kpu_math.bruteforce_kpu(ref, rows[0]), rel=1e-6)
    assert np.all(one.components > 0) and one.energy > 0
    # virial rows: finite differences of the model's own virial along a random weight direction
    virial_rows = rows[1:10]
    for ab in range(9):
        assert one.virial[ab] == pytest.approx(kpu_math.bruteforce_kpu(ref, virial_rows[ab]), rel=1e-6)
    W = engine.jacobian.predict_virial(frame).reshape(3, 3)
    assert np.abs(W - W.T).max() <= 1e-6 * np.abs(W).max()  # symmetric for these energies
    if "float32" not in name and CASES[name][0].get("precision") != "float32":
        direction, fd = _along(engine.jacobian, frame, _virial)
        assert _rel(virial_rows @ direction, fd) < 1e-6
    engine.jacobian.close()


def test_generic_rows_run_deepmd_kernels_one_at_a_time(models, cuni_data):
    """pfor's fallback loops (around DeePMD-kit's ProdForce/ProdVirial gradient kernels,
    which are not safe to call concurrently on one instance) run one iteration at a time,
    and the rows they give are those of one backward pass per output."""
    from alkpu_plugin.kpu_engine import KPUEngine

    engine = KPUEngine(models("se_e2_r"), seed=2, rows_per_pass=5)
    jac = engine.jacobian
    system = dpdata.System(str(cuni_data / "test"), fmt="deepmd/npy")
    _, frames = engine._frames(system, [0])
    comps = np.arange(12)
    rows = jac.force_rows(frames[0], comps, virial=True)
    loops = [op for op in jac.graph.get_operations() if op.type == "Enter"]
    assert loops and {op.get_attr("parallel_iterations") for op in loops} == {1}
    brute = np.array([jac.force_row_bruteforce(frames[0], int(c)) for c in comps])
    assert _rel(rows[9:], brute) < 1e-10
    jac.close()


def test_unused_variables_stay_out_of_the_kalman_layout(models):
    """resnet_dt creates an idt for the first embedding layer that DeePMD-kit never uses:
    it is not in the layout, so the frozen model and the state agree by construction."""
    from alkpu_plugin.deepmd_tf.frozen import _graph_def, find_kalman_state
    from alkpu_plugin.kalman import read_meta

    graph = models("resnet_dt")
    state = find_kalman_state(graph)  # accepted: same layout, same weights
    names = read_meta(state)["layout"]["names"]
    consts = {n.name for n in _graph_def(graph).node if n.op == "Const"}
    assert set(names) <= consts
    assert not any("idt_1_" in n for n in names)  # the unused first-layer idt
    assert any("idt_2_" in n for n in names)  # the used ones stay


# ------------------------------------------------------------------ chunks and large frames
def _alloy_frame(repeat, seed=0):
    """A displaced fcc Cu-Ni 50/50 cell of 4 * prod(repeat) atoms, as the engine's Frame."""
    from ase.build import bulk

    from alkpu_plugin.deepmd_tf.jacobian import Frame

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    types = np.zeros(len(atoms), np.int32)
    types[rng.permutation(len(atoms))[: len(atoms) // 2]] = 1
    return Frame(atoms.positions, np.array(atoms.cell), types)


@pytest.mark.parametrize("name", ["se_e2_a", "combined"])
def test_chunked_rows_and_a_tiny_memory_budget_give_the_same_numbers(name, models):
    """Rows streamed in chunks of any size, and the KPU under a memory limit that allows
    one component per graph evaluation and one row per quadratic form, equal the rows and
    KPU made in one piece (the combined case: type_one_side, exclude_types, resnet_dt)."""
    from alkpu_plugin.kpu_engine import KPUEngine

    frame = _alloy_frame((3, 3, 3))
    engine = KPUEngine(models(name), seed=2)
    jac = engine.jacobian
    jac.rows_per_pass = 3 * 108  # every component in one graph evaluation
    whole = jac.force_rows(frame, energy=True, virial=True)
    assert jac.path == "se_e2_a structure"
    reference = engine.frame_kpu(frame, 0)
    # both ways of making the embedding part through T: dT/dw per frame, or per pair
    for path in ("dense", "pair"):
        jac._structure.force_path = path
        for rows_per_pass in (1, 7, 50):
            jac.rows_per_pass = rows_per_pass
            assert _rel(jac.force_rows(frame, energy=True, virial=True), whole) <= 1e-12, (path, rows_per_pass)
    jac._structure.force_path = None
    jac.rows_per_pass = None
    tiny = KPUEngine(models(name), seed=2, memory_limit=1e-6)
    assert tiny.jacobian._structure.chunk_size(80, 150, tiny.jacobian.memory_limit * 1e9) == 1
    assert _rel(tiny.jacobian.force_rows(frame, energy=True, virial=True), whole) <= 1e-12
    one = tiny.frame_kpu(frame, 0)
    assert _rel(one.components, reference.components) <= 1e-12
    assert _rel(one.virial, reference.virial) <= 1e-12
    assert one.energy == pytest.approx(reference.energy, rel=1e-12)
    assert one.force == pytest.approx(reference.force, rel=1e-12)


@pytest.mark.parametrize("name", ["se_e2_a", "type_one_side"])
def test_a_frame_of_one_species_of_two(name, models):
    """Frames holding only one of the model's species (either): the structured force rows
    equal the brute-force path's on both ways of making them, with blocks of one atom for
    the frame's embedding, and the structure's virial rows central differences of the
    model's virial."""
    from alkpu_plugin.deepmd_tf.jacobian import Frame
    from alkpu_plugin.kpu_engine import KPUEngine

    mixed = _alloy_frame((2, 2, 2), seed=4)
    engine = KPUEngine(models(name), seed=2, memory_limit=1e-6)
    jac = engine.jacobian
    comps = np.array([0, 3 * 13 + 1, 3 * 31 + 2])
    for t in (0, 1):
        frame = Frame(mixed.coord, mixed.box, np.full(32, t, np.int32))
        brute = np.array([jac.force_row_bruteforce(frame, int(c)) for c in comps])
        # the virial rows along a random weight direction: central differences of the virial
        direction, fd = _along(jac, frame, _virial, seed=t)
        for path in ("dense", "pair"):
            jac._structure.force_path = path
            rows = jac.force_rows(frame, comps, virial=True)
            assert jac.path == "se_e2_a structure" and jac._structured_virial, (t, path)
            assert _rel(rows[9:], brute) <= 1e-10, (t, path)
            assert _rel(rows[:9] @ direction, fd) < 1e-6, (t, path)
    jac._structure.force_path = None
    engine.jacobian.close()


def test_a_frame_of_one_species_on_the_generic_path(models):
    """Generic rows of a frame without one of the model's species (its fitting net sees no
    atoms, where TensorFlow's vectorised loops fail): energy, virial and force rows equal
    central differences of the model's outputs along a random weight direction."""
    from alkpu_plugin.deepmd_tf.jacobian import Frame
    from alkpu_plugin.kpu_engine import KPUEngine

    mixed = _alloy_frame((2, 2, 2), seed=5)
    engine = KPUEngine(models("se_e2_r"), seed=2)
    jac = engine.jacobian
    comps = np.array([0, 3 * 13 + 1, 3 * 31 + 2])
    for t in (0, 1):
        frame = Frame(mixed.coord, mixed.box, np.full(32, t, np.int32))
        rows = jac.force_rows(frame, comps, energy=True, virial=True)
        assert jac.path.startswith("generic autodiff")
        def outputs(jac, feed, order):
            e, v, f = jac.sess.run([jac._energy, jac._virial, jac._force], feed_dict=feed)
            return np.concatenate([e, v, f[jac._sorted_components(order, comps)]])

        direction, fd = _along(jac, frame, outputs, seed=t)
        along = rows @ direction
        for part in (slice(0, 1), slice(1, 10), slice(10, None)):  # energy, virial, forces
            assert _rel(along[part], fd[part]) < 1e-6, (t, part)
        one = engine.frame_kpu(frame, 0)
        assert np.all(one.components > 0) and np.all(np.isfinite(one.virial)) and one.energy > 0
    engine.jacobian.close()


def test_a_500_atom_two_species_frame(models):
    """KPU of every component of a 500-atom Cu-Ni frame through the structured rows, whose
    force rows equal the brute-force path's and virial rows generic autodiff's."""
    from alkpu_plugin.kpu_engine import KPUEngine

    frame = _alloy_frame((5, 5, 5), seed=3)
    engine = KPUEngine(models("type_one_side"), seed=2)
    jac = engine.jacobian
    comps = np.array([0, 3 * 131 + 1, 3 * 250 + 2, 3 * 499])
    assert set(frame.atype[comps // 3]) == {0, 1}
    rows = jac.force_rows(frame, comps, virial=True)
    assert jac.path == "se_e2_a structure"
    brute = np.array([jac.force_row_bruteforce(frame, int(c)) for c in comps])
    assert _rel(rows[9:], brute) <= 1e-10
    feed, _ = jac._feed(frame)
    assert _rel(rows[:9], jac._run_virial_rows(feed)) <= 1e-10  # generic autodiff
    jac._structure.force_path = "dense"  # the other way of making the rows, at 500 atoms
    assert _rel(jac.force_rows(frame, comps, virial=True), rows) <= 1e-12
    jac._structure.force_path = None
    one = engine.frame_kpu(frame, 0)
    assert one.components.shape == (1500,) and np.all(one.components > 0)
    assert np.all(np.isfinite(one.virial)) and one.energy > 0
    engine.jacobian.close()


def test_a_perfect_crystal_first_does_not_switch_the_structure_off(models):
    """DP-GEN's first frame is often the perfect starting lattice, whose forces are round-off:
    the structure's self-check waits for a frame it can judge instead of failing on it."""
    from ase.build import bulk

    from alkpu_plugin.deepmd_tf.jacobian import Frame
    from alkpu_plugin.kpu_engine import KPUEngine

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    perfect = Frame(atoms.positions, np.array(atoms.cell), np.zeros(len(atoms), np.int32))
    engine = KPUEngine(models("se_e2_a"), seed=2)
    jac = engine.jacobian
    assert np.abs(jac.predict(perfect)[1]).max() < 1e-6
    engine.frame_kpu(perfect, 0)
    assert jac.path == "se_e2_a structure" and not jac._checked
    engine.frame_kpu(_alloy_frame((3, 3, 3)), 1)
    assert jac.path == "se_e2_a structure" and jac._checked and jac._virial_checked
