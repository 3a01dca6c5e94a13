"""`kpu/selection` in kpu mode: DP-GEN's make_fp labels the most uncertain candidates ("top"), the
greedy diverse batch ("diverse") or its own random draw ("random"), and its counts and files stay
its own.

Runs DP-GEN 0.14's real make_fp on a copy of the exploration of ``finished_run`` (a real kpu
iteration: RLEKF model, Kalman state, LAMMPS trajectories, model_devi.out and kpu.npz).
"""

import json
import shutil

import dpdata
import numpy as np
import pytest

from alkpu_plugin.kalman.diverse_batch import greedy_batch

pytestmark = pytest.mark.slow


def _make_fp(root, run, fp_task_max, selection, monkeypatch):
    from dpgen.generator.arginfo import run_jdata_arginfo
    from dpgen.generator.run import update_mass_map
    from dpgen.remote.decide_machine import convert_mdata
    from dpgen.util import load_file, normalize

    from alkpu_plugin.dpgen.driver import _run_step, kpu_jdata
    from alkpu_plugin.dpgen.params import split_param

    run.mkdir()
    for name in ("param.json", "machine.json"):
        shutil.copy(root / name, run / name)
    for step in ("00.train", "01.model_devi"):
        shutil.copytree(root / "iter.000000" / step, run / "iter.000000" / step, symlinks=True)
    monkeypatch.chdir(run)
    dp_jdata, settings = split_param(load_file("param.json"))
    dp_jdata["fp_task_max"] = fp_task_max
    kpu = dict(settings.kpu, selection=selection)
    jdata = normalize(run_jdata_arginfo(), kpu_jdata(dp_jdata, kpu))
    update_mass_map(jdata)
    _run_step(0, "make_fp", jdata, convert_mdata(load_file("machine.json")), kpu)
    return jdata, kpu


def _lines(path):
    return [ln.split() for ln in path.read_text().splitlines() if ln.strip()]


def test_make_fp_labels_the_diverse_batch_and_keeps_dpgens_counts(finished_run, tmp_path, monkeypatch):
    from alkpu_plugin.kpu_engine import KPUEngine, KPUResult

    root, _ = finished_run
    run = tmp_path / "run"
    jdata, kpu = _make_fp(root, run, 3, "diverse", monkeypatch)
    fp = run / "iter.000000" / "02.fp"
    record = json.loads((fp / "diverse_selection.000.json").read_text())

    # DP-GEN's own bookkeeping: every frame counted once, the candidates are those in the window
    lo, hi = jdata["model_devi_f_trust_lo"], jdata["model_devi_f_trust_hi"]
    tasks = sorted((run / "iter.000000" / "01.model_devi").glob("task.000.*"))
    table = {t.name: np.loadtxt(t / "model_devi.out", ndmin=2) for t in tasks}
    window = [(name, int(r[0])) for name, t in table.items() for r in t if lo <= r[4] < hi]
    assert len(window) > 3  # more candidates than fp_task_max: a real choice
    candidates = [(c[0].split("/")[-1], int(c[1])) for c in _lines(fp / "candidate.shuffled.000.out")]
    assert sorted(candidates) == sorted(window)
    rest = sum(len(_lines(fp / f)) for f in ("rest_accurate.shuffled.000.out", "rest_failed.shuffled.000.out"))
    assert rest + len(candidates) == sum(len(t) for t in table.values())
    assert record["candidates"] == len(window) and record["fp_task_max"] == 3

    # the labelled frames are the batch, which leads DP-GEN's candidate list
    chosen = [(c[0].split("/")[-1], int(c[1])) for c in record["chosen"]]
    assert len(chosen) == 3 and candidates[:3] == chosen
    fp_tasks = sorted(fp.glob("task.000.*"))
    assert len(fp_tasks) == 3
    labelled = [dpdata.System(str(t / "input"), fmt="deepmd/npy")["coords"][0] for t in fp_tasks]
    expected = [dpdata.System(str(run / "iter.000000" / "01.model_devi" / name / "traj" / f"{step}.lammpstrj"),
                              fmt="lammps/dump", type_map=jdata["type_map"])["coords"][0]
                for name, step in sorted(chosen)]
    for got, want in zip(labelled, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)

    # the same batch from an independent computation: one backward pass per force component of
    # each candidate's most uncertain atom, and the dense P
    engine = KPUEngine(run / "iter.000000" / "00.train" / "graph.000.pb",
                       run / "iter.000000" / "00.train" / "kalman.000.npz", virial=False)
    P = engine.kf.dense()
    rows, groups, order = [], [], []
    for name, t in table.items():
        result = KPUResult.load(run / "iter.000000" / "01.model_devi" / name / "kpu.npz")
        for step in [s for n, s in window if n == name]:
            frame_index = int(np.flatnonzero(result.steps == step)[0])
            atom = int(np.argmax(result.atom_kpu[frame_index]))
            conf = dpdata.System(str(run / "iter.000000" / "01.model_devi" / name / "traj" / f"{step}.lammpstrj"),
                                 fmt="lammps/dump", type_map=jdata["type_map"])
            _, frames = engine._frames(conf, [0])
            for c in range(3 * atom, 3 * atom + 3):
                rows.append(engine.jacobian.force_row_bruteforce(frames[0], c))
            groups.append(np.arange(len(rows) - 3, len(rows)))
            order.append((name, step))
    R = np.array(rows)
    batch = greedy_batch(R @ P @ R.T, groups, 3, record["noise"])
    assert [order[f] for f in batch.frames] == chosen
    np.testing.assert_allclose(batch.gains, record["gains"], rtol=1e-6)
    engine.jacobian.close()


def test_random_selection_is_dpgens(finished_run, tmp_path, monkeypatch):
    """With "random", make_fp is DP-GEN's: no record, fp_task_max frames labelled."""
    root, _ = finished_run
    _make_fp(root, tmp_path / "run", 3, "random", monkeypatch)
    fp = tmp_path / "run" / "iter.000000" / "02.fp"
    assert not list(fp.glob("diverse_selection.*")) and not list(fp.glob("top_selection.*"))
    assert len(list(fp.glob("task.000.*"))) == 3


def test_top_selection_labels_the_most_uncertain_candidates(finished_run, tmp_path, monkeypatch):
    from alkpu_plugin.dpgen.params import SELECTIONS

    assert SELECTIONS[0] == "top"  # the default
    root, _ = finished_run
    run = tmp_path / "run"
    jdata, _ = _make_fp(root, run, 3, "top", monkeypatch)
    fp = run / "iter.000000" / "02.fp"
    lo, hi = jdata["model_devi_f_trust_lo"], jdata["model_devi_f_trust_hi"]
    tasks = sorted((run / "iter.000000" / "01.model_devi").glob("task.000.*"))
    table = {t.name: np.loadtxt(t / "model_devi.out", ndmin=2) for t in tasks}
    window = {(name, int(r[0])): r[4] for name, t in table.items() for r in t if lo <= r[4] < hi}
    assert len(window) > 3

    # DP-GEN's counts and files: every frame once, the candidates those in the window
    candidates = [(c[0].split("/")[-1], int(c[1])) for c in _lines(fp / "candidate.shuffled.000.out")]
    assert sorted(candidates) == sorted(window)
    rest = sum(len(_lines(fp / f)) for f in ("rest_accurate.shuffled.000.out", "rest_failed.shuffled.000.out"))
    assert rest + len(candidates) == sum(len(t) for t in table.values())

    # the labelled frames are the three largest values of the window
    largest = sorted(window, key=lambda key: -window[key])[:3]
    assert sorted(candidates[:3]) == sorted(largest)
    record = json.loads((fp / "top_selection.000.json").read_text())
    assert [(c[0].split("/")[-1], c[1]) for c in record["chosen"]] == candidates[:3]
    np.testing.assert_allclose(record["values"], [window[c] for c in candidates[:3]])
    assert min(record["values"]) >= max(v for key, v in window.items() if key not in largest)
    fp_tasks = sorted(fp.glob("task.000.*"))
    labelled = [dpdata.System(str(t / "input"), fmt="deepmd/npy")["coords"][0] for t in fp_tasks]
    expected = [dpdata.System(str(run / "iter.000000" / "01.model_devi" / name / "traj" / f"{step}.lammpstrj"),
                              fmt="lammps/dump", type_map=jdata["type_map"])["coords"][0]
                for name, step in sorted(largest)]
    assert len(labelled) == 3
    for got, want in zip(labelled, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
