"""The trainable weights of a DeePMD-kit TF energy model, from its input alone.

:func:`model_tensors` lists ``(name, shape)`` of the weights RLEKF trains, in
the order DeePMD-kit's TensorFlow backend creates them, without building the
model (no TensorFlow): descriptor ``se_e2_a`` (alias ``se_a``) and fitting net
``ener``.  Defaults of missing keys come from DeePMD-kit's own argument schema
(``deepmd.utils.argcheck``).  Other models raise :class:`UnsupportedModel`.

What DeePMD-kit 3.2 (``deepmd/tf``) builds, and what is counted:

* se_e2_a embedding nets (``descriptor/se_a.py`` ``_filter``,
  ``utils/network.py`` ``embedding_net``): input width 1, layers
  ``neuron``; per layer ``matrix_<i>_<t>`` [in, out] and ``bias_<i>_<t>`` [out];
  with ``resnet_dt`` an ``idt_<i>_<t>`` [1, out] that the output depends on
  only where out == in or out == 2 * in (DeePMD-kit creates it on every layer;
  the others are not counted).  With ``type_one_side`` one net per neighbour
  type t in scope ``filter_type_all``; otherwise one per (centre c, neighbour
  t) pair in scope ``filter_type_<c>``, without the pairs of
  ``exclude_types`` (taken both ways).  ``"trainable": false`` makes none of
  them trainable.
* ener fitting nets (``fit/ener.py`` ``_build_lower``, ``utils/network.py``
  ``one_layer``), one per type: input width
  ``neuron[-1] * axis_neuron + numb_fparam + numb_aparam`` (no aparam with
  ``use_aparam_as_mask``); hidden layer i ``layer_<i>_type_<t>/matrix``,
  ``/bias``, and with ``resnet_dt`` ``/idt`` [width] on layers i >= 1 whose
  width equals the previous one; ``final_layer_type_<t>/matrix`` [last, 1] and
  ``/bias`` [1]; layers with ``trainable`` false are left out.

The number of types is ``len(sel)`` (a list) or ``len(type_map)`` (``sel``
``"auto"``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["UnsupportedModel", "model_tensors", "weight_count"]

SE_A = ("se_e2_a", "se_a")


class UnsupportedModel(ValueError):
    """The model's weights cannot be counted from its input here; the message says why."""


def _normalize(args: list, data: dict, what: str) -> dict:
    from dargs import Argument

    arg = Argument(what, dict, sub_fields=args)
    return arg.normalize_value({k: v for k, v in data.items() if k != "type"}, trim_pattern="_*")


def _embedding(scope: str, suffix: str, neuron: list[int], resnet_dt: bool) -> list:
    out = []
    width = 1
    for i, n in enumerate(neuron, start=1):
        out.append((f"{scope}/matrix_{i}_{suffix}", (width, n)))
        out.append((f"{scope}/bias_{i}_{suffix}", (n,)))
        if resnet_dt and (n == width or n == 2 * width):
            out.append((f"{scope}/idt_{i}_{suffix}", (1, n)))
        width = n
    return out


def _descriptor(d: dict, ntypes: int) -> list:
    if not d["trainable"]:
        return []
    neuron, rdt = list(d["neuron"]), bool(d["resnet_dt"])
    out = []
    if d["type_one_side"]:
        for t in range(ntypes):
            out += _embedding("filter_type_all", str(t), neuron, rdt)
        return out
    excluded = {(int(a), int(b)) for a, b in d["exclude_types"]}
    excluded |= {(b, a) for a, b in excluded}
    for c in range(ntypes):
        for t in range(ntypes):
            if (c, t) not in excluded:
                out += _embedding(f"filter_type_{c}", str(t), neuron, rdt)
    return out


def _fitting(f: dict, ntypes: int, dim_descrpt: int) -> list:
    neuron = list(f["neuron"])
    trainable = f["trainable"]
    if isinstance(trainable, bool):
        trainable = [trainable] * (len(neuron) + 1)
    if len(trainable) != len(neuron) + 1:
        raise UnsupportedModel("fitting_net/trainable must have one entry per layer plus one")
    width_in = dim_descrpt + int(f["numb_fparam"])
    if not f["use_aparam_as_mask"]:
        width_in += int(f["numb_aparam"])
    out = []
    for t in range(ntypes):
        width = width_in
        for i, n in enumerate(neuron):
            name = f"layer_{i}_type_{t}"
            if trainable[i]:
                out.append((f"{name}/matrix", (width, n)))
                out.append((f"{name}/bias", (n,)))
                if f["resnet_dt"] and i >= 1 and n == neuron[i - 1]:
                    out.append((f"{name}/idt", (n,)))
            width = n
        if trainable[-1]:
            out.append((f"final_layer_type_{t}/matrix", (width, 1)))
            out.append((f"final_layer_type_{t}/bias", (1,)))
    return out


def model_tensors(model: dict[str, Any], type_map: list[str] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of the trainable weights of a DeePMD-kit TF model section, in model order.

    ``type_map`` is used when the model section has none (DP-GEN fills it from
    its own ``type_map``).  Raises :class:`UnsupportedModel` for models other
    than se_e2_a + ener fitting.
    """
    from deepmd.utils.argcheck import descrpt_se_a_args, fitting_ener

    mtype = model.get("type", "standard")
    if mtype not in ("standard", "ener"):
        raise UnsupportedModel(f'model type "{mtype}"')
    for key in ("type_embedding", "spin"):
        if model.get(key) is not None:
            raise UnsupportedModel(f"model/{key}")
    descriptor = model.get("descriptor") or {}
    dtype = descriptor.get("type", "se_e2_a")
    if dtype not in SE_A:
        raise UnsupportedModel(f'descriptor "{dtype}" (weights counted for se_e2_a only)')
    fitting = model.get("fitting_net") or {}
    ftype = fitting.get("type", "ener")
    if ftype != "ener":
        raise UnsupportedModel(f'fitting_net "{ftype}" (weights counted for ener only)')
    d = _normalize(descrpt_se_a_args(), descriptor, "descriptor")
    f = _normalize(fitting_ener(), fitting, "fitting_net")
    if f.get("layer_name") is not None:
        raise UnsupportedModel("fitting_net/layer_name (shared layers)")
    sel = d["sel"]
    if isinstance(sel, str):
        tmap = model.get("type_map") or type_map
        if not tmap:
            raise UnsupportedModel('descriptor/sel "auto" without a type_map')
        ntypes = len(tmap)
    else:
        ntypes = len(sel)
    dim_descrpt = int(d["neuron"][-1]) * int(d["axis_neuron"])
    return _descriptor(d, ntypes) + _fitting(f, ntypes, dim_descrpt)


def weight_count(model: dict[str, Any], type_map: list[str] | None = None) -> int:
    """Number of trainable weights of :func:`model_tensors`."""
    total = 0
    for _, shape in model_tensors(model, type_map):
        size = 1
        for s in shape:
            size *= s
        total += size
    return total
