"""Structure-aware force rows: one module per descriptor family, behind one registry.

The generic path (:class:`~alkpu_plugin.deepmd_tf.jacobian.ModelJacobian`'s
vectorised autodiff) serves every model. A descriptor family whose structure
gives the same rows faster registers a class here, the way dpdata registers
formats::

    @register
    class SeE2ARows(StructuredRows):
        name = "se_e2_a structure"
        ...

:func:`select` asks each registered class, in order, whether it serves a frozen
model (:meth:`StructuredRows.unsupported_reason`); the first that does builds its
graph, and :meth:`StructuredRows.fill` computes rows with it. Before its rows are
used, the jacobian compares the forces the structure gives with the frozen
graph's (the ``check`` of :meth:`StructuredRows.fill`), and falls back to the
generic path if they differ.
"""

from __future__ import annotations

import json

import numpy as np

from ..frozen import _const

__all__ = ["StructuredRows", "register", "registered", "select", "training_script"]

_REGISTRY: list[type["StructuredRows"]] = []


def training_script(graph_def) -> dict | None:
    """The training input stored in a frozen model (``train_attr/training_script``)."""
    value = _const(graph_def, "train_attr/training_script")
    return None if value is None else json.loads(value.item().decode())


class StructuredRows:
    """What a descriptor family's row builder provides (see the module doc)."""

    #: how the engine names this path in its results
    name = "structure"

    @classmethod
    def unsupported_reason(cls, graph_def, layout, values, script: dict | None) -> str | None:
        """Why this builder cannot serve the model (``None``: it can)."""
        raise NotImplementedError

    def __init__(self, graph_def, layout, weights, get, script: dict):
        raise NotImplementedError

    def fill(self, sess, feed: dict, comps: np.ndarray, sink, budget_bytes: float,
             rows_per_pass: int | None = None, check=None, extra=()) -> tuple[bool, list]:
        """dF_c/dw for the sorted-order components ``comps``, in chunks: ``sink(start, rows)``
        receives the rows of ``comps[start:start + len(rows)]``, in order.

        Chunks hold ``rows_per_pass`` components, or as many as keep the graph's
        intermediates within ``budget_bytes``. ``extra`` tensors (the energy and
        virial rows) are fetched in the same per-frame evaluation; their values are
        returned with whether the rows were made. ``check(feed, mine, chunk)``, when
        given, is called once with the feed and the forces this structure gives for
        the first chunk; when it returns False ``fill`` stops and returns (False,
        values) before any rows reach ``sink`` (the caller then makes every force row).
        """
        raise NotImplementedError


def register(cls: type[StructuredRows]) -> type[StructuredRows]:
    """Class decorator: add a row builder to the registry (once)."""
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
    return cls


def registered() -> list[type[StructuredRows]]:
    return list(_REGISTRY)


def select(graph_def, layout, values) -> tuple[type[StructuredRows] | None, dict | None, str | None]:
    """(builder class, training script, None) for the first builder that serves the model,
    or (None, script, reasons) with every builder's reason for declining."""
    script = training_script(graph_def)
    reasons = []
    for cls in _REGISTRY:
        reason = cls.unsupported_reason(graph_def, layout, values, script)
        if reason is None:
            return cls, script, None
        reasons.append(f"{cls.name}: {reason}")
    return None, script, "; ".join(reasons) or "no structured rows are registered"


# the builders shipped with the plugin register themselves on import
from . import se_e2_a  # noqa: E402,F401
