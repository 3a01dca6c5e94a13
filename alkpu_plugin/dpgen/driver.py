"""`alkpu run param.json machine.json`: DP-GEN's loop, with ALKPU when asked.

``"uncertainty": "committee"`` (default): DP-GEN's own ``run_iter`` on the
param.json without our keys.

``"uncertainty": "kpu"``: the same nine steps and the same ``record.dpgen``, by
DP-GEN's own step functions, with these differences:

* training: one model (``numb_models`` = 1) with ``"optimizer": {"type":
  "RLEKF", ...}`` (the ``kpu/optimizer`` keys on top); the Kalman state comes
  back with the model (``train_user_backward_files``) and, when DP-GEN
  continues training from the previous iteration, goes forward with it
  (``train_user_forward_files`` + the optimizer's ``init_state``);
* after training: the state is linked as ``00.train/kalman.000.npz`` (not a
  ``graph*`` name) and KPU is calibrated on the training data;
* exploration: LAMMPS with the single model, then ``alkpu kpu`` in the same
  task (``model_devi_command`` is wrapped), which writes ``model_devi.out``;
  frames beyond the calibrated KPU range are raised to candidates
  (:mod:`.extrapolation`); DP-GEN's own selection (``make_fp``), labelling and
  ``post_fp`` follow.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import tempfile
from pathlib import Path

from ..atomic import atomic_symlink, atomic_write_text
from ..runfiles import STEP_NAMES, TIMING_FILE
from .jobs import FailedLabelsError, guard_jobs, missing_outputs_allowed
from .extrapolation import raise_beyond_calibration
from .ordering import chooser_for, ordered_candidates
from .params import SELECTIONS, split_param
from .stages import StageLog, check_interval, timed_dpgen_steps

__all__ = ["run", "run_stage", "kpu_jdata", "kpu_mdata", "set_init_state", "after_training", "check_exploration",
           "STEP_NAMES"]

log = logging.getLogger("dpgen")

STATE_LINK = "kalman.000.npz"
CALIBRATION_LINK = "kalman.000.calibration.json"
KPU_TRAIN = "kalman.000.kpu_train.json"


def run(param_file: str, machine_file: str) -> None:
    """Run (or continue, from record.dpgen) an active-learning loop in the current directory."""
    from dpgen.util import load_file

    jdata_in = load_file(param_file)
    dpgen_jdata, settings = split_param(jdata_in)  # every check before any work
    stages = StageLog(".", dpgen_jdata, seed=settings.seed)
    with check_interval(settings.check_interval), guard_jobs():
        if not settings.is_kpu:
            from dpgen.generator.run import run_iter

            with tempfile.TemporaryDirectory() as tmp, timed_dpgen_steps(stages):
                stripped = os.path.join(tmp, os.path.basename(param_file))
                with open(stripped, "w") as fh:
                    json.dump(dpgen_jdata, fh, indent=4)
                run_iter(stripped, machine_file)
            return
        _run_kpu(dpgen_jdata, settings.kpu, load_file(machine_file), stages)


def kpu_jdata(jdata: dict, kpu: dict) -> dict:
    """DP-GEN's param for kpu mode: one RLEKF model."""
    jd = copy.deepcopy(jdata)
    jd["numb_models"] = 1
    train = jd["default_training_param"]
    train["optimizer"] = {"type": "RLEKF", **kpu.get("optimizer", {})}
    if kpu.get("numb_steps"):
        train.setdefault("training", {})["numb_steps"] = kpu["numb_steps"]
    if kpu.get("reuse_numb_steps"):
        jd.pop("training_reuse_stop_batch", None)
        jd["training_reuse_numb_steps"] = kpu["reuse_numb_steps"]
    if kpu.get("trust") == "relative":
        # model_devi.out then holds frame KPU / KPU_train, so DP-GEN's own
        # selection applies the paper's rule with eps_lo, eps_hi as trust levels
        jd["model_devi_f_trust_lo"] = kpu["eps_lo"]
        jd["model_devi_f_trust_hi"] = kpu["eps_hi"]
    return jd


def _run_kpu(jdata: dict, kpu: dict, mdata_in: dict, stages: StageLog | None = None) -> None:
    import alkpu_plugin.deepmd_tf.schema  # noqa: F401  (RLEKF keys known to DeePMD's argcheck)
    from dpgen.generator.arginfo import run_jdata_arginfo
    from dpgen.generator.run import record_iter, update_mass_map
    from dpgen.remote.decide_machine import convert_mdata
    from dpgen.util import normalize

    jdata = normalize(run_jdata_arginfo(), kpu_jdata(jdata, kpu))
    update_mass_map(jdata)
    mdata = convert_mdata(mdata_in)
    record = "record.dpgen"
    done = (0, -1)
    if os.path.isfile(record):
        lines = [ln.split() for ln in Path(record).read_text().splitlines() if ln.strip()]
        if lines:
            done = tuple(int(x) for x in lines[-1])
    ii = -1
    while True:
        ii += 1
        if ii < done[0]:
            continue
        for jj, name in enumerate(STEP_NAMES):
            if (ii, jj) <= done:
                continue
            try:
                if not run_stage(ii, name, jdata, mdata, kpu, stages):
                    return
            except _fixable() as exc:  # a file the user can restore or fix: say how to go on
                hinted = _resume_hint(exc, ii, name)
                if hinted is None:
                    raise
                raise hinted from exc
            record_iter(record, ii, jj)


def _failed_labels(ii: int, jdata: dict) -> str:
    """What DP-GEN's post_fp found: how many labelling tasks gave no labels, which, and what to do."""
    import glob

    import dpdata

    fp = _iter_dir(ii) / "02.fp"
    tasks = sorted(p for p in fp.glob("task.*") if p.is_dir())
    frames = 0
    for sys_dir in glob.glob(str(fp / "data.*" / "**" / "type.raw"), recursive=True):
        frames += dpdata.LabeledSystem(os.path.dirname(sys_dir), fmt="deepmd/npy").get_nframes()
    ratio = jdata.get("ratio_failed", 0.05)
    text = (f"post_fp of iteration {ii}: {len(tasks) - frames} of {len(tasks)} labelling tasks in {fp} gave no "
            f"labels ({(len(tasks) - frames) / max(len(tasks), 1):.0%}), more than ratio_failed {ratio:g} "
            "allows (DP-GEN's check).")
    if jdata.get("fp_style") == "custom":
        out = jdata["fp_params"]["output_fn"]
        missing = [p.name for p in tasks if not (p / out).exists()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            text += f" Without `{out}`: {shown}; their log is `output` in each task directory."
    return (text + f" Fix the labelling (or raise ratio_failed in param.json), then delete the lines after "
            f"`{ii} 6` in record.dpgen and run the same command: the labelling tasks run again.")


def _fixable():
    from ..calibration import CalibrationError
    from ..kalman import KalmanStateError, LayoutMismatchError

    # (a damaged model_devi.out or kpu.npz, too many failed labels: the message says which step to redo)
    return (KalmanStateError, LayoutMismatchError, CalibrationError, FileNotFoundError)


def _resume_hint(exc: Exception, ii: int, name: str) -> Exception | None:
    """``exc`` with how to go on once its cause is fixed (the record has not advanced)."""
    try:
        return type(exc)(
            f"{exc}\nOnce fixed, run the same command again (`alkpu run` or `dpgen run`): it continues with {name} of "
            f"iteration {ii} (record.dpgen keeps the finished steps, which are not redone; nothing is deleted)."
        )
    except TypeError:  # an exception class that takes other arguments
        return None


def run_stage(ii: int, name: str, jdata: dict, mdata: dict, kpu: dict, stages: StageLog | None = None) -> bool:
    """One kpu-mode step of iteration ``ii`` (a name of STEP_NAMES); False ends the loop.

    ``jdata`` is DP-GEN's normalised param from :func:`kpu_jdata`, ``mdata`` the
    converted machine data; the Kalman-state plumbing is added by :func:`kpu_mdata`.
    ``stages`` times the step (and prints progress); by default into ./alkpu-stages.jsonl.
    """
    stages = stages if stages is not None else StageLog(".", jdata)
    if name == "post_train":
        with stages.stage(ii, name):
            _run_step(ii, name, jdata, mdata, kpu)
        with stages.stage(ii, "kpu_calibration"):
            after_training(ii, jdata, kpu)
        return True
    with stages.stage(ii, name):
        return _run_step(ii, name, jdata, mdata, kpu)


def _run_step(ii: int, name: str, jdata: dict, mdata: dict, kpu: dict) -> bool:
    from dpgen.generator.run import (
        make_fp, make_model_devi, make_train, post_fp, post_model_devi, post_train,
        run_fp, run_model_devi, run_train,
    )

    log.info("ALKPU iter.%06d: %s", ii, name)
    if name == "run_model_devi":
        check_exploration(ii, jdata, kpu)  # before any job is submitted with these files
    md = kpu_mdata(ii, jdata, mdata, kpu)
    if name == "make_train":
        make_train(ii, jdata, md)
        set_init_state(ii, jdata)
    elif name == "run_train":
        run_train(ii, jdata, md)
    elif name == "post_train":
        post_train(ii, jdata, md)
    elif name == "make_model_devi":
        return bool(make_model_devi(ii, jdata, md))
    elif name == "run_model_devi":
        run_model_devi(ii, jdata, md)
    elif name == "post_model_devi":
        post_model_devi(ii, jdata, md)
    elif name == "make_fp":
        check_model_devi(ii)  # DP-GEN's selection reads these files
        raise_beyond_calibration(ii, jdata, kpu, _iter_dir(ii) / "01.model_devi")
        chooser = chooser_for(kpu.get("selection", SELECTIONS[0]), ii, jdata, kpu, _iter_dir(ii))
        if chooser is None:
            make_fp(ii, jdata, md)
        else:
            with ordered_candidates(chooser):
                make_fp(ii, jdata, md)
    elif name == "run_fp":
        with missing_outputs_allowed():  # a label that gave no output is counted by post_fp
            run_fp(ii, jdata, md)
    elif name == "post_fp":
        try:
            post_fp(ii, jdata)
        except RuntimeError as exc:
            if "too many unsuccessfully terminated" not in str(exc):
                raise
            raise FailedLabelsError(_failed_labels(ii, jdata)) from None
    else:
        raise ValueError(f"unknown stage {name!r}; one of {STEP_NAMES}")
    return True


# ---------------------------------------------------------------- per step
def _iter_dir(ii: int) -> Path:
    from dpgen.generator.run import make_iter_name

    return Path(make_iter_name(ii))


def _continues(ii: int, jdata: dict) -> bool:
    """Whether DP-GEN trains iteration ii from the previous model (--init-model)."""
    reuse = jdata.get("training_reuse_iter")
    return ii > 0 and (jdata.get("training_init_model", False) or (reuse is not None and ii >= reuse))


def kpu_mdata(ii: int, jdata: dict, mdata: dict, kpu: dict) -> dict:
    """machine data for iteration ii: the Kalman state travels with the jobs."""
    md = copy.deepcopy(mdata)
    train_dir = (_iter_dir(ii) / "00.train").resolve()
    md["train_user_backward_files"] = list(md.get("train_user_backward_files", [])) + [
        "model.ckpt.kalman.npz"]
    if _continues(ii, jdata):
        prev = _iter_dir(ii - 1) / "00.train" / STATE_LINK
        if prev.exists():
            md["train_user_forward_files"] = list(md.get("train_user_forward_files", [])) + [str(prev)]
    state = train_dir / STATE_LINK
    forward = [str(_iter_dir(ii) / "00.train" / STATE_LINK)] if state.exists() else []
    if (train_dir / CALIBRATION_LINK).exists():
        forward.append(str(_iter_dir(ii) / "00.train" / CALIBRATION_LINK))
    md["model_devi_user_forward_files"] = list(md.get("model_devi_user_forward_files", [])) + forward
    md["model_devi_user_backward_files"] = list(md.get("model_devi_user_backward_files", [])) + [
        "kpu.npz", TIMING_FILE]
    lmp = md.get("model_devi_command", "lmp")
    relative = ""
    if (train_dir / KPU_TRAIN).exists():
        relative = f"--relative-to {_kpu_train_value(train_dir / KPU_TRAIN)!r} "
    if kpu.get("select_hook"):
        relative += f"--select-hook {shlex.quote(kpu['select_hook'])} "
    md["model_devi_command"] = (
        f"alkpu lmp-kpu --lmp {shlex.quote(lmp)} --model ../graph.000.pb --kalman-state {STATE_LINK} "
        f"--seed {int(kpu.get('seed', 0))} {_memory_args(kpu)}"
        f"--density-factor {float(kpu.get('density_factor', 1.3))!r} {relative}--"
    )
    return md


def _memory_args(kpu: dict) -> str:
    """`alkpu lmp-kpu` options for the rows' chunks: the memory limit, rows_per_pass if set."""
    out = f"--memory-limit {float(kpu.get('memory_limit', 2.0))!r} "
    if kpu.get("rows_per_pass"):
        out += f"--rows-per-pass {int(kpu['rows_per_pass'])} "
    return out


def _training_skipped(ii: int) -> bool:
    """DP-GEN links the previous iteration's training when there is no new data."""
    return (_iter_dir(ii) / "00.train" / "000").is_symlink()


def set_init_state(ii: int, jdata: dict) -> None:
    """Point the RLEKF optimizer at the forwarded previous state when DP-GEN continues training."""
    if not _continues(ii, jdata) or _training_skipped(ii):
        return
    prev = _iter_dir(ii - 1) / "00.train" / STATE_LINK
    if not prev.exists():
        raise FileNotFoundError(
            f"iteration {ii} continues training from {_iter_dir(ii - 1)}/00.train, but its Kalman state "
            f"{prev} is missing; kpu mode needs the state saved with the model"
        )
    from ..kalman import read_meta

    read_meta(prev)  # a damaged state stops here, not in the training job
    task_input = _iter_dir(ii) / "00.train" / "000" / "input.json"
    data = json.loads(task_input.read_text())
    data.setdefault("optimizer", {})["init_state"] = STATE_LINK
    atomic_write_text(task_input, json.dumps(data, indent=4))


def after_training(ii: int, jdata: dict, kpu: dict) -> None:
    """Link the state as kalman.000.npz and calibrate KPU on the training data."""
    from ..kalman import KalmanStateError, read_meta

    train_dir = _iter_dir(ii) / "00.train"
    state = train_dir / "000" / "model.ckpt.kalman.npz"
    retrain = f"Without a copy, train again: delete the lines after `{ii} 0` in record.dpgen."
    if not state.exists():
        raise FileNotFoundError(
            f"the Kalman state {state} of the trained model is missing (dp train with RLEKF writes it beside "
            f"the checkpoint and the training job brings it back): put it back. {retrain}"
        )
    try:
        meta = read_meta(state)
    except KalmanStateError as exc:
        raise KalmanStateError(f"{exc} {retrain}") from None
    check_plateau(ii, meta, kpu)
    atomic_symlink(train_dir / STATE_LINK, os.path.join("000", "model.ckpt.kalman.npz"))
    if _training_skipped(ii):
        # the previous model, unchanged: its calibration / KPU_train stand (never refitted,
        # which would rewrite the earlier iteration's files through the link)
        prev = _iter_dir(ii - 1) / "00.train"
        if (prev / CALIBRATION_LINK).exists():
            atomic_symlink(train_dir / CALIBRATION_LINK,
                           os.path.relpath(os.path.realpath(prev / CALIBRATION_LINK), train_dir))
        if (prev / KPU_TRAIN).exists():
            atomic_write_text(train_dir / KPU_TRAIN, (prev / KPU_TRAIN).read_text())
        log.info("ALKPU iter.%06d: no new data, model and KPU calibration of iter.%06d kept", ii, ii - 1)
        return
    if kpu.get("trust", "calibrated") == "calibrated":
        _calibrate(ii, jdata, train_dir, kpu)
    else:
        _kpu_train(ii, jdata, train_dir, kpu)


class PlateauError(ValueError):
    """The iteration's model has learned no forces yet (kpu/on_plateau "stop")."""


def check_plateau(ii: int, meta: dict, kpu: dict) -> None:
    """Say when the trained model ended on RLEKF's initial plateau (``force_fit`` of its state):
    a warning, or with ``kpu/on_plateau`` "stop" an error before its exploration."""
    fit = (meta.get("extra") or {}).get("force_fit")
    if not fit or fit.get("learned", True):
        return
    text = (
        f"iter.{ii:06d}: the model stopped on RLEKF's plateau: its force RMSE on the {fit['on']} frames, "
        f"{fit['force_rmse']:.3g} eV/A, is {fit['ratio']:.2f} x the RMS of the label forces "
        f"({fit['label_force_rms']:.3g} eV/A), so it has learned (almost) no forces and its KPU ranks "
        "frames by noise. Raise kpu/numb_steps (or default_training_param/training/numb_steps)"
    )
    if kpu.get("on_plateau", "warn") == "stop":
        raise PlateauError(f"{text}; then delete the lines after `{ii} 0` in record.dpgen and run again.")
    log.warning("%s. Exploring with it all the same (kpu/on_plateau \"stop\" stops here instead).", text)


def check_exploration(ii: int, jdata: dict, kpu: dict) -> None:
    """Before iteration ii's exploration jobs go out: its Kalman state is readable and belongs to
    graph.000.pb, and the calibration (or KPU_train) the tasks read is there and readable.

    A missing one, or one fitted for other weights, is fitted again as after training (deleting it
    is the way to refit); a damaged one stops the run, naming the file.
    """
    from ..calibration import calibration_path, load_calibration
    from ..deepmd_tf.frozen import find_kalman_state

    train_dir = _iter_dir(ii) / "00.train"
    state = train_dir / STATE_LINK
    find_kalman_state(train_dir / "graph.000.pb", state)
    if kpu.get("trust", "calibrated") == "calibrated":
        if load_calibration(state) is None or not (train_dir / CALIBRATION_LINK).exists():
            log.info("ALKPU iter.%06d: no KPU calibration for this model (%s), fitting it again", ii,
                     calibration_path(state))
            _refit(ii, jdata, kpu)
    else:
        if not (train_dir / KPU_TRAIN).exists():
            log.info("ALKPU iter.%06d: no %s, computing it again", ii, train_dir / KPU_TRAIN)
            _refit(ii, jdata, kpu)
        _kpu_train_value(train_dir / KPU_TRAIN)


def check_model_devi(ii: int) -> None:
    """Before DP-GEN's selection: every exploration task of iteration ii has a readable
    model_devi.out with one row per frame of its kpu.npz (a file cut at a line end would
    otherwise be read as fewer frames, silently)."""
    from ..kpu_engine import InputError, KPUResult
    from ..model_devi import ModelDeviError, read_model_devi

    redo = (f"Explore iteration {ii} again: delete the lines after `{ii} 3` in record.dpgen and run the same "
            "command; its exploration tasks run again (with the same seeds) and write the file anew.")
    for task in sorted((_iter_dir(ii) / "01.model_devi").glob("task.*")):
        out, detail = task / "model_devi.out", task / "kpu.npz"
        try:
            frames = len(KPUResult.load(detail).frames) if detail.exists() else None
            read_model_devi(out, frames)
        except ModelDeviError as exc:
            raise ModelDeviError(f"the exploration result {exc}. {redo}") from None
        except InputError as exc:
            raise InputError(f"{exc}. {redo}") from None


def _refit(ii: int, jdata: dict, kpu: dict) -> None:
    """Redo what after_training did for iteration ii's model (from the iteration that trained it)."""
    first = ii
    while first > 0 and _training_skipped(first):
        first -= 1
    for jj in range(first, ii + 1):
        after_training(jj, jdata, kpu)


def _kpu_train_value(path: Path) -> float:
    try:
        return float(json.loads(path.read_text())["kpu_train"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        from ..calibration import CalibrationError

        raise CalibrationError(
            f"{path} is damaged ({type(exc).__name__}: {exc}): delete it, and `alkpu run` computes "
            "KPU_train again before the next exploration"
        ) from None


def _training_systems(ii: int, jdata: dict):
    """The labelled data the model of iteration ii was trained on (dpdata systems)."""
    import glob

    import dpdata

    dirs = [os.path.join(jdata["init_data_prefix"], s) for s in jdata["init_data_sys"]]
    for jj in range(ii):
        dirs += sorted(p for p in glob.glob(str(_iter_dir(jj) / "02.fp" / "data.*" / "**" / "type.raw"),
                                            recursive=True))
    systems = []
    for d in dirs:
        d = os.path.dirname(d) if d.endswith("type.raw") else d
        systems.append(dpdata.LabeledSystem(d, fmt="deepmd/npy", type_map=jdata["type_map"]))
    return systems


def _kpu_train(ii: int, jdata: dict, train_dir: Path, kpu: dict) -> None:
    """KPU_train: mean force KPU of the newest kpu_train_frames training frames (the paper's code: 20)."""
    import numpy as np

    from ..kpu_engine import KPUEngine

    engine = KPUEngine(train_dir / "graph.000.pb", train_dir / STATE_LINK, seed=int(kpu.get("seed", 0)),
                       rows_per_pass=kpu.get("rows_per_pass"), memory_limit=kpu.get("memory_limit"))
    want = int(kpu.get("kpu_train_frames", 20))
    values = []
    for system in reversed(_training_systems(ii, jdata)):  # newest data first
        n = system.get_nframes()
        take = min(n, want - len(values))
        values += engine.compute(system, frames=range(n - take, n), progress=False).force_kpu.tolist()
        if len(values) >= want:
            break
    value = float(np.mean(values))
    atomic_write_text(train_dir / KPU_TRAIN, json.dumps({"kpu_train": value, "frames": len(values)}))
    log.info("ALKPU KPU_train = %.6g (mean force KPU of %d training frames)", value, len(values))


def _calibrate(ii: int, jdata: dict, train_dir: Path, kpu: dict, max_frames: int = 24) -> None:
    """Fit the KPU scale on training frames drawn at random from all systems: as many as hold
    ``kpu/calibration_atoms`` atoms (at most ``max_frames``), so that the cost follows the
    atoms the fit needs, not the frame size."""
    import numpy as np

    from ..calibration import deciles, fit_forces, fit_virial, force_errors, save_calibration, virial_errors
    from ..kpu_engine import KPUEngine

    engine = KPUEngine(train_dir / "graph.000.pb", train_dir / STATE_LINK, seed=int(kpu.get("seed", 0)),
                       rows_per_pass=kpu.get("rows_per_pass"), memory_limit=kpu.get("memory_limit"))
    kpus, errs, vkpus, verrs = [], [], [], []
    rng = np.random.default_rng([int(kpu.get("seed", 0)), ii])
    systems = _training_systems(ii, jdata)
    pool = [(i, f) for i, system in enumerate(systems) for f in range(system.get_nframes())]
    order = rng.permutation(len(pool))[:max_frames]
    atoms = np.cumsum([systems[pool[k][0]].get_natoms() for k in order])
    want = int(kpu.get("calibration_atoms", 768))
    picked = sorted(pool[k] for k in order[: int(np.searchsorted(atoms, want)) + 1])
    for i, system in enumerate(systems):
        frames = [f for j, f in picked if j == i]
        if not frames:
            continue
        result = engine.compute(system, frames=frames, progress=False)
        errs.append(force_errors(engine, system, result).ravel())
        kpus.append(result.atom_kpu.ravel())
        virial = virial_errors(engine, system, result)
        if virial is not None:
            vkpus.append(virial[0].ravel())
            verrs.append(virial[1].ravel())
    kpus, errs = np.concatenate(kpus), np.concatenate(errs)
    cal = fit_forces(kpus, errs)
    if "fallback" in cal:
        log.info("ALKPU calibration: %s", cal["fallback"])
    if vkpus:  # systems without virial labels take the force scale
        cal["virial"] = fit_virial(np.concatenate(vkpus), np.concatenate(verrs))
    cal["fitted_on"] = "training data (in-sample)"
    cal["deciles"] = deciles(kpus, errs, cal)
    saved = save_calibration(train_dir / STATE_LINK, cal)
    atomic_symlink(train_dir / CALIBRATION_LINK, os.path.relpath(saved, train_dir))
    log.info("ALKPU calibration: |dF|^2 = %.4g * KPU^%.3g + %.4g (%d atoms)", cal["a"], cal.get("p", 1.0),
             cal["b"], cal["n_atoms"])
