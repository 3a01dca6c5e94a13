"""Force rows dF/dw of an se_e2_a energy model, from the model's structure.

Generic autodiff (``pfor`` over force components, :mod:`.jacobian`) runs, for
every force component, a backward pass over the whole second-order graph, so
each component pays for the embedding net on *all* neighbour pairs. But a
coordinate r_k only moves the environment rows of the pairs that hold atom k.
With the se_e2_a descriptor written as

    T_i = 1/S sum_j R_ij (x) G(s_ij),    D_i = T_i^T T_i[:, :M2],
    E   = c_out sum_i fit(D_i),         U_i = dE/dT_i,

(R the normalised environment rows, s_ij = R_ij[0], S the number of neighbour
slots, G the embedding net) a force component c = (k, alpha) is

    F_c    = sum_i <U_i, tau_ic>,
    tau_ic = 1/S sum_j w_ijk [rho_ij (x) G_ij + R_ij (x) G'_ij rho_ij[0]],
    w_ijk  = [nlist_ij == k] - [i == k],    rho_ij = dR_ij/dr (DeePMD's rmat_deriv, alpha),

and its weight gradient splits into three exact parts:

* fitting weights: d/dw_f of sum_i <U_i, tau_ic>, a forward-mode tangent
  (tau_c) through the fitting net; one copy of the weights per component gives
  every component's gradient from one backward pass. The same pass gives
  V_c = d/dT of that sum.
* embedding weights through T (every pair): V_c . dT/dw_e, where dT/dw_e is
  built once per frame (for the last layer in a compact form, since dG/dz is
  diagonal there) and applied with one GEMM per weight.
* embedding weights through tau (only the <= 2S pairs that hold atom k): the
  gradient of 1/S sum_p w_p <U_i(p), Q_p> with G' carried forward-mode, again
  with one copy of the weights per component.

This file mirrors DeePMD-kit's se_e2_a embedding net and 'ener' fitting net
for single-element float64 models (:meth:`SeARows.unsupported_reason` says what
else falls back to the generic path); before its rows are used,
:class:`~alkpu_plugin.deepmd_tf.jacobian.ModelJacobian` compares the forces
``SeARows.forces`` gives with the frozen graph's.
"""

from __future__ import annotations

import numpy as np

from deepmd.tf.env import tf

from ..frozen import _const
from . import StructuredRows, register, training_script

__all__ = ["SeARows", "unsupported_reason"]


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




def _embed(s, layers, keep=False):
    """DeePMD's embedding net on inputs s (any shape): (G, dG/ds), each s.shape + (M1,).

    ``layers``: (matrix, bias, idt or None) per layer. With ``keep`` also each
    layer's (input, tanh output, kind, idt) for :func:`_weight_jacobian`.
    """
    x = tf.expand_dims(s, -1)
    dx = tf.ones_like(x)
    trace = []
    for W, b, idt in layers:
        n_in, n_out = W.shape.as_list()[-2:]
        h = tf.tanh(_mm(x, W) + b)
        dh = (1.0 - h * h) * _mm(dx, W)
        kind = "add" if n_out == n_in else "concat" if n_out == 2 * n_in else "new"
        trace.append((x, h, kind, idt if kind != "new" else None))
        if idt is not None and kind != "new":
            h, dh = h * idt, dh * idt
        if kind == "add":
            x, dx = x + h, dx + dh
        elif kind == "concat":
            x, dx = tf.concat([x, x], -1) + h, tf.concat([dx, dx], -1) + dh
        else:
            x, dx = h, dh
    return (x, dx, trace) if keep else (x, dx)


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


def _fit_rows(D, dD, dz0, layers, final, c_out):
    """Per-component gradients of L_c = c_out sum_i <grad fit(D_i), dD_ic>, by hand.

    D (n, in) is shared, dD (n, C, in) one tangent per component (atom-major, so
    that every per-component product below is one GEMM with a shared operand);
    dz0 = dD @ W_0 (n, C, out_0), the first layer's tangent, which the caller
    forms more cheaply than this product. The forward and backward passes of the
    plain network are shared. Returns ({layer: (dW (C, in, out), db (C, out),
    didt (C, out) or None)}, dL/d(final matrix) (C, n_L, 1), dL_c/dz_0 (n, C, out_0),
    dL/d(dD) (n, in)).
    """
    n, C = tf.shape(dD)[0], tf.shape(dD)[1]

    def gemm(x, W):  # (n, C, i) x (i, o) as one GEMM
        return tf.reshape(tf.matmul(tf.reshape(x, [-1, tf.shape(x)[-1]]), W), [n, C, -1])

    x, dx, saved = D, dD, []
    for i, (W, b, idt) in enumerate(layers):
        n_in, n_out = W.shape.as_list()
        h = tf.tanh(tf.matmul(x, W) + b)
        d = 1.0 - h * h
        dz = dz0 if i == 0 else gemm(dx, W)
        dh = d[:, None, :] * dz
        res = i >= 1 and n_out == n_in
        saved.append((x, dx, h, d, dz, dh, res))
        a, da = (h * idt, dh * idt) if idt is not None else (h, dh)
        x, dx = (x + a, dx + da) if res else (a, da)
    g_final = c_out * tf.reduce_sum(dx, axis=0)[:, :, None]  # (C, n_L, 1)
    xbar = None  # dL_c/dx_l, per component (n, C, width)
    dxbar = c_out * tf.broadcast_to(tf.transpose(final), tf.shape(x))  # dL/d(dx_l), shared (n, width)
    grads = {}
    for i in reversed(range(len(layers))):
        W, b, idt = layers[i]
        n_in, n_out = W.shape.as_list()
        x, dx, h, d, dz, dh, res = saved[i]
        abar, dabar = xbar, dxbar
        g_idt = None
        if idt is not None:
            g_idt = tf.reduce_sum(dabar[:, None, :] * dh, axis=0)
            if abar is not None:
                g_idt += tf.reduce_sum(abar * h[:, None, :], axis=0)
            hbar = None if abar is None else abar * idt
            dhbar = dabar * idt
        else:
            hbar, dhbar = abar, dabar
        dzbar = dhbar * d  # shared (n, out)
        hbar_c = (-2.0 * h * dhbar)[:, None, :] * dz  # through d = 1 - h^2
        if hbar is not None:
            hbar_c += hbar
        zbar = hbar_c * d[:, None, :]  # per component (n, C, out)
        # dW_c = dx_c^T dzbar + x^T zbar_c: two plain GEMMs over the atoms (the second with
        # all components side by side, then put component-major: a batched product with the
        # shared x ran at a third of the speed of the plain one here)
        g1 = tf.reshape(tf.matmul(tf.reshape(dx, [n, -1]), dzbar, transpose_a=True), [C, n_in, n_out])
        g2 = tf.transpose(tf.reshape(tf.matmul(x, tf.reshape(zbar, [n, -1]), transpose_a=True),
                                     [n_in, C, n_out]), [1, 0, 2])
        grads[i] = (g1 + g2, tf.reduce_sum(zbar, axis=0), g_idt)
        dx_prev_bar = tf.matmul(dzbar, W, transpose_b=True)
        if i == 0:  # dL_c/dD itself is not needed: the caller goes through zbar_0
            return grads, g_final, zbar, dx_prev_bar
        x_prev_bar = gemm(zbar, tf.transpose(W))
        if res:
            x_prev_bar += abar if abar is not None else 0.0
            dx_prev_bar += dabar
        xbar, dxbar = x_prev_bar, dx_prev_bar


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


@register
class SeARows(StructuredRows):
    """The structured force-row graph, built inside a :class:`ModelJacobian`'s graph.

    ``weights`` are the placeholders of the layout's tensors; ``get(name)`` returns
    the frozen graph's tensor ``name`` as imported there (weights that are not in
    the layout, frozen with ``trainable: false``, are taken from there).

    Several species: atoms arrive sorted by type (DeePMD-kit's order), neighbour
    slots come in blocks of ``sel`` per type; each embedding net sees its block of
    atoms and slots, each fitting net its atoms. ``exclude_types`` pairs contribute
    nothing (no net, or masked environment rows with ``type_one_side``).
    """

    name = "se_e2_a structure"

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
        slots = np.concatenate([[0], np.cumsum(sel)]).astype(int)
        m2 = int(desc["axis_neuron"])
        byname = dict(zip(layout.names, weights))

        def weight(name):
            return byname[name] if name in byname else get(name)

        ends = np.cumsum([int(np.prod(shape)) for shape in layout.shapes])
        self._offsets = {n: (int(e - np.prod(shape)), int(e))
                         for n, shape, e in zip(layout.names, layout.shapes, ends)}
        widths = list(desc["neuron"])
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
        out_std = _const(graph_def, "model_attr/model_attr/t_out_std")
        c_out = np.ravel(out_std) if out_std is not None else np.ones(ntypes)
        c_out = np.broadcast_to(c_out, (ntypes,)) if c_out.size == 1 else c_out[:ntypes]

        # ---- per frame: environment, embedding, T, U, dT/dw_e
        R = tf.reshape(get("o_rmat"), [-1, S, 4])
        rho = tf.reshape(get("o_rmat_deriv"), [-1, S, 4, 3])
        self.nlist = tf.reshape(get("o_nlist"), [-1, S])
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
        G_parts = [[] for _ in range(ntypes)]  # per centre type: (neighbour type, G, G')
        self._net_blocks = []  # per net: (name, kind, dT/dw) of its weights in the layout
        for ti, tj, names, layers in self.nets:
            Rb = R[:, slots[tj]:slots[tj + 1]] if ti is None else R_t[ti][:, slots[tj]:slots[tj + 1]]
            G, Gp, trace = _embed(Rb[:, :, 0], layers, keep=True)
            if ti is None:
                for t, (g_t, gp_t) in enumerate(zip(by_type(G), by_type(Gp))):
                    G_parts[t].append((tj, g_t, gp_t))
            else:
                G_parts[ti].append((tj, G, Gp))
            blocks = _weight_jacobian(Rb, trace, layers, S)
            flat_names = [n for layer in names for n in layer]
            self._net_blocks.append([(n, kind, K) for n, (kind, K) in zip(flat_names, blocks)
                                     if n in self._offsets])
        m1 = int(widths[-1])
        G_rows, Gp_rows = [], []
        for t in range(ntypes):
            have = {tj: (g, gp) for tj, g, gp in G_parts[t]}
            g_cols, gp_cols = [], []
            for tj in range(ntypes):
                if tj in have:
                    g_cols.append(have[tj][0])
                    gp_cols.append(have[tj][1])
                else:  # an excluded pair: no net, no contribution
                    zeros = tf.zeros(tf.stack([counts[t], sel[tj], m1]), R.dtype)
                    g_cols.append(zeros)
                    gp_cols.append(zeros)
            G_rows.append(tf.concat(g_cols, axis=1))
            Gp_rows.append(tf.concat(gp_cols, axis=1))
        G, Gp = tf.concat(G_rows, axis=0), tf.concat(Gp_rows, axis=0)
        T = tf.stop_gradient(tf.einsum("nsa,nsm->nam", R, G) / S)
        D = tf.reshape(tf.einsum("nam,nak->nmk", T, T[:, :, :m2]), [nloc, m1 * m2])
        # dE/dT: the gradient of the fitting output, via its tangent along each T direction
        probe = tf.zeros_like(T)
        dD = tf.reshape(tf.einsum("nam,nak->nmk", probe, T[:, :, :m2])
                        + tf.einsum("nam,nak->nmk", T, probe[:, :, :m2]), [nloc, m1 * m2])
        tangent = tf.add_n([float(c_out[t]) * tf.reduce_sum(_fit_tangent(Dt, dDt, fits[t][0], fits[t][1]))
                            for t, (Dt, dDt) in enumerate(zip(by_type(D), by_type(dD)))])
        U = tf.stop_gradient(tf.gradients(tangent, probe)[0])
        # A[i, (a, m), o] = d z_0,o / d T_i[a, m] (the first fitting layer's pre-activation):
        # sum_k T2[a, k] W_0[(m, k), o] + [m < M2] sum_m' T[a, m'] W_0[(m', m), o]
        A_t = []
        for t, Tt in enumerate(by_type(T)):
            W0 = tf.reshape(fits[t][0][0][0], [m1, m2, -1])
            A2 = tf.pad(tf.einsum("nam,mko->nako", Tt, W0), [[0, 0], [0, 0], [0, m1 - m2], [0, 0]])
            A_t.append(tf.reshape(tf.einsum("nak,mko->namo", Tt[:, :, :m2], W0) + A2, [-1, 4 * m1,
                                                                                        W0.shape[-1]]))
        A = tf.concat(A_t, axis=0)
        # computed once per frame and fed back to every chunk of components (a fed
        # tensor's inputs are not evaluated again)
        self.frame_tensors = [R, rho, G, Gp, T, D, U, A]

        # ---- per chunk of components: pairs that hold each requested atom, and tau
        self.pair_i = tf.placeholder(tf.int32, [None, None], name="se_a_pair_i")
        self.pair_j = tf.placeholder(tf.int32, [None, None], name="se_a_pair_j")
        self.pair_w = tf.placeholder(tf.float64, [None, None], name="se_a_pair_w")
        self.comp_q = tf.placeholder(tf.int32, [None], name="se_a_comp_atom")
        self.comp_a = tf.placeholder(tf.int32, [None], name="se_a_comp_dir")
        K = tf.shape(self.pair_i)[0]
        C = tf.shape(self.comp_q)[0]
        idx = tf.stack([self.pair_i, self.pair_j], -1)
        Rp, rhop = tf.gather_nd(R, idx), tf.gather_nd(rho, idx)  # (K, P, 4), (K, P, 4, 3)
        Gs, Gps = tf.stop_gradient(tf.gather_nd(G, idx)), tf.stop_gradient(tf.gather_nd(Gp, idx))
        Q = (tf.einsum("kpax,kpm->kpxam", rhop, Gs)
             + tf.einsum("kpa,kpm,kpx->kpxam", Rp, Gps, rhop[:, :, 0, :]))
        Q = Q * (self.pair_w / S)[:, :, None, None, None]
        seg = tf.range(K)[:, None] * nloc + self.pair_i
        tau = tf.reshape(tf.math.unsorted_segment_sum(Q, seg, K * nloc), [K, nloc, 3, 4, m1])
        tau = tf.transpose(tau, [0, 2, 1, 3, 4])  # (K, 3, nloc, 4, M1)
        tau_c = tf.gather_nd(tau, tf.stack([self.comp_q, self.comp_a], -1))  # (C, nloc, 4, M1)
        self.forces = tf.einsum("cnam,nam->c", tau_c, U)  # for the self-check
        tau_c = tf.transpose(tau_c, [1, 0, 2, 3])  # atom-major (nloc, C, 4, M1)

        # ---- fitting weights and V: the tangent tau_c through each type's fitting net, by hand
        T2 = T[:, None, :, :m2]  # (nloc, 1, 4, M2), broadcast over components
        dD = tf.reshape(tf.matmul(tau_c, T2, transpose_a=True)
                        + tf.matmul(T[:, None], tau_c[..., :m2], transpose_a=True), [nloc, C, m1 * m2])
        # the first fitting layer's tangent dD_c W_0 = tau_c . A, with A (per atom) the map
        # from T-directions to that layer's pre-activation: (nloc, 4*M1, out_0)
        tau_flat = tf.reshape(tau_c, [nloc, C, 4 * m1])
        dz0 = tf.matmul(tau_flat, A)
        g, zbar0, dDbar = {}, [], []
        for t, (Dt, dDt, dz0t) in enumerate(zip(by_type(D), by_type(dD), by_type(dz0))):
            fgrads, g_final, zb, db = _fit_rows(Dt, dDt, dz0t, fits[t][0], fits[t][1], float(c_out[t]))
            names = fits[t][2]
            g[names[-1][0]] = g_final
            for i, (gW, gb, gt) in fgrads.items():
                g[names[i][0]], g[names[i][1]] = gW, gb
                if gt is not None:
                    g[names[i][2]] = gt
            zbar0.append(zb)
            dDbar.append(db)
        zbar0, dDbar = tf.concat(zbar0, axis=0), tf.concat(dDbar, axis=0)
        # V_c = dL_c/dT through D = T^T T2 and dD = tau^T T2 + T^T tau2 (T2 = T[:, :M2]):
        # T2 Dbar^T + [T Dbar | 0] + [tau dDbar | 0] + tau2 dDbar^T with Dbar = zbar_0 W_0^T;
        # the first two terms together are zbar_0 A^T
        dDbar = tf.reshape(dDbar, [nloc, 1, m1, m2])
        pad = [[0, 0], [0, 0], [0, 0], [0, m1 - m2]]
        V = (tf.reshape(tf.matmul(zbar0, A, transpose_b=True), [nloc, C, 4, m1])
             + tf.pad(tf.matmul(tau_c, dDbar), pad)
             + tf.matmul(tau_c[..., :m2], dDbar, transpose_b=True))
        V = tf.transpose(V, [1, 0, 2, 3])
        self.V = tf.reshape(V, [C, -1])  # (C, nloc*4*M1)

        # ---- embedding weights through tau: per net, only the pairs of that net that hold atom k
        self.net_pairs = []
        for k, (ti, tj, names, layers) in enumerate(self.nets):
            pi = tf.placeholder(tf.int32, [None, None], name=f"se_a_net{k}_pair_i")
            pj = tf.placeholder(tf.int32, [None, None], name=f"se_a_net{k}_pair_j")
            pw = tf.placeholder(tf.float64, [None, None], name=f"se_a_net{k}_pair_w")
            self.net_pairs.append((pi, pj, pw))
            pidx = tf.stack([tf.gather(pi, self.comp_q), tf.gather(pj, self.comp_q)], -1)
            pwc = tf.gather(pw, self.comp_q)  # (C, P)
            emb_c = [(_per_component(W, C), _per_component(b, C),
                      None if idt is None else _per_component(idt, C)) for W, b, idt in layers]
            Gq, Gpq = _embed(tf.gather_nd(R[:, :, 0], pidx), emb_c)  # (C, P, M1)
            rq = tf.gather(tf.gather_nd(rho, pidx), self.comp_a, axis=3, batch_dims=1)  # (C, P, 4)
            Rq = tf.gather_nd(R, pidx)
            Uq = tf.gather(U, pidx[:, :, 0])  # (C, P, 4, M1)
            Qq = rq[..., None] * Gq[:, :, None, :] + Rq[..., None] * (Gpq * rq[..., :1])[:, :, None, :]
            L_tau = tf.reduce_sum(pwc[:, :, None, None] * Uq * Qq) / S
            variables = [v for layer in emb_c for v in layer if v is not None]
            flat_names = [n for layer in names for n in layer]
            for n, grad in zip(flat_names, tf.gradients(L_tau, variables)):
                if n in self._offsets:
                    g[n] = grad

        self.rows = tf.concat(
            [tf.reshape(g[n] if g.get(n) is not None else tf.zeros([C] + w.shape.as_list(), tf.float64),
                        [C, -1]) for n, w in zip(layout.names, weights)], axis=1)

    # ------------------------------------------------------------ numpy side
    def fill(self, sess, feed, comps, out, rows_per_pass, check=None, extra=()):
        """Force rows of ``comps`` into ``out``; see :meth:`StructuredRows.fill`.

        Once per frame: the neighbour list, dT/dw_e, and the environment,
        embedding and dE/dT (fed back to every chunk of components), with ``extra``.
        """
        jac = [[K for _, _, K in net] for net in self._net_blocks]
        nlist, atype, blocks, per_frame, extra_values = sess.run(
            [self.nlist, self.atype, jac, self.frame_tensors, list(extra)], feed_dict=feed)
        feed.update(zip(self.frame_tensors, per_frame))
        starts = np.concatenate([[0], np.cumsum(np.bincount(atype, minlength=self.ntypes))])
        for start in range(0, comps.size, rows_per_pass):
            chunk = comps[start : start + rows_per_pass]
            atoms, q = np.unique(chunk // 3, return_inverse=True)
            pi, pj, pw = self.pairs(nlist, atoms)
            feed.update({self.pair_i: pi, self.pair_j: pj, self.pair_w: pw,
                         self.comp_q: q.astype(np.int32), self.comp_a: (chunk % 3).astype(np.int32)})
            for (ti, tj, _, _), holders in zip(self.nets, self.net_pairs):
                keep = (self.slot_type[pj] == tj) & (pw != 0.0)
                if ti is not None:
                    keep &= atype[pi] == ti
                feed.update(zip(holders, self._compact(pi, pj, pw, keep)))
            if check is not None and start == 0:
                if not check(feed, sess.run(self.forces, feed_dict=feed), chunk):
                    return False, extra_values
            rows, V = sess.run([self.rows, self.V], feed_dict=feed)
            for (ti, _, _, _), net, values in zip(self.nets, self._net_blocks, blocks):
                Vn = V if ti is None else V.reshape(V.shape[0], -1, V.shape[1] // nlist.shape[0])[
                    :, starts[ti]:starts[ti + 1]].reshape(V.shape[0], -1)
                self.add_dense(rows, Vn, [(name, kind, K) for (name, kind, _), K in zip(net, values)],
                               self._offsets)
            out[start : start + chunk.size] = rows
        return True, extra_values

    @staticmethod
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

    @staticmethod
    def pairs(nlist: np.ndarray, atoms: np.ndarray):
        """(pair_i, pair_j, pair_w), (K, P): for each atom k its own rows and the rows that hold k."""
        lists = []
        for k in atoms:
            own_j = np.nonzero(nlist[k] >= 0)[0]
            own_w = (nlist[k, own_j] == k).astype(float) - 1.0
            oi, oj = np.nonzero(nlist == k)
            keep = oi != k
            lists.append((np.concatenate([np.full(own_j.size, k), oi[keep]]),
                          np.concatenate([own_j, oj[keep]]),
                          np.concatenate([own_w, np.ones(int(keep.sum()))])))
        P = max(1, max(len(p[0]) for p in lists))
        pi = np.zeros((len(atoms), P), np.int32)
        pj = np.zeros((len(atoms), P), np.int32)
        pw = np.zeros((len(atoms), P), np.float64)
        for r, (i, j, w) in enumerate(lists):
            pi[r, : i.size], pj[r, : j.size], pw[r, : w.size] = i, j, w
        return pi, pj, pw

    @staticmethod
    def add_dense(rows: np.ndarray, V: np.ndarray, blocks, offsets) -> None:
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
