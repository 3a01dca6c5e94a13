"""dpdata plugin: label a System with an RLEKF model's energy, forces and KPU.

Registered through dpdata's ``dpdata.plugins`` entry point, so after
installing alkpu-plugin::

    import dpdata
    labelled = dpdata.System("traj.lammpstrj", fmt="lammps/dump", type_map=["Cu"]).predict(
        "graph.pb", driver="alkpu")
    labelled["kpu_atom"]        # (frames, atoms) per-atom KPU
    labelled.to("deepmd/npy", "out")   # writes kpu_atom.npy, kpu_force.npy, kpu_energy.npy too

Registered data types (on System and LabeledSystem, written by dpdata's
deepmd formats under the same names): ``kpu_force`` (frames,) the paper's
force KPU, ``kpu_energy`` (frames,), ``kpu_atom`` (frames, atoms),
``kpu_sigma`` (frames, atoms) the per-atom force uncertainty (eV/A when a
calibration exists, sqrt(KPU) otherwise), ``kpu_virial`` (frames, 9) the KPU of
the nine virial components, and ``virials`` as the model predicts them.

Importing this module loads neither TensorFlow nor DeePMD-kit (dpdata imports
every plugin at start-up); the engine is built when a driver is created.
"""

from __future__ import annotations

import numpy as np
from dpdata.data_type import Axis, DataType, register_data_type
from dpdata.driver import Driver

__all__ = ["KPUDriver", "DATA_TYPES"]

DATA_TYPES = (
    DataType("kpu_force", np.ndarray, (Axis.NFRAMES,), required=False),
    DataType("kpu_energy", np.ndarray, (Axis.NFRAMES,), required=False),
    DataType("kpu_atom", np.ndarray, (Axis.NFRAMES, Axis.NATOMS), required=False),
    DataType("kpu_sigma", np.ndarray, (Axis.NFRAMES, Axis.NATOMS), required=False),
    DataType("kpu_virial", np.ndarray, (Axis.NFRAMES, 9), required=False),
)
# dpdata imports its plugins while dpdata.system is being imported, and then
# adds every type registered here to System and LabeledSystem
for _dt in DATA_TYPES:
    register_data_type(_dt, labeled=False)


@Driver.register("alkpu")
class KPUDriver(Driver):
    """Energies, forces and KPU from a frozen RLEKF model and its Kalman state.

    Parameters
    ----------
    model
        Frozen model (``dp freeze`` output).
    kalman_state
        Its Kalman state (found from the model when omitted).
    seed
        Seed of the paper's N/2 atom draw.
    """

    def __init__(self, model, kalman_state=None, seed: int = 0, **engine_kwargs) -> None:
        from .kpu_engine import KPUEngine

        self.engine = KPUEngine(model, kalman_state, seed=seed, **engine_kwargs)

    def label(self, data: dict) -> dict:
        from dpdata.system import System

        system = System(data=data)
        result = self.engine.compute(system, progress=False)
        _, frames = self.engine._frames(system, result.frames)
        energies, forces = zip(*(self.engine.jacobian.predict(f) for f in frames))
        data = dict(data)
        data["energies"] = np.array(energies)
        data["forces"] = np.array(forces)
        data["kpu_force"] = result.force_kpu
        data["kpu_energy"] = result.energy_kpu
        data["kpu_atom"] = result.atom_kpu
        data["kpu_sigma"] = result.atom_sigma
        if result.virial_kpu is not None:
            data["kpu_virial"] = result.virial_kpu
            if not (data.get("nopbc") or False):
                data["virials"] = np.array([self.engine.jacobian.predict_virial(f).reshape(3, 3)
                                            for f in frames])
        return data
