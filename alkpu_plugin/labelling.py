"""Labelling configurations with an ASE calculator (EMT by default), through dpdata.

Used as DP-GEN's ``fp_style: "custom"`` so the whole loop runs without a DFT
code::

    "fp_style": "custom",
    "fp_params": {"input_fmt": "deepmd/npy", "input_fn": "input",
                  "output_fmt": "deepmd/npy", "output_fn": "output"}
    machine.json: "fp_command": "alkpu label -i input -o output"

Any ASE calculator can be named as ``module:Class`` (keyword arguments as JSON).
"""

from __future__ import annotations

import importlib
import json

import numpy as np

__all__ = ["make_calculator", "label_atoms", "label_system", "main"]


def make_calculator(spec: str = "emt", kwargs: dict | None = None):
    """An ASE calculator from ``"emt"`` or ``"module:Class"``."""
    kwargs = kwargs or {}
    if spec.lower() == "emt":
        from ase.calculators.emt import EMT

        return EMT(**kwargs)
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f'calculator {spec!r}: use "emt" or "module:Class"')
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"calculator {spec!r} cannot be imported: {exc}") from exc
    return cls(**kwargs)


def label_atoms(frames, calculator):
    """A dpdata LabeledSystem of ASE Atoms labelled by ``calculator``.

    Energy and forces always; the virial too for a periodic cell when the
    calculator gives a stress (EMT does).
    """
    import dpdata
    from ase.calculators.singlepoint import SinglePointCalculator

    labelled = None
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calculator
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
            raise FloatingPointError("the calculator returned a non-finite energy or force")
        results = {"energy": energy, "forces": forces}
        if atoms.pbc.all():
            try:
                stress = atoms.get_stress(voigt=True)
            except Exception:  # calculators without stress: energy and forces only
                stress = None
            if stress is not None and np.all(np.isfinite(stress)):
                results["stress"] = stress
        atoms.calc = SinglePointCalculator(atoms, **results)
        one = dpdata.LabeledSystem(atoms, fmt="ase/structure")
        labelled = one if labelled is None else labelled + one
    if labelled is None:
        raise ValueError("no configurations to label")
    return labelled


def label_system(system, calculator):
    """Label every frame of a dpdata System; atom names and order are kept."""
    labelled = label_atoms(system.to("ase/structure"), calculator)
    # ase/structure names elements in order of appearance: restore the input's type map
    labelled.sort_atom_names(type_map=list(system["atom_names"]))
    return labelled


def main(argv=None) -> int:
    import argparse

    import dpdata

    ap = argparse.ArgumentParser(prog="alkpu label", description="Label configurations with an ASE calculator.")
    ap.add_argument("-i", "--input", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--input-fmt", default="deepmd/npy")
    ap.add_argument("--output-fmt", default="deepmd/npy")
    ap.add_argument("--calculator", default="emt", help='"emt" (default) or "module:Class"')
    ap.add_argument("--calc-kwargs", default="{}", help="JSON keyword arguments of the calculator")
    args = ap.parse_args(argv)
    import os
    import sys

    try:
        if not os.path.exists(args.input):
            raise ValueError(f"the input {args.input} does not exist")
        try:
            system = dpdata.System(args.input, fmt=args.input_fmt)
        except Exception as exc:  # dpdata's own errors: name the file and the format
            raise ValueError(f"the input {args.input} cannot be read as {args.input_fmt} ({type(exc).__name__}: "
                             f"{exc}); give its dpdata format with --input-fmt") from None
        calculator = make_calculator(args.calculator, json.loads(args.calc_kwargs))
    except ValueError as exc:
        print(f"alkpu label: error: {exc}", file=sys.stderr)
        return 2
    labelled = label_system(system, calculator)
    from .atomic import atomic_output

    # complete or absent: a killed labelling job never leaves half a system for post_fp
    atomic_output(args.output, lambda tmp: labelled.to(args.output_fmt, tmp))
    return 0
