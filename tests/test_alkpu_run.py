"""`alkpu run` in kpu mode: a real tiny iteration through dpdispatcher's Shell machine.

Real parts: DP-GEN 0.14's step functions, `dp train` (RLEKF), `dp freeze`, LAMMPS with the DeePMD
pair style, the KPU engine, DP-GEN's selection, EMT labelling through the custom fp style, post_fp.
"""

import glob
import json
import os
import sys
from pathlib import Path

import dpdata
import numpy as np
import pytest

from .conftest import KILL_SEED, QUIET_ENV
from .dpgen_run import alkpu_run, make_workdir, records
from .test_dpgen_params import PARAM

pytestmark = pytest.mark.slow


def test_one_kpu_iteration_killed_and_resumed(finished_run):
    root, stamp = finished_run
    trained = root / "iter.000000" / "00.train" / "000" / "frozen_model.pb"
    done = records(root)
    assert done[-1] == (1, 2)  # one exploration job: iteration 1 stops after training
    assert len(done) == len(set(done)) and done == sorted(done)
    assert trained.stat().st_mtime_ns == stamp

    it0 = root / "iter.000000"
    # one RLEKF model; the Kalman state beside it, never taken for a model
    assert sorted(p.name for p in (it0 / "00.train").glob("0*")) == ["000"]
    assert json.loads((it0 / "00.train" / "000" / "input.json").read_text())["optimizer"]["type"] == "RLEKF"
    assert sorted(os.path.basename(p) for p in glob.glob(str(it0 / "00.train" / "graph*pb"))) == ["graph.000.pb"]
    state = it0 / "00.train" / "kalman.000.npz"
    from alkpu_plugin.deepmd_tf.frozen import find_kalman_state

    assert find_kalman_state(it0 / "00.train" / "graph.000.pb", state)  # digest matches the model
    # the calibration: a power law fitted on training frames, its line beside it (or the line alone
    # when the exponent is out of range), and the per-atom sigma of the exploration made from it
    cal = json.loads((it0 / "00.train" / "kalman.000.calibration.json").read_text())
    if "p" in cal:
        assert 0.5 <= cal["p"] <= 3.0 and cal["line"]["a"] > 0 and cal["n_atoms"] == cal["line"]["n_atoms"]
    else:
        assert cal["model"] == "|dF_i|^2 = a * KPU_i + b"
    # exploration: LAMMPS with one model, model_devi.out written from KPU
    task = it0 / "01.model_devi" / "task.000.000000"
    table = np.loadtxt(task / "model_devi.out", ndmin=2)
    np.testing.assert_array_equal(table[:, 0], np.arange(0, 51, 10))
    assert np.all(table[:, 4] > 0) and np.all(table[:, 1:4] > 0)
    from alkpu_plugin.kpu_engine import KPUResult

    detail = KPUResult.load(task / "kpu.npz")
    # the largest sigma; a frame beyond twice the calibration's largest KPU at least at trust_lo (0.02)
    from alkpu_plugin.calibration import beyond_calibration

    assert cal["kpu_max"] > 0
    beyond = beyond_calibration(cal, detail.atom_kpu, 2.0) & ~detail.out_of_domain
    expected = detail.atom_sigma.max(axis=1)
    np.testing.assert_allclose(table[:, 4], np.where(beyond, np.maximum(expected, 0.02), expected), rtol=1e-6)
    sigma = np.sqrt(cal["a"] * detail.atom_kpu ** cal.get("p", 1.0) + cal["b"])
    np.testing.assert_allclose(detail.atom_sigma, sigma, rtol=1e-9)
    # virial columns: the calibrated virial uncertainty per atom (EMT labels carry virials)
    assert "virial" in detail.calibration
    np.testing.assert_allclose(table[:, 1], detail.virial_sigma.max(axis=1), rtol=1e-6)
    # DP-GEN's own selection on those columns, then EMT labels collected by post_fp
    candidates = (it0 / "02.fp" / "candidate.shuffled.000.out").read_text().split("\n")
    selected = int(((table[:, 4] >= 0.02) & (table[:, 4] < 50.0)).sum())
    assert len([c for c in candidates if c.strip()]) == selected
    fp_tasks = sorted((it0 / "02.fp").glob("task.*"))
    assert len(fp_tasks) == min(selected, PARAM["fp_task_max"]) > 0
    (sysdir,) = {p.parent for p in (it0 / "02.fp" / "data.000").rglob("type.raw")}
    labelled = dpdata.LabeledSystem(str(sysdir), fmt="deepmd/npy")
    assert labelled.get_nframes() == len(fp_tasks)
    from ase.calculators.emt import EMT

    atoms = labelled.to("ase/structure")[0]
    atoms.calc = EMT()
    np.testing.assert_allclose(labelled["forces"][0], atoms.get_forces(), atol=1e-6)
    # iteration 1 continued the model and its Kalman state (DP-GEN's training_reuse_iter)
    from alkpu_plugin.kalman import read_meta

    it1 = root / "iter.000001" / "00.train"
    assert json.loads((it1 / "000" / "input.json").read_text())["optimizer"]["init_state"] == "kalman.000.npz"
    assert read_meta(it1 / "kalman.000.npz")["nupdates"] == read_meta(state)["nupdates"] + 40 * 5


def test_killed_ten_times_ends_as_the_uninterrupted_run(killed_run):
    """SIGKILL at 10 seeded moments, the same command again each time: the same training data,
    model_devi.out files, Kalman states and record.dpgen as the run never interrupted, bit for bit
    (measured: two uninterrupted runs of one seeded param.json are bit-identical here, so nothing
    needs a tolerance), and no job ever ran twice at once in one directory."""
    from .dpgen_run import outcome_differences, run_outcome

    kills = killed_run["kills"]
    print(f"kill schedule (seed {KILL_SEED}), {killed_run['seconds']:.0f} s for both runs:")
    for k in kills:
        print(f"  {k['moment']:<24} at record {k['record']} +{k['delay_s']} s"
              f"{' (driver alone)' if k['driver_only'] else ''}")
    assert len(kills) == 10
    # the schedule reached every phase: training, KPU, exploration or labelling jobs, between steps
    assert {"training", "kpu", "between"} <= {k["kind"] for k in kills}
    assert {"exploration", "labelling"} & {k["kind"] for k in kills}
    assert any(k["driver_only"] for k in kills) and not all(k["driver_only"] for k in kills)
    ours, theirs = run_outcome(killed_run["root"]), run_outcome(killed_run["reference"])
    assert len(ours) >= 10 and any("kalman" in k for k in ours) and any("02.fp/data" in k for k in ours)
    assert any(k.endswith("model_devi.out") for k in ours)
    assert outcome_differences(ours, theirs) == []
    assert not killed_run["duplicates"].exists(), killed_run["duplicates"].read_text()
    # the training killed after its checkpoint was continued from it (DP-GEN's `dp train --restart`)
    log = (killed_run["root"] / "iter.000000" / "00.train" / "000" / "train.log").read_text()
    assert "start RLEKF training at step 0:" in log and "start RLEKF training at step 25:" in log
    from alkpu_plugin.kalman import read_meta

    assert read_meta(killed_run["root"] / "iter.000000" / "00.train" / "kalman.000.npz")["extra"]["step"] == 50


def test_bad_kpu_param_fails_before_any_work(tmp_path):
    root = make_workdir(tmp_path / "bad", train_backend="pytorch")
    proc = alkpu_run(root)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert '"train_backend": "pytorch"' in out
    assert not list(root.glob("iter.*")) and not (root / "record.dpgen").exists()


def test_paper_relative_trust_rule(tmp_path):
    """The paper's rule; and a labeller that gives no labels in some tasks: DP-GEN's post_fp counts
    them as failed and goes on below ratio_failed, stops above it."""
    from .dpgen_run import LABEL_SOME, wrap_command

    # eps_lo 0.4: the explored frames' force KPU is 0.6-1.3 x KPU_train after 30 steps, so that
    # several are labelled (two tasks at least, for the failed-label check); step 0, the ideal
    # lattice, has zero force KPU and is accurate
    root = make_workdir(tmp_path / "rel", kpu={"trust": "relative", "eps_lo": 0.4, "eps_hi": 50.0,
                                               "kpu_train_frames": 5, "numb_steps": 30}, ratio_failed=0.5)
    wrap_command(root, "fp", LABEL_SOME)
    proc = alkpu_run(root)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    check_failed_labels(root)
    it0 = root / "iter.000000"
    kpu_train = json.loads((it0 / "00.train" / "kalman.000.kpu_train.json").read_text())
    assert kpu_train["frames"] == 5 and kpu_train["kpu_train"] > 0
    assert json.loads((it0 / "00.train" / "000" / "input.json").read_text())["training"]["numb_steps"] == 30
    task = it0 / "01.model_devi" / "task.000.000000"
    table = np.loadtxt(task / "model_devi.out", ndmin=2)
    from alkpu_plugin.kpu_engine import KPUResult

    detail = KPUResult.load(task / "kpu.npz")
    np.testing.assert_allclose(table[:, 4], detail.force_kpu / kpu_train["kpu_train"], rtol=1e-6)
    # DP-GEN selected with eps_lo / eps_hi in place of its trust levels
    selected = int(((table[:, 4] >= 0.4) & (table[:, 4] < 50.0)).sum())
    candidates = [c for c in (it0 / "02.fp" / "candidate.shuffled.000.out").read_text().split("\n") if c.strip()]
    accurate = [c for c in (it0 / "02.fp" / "rest_accurate.shuffled.000.out").read_text().split("\n") if c.strip()]
    assert len(candidates) == selected
    assert len(accurate) == int((table[:, 4] < 0.4).sum()) >= 1


def check_failed_labels(root):
    """Tasks task.*1 gave no labels: below ratio_failed the run went on without them; above it
    post_fp stops, as DP-GEN's post_fp does, with one message that names the tasks."""
    from dpgen.generator.arginfo import run_jdata_arginfo
    from dpgen.util import normalize

    from alkpu_plugin.dpgen import driver
    from alkpu_plugin.dpgen.jobs import FailedLabelsError
    from alkpu_plugin.dpgen.params import split_param
    from alkpu_plugin.dpgen.stages import StageLog

    fp = root / "iter.000000" / "02.fp"
    tasks = sorted(p.name for p in fp.glob("task.*"))
    failed = [name for name in tasks if name.endswith("1")]
    assert failed and len(failed) / len(tasks) <= 0.5, tasks
    assert all((fp / name / "labelled").is_dir() != (name in failed) for name in tasks)
    (sysdir,) = {p.parent for p in (fp / "data.000").rglob("type.raw")}
    assert dpdata.LabeledSystem(str(sysdir), fmt="deepmd/npy").get_nframes() == len(tasks) - len(failed)
    # the same labels with a lower ratio_failed: post_fp stops
    jdata, settings = split_param(json.loads((root / "param.json").read_text()))
    jdata["ratio_failed"] = 0.5 * len(failed) / len(tasks)
    jdata = normalize(run_jdata_arginfo(), driver.kpu_jdata(jdata, settings.kpu))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(FailedLabelsError) as info:
            driver.run_stage(0, "post_fp", jdata, {}, settings.kpu, StageLog(root, stream=open(os.devnull, "w")))
    finally:
        os.chdir(cwd)
    text = str(info.value)
    assert text.startswith(f"post_fp of iteration 0: {len(failed)} of {len(tasks)} labelling tasks in "
                           "iter.000000/02.fp gave no labels")
    assert f"more than ratio_failed {jdata['ratio_failed']:g} allows (DP-GEN's check)" in text
    assert f"Without `labelled`: {failed[0]}" in text and "delete the lines after `0 6` in record.dpgen" in text


def test_slurm_job_scripts_carry_the_kalman_state(finished_run, monkeypatch):
    """Generate (do not run) the Slurm jobs of the kpu steps; only the submission is intercepted."""
    import dpgen.generator.run as dprun
    from dpgen.remote.decide_machine import convert_mdata

    from alkpu_plugin.dpgen import driver
    from alkpu_plugin.dpgen.params import split_param

    root, _ = finished_run
    monkeypatch.chdir(root)
    slurm = {"batch_type": "Slurm", "context_type": "LazyLocalContext", "local_root": "./"}
    resources = {"number_node": 1, "cpu_per_node": 4, "gpu_per_node": 0, "queue_name": "cpu",
                 "group_size": 1}
    mdata = convert_mdata({"api_version": "1.0",
                           "train": {"command": "dp", "machine": slurm, "resources": resources},
                           "model_devi": {"command": "lmp", "machine": slurm, "resources": resources},
                           "fp": {"command": "alkpu label -i input -o labelled", "machine": slurm,
                                  "resources": resources}})
    captured = []
    real = dprun.make_submission

    def capture(*args, **kwargs):
        submission = real(*args, **kwargs)
        submission.run_submission = lambda *a, **k: captured.append(submission)
        return submission

    monkeypatch.setattr(dprun, "make_submission", capture)
    jdata, settings = split_param(json.loads(Path("param.json").read_text()))
    from dpgen.generator.arginfo import run_jdata_arginfo
    from dpgen.util import normalize

    jdata = normalize(run_jdata_arginfo(), driver.kpu_jdata(jdata, settings.kpu))
    dprun.run_train(1, jdata, driver.kpu_mdata(1, jdata, mdata, settings.kpu))
    dprun.run_model_devi(0, jdata, driver.kpu_mdata(0, jdata, mdata, settings.kpu))
    train, explore = captured
    (train_task,) = train.belonging_tasks
    assert "kalman.000.npz" in train_task.forward_files  # the previous state goes up
    assert "model.ckpt.kalman.npz" in train_task.backward_files  # the new one comes back
    assert "--init-model old/model.ckpt" in train_task.command
    (md_task,) = explore.belonging_tasks
    assert {"kalman.000.npz", "kalman.000.calibration.json"} <= set(md_task.forward_files)
    assert "kpu.npz" in md_task.backward_files and "model_devi.out" in md_task.backward_files
    assert "alkpu lmp-kpu --lmp lmp --model ../graph.000.pb --kalman-state kalman.000.npz" in md_task.command
    assert [f for f in explore.forward_common_files if "graph" in f] == ["graph.000.pb"]
    for submission in (train, explore):
        submission.generate_jobs()
        script = submission.machine.gen_script(submission.belonging_jobs[0])
        assert "#SBATCH" in script and "--partition cpu" in script
    # the tasks' commands go to the job's .run file, which the Slurm script sources
    assert "alkpu lmp-kpu" in explore.machine.gen_script_command(explore.belonging_jobs[0])
    assert "dp train input.json" in train.machine.gen_script_command(train.belonging_jobs[0])


def test_committee_mode_writes_what_dpgen_run_writes(tmp_path, monkeypatch):
    """Same input, `dpgen run` and `alkpu run` with "uncertainty": "committee": the same files."""
    import random

    from dpgen.generator.run import run_iter

    from alkpu_plugin.dpgen.driver import run

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    for key, value in {**QUIET_ENV, "TF_CPP_MIN_LOG_LEVEL": "3"}.items():
        monkeypatch.setenv(key, value)
    from alkpu_plugin.dpgen.stages import check_interval

    common = {"numb_models": 2, "fp_task_max": 2}
    # DP-GEN's own run knows no check_interval key: the same 2 s polling is set around it
    a = make_workdir(tmp_path / "dpgen", uncertainty=None, check_interval=None, **common)
    b = make_workdir(tmp_path / "alkpu", uncertainty="committee", **common)
    for root, go in ((a, run_iter), (b, run)):
        monkeypatch.chdir(root)
        random.seed(7)  # DP-GEN draws training seeds and shuffles candidates with these
        np.random.seed(7)
        with check_interval(2):
            go("param.json", "machine.json")
    compare_run_dirs(a, b, skip=("train.log", "model_devi.log", "output", "checkpoint"))


def compare_run_dirs(a, b, skip, close=None):
    """Two DP-GEN run directories hold the same iteration files, record.dpgen and contents
    (logs and the names in ``skip`` apart; ``close(x, y)`` may accept files that differ)."""
    files_a = sorted(p.relative_to(a) for p in a.glob("iter.*/**/*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.glob("iter.*/**/*") if p.is_file())
    assert files_a == files_b and len(files_a) > 30
    assert (a / "record.dpgen").read_text() == (b / "record.dpgen").read_text()
    differ = [str(f) for f in files_a
              if f.name not in skip and not f.name.endswith(("_last_err_file", "err", "log"))
              and not same_content(a / f, b / f)
              and not (close is not None and close(a / f, b / f))]
    assert differ == []


def same_content(x: Path, y: Path) -> bool:
    """Equal bytes; for TensorFlow protobufs equal graphs (protobuf map order is not stable, also
    inside the checkpoint meta's serialised cond contexts, so for .meta the graph is compared);
    for model_devi.out equal numbers to 1e-12 (LAMMPS's ~0 virial deviations vary at 1e-17)."""
    if x.read_bytes() == y.read_bytes():
        return True
    if x.suffix in (".pb", ".meta"):
        from deepmd.tf.env import tf

        kind = tf.GraphDef if x.suffix == ".pb" else tf.compat.v1.MetaGraphDef
        gx, gy = kind(), kind()
        gx.ParseFromString(x.read_bytes())
        gy.ParseFromString(y.read_bytes())
        if x.suffix == ".meta":
            gx, gy = gx.graph_def, gy.graph_def
        return gx.SerializeToString(deterministic=True) == gy.SerializeToString(deterministic=True)
    if x.name == "model_devi.out":
        return np.allclose(np.loadtxt(x), np.loadtxt(y), rtol=0, atol=1e-12)
    return False
