"""Reference data from an ASE calculator (EMT by default): labelled MD frames.

Used by the tests, the benchmarks and the embedded demo to make small Cu data
sets (and held-out frames at a given temperature) without a DFT code.
"""

from __future__ import annotations

import numpy as np

from .labelling import label_atoms

__all__ = ["md_frames", "fcc_cell"]


def fcc_cell(element: str = "Cu", size: int = 2, a: float = 3.61):
    """A cubic fcc supercell (4 * size**3 atoms)."""
    from ase.build import bulk

    return bulk(element, "fcc", a=a, cubic=True).repeat((size, size, size))


def md_frames(
    temperature: float,
    nframes: int,
    *,
    element: str = "Cu",
    size: int = 2,
    a: float = 3.61,
    interval: int = 10,
    equilibrate: int = 50,
    timestep_fs: float = 2.0,
    seed: int = 0,
    calculator=None,
    substitute: dict[str, float] | None = None,
    type_map: list[str] | None = None,
):
    """Langevin MD at ``temperature`` K, labelled by ``calculator`` (EMT).

    ``substitute`` replaces a fraction of the atoms, drawn with ``seed``, by other
    elements (``{"Ni": 0.5}``: a random Cu-Ni alloy); ``type_map`` then fixes the
    order of the element names in the result (default: ``element`` first, then the
    substitutes in the order given).

    Returns a :class:`dpdata.LabeledSystem` with ``nframes`` frames taken every
    ``interval`` steps after ``equilibrate`` steps (energies, forces and virials).
    """
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = fcc_cell(element, size, a)
    rng = np.random.default_rng(seed)
    if substitute:
        symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
        order = rng.permutation(len(atoms))
        start = 0
        for other, fraction in substitute.items():
            count = int(round(float(fraction) * len(atoms)))
            symbols[order[start : start + count]] = other
            start += count
        atoms.set_chemical_symbols(symbols.tolist())
    atoms.calc = calculator if calculator is not None else EMT()
    # random displacement so that frames differ between seeds from step 0
    atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(
        atoms, timestep_fs * units.fs, temperature_K=temperature, friction=0.02,
        fixcm=False, rng=rng,
    )
    dyn.run(equilibrate)
    frames = []
    for _ in range(nframes):
        dyn.run(interval)
        frames.append(atoms.copy())
    labelled = label_atoms(frames, atoms.calc)
    names = list(type_map) if type_map else [element] + [e for e in (substitute or {}) if e != element]
    labelled.sort_atom_names(type_map=names)
    return labelled
