"""Weight-Jacobians of a frozen DeePMD-kit model's energy, virial and forces.

The frozen graph (``dp freeze`` output) is imported with its weight constants
replaced by inputs, so TensorFlow can differentiate the model's outputs with
respect to the weights.  Paths that give the same numbers:

* :meth:`ModelJacobian.force_rows`: many force components per graph
  evaluation (``rows_per_pass`` at a time to bound memory); with ``energy`` and
  ``virial`` also dE/dw and the nine dW_ab/dw in the same array. Force rows come
  from a descriptor family's structure when one in :mod:`.rows` serves the model
  (checked against the graph's forces first), otherwise from the backward pass
  vectorised over output directions with TensorFlow's ``pfor`` (generic
  autodiff, any descriptor); :attr:`ModelJacobian.path` says which;
* :meth:`ModelJacobian.force_row_bruteforce`: one backward pass per component,
  the paper's algorithm, kept for tests and benchmarks.

Rows are flat in the Kalman layout (tensor order and C-order flattening of the
trainer, :class:`alkpu_plugin.kalman.BlockLayout`), as float64.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from deepmd.tf.env import default_tf_session_config, tf

from ..kalman import BlockLayout
from . import rows as row_builders
from .frozen import _const, _graph_def, frozen_weights

__all__ = ["ModelJacobian", "Frame", "TypeMapError", "NVIRIAL", "DEFAULT_MEMORY_GB"]

#: GB the row computation may use by default, beyond the model and the frame's arrays
DEFAULT_MEMORY_GB = 2.0

#: forces (eV/A) or virial (eV) below this are round-off (a perfect crystal): the structure's
#: self-check waits for a frame where they can be compared
JUDGE_SCALE = 1e-6

#: rows of the virial: its nine components W_ab, a-major (DeePMD-kit's order)
NVIRIAL = 9


class TypeMapError(ValueError):
    """Configurations hold elements the model does not know."""


@dataclass
class Frame:
    """One configuration, atoms in the caller's order."""

    coord: np.ndarray  # (N, 3)
    box: np.ndarray | None  # (3, 3) or None without periodicity
    atype: np.ndarray  # (N,) model type indices


def _sequential_pfor(graph, pfor, body, iterations):
    """``pfor(body, iterations)`` whose fallback loops run one iteration at a time.

    Ops that ``pfor`` cannot vectorise (DeePMD-kit's ProdForce/ProdVirial gradient
    ops) run inside a ``while_loop`` whose iterations TensorFlow would otherwise run
    up to ten at a time, through the same kernel instance. DeePMD-kit's kernels
    write members of that instance in ``Compute`` and leave their output unset when
    the device member reads neither CPU nor GPU; virial rows computed this way came
    back wrong, rarely and not reproducibly. Here every loop created by this
    ``pfor`` gets ``parallel_iterations = 1`` (no slower measured: Cu-Ni 32 atoms,
    se_atten); the vectorised ops around it are unchanged.
    """
    from tensorflow.core.framework import attr_value_pb2

    before = {op.name for op in graph.get_operations()}
    out = pfor(body, iterations, fallback_to_while_loop=True)
    one = attr_value_pb2.AttrValue(i=1)
    for op in graph.get_operations():
        if op.name not in before and op.type in ("Enter", "RefEnter"):
            op._set_attr("parallel_iterations", one)
    return out


class ModelJacobian:
    """A frozen model whose weights can be differentiated against.

    Parameters
    ----------
    model_path
        Frozen model (``.pb``) of an energy model.
    layout
        The Kalman layout of the model's trainable weights.
    rows_per_pass
        Force components per graph evaluation; ``None``: as many as keep the
        evaluation's intermediates within ``memory_limit``.
    memory_limit
        GB the row computation may use beyond the model and the frame's own
        arrays (the structured path's chunks are sized to it; the generic path's
        from an estimate).
    structured
        Use a registered descriptor structure (:mod:`.rows`) when one serves the
        model (``structured_reason`` says why not, ``None`` when one is used);
        ``False`` forces generic autodiff.
    """

    def __init__(self, model_path: str | os.PathLike, layout: BlockLayout, rows_per_pass: int | None = None,
                 structured: bool = True, memory_limit: float = DEFAULT_MEMORY_GB):
        from tensorflow.python.ops.parallel_for.control_flow_ops import pfor

        import deepmd.tf  # noqa: F401  (loads DeePMD-kit's custom ops)

        self.layout = layout
        self.rows_per_pass = None if rows_per_pass is None else max(1, int(rows_per_pass))
        self.memory_limit = float(memory_limit)
        graph_def = _graph_def(model_path)
        values = frozen_weights(model_path, layout.names)
        tmap = _const(graph_def, "model_attr/tmap")
        self.type_map = tmap.item().decode().split() if tmap is not None else []
        self.ntypes = int(_const(graph_def, "descrpt_attr/ntypes") or len(self.type_map))
        rcut = _const(graph_def, "descrpt_attr/rcut")
        #: the descriptor's cut-off radius (A), None when the graph does not say
        self.rcut = float(np.ravel(rcut)[0]) if rcut is not None else None
        self.graph = tf.Graph()
        with self.graph.as_default():
            self._weights = [
                tf.placeholder(tf.as_dtype(v.dtype), v.shape, name=f"w{i}")
                for i, v in enumerate(values)
            ]
            input_map = {f"{n}:0": w for n, w in zip(layout.names, self._weights)}
            tf.import_graph_def(graph_def, input_map=input_map, name="m")
            get = lambda n: self.graph.get_tensor_by_name(f"m/{n}:0")  # noqa: E731
            self._t = {k: get(f"t_{k}") for k in ("coord", "type", "natoms", "box", "mesh")}
            self._energy = tf.reshape(get("o_energy"), [-1])
            self._force = tf.reshape(get("o_force"), [-1])
            self._virial = tf.reshape(get("o_virial"), [-1])
            self._components = tf.placeholder(tf.int32, [None], name="components")

            def flat(grads):
                return tf.concat(
                    [
                        tf.reshape(tf.cast(g if g is not None else tf.zeros_like(w), tf.float64), [-1])
                        for g, w in zip(grads, self._weights)
                    ],
                    axis=0,
                )

            def row(i):
                return flat(tf.gradients(tf.gather(self._force, self._components[i]), self._weights))

            def virial_row(i):
                return flat(tf.gradients(tf.gather(self._virial, i), self._weights))

            # the vectorised graphs are built on first use (structured models never need
            # the force one, energy-and-force users never the virial one)
            self._rows = None
            self._make_rows = lambda: _sequential_pfor(self.graph, pfor, row, tf.shape(self._components)[0])
            self._virial_rows = None
            self._make_virial_rows = lambda: _sequential_pfor(self.graph, pfor, virial_row, NVIRIAL)
            self._row = None
            self._make_row = lambda: row(0)
            # one virial component at a time (frames without some species: see _one_by_one)
            self._virial_index = tf.placeholder(tf.int32, [], name="virial_index")
            self._virial_row = None
            self._make_virial_row = lambda: virial_row(self._virial_index)
            self._energy_row = flat(tf.gradients(self._energy[0], self._weights))
            self._structure = None
            if structured:
                cls, script, self.structured_reason = row_builders.select(graph_def, layout, values)
                if cls is not None:
                    self._structure = cls(graph_def, layout, self._weights, get, script)
            else:
                self.structured_reason = "switched off"
            self._checked, self.use_structured = False, True
            self._structured_virial, self._virial_checked = self._structure is not None, False
            # set by a check that could not judge (forces or virial too small): check again
            self._undecided = False
        self._weight_feed = dict(zip(self._weights, values))
        config = default_tf_session_config
        self.sess = tf.Session(graph=self.graph, config=config)

    # ------------------------------------------------------------- inputs
    def types_for(self, atom_names: list[str], atom_types: np.ndarray) -> np.ndarray:
        """Model type indices for a dpdata system's atom names and types."""
        if not self.type_map:
            return np.asarray(atom_types, dtype=np.int32)
        missing = [n for n in atom_names if n not in self.type_map]
        used = {atom_names[t] for t in np.unique(atom_types)}
        missing = [n for n in missing if n in used]
        if missing:
            raise TypeMapError(
                f"element(s) {missing} are not in the model's type map {self.type_map}; "
                "use a model trained with these elements, or remove those atoms"
            )
        lookup = np.array([self.type_map.index(n) if n in self.type_map else -1 for n in atom_names])
        return lookup[np.asarray(atom_types)].astype(np.int32)

    def _feed(self, frame: Frame) -> tuple[dict, np.ndarray]:
        order = np.argsort(frame.atype, kind="stable")
        atype = frame.atype[order]
        natoms = np.zeros(self.ntypes + 2, dtype=np.int32)
        natoms[0] = natoms[1] = atype.size
        natoms[2:] = np.bincount(atype, minlength=self.ntypes)[: self.ntypes]
        pbc = frame.box is not None
        feed = {
            self._t["coord"]: np.asarray(frame.coord, dtype=np.float64)[order].reshape(-1),
            self._t["type"]: atype,
            self._t["natoms"]: natoms,
            self._t["box"]: (np.asarray(frame.box, dtype=np.float64).reshape(9) if pbc else np.zeros(9)),
            self._t["mesh"]: np.zeros(6 if pbc else 0, dtype=np.int32),
        }
        feed.update(self._weight_feed)
        return feed, order

    @staticmethod
    def _sorted_components(order: np.ndarray, components: np.ndarray) -> np.ndarray:
        """Flat force components (caller's atom order) -> the graph's sorted order."""
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        comps = np.asarray(components, dtype=np.int64)
        return (inverse[comps // 3] * 3 + comps % 3).astype(np.int32)

    # ------------------------------------------------------------ outputs
    def predict(self, frame: Frame) -> tuple[float, np.ndarray]:
        """Energy and forces (N, 3), atoms in the caller's order."""
        feed, order = self._feed(frame)
        energy, force = self.sess.run([self._energy, self._force], feed_dict=feed)
        out = np.empty((order.size, 3))
        out[order] = force.reshape(-1, 3)
        return float(energy[0]), out

    def energy_row(self, frame: Frame) -> np.ndarray:
        """dE/dw, flat (n,)."""
        feed, _ = self._feed(frame)
        return self.sess.run(self._energy_row, feed_dict=feed)

    @property
    def path(self) -> str:
        """How force rows are made: a structure's name, or generic autodiff and why."""
        if self._structure is not None and self.use_structured:
            return self._structure.name
        return f"generic autodiff: {self.structured_reason or 'switched off'}"

    def predict_virial(self, frame: Frame) -> np.ndarray:
        """The model's virial, the nine components W_ab (DeePMD-kit's convention)."""
        feed, _ = self._feed(frame)
        return self.sess.run(self._virial, feed_dict=feed)

    def virial_rows(self, frame: Frame) -> np.ndarray:
        """dW_ab/dw for the nine virial components, shape (9, n)."""
        return self.force_rows(frame, np.zeros(0, np.int64), virial=True)

    def _run_virial_rows(self, feed) -> np.ndarray:
        if self._one_by_one(feed):
            if self._virial_row is None:
                with self.graph.as_default():
                    self._virial_row = self._make_virial_row()
            return np.stack([self.sess.run(self._virial_row, feed_dict={**feed, self._virial_index: i})
                             for i in range(NVIRIAL)])
        return self.sess.run(self._virial_rows_tensor(), feed_dict=feed)

    def _one_by_one(self, feed) -> bool:
        """Whether the generic rows of this frame go one output at a time: a frame without
        atoms of some species of the model leaves that species' fitting net with no atoms,
        and TensorFlow's vectorised loops (pfor) fail on those empty tensors."""
        return bool((feed[self._t["natoms"]][2:] == 0).any())

    def _run_force_rows(self, feed, chunk) -> np.ndarray:
        """Generic force rows of the sorted components ``chunk``."""
        if not self._one_by_one(feed):
            if self._rows is None:
                with self.graph.as_default():
                    self._rows = self._make_rows()
            feed[self._components] = chunk
            return self.sess.run(self._rows, feed_dict=feed)
        if self._row is None:
            with self.graph.as_default():
                self._row = self._make_row()
        return np.stack([self.sess.run(self._row, feed_dict={**feed, self._components: [c]}) for c in chunk])

    def _virial_rows_tensor(self):
        if self._virial_rows is None:
            with self.graph.as_default():
                self._virial_rows = self._make_virial_rows()
        return self._virial_rows

    def force_rows(self, frame: Frame, components: np.ndarray | None = None,
                   energy: bool = False, virial: bool = False) -> np.ndarray:
        """dF_c/dw for the flat force components c (default: all 3N), shape (m, n).

        With ``energy`` the first row is dE/dw, with ``virial`` the next nine are
        dW_ab/dw (a-major), then the force rows (:meth:`rows_into` streams them
        instead of holding them all).
        """
        ncomp = 3 * frame.atype.size if components is None else len(components)
        out = np.empty((ncomp + int(energy) + NVIRIAL * int(virial), self.layout.n))

        def sink(start, rows):
            out[start : start + rows.shape[0]] = rows

        self.rows_into(frame, sink, components, energy, virial)
        return out

    def rows_into(self, frame: Frame, sink, components: np.ndarray | None = None,
                  energy: bool = False, virial: bool = False) -> int:
        """Hand every row of :meth:`force_rows` to ``sink(start, rows)``, a chunk at a time.

        ``rows`` (m, n) are the rows ``start .. start + m`` of :meth:`force_rows`'
        array; chunks come in no fixed order, each row once. Returns the number of
        rows. Memory: a chunk's rows and the evaluation's intermediates
        (``rows_per_pass`` or ``memory_limit``), never the whole array.
        """
        feed, order = self._feed(frame)
        if components is None:
            components = np.arange(3 * order.size)
        comps = self._sorted_components(order, components)
        head = int(energy) + NVIRIAL * int(virial)
        budget = self.memory_limit * 1e9

        def force_sink(start, rows):
            sink(head + start, rows)

        if self._structure is not None and self.use_structured:
            # the energy row (and the generic virial rows, where the structure's were refused)
            # come in the structure's per-frame evaluation
            own_virial = virial and self._structured_virial
            generic_virial = virial and not own_virial
            fused = generic_virial and not self._one_by_one(feed)
            extra = ([self._energy_row] if energy else []) + ([self._virial_rows_tensor()] if fused else [])
            done, values, vir = self._structure.fill(
                self.sess, dict(feed), comps, force_sink, budget, self.rows_per_pass,
                None if self._checked else self._check, extra, own_virial,
                None if self._virial_checked else (lambda value: self._check_virial(feed, value)))
            decided, self._undecided = not self._undecided, False
            if own_virial:
                if vir is None:  # refused by its check, or the structure's forces were: generic rows
                    vir = self._run_virial_rows(feed)
                else:
                    self._virial_checked = decided
                values = values + [vir]
            elif generic_virial and not fused:
                values = values + [self._run_virial_rows(feed)]
            if values:
                sink(0, np.vstack(values))
            if done:
                self._checked = self._checked or (comps.size > 0 and decided)
                return comps.size + head
        elif energy or virial:
            values = [self.sess.run(self._energy_row, feed_dict=feed)] if energy else []
            if virial:
                values.append(self._run_virial_rows(feed))
            sink(0, np.vstack(values))
        step = self.rows_per_pass or self.generic_rows_per_pass(order.size)
        for start in range(0, comps.size, step):
            force_sink(start, self._run_force_rows(feed, comps[start : start + step]))
        return comps.size + head

    def generic_rows_per_pass(self, natoms: int) -> int:
        """Components per vectorised backward pass within ``memory_limit``: an estimate
        (the intermediates of one component's pass grow with the atoms; about 1.5 MB
        per atom was measured for se_e2_a at the paper model's size)."""
        return int(max(1, min(96, self.memory_limit * 1e9 // (1.5e6 * max(1, natoms)))))

    def _check(self, feed, mine, chunk) -> bool:
        """The structure's forces against the frozen graph's; a mismatch switches it off."""
        graph = self.sess.run(self._force, feed_dict=feed)
        scale = float(np.abs(graph).max())
        if scale < JUDGE_SCALE:  # e.g. a perfect crystal: forces are round-off, nothing to compare
            self._undecided = True
            return True
        if np.abs(mine - graph[chunk]).max() <= 1e-9 * scale:
            return True
        name = self._structure.name
        self._structure = None
        self.structured_reason = f"the {name}'s forces differ from the frozen graph's"
        warnings.warn(f"structured force rows disabled: {self.structured_reason}; "
                      "using generic autodiff", RuntimeWarning)
        return False

    def _check_virial(self, feed, value) -> bool:
        """The structure's virial against the frozen graph's; a mismatch switches its rows off."""
        graph = self.sess.run(self._virial, feed_dict=feed)
        scale = float(np.abs(graph).max())
        if scale < JUDGE_SCALE:
            self._undecided = True
            return True
        if np.abs(value - graph).max() <= 1e-9 * scale:
            return True
        self._structured_virial = False
        warnings.warn(f"the {self._structure.name}'s virial differs from the frozen graph's; "
                      "virial rows by generic autodiff", RuntimeWarning)
        return False

    def force_row_bruteforce(self, frame: Frame, component: int) -> np.ndarray:
        """dF_c/dw for one component: one backward pass (the paper's algorithm)."""
        feed, order = self._feed(frame)
        feed[self._components] = self._sorted_components(order, np.array([component]))
        if self._row is None:
            with self.graph.as_default():
                self._row = self._make_row()
        return self.sess.run(self._row, feed_dict=feed)

    def close(self) -> None:
        self.sess.close()
