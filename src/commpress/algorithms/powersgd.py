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

Blocking and chained
--------------------
One call is cut at its two network waits into steps that both drivers run
with the same math and post in the same order: post the uncompressed
all-reduces; *prepare* (local: compensate, ``P = M Q``); post ``P``'s
all-reduce; *after P* (orthogonalize, ``Q``, residuals; post ``Q``'s
all-reduce); *finish* (write the outputs, update the memory). The steps touch
disjoint buffers, so running *prepare* first (as a chained call waiting for
``after`` does) changes no bit. `all_reduce_many` runs them on the calling
thread, waiting for each all-reduce; `all_reduce_many_async` returns
at once with `Pending` futures and runs the later steps in the completion
callbacks of the backend's works (``work.get_future()``), never waiting
inside one -- as torch's ``powerSGD_hook`` chains ``Future.then``, without
its blocking ``wait()`` in the callback. Both give bit-identical results.

Collectives on one group must be posted in the same order on every rank, and
the chained form posts ``Q``'s all-reduce from a callback, whenever ``P``'s
completes. So a chained call posts nothing until ``after`` (the previous
chained call's ``Pending.posted``) has completed: calls in flight on one group
then post bucket by bucket, ``P_k, Q_k, P_k+1, ...``, on every rank alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..codec import FLOAT_DTYPES
from ..codecs.powersgd import PowerSGD, orthogonalize_, seeded_normal
from ..errors import CollectiveError, ConfigError, UnsupportedDtypeError
from ..registry import CodecLike, get_codec
from .common import Comm, describe
from .powersgd_memory import PowerSGDMemory, memory, reset_memory

#: The algorithm's code in the collective descriptor (`lowrank.PowerSGDAlgorithm`).
WIRE_CODE = 5

__all__ = [
    "PowerSGDMemory",
    "memory",
    "reset_memory",
    "Plan",
    "plan",
    "Pending",
    "all_reduce",
    "all_reduce_many",
    "all_reduce_many_async",
]


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


@dataclass(frozen=True)
class Pending:
    """A chained PowerSGD all-reduce in flight (`all_reduce_many_async`).

    Attributes:
        posted: completes once the call has posted its last backend all-reduce
            (pass it as the next chained call's ``after``); carries the call's
            failure, if it failed before that.
        done: completes (value None) once every output is written and the memory
            updated; carries the call's failure, if any.
    """

    posted: torch.futures.Future[None]
    done: torch.futures.Future[None]


def all_reduce(comm: Comm, tensor: torch.Tensor, op: Any, key: Hashable) -> None:
    """All-reduce one ``tensor`` in place with PowerSGD: the call glue of the face.

    Exchanges descriptors first (PowerSGD's backend all-reduces abort gloo when the
    ranks' shapes differ), then runs `all_reduce_many` with the process-wide
    `memory` of ``comm.codec``, adds the wire bytes and the time to ``comm.rec``,
    and writes the result back when ``tensor`` is not contiguous.

    Args:
        comm: the call (its group, size, codec and stats record).
        tensor: a floating tensor, any shape; written in place.
        op: ``ReduceOp.SUM`` or ``ReduceOp.AVG``.
        key: the memory key of ``tensor`` (the same on every rank).

    Raises:
        CollectiveError: the ranks' tensors have different shapes (on every rank).
        CodecMismatchError: the ranks use different codec configs.
    """
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    wire_nbytes = plan([tensor], comm.codec).wire_nbytes()
    d = describe(comm, WIRE_CODE, tensor, [wire_nbytes] * comm.size, redop=op)
    sizes = [d.sizes_from(r)[0] for r in range(comm.size)]
    if len(set(sizes)) > 1:
        raise CollectiveError(
            f"{comm.op}: the ranks' tensors have different shapes (PowerSGD factor sizes "
            f"{sizes} bytes); shapes must match"
        )
    t0 = time.perf_counter()
    all_reduce_many(
        [work],
        comm.codec,
        average=op == dist.ReduceOp.AVG,
        group=comm.group,
        memory=memory(comm.codec),
        keys=[key],
    )
    comm.rec.transfer_s += time.perf_counter() - t0
    comm.rec.bytes_wire += wire_nbytes
    if work is not tensor:
        with torch.no_grad():
            tensor.copy_(work)


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
    call = _Rounds(tensors, codec, average, group, memory, keys)
    if call.empty:
        return
    call.post_raw()
    call.prepare()
    call.post_p()
    if call.p_work is not None:
        call.p_work.wait()
        call.after_p()
        call.q_work.wait()
    for _idx, _flat, work in call.raw:
        work.wait()
    call.finish()


def all_reduce_many_async(
    tensors: Sequence[torch.Tensor],
    codec: CodecLike,
    *,
    average: bool,
    group: dist.ProcessGroup | None = None,
    memory: PowerSGDMemory,
    keys: Sequence[Hashable],
    after: torch.futures.Future[Any] | None = None,
) -> Pending:
    """`all_reduce_many` as a chain of futures: returns before any all-reduce completes.

    The arguments are checked and the local work before the first all-reduce
    (compensation, ``P = M Q``) is done on the calling thread; the all-reduces are
    posted once ``after`` has completed (at once when None), and the rest runs in
    the backend's completion callbacks (see "Blocking and chained" in the module
    docstring). Do not touch ``tensors`` or ``memory``'s keys until ``done``.

    Args:
        after: post nothing before this future completes (with a value or a
            failure: a call that failed on every rank alike posts no more, and the
            next one may go); pass the previous chained call's ``Pending.posted``
            on the same group, so that every rank posts in the same order.
        tensors, codec, average, group, memory, keys: as `all_reduce_many`.

    Returns:
        `Pending`: ``posted`` and ``done`` futures of the call.

    Raises:
        As `all_reduce_many`, at once, for bad arguments; failures of the
        all-reduces come through ``Pending.done``.
    """
    call = _Rounds(tensors, codec, average, group, memory, keys)
    posted: torch.futures.Future[None] = torch.futures.Future()
    done: torch.futures.Future[None] = torch.futures.Future()

    def fail(exc: BaseException) -> None:
        for fut in (posted, done):
            if not fut.done():
                fut.set_exception(exc)

    def finish() -> None:
        call.finish()
        done.set_result(None)

    def after_p() -> None:
        call.after_p()
        posted.set_result(None)
        _when_all([call.q_work, *(w for _i, _f, w in call.raw)], finish, fail)

    def chain() -> None:
        if call.p_work is None:
            posted.set_result(None)
            _when_all([w for _i, _f, w in call.raw], finish, fail)
        else:
            _when_all([call.p_work], after_p, fail)

    def post() -> None:
        call.post_raw()
        call.post_p()
        chain()

    if call.empty:
        posted.set_result(None)
        done.set_result(None)
    elif after is None:  # the order of the blocking form: raw traffic overlaps P = M Q
        call.post_raw()
        call.prepare()
        call.post_p()
        chain()
    else:
        call.prepare()
        after.add_done_callback(lambda _: _guarded(post, fail))
    return Pending(posted, done)


def _guarded(step: Callable[[], Any], fail: Callable[[BaseException], None]) -> None:
    """Run ``step`` (in a completion callback: no autograd), handing any failure to ``fail``."""
    try:
        with torch.no_grad():
            step()
    except BaseException as exc:  # noqa: BLE001 - a callback must not raise: pass it on
        fail(exc)


def _when_all(works: Sequence[Any], step: Callable[[], None], fail: Callable) -> None:
    """Run ``step`` once every one of ``works`` has completed (``fail`` on the first error)."""
    futures = [w.get_future() for w in works]

    def check() -> None:
        for fut in futures:
            fut.value()  # re-raises the backend's failure
        step()

    torch.futures.collect_all(futures).add_done_callback(lambda _: _guarded(check, fail))


class _Rounds:
    """One PowerSGD all-reduce, cut at its network waits (module docstring)."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        codec: CodecLike,
        average: bool,
        group: dist.ProcessGroup | None,
        memory: PowerSGDMemory,
        keys: Sequence[Hashable],
    ) -> None:
        psgd = _as_powersgd(codec)
        self.tensors = list(tensors)
        self.keys = list(keys)
        _check_args(self.tensors, self.keys)
        memory._bind(psgd)
        self.empty = not self.tensors
        self.psgd, self.average, self.group, self.memory = psgd, average, group, memory
        self.raw: list[tuple[list[int], torch.Tensor, Any]] = []
        self.p_work: Any = None
        self.q_work: Any = None
        if self.empty:
            return
        self.world = dist.get_world_size(group)
        self.layout = plan(self.tensors, psgd)
        for i, view in self.layout.matrices:  # before any communication: fail on every rank
            residual = memory._residuals.get(self.keys[i])
            if residual is not None and residual.shape != view:
                raise ConfigError(
                    f"PowerSGD key {self.keys[i]!r} holds a residual of shape "
                    f"{tuple(residual.shape)} but its tensor is viewed as {view}; use a "
                    "distinct key per tensor"
                )
        # Uncompressed tensors: one flat buffer per dtype.
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in self.layout.raw:
            by_dtype.setdefault(self.tensors[i].dtype, []).append(i)
        self._raw_flats = [
            (idx, torch.cat([_compensated_raw(self.tensors[i], self.keys[i], memory) for i in idx]))
            for idx in by_dtype.values()
        ]

    def post_raw(self) -> None:
        """Post the uncompressed all-reduces (left running while the factors compute)."""
        for idx, flat in self._raw_flats:
            self.raw.append((idx, flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    def prepare(self) -> None:
        """Compensate each matrix with its residual and compute ``P = M Q`` (local work)."""
        tensors, keys, memory, psgd = self.tensors, self.keys, self.memory, self.psgd
        matrices = self.layout.matrices
        if not matrices:
            return
        r = psgd.rank
        device = tensors[matrices[0][0]].device
        self.p_buf = torch.empty(sum(m * r for _, (m, _n) in matrices), device=device)
        # Q is kept transposed, (r, n): P^T M reads M row by row, about twice as fast on
        # CPU as M^T P; the buffer layout is private (the all-reduce only sums it).
        self.qt_buf = torch.empty(sum(n * r for _, (_m, n) in matrices), device=device)
        self.mats, self.ps, self.qts, self.q_starts = [], [], [], []
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
            p = self.p_buf[p_off : p_off + m * r].view(m, r)
            torch.mm(mat, q_start, out=p)
            self.mats.append(mat)
            self.ps.append(p)
            self.qts.append(self.qt_buf[q_off : q_off + n * r].view(r, n))
            self.q_starts.append(q_start)
            p_off += m * r
            q_off += n * r

    def post_p(self) -> None:
        """Post ``P``'s all-reduce (if any matrix is compressed)."""
        if self.layout.matrices:
            self.p_work = dist.all_reduce(self.p_buf, group=self.group, async_op=True)

    def after_p(self) -> None:
        """With ``P`` summed: orthogonalize, ``Q`` and the residuals; post ``Q``'s all-reduce."""
        # P is the same on every rank now, so is this decision (one host sync per call).
        if bool(torch.isfinite(self.p_buf).all()):
            self.finite = [True] * len(self.ps)
        else:
            self.finite = torch.stack([torch.isfinite(p).all() for p in self.ps]).tolist()
        for p, ok in zip(self.ps, self.finite, strict=True):
            if ok:
                orthogonalize_(p, self.psgd.orthogonalize)
            else:
                p.zero_()  # a clean placeholder; the output is set to NaN below
        for mat, p, qt in zip(self.mats, self.ps, self.qts, strict=True):
            torch.mm(p.T, mat, out=qt)
            # What this rank's own contribution loses: its residual (before averaging).
            mat.addmm_(p, qt, alpha=-1.0)
        self.q_work = dist.all_reduce(self.qt_buf, group=self.group, async_op=True)

    def finish(self) -> None:
        """With every all-reduce complete: write the outputs and update the memory."""
        if self.layout.matrices:
            self._finish_factors()
        for idx, flat, _work in self.raw:
            if self.average:
                flat.div_(self.world)
            offset = 0
            for i in idx:
                t = self.tensors[i]
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
        calls = self.memory._calls
        for k in self.keys:
            calls[k] = calls.get(k, 0) + 1

    def _finish_factors(self) -> None:
        memory, psgd = self.memory, self.psgd
        for (i, _view), mat, p, qt, q_start, ok in zip(
            self.layout.matrices, self.mats, self.ps, self.qts, self.q_starts, self.finite,
            strict=True,
        ):  # fmt: skip
            key = self.keys[i]
            t = self.tensors[i]
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
            if self.average:
                qt.div_(self.world)  # r x n, not the m x n product
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
