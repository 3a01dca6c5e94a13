"""Memory budget of the Kalman covariance P, checked before P exists.

P is block-diagonal (:mod:`alkpu_plugin.kalman.layout`): its memory is
``sum over blocks of n_l**2 * itemsize`` bytes (itemsize 8 for ``p_dtype``
float64, 4 for float32).  This module computes that size from the tensor
shapes alone, compares it with a limit, and picks a blocksize when asked for
``"auto"``.  It allocates nothing and imports neither DeePMD-kit nor
TensorFlow.

Rules
-----
* The limit is ``p_memory_limit`` GB (1 GB = 1e9 bytes); when it is None, half
  of this machine's physical memory
  (``os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2``).  Where
  the physical memory cannot be read, there is no limit.
* ``"auto"`` blocksize (the default): the largest of :data:`CANDIDATE_BLOCKSIZES`
  up to :data:`AUTO_BLOCKSIZE_MAX` (1024) whose P takes at most
  :data:`AUTO_P_MAX` (1 GB) in float32 and, in the requested ``p_dtype``, fits
  the limit.  Larger blocks learn more per step but every step reads all of P,
  so a P that grows with the model makes each step slower; at 1024, or halved
  until P is 1 GB in float32, RLEKF reached Adam's accuracy in the least time
  on every model measured (docs/benchmarks.md).  When no candidate keeps P
  under 1 GB (over 2 million weights at 128), the smallest that fits the limit.
  A blocksize at least as large as the weight count gives one layout, so
  candidates above it are equivalent.
* Cost estimate: every Kalman update reads P once (float32: the whole of each
  block, in one batched product; float64: its upper triangle with ``symv``,
  half of bytes(P)) and, once every :data:`~.ekffm.DEFER` updates, reads and
  writes what it reads to apply the deferred downdates (:mod:`.ekffm`):
  :func:`passes_per_update` x bytes(P) per update, and ``1 + force_updates``
  updates per training step.  At :data:`BANDWIDTH` (about 30 GB/s, a memory
  bandwidth figure for this kind of machine) that gives the estimated Kalman
  time per step.  It is a lower bound: the updates do not reach full memory
  bandwidth (docs/memory.md has measured rates), and the TensorFlow passes
  come on top.
* ``"auto"`` p_dtype: float64 while P in float64 takes at most
  :data:`AUTO_FLOAT64_MAX` bytes (and fits the limit), float32 above.  A large P
  makes every update memory-bound, and float32 halves both its memory and that
  time; training in float32 followed float64's learning curve to its printed
  digits (docs/memory.md).  A small P stays float64, where its cost is small and
  KPU is exact to float64 round-off.  With ``"auto"`` blocksize too, the
  blocksize is chosen as for float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from .ekffm import DEFER
from .layout import BlockLayout

__all__ = [
    "AUTO_BLOCKSIZE_MAX",
    "AUTO_FLOAT64_MAX",
    "AUTO_P_MAX",
    "BANDWIDTH",
    "passes_per_update",
    "CANDIDATE_BLOCKSIZES",
    "ITEMSIZE",
    "PBudget",
    "PMemoryError",
    "auto_blocksize",
    "fitting_choices",
    "p_bytes",
    "physical_memory",
    "plan_p",
    "resolve_limit",
    "resolve_p_dtype",
]

#: blocksizes that ``"auto"`` chooses from, largest first
CANDIDATE_BLOCKSIZES = (10240, 8192, 5120, 4096, 2048, 1024, 512, 256, 128)
#: "auto" blocksize: the largest it takes
AUTO_BLOCKSIZE_MAX = 1024
#: "auto" blocksize: the most bytes P may take in float32 (halving the blocksize until it does)
AUTO_P_MAX = 10**9
#: bytes per entry of P
ITEMSIZE = {"float64": 8, "float32": 4}
#: "auto" p_dtype: the largest P (bytes in float64) kept in float64
AUTO_FLOAT64_MAX = 10**9
#: memory bandwidth assumed by the cost estimate, bytes per second
BANDWIDTH = 30e9


def passes_per_update(p_dtype: str) -> float:
    """bytes(P) moved per Kalman update: the stored part read once (all of a float32 P,
    the upper half of a float64 one), and read and written once every DEFER updates."""
    stored = 1.0 if p_dtype == "float32" else 0.5
    return stored * (1.0 + 2.0 / DEFER)


GB = 1e9


class PMemoryError(ValueError):
    """P would not fit the memory limit; the message lists the settings that fit."""


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or None where it cannot be read."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    if pages <= 0 or page <= 0:
        return None
    return int(pages) * int(page)


def resolve_limit(limit_gb: float | None, key: str = "p_memory_limit") -> tuple[int | None, str]:
    """``(limit in bytes or None, where it came from)`` for a ``p_memory_limit`` value.

    ``key`` is how the setting is named in messages (e.g. ``optimizer/p_memory_limit``).
    """
    if limit_gb is not None:
        limit_gb = float(limit_gb)
        if not limit_gb > 0:
            raise ValueError(f"{key} must be a positive number of GB, got {limit_gb}")
        return int(limit_gb * GB), f"set by {key}"
    mem = physical_memory()
    if mem is None:
        return None, f"no limit: {key} is not set and this machine's memory is unknown"
    return mem // 2, f"half of this machine's {mem / GB:.1f} GB physical memory ({key} not set)"


def _tensors(tensors: Iterable[tuple[str, Sequence[int]]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(str(name), tuple(int(s) for s in shape)) for name, shape in tensors]


def p_bytes(tensors: Iterable[tuple[str, Sequence[int]]], blocksize: int, p_dtype: str = "float64") -> int:
    """Bytes of P for named tensor shapes (packing order) at ``blocksize`` in ``p_dtype``."""
    return BlockLayout.build(tensors, blocksize).nbytes_p * _itemsize(p_dtype)


def _itemsize(p_dtype: str) -> int:
    try:
        return ITEMSIZE[p_dtype]
    except KeyError:
        raise ValueError(f'p_dtype must be "float64", "float32" or "auto", got {p_dtype!r}') from None


def resolve_p_dtype(p_entries: int, limit_bytes: int | None = None) -> str:
    """The storage type ``"auto"`` gives a P of ``p_entries`` numbers: float64 while that
    takes at most :data:`AUTO_FLOAT64_MAX` bytes and fits ``limit_bytes``, else float32."""
    f64 = p_entries * ITEMSIZE["float64"]
    if f64 <= AUTO_FLOAT64_MAX and (limit_bytes is None or f64 <= limit_bytes):
        return "float64"
    return "float32"


def auto_blocksize(
    tensors: Iterable[tuple[str, Sequence[int]]],
    limit_bytes: int | None,
    p_dtype: str = "float64",
    candidates: Sequence[int] = CANDIDATE_BLOCKSIZES,
    largest: int = AUTO_BLOCKSIZE_MAX,
    p_max: int | None = AUTO_P_MAX,
) -> int | None:
    """The blocksize ``"auto"`` takes: the largest candidate up to ``largest`` whose P
    takes at most ``p_max`` bytes in float32 and, in ``p_dtype``, fits ``limit_bytes``
    (None: no limit).  When no candidate meets ``p_max``, the smallest that fits the
    limit; None when none fits the limit.
    """
    tensors = _tensors(tensors)
    fitting = [
        int(bs) for bs in sorted(candidates, reverse=True)
        if bs <= largest and (limit_bytes is None or p_bytes(tensors, bs, p_dtype) <= limit_bytes)
    ]
    for bs in fitting:
        if p_max is None or p_bytes(tensors, bs, "float32") <= p_max:
            return bs
    return fitting[-1] if fitting else None


@dataclass(frozen=True)
class PBudget:
    """Size and estimated cost of P for one model and setting."""

    n_weights: int
    blocksize: int
    p_dtype: str
    nblocks: int
    p_bytes: int
    limit_bytes: int | None
    limit_source: str
    force_updates: int = 4

    @property
    def p_gb(self) -> float:
        return self.p_bytes / GB

    @property
    def seconds_per_update(self) -> float:
        """Estimated time of one Kalman update: :func:`passes_per_update` x bytes(P) / :data:`BANDWIDTH`."""
        return passes_per_update(self.p_dtype) * self.p_bytes / BANDWIDTH

    @property
    def seconds_per_step(self) -> float:
        """Estimated Kalman time of one training step (1 + force_updates updates)."""
        return self.seconds_per_update * (1 + self.force_updates)

    def describe(self) -> str:
        """One line for the log: size, limit and the cost estimate."""
        limit = "no limit" if self.limit_bytes is None else f"limit {self.limit_bytes / GB:.2f} GB"
        return (
            f"P {self.p_gb:.3f} GB ({self.n_weights} weights, {self.nblocks} blocks, blocksize "
            f"{self.blocksize}, {self.p_dtype}; {limit}, {self.limit_source}); Kalman updates "
            f"estimated at >= {self.seconds_per_step:.2f} s per step ({1 + self.force_updates} updates, "
            f"each moving {passes_per_update(self.p_dtype):.2g} x P at ~{BANDWIDTH / GB:.0f} GB/s)"
        )


def fitting_choices(
    tensors: Iterable[tuple[str, Sequence[int]]],
    limit_bytes: int,
    candidates: Sequence[int] = CANDIDATE_BLOCKSIZES,
) -> list[tuple[int, str, int]]:
    """``(blocksize, p_dtype, bytes of P)`` of every candidate setting within the limit."""
    tensors = _tensors(tensors)
    out = []
    for bs in sorted(candidates, reverse=True):
        nbytes = BlockLayout.build(tensors, bs).nbytes_p
        for dtype, size in ITEMSIZE.items():
            if nbytes * size <= limit_bytes:
                out.append((int(bs), dtype, nbytes * size))
    return out


def _advice(tensors, limit: int, key_prefix: str) -> str:
    """The settings that fit, and the key that raises the limit, as one sentence."""
    choices = fitting_choices(tensors, limit)
    raise_it = f"raise {key_prefix}p_memory_limit (GB) to allow more memory"
    if not choices:
        return (
            f"No blocksize down to {min(CANDIDATE_BLOCKSIZES)} fits, in float64 or float32: "
            f"{raise_it}."
        )
    # blocksizes that give the same blocks (all above the largest group) are listed together
    rows: dict[tuple, list[int]] = {}
    for bs in dict.fromkeys(c[0] for c in choices):
        sizes = tuple((d, b) for c, d, b in choices if c == bs)
        rows.setdefault(sizes, []).append(bs)
    listed = "; ".join(
        f"blocksize {'/'.join(map(str, bss))}: "
        + ", ".join(f"{nbytes / GB:.3g} GB in {dtype}" for dtype, nbytes in sizes)
        for sizes, bss in rows.items()
    )
    return (
        f"Settings that fit (P size): {listed}. Set {key_prefix}blocksize (or \"auto\") and "
        f"{key_prefix}p_dtype to one of them, or {raise_it}."
    )


def plan_p(
    tensors: Iterable[tuple[str, Sequence[int]]],
    blocksize: int | str,
    p_dtype: str = "float64",
    limit_gb: float | None = None,
    force_updates: int = 4,
    key_prefix: str = "optimizer/",
    model: str = "the model",
) -> PBudget:
    """Resolve ``blocksize`` (an int or ``"auto"``) and ``p_dtype`` (``"float64"``,
    ``"float32"`` or ``"auto"``: :func:`resolve_p_dtype`) and check P against the limit.

    Returns the :class:`PBudget` of the chosen setting.  Raises
    :class:`PMemoryError` when P would exceed the limit (or, for "auto", when no
    candidate blocksize fits); the message names the weight count, blocksize,
    P size, the limit and its source, every candidate blocksize and p_dtype that
    fits with its P size, and the key that raises the limit.  ``key_prefix``
    is where the optimizer keys sit in the user's input (``optimizer/`` in a
    DeePMD-kit input, ``kpu/optimizer/`` in a DP-GEN param.json); ``model``
    names the model in the message.
    """
    tensors = _tensors(tensors)
    auto_dtype = p_dtype == "auto"
    if auto_dtype:
        p_dtype = "float32"  # what "auto" falls back to; resolved below once the blocksize is known
    _itemsize(p_dtype)
    limit, source = resolve_limit(limit_gb, f"{key_prefix}p_memory_limit")
    n = sum(math.prod(shape) for _, shape in tensors)
    shown = 'float32 (p_dtype "auto")' if auto_dtype else p_dtype
    if blocksize == "auto":
        chosen = auto_blocksize(tensors, limit, p_dtype)
        if chosen is None:
            smallest = min(CANDIDATE_BLOCKSIZES)
            raise PMemoryError(
                f"{key_prefix}blocksize \"auto\": P, the Kalman covariance of {model} ({n} weights), "
                f"does not fit the limit of {limit / GB:.3g} GB ({source}) in {shown} at any "
                f"blocksize; the smallest candidate, {smallest}, needs "
                f"{p_bytes(tensors, smallest, p_dtype) / GB:.3g} GB. {_advice(tensors, limit, key_prefix)}"
            )
        blocksize = chosen
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f'{key_prefix}blocksize must be a positive integer or "auto", got {blocksize!r}')
    layout = BlockLayout.build(tensors, blocksize)
    if auto_dtype:
        p_dtype = resolve_p_dtype(layout.nbytes_p, limit)
    shown = f'{p_dtype} (p_dtype "auto")' if auto_dtype else p_dtype
    budget = PBudget(
        n_weights=layout.n,
        blocksize=int(blocksize),
        p_dtype=p_dtype,
        nblocks=len(layout.blocks),
        p_bytes=layout.nbytes_p * ITEMSIZE[p_dtype],
        limit_bytes=limit,
        limit_source=source,
        force_updates=int(force_updates),
    )
    if limit is not None and budget.p_bytes > limit:
        raise PMemoryError(
            f"P, the Kalman covariance of {model}, would take {budget.p_gb:.3g} GB: "
            f"{budget.n_weights} weights at {key_prefix}blocksize {budget.blocksize} in {shown}, "
            f"over the limit of {limit / GB:.3g} GB ({source}). "
            f"{_advice(tensors, limit, key_prefix)} At this setting each training step would move "
            f"about {passes_per_update(budget.p_dtype) * budget.p_gb * (1 + budget.force_updates):.3g} GB through the Kalman updates "
            f"(estimated >= {budget.seconds_per_step:.2g} s at {BANDWIDTH / GB:.0f} GB/s)."
        )
    return budget
