"""What `alkpu run` and `dpgen run` (with our keys) do: check every input, then run the loop."""

from __future__ import annotations

import inspect
import logging
import sys

__all__ = ["run_checked", "run_from_dpgen", "expected_errors", "DpgenInternalsError"]


class DpgenInternalsError(RuntimeError):
    """The installed DP-GEN's run step is not the one the `dpgen run` switch knows."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean: the input or a file is wrong, and the message says what to do."""
    from dargs.dargs import ArgumentError

    from ..deepmd_tf.frozen import StateNotFoundError
    from ..kalman import KalmanStateError, LayoutMismatchError
    from ..kpu_engine import InputError
    from .jobs import FailedLabelsError, JobFailedError

    return (InputError, KalmanStateError, LayoutMismatchError, StateNotFoundError,
            FileNotFoundError, ValueError, ArgumentError, DpgenInternalsError, JobFailedError, FailedLabelsError)


def run_checked(param_file: str, machine_file: str) -> None:
    """Every input check (:func:`.preflight.preflight`), then the loop (:func:`.driver.run`).

    Nothing is made or submitted when a check fails.
    """
    from .driver import run
    from .preflight import preflight

    preflight(param_file, machine_file)
    run(param_file, machine_file)


def check_dpgen_internals(gen_run, module) -> None:
    """The run step the switch replaces must be DP-GEN 0.14's: ``gen_run(args)`` handing
    ``args.PARAM`` and ``args.MACHINE`` to ``run_iter(param_file, machine_file)``."""
    why = []
    code = getattr(gen_run, "__code__", None)
    if code is None:
        why.append("dpgen.generator.run.gen_run is not a Python function")
    elif not {"run_iter", "PARAM", "MACHINE"} <= set(code.co_names):
        why.append("dpgen.generator.run.gen_run no longer passes args.PARAM and args.MACHINE to run_iter")
    run_iter = getattr(module, "run_iter", None)
    try:
        params = list(inspect.signature(run_iter).parameters) if callable(run_iter) else None
    except (TypeError, ValueError):
        params = None
    if not params or len(params) != 2:
        why.append("dpgen.generator.run.run_iter(param_file, machine_file) is missing or takes other arguments")
    if why:
        import dpgen

        raise DpgenInternalsError(
            f"the installed DP-GEN ({getattr(dpgen, '__version__', 'unknown version')}) is not the one "
            f"the `dpgen run` switch knows ({'; '.join(why)}), so `dpgen run` cannot run ALKPU for this "
            "param.json. Run the same loop with `alkpu run param.json machine.json` (same arguments, "
            "files and record.dpgen), or install DP-GEN 0.14.0."
        )


def run_from_dpgen(args, gen_run, module, param_file: str, machine_file: str) -> None:
    """`dpgen run` with a param.json that holds our keys: what `alkpu run` does.

    Errors in the input (or in a file a step needs) print one message, as `alkpu run`
    prints them, and exit with status 2.
    """
    errors = expected_errors()
    try:
        check_dpgen_internals(gen_run, module)
        from dpgen import dlog

        from .driver import run
        from .preflight import preflight

        if getattr(args, "debug", False):
            dlog.setLevel(logging.DEBUG)
        preflight(param_file, machine_file)
        dlog.info("start running (ALKPU: param.json holds alkpu-plugin's keys)")
        run(param_file, machine_file)
        dlog.info("finished")
    except errors as exc:
        print(f"dpgen run: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
