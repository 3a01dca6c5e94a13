"""Weight-Jacobians of a frozen DeePMD-kit model's energy and forces.

The frozen graph (``dp freeze`` output) is imported with its weight constants
replaced by inputs, so TensorFlow can differentiate the model's outputs with
respect to the weights.  Three paths give the same numbers:

* :meth:`ModelJacobian.force_rows`: many force components per graph
  evaluation (``rows_per_pass`` at a time to bound memory). For se_e2_a energy
  models from the model's structure (:mod:`.se_a_rows`, checked against the
  graph's forces first); otherwise the backward pass vectorised over output
  directions with TensorFlow's ``pfor`` (generic autodiff);
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
from .frozen import _const, _graph_def, frozen_weights
from .se_a_rows import SeARows, training_script, unsupported_reason

__all__ = ["ModelJacobian", "Frame", "TypeMapError"]


class TypeMapError(ValueError):
    """Configurations hold elements the model does not know."""


@dataclass
class Frame:
    """One configuration, atoms in the caller's order."""

    coord: np.ndarray  # (N, 3)
    box: np.ndarray | None  # (3, 3) or None without periodicity
    atype: np.ndarray  # (N,) model type indices


class ModelJacobian:
    """A frozen model whose weights can be differentiated against.

    Parameters
    ----------
    model_path
        Frozen model (``.pb``) of an energy model.
    layout
        The Kalman layout of the model's trainable weights.
    rows_per_pass
        Force components per graph evaluation (memory vs speed).
    structured
        Use the se_e2_a structure when the model allows it (``structured_reason``
        says why not, ``None`` when it is used); ``False`` forces generic autodiff.
    """

    def __init__(self, model_path: str | os.PathLike, layout: BlockLayout, rows_per_pass: int = 96,
                 structured: bool = True):
        from tensorflow.python.ops.parallel_for.control_flow_ops import pfor

        import deepmd.tf  # noqa: F401  (loads DeePMD-kit's custom ops)

        self.layout = layout
        self.rows_per_pass = int(rows_per_pass)
        graph_def = _graph_def(model_path)
        values = frozen_weights(model_path, layout.names)
        tmap = _const(graph_def, "model_attr/tmap")
        self.type_map = tmap.item().decode().split() if tmap is not None else []
        self.ntypes = int(_const(graph_def, "descrpt_attr/ntypes") or len(self.type_map))
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

            # the generic vectorised graph is built on first use (structured models never need it)
            self._rows = None
            self._make_rows = lambda: pfor(row, tf.shape(self._components)[0], fallback_to_while_loop=True)
            self._row = None
            self._make_row = lambda: row(0)
            self._energy_row = flat(tf.gradients(self._energy[0], self._weights))
            self.structured_reason = unsupported_reason(graph_def, layout, values) if structured \
                else "switched off"
            self._se_a, self._checked, self.use_structured = None, False, True
            ends = np.cumsum([int(np.prod(shape)) for shape in layout.shapes])
            self._offsets = {n: (int(e - np.prod(shape)), int(e))
                             for n, shape, e in zip(layout.names, layout.shapes, ends)}
            if self.structured_reason is None:
                self._se_a = SeARows(graph_def, layout, self._weights, get, training_script(graph_def))
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

    def force_rows(self, frame: Frame, components: np.ndarray | None = None,
                   energy: bool = False) -> np.ndarray:
        """dF_c/dw for the flat force components c (default: all 3N), shape (m, n).

        With ``energy`` the result has one more row, first: dE/dw (shape (1 + m, n)),
        so that one quadratic-form call reads P once for the energy and the forces.
        """
        feed, order = self._feed(frame)
        if components is None:
            components = np.arange(3 * order.size)
        comps = self._sorted_components(order, components)
        out = np.empty((comps.size + int(energy), self.layout.n))
        if self._se_a is not None and self.use_structured:
            done = self._structured_rows(dict(feed), comps, out, energy)
            if done is not None:
                return done
        if energy:
            out[0] = self.sess.run(self._energy_row, feed_dict=feed)
        if self._rows is None:
            with self.graph.as_default():
                self._rows = self._make_rows()
        force = out[int(energy):]
        for start in range(0, comps.size, self.rows_per_pass):
            chunk = comps[start : start + self.rows_per_pass]
            feed[self._components] = chunk
            force[start : start + chunk.size] = self.sess.run(self._rows, feed_dict=feed)
        return out

    def _structured_rows(self, feed, comps, out, energy):
        se = self._se_a
        kinds = [kind for kind, _ in se.jacobian_blocks]
        # once per frame: the neighbour list, dT/dw_e, the environment, embedding and
        # dE/dT (fed back to every chunk), and dE/dw when asked for
        fetch = [se.nlist, [k for _, k in se.jacobian_blocks], se.frame_tensors]
        nlist, blocks, per_frame, *e_row = self.sess.run(
            fetch + ([self._energy_row] if energy else []), feed_dict=feed)
        blocks = list(zip(kinds, blocks))
        feed.update(zip(se.frame_tensors, per_frame))
        if energy:
            out[0] = e_row[0]
        force = out[int(energy):]
        for start in range(0, comps.size, self.rows_per_pass):
            chunk = comps[start : start + self.rows_per_pass]
            atoms, q = np.unique(chunk // 3, return_inverse=True)
            pi, pj, pw = se.pairs(nlist, atoms)
            feed.update({se.pair_i: pi, se.pair_j: pj, se.pair_w: pw,
                         se.comp_q: q.astype(np.int32), se.comp_a: (chunk % 3).astype(np.int32)})
            if not self._checked:
                mine, graph = self.sess.run([se.forces, self._force], feed_dict=feed)
                scale = max(float(np.abs(graph).max()), 1e-300)
                if not np.abs(mine - graph[chunk]).max() <= 1e-9 * scale:
                    self._se_a = None
                    self.structured_reason = "its forces differ from the frozen graph's"
                    warnings.warn(f"structured se_e2_a force rows disabled: {self.structured_reason}; "
                                  "using generic autodiff", RuntimeWarning)
                    return None
                self._checked = True
            rows, V = self.sess.run([se.rows, se.V], feed_dict=feed)
            se.add_dense(rows, V, blocks, self._offsets)
            force[start : start + chunk.size] = rows
        return out

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
