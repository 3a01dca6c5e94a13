"""Every input check of `alkpu run` (and `dpgen run` with our keys), before any directory or job.

DP-GEN checks param.json's own keys at start, but the training input, the data
and the fp files only when the step that uses them runs, often after jobs have
been submitted (a misspelled key in ``default_training_param`` fails the
training job, which dpdispatcher resubmits several times). :func:`preflight`
reads param.json and machine.json and checks, in both modes:

* our keys (``uncertainty``, ``kpu``, ...) and DP-GEN's schema of param.json
  (:mod:`.params`); in kpu mode also the trust levels and P's memory against
  ``p_memory_limit`` (the RLEKF model's weights counted from the model keys);
* the training input DP-GEN writes for the first iteration, checked with
  DeePMD-kit's own argcheck exactly as ``dp train`` checks it (the RLEKF
  optimizer's keys included);
* ``init_data_prefix`` / ``init_data_sys``: paths exist, hold deepmd/npy
  systems, and name no species outside ``type_map``; ``sys_configs`` patterns
  match files whose species are in ``type_map``; ``model_devi_jobs`` point at
  existing ``sys_configs`` and templates;
* the fp input files: ``fp_pp_files`` (and ``fp_orb_files``,
  ``fp_dpks_descriptor``) under ``fp_pp_path``, ``fp_incar``, ``fp_kpt_file``,
  ``external_input_path``;
* machine.json: DP-GEN's schema of it and, for each of train / model_devi /
  fp, dpdispatcher's own schema of ``machine`` and ``resources`` (strict, so a
  misspelled key is named instead of silently ignored), and ``local_root``
  "./" as DP-GEN requires.

All problems are collected and raised together as one :class:`PreflightError`,
one message per problem, each naming the key and the fix. Nothing is written.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .params import AlkpuSettings, ParamError, check_dpgen_schema, kpu_problems, separate

__all__ = ["PreflightError", "Checked", "preflight", "training_problems", "data_problems",
           "fp_problems", "machine_problems"]

TASKS = ("train", "model_devi", "fp")

log = logging.getLogger("dpgen")


class PreflightError(ValueError):
    """One or more problems in param.json / machine.json, each with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.problems, 1))
        return (f"{len(self.problems)} problems in the input (nothing was made or submitted):\n{lines}")


@dataclass
class Checked:
    """The checked input: DP-GEN's param without our keys, our settings, machine.json."""

    jdata: dict
    settings: AlkpuSettings
    mdata: dict


def _load(path: str, what: str) -> dict:
    from dpgen.util import load_file

    if not os.path.isfile(path):
        raise PreflightError([f"{what} {path!r} does not exist (looked for it from {os.getcwd()}); "
                              f"give the path of your {what}."])
    try:
        data = load_file(path)
    except Exception as exc:  # noqa: BLE001 - any parse error: name the file and the cause
        raise PreflightError([f"{what} {path!r} cannot be read as JSON or YAML ({type(exc).__name__}: "
                              f"{exc}); fix its syntax."]) from None
    if not isinstance(data, dict):
        raise PreflightError([f"{what} {path!r} holds a {type(data).__name__}, not a mapping of keys."])
    return data


def preflight(param_file: str, machine_file: str) -> Checked:
    """Check param.json and machine.json; raise :class:`PreflightError` listing every problem."""
    jdata = _load(param_file, "param file")
    mdata = _load(machine_file, "machine file")
    problems: list[str] = []
    settings = None
    try:
        dpgen, settings = separate(jdata)
    except Exception as exc:  # noqa: BLE001 - dargs' errors for our keys
        problems.append(f"param.json: {exc}")
        dpgen = {k: v for k, v in jdata.items() if k not in ("uncertainty", "kpu", "check_interval", "seed")}
    if settings is not None and settings.is_kpu:
        problems += [f"param.json: {p}" for p in kpu_problems(dpgen, settings.kpu)]
    try:
        check_dpgen_schema(dpgen)
    except Exception as exc:  # noqa: BLE001 - dargs' errors in DP-GEN's schema
        problems.append(f"param.json (DP-GEN's own check): {exc}")
    problems += training_problems(dpgen, settings, mdata)
    problems += data_problems(dpgen)
    problems += fp_problems(dpgen)
    problems += machine_problems(mdata)
    if problems:
        raise PreflightError(problems)
    return Checked(dpgen, settings, mdata)


# ------------------------------------------------------------------ training input
def _init_systems(dpgen: dict) -> list[str]:
    prefix = dpgen.get("init_data_prefix", "")
    out = []
    for name in dpgen.get("init_data_sys") or []:
        if isinstance(name, str):
            out.extend(_systems_under(os.path.join(prefix if isinstance(prefix, str) else "", name)))
    return out


def _first_training_input(jinput: dict, dpgen: dict, mdata: dict) -> dict:
    """The training input DP-GEN's make_train writes for the first iteration (its
    _prepare_training_input for DeePMD-kit 2.x/3.x), without DP-GEN's random seeds."""
    jinput = copy.deepcopy(jinput)
    systems = _init_systems(dpgen) or ["init_data"]
    training = jinput.setdefault("training", {})
    if isinstance(training, dict):
        data = training.setdefault("training_data", {})
        if isinstance(data, dict):
            data["systems"] = systems
            old = data.get("batch_size", "")
            if not (isinstance(old, str) and old.startswith("mixed:")):
                data["batch_size"] = [1] * len(systems)  # DP-GEN writes numbers
    model = jinput.get("model")
    if isinstance(model, dict) and "model_dict" not in model:
        model.setdefault("type_map", dpgen.get("type_map"))
        fitting = model.get("fitting_net")
        if isinstance(fitting, dict) and dpgen.get("use_ele_temp", 0) in (1, 2):
            fitting["numb_fparam" if dpgen["use_ele_temp"] == 1 else "numb_aparam"] = 1
    return jinput


def training_problems(dpgen: dict, settings: AlkpuSettings | None, mdata: dict) -> list[str]:
    """DeePMD-kit's own check (``dp train``'s) of the training input(s) DP-GEN will write."""
    training = dpgen.get("default_training_param")
    if isinstance(training, dict):
        inputs = [("default_training_param", training)]
    elif isinstance(training, list) and all(isinstance(t, dict) for t in training):
        inputs = [(f"default_training_param[{i}]", t) for i, t in enumerate(training)]
    else:
        return []  # DP-GEN's own schema names it
    kpu_mode = settings is not None and settings.is_kpu
    if kpu_mode:
        if len(inputs) != 1:
            return []  # kpu_problems names it
        from .driver import kpu_jdata

        inputs = [("default_training_param", kpu_jdata(dpgen, settings.kpu)["default_training_param"])]
    import alkpu_plugin.deepmd_tf.schema  # noqa: F401  (the RLEKF optimizer's keys, as `dp train` has them)
    from deepmd.utils.argcheck import normalize
    from deepmd.utils.compat import update_deepmd_input

    problems = []
    for where, jinput in inputs:
        data = _first_training_input(jinput, dpgen, mdata)
        try:
            data = update_deepmd_input(data, warning=False)
            model = data.get("model") if isinstance(data.get("model"), dict) else {}
            normalize(data, multi_task="model_dict" in model)
        except Exception as exc:  # noqa: BLE001 - dargs' and DeePMD-kit's own messages
            extra = (" (kpu mode adds the kpu/optimizer keys as optimizer, type RLEKF)"
                     if kpu_mode and "optimizer" in str(exc) else "")
            problems.append(
                f"{where}: DeePMD-kit rejects the training input DP-GEN would write from it{extra}: {exc} "
                f"Fix {where}: `dp doc-train-input` lists every key. (`dp train` would stop the same way, "
                "in a training job.)"
            )
        model = jinput.get("model") if isinstance(jinput.get("model"), dict) else {}
        tm, own = dpgen.get("type_map"), model.get("type_map")
        if isinstance(tm, list) and isinstance(own, list) and own[:len(tm)] != tm:
            problems.append(
                f"{where}/model/type_map {own} does not start with type_map {tm}: DP-GEN numbers the "
                "species of the data and the explorations by type_map, the model by its own type_map. "
                f"Remove {where}/model/type_map (DP-GEN then sets it to type_map) or make them equal."
            )
    return problems


# ------------------------------------------------------------------ data
def _systems_under(path: str) -> list[str]:
    """deepmd/npy systems at or below ``path`` (as DP-GEN's expand_sys_str finds them)."""
    p = Path(path)
    if not p.is_dir():
        return []
    found = [str(d) for d in p.rglob("*") if (d / "type.raw").is_file()]
    if (p / "type.raw").is_file():
        found.append(str(p))
    return sorted(found)


def _system_species(system: str) -> tuple[set[str] | None, int]:
    """(species named by the system's type_map.raw that its atoms use, or None; largest type index)."""
    import numpy as np

    types = np.loadtxt(os.path.join(system, "type.raw"), dtype=int, ndmin=1)
    top = int(types.max()) if types.size else -1
    names_file = os.path.join(system, "type_map.raw")
    if not os.path.isfile(names_file):
        return None, top
    names = Path(names_file).read_text().split()
    return {names[t] if t < len(names) else f"<type {t}>" for t in set(types.tolist())}, top


def data_problems(dpgen: dict) -> list[str]:
    """init data and sys_configs exist and use only species of type_map; model_devi_jobs point at them."""
    problems = []
    type_map = dpgen.get("type_map")
    if not (isinstance(type_map, list) and all(isinstance(t, str) for t in type_map)):
        return problems  # DP-GEN's own schema names it
    cwd = os.getcwd()
    prefix = dpgen.get("init_data_prefix", "")
    prefix = prefix if isinstance(prefix, str) else ""
    for i, name in enumerate(dpgen.get("init_data_sys") or []):
        if not isinstance(name, str):
            continue
        path = os.path.join(prefix, name)
        where = f'init_data_sys[{i}] "{name}"'
        if "#" in path:  # an HDF5 file#group
            if not os.path.isfile(path.split("#")[0]):
                problems.append(f"{where}: the HDF5 file {os.path.abspath(path.split('#')[0])} does not exist "
                                f'(init_data_prefix "{prefix}" joined with it, from {cwd}). Correct '
                                "init_data_prefix or init_data_sys.")
            continue
        if not os.path.exists(path):
            problems.append(f'{where}: {os.path.abspath(path)} does not exist (init_data_prefix "{prefix}" '
                            f"joined with it, from {cwd}). Correct init_data_prefix or init_data_sys, or put "
                            "the labelled data there (deepmd/npy: type.raw, type_map.raw, set.*/).")
            continue
        systems = _systems_under(path)
        if not systems:
            problems.append(f"{where}: {os.path.abspath(path)} holds no deepmd/npy system (no type.raw at or "
                            "below it). Point init_data_sys at labelled data in deepmd/npy format.")
        for system in systems:
            try:
                used, top = _system_species(system)
            except (OSError, ValueError) as exc:
                problems.append(f"{where}: {system}/type.raw cannot be read ({exc}); rewrite the system.")
                continue
            if used is not None:
                extra = sorted(used - set(type_map))
                if extra:
                    problems.append(
                        f"{where}: the system {system} has species {extra} (its type_map.raw), which type_map "
                        f"{type_map} lacks. Add them to type_map (and mass_map), or leave this system out.")
            elif top >= len(type_map):
                problems.append(
                    f"{where}: the system {system} uses type index {top} but type_map {type_map} has "
                    f"{len(type_map)} species, and the system has no type_map.raw to name its types. Write "
                    "its type_map.raw, or add the species to type_map.")
    problems += _sys_configs_problems(dpgen, type_map, cwd)
    return problems


def _sys_configs_problems(dpgen: dict, type_map: list[str], cwd: str) -> list[str]:
    problems = []
    configs = dpgen.get("sys_configs")
    if not isinstance(configs, list):
        return problems
    prefix = dpgen.get("sys_configs_prefix", "")
    prefix = prefix if isinstance(prefix, str) else ""
    fmt = dpgen.get("sys_format", "vasp/poscar")
    engine = dpgen.get("model_devi_engine", "lammps")
    for i, patterns in enumerate(configs):
        for pattern in patterns if isinstance(patterns, list) else [patterns]:
            if not isinstance(pattern, str):
                continue
            full = os.path.join(prefix, pattern)
            matches = sorted(glob.glob(full))
            if not matches:
                problems.append(
                    f'sys_configs[{i}] "{pattern}": no file matches {os.path.abspath(full)} '
                    f'(sys_configs_prefix "{prefix}" joined with it, from {cwd}). Correct sys_configs_prefix '
                    "or the pattern, or put the configurations there.")
                continue
            if engine != "lammps" or not isinstance(fmt, str):
                continue
            for conf in matches[:20]:  # the species of the first configurations of each pattern
                problem = _conf_problem(conf, fmt, type_map, f'sys_configs[{i}] "{pattern}"')
                if problem:
                    problems.append(problem)
                    break
    jobs = dpgen.get("model_devi_jobs")
    for j, job in enumerate(jobs if isinstance(jobs, list) else []):
        if not isinstance(job, dict):
            continue
        for idx in job.get("sys_idx", []) if isinstance(job.get("sys_idx"), list) else []:
            if isinstance(idx, int) and not 0 <= idx < len(configs):
                problems.append(f"model_devi_jobs[{j}]/sys_idx {idx}: sys_configs has {len(configs)} entries "
                                f"(indices 0 to {len(configs) - 1}). Correct sys_idx or add the configurations.")
        template = job.get("template")
        if isinstance(template, dict):
            for key in ("lmp", "plm"):
                path = template.get(key)
                if isinstance(path, str) and not os.path.isfile(path):
                    problems.append(f"model_devi_jobs[{j}]/template/{key}: {os.path.abspath(path)} does not "
                                    "exist. Correct the path (relative to the run directory).")
    return problems


def _conf_problem(conf: str, fmt: str, type_map: list[str], where: str) -> str | None:
    import dpdata

    try:
        system = dpdata.System(conf, fmt=fmt)
    except Exception as exc:  # noqa: BLE001 - dpdata's own message
        return (f"{where}: {conf} cannot be read as sys_format {fmt!r} ({type(exc).__name__}: {exc}). Set "
                "sys_format to the configurations' dpdata format.")
    used = [n for n, k in zip(system["atom_names"], system["atom_numbs"]) if k > 0]
    extra = [n for n in used if n not in type_map]
    if extra:
        return (f"{where}: {conf} has species {extra}, which type_map {type_map} lacks. Add them to type_map "
                "(and mass_map), or use configurations of type_map's species.")
    return None


# ------------------------------------------------------------------ fp
_PP_STYLES = ("vasp", "pwscf", "abacus", "siesta")


def fp_problems(dpgen: dict) -> list[str]:
    """The files the labelling step links or reads exist."""
    problems = []
    cwd = os.getcwd()
    pp_path = dpgen.get("fp_pp_path")
    in_pp = [key for key in ("fp_pp_files", "fp_orb_files", "fp_dpks_descriptor") if dpgen.get(key)]
    if in_pp:
        if not isinstance(pp_path, str):
            problems.append(f"{in_pp[0]} is given but fp_pp_path, the directory that holds those files, is not. "
                            "Set fp_pp_path.")
        elif not os.path.isdir(pp_path):
            problems.append(f'fp_pp_path "{pp_path}": {os.path.abspath(pp_path)} is not a directory (from {cwd}). '
                            f"Point fp_pp_path at the directory that holds {', '.join(in_pp)}.")
        else:
            for key in in_pp:
                files = dpgen[key] if isinstance(dpgen[key], list) else [dpgen[key]]
                missing = [f for f in files if isinstance(f, str) and not os.path.isfile(os.path.join(pp_path, f))]
                if missing:
                    problems.append(
                        f"{key}: {', '.join(repr(f) for f in missing)} not found in fp_pp_path "
                        f"({os.path.abspath(pp_path)}). Put the file(s) there, or correct fp_pp_path or {key}.")
    style = dpgen.get("fp_style")
    files = dpgen.get("fp_pp_files")
    type_map = dpgen.get("type_map")
    if (style in _PP_STYLES and isinstance(files, list) and isinstance(type_map, list)
            and len(files) < len(type_map)):
        problems.append(f"fp_pp_files has {len(files)} file(s) for the {len(type_map)} species of type_map "
                        f"{type_map}; fp_style {style!r} takes one per species, in type_map's order. Add the "
                        "missing ones.")
    for key in ("fp_incar", "fp_kpt_file", "external_input_path", "srtab_file_path"):
        path = dpgen.get(key)
        if isinstance(path, str) and not os.path.isfile(path):
            problems.append(f'{key} "{path}": {os.path.abspath(path)} does not exist (from {cwd}). Correct the '
                            "path or create the file.")
    return problems


# ------------------------------------------------------------------ machine.json
def machine_problems(mdata: dict) -> list[str]:
    """Each of train / model_devi / fp has command, machine and resources, which pass
    dpdispatcher's own schema (strict) and name a batch type it has."""
    from dargs import Argument
    from dpdispatcher import Machine, Resources

    problems = []
    version = mdata.get("api_version", "1.0")
    try:
        from packaging.version import Version

        old = Version(str(version)) < Version("1.0")
    except Exception:  # noqa: BLE001 - not a version at all
        old = True
    if old:
        problems.append(f'machine.json: api_version "{version}" is not supported by DP-GEN 0.14; set '
                        '"api_version": "1.0" and use dpdispatcher\'s machine and resources keys.')
    for task in TASKS:
        entry = mdata.get(task)
        if isinstance(entry, (list, tuple)) and entry:
            entry = entry[0]
        if not isinstance(entry, dict):
            problems.append(f"machine.json: {task} is missing (or not a mapping); DP-GEN runs train, "
                            "model_devi and fp jobs: give each a command, a machine and resources.")
            continue
        if not isinstance(entry.get("command"), str):
            problems.append(f"machine.json {task}/command is missing (or not a string); set the command "
                            f"of the {task} jobs (e.g. \"dp\", \"lmp\", or your fp code's).")
        for key, schema in (("machine", lambda d: Machine.arginfo()),
                            ("resources", lambda d: Resources.arginfo(detail_kwargs="batch_type" in d))):
            value = entry.get(key)
            if not isinstance(value, dict):
                problems.append(f"machine.json {task}/{key} is missing (or not a mapping); dpdispatcher needs "
                                f"the {key} of the {task} jobs.")
                continue
            arg: Argument = schema(value)
            try:  # what dpdispatcher checks when the jobs are submitted
                value = arg.normalize_value(copy.deepcopy(value), trim_pattern="_*")
                arg.check_value(value, strict=False)
            except Exception as exc:  # noqa: BLE001 - dpdispatcher's schema, dargs' message
                problems.append(f"machine.json {task}/{key}: {exc} (dpdispatcher's own schema of {key}, which "
                                f"it applies when it submits the jobs). Fix {task}/{key}; dpdispatcher's "
                                "documentation lists its keys.")
                continue
            try:  # keys dpdispatcher does not know, and would ignore
                arg.check_value(value, strict=True)
            except Exception as exc:  # noqa: BLE001
                if "Did you mean" in str(exc):  # a misspelling of one of its keys
                    problems.append(f"machine.json {task}/{key}: {exc} dpdispatcher would ignore the misspelled "
                                    f"key. Correct it in {task}/{key}.")
                else:
                    log.warning("machine.json %s/%s: %s dpdispatcher ignores it.", task, key, exc)
        machine = entry.get("machine")
        if not isinstance(machine, dict):
            continue
        batch = machine.get("batch_type")
        if isinstance(batch, str) and batch not in Machine.subclasses_dict:
            known = sorted(k for k in Machine.subclasses_dict if not k.islower())
            problems.append(f'machine.json {task}/machine/batch_type "{batch}" is not one of dpdispatcher\'s '
                            f"batch types ({', '.join(known)}). Correct it.")
        if machine.get("local_root", "./") != "./":
            problems.append(f'machine.json {task}/machine/local_root is "{machine["local_root"]}"; DP-GEN '
                            'requires "./" (the run directory). Set it to "./".')
    return problems
