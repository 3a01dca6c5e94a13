"""From a frozen DeePMD-kit model (``dp freeze`` output) to its Kalman state.

``dp freeze`` is DeePMD-kit's, unchanged: it turns the checkpoint's weights
into constants of the same names.  The Kalman state that belongs to a frozen
model is found, in this order:

1. the path given explicitly (``--kalman-state`` / ``kalman_state=``);
2. ``<model stem>.kalman.npz`` beside the model (``graph.pb`` ->
   ``graph.kalman.npz``), which is how a model and its state travel together;
3. ``model.ckpt.kalman.npz`` in the directory that holds the model file after
   symbolic links are resolved (``dp freeze`` is run in the training
   directory; DP-GEN links ``graph.000.pb`` to ``000/frozen_model.pb``).

Whatever the source, the state is accepted only if the digest of the weights
it was saved with equals the digest of the frozen model's weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..kalman import BlockLayout, KalmanStateError, read_meta
from .statefiles import STATE_SUFFIX, state_path_for_checkpoint, weights_digest

__all__ = ["frozen_weights", "find_kalman_state", "check_state_matches_model", "StateNotFoundError"]


class StateNotFoundError(FileNotFoundError):
    """No Kalman state could be found for a frozen model."""


def _graph_def(model_path: str | os.PathLike):
    from deepmd.tf.env import tf

    graph_def = tf.GraphDef()
    with open(model_path, "rb") as fh:
        graph_def.ParseFromString(fh.read())
    return graph_def


def _const(graph_def, name):
    """The value of the constant ``name`` in a parsed graph, or None."""
    from deepmd.tf.env import tf

    for node in graph_def.node:
        if node.name == name:
            return tf.make_ndarray(node.attr["value"].tensor)
    return None


def _first(names, k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def frozen_weights(model_path: str | os.PathLike, names, shapes=None) -> list[np.ndarray]:
    """The constants named ``names`` in a frozen model.

    ``shapes`` (those the Kalman state records) only sharpen the error when some are missing.
    """
    from deepmd.tf.env import tf

    names = list(names)
    wanted = set(names)
    found, other_ops = {}, {}
    for node in _graph_def(model_path).node:
        if node.name in wanted:
            if node.op == "Const":
                found[node.name] = tf.make_ndarray(node.attr["value"].tensor)
            else:
                other_ops[node.name] = node.op
    missing = [n for n in names if n not in found]
    if missing:
        head = (f"the frozen model {model_path} lacks {len(missing)} of the {len(names)} weight tensors "
                f"the Kalman state lists ({_first(missing)})")
        reshaped = [n for n, s in zip(names, shapes or ()) if n in found and tuple(found[n].shape) != tuple(s)]
        if other_ops:
            n = next(iter(other_ops))
            why = (f"{n} is a {other_ops[n]} node, not a constant: is {model_path} the output of `dp freeze`? "
                   "Freeze the checkpoint (`dp freeze -o graph.pb` in the training directory) and use that file.")
        elif not reshaped:
            # every missing name is absent from the graph, and no tensor found has another shape
            why = ("The graph has no node of those names"
                   + (", and its other weights have the shapes the state records" if shapes is not None else "")
                   + ": the state was probably written by an earlier version of this trainer, which kept "
                   "weights the energy does not depend on (e.g. filter_type_*/idt_1_* with resnet_dt; `dp freeze` "
                   'drops them). Train again, or continue from the checkpoint with "reset_state": true in the '
                   "optimizer section, then freeze; the new state leaves them out.")
        else:
            why = (f"The Kalman state belongs to another model (tensor {reshaped[0]} has another shape): pass "
                   "the state written with the checkpoint this model was frozen from (--kalman-state).")
        raise KalmanStateError(f"{head}. {why}")
    return [found[n] for n in names]


def check_state_matches_model(model_path: str | os.PathLike, state_path: str | os.PathLike) -> dict:
    """Raise unless ``state_path`` was saved with the weights of ``model_path``; return its meta."""
    meta = read_meta(state_path)
    layout = BlockLayout.from_dict(meta["layout"])
    saved = meta.get("extra", {}).get("weights_sha256")
    if saved is None:
        raise KalmanStateError(
            f"Kalman state {state_path} records no weight digest, so it cannot be matched to a model: "
            "it was not written by the RLEKF trainer (`dp train` with the RLEKF optimizer)"
        )
    try:
        weights = frozen_weights(model_path, layout.names, layout.shapes)
    except KalmanStateError as exc:
        raise KalmanStateError(f"Kalman state {state_path}: {exc}") from None
    fix = ("Freeze the checkpoint this state was written with (`dp freeze -o graph.pb` in its training "
           "directory), or pass the state written with this model's checkpoint (--kalman-state).")
    reshaped = next(((n, s, w.shape) for n, s, w in zip(layout.names, layout.shapes, weights)
                     if tuple(w.shape) != tuple(s)), None)
    if reshaped is not None:
        n, s, w = reshaped
        raise KalmanStateError(
            f"Kalman state {state_path} does not belong to model {model_path}: tensor {n} has shape "
            f"{list(w)} in the model, {list(s)} in the state (another architecture). {fix}"
        )
    digest = weights_digest(layout.pack(weights))
    if digest != saved:
        step = meta.get("extra", {}).get("step")
        raise KalmanStateError(
            f"Kalman state {state_path} does not belong to model {model_path}: same tensors and shapes, "
            f"other values (weights sha256 {digest[:12]} in the model, {saved[:12]} in the state"
            + (f", which was saved at training step {step}" if step is not None else "")
            + f"; e.g. a model frozen from another checkpoint or training). {fix}"
        )
    return meta


def find_kalman_state(
    model_path: str | os.PathLike, kalman_state: str | os.PathLike | None = None
) -> Path:
    """The checked Kalman state of a frozen model (see the module doc for the order)."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model {model_path} does not exist")
    if kalman_state is not None:
        candidates = [Path(kalman_state)]
        if not candidates[0].exists():
            raise StateNotFoundError(f"Kalman state {kalman_state} does not exist")
    else:
        real = Path(os.path.realpath(model_path))
        candidates = [
            model_path.with_name(model_path.stem + STATE_SUFFIX),
            real.with_name(real.stem + STATE_SUFFIX),
            state_path_for_checkpoint(real.parent / "model.ckpt"),
        ]
    tried = []
    for cand in candidates:
        if cand.exists() and cand not in tried:
            check_state_matches_model(model_path, cand)
            return cand
        tried.append(cand)
    raise StateNotFoundError(
        f"no Kalman state found for {model_path} (looked for "
        + ", ".join(str(c) for c in tried)
        + "). Freeze the model in its RLEKF training directory, or pass the state explicitly."
    )
