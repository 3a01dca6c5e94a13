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


def frozen_weights(model_path: str | os.PathLike, names) -> list[np.ndarray]:
    """The constants named ``names`` in a frozen model."""
    from deepmd.tf.env import tf

    wanted = set(names)
    found = {}
    for node in _graph_def(model_path).node:
        if node.op == "Const" and node.name in wanted:
            found[node.name] = tf.make_ndarray(node.attr["value"].tensor)
    missing = [n for n in names if n not in found]
    if missing:
        raise KalmanStateError(
            f"the frozen model {model_path} has no weights named {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}: the Kalman state belongs to another model"
        )
    return [found[n] for n in names]


def check_state_matches_model(model_path: str | os.PathLike, state_path: str | os.PathLike) -> dict:
    """Raise unless ``state_path`` was saved with the weights of ``model_path``; return its meta."""
    meta = read_meta(state_path)
    layout = BlockLayout.from_dict(meta["layout"])
    saved = meta.get("extra", {}).get("weights_sha256")
    if saved is None:
        raise KalmanStateError(f"Kalman state {state_path} records no weight digest")
    weights = frozen_weights(model_path, layout.names)
    shapes = tuple(tuple(w.shape) for w in weights)
    if shapes != layout.shapes or weights_digest(layout.pack(weights)) != saved:
        raise KalmanStateError(
            f"Kalman state {state_path} does not belong to model {model_path}: it was saved "
            "with other weights. Pass the state written with the checkpoint this model was "
            "frozen from."
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
