"""Our keys in a DP-GEN ``param.json``, separated and checked before DP-GEN sees it.

DP-GEN 0.14 validates ``param.json`` strictly and rejects unknown top-level
keys, so the driver removes ours first:

``"uncertainty"``
    ``"committee"`` (default): DP-GEN's own run, unchanged.
    ``"kpu"``: one RLEKF model per iteration, frames selected by KPU.
``"kpu"``
    Settings of kpu mode (:func:`kpu_arguments`), checked with dargs in strict
    mode, in DP-GEN's error style.
``"seed"``
    Seeds Python's and NumPy's generators before every DP-GEN step, so the
    model seeds, MD velocities and frame selection DP-GEN draws repeat.
``"check_interval"``
    Seconds between dpdispatcher's job-status checks (dpdispatcher's default,
    30 s, when absent); a few seconds suits a local Shell machine.

Everything else goes to DP-GEN's own schema (``run_jdata_arginfo``) unchanged.
All checks run before any directory is made or job is submitted.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from dargs import Argument

from ..calibration import EXTRAPOLATION_FACTOR
from ..deepmd_tf.schema import rlekf_arguments

__all__ = ["AlkpuSettings", "ParamError", "split_param", "separate", "kpu_problems", "check_dpgen_schema",
           "kpu_arguments", "alkpu_arguments"]

UNCERTAINTY = "uncertainty"
KPU = "kpu"
CHECK_INTERVAL = "check_interval"
SEED = "seed"
MODES = ("committee", "kpu")
TRUST_MODES = ("calibrated", "relative")
SELECTIONS = ("top", "random", "diverse")
PLATEAU_ACTIONS = ("warn", "stop")

log = logging.getLogger("dpgen")


class ParamError(ValueError):
    """A param.json that cannot run; the message names the key and the fix."""


def _one_of(name: str, choices: tuple[str, ...], doc: str) -> Argument:
    """A string key that takes one of ``choices`` (the first is the default)."""
    return Argument(name, str, optional=True, default=choices[0], extra_check=lambda x: x in choices,
                    extra_check_errmsg=f"{name} must be " + " or ".join(f'"{c}"' for c in choices), doc=doc)


def kpu_arguments() -> list[Argument]:
    return [
        Argument(
            "optimizer", dict, sub_fields=rlekf_arguments(), optional=True, default={},
            doc="Keys of the RLEKF optimizer (as in `dp train`'s optimizer section, without "
            "`type`); they replace those derived from default_training_param.",
        ),
        Argument(
            "numb_steps", [int, None], optional=True, default=None,
            doc="RLEKF training steps per iteration (default: default_training_param's).",
        ),
        Argument(
            "reuse_numb_steps", [int, None], optional=True, default=None,
            doc="RLEKF steps of the iterations that continue the previous model and its Kalman "
            "state (training_reuse_iter on); replaces training_reuse_numb_steps in kpu mode.",
        ),
        _one_of(
            "trust", TRUST_MODES,
            '"calibrated": the calibrated per-atom force uncertainty (eV/A) is compared with '
            'model_devi_f_trust_lo/hi, as DP-GEN compares its committee deviation. "relative": the '
            "paper's rule, frame KPU between eps_lo and eps_hi times KPU_train.",
        ),
        Argument("eps_lo", [float, None], optional=True, default=None,
                 doc='With trust "relative": lower multiplier of KPU_train.'),
        Argument("eps_hi", [float, None], optional=True, default=None,
                 doc='With trust "relative": upper multiplier of KPU_train.'),
        Argument("kpu_train_frames", int, optional=True, default=20,
                 extra_check=lambda x: x > 0, extra_check_errmsg="kpu_train_frames must be positive",
                 doc="Training frames whose mean force KPU is KPU_train (the paper's code: 20)."),
        Argument("seed", int, optional=True, default=0, doc="Seed of the paper's N/2 atom draw."),
        Argument("select_hook", [str, None], optional=True, default=None,
                 doc='"module:function" called with each exploration task\'s KPUResult; it returns the '
                 "per-frame (frames,) or per-atom (frames, atoms) values written to model_devi.out, "
                 "which DP-GEN's selection compares with the trust levels. Must be importable where "
                 "the exploration jobs run."),
        _one_of("selection", SELECTIONS,
                'Which candidates (frames within the trust levels) of a system are labelled when '
                'there are more than fp_task_max: "top", the fp_task_max of largest uncertainty '
                '(the value compared with the trust levels); "random", DP-GEN\'s random draw; '
                '"diverse", a batch chosen greedily across all exploration tasks of the iteration, '
                "each frame scored by its most uncertain atom with P updated as if the frames chosen "
                "before it had been labelled (virtual Kalman updates), so that repeats of one "
                "configuration are not labelled twice. DP-GEN's counts and files stay its own."),
        Argument("diverse_candidates", int, optional=True, default=200,
                 extra_check=lambda x: x > 0, extra_check_errmsg="diverse_candidates must be positive",
                 doc='With selection "diverse": at most this many candidates of a system (those of '
                 "largest uncertainty) enter the choice; their force rows are computed where make_fp "
                 "runs."),
        _one_of("on_plateau", PLATEAU_ACTIONS,
                "When an iteration's RLEKF training ended on its initial plateau (force RMSE at "
                "least 0.8 x the RMS of the label forces): \"warn\" says so in the log and explores; "
                "\"stop\" stops the run before the exploration, saying what to change."),
        Argument("density_factor", [int, float], optional=True, default=1.3,
                 extra_check=lambda x: x == 0 or x >= 1,
                 extra_check_errmsg="density_factor must be 0 (no density check) or >= 1",
                 doc="Explored frames whose number density lies below the training data's lowest "
                 "divided by this factor, or above its highest times it, are outside the model's "
                 "domain: written as failed to model_devi.out (as are frames with an atom that has no "
                 "neighbour inside rcut). 0 switches the density check off."),
        Argument("rows_per_pass", [int, None], optional=True, default=None,
                 extra_check=lambda x: x is None or x > 0, extra_check_errmsg="rows_per_pass must be positive",
                 doc="Force components per graph evaluation; default: as many as memory_limit allows."),
        Argument("extrapolation", [int, float], optional=True, default=EXTRAPOLATION_FACTOR,
                 extra_check=lambda x: x == 0 or x >= 1,
                 extra_check_errmsg="extrapolation must be 0 (off) or >= 1",
                 doc='With trust "calibrated": an explored frame whose largest atomic KPU exceeds this '
                 "many times the largest KPU the round's calibration was fitted on is a candidate "
                 "(written at least at model_devi_f_trust_lo), since the calibrated uncertainty "
                 "under-predicts beyond the range it was fitted on. 0 switches the rule off."),
        Argument("calibration_atoms", int, optional=True, default=768,
                 extra_check=lambda x: x > 0, extra_check_errmsg="calibration_atoms must be positive",
                 doc="Atoms of training frames (drawn at random, at most 24 frames) on which each "
                 "round's KPU calibration is fitted."),
        Argument("memory_limit", [int, float], optional=True, default=2.0,
                 extra_check=lambda x: x > 0, extra_check_errmsg="memory_limit must be a positive number of GB",
                 doc="GB the KPU of a frame may use beyond the model, P and the frame's own arrays "
                 "(chunks of force rows and their quadratic forms are sized to it)."),
    ]


def alkpu_arguments() -> Argument:
    return Argument(
        "alkpu",
        dict,
        sub_fields=[
            Argument(
                UNCERTAINTY, str, optional=True, default="committee",
                extra_check=lambda x: x in MODES,
                extra_check_errmsg='uncertainty must be "committee" or "kpu"',
                doc='"committee": DP-GEN\'s own run. "kpu": ALKPU with one RLEKF model.',
            ),
            Argument(KPU, dict, sub_fields=kpu_arguments(), optional=True, default={},
                     doc="Settings of kpu mode."),
            Argument(CHECK_INTERVAL, [int, float, None], optional=True, default=None,
                     extra_check=lambda x: x is None or x > 0,
                     extra_check_errmsg="check_interval must be a positive number of seconds",
                     doc="Seconds between dpdispatcher's job-status checks (default: dpdispatcher's 30)."),
            Argument(SEED, [int, None], optional=True, default=None,
                     doc="Seed Python's and NumPy's generators before every DP-GEN step (DP-GEN draws "
                     "model seeds, MD velocities and the frame selection from them), so runs repeat."),
        ],
    )


@dataclass
class AlkpuSettings:
    uncertainty: str = "committee"
    kpu: dict[str, Any] = field(default_factory=dict)
    check_interval: float | None = None
    seed: int | None = None

    @property
    def is_kpu(self) -> bool:
        return self.uncertainty == "kpu"


def _trust_values(value) -> list[float]:
    if isinstance(value, dict):
        return [float(v) for v in value.values()]
    if isinstance(value, list):
        return [float(v) for v in value]
    return [float(value)]


def separate(jdata: dict) -> tuple[dict, AlkpuSettings]:
    """(DP-GEN's param without our keys, our settings checked by their own schema).

    Raises dargs' errors (in DP-GEN's style) for our keys; DP-GEN's keys are not
    looked at.
    """
    dpgen = copy.deepcopy(jdata)
    ours = {k: dpgen.pop(k) for k in (UNCERTAINTY, KPU, CHECK_INTERVAL, SEED) if k in dpgen}
    ours.setdefault(KPU, {})  # so that dargs fills the kpu defaults too
    arg = alkpu_arguments()
    ours = arg.normalize_value(ours, trim_pattern="_*")
    arg.check_value(ours, strict=True)
    return dpgen, AlkpuSettings(ours[UNCERTAINTY], ours[KPU], ours[CHECK_INTERVAL], ours[SEED])


def check_dpgen_schema(dpgen: dict) -> None:
    """DP-GEN's own strict check of param.json (what ``dpgen run`` does first)."""
    from dpgen.generator.arginfo import run_jdata_arginfo
    from dpgen.util import normalize

    normalize(run_jdata_arginfo(), copy.deepcopy(dpgen))


def split_param(jdata: dict, check_dpgen: bool = True) -> tuple[dict, AlkpuSettings]:
    """(DP-GEN's param without our keys, our settings), every check done.

    Raises :class:`ParamError` (or dargs' own errors, in DP-GEN's style) naming
    the problem; nothing is written.
    """
    dpgen, settings = separate(jdata)
    if settings.is_kpu:
        problems = kpu_problems(dpgen, settings.kpu)
        if problems:
            raise ParamError("\n".join(problems))
    if check_dpgen:
        check_dpgen_schema(dpgen)
    return dpgen, settings


def kpu_problems(dpgen: dict, kpu: dict) -> list[str]:
    """What in a param.json keeps kpu mode from running, one message per problem."""
    problems = []
    backend = dpgen.get("train_backend", "tensorflow")
    if backend != "tensorflow":
        problems.append(
            f'"uncertainty": "kpu" trains with RLEKF, which runs on DeePMD-kit\'s TensorFlow '
            f'backend; this param.json sets "train_backend": "{backend}". Remove train_backend '
            'or set it to "tensorflow".'
        )
    training = dpgen.get("default_training_param", {})
    if isinstance(training, list):
        problems.append(
            'default_training_param is a list (one training input per committee model); "uncertainty": '
            '"kpu" trains one model: give one training input (a dict).'
        )
        return problems
    opt = (training.get("optimizer") or {}).get("type") if isinstance(training, dict) else None
    if opt not in (None, "Adam", "RLEKF"):
        problems.append(
            f'default_training_param/optimizer/type is "{opt}"; kpu mode replaces it with RLEKF. '
            'Remove it or use "RLEKF".'
        )
    if kpu["trust"] == "relative":
        lo, hi = kpu["eps_lo"], kpu["eps_hi"]
        if lo is None or hi is None:
            problems.append(
                'kpu/trust "relative" needs kpu/eps_lo and kpu/eps_hi (multipliers of KPU_train, '
                "e.g. 1.0 and 2.0)"
            )
        elif not 0 <= lo <= hi:
            problems.append(f"kpu/eps_lo ({lo}) must be >= 0 and not above kpu/eps_hi ({hi})")
    else:
        missing = [k for k in ("model_devi_f_trust_lo", "model_devi_f_trust_hi") if k not in dpgen]
        if missing:
            problems.append(
                f"kpu/trust \"calibrated\" compares the calibrated force uncertainty (eV/A) with "
                f"DP-GEN's trust levels; {' and '.join(missing)} missing. Set them (e.g. 0.05 and "
                '0.15), or use kpu/trust "relative" with eps_lo/eps_hi.'
            )
        else:
            try:
                pairs = list(zip(_trust_values(dpgen["model_devi_f_trust_lo"]),
                                 _trust_values(dpgen["model_devi_f_trust_hi"])))
            except (TypeError, ValueError):
                pairs = []  # DP-GEN's own schema names a value that is not a number
            for lo, hi in pairs:
                if lo > hi:
                    problems.append(
                        f"model_devi_f_trust_lo ({lo}) is above model_devi_f_trust_hi ({hi})"
                    )
    if kpu.get("selection") == "diverse":
        engine = dpgen.get("model_devi_engine", "lammps")
        if engine != "lammps" or dpgen.get("model_devi_merge_traj"):
            problems.append(
                'kpu/selection "diverse" reads each candidate from the exploration\'s traj/<step>.lammpstrj '
                f'files; this param.json sets model_devi_engine "{engine}"'
                + (" and model_devi_merge_traj" if dpgen.get("model_devi_merge_traj") else "")
                + '. Use LAMMPS without model_devi_merge_traj, or kpu/selection "top" or "random".'
            )
    try:
        _check_p_memory(dpgen, kpu)
    except ParamError as exc:
        problems.append(str(exc))
    return problems


def _check_p_memory(dpgen: dict, kpu: dict) -> None:
    """P of the RLEKF model must fit kpu/optimizer/p_memory_limit (what `dp train` checks too).

    The weights are counted from default_training_param's model
    (:mod:`.model_size`); for models that are not counted there the check is
    left to `dp train`, with a note in the log.
    """
    from ..deepmd_tf.schema import RLEKFSettings
    from ..kalman.budget import PMemoryError, plan_p
    from .driver import kpu_jdata
    from .model_size import UnsupportedModel, model_tensors

    if not isinstance(dpgen.get("default_training_param"), dict):
        return  # DP-GEN's own schema names it
    training = kpu_jdata(dpgen, kpu)["default_training_param"]
    settings = RLEKFSettings.from_optimizer(training["optimizer"])
    try:
        tensors = model_tensors(training.get("model") or {}, dpgen.get("type_map"))
    except UnsupportedModel as exc:
        log.info("kpu: P's memory is checked by dp train, not before the run (weights of %s not counted)", exc)
        return
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # a model DeePMD-kit's own check of the training input rejects (preflight names it)
        log.info("kpu: P's memory not estimated, the model's keys are not DeePMD-kit's (%s: %s)",
                 type(exc).__name__, exc)
        return
    try:
        plan = plan_p(
            tensors, settings.blocksize, settings.p_dtype, settings.p_memory_limit,
            settings.force_updates, key_prefix="kpu/optimizer/",
            model="default_training_param's model",
        )
    except PMemoryError as exc:
        raise ParamError(str(exc)) from None
    log.info("kpu: RLEKF %s", plan.describe())
