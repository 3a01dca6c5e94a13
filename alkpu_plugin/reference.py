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
):
    """Langevin MD at ``temperature`` K, labelled by ``calculator`` (EMT).

    Returns a :class:`dpdata.LabeledSystem` with ``nframes`` frames taken every
    ``interval`` steps after ``equilibrate`` steps.
    """
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = fcc_cell(element, size, a)
    atoms.calc = calculator if calculator is not None else EMT()
    rng = np.random.default_rng(seed)
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
    return label_atoms(frames, atoms.calc)
