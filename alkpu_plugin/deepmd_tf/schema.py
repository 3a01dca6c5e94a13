"""The ``"optimizer": {"type": "RLEKF", ...}`` schema, registered with DeePMD-kit.

Loaded through the ``deepmd.backend`` entry point, i.e. by every ``dp``
command, so ``dp train`` checks our keys with DeePMD-kit's own (dargs, strict)
error messages and ``dp doc-train-input`` lists them.  It imports no
TensorFlow.

The settings object :class:`RLEKFSettings` is the single place where the keys,
their defaults and their meaning live.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dargs import Argument

__all__ = ["RLEKFSettings", "rlekf_arguments", "register"]

DOC = (
    "Reorganised-layer extended Kalman filter (RLEKF, Hu et al. AAAI 2023; "
    "the optimizer of the ALKPU paper), provided by alkpu-plugin for the "
    "TensorFlow backend. Each training step makes one energy update and "
    "`force_updates` force updates, each on a fresh forward pass. The Kalman "
    "state (block-diagonal weight covariance P and fading-memory factor) is "
    "saved beside every checkpoint as `<checkpoint>.kalman.npz`; it is what "
    "`alkpu kpu` uses to compute the Kalman prediction uncertainty. "
    "The `learning_rate` section is not used by RLEKF."
)


FORCE_NORMALISERS = ("natoms", "none")


@dataclass(frozen=True)
class RLEKFSettings:
    """The optimizer's keys. Defaults follow ALGORITHMS.md ([code] values) except those
    measured in docs/rlekf.md (#the-defaults): ``force_normaliser`` "none" and the fading
    memory ``kalman_lambda`` "auto" (0.95 from 20,000 weights on, else 0.98), ``kalman_nue``
    0.997 (the paper's code: "natoms", 0.98, 0.9987), with which the forces of large models
    are learnt without the initial plateau; ``blocksize``
    "auto" (1024, halved while P would exceed 1 GB in float32; the paper's code 10240) and
    ``p_dtype`` "auto", which keep the step's cost bounded as the model grows."""

    blocksize: int | str = "auto"
    kalman_lambda: float | str = "auto"
    kalman_nue: float = 0.997
    p0: float = 1.0
    force_updates: int = 4
    atoms_per_update: int = 6
    pref_e: float = 1.0
    pref_f: float = 2.0
    force_normaliser: str = "none"
    seed: int | None = None
    p_dtype: str = "auto"
    reset_state: bool = False
    init_state: str | None = None
    p_memory_limit: float | None = None

    @classmethod
    def from_optimizer(cls, optimizer: dict[str, Any]) -> "RLEKFSettings":
        keys = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in optimizer.items() if k in keys})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _positive(x: Any) -> bool:
    return x > 0


def _blocksize_ok(x: Any) -> bool:
    return x == "auto" or (isinstance(x, int) and not isinstance(x, bool) and x > 0)


def rlekf_arguments() -> list[Argument]:
    d = RLEKFSettings()
    return [
        Argument(
            "blocksize", [int, str], optional=True, default=d.blocksize,
            extra_check=_blocksize_ok,
            extra_check_errmsg='blocksize must be a positive integer or "auto"',
            doc="N_b: weights are packed tensor by tensor and cut into blocks of at most "
            "this many; each block has its own dense covariance (memory: sum of squared "
            "block sizes times 8 bytes, 4 with p_dtype float32). 10240 in the paper's code, "
            '5120 in DeePMD-kit\'s LKF. "auto" (the default): 1024, halved (down to 128) while '
            "P would take more than 1 GB in float32 or exceed p_memory_limit (when continuing "
            "a saved Kalman state: that state's blocksize).",
        ),
        Argument(
            "kalman_lambda", [float, str], optional=True, default=d.kalman_lambda,
            extra_check=lambda x: x == "auto" or (not isinstance(x, str) and 0.0 < x <= 1.0),
            extra_check_errmsg='kalman_lambda (lambda_1) must be in (0, 1] or "auto"',
            doc='lambda_1, the initial fading-memory factor (0.98 in the paper\'s code). "auto" (the '
            "default): 0.95 for models of at least 20,000 weights, which learns their forces "
            "without the paper's initial plateau, and 0.98 for smaller ones, on which 0.95 was "
            "found unstable.",
        ),
        Argument(
            "kalman_nue", float, optional=True, default=d.kalman_nue,
            extra_check=lambda x: 0.0 <= x <= 1.0,
            extra_check_errmsg="kalman_nue (nu) must be in [0, 1]",
            doc="nu: lambda_{k+1} = nu * lambda_k + 1 - nu after every update (0.9987 in the "
            "paper's code). P grows by at most exp((1 - lambda_1) / (1 - nu)) along directions no "
            "update measures: e^16.7 from lambda_1 0.95, reached in about 1,000 updates, and "
            "e^6.7 from 0.98.",
        ),
        Argument(
            "p0", float, optional=True, default=d.p0,
            extra_check=_positive, extra_check_errmsg="p0 must be positive",
            doc="P_0 = p0 * I, the prior covariance of the weights.",
        ),
        Argument(
            "force_updates", int, optional=True, default=d.force_updates,
            extra_check=lambda x: x >= 0, extra_check_errmsg="force_updates must be >= 0",
            doc="N_f, force updates per training step (after the energy update).",
        ),
        Argument(
            "atoms_per_update", int, optional=True, default=d.atoms_per_update,
            extra_check=_positive, extra_check_errmsg="atoms_per_update must be positive",
            doc="n_g, atoms drawn at random for each force update.",
        ),
        Argument(
            "pref_e", float, optional=True, default=d.pref_e,
            extra_check=_positive, extra_check_errmsg="pref_e must be positive",
            doc="Prefactor of the energy measurement.",
        ),
        Argument(
            "pref_f", float, optional=True, default=d.pref_f,
            extra_check=_positive, extra_check_errmsg="pref_f must be positive",
            doc="Prefactor of the force measurement.",
        ),
        Argument(
            "force_normaliser", str, optional=True, default=d.force_normaliser,
            extra_check=lambda x: x in FORCE_NORMALISERS,
            extra_check_errmsg='force_normaliser must be "natoms" or "none"',
            doc='What a force update\'s error and measurement are divided by besides 3 n_g: '
            '"none" (default), or "natoms", the number of atoms N of the frame (DeePMD-kit\'s LKF '
            'and the paper\'s code). The weight of a force update against the filter\'s noise term '
            'scales as 1/N^2 with "natoms": forces are learnt only after a plateau of a few hundred '
            'steps, longer for larger frames.',
        ),
        Argument(
            "seed", [int, None], optional=True, default=d.seed,
            doc="Seed of the batch order and the atom draws. Default: training/seed.",
        ),
        Argument(
            "p_dtype", str, optional=True, default=d.p_dtype,
            extra_check=lambda x: x in ("float64", "float32", "auto"),
            extra_check_errmsg='p_dtype must be "float64", "float32" or "auto"',
            doc='Storage type of P. float32 halves memory and update time. "auto": float64 '
            "while P in float64 takes at most 1 GB (and fits p_memory_limit), float32 above "
            "(when continuing a saved Kalman state: that state's type).",
        ),
        Argument(
            "reset_state", bool, optional=True, default=d.reset_state,
            doc="With --init-model or --restart: start a fresh filter (P = p0 I, "
            "lambda = lambda_1) instead of continuing the saved Kalman state.",
        ),
        Argument(
            "init_state", [str, None], optional=True, default=d.init_state,
            doc="With --init-model: the Kalman state to continue (default: the one saved beside "
            "the checkpoint). Lets a job that receives files by name only (dpdispatcher, DP-GEN) "
            "bring the previous state along.",
        ),
        Argument(
            "p_memory_limit", [float, int, None], optional=True, default=d.p_memory_limit,
            extra_check=lambda x: x is None or x > 0,
            extra_check_errmsg="p_memory_limit must be a positive number of GB (or null)",
            doc="Most memory P may take, in GB (1e9 bytes). Default (null): half of the "
            "physical memory of the machine that trains. Training stops with an error naming "
            "the blocksizes and p_dtype that fit, before P is allocated, when P would exceed it.",
        ),
    ]


def register() -> None:
    """Add RLEKF to DeePMD-kit's optimizer variants (registering again replaces it)."""
    from deepmd.utils.argcheck import opt_args_plugin

    try:
        from deepmd.utils.argcheck import supported_backends

        doc = supported_backends("tf") + DOC
    except (ImportError, ValueError):  # pragma: no cover - older helpers
        doc = DOC
    opt_args_plugin.register("RLEKF", doc=doc)(rlekf_arguments)


register()
