"""Frames outside the model's domain: found from the structure, written as failed."""

import numpy as np
import pytest

from alkpu_plugin.domain import frame_reasons, merge_domains, training_domain
from alkpu_plugin.model_devi import OUT_OF_DOMAIN, read_model_devi, write_model_devi


def _fcc(a=3.61, n=2):
    from alkpu_plugin.reference import fcc_cell

    atoms = fcc_cell("Cu", n, a)
    return atoms.get_positions(), np.asarray(atoms.get_cell())


def test_training_domain_is_the_range_of_densities():
    pos, cell = _fcc()
    cells = np.stack([cell, cell * 1.02, cell * 0.99])
    dom = training_domain([(32, cells, False), (32, cells[:1] * 5, True)])  # non-periodic: ignored
    rho = 32 / np.abs(np.linalg.det(cells))
    assert dom["density"] == [rho.min(), rho.max()] and dom["frames"] == 3
    assert training_domain([(32, cells, True)]) is None
    both = merge_domains(dom, {"density": [0.01, 0.05], "frames": 2})
    assert both["density"] == [0.01, max(0.05, rho.max())] and both["frames"] == 5
    assert merge_domains(None, dom) == dom


def test_expanded_box_and_lonely_atom_are_outside():
    pos, cell = _fcc()
    dom = training_domain([(32, cell[None], False)])
    coords = np.stack([pos, pos * 1.05, pos * 2.0])
    cells = np.stack([cell, cell * 1.05, cell * 2.0])
    reasons = frame_reasons(coords, cells, 4.5, dom, density_factor=1.3)
    assert reasons[0] == "" and reasons[1] == ""  # 16 % less dense: inside the factor 1.3
    assert "density" in reasons[2] and "outside" in reasons[2]
    # an atom moved 10 A away from the others in a large box: no neighbour inside rcut
    big = np.eye(3) * 30.0
    lonely = pos.copy()
    lonely[5] = [20.0, 20.0, 20.0]
    r = frame_reasons(lonely[None], big[None], 4.5, None)
    assert r == ["1 atom(s) with no neighbour within rcut 4.5 A (first: atom 5)"]
    # without periodicity and without a training domain: only the neighbour check
    assert frame_reasons(pos[None], None, 4.5, dom) == [""]
    # density check switched off
    assert frame_reasons(coords[2:], cells[2:], None, dom, density_factor=0) == [""]


def test_model_devi_marks_frames_outside_as_failed(tmp_path):
    sigma = np.array([[0.1, 0.2], [0.3, 0.4], [0.05, 0.06]])
    vsig = np.arange(27, dtype=float).reshape(3, 9) / 100 + 0.01
    path = write_model_devi(tmp_path / "model_devi.out", [0, 10, 20], sigma, vsig, [False, True, False])
    table = read_model_devi(path)
    np.testing.assert_allclose(table[:, 1], [vsig[0].max(), OUT_OF_DOMAIN, vsig[2].max()], rtol=1e-6)
    np.testing.assert_allclose(table[:, 2], vsig.min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(table[:, 3], vsig.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(table[:, 4], [0.2, OUT_OF_DOMAIN, 0.06], rtol=1e-6)
    np.testing.assert_allclose(table[:, 5], sigma.min(axis=1), rtol=1e-6)


@pytest.mark.parametrize("repeat,rcut", [((3, 3, 3), 6.0), ((2, 2, 2), 2.6), ((1, 1, 1), 6.0), ((2, 2, 2), 2.0)])
def test_isolated_atoms_as_ase_finds_them(repeat, rcut):
    """The k-d tree query (orthorhombic cells longer than rcut) and ASE's neighbour list
    (every other cell) find the same isolated atoms, wrapped or not, periodic or not."""
    from ase import Atoms
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    from alkpu_plugin.domain import _isolated

    rng = np.random.default_rng(1)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    cases = [(atoms.positions + rng.normal(scale=0.1, size=atoms.positions.shape), np.array(atoms.cell))]
    cases[0][0][0] += 30.0  # outside the cell
    cases.append((rng.uniform(0, 40, size=(20, 3)), np.eye(3) * 40))  # a gas: isolated atoms
    cases.append((cases[1][0], None))
    for coord, cell in cases:
        ase_atoms = Atoms(positions=coord, pbc=False) if cell is None else Atoms(positions=coord, cell=cell, pbc=True)
        first = neighbor_list("i", ase_atoms, rcut, self_interaction=False)
        expected = np.nonzero(np.bincount(first, minlength=len(coord)) == 0)[0]
        assert np.array_equal(_isolated(coord, cell, rcut), expected)
