"""Block layout of RLEKF (the "layer reorganisation" of Algorithm 4).

The weights of a network are packed into one flat vector: tensors in model
order, each flattened in C order.  The flat vector is cut into contiguous
blocks; each block gets its own dense covariance P_l, so P is block-diagonal.

Rule (ALGORITHMS.md section 2, and DeePMD-kit's PyTorch ``LKF``): walk the
tensors in order, gathering them into the current group while the group's
element count stays <= blocksize; when the next tensor would exceed it, close
the group.  A closed group larger than blocksize is split into chunks of
blocksize (the last chunk holds the remainder).

The layout's fingerprint (tensor names, shapes, blocksize) identifies which
model a Kalman state belongs to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["BlockLayout", "LayoutMismatchError"]


class LayoutMismatchError(ValueError):
    """A Kalman state was offered to a model whose weight layout differs."""


def _first(names: Sequence[str], k: int = 3) -> str:
    """The first ``k`` names, and how many more."""
    text = ", ".join(names[:k]) or "none"
    return text + (f" and {len(names) - k} more" if len(names) > k else "")


@dataclass(frozen=True)
class BlockLayout:
    """Where every weight of a model sits in the flat vector, and its blocks.

    Attributes
    ----------
    names, shapes
        The trainable tensors, in the order they are packed.
    blocksize
        N_b, the largest block edge.
    blocks
        ``(start, stop)`` ranges of the flat vector, one per covariance block.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    blocksize: int
    blocks: tuple[tuple[int, int], ...]

    @classmethod
    def build(
        cls, tensors: Iterable[tuple[str, Sequence[int]]], blocksize: int
    ) -> "BlockLayout":
        """Make the layout for named tensor shapes, in packing order."""
        if int(blocksize) <= 0:
            raise ValueError(f"blocksize must be a positive integer, got {blocksize}")
        blocksize = int(blocksize)
        names, shapes = [], []
        for name, shape in tensors:
            names.append(str(name))
            shapes.append(tuple(int(s) for s in shape))
        if not names:
            raise ValueError("a block layout needs at least one tensor")
        if len(set(names)) != len(names):
            raise ValueError("tensor names in a block layout must be unique")
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        # gather consecutive tensors into groups of <= blocksize elements
        groups: list[int] = []
        current = 0
        for size in sizes:
            if current + size > blocksize and current > 0:
                groups.append(current)
                current = 0
            current += size
        groups.append(current)
        # split groups larger than blocksize
        blocks: list[tuple[int, int]] = []
        start = 0
        for group in groups:
            stop_group = start + group
            while start < stop_group:
                stop = min(start + blocksize, stop_group)
                blocks.append((start, stop))
                start = stop
        return cls(tuple(names), tuple(shapes), blocksize, tuple(blocks))

    # ------------------------------------------------------------------ sizes
    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def n(self) -> int:
        """Total number of weights."""
        return int(sum(self.sizes))

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.blocks)

    @property
    def nbytes_p(self) -> int:
        """Number of P entries (multiply by the item size for bytes)."""
        return int(sum(m * m for m in self.block_sizes))

    # ------------------------------------------------------------ (un)packing
    def pack(self, arrays: Sequence[np.ndarray], dtype=np.float64) -> np.ndarray:
        """Concatenate per-tensor arrays into the flat vector."""
        if len(arrays) != len(self.shapes):
            raise ValueError(
                f"expected {len(self.shapes)} tensors, got {len(arrays)}"
            )
        out = np.empty(self.n, dtype=dtype)
        pos = 0
        for arr, shape, size in zip(arrays, self.shapes, self.sizes):
            arr = np.asarray(arr)
            if arr.shape != shape:
                raise ValueError(f"tensor shape {arr.shape} != layout shape {shape}")
            out[pos : pos + size] = arr.reshape(-1)
            pos += size
        return out

    def unpack(self, flat: np.ndarray) -> list[np.ndarray]:
        """Split the flat vector back into per-tensor arrays (views)."""
        flat = np.asarray(flat)
        if flat.shape[-1] != self.n:
            raise ValueError(f"flat vector has {flat.shape[-1]} entries, layout {self.n}")
        out, pos = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(flat[..., pos : pos + size].reshape(flat.shape[:-1] + shape))
            pos += size
        return out

    # ------------------------------------------------------------ identity
    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "blocksize": self.blocksize,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "BlockLayout":
        return cls.build(zip(data["names"], data["shapes"]), data["blocksize"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the tensor names, shapes and blocksize."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def check_same(self, other: "BlockLayout", what: str = "Kalman state") -> None:
        """Raise :class:`LayoutMismatchError` naming the first difference."""
        if self.fingerprint == other.fingerprint:
            return
        fix = ("Use the Kalman state saved with this model's checkpoint, or start a "
               'fresh filter (optimizer key "reset_state": true).')
        mine, theirs = dict(zip(self.names, self.shapes)), dict(zip(other.names, other.shapes))
        reshaped = next(((n, s, theirs[n]) for n, s in mine.items() if n in theirs and theirs[n] != s), None)
        if reshaped is not None:
            n, a, b = reshaped
            detail = f"tensor {n} has shape {list(a)} in the model, {list(b)} in the state"
        elif self.names != other.names:
            missing = [n for n in self.names if n not in theirs]
            extra = [n for n in other.names if n not in mine]
            detail = (
                f"weight tensors differ (model has {len(self.names)}, state has {len(other.names)}; "
                f"{len(missing)} missing from the state: {_first(missing)}; "
                f"{len(extra)} unknown to the model: {_first(extra)})"
                if missing or extra else "the same weight tensors in another order"
            )
            if extra and not missing:
                # the state lists tensors the model's energy does not use, e.g. filter_type_*/idt_1_*
                # of resnet_dt, which an earlier trainer kept and the current one leaves out
                fix = ("The state was probably written by an earlier version of this trainer, which kept "
                       "weights the energy does not depend on (e.g. filter_type_*/idt_1_* with resnet_dt). "
                       'Start a fresh filter from these weights (optimizer key "reset_state": true), '
                       "or train again.")
        else:
            detail = f"blocksize {other.blocksize} != {self.blocksize} (the state's, this model's)"
            fix = (f"Set the optimizer's blocksize to {other.blocksize} (or \"auto\", which takes a continued "
                   'state\'s), or start a fresh filter (optimizer key "reset_state": true).')
        raise LayoutMismatchError(f"the {what} does not belong to this model: {detail}. {fix}")
