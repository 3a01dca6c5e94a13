"""`alkpu run` through a real Slurm on this host: machine.json with "batch_type": "Slurm".

The cluster (munged, slurmctld, slurmd; tests/slurm_cluster.py) is started once for this module
and stopped after it. Where it cannot run (not root, Slurm or munge not installed, a daemon that
does not start) every test here skips with the reason; `make slurm` installs the packages as root.

Real parts: Slurm's sbatch/squeue through dpdispatcher's Slurm machine and LocalContext, DP-GEN
0.14's step functions, `dp train` (RLEKF and Adam), LAMMPS, the KPU engine, EMT labels.
Slurm's side of each job is read from its job-completion log and from an epilog that lists
(and hashes) the job's working directory before the job ends: dpdispatcher removes its remote
directory once a submission is done.
"""

import json
import sys
from pathlib import Path

import dpdata
import numpy as np
import pytest

from .dpgen_run import alkpu_run, make_workdir, records
from .slurm_cluster import SlurmCluster, SlurmUnavailable

BIN = Path(sys.executable).parent
ALL_STEPS = [(ii, jj) for ii in (0,) for jj in range(9)] + [(1, 0), (1, 1), (1, 2)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as exc:
        pytest.skip(f"no Slurm cluster on this host: {exc}")
    yield cluster
    cluster.stop()


def slurm_machine(root, command, *, group_size=1, symlink=True):
    """One machine.json section: Slurm through LocalContext, the job's shell set up by source_list."""
    activate = BIN / "activate"
    resources = {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "queue_name": SlurmCluster.partition,
                 "group_size": group_size, "custom_flags": ["#SBATCH --time=00:20:00"]}
    # `#!/bin/bash -l` reads /etc/profile, which resets root's PATH: the job puts this environment back
    if activate.exists():
        resources["source_list"] = [str(activate)]
    else:
        resources["prepend_script"] = [f"export PATH={BIN}:$PATH"]
    return {"command": command,
            "machine": {"batch_type": "Slurm", "context_type": "LocalContext", "local_root": "./",
                        "remote_root": str(root / "remote"), "remote_profile": {"symlink": symlink}},
            "resources": resources}


def run_on_slurm(root, slurm, monkeypatch, *, fp_group_size, symlink):
    machine = {"api_version": "1.0",
               "train": slurm_machine(root, "dp", symlink=symlink),
               "model_devi": slurm_machine(root, "lmp", symlink=symlink),
               "fp": slurm_machine(root, "alkpu label -i input -o labelled", group_size=fp_group_size,
                                   symlink=symlink)}
    (root / "machine.json").write_text(json.dumps(machine, indent=1))
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    before = {r["JobId"] for r in slurm.job_records()}
    proc = alkpu_run(root)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    assert records(root) == ALL_STEPS
    jobs = sorted((r for r in slurm.job_records() if r["JobId"] not in before), key=lambda r: int(r["JobId"]))
    # every job of the run went through Slurm, ran in the run's remote directory, and succeeded
    assert jobs and all(r["JobState"] == "COMPLETED" and r["ExitCode"].strip() == "0:0" for r in jobs), jobs
    assert all(Path(r["WorkDir"]).parent == root / "remote" for r in jobs)
    # the queue and the custom flag (a 20-minute limit) reached Slurm
    assert all(r["Partition"] == SlurmCluster.partition and r["TimeLimit"] == "20" for r in jobs)
    # one dpdispatcher submission (one remote directory) per DP-GEN step, in the order submitted;
    # for each job what Slurm's epilog saw in its working directory
    seen, workdir = [], None
    for r in jobs:
        if r["WorkDir"] != workdir:
            seen.append([])
            workdir = r["WorkDir"]
        seen[-1].append(slurm.epilog(r["JobId"]))
    # Slurm's own output file of every job was there
    assert all(any(f.startswith("slurm-") and f.endswith(".out") for f in job["files"])
               for step in seen for job in step)
    assert not any((root / "remote").iterdir())  # removed by dpdispatcher once each step was done
    return seen


def _sha(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_kpu_iteration_through_slurm(slurm, tmp_path, monkeypatch):
    """One kpu iteration (and the next training, continuing the Kalman state) as Slurm jobs; files
    copied to the remote side (no links), as on a cluster with its own file system."""
    root = make_workdir(tmp_path / "run", training_reuse_iter=1, training_reuse_numb_steps=20, fp_task_max=4,
                        kpu={"numb_steps": 40, "calibration_atoms": 192})
    steps = run_on_slurm(root, slurm, monkeypatch, fp_group_size=2, symlink=False)
    it0, it1 = root / "iter.000000", root / "iter.000001"
    fp_tasks = sorted((it0 / "02.fp").glob("task.*"))
    # training, exploration, labelling (two tasks a job), then the next training
    assert [len(jobs) for jobs in steps] == [1, 1, (len(fp_tasks) + 1) // 2, 1]
    ((train0,), (md,), fp, (train1,)) = steps

    # training of iteration 0: the Kalman state was made in the job and came back with the model
    local_state = it0 / "00.train" / "000" / "model.ckpt.kalman.npz"
    assert train0["sha256"]["000/model.ckpt.kalman.npz"] == _sha(local_state)
    assert "000/frozen_model.pb" in train0["files"]
    state = it0 / "00.train" / "kalman.000.npz"
    calibration = it0 / "00.train" / "kalman.000.calibration.json"
    assert _sha(state) == _sha(local_state) and calibration.is_file()

    # exploration: state and calibration went up with the task as files, KPU came back
    for name, local in (("kalman.000.npz", state), ("kalman.000.calibration.json", calibration)):
        kind, _ = md["files"][f"task.000.000000/{name}"]
        assert kind == "f"  # a copy on the remote side, not a link to the local file
        assert md["sha256"][f"task.000.000000/{name}"] == _sha(local)
    task = it0 / "01.model_devi" / "task.000.000000"
    for name in ("model_devi.out", "kpu.npz"):
        assert md["sha256"][f"task.000.000000/{name}"] == _sha(task / name)  # what the job wrote
    # model_devi.out written from KPU, as DP-GEN reads it
    from alkpu_plugin.kpu_engine import KPUResult

    table = np.loadtxt(task / "model_devi.out", ndmin=2)
    np.testing.assert_array_equal(table[:, 0], np.arange(0, 51, 10))
    detail = KPUResult.load(task / "kpu.npz")
    np.testing.assert_allclose(table[:, 4], detail.atom_sigma.max(axis=1), rtol=1e-6)
    # DP-GEN's selection, then EMT labels from the labelling jobs
    candidates = [c for c in (it0 / "02.fp" / "candidate.shuffled.000.out").read_text().split("\n") if c.strip()]
    selected = int(((table[:, 4] >= 0.02) & (table[:, 4] < 50.0)).sum())
    assert len(candidates) == selected
    assert len(fp_tasks) == min(selected, 4) > 0
    # (the labelling jobs share one remote directory: each epilog sees the tasks done so far)
    assert {f.split("/")[0] for job in fp for f in job["files"] if f.endswith("/labelled/type.raw")} \
        == {t.name for t in fp_tasks}
    (sysdir,) = {p.parent for p in (it0 / "02.fp" / "data.000").rglob("type.raw")}
    labelled = dpdata.LabeledSystem(str(sysdir), fmt="deepmd/npy")
    assert labelled.get_nframes() == len(fp_tasks)
    from ase.calculators.emt import EMT

    atoms = labelled.to("ase/structure")[-1]
    atoms.calc = EMT()
    np.testing.assert_allclose(labelled["forces"][-1], atoms.get_forces(), atol=1e-6)

    # training of iteration 1 continued the state, which went up with the job
    assert train1["files"]["000/kalman.000.npz"][0] == "f"
    assert train1["sha256"]["000/kalman.000.npz"] == _sha(state)
    assert train1["sha256"]["000/model.ckpt.kalman.npz"] == _sha(it1 / "00.train" / "000" / "model.ckpt.kalman.npz")
    from alkpu_plugin.kalman import read_meta

    assert json.loads((it1 / "00.train" / "000" / "input.json").read_text())["optimizer"]["init_state"] \
        == "kalman.000.npz"
    assert read_meta(it1 / "00.train" / "kalman.000.npz")["nupdates"] == read_meta(state)["nupdates"] + 20 * 5


@pytest.mark.slow
def test_committee_iteration_through_slurm(slurm, tmp_path, monkeypatch):
    """DP-GEN's own committee loop (two Adam models) through the same Slurm, files linked."""
    # a lower trust level than the kpu run's: two 50-step Adam models can agree within 0.02 eV/A on
    # every frame, and this test needs candidates for its labelling job
    root = make_workdir(tmp_path / "run", uncertainty="committee", numb_models=2, fp_task_max=2,
                        model_devi_f_trust_lo=1e-6)
    steps = run_on_slurm(root, slurm, monkeypatch, fp_group_size=2, symlink=True)
    it0 = root / "iter.000000"
    # two trainings, one exploration, one labelling job (two tasks), two trainings of iteration 1
    assert [len(jobs) for jobs in steps] == [2, 1, 1, 2]
    assert len(list((it0 / "02.fp").glob("task.*"))) == 2
    assert not list(root.rglob("kalman*"))  # nothing of kpu mode
    (md,) = steps[1]
    task = it0 / "01.model_devi" / "task.000.000000"
    assert md["sha256"]["task.000.000000/model_devi.out"] == _sha(task / "model_devi.out")
    assert sorted(p.name for p in (it0 / "00.train").glob("graph.*.pb")) == ["graph.000.pb", "graph.001.pb"]
    table = np.loadtxt(task / "model_devi.out", ndmin=2)
    np.testing.assert_array_equal(table[:, 0], np.arange(0, 51, 10))
    candidates = [c for c in (it0 / "02.fp" / "candidate.shuffled.000.out").read_text().split("\n") if c.strip()]
    assert len(candidates) == int(((table[:, 4] >= 1e-6) & (table[:, 4] < 50.0)).sum()) >= 2
    (sysdir,) = {p.parent for p in (it0 / "02.fp" / "data.000").rglob("type.raw")}
    assert dpdata.LabeledSystem(str(sysdir), fmt="deepmd/npy").get_nframes() == 2


def test_cluster_machine_files_in_the_docs_pass_the_checks(caplog):
    """Every machine.json of docs/cluster.md passes the checks `alkpu run` makes before any job
    (dpdispatcher's schema, strictly: no key it would ignore)."""
    import logging
    import re

    from alkpu_plugin.dpgen.preflight import machine_problems

    text = (Path(__file__).parents[1] / "docs" / "cluster.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    assert {b["train"]["machine"]["batch_type"] for b in blocks} == {"Slurm", "PBS", "LSF"}
    assert {b["train"]["machine"]["context_type"] for b in blocks} == {"LocalContext", "SSHContext"}
    for mdata in blocks:
        with caplog.at_level(logging.WARNING):
            assert machine_problems(mdata) == []
        assert not [r for r in caplog.records if "machine.json" in r.getMessage()], caplog.text
