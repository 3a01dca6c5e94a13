"""Entry point of the ``deepmd`` group: loaded when DeePMD-kit's TF backend loads.

DeePMD-kit's TensorFlow training entry point creates its trainer as
``DPTrainer(jdata, run_opt=..., is_compress=...)`` and has no optimizer
registry.  This module makes that name choose the trainer by the optimizer
type: ``"RLEKF"`` gets :class:`~alkpu_plugin.deepmd_tf.trainer.RLEKFTrainer`;
every other input gets DeePMD-kit's own ``DPTrainer`` class, untouched.
"""

from __future__ import annotations

from . import schema  # noqa: F401  (registers the optimizer schema)

__all__ = ["select_trainer", "install"]


def select_trainer(jdata: dict, run_opt, is_compress: bool = False):
    """Make the trainer DeePMD-kit's TF ``train`` entry point asks for."""
    from deepmd.tf.train.trainer import DPTrainer

    if (jdata.get("optimizer") or {}).get("type") == "RLEKF":
        from .trainer import RLEKFTrainer

        return RLEKFTrainer(jdata, run_opt=run_opt, is_compress=is_compress)
    return DPTrainer(jdata, run_opt=run_opt, is_compress=is_compress)


def install() -> None:
    import deepmd.tf.entrypoints.train as train_entry

    train_entry.DPTrainer = select_trainer


install()
