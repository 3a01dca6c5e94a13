"""On PYTHONPATH, this makes every Python process (and the jobs it starts) run as if
alkpu-plugin were not installed: its entry points (dpdata's, DeePMD-kit's, the `dpgen run`
switch) are hidden from importlib.metadata before anything loads them.

    PYTHONPATH=tests/without_plugin dpgen run param.json machine.json
"""

import importlib.metadata as _metadata

_original = _metadata.entry_points


def _ours(ep) -> bool:
    return ep.value.split(":")[0].split(".")[0] == "alkpu_plugin"


def _entry_points(**params):
    eps = _original(**params)
    if params:
        return _metadata.EntryPoints(ep for ep in eps if not _ours(ep))
    return eps  # all groups at once: not how dpdata or DeePMD-kit ask


_metadata.entry_points = _entry_points
