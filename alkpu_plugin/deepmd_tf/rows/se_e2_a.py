"""Force rows dF/dw of an se_e2_a energy model, from the model's structure.

Generic autodiff (``pfor`` over force components, :mod:`.jacobian`) runs, for
every force component, a backward pass over the whole second-order graph, so
each component pays for the embedding net on *all* neighbour pairs, and a frame
of N atoms costs O(N^2). But a coordinate r_k only moves the environment rows
of the pairs that hold atom k. With the se_e2_a descriptor written as

    T_i = 1/S sum_j R_ij (x) G(s_ij),    D_i = T_i^T T_i[:, :M2],
    E   = c_out sum_i fit(D_i),         U_i = dE/dT_i,

(R the normalised environment rows, s_ij = R_ij[0], S the number of neighbour
slots, G the embedding net) a force component c = (k, alpha) is

    F_c    = sum_i <U_i, tau_ic>,
    tau_ic = 1/S sum_j w_ijk [rho_ij (x) G_ij + R_ij (x) G'_ij rho_ij[0]],
    w_ijk  = [nlist_ij == k] - [i == k],    rho_ij = dR_ij/dr (DeePMD's rmat_deriv, alpha),

so tau_ic is zero unless i is k or holds k in its neighbour list: the
component's *centres*, at most 1 + (atoms within the cut-off) whatever N. Its
weight gradient is a sum over those centres of three exact parts:

* fitting weights: d/dw_f of sum_i <U_i, tau_ic>, a forward-mode tangent
  (tau_ic) through the fitting net at each centre; one copy of the weights per
  component gives every component's gradient from one backward pass. The same
  pass gives V_ic = d/dT_i of that sum.
* embedding weights through T: d/dw_e of 1/S sum_ij <V_ic, R_ij (x) G(s_ij)>
  over the pairs of the centres (V fixed): the net's forward pass once per atom
  (its three components share the pairs) with the shared weights, the backward
  pass per component by hand, so only x^T dz is a product per component;
* embedding weights through tau (only the <= 2S pairs that hold atom k): the
  gradient of 1/S sum_p w_p <U_i(p), Q_p> with G' carried forward-mode.

Work and memory per component are therefore independent of N: a frame costs
O(N) and components are made in chunks whose size a memory budget sets
(:meth:`SeARows.fill`). Per frame, once: the neighbour list, the environment,
T and U for every atom (O(N)), made for blocks of atoms in turn so that the
embedding net's values over the pairs never exist for the whole frame at once.

This file mirrors DeePMD-kit's se_e2_a embedding net and 'ener' fitting net
for tanh float64 models (:meth:`SeARows.unsupported_reason` says what else
falls back to the generic path); before its rows are used,
:class:`~alkpu_plugin.deepmd_tf.jacobian.ModelJacobian` compares the forces
``SeARows.forces`` gives with the frozen graph's.
"""

from __future__ import annotations

import numpy as np

from deepmd.tf.env import tf

from ..frozen import _const
from . import StructuredRows, register, training_script

__all__ = ["SeARows", "unsupported_reason"]

#: the dense path's dT/dw of a frame at most this large (bytes): beyond, its products with V
#: run from memory rather than cache (the paper's Cu model: 2.5 ms per component at 108
#: atoms, 63 MB; 13 ms at 192 atoms, 112 MB, where the pair path takes 5 ms)
DENSE_MAX_BYTES = 80e6


def _exclusions(desc: dict) -> set[tuple[int, int]]:
    """exclude_types as DeePMD-kit reads them: pairs of types, both ways."""
    return {(int(a), int(b)) for a, b in desc.get("exclude_types", [])} | \
        {(int(b), int(a)) for a, b in desc.get("exclude_types", [])}


def _nets(desc: dict, ntypes: int) -> list[tuple[int | None, int, str]]:
    """(centre type or None, neighbour type, variable scope) of every embedding net.

    ``type_one_side``: one net per neighbour type (``filter_type_all``); otherwise one
    per (centre, neighbour) pair (``filter_type_<centre>``) except excluded pairs.
    """
    if desc.get("type_one_side", False):
        return [(None, tj, "filter_type_all") for tj in range(ntypes)]
    excluded = _exclusions(desc)
    return [(ti, tj, f"filter_type_{ti}") for ti in range(ntypes) for tj in range(ntypes)
            if (ti, tj) not in excluded]


def _net_names(scope: str, tj: int, widths: list[int], resnet_dt: bool) -> list[list[str]]:
    """Per layer, the names of its matrix, bias (and idt where DeePMD-kit uses one)."""
    out, n_in = [], 1
    for i, n_out in enumerate(widths, start=1):
        layer = [f"{scope}/matrix_{i}_{tj}", f"{scope}/bias_{i}_{tj}"]
        if resnet_dt and n_out in (n_in, 2 * n_in):
            layer.append(f"{scope}/idt_{i}_{tj}")
        out.append(layer)
        n_in = n_out
    return out


def _fitting_names(widths: list[int], t: int, resnet_dt: bool) -> list[list[str]]:
    """Per layer of type t's fitting net, its weight names (idt where DeePMD-kit uses one:
    ``resnet_dt`` on a hidden layer as wide as the one before), then the final layer's."""
    out = []
    for i, width in enumerate(widths):
        layer = [f"layer_{i}_type_{t}/matrix", f"layer_{i}_type_{t}/bias"]
        if resnet_dt and i >= 1 and width == widths[i - 1]:
            layer.append(f"layer_{i}_type_{t}/idt")
        out.append(layer)
    return out + [[f"final_layer_type_{t}/matrix", f"final_layer_type_{t}/bias"]]


def _model_names(script: dict) -> list[str]:
    """Every weight tensor of an se_e2_a + ener model as DeePMD-kit names it."""
    model = script["model"]
    desc, fit = model["descriptor"], model["fitting_net"]
    ntypes = len(model["type_map"])
    out = []
    for _, tj, scope in _nets(desc, ntypes):
        for layer in _net_names(scope, tj, list(desc.get("neuron", [])), bool(desc.get("resnet_dt", False))):
            out += layer
    for t in range(ntypes):
        for layer in _fitting_names(list(fit.get("neuron", [])), t, bool(fit.get("resnet_dt", False))):
            out += layer
    return out


def unsupported_reason(graph_def, layout, values, script: dict | None = None) -> str | None:
    """Why the structured path cannot serve this model (``None``: it can)."""
    script = training_script(graph_def) if script is None else script
    if script is None:
        return "the frozen model carries no training script"
    model = script.get("model", {})
    desc, fit = model.get("descriptor", {}), model.get("fitting_net", {})
    if desc.get("type") not in ("se_e2_a", "se_a"):
        return f"descriptor {desc.get('type')!r} (only se_e2_a)"
    if fit.get("type", "ener") != "ener" or fit.get("numb_fparam", 0) or fit.get("numb_aparam", 0) \
            or fit.get("atom_ener") or fit.get("layer_name") or fit.get("use_aparam_as_mask"):
        return "a fitting net other than a plain 'ener' one"
    if model.get("type_embedding") or desc.get("stripped_type_embedding") or model.get("spin") \
            or model.get("use_srtab"):
        return "a type embedding, spin or pair table in the model"
    if desc.get("activation_function", "tanh") != "tanh" or fit.get("activation_function", "tanh") != "tanh":
        return "activation functions other than tanh"
    if desc.get("precision", "default") not in ("default", "float64") or \
            fit.get("precision", "default") not in ("default", "float64"):
        return "float32 precision"
    if any(n.op.startswith("Tabulate") for n in graph_def.node):
        return "a compressed (tabulated) embedding"
    if not model.get("type_map"):
        return "no type_map in the model"
    names = set(layout.names)
    expected = set(_model_names(script))
    frozen = {n.name for n in graph_def.node if n.op == "Const"}  # trainable: false weights
    if not names <= expected or not expected <= names | frozen:
        return "weights not named as an se_e2_a + ener model's"
    if any(np.asarray(v).dtype != np.float64 for v in values):
        return "weights that are not float64"
    return None


# ------------------------------------------------------------------ networks
def _mm(x, W):
    """x @ W; W either shared (in, out) or one copy per component (C, in, out)."""
    if W.shape.ndims == 3:
        return tf.matmul(x, W)
    return tf.tensordot(x, W, 1)


def _embed(s, layers, derivative=True, trace=None):
    """DeePMD's embedding net on inputs s: (G, dG/ds), each s.shape + (M1,).

    ``layers``: (matrix, bias, idt or None) per layer, shared or one copy per
    component (then s is (C, pairs)). Without ``derivative``: (G, None). A list
    ``trace`` receives each layer's (input, tanh output, kind, idt) for
    :func:`_weight_jacobian`.
    """
    x = tf.expand_dims(s, -1)
    dx = tf.ones_like(x) if derivative else None
    for W, b, idt in layers:
        n_in, n_out = W.shape.as_list()[-2:]
        h = tf.tanh(_mm(x, W) + b)
        dh = (1.0 - h * h) * _mm(dx, W) if derivative else None
        kind = "add" if n_out == n_in else "concat" if n_out == 2 * n_in else "new"
        if trace is not None:
            trace.append((x, h, kind, idt if kind != "new" else None))
        if idt is not None and kind != "new":
            h = h * idt
            dh = dh * idt if derivative else None
        if kind == "add":
            x, dx = x + h, (dx + dh if derivative else None)
        elif kind == "concat":
            x = tf.concat([x, x], -1) + h
            dx = tf.concat([dx, dx], -1) + dh if derivative else None
        else:
            x, dx = h, dh
    return x, dx


def _fit_tangent(x, dx, layers, final):
    """Tangent of DeePMD's 'ener' fitting output along dx (x: descriptors)."""
    for i, (W, b, idt) in enumerate(layers):
        n_in, n_out = W.shape.as_list()[-2:]
        h = tf.tanh(_mm(x, W) + b)
        dh = (1.0 - h * h) * _mm(dx, W)
        if idt is not None:
            h, dh = h * idt, dh * idt
        if i >= 1 and n_out == n_in:
            x, dx = x + h, dx + dh
        else:
            x, dx = h, dh
    return _mm(dx, final)


def _embed_weight_grads(s, layers, cot, comp):
    """Per-component gradients of sum_p <cot_cp, G(s_q(c)p)> w.r.t. the embedding weights.

    ``s`` (K, pairs): the inputs of K atoms' pairs; ``cot`` (C, pairs, M1): the
    cotangent of each component c at the net's output, on the pairs of its atom
    ``comp[c]``. The forward pass runs once per atom with the shared weights (one
    GEMM per layer over every pair); the backward pass runs per component, by hand
    through DeePMD-kit's layer kinds (new, add, concat; idt), so only x^T dz is a
    product per component. Returns per layer (gW (C, in, out), gb (C, 1, out),
    gidt (C, 1, out) or None), shaped as :func:`_per_component`'s copies.
    """
    trace = []
    _embed(s, layers, derivative=False, trace=trace)
    out = []
    g = cot
    for depth, ((W, _, _), (x, h, kind, idt)) in enumerate(zip(reversed(layers), reversed(trace))):
        hq = tf.gather(h, comp)  # (C, pairs, out)
        if kind == "add":
            gh, skip = g, g
        elif kind == "concat":
            n_in = W.shape.as_list()[0]
            gh, skip = g, g[..., :n_in] + g[..., n_in:]
        else:
            gh, skip = g, None
        gidt = None
        if idt is not None:  # the trace's idt: set where DeePMD-kit's layer has one
            gidt = tf.reduce_sum(gh * hq, axis=1, keepdims=True)
            gh = gh * idt
        gz = gh * (1.0 - hq * hq)
        xq = tf.gather(x, comp)  # (C, pairs, in)
        out.append((tf.matmul(xq, gz, transpose_a=True), tf.reduce_sum(gz, axis=1, keepdims=True), gidt))
        if depth < len(layers) - 1:
            g = tf.tensordot(gz, tf.transpose(W), 1)
            if skip is not None:
                g = g + skip
    return list(reversed(out))


def _weight_jacobian(R, trace, layers, nnei):
    """dT/dw_e per embedding weight of one net, in layout order (matrix, bias, idt per layer).

    ``R`` (n, S_b, 4) the environment rows the net sees; T = 1/nnei sum_j R_j (x) G_j.
    Returns (kind, tensor) pairs: ``("full", (n*4*M1, size))`` or, for the last
    layer where dG/dz is diagonal, ``("diag", (n*4, in, out))`` for the matrix and
    ``("diag", (n*4, out))`` for the bias and the idt.
    """
    nloc, S = tf.shape(R)[0], tf.shape(R)[1]
    Rs = R / nnei  # T carries 1/S: fold it into the small factor once
    m1 = layers[-1][0].shape.as_list()[1]
    out = []
    J = None  # dG/dx_l, (nloc, S, M1, width of x_l)
    last = len(layers) - 1
    for depth, ((W, _, _), (x, h, kind, idt)) in enumerate(zip(reversed(layers), reversed(trace))):
        n_in, n_out = W.shape.as_list()
        d = 1.0 - h * h  # (nloc, S, out)
        dz = d * idt if idt is not None else d  # d(layer output)/dz: the idt scales it
        # [R/S | R/S (x) x_l]: the bias's and the matrix's factor, contracted in one product
        L = tf.concat([Rs, tf.reshape(Rs[:, :, :, None] * x[:, :, None, :], [nloc, S, 4 * n_in])], -1)
        if depth == 0:
            M = tf.matmul(L, dz, transpose_a=True)  # (nloc, 4 + 4 n_in, out)
            KW = tf.reshape(M[:, 4:], [nloc * 4, n_in, n_out])
            Kb = tf.reshape(M[:, :4], [nloc * 4, n_out])
            blocks = [("diag", KW), ("diag", Kb)]
            if idt is not None:
                blocks.append(("diag", tf.reshape(tf.matmul(Rs, h, transpose_a=True), [nloc * 4, n_out])))
            out.append(tuple(blocks))
            Jx = dz[:, :, :, None] * tf.transpose(W)[None, None]  # (nloc, S, M1, in)
            eye = tf.eye(m1, dtype=R.dtype)[None, None]
        else:
            Jz = J * dz[:, :, None, :]  # dG/dz_l, (nloc, S, M1, out)
            B = tf.reshape(Jz, [nloc, S, m1 * n_out])
            M = tf.matmul(L, B, transpose_a=True)  # (nloc, 4 + 4 n_in, M1 out)
            KW = tf.reshape(M[:, 4:], [nloc, 4, n_in, m1, n_out])
            KW = tf.reshape(tf.transpose(KW, [0, 1, 3, 2, 4]), [nloc * 4 * m1, n_in * n_out])
            Kb = tf.reshape(M[:, :4], [nloc * 4 * m1, n_out])
            blocks = [("full", KW), ("full", Kb)]
            if idt is not None:  # dG/d idt = J_l * h
                Jh = tf.reshape(J * h[:, :, None, :], [nloc, S, m1 * n_out])
                blocks.append(("full", tf.reshape(tf.matmul(Rs, Jh, transpose_a=True), [nloc * 4 * m1, n_out])))
            out.append(tuple(blocks))
            if depth == last:
                break  # the input layer: no Jacobian below it is needed
            Jx = tf.tensordot(Jz, tf.transpose(W), 1)  # one GEMM over all pairs
            eye = J
        if kind == "add":
            Jx = Jx + (eye if depth else tf.broadcast_to(eye, tf.shape(Jx)))
        elif kind == "concat":
            skip = eye if depth else tf.broadcast_to(tf.eye(m1, dtype=R.dtype)[None, None],
                                                     [nloc, S, m1, m1])
            Jx = Jx + skip[..., :n_in] + skip[..., n_in:]
        J = Jx
    blocks = []
    for layer in reversed(out):
        blocks += list(layer)
    return blocks


def _per_component(w, C):
    """One copy of a weight per component (gradients w.r.t. it are per component)."""
    shape = w.shape.as_list()
    if len(shape) == 1:
        shape = [1] + shape
    return tf.broadcast_to(tf.reshape(w, shape), tf.concat([[C], shape], 0))


def _copies(layers, C):
    return [(_per_component(W, C), _per_component(b, C), None if idt is None else _per_component(idt, C))
            for W, b, idt in layers]


def _flat(layers):
    return [v for layer in layers for v in layer if v is not None]


@register
class SeARows(StructuredRows):
    """The structured force-row graph, built inside a :class:`ModelJacobian`'s graph.

    ``weights`` are the placeholders of the layout's tensors; ``get(name)`` returns
    the frozen graph's tensor ``name`` as imported there (weights that are not in
    the layout, frozen with ``trainable: false``, are taken from there).

    Several species: atoms arrive sorted by type (DeePMD-kit's order), neighbour
    slots come in blocks of ``sel`` per type; each embedding net sees the centres
    and slots of its types, each fitting net its centres. ``exclude_types`` pairs
    contribute nothing (no net, or masked environment rows with ``type_one_side``).
    """

    name = "se_e2_a structure"
    #: "dense" or "pair" to fix how the embedding part through T is made (tests,
    #: benchmarks); None: per frame, the cheaper (:meth:`dense_path`)
    force_path: str | None = None
    #: how the last frame's embedding part through T was made: "dense" or "pair"
    last_path: str | None = None

    @classmethod
    def unsupported_reason(cls, graph_def, layout, values, script=None):
        return unsupported_reason(graph_def, layout, values, script)

    def __init__(self, graph_def, layout, weights, get, script: dict):
        model = script["model"]
        desc, fitting = model["descriptor"], model["fitting_net"]
        ntypes = self.ntypes = len(model["type_map"])
        sel = [int(s) for s in desc["sel"]]
        S = self.nnei = int(sum(sel))
        self.slot_type = np.repeat(np.arange(ntypes), sel)  # neighbour type of each slot
        slots = self.slots = np.concatenate([[0], np.cumsum(sel)]).astype(int)
        m2 = int(desc["axis_neuron"])
        byname = dict(zip(layout.names, weights))

        def weight(name):
            return byname[name] if name in byname else get(name)

        self.n = int(layout.n)
        ends = np.cumsum([int(np.prod(shape)) for shape in layout.shapes])
        self._offsets = {n: (int(e - np.prod(shape)), int(e))
                         for n, shape, e in zip(layout.names, layout.shapes, ends)}
        widths = self.widths = list(desc["neuron"])
        m1 = int(widths[-1])
        resnet = bool(desc.get("resnet_dt", False))
        one_side = bool(desc.get("type_one_side", False))
        # every embedding net: (centre type or None, neighbour type, names per layer, layers)
        self.nets = []
        for ti, tj, scope in _nets(desc, ntypes):
            names = _net_names(scope, tj, widths, resnet)
            layers = [(weight(ln[0]), weight(ln[1]), weight(ln[2]) if len(ln) > 2 else None) for ln in names]
            self.nets.append((ti, tj, names, layers))
        fits = []
        for t in range(ntypes):
            names = _fitting_names(list(fitting["neuron"]), t, bool(fitting.get("resnet_dt", False)))
            fits.append(([(weight(ln[0]), weight(ln[1]), weight(ln[2]) if len(ln) > 2 else None)
                          for ln in names[:-1]], weight(names[-1][0]), names))
        self.fit_sizes = [m1 * m2] + [int(w) for w in fitting["neuron"]]
        out_std = _const(graph_def, "model_attr/model_attr/t_out_std")
        c_out = np.ravel(out_std) if out_std is not None else np.ones(ntypes)
        c_out = np.broadcast_to(c_out, (ntypes,)) if c_out.size == 1 else c_out[:ntypes]

        # ---- per frame, every atom: environment, embedding, T, U (O(N), fed back to every chunk)
        R = tf.reshape(get("o_rmat"), [-1, S, 4])
        rho = tf.reshape(get("o_rmat_deriv"), [-1, S, 4, 3])
        self.nlist = tf.reshape(get("o_nlist"), [-1, S])
        self.rij = tf.reshape(get("o_rij"), [-1, S, 3])
        nloc = tf.shape(R)[0]
        atype = self.atype = tf.reshape(get("t_type"), [-1])[:nloc]
        counts = tf.reshape(get("t_natoms"), [-1])[2:2 + ntypes]  # atoms per type (sorted by type)
        excluded = _exclusions(desc)
        if one_side and excluded:  # DeePMD-kit masks the environment rows of excluded pairs
            table = np.array([[0.0 if (ti, int(self.slot_type[s])) in excluded else 1.0 for s in range(S)]
                              for ti in range(ntypes)])
            mask = tf.gather(tf.constant(table, R.dtype), atype)
            R, rho = R * mask[:, :, None], rho * mask[:, :, None, None]

        def by_type(x):  # split the atoms axis into the types' blocks
            return tf.split(x, counts, num=ntypes, axis=0)

        R_t = by_type(R)
        self._net_blocks = []  # per net: (name, kind, dT/dw) of its weights in the layout
        for ti, tj, names, layers in self.nets:  # dT/dw of every atom: the dense path only
            Rb = R[:, slots[tj]:slots[tj + 1]] if ti is None else R_t[ti][:, slots[tj]:slots[tj + 1]]
            trace = []
            _embed(Rb[:, :, 0], layers, derivative=False, trace=trace)
            flat_names = [n for layer in names for n in layer]
            self._net_blocks.append([(n, kind, K) for n, (kind, K) in
                                     zip(flat_names, _weight_jacobian(Rb, trace, layers, S)) if n in byname])

        def centre_arrays(t, Rb):
            """T and U = dE/dT (B, 4, M1) of B atoms of type t."""
            T = tf.zeros(tf.stack([tf.shape(Rb)[0], 4, m1]), R.dtype)
            for ti, tj, _, layers in self.nets:  # an excluded pair (no net) contributes nothing
                if ti in (None, t):
                    Rj = Rb[:, slots[tj]:slots[tj + 1]]
                    T += tf.einsum("nsa,nsm->nam", Rj, _embed(Rj[:, :, 0], layers, derivative=False)[0]) / S
            D = tf.reshape(tf.einsum("nam,nak->nmk", T, T[:, :, :m2]), [-1, m1 * m2])
            # dE/dT: the gradient of the fitting output, via its tangent along each T direction
            probe = tf.zeros_like(T)
            dD = tf.reshape(tf.einsum("nam,nak->nmk", probe, T[:, :, :m2])
                            + tf.einsum("nam,nak->nmk", T, probe[:, :, :m2]), [-1, m1 * m2])
            tangent = float(c_out[t]) * tf.reduce_sum(_fit_tangent(D, dD, fits[t][0], fits[t][1]))
            return T, tf.gradients(tangent, probe)[0]

        # made for blocks of atoms in turn (each type's atoms in blocks of at most
        # ``block_atoms``), so that the embedding net's values over the pairs are those of
        # one block, not of the frame (the chunks make G and G' again on their few pairs)
        self.block_atoms = tf.placeholder_with_default(tf.constant(1 << 30), [], name="se_a_block_atoms")
        starts = tf.concat([[0], tf.cumsum(counts)], 0)
        shapes = [[None, 4, m1], [None, 4, m1]]
        parts = [[] for _ in shapes]
        for t in range(ntypes):
            first, n_t = starts[t], counts[t]
            nblk = (n_t + self.block_atoms - 1) // self.block_atoms

            def body(i, *arrays, t=t, first=first, n_t=n_t):
                lo = first + i * self.block_atoms
                hi = tf.minimum(lo + self.block_atoms, first + n_t)
                out = centre_arrays(t, R[lo:hi])
                return (i + 1,) + tuple(a.write(i, x) for a, x in zip(arrays, out))

            arrays = tuple(tf.TensorArray(R.dtype, size=nblk, infer_shape=False,
                                          element_shape=tf.TensorShape(shape)) for shape in shapes)
            _, *arrays = tf.while_loop(lambda i, *_: i < nblk, body, (tf.constant(0),) + arrays,
                                       parallel_iterations=1, back_prop=False)
            for part, a in zip(parts, arrays):
                part.append(a.concat())
        T, U = (tf.stop_gradient(tf.concat(part, axis=0)) for part in parts)
        # kept in variables for the frame's chunks: assigned once per frame (a fed array
        # would be copied again for every chunk), read by every chunk
        stored, self.store = [], []
        for k, t in enumerate([R, rho, T, U]):
            var = tf.Variable(tf.zeros([], t.dtype), validate_shape=False, trainable=False,
                              collections=[], name=f"se_a_frame_{k}")
            self.store.append(tf.assign(var, t, validate_shape=False))
            read = tf.identity(var)
            read.set_shape(t.shape)
            stored.append(read)
        self.store = [self.store[0], tf.group(self.store[1:])]  # R comes back (checked per frame)
        R, rho, T, U = stored

        # ---- per chunk of components (C), of chunk atoms (K), each atom with its A centres
        # cent (K, A): the atoms whose tau the atom moves (itself and the atoms that hold it),
        # by type in blocks of cent_counts[t] (padded: a padded centre has tau = 0)
        self.cent = tf.placeholder(tf.int32, [None, None], name="se_a_centres")
        self.cent_counts = tf.placeholder(tf.int32, [ntypes], name="se_a_centre_counts")
        # the pairs of tau: centre position in cent (pair_loc), centre atom, slot, weight w_ijk
        self.pair_loc = tf.placeholder(tf.int32, [None, None], name="se_a_pair_loc")
        self.pair_i = tf.placeholder(tf.int32, [None, None], name="se_a_pair_i")
        self.pair_j = tf.placeholder(tf.int32, [None, None], name="se_a_pair_j")
        self.pair_w = tf.placeholder(tf.float64, [None, None], name="se_a_pair_w")
        self.comp_q = tf.placeholder(tf.int32, [None], name="se_a_comp_atom")
        self.comp_a = tf.placeholder(tf.int32, [None], name="se_a_comp_dir")
        K, A = tf.shape(self.cent)[0], tf.shape(self.cent)[1]
        C = tf.shape(self.comp_q)[0]
        idx = tf.stack([self.pair_i, self.pair_j], -1)
        Rp, rhop = tf.gather_nd(R, idx), tf.gather_nd(rho, idx)  # (K, P, 4), (K, P, 4, 3)
        # G and G' of the tau pairs: every net on the pairs, each pair taking its own net's
        # (none: an excluded pair contributes nothing)
        s_p = tf.gather_nd(R[:, :, 0], idx)  # (K, P)
        type_j = tf.gather(tf.constant(self.slot_type, tf.int32), self.pair_j)
        type_i = tf.gather(atype, self.pair_i)
        Gs = Gps = tf.zeros(tf.concat([tf.shape(s_p), [m1]], 0), R.dtype)
        for ti, tj, _, layers in self.nets:
            g, gp = _embed(s_p, layers)
            mine = tf.equal(type_j, tj) if ti is None else tf.equal(type_j, tj) & tf.equal(type_i, ti)
            Gs = tf.where(tf.broadcast_to(mine[..., None], tf.shape(g)), g, Gs)
            Gps = tf.where(tf.broadcast_to(mine[..., None], tf.shape(gp)), gp, Gps)
        Q = (tf.einsum("kpax,kpm->kpxam", rhop, Gs)
             + tf.einsum("kpa,kpm,kpx->kpxam", Rp, Gps, rhop[:, :, 0, :]))
        Q = Q * (self.pair_w / S)[:, :, None, None, None]
        seg = tf.range(K)[:, None] * A + self.pair_loc
        tau = tf.reshape(tf.math.unsorted_segment_sum(Q, seg, K * A), [K, A, 3, 4, m1])
        tau = tf.transpose(tau, [0, 2, 1, 3, 4])  # (K, 3, A, 4, M1)
        tau_c = tf.gather_nd(tau, tf.stack([self.comp_q, self.comp_a], -1))  # (C, A, 4, M1)
        cent_c = tf.gather(self.cent, self.comp_q)  # (C, A)
        self.forces = tf.reduce_sum(tau_c * tf.gather(U, cent_c), axis=[1, 2, 3])  # for the self-check
        # T at every centre, one copy per component: dL/dT_c is V_c
        T_c = tf.gather(T, cent_c)  # (C, A, 4, M1)

        # ---- fitting weights and V: the tangent tau_c through each centre type's fitting net
        T2 = T_c[..., :m2]
        Dc = tf.reshape(tf.matmul(T_c, T2, transpose_a=True), [C, A, m1 * m2])
        dDc = tf.reshape(tf.matmul(tau_c, T2, transpose_a=True) + tf.matmul(T_c, tau_c[..., :m2], transpose_a=True),
                         [C, A, m1 * m2])
        g, L_fit, fit_vars, fit_names = {}, [], [], []
        for t, (Dt, dDt) in enumerate(zip(tf.split(Dc, self.cent_counts, num=ntypes, axis=1),
                                           tf.split(dDc, self.cent_counts, num=ntypes, axis=1))):
            layers, final, names = fits[t]
            copies = _copies(layers, C)
            final_c = _per_component(final, C)
            L_fit.append(float(c_out[t]) * tf.reduce_sum(_fit_tangent(Dt, dDt, copies, final_c)))
            for ln, layer in zip(names, copies + [(final_c, None, None)]):
                for n, v in zip(ln, layer):
                    if v is not None:
                        fit_names.append(n)
                        fit_vars.append(v)
        grads = tf.gradients(tf.add_n(L_fit), fit_vars + [T_c])
        for n, grad in zip(fit_names, grads[:-1]):
            g[n] = grad
        V = tf.stop_gradient(grads[-1])  # (C, A, 4, M1)

        # ---- embedding weights: through T (every pair of every centre, V fixed) and through
        # tau (only the pairs that hold atom k), per net with one copy of its weights per component
        V_t = tf.split(V, self.cent_counts, num=ntypes, axis=1)
        g_tau = {}
        cent_t = tf.split(cent_c, self.cent_counts, num=ntypes, axis=1)
        cent_k = tf.split(self.cent, self.cent_counts, num=ntypes, axis=1)
        self.net_pairs, self.net_real = [], []
        for k, (ti, tj, names, layers) in enumerate(self.nets):
            emb_c = _copies(layers, C)
            Vn = V if ti is None else V_t[ti]
            cn = cent_c if ti is None else cent_t[ti]  # (C, A_n)
            # the pairs of the centres (C, pairs) by their flat position in (centre, slot) of this
            # net, each with a multiplicity: the empty slots of a centre share one environment row
            # (DeePMD-kit's normalised zero), so one of them stands for all
            real = tf.placeholder(tf.int32, [None, None], name=f"se_a_net{k}_pairs")
            mult = tf.placeholder(tf.float64, [None, None], name=f"se_a_net{k}_pair_mult")
            real_c, mult_c = tf.gather(real, self.comp_q), tf.gather(mult, self.comp_q)
            Rn = tf.gather(R[:, slots[tj]:slots[tj + 1]], cn)  # (C, A_n, S_b, 4)
            Vt = tf.reshape(tf.matmul(Rn, Vn), [C, -1, m1])  # (C, A_n S_b, M1): V_ic^T R_ij
            Vt = tf.gather(Vt, real_c, batch_dims=1) * (mult_c / S)[:, :, None]
            # the pairs' inputs once per chunk atom (its components share them)
            ck = self.cent if ti is None else cent_k[ti]  # (K, A_n)
            s_k = tf.gather(tf.reshape(tf.gather(R[:, slots[tj]:slots[tj + 1], 0], ck), [K, -1]),
                            real, batch_dims=1)
            # the gradient of 1/S sum <Vt, G> (G's forward per atom, backward per component)
            g_T = _flat(_embed_weight_grads(s_k, layers, Vt, self.comp_q))
            # the tau pairs of this net
            pi = tf.placeholder(tf.int32, [None, None], name=f"se_a_net{k}_pair_i")
            pj = tf.placeholder(tf.int32, [None, None], name=f"se_a_net{k}_pair_j")
            pw = tf.placeholder(tf.float64, [None, None], name=f"se_a_net{k}_pair_w")
            self.net_pairs.append((pi, pj, pw))
            self.net_real.append((real, mult))
            pidx = tf.stack([tf.gather(pi, self.comp_q), tf.gather(pj, self.comp_q)], -1)
            pwc = tf.gather(pw, self.comp_q)  # (C, P)
            Gq, Gpq = _embed(tf.gather_nd(R[:, :, 0], pidx), emb_c)  # (C, P, M1)
            rq = tf.gather(tf.gather_nd(rho, pidx), self.comp_a, axis=3, batch_dims=1)  # (C, P, 4)
            Rq = tf.gather_nd(R, pidx)
            Uq = tf.gather(U, pidx[:, :, 0])  # (C, P, 4, M1)
            Qq = rq[..., None] * Gq[:, :, None, :] + Rq[..., None] * (Gpq * rq[..., :1])[:, :, None, :]
            L_tau = tf.reduce_sum(pwc[:, :, None, None] * Uq * Qq) / S
            flat_names = [n for layer in names for n in layer]
            for n, grad_T, grad_tau in zip(flat_names, g_T, tf.gradients(L_tau, _flat(emb_c))):
                if n in byname:
                    g[n], g_tau[n] = grad_T + grad_tau, grad_tau

        def rows(grads):
            return tf.concat(
                [tf.reshape(grads[n] if grads.get(n) is not None else tf.zeros([C] + w.shape.as_list(), tf.float64),
                            [C, -1]) for n, w in zip(layout.names, weights)], axis=1)

        self.rows = rows(g)
        # without the embedding part through T, which the dense path adds from V and dT/dw
        self.rows_tau, self.V = rows({**g, **g_tau}), V

    # ------------------------------------------------------------ numpy side
    def _empty_rows_shared(self, nlist, atype, R) -> bool:
        """Whether every empty slot of a centre type's block of one neighbour type holds
        the same environment row (true of DeePMD-kit's normalisation; checked per frame)."""
        empty = nlist < 0
        for t in range(self.ntypes):
            for tj in range(self.ntypes):
                a, b = self.slots[tj], self.slots[tj + 1]
                rows = R[atype == t, a:b][empty[atype == t, a:b]]
                if rows.size and np.abs(rows - rows[0]).max() > 0.0:
                    return False
        return True

    def component_bytes(self, n_centres: float, n_pairs: float) -> float:
        """Bytes of the graph's intermediates per component (an estimate, float64).

        Its row and the copies of the weights and their gradients (about 4 n); at each
        of its ``n_centres`` centres T, tau, V (4 M1 each) and the fitting net's
        tangent and backward (about 6 values per input and layer width), and the
        centre's pairs once per embedding layer, forward and backward (about 6 per
        width); the ``n_pairs`` tau pairs, with G' (about 12 per width).
        """
        width = sum(self.widths)
        return 8.0 * (4.0 * self.n + n_centres * (12 * self.widths[-1] + 6 * sum(self.fit_sizes)
                                                  + self.nnei * 6 * width)
                      + n_pairs * 12 * width)

    def block_size(self, budget_bytes: float) -> int:
        """Atoms per block when the frame's T and dE/dT are made: the embedding net's
        intermediates over a block's pairs, about 8 M1 values per pair, within a quarter of
        ``budget_bytes``."""
        per_atom = 8.0 * self.nnei * 8 * self.widths[-1]
        return int(max(1, budget_bytes / 4 // per_atom))

    def frame_bytes(self, natoms: int) -> float:
        """Bytes of the arrays a frame keeps for its chunks: per pair its environment row and
        derivative (16 values); per atom T and dE/dT (4 M1 each)."""
        return 8.0 * natoms * (self.nnei * 16 + 8 * self.widths[-1])

    def chunk_size(self, n_centres: int, n_pairs: int, budget_bytes: float) -> int:
        """Components per graph evaluation whose intermediates fit ``budget_bytes``."""
        return int(max(1, min(4096, budget_bytes // self.component_bytes(n_centres, n_pairs))))

    def fill(self, sess, feed, comps, sink, budget_bytes, rows_per_pass=None, check=None, extra=(),
             virial=False, virial_check=None):
        """Force rows of ``comps``, chunk by chunk to ``sink``; see :meth:`StructuredRows.fill`.

        Once per frame: the neighbour list, the environment, embedding, T and dE/dT
        of every atom (fed back to every chunk of components), with ``extra``; the
        atoms that hold each atom (an inverted neighbour list). With ``virial`` also
        the nine rows dW_ab/dw (:meth:`_virial_rows`), returned third (``None`` if
        ``virial_check`` refused them).
        """
        nlist_t, atype_t = sess.run([self.nlist, self.atype], feed_dict=feed)
        feed[self.block_atoms] = self.block_size(budget_bytes)
        holders = _Holders(nlist_t)
        dense = self.dense_path(nlist_t, atype_t, holders, budget_bytes)
        self.last_path = "dense" if dense else "pair"
        blocks = [[K for _, _, K in net] for net in self._net_blocks] if dense else []
        nlist, atype, rij, (R, _), blocks, extra_values = sess.run(
            [self.nlist, self.atype, self.rij, self.store, blocks, list(extra)], feed_dict=feed)
        counts = np.bincount(atype, minlength=self.ntypes)
        starts = np.concatenate([[0], np.cumsum(counts)])
        frame = (nlist, atype, self._empty_rows_shared(nlist, atype, R), blocks, starts)
        # the frame's own arrays, kept while its chunks run, come out of the budget first
        budget_bytes = max(budget_bytes / 4, budget_bytes - self.frame_bytes(nlist.shape[0]))
        if dense:  # the dense dT/dw stands for the rows' share of the budget
            budget_bytes = max(budget_bytes / 4, budget_bytes - self.dense_bytes(counts))
        n_cent = holders.max_centres()
        n_pairs = nlist.shape[1] + holders.max_held()
        step = int(rows_per_pass) if rows_per_pass else self.chunk_size(n_cent, n_pairs, budget_bytes)
        step = max(1, step)
        for start in range(0, comps.size, step):
            chunk = comps[start : start + step]
            atoms, q = np.unique(chunk // 3, return_inverse=True)
            cent, *rest = holders.chunk(atoms, atype, self.ntypes)
            self._feed_chunk(feed, frame, cent, *rest, q.ravel(), chunk % 3)
            if check is not None and start == 0:
                if not check(feed, sess.run(self.forces, feed_dict=feed), chunk):
                    return False, extra_values, None
            sink(start, self._run_chunk(sess, feed, frame, cent[q.ravel()])[0])
        vir = self._virial_rows(sess, feed, frame, rij, budget_bytes, virial_check) if virial else None
        return True, extra_values, vir

    # -------------------------------------------------- the dense dT/dw path
    def dense_bytes(self, counts) -> float:
        """Bytes of dT/dw of every embedding net for a frame with ``counts`` atoms per type."""
        total = 0.0
        for ti, _, _, _ in self.nets:
            atoms = float(np.sum(counts)) if ti is None else float(counts[ti])
            total += atoms * self._dense_width
        return 8.0 * total

    def dense_path(self, nlist, atype, holders, budget_bytes) -> bool:
        """Whether the embedding part through T is cheaper from dT/dw built once per frame.

        dT_i/dw of every atom and net (4 M1 x the weights below the last layer, and 4 x the
        last layer's) costs memory O(N) and, contracted with every component's V over all
        atoms, work O(N^2); the pair path costs per component a backward pass over its
        centres' pairs, O(N) in all. The dense path is taken for frames where it is the
        cheaper (few atoms, narrow embedding nets) and its dT/dw fits half the budget and
        :data:`DENSE_MAX_BYTES`.
        """
        if self.force_path is not None:
            return self.force_path == "dense"
        counts = np.bincount(atype, minlength=self.ntypes)
        if self.dense_bytes(counts) > min(budget_bytes / 2, DENSE_MAX_BYTES):
            return False
        natoms = int(nlist.shape[0])
        dense = self.dense_bytes(counts) / 8.0  # multiply-adds per component
        pairs = (1.0 + holders.count.mean()) * (float((nlist >= 0).sum()) / max(1, natoms) + len(self.nets))
        widths = [1] + list(self.widths)
        pair = pairs * 3.0 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        # measured on the paper's Cu model, per multiply-add the dense path runs about 1.5x
        # slower at 108 atoms (numpy products with V over all atoms, zeros included, and dT/dw
        # per frame), and several times slower once dT/dw outgrows the caches (192 atoms)
        return 1.5 * dense < pair

    @property
    def _dense_width(self) -> float:
        """dT/dw entries per atom and net: 4 M1 per weight below the last layer, 4 per last-layer weight."""
        widths = [1] + list(self.widths)
        below = sum(a * b + b for a, b in zip(widths[:-2], widths[1:-1]))
        last = widths[-2] * widths[-1] + widths[-1]
        return 4.0 * self.widths[-1] * below + 4.0 * last

    def _run_chunk(self, sess, feed, frame, cent_c):
        """Rows of the fed chunk (and its forces through the structure); on the dense path the
        embedding part through T is added here: V_c . dT/dw per net (numpy BLAS)."""
        nlist, atype, _, blocks, starts = frame
        if not blocks:
            return sess.run([self.rows, self.forces], feed_dict=feed)
        rows, V, forces = sess.run([self.rows_tau, self.V, self.forces], feed_dict=feed)
        C, N = rows.shape[0], nlist.shape[0]
        Vd = np.zeros((C, N, V.shape[2] * V.shape[3]))
        np.add.at(Vd, (np.arange(C)[:, None], cent_c), V.reshape(C, V.shape[1], -1))
        for (ti, _, _, _), net, values in zip(self.nets, self._net_blocks, blocks):
            Vn = Vd if ti is None else Vd[:, starts[ti]:starts[ti + 1]]
            _add_dense(rows, Vn.reshape(C, -1), [(name, kind, K) for (name, kind, _), K in zip(net, values)],
                       self._offsets)
        return rows, forces

    def _feed_chunk(self, feed, frame, cent, counts, loc, pi, pj, pw, q, dirs):
        """Feed one chunk: centres, tau pairs, components (atom in the chunk, direction)."""
        nlist, atype, shared_empty = frame[:3]
        feed.update({self.cent: cent, self.cent_counts: counts, self.pair_loc: loc,
                     self.pair_i: pi, self.pair_j: pj, self.pair_w: pw,
                     self.comp_q: np.asarray(q, np.int32), self.comp_a: np.asarray(dirs, np.int32)})
        offsets = np.concatenate([[0], np.cumsum(counts)])
        first = _first_occurrence(cent, np.repeat(np.arange(self.ntypes), counts), atype)
        for (ti, tj, _, _), placeholders, real in zip(self.nets, self.net_pairs, self.net_real):
            keep = (self.slot_type[pj] == tj) & (pw != 0.0)
            if ti is not None:
                keep &= atype[pi] == ti
            feed.update(zip(placeholders, _compact(pi, pj, pw, keep)))
            cols = slice(None) if ti is None else slice(offsets[ti], offsets[ti + 1])
            filled = nlist[cent[:, cols], self.slots[tj]:self.slots[tj + 1]] >= 0
            feed.update(zip(real, _net_pairs(filled, first[:, cols], shared_empty)))

    def _virial_rows(self, sess, feed, frame, rij, budget_bytes, check=None):
        """dW_ab/dw (9, n), a-major, as nine components whose centres are every atom.

        W_ab = -sum_ij rij_a dE/drij_b, so W_ab = sum_i <U_i, tau_i^ab> with the tau of
        direction b and pair weights rij_a over every pair (the sign of rho): made a block of centres at
        a time (three chunk rows a = 0, 1, 2, with directions b) and summed.
        """
        nlist, atype = frame[:2]
        natoms, nnei = nlist.shape
        real = nlist >= 0
        per_atom = max(1, int(real.sum(axis=1).max()))
        # nine components, each with a block of centres and all their pairs
        fixed = self.component_bytes(0, 0)
        per_centre = self.component_bytes(1, per_atom) - fixed
        block = int(max(1, min(natoms, (budget_bytes / 9 - fixed) // per_centre)))
        rows = np.zeros((9, self.n))
        value = np.zeros(9)
        q, dirs = np.repeat(np.arange(3), 3), np.tile(np.arange(3), 3)
        for first in range(0, natoms, block):
            centres = np.arange(first, min(natoms, first + block))
            ii, jj = np.nonzero(real[centres])
            # centres by type (atoms are sorted by type), a padded one for a type with none
            counts = np.bincount(atype[centres], minlength=self.ntypes)
            pad = np.cumsum(counts == 0)  # padded entries before each type's block, inclusive
            where = np.arange(centres.size) + pad[atype[centres]]
            row = np.zeros(centres.size + int(pad[-1]), np.int32)
            row[where] = centres
            cent = np.broadcast_to(row, (3, row.size)).copy()
            counts = np.maximum(counts, 1).astype(np.int32)
            loc = np.broadcast_to(where[ii].astype(np.int32), (3, ii.size)).copy()
            pi = np.broadcast_to(centres[ii].astype(np.int32), (3, ii.size)).copy()
            pj = np.broadcast_to(jj.astype(np.int32), (3, ii.size)).copy()
            pw = rij[centres[ii], jj].T.astype(np.float64)  # (3, pairs): rij_a
            if ii.size == 0:
                continue
            self._feed_chunk(feed, frame, cent, counts, loc, pi, pj, pw, q, dirs)
            part, forces = self._run_chunk(sess, feed, frame, cent[q])
            rows += part
            value += forces
        if check is not None and not check(value):
            return None
        return rows


def _add_dense(rows: np.ndarray, V: np.ndarray, blocks, offsets) -> None:
    """rows[:, w_e] += V_c . dT/dw_e for the weights of one embedding net (numpy BLAS).

    ``blocks``: (name, kind, dT/dw) with V over the atoms that net sees.
    """
    for name, kind, K in blocks:
        a, b = offsets[name]
        if kind == "full":
            rows[:, a:b] += V @ K
        elif K.ndim == 3:  # last layer's matrix: K[x, p, q] with x = (atom, 4), V[c, x, q]
            Vq = V.reshape(V.shape[0], -1, K.shape[2])
            part = np.matmul(Vq.transpose(2, 0, 1), K.transpose(2, 0, 1))  # (q, c, p)
            rows[:, a:b] += part.transpose(1, 2, 0).reshape(V.shape[0], -1)
        else:  # last layer's bias or idt: K[x, q]
            Vq = V.reshape(V.shape[0], -1, K.shape[1])
            rows[:, a:b] += np.einsum("cxq,xq->cq", Vq, K)


def _compact(pi, pj, pw, keep):
    """The pairs ``keep`` marks, per row, packed to the left (at least one column)."""
    width = max(1, int(keep.sum(axis=1).max()) if keep.size else 1)
    ci = np.zeros((pi.shape[0], width), np.int32)
    cj = np.zeros((pi.shape[0], width), np.int32)
    cw = np.zeros((pi.shape[0], width), np.float64)
    for r in range(pi.shape[0]):
        sel = np.nonzero(keep[r])[0]
        ci[r, : sel.size], cj[r, : sel.size], cw[r, : sel.size] = pi[r, sel], pj[r, sel], pw[r, sel]
    return ci, cj, cw


def _net_pairs(filled: np.ndarray, first: np.ndarray, shared_empty: bool):
    """Flat (centre, slot) positions and multiplicities of a net's pairs, per chunk atom.

    ``filled`` (K, A, S_b): slots with a neighbour; ``first`` (K, A): a centre's first
    occurrence (padded centres repeat one). Each filled slot counts once; with
    ``shared_empty`` the empty slots of a centre are one pair counted as often as
    there are, otherwise every slot is a pair. Rows are padded with multiplicity 0.
    """
    K, A, Sb = filled.shape
    rows = []
    for r in range(K):
        use = first[r][:, None]
        if not shared_empty:
            pos = np.nonzero(np.broadcast_to(use, filled[r].shape).ravel())[0]
            rows.append((pos, np.ones(pos.size)))
            continue
        on = np.nonzero((filled[r] & use).ravel())[0]
        empty = ~filled[r] & use
        count = empty.sum(axis=1)
        has = np.nonzero(count)[0]
        rows.append((np.concatenate([on, has * Sb + np.argmax(empty[has], axis=1)]),
                     np.concatenate([np.ones(on.size), count[has].astype(float)])))
    width = max(1, max(p.size for p, _ in rows))
    pos = np.zeros((K, width), np.int32)
    mult = np.zeros((K, width), np.float64)
    for r, (p, m) in enumerate(rows):
        pos[r, : p.size], mult[r, : m.size] = p, m
    return pos, mult


def _first_occurrence(cent: np.ndarray, column_type: np.ndarray, atype: np.ndarray) -> np.ndarray:
    """(K, A) True where a centre stands for itself: the first time an atom appears in
    its row within its own type's columns. Padding repeats an atom, in its own type's
    columns or, for a type without centres, in that type's columns: never a centre."""
    out = np.zeros(cent.shape, bool)
    for r in range(cent.shape[0]):
        own = np.nonzero(atype[cent[r]] == column_type)[0]
        _, first = np.unique(cent[r, own], return_index=True)
        out[r, own[first]] = True
    return out


class _Holders:
    """The inverted neighbour list of a frame: for each atom k, the (i, j) with nlist[i, j] == k."""

    def __init__(self, nlist: np.ndarray):
        self.nlist = nlist
        flat = nlist.ravel()
        valid = np.nonzero(flat >= 0)[0]
        order = valid[np.argsort(flat[valid], kind="stable")]
        self.start = np.searchsorted(flat[order], np.arange(nlist.shape[0] + 1))
        self.i, self.j = np.divmod(order, nlist.shape[1])
        self.count = np.diff(self.start)

    def max_held(self) -> int:
        return int(self.count.max()) if self.count.size else 0

    def max_centres(self) -> int:
        """An upper bound of the centres of any atom: itself and its holders."""
        return 1 + self.max_held()

    def chunk(self, atoms: np.ndarray, atype: np.ndarray, ntypes: int):
        """Centres and tau pairs of ``atoms``.

        Returns cent (K, A), centre counts per type (ntypes,), and pair arrays (K, P):
        the centre's position in cent, the centre atom, the slot and w_ijk.
        """
        nlist = self.nlist
        per_atom = []
        for k in atoms:
            lo, hi = self.start[k], self.start[k + 1]
            hi_i, hi_j = self.i[lo:hi], self.j[lo:hi]
            other = hi_i != k  # k's own rows that hold k (a periodic image) are in own_j
            own_j = np.nonzero(nlist[k] >= 0)[0]
            own_w = (nlist[k, own_j] == k).astype(float) - 1.0
            centres = np.unique(np.concatenate([[k], hi_i[other]]))
            pi = np.concatenate([np.full(own_j.size, k), hi_i[other]])
            pj = np.concatenate([own_j, hi_j[other]])
            pw = np.concatenate([own_w, np.ones(int(other.sum()))])
            per_atom.append((centres, pi, pj, pw))
        counts = np.ones(ntypes, np.int64)  # at least one (padded) centre of every type
        for centres, *_ in per_atom:
            counts = np.maximum(counts, np.bincount(atype[centres], minlength=ntypes))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        K, A = len(atoms), int(offsets[-1])
        P = max(1, max(p[1].size for p in per_atom))
        cent = np.zeros((K, A), np.int32)
        loc = np.zeros((K, P), np.int32)
        pi = np.zeros((K, P), np.int32)
        pj = np.zeros((K, P), np.int32)
        pw = np.zeros((K, P), np.float64)
        for r, (centres, i, j, w) in enumerate(per_atom):
            # centres are sorted by index, atoms by type: each type's block is contiguous
            ct = atype[centres]
            pos = np.empty(centres.size, np.int64)
            for t in range(ntypes):
                mine = np.nonzero(ct == t)[0]
                pos[mine] = offsets[t] + np.arange(mine.size)
                cent[r, offsets[t] : offsets[t + 1]] = centres[mine[0]] if mine.size else 0
            cent[r, pos] = centres
            loc[r, : i.size] = pos[np.searchsorted(centres, i)]
            pi[r, : i.size], pj[r, : j.size], pw[r, : w.size] = i, j, w
        return cent, counts.astype(np.int32), loc, pi, pj, pw
