"""PowerSGD all-reduce: rank-r factors, warm start, error feedback (Vogels et al., 2019).

``all_reduce_many`` sums (or averages) a list of tensors over a process group
in place, sending for every matrix ``M`` (``m x n``) the factors ``P``
(``m x r``) and ``Q`` (``n x r``) instead of ``M``. One call is three
backend all-reduces, whatever the number of tensors:

1. the tensors that are not compressed -- 1-D and 0-d tensors (biases,
   norms) and matrices whose compression ratio would be below the codec's
   ``min_compression`` -- concatenated into one flat buffer per dtype
   (one all-reduce when they share a dtype, the usual case), issued first
   and left running while step 2 computes;
2. ``P_i = M_i Q_i`` for every matrix, all in one float32 buffer -> all-reduce;
   then each ``P_i`` is orthogonalized;
3. ``Q_i = M_i^T P_i`` for every matrix, in one buffer -> all-reduce; the
   result is ``P_i Q_i^T`` (divided by the group size when ``average``).

Matrix view, rank and the orthogonalization come from the codec
(`commpress.codecs.powersgd.PowerSGD`): 2-D tensors as they are, more
dimensions as ``(shape[0], -1)``. Everything is computed in float32;
float16/bfloat16/float64 tensors are converted on the way in and out.

Error feedback and averaging
----------------------------
Each rank compensates its input with its residual, ``M_i = x_i + e_i``, and
keeps as its new residual what its *own* contribution lost:
``e_i = M_i - P (M_i^T P)^T``, computed with the local ``M_i^T P`` before the
``Q`` all-reduce. Because the output is ``P P^T sum_i M_i``, the residuals
satisfy, every step::

    sum over ranks of e_i  ==  sum over ranks of M_i  -  (summed output)

so, over steps, the cumulative summed output equals the cumulative sum of
the inputs minus the (bounded) current residuals: nothing is lost for good.
The residual is in the units of the input, before any averaging: with
``average=True`` the output is the summed output divided by the group size,
and the residual is the same as with ``average=False``. (torch's
``powerSGD_hook`` instead stores ``input - averaged output``; that has the
same sum over ranks but mixes the other ranks' gradients into each rank's
memory.)

Warm start keeps, per key, the all-reduced ``Q`` of the last call and starts
the next call's power iteration from it. The first ``Q`` of a key (and every
``Q`` when ``warm_start=False``) is drawn from a generator seeded with the
codec's ``seed``, the key's ``repr`` and the key's call count, so ranks agree
without communication. A ``Q`` that comes back all zero (a zero gradient) is
not kept: the previous one is.

Identical results
-----------------
After the call every rank holds bit-identical values: everything computed
after an all-reduce (orthogonalization, ``P Q^T``, the division) depends
only on all-reduced data and runs the same deterministic kernels on every
rank (same torch build and thread settings, as under one ``torchrun``).
This holds even if ranks' memories disagree (e.g. restored from different
checkpoints); the approximation is then poor for one call and the shared
``Q`` is back in sync after it.

NaN and Inf
-----------
A non-finite element in a compressed tensor on any rank makes that whole
tensor NaN on every rank (its factors carry no information); other tensors
of the call are not affected. Its residual is reset to zero and its ``Q`` to
a fresh random one, so one bad step does not poison the next. Uncompressed
tensors behave like plain ``all_reduce`` (NaN stays where it is).

Every rank must call with the same keys, shapes and dtypes in the same order
(as with any collective); a mismatch makes the backend all-reduce fail.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..codec import FLOAT_DTYPES
from ..codecs.powersgd import PowerSGD, orthogonalize_, seeded_normal
from ..errors import CodecMismatchError, ConfigError, UnsupportedDtypeError
from ..registry import CodecLike, get_codec

__all__ = ["PowerSGDMemory", "all_reduce_many", "plan", "Plan"]

_STATE_VERSION = 1


class PowerSGDMemory:
    """Per-key state of the PowerSGD all-reduce: warm-start ``Q`` and error-feedback residual.

    A memory is used with one codec config (the first one it sees); the residual
    and ``Q`` of one config mean nothing to another, so using it with another one
    raises until ``reset()``.

    Keys name a tensor that is "the same thing" from call to call (a parameter
    name, a DDP bucket index); their ``repr`` seeds the first ``Q``, so use keys
    whose ``repr`` is the same on every rank (strings, ints, tuples of them).

    Gradient accumulation: call ``all_reduce_many`` once per optimizer step, not
    per micro-batch; the residual is meant to be added once per communication.

    Checkpoints: ``state_dict()`` holds CPU copies. The residuals are per rank
    (each rank's own loss), so save and restore every rank's memory, not only
    rank 0's; ``Q`` is the same on every rank.

    Example::

        memory = PowerSGDMemory()
        for step in range(steps):
            grads = [p.grad for p in model.parameters()]
            all_reduce_many(grads, "powersgd:rank=4", average=True, memory=memory,
                            keys=[n for n, _ in model.named_parameters()])
    """

    def __init__(self) -> None:
        self.spec: str | None = None
        self._q: dict[Hashable, torch.Tensor] = {}
        self._residuals: dict[Hashable, torch.Tensor] = {}
        self._calls: dict[Hashable, int] = {}

    def __repr__(self) -> str:
        return f"PowerSGDMemory(spec={self.spec!r}, keys={len(self._calls)})"

    def __len__(self) -> int:
        return len(self._calls)

    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The float32 ``(m, n)`` residual of ``key``, or None (read-only use)."""
        return self._residuals.get(key)

    def reset(self, key: Hashable | None = None) -> None:
        """Forget ``key`` (residual, ``Q``, call count), or everything (and the codec) when None."""
        if key is None:
            self.spec = None
            self._q.clear()
            self._residuals.clear()
            self._calls.clear()
        else:
            for d in (self._q, self._residuals, self._calls):
                d.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of every key's ``Q`` and residual, the call counts and the codec spec."""
        return {
            "version": _STATE_VERSION,
            "codec": self.spec,
            "q": {k: v.detach().cpu().clone() for k, v in self._q.items()},
            "residuals": {k: v.detach().cpu().clone() for k, v in self._residuals.items()},
            "calls": dict(self._calls),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (tensors move to the right device on next use).

        Raises:
            ConfigError: ``state`` is not a PowerSGD memory state of this version.
        """
        keys = ("version", "codec", "q", "residuals", "calls")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ConfigError(f"PowerSGD memory state must be a dict with keys {list(keys)}")
        if state["version"] != _STATE_VERSION:
            raise ConfigError(
                f"PowerSGD memory state has version {state['version']!r}; this commpress "
                f"reads version {_STATE_VERSION}"
            )
        self.spec = state["codec"]
        self._q = {k: v.detach().float().clone() for k, v in state["q"].items()}
        self._residuals = {k: v.detach().float().clone() for k, v in state["residuals"].items()}
        self._calls = {k: int(v) for k, v in state["calls"].items()}

    def _bind(self, codec: PowerSGD) -> None:
        if self.spec is None:
            self.spec = codec.spec
        elif self.spec != codec.spec:
            raise CodecMismatchError(
                f"this PowerSGD memory holds state for {self.spec!r} but is used with "
                f"{codec.spec!r}; use one memory per codec config, or call memory.reset()"
            )


@dataclass(frozen=True)
class Plan:
    """How ``all_reduce_many`` will move a list of tensors (the same on every rank).

    Attributes:
        matrices: indices of the tensors sent as factors, with their ``(m, n)`` views.
        raw: indices of the tensors sent uncompressed.
        raw_nbytes: bytes of the uncompressed all-reduce buffer(s).
        factor_nbytes: bytes of the ``P`` plus the ``Q`` all-reduce buffers (float32).
        input_nbytes: bytes of all the tensors as given.
    """

    matrices: tuple[tuple[int, tuple[int, int]], ...]
    raw: tuple[int, ...]
    raw_nbytes: int
    factor_nbytes: int
    input_nbytes: int

    def wire_nbytes(self) -> int:
        """Bytes handed to the backend all-reduces in one call, per rank."""
        return self.raw_nbytes + self.factor_nbytes


def plan(tensors: Sequence[torch.Tensor], codec: CodecLike) -> Plan:
    """Decide which tensors go as factors and which raw; no communication.

    Raises:
        ConfigError: ``codec`` is not a ``powersgd`` codec.
    """
    psgd = _as_powersgd(codec)
    matrices, raw = [], []
    raw_nbytes = factor_nbytes = input_nbytes = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        input_nbytes += nbytes
        view = psgd.matrix_shape(t.shape) if t.dim() >= 2 else None
        if view is not None and psgd.compresses(t.shape, t.dtype):
            matrices.append((i, view))
            factor_nbytes += (view[0] + view[1]) * psgd.rank * 4
        elif t.numel():
            raw.append(i)
            raw_nbytes += nbytes
    return Plan(tuple(matrices), tuple(raw), raw_nbytes, factor_nbytes, input_nbytes)


def all_reduce_many(
    tensors: Sequence[torch.Tensor],
    codec: CodecLike,
    *,
    average: bool,
    group: dist.ProcessGroup | None = None,
    memory: PowerSGDMemory,
    keys: Sequence[Hashable],
) -> None:
    """Sum (or average) ``tensors`` over ``group`` in place, PowerSGD-compressed.

    Blocking, on the calling thread, with plain ``torch.distributed`` calls (three
    all-reduces at most; see the module docstring).

    Args:
        tensors: floating tensors (float32/float16/bfloat16/float64), all on one
            device, any shapes; written in place.
        codec: a ``powersgd`` codec or spec (``"powersgd:rank=4"``).
        average: divide the sum by the group size.
        group: the process group (default: the world).
        memory: warm-start and error-feedback state; keep one per stream of calls.
        keys: one distinct key per tensor, the same on every rank.

    Raises:
        ConfigError: ``codec`` is not ``powersgd``, keys are missing or repeated, or a
            key's stored residual has another shape than its tensor.
        UnsupportedDtypeError: a tensor is not floating.
        CodecMismatchError: ``memory`` was used with another codec config.
    """
    psgd = _as_powersgd(codec)
    tensors = list(tensors)
    keys = list(keys)
    _check_args(tensors, keys)
    memory._bind(psgd)
    if not tensors:
        return
    world = dist.get_world_size(group)
    layout = plan(tensors, psgd)
    for i, view in layout.matrices:  # before any communication: fail on every rank alike
        residual = memory._residuals.get(keys[i])
        if residual is not None and residual.shape != view:
            raise ConfigError(
                f"PowerSGD key {keys[i]!r} holds a residual of shape {tuple(residual.shape)} "
                f"but its tensor is viewed as {view}; use a distinct key per tensor"
            )

    # 1. Uncompressed tensors: one flat buffer per dtype, left running during step 2.
    raw_jobs = []
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in layout.raw:
        by_dtype.setdefault(tensors[i].dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([_compensated_raw(tensors[i], keys[i], memory) for i in idx])
        raw_jobs.append((idx, flat, dist.all_reduce(flat, group=group, async_op=True)))

    if layout.matrices:
        _reduce_matrices(tensors, keys, layout.matrices, psgd, average, world, group, memory)

    for idx, flat, work in raw_jobs:
        work.wait()
        if average:
            flat.div_(world)
        offset = 0
        for i in idx:
            t = tensors[i]
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()

    for k in keys:
        memory._calls[k] = memory._calls.get(k, 0) + 1


def _reduce_matrices(
    tensors: list[torch.Tensor],
    keys: list[Hashable],
    matrices: tuple[tuple[int, tuple[int, int]], ...],
    psgd: PowerSGD,
    average: bool,
    world: int,
    group: dist.ProcessGroup | None,
    memory: PowerSGDMemory,
) -> None:
    r = psgd.rank
    device = tensors[matrices[0][0]].device
    p_buf = torch.empty(sum(m * r for _, (m, _n) in matrices), device=device)
    # Q is kept transposed, (r, n): P^T M reads M row by row, about twice as fast on
    # CPU as M^T P; the buffer layout is private (the all-reduce only sums it).
    qt_buf = torch.empty(sum(n * r for _, (_m, n) in matrices), device=device)
    mats, ps, qts, q_starts = [], [], [], []
    p_off = q_off = 0
    for i, (m, n) in matrices:
        key = keys[i]
        view = tensors[i].detach().reshape(m, n)
        residual = memory._residuals.get(key)
        if residual is None:
            mat = view.to(torch.float32, copy=True)
        else:
            # The residual's buffer becomes this call's work matrix and then the new
            # residual: no m x n allocation per call. Popped, so a call that fails
            # half-way leaves no half-updated residual behind (only a lost one).
            mat = memory._residuals.pop(key).to(device).add_(view)
        q_start = _initial_q(psgd, memory, key, n, device)
        p = p_buf[p_off : p_off + m * r].view(m, r)
        torch.mm(mat, q_start, out=p)
        mats.append(mat)
        ps.append(p)
        qts.append(qt_buf[q_off : q_off + n * r].view(r, n))
        q_starts.append(q_start)
        p_off += m * r
        q_off += n * r

    dist.all_reduce(p_buf, group=group)

    # P is the same on every rank now, so is this decision (one host sync per call).
    if bool(torch.isfinite(p_buf).all()):
        finite = [True] * len(ps)
    else:
        finite = torch.stack([torch.isfinite(p).all() for p in ps]).tolist()
    for p, ok in zip(ps, finite, strict=True):
        if ok:
            orthogonalize_(p, psgd.orthogonalize)
        else:
            p.zero_()  # a clean placeholder; the output is set to NaN below

    for mat, p, qt in zip(mats, ps, qts, strict=True):
        torch.mm(p.T, mat, out=qt)
        # What this rank's own contribution loses: its residual (before averaging).
        mat.addmm_(p, qt, alpha=-1.0)

    dist.all_reduce(qt_buf, group=group)

    for (i, _view), mat, p, qt, q_start, ok in zip(
        matrices, mats, ps, qts, q_starts, finite, strict=True
    ):
        key = keys[i]
        t = tensors[i]
        if not ok:
            memory._q.pop(key, None)
            t.fill_(float("nan"))
            continue
        # A finite P means a finite input, so the residual is finite too.
        memory._residuals[key] = mat
        if psgd.warm_start:
            # Keep the new Q unless it came back zero (or overflowed): the old one
            # still spans a useful subspace. The test runs on device, no sync.
            usable = torch.isfinite(qt).all() & (qt.abs().amax() > 0)
            memory._q[key] = torch.where(usable, qt.T, q_start)
        if average:
            qt.div_(world)  # r x n, not the m x n product
        if t.dtype == torch.float32 and t.is_contiguous():
            torch.mm(p, qt, out=t.view(p.shape[0], qt.shape[1]))
        else:
            t.copy_((p @ qt).view(t.shape))


def _initial_q(
    psgd: PowerSGD, memory: PowerSGDMemory, key: Hashable, n: int, device: torch.device
) -> torch.Tensor:
    q = memory._q.get(key) if psgd.warm_start else None
    if q is not None and q.shape == (n, psgd.rank):
        return q.to(device)
    salt = f"{key!r}|{memory._calls.get(key, 0)}"
    return seeded_normal((n, psgd.rank), psgd.seed, salt=salt, device=device)


def _compensated_raw(t: torch.Tensor, key: Hashable, memory: PowerSGDMemory) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    # Only a key that was compressed before (its dtype changed since) has a residual here:
    # hand it over, then forget it -- raw tensors lose nothing.
    residual = memory._residuals.pop(key, None)
    if residual is None or residual.numel() != flat.numel():
        return flat
    return (flat.float() + residual.reshape(-1)[: flat.numel()].to(flat.device)).to(t.dtype)


def _as_powersgd(codec: CodecLike) -> PowerSGD:
    c = get_codec(codec)
    if not isinstance(c, PowerSGD):
        raise ConfigError(
            f"the PowerSGD all-reduce needs a 'powersgd' codec, got {c.spec!r}; "
            "other codecs go through commpress.distributed.all_reduce"
        )
    return c


def _check_args(tensors: list[torch.Tensor], keys: list[Hashable]) -> None:
    if len(keys) != len(tensors):
        raise ConfigError(
            f"all_reduce_many got {len(tensors)} tensors but {len(keys)} keys; "
            "pass one key per tensor"
        )
    seen: set[Hashable] = set()
    for k in keys:
        if k in seen:
            raise ConfigError(f"all_reduce_many: key {k!r} is given twice; keys must be distinct")
        seen.add(k)
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"all_reduce_many takes torch.Tensor items, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise UnsupportedDtypeError(
                f"PowerSGD all-reduce takes floating tensors only, got "
                f"{str(t.dtype).replace('torch.', '')}; reduce integer and bool tensors with "
                "plain torch.distributed.all_reduce"
            )
    if len(devices) > 1:
        raise ConfigError(
            f"all_reduce_many needs every tensor on one device, got {sorted(map(str, devices))}"
        )
