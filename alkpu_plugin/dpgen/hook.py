"""`dpgen run param.json machine.json` runs ALKPU when param.json asks for it.

DP-GEN has no plugin hook of its own, but dpdata loads every ``dpdata.plugins``
entry point when it is first imported, and the ``dpgen`` command imports
dpdata before it reads param.json. This module is such an entry point. In a
process that has imported ``dpgen`` (the ``dpgen`` command always has, before
dpdata), it arranges that DP-GEN's run step, ``dpgen.generator.run.gen_run``,
is handed out wrapped: ``dpgen/main.py`` takes ``gen_run`` from that module
once the module has finished loading, so the wrapper is what ``dpgen run``
calls. The wrapper reads param.json:

* without our keys (``"uncertainty"``, ``"kpu"``, ``"seed"``,
  ``"check_interval"``): it calls DP-GEN's own ``gen_run`` with the same
  arguments; DP-GEN's ``run_iter`` and every other function are untouched;
* with them: the same thing as ``alkpu run param.json machine.json`` (every
  input check first, then :func:`alkpu_plugin.dpgen.driver.run`).

Nothing else changes: other programs that import dpdata (``dp train``, dpdata
scripts) get no hook, DP-GEN's other subcommands never call ``gen_run``, and
code that reads ``gen_run`` from the module's namespace or calls ``run_iter``
gets DP-GEN's own functions. If the installed DP-GEN's ``gen_run`` is not what
this module expects (a function that passes ``args.PARAM`` and ``args.MACHINE``
to ``run_iter``), a param.json with our keys stops with one error that names
``alkpu run``; one without them still goes to DP-GEN.

``ALKPU_DPGEN_HOOK=0`` in the environment turns the hook off (``dpgen run``
is then DP-GEN's alone, and our keys are refused by its schema); ``alkpu run``
is the explicit form and works either way.

Importing this module costs a fraction of a millisecond: it imports only
modules that are already loaded (``os``, ``sys``, ``types``); the wrapper
imports the rest when it runs.
"""

from __future__ import annotations

import os
import sys
import types

__all__ = ["install", "enabled", "OUR_KEYS", "ENV_SWITCH", "TARGET"]

TARGET = "dpgen.generator.run"
ENV_SWITCH = "ALKPU_DPGEN_HOOK"
OUR_KEYS = ("uncertainty", "kpu", "seed", "check_interval")  # see params.py


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def install() -> None:
    """Hook DP-GEN's run step in this process (called once, on import)."""
    if not enabled() or "dpgen" not in sys.modules:
        return
    module = sys.modules.get(TARGET)
    if module is not None:  # loading (dpdata imported from its top) or loaded
        _hook_module(module)
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _HookedRunModule(types.ModuleType):
    """DP-GEN's ``dpgen.generator.run``, handing out ``gen_run`` wrapped.

    Only attribute access from outside the module sees the wrapper (``from
    dpgen.generator.run import gen_run``); the module's own code and namespace
    are DP-GEN's.
    """

    def __getattribute__(self, name):
        value = types.ModuleType.__getattribute__(self, name)
        if name == "gen_run":
            return _wrapped(value, self)
        return value


def _hook_module(module: types.ModuleType) -> None:
    if type(module) is types.ModuleType:
        module.__class__ = _HookedRunModule


class _Loader:
    """DP-GEN's own loader of the module, hooking the module before it runs."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _hook_module(module)
        self._loader.exec_module(module)


class _Finder:
    """Takes part in one import only: that of ``dpgen.generator.run``."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once, and never in the way of the real finders
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


_WRAPPERS: dict = {}


def _wrapped(gen_run, module):
    """The run step for ``dpgen run``: ALKPU for a param.json with our keys, else DP-GEN's."""
    if not callable(gen_run):
        return gen_run
    cached = _WRAPPERS.get(id(gen_run))
    if cached is not None and cached.__wrapped__ is gen_run:
        return cached

    def dpgen_run_step(args):
        param = getattr(args, "PARAM", None)
        machine = getattr(args, "MACHINE", None)
        if not (param and machine and enabled() and asks_for_alkpu(param)):
            return gen_run(args)
        from .command import run_from_dpgen

        return run_from_dpgen(args, gen_run, module, param, machine)

    dpgen_run_step.__wrapped__ = gen_run
    dpgen_run_step.__name__ = getattr(gen_run, "__name__", "gen_run")
    dpgen_run_step.__qualname__ = getattr(gen_run, "__qualname__", "gen_run")
    dpgen_run_step.__doc__ = getattr(gen_run, "__doc__", None)
    dpgen_run_step.__module__ = getattr(gen_run, "__module__", TARGET)
    _WRAPPERS[id(gen_run)] = dpgen_run_step
    return dpgen_run_step


def asks_for_alkpu(param_file) -> bool:
    """Whether a param file (JSON or YAML, as DP-GEN reads it) holds one of our keys.

    A file that cannot be read is left to DP-GEN, which says what is wrong with it.
    """
    try:
        from dpgen.util import load_file

        jdata = load_file(param_file)
    except Exception:  # noqa: BLE001 - DP-GEN reports its own file errors
        return False
    return isinstance(jdata, dict) and any(key in jdata for key in OUR_KEYS)


install()
