"""The ASE labeller as DP-GEN's fp_style "custom": DP-GEN writes the input, we label, DP-GEN collects."""

import copy
import os
import subprocess
import sys

import dpdata
import numpy as np
import pytest
from ase.calculators.emt import EMT

from alkpu_plugin.labelling import label_system, make_calculator
from alkpu_plugin.reference import fcc_cell

from .test_dpgen_params import PARAM


def test_label_system_matches_ase_emt():
    atoms = fcc_cell("Cu", 2)
    atoms.rattle(0.05, seed=1)
    system = dpdata.System(atoms, fmt="ase/structure")
    labelled = label_system(system, make_calculator("emt"))
    atoms.calc = EMT()
    assert labelled["energies"][0] == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(labelled["forces"][0], atoms.get_forces(), atol=1e-10)
    with pytest.raises(ValueError, match='use "emt" or "module:Class"'):
        make_calculator("lj")
    with pytest.raises(ValueError, match="cannot be imported"):
        make_calculator("ase.calculators.nope:Nope")
    lj = make_calculator("ase.calculators.lj:LennardJones", {"sigma": 2.3})
    assert lj.parameters["sigma"] == 2.3


def test_dpgen_custom_fp_round_trip(tmp_path, monkeypatch):
    from dpgen.generator.run import make_fp_custom, post_fp

    jdata = copy.deepcopy(PARAM)
    jdata["fp_params"] = {"input_fmt": "deepmd/npy", "input_fn": "input",
                          "output_fmt": "deepmd/npy", "output_fn": "output"}
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    expected = []
    for k in range(2):  # two candidate frames, as make_fp leaves them: task.000.00000k/POSCAR
        task = tmp_path / "iter.000000" / "02.fp" / f"task.000.{k:06d}"
        task.mkdir(parents=True)
        atoms = fcc_cell("Cu", 2)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        dpdata.System(atoms, fmt="ase/structure").to("vasp/poscar", str(task / "POSCAR"))
        atoms.calc = EMT()
        expected.append(atoms.get_forces())
    make_fp_custom(0, jdata)  # DP-GEN converts POSCAR to the custom input
    for task in sorted((tmp_path / "iter.000000" / "02.fp").glob("task.*")):
        proc = subprocess.run([sys.executable, "-m", "alkpu_plugin.cli", "label", "-i", "input", "-o", "output"],
                              cwd=task, capture_output=True, text=True, env=os.environ)
        assert proc.returncode == 0, proc.stderr[-2000:]
    post_fp(0, jdata)  # DP-GEN collects the labels into its training data
    # custom style is collected as dpdata MultiSystems: one directory per formula
    (sysdir,) = [p.parent for p in (tmp_path / "iter.000000" / "02.fp" / "data.000").rglob("type.raw")]
    collected = dpdata.LabeledSystem(str(sysdir), fmt="deepmd/npy")
    assert collected.get_nframes() == 2 and collected["atom_names"] == ["Cu"]
    np.testing.assert_allclose(collected["forces"], np.array(expected), atol=1e-6)
