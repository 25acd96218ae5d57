"""Compressed collectives with ``torch.distributed``'s signatures.

``import commpress.distributed as cdist`` and call ``cdist.all_reduce(t)``
where you called ``dist.all_reduce(t)``: every function takes the same
arguments with the same defaults, works in place the same way and returns
the same thing (``None``; the sender's rank for `recv`; a `Handle` -- with
``wait``, ``is_completed``, ``get_future`` like ``torch.distributed.Work``
-- for ``async_op=True``, `isend` and `irecv`). Each adds the keyword
``codec=`` (a spec string such as ``"int8"``, a config dict, a `Codec`, or
None for the policy's codec), and the reductions add ``key=`` (the
error-feedback key).

Example::

    import torch, commpress.distributed as cdist
    grad = torch.randn(1 << 20)
    cdist.all_reduce(grad, codec="int8")                 # in place, like dist.all_reduce
    h = cdist.all_gather_into_tensor(out, shard, codec="bf16", async_op=True)
    ...                                                   # compute overlaps the transfer
    h.wait()

What gets compressed is decided per call by `commpress.policy.decide`:
lossy codecs only for floating tensors under SUM/AVG and for ops that only
move data; MIN/MAX/PRODUCT/bitwise reductions and integer/bool tensors go
through plain ``torch.distributed`` (or a lossless codec); tensors below
``Policy.min_bytes`` and single-rank groups pass through. AVG is computed as
a sum divided by the group size. See ``docs/collectives.md`` for the design
decisions (descriptor exchange, ordering, error-feedback keys).

Outputs of a compressed call are decoded values on every rank, including a
rank's own contribution (all_gather, gather, all_to_all, scatter) and the
source tensor of `broadcast`: the result does not depend on which rank one
looks at. A ``reduce`` leaves the non-destination ranks' tensors unchanged.

Error feedback keys: ``key=`` names the tensor's stream of values (a
parameter name). Without it, and only when error feedback is on, the key is
``(op, group, shape, dtype, "module:function+line" of the caller, slot)``:
the site names the caller's module and function and counts the line from its
``def``, so keys survive a move of the checkout (checkpointed residuals load
in another directory) and edits elsewhere in the file; the slot tells apart
tensors reduced at one site (a loop over layers): each live tensor keeps its
slot, a new one takes the slot of a freed one (see `_auto_key`).
Temporaries made inside such a loop share a slot: pass ``key=`` there.
Residuals live in `error_feedback` (per codec config), PowerSGD state in
`powersgd_memory`; `reset_error_feedback` clears both.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .algorithms import direct, gather, hierarchical, transport, two_phase
from .algorithms.common import Comm, acc_dtype, exchange, reject
from .codec import Codec
from .engine import Engine, Handle, get_engine
from .errors import CollectiveError, CommpressError, ConfigError
from .feedback import ErrorFeedback
from .policy import Decision, Policy, decide, get_policy
from .registry import CodecLike, get_codec
from .stats import CallRecord, record

try:  # PowerSGD lives in its own module; everything else works without it
    from .algorithms import powersgd as _psgd
except ImportError:  # pragma: no cover - only while the module is missing
    _psgd = None  # type: ignore[assignment]

__all__ = [
    "all_reduce",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "gather",
    "scatter",
    "Handle",
    "ReduceOp",
    "error_feedback",
    "powersgd_memory",
    "reset_error_feedback",
]

ReduceOp = dist.ReduceOp
_SUM = dist.ReduceOp.SUM
_ALGORITHMS: dict[str, Any] = {
    "direct": direct,
    "two_phase": two_phase,
    "gather": gather,
    "hierarchical": hierarchical,
}


# ------------------------------------------------------------- state stores
_state_lock = threading.Lock()
_feedback: dict[Codec, ErrorFeedback] = {}
_psgd_memory: dict[Codec, Any] = {}


def error_feedback(codec: CodecLike) -> ErrorFeedback:
    """The error-feedback memory of the compressed collectives for ``codec`` (residuals per key).

    Use it to inspect residuals, or to checkpoint them with ``state_dict()``.
    """
    c = get_codec(codec)
    with _state_lock:
        ef = _feedback.get(c)
        if ef is None:
            ef = _feedback[c] = ErrorFeedback(c)
        return ef


def powersgd_memory(codec: CodecLike) -> Any:
    """The ``PowerSGDMemory`` (warm-start Q and residuals) used for ``codec``'s all-reduces."""
    if _psgd is None:
        raise ConfigError("commpress.algorithms.powersgd is not available in this installation")
    c = get_codec(codec)
    with _state_lock:
        memory = _psgd_memory.get(c)
        if memory is None:
            memory = _psgd_memory[c] = _psgd.PowerSGDMemory()
        return memory


def reset_error_feedback() -> None:
    """Forget every residual and every PowerSGD state of the compressed collectives."""
    with _state_lock:
        _feedback.clear()
        _psgd_memory.clear()


# ------------------------------------------------------------------ helpers
def _check_tensor(t: Any, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_list(ts: Any, name: str) -> list[torch.Tensor]:
    if not isinstance(ts, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in ts):
        raise TypeError(f"{name} must be a list of torch.Tensor, got {type(ts).__name__}")
    return list(ts)


def _not_member(group: Any) -> bool:
    return c10d._rank_not_in_group(group)


def _group_key(group: Any) -> str:
    pg = group if group is not None else dist.group.WORLD
    try:
        return str(pg.group_name)
    except (AttributeError, RuntimeError):
        return f"pg{id(pg)}"


def _root(
    group: Any,
    size: int,
    op: str,
    name: str,
    global_rank: int | None,
    group_rank: int | None,
    default: int | None = None,
) -> int:
    """The group rank of a root given as ``name=`` (global) or ``group_name=`` (group)."""
    if global_rank is not None and group_rank is not None:
        raise ConfigError(
            f"{op}: pass {name}= (a global rank) or group_{name}= (a group rank), not both"
        )
    if global_rank is None and group_rank is None:
        if default is None:
            raise ConfigError(
                f"{op}: {name}= (a global rank) or group_{name}= (a group rank) is required"
            )
        global_rank = default
    if group_rank is not None:
        if (
            isinstance(group_rank, bool)
            or not isinstance(group_rank, int)
            or not 0 <= group_rank < size
        ):
            raise ConfigError(
                f"{op}: group_{name}={group_rank!r} is out of range for a group of {size} ranks "
                f"(expected 0 <= group_{name} < {size})"
            )
        return group_rank
    if isinstance(global_rank, bool) or not isinstance(global_rank, int):
        raise ConfigError(f"{op}: {name}={global_rank!r} is not a rank; expected an int")
    if group is None or group is dist.GroupMember.WORLD:
        if not 0 <= global_rank < size:
            raise ConfigError(
                f"{op}: {name}={global_rank} is out of range for a world of {size} ranks "
                f"(expected 0 <= {name} < {size})"
            )
        return global_rank
    try:
        return dist.get_group_rank(group, global_rank)
    except (ValueError, RuntimeError):
        ranks = dist.get_process_group_ranks(group)
        raise ConfigError(
            f"{op}: {name}={global_rank} is not a member of this group (its global ranks are "
            f"{ranks}); pass a global rank from that list, or group_{name}= a group rank"
        ) from None


def _call_site() -> str:
    """``"module:function+line"`` of the first caller outside commpress and torch.distributed.

    The module is the caller's ``__name__`` (for a script: its ``__spec__`` name under
    ``python -m``, else its file name without ``.py``) and the line is counted from the
    function's ``def``: the site survives a move of the checkout and edits elsewhere in
    the file, which absolute ``path:line`` did not.
    """
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "commpress" or name.startswith(("commpress.", "torch.distributed"))):
            code = frame.f_code
            if name == "__main__":
                spec = frame.f_globals.get("__spec__")
                name = getattr(spec, "name", None) or os.path.splitext(
                    os.path.basename(code.co_filename)
                )[0]
            qualname = getattr(code, "co_qualname", code.co_name)
            return f"{name}:{qualname}+{frame.f_lineno - code.co_firstlineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Call:
    """One call: its group, decision and stats record."""

    def __init__(
        self, op: str, group: Any, decision: Decision, bytes_in: int, policy: Policy, engine: Engine
    ) -> None:
        self.op = op
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.decision = decision
        self.policy = policy
        self.engine = engine
        self.key = _group_key(group)
        self.rec = CallRecord(op, compressed=decision.compressed, bytes_in=bytes_in)

    def comm(
        self, device: torch.device, dtype: torch.dtype | None, key: Hashable | None = None
    ) -> Comm:
        codec = self.decision.codec
        assert codec is not None
        fixed = dtype is not None and codec.encoded_nbytes(1, dtype) is not None
        feedback = error_feedback(codec) if self.decision.error_feedback else None
        return Comm(
            op=self.op,
            group=self.group,
            rank=self.rank,
            size=self.size,
            device=device,
            codec=codec,
            verify=self.policy.verify or not fixed,
            checksum=self.policy.checksum,
            rec=self.rec,
            feedback=feedback,
            key=key if feedback is not None else None,
        )

    def run(
        self,
        job: Callable[[], Any],
        async_op: bool,
        device: torch.device,
        tensors: Sequence[torch.Tensor] = (),
    ) -> Any:
        """Run a compressed job in issue order; translate backend failures."""
        op, rec = self.op, self.rec

        def wrapped() -> Any:
            try:
                value = job()
            except CommpressError:
                raise
            except RuntimeError as exc:
                raise CollectiveError(
                    f"{op} failed in the backend ({exc}); a peer may have died or timed out, "
                    "or the ranks called collectives in different orders"
                ) from exc
            record(rec)
            return value

        result = self.engine.run(
            self.key, wrapped, async_op=async_op, device=device, tensors=tensors
        )
        # Like torch.distributed: a Handle when async, else None (never the output list).
        return result if async_op else None

    def plain(self, fn: Callable[[bool], Any], async_op: bool, outputs: list[torch.Tensor]) -> Any:
        """Hand the call to plain torch.distributed, keeping issue order with queued calls.

        ``fn(async_op)`` makes the torch call. Returns None or a `Handle`.
        """
        rec = self.rec
        if self.engine.idle(self.key):
            t0 = time.perf_counter()
            work = fn(async_op)
            rec.transfer_s += time.perf_counter() - t0
            record(rec)
            if not async_op:
                return None
            if work is None:
                return Handle.done(outputs)
            return Handle(completer=lambda: (work.wait(), outputs)[1], poll=work.is_completed)

        def job() -> list[torch.Tensor]:
            fn(False)
            record(rec)
            return outputs

        result = self.engine.run(self.key, job, async_op=async_op)
        return result if async_op else None

    def reject(self, comm: Comm, error: BaseException, async_op: bool) -> Any:
        """Tell the peers this rank's arguments are bad (if they will wait for it), then raise."""
        if comm.verify:

            def job() -> None:
                reject(comm, error)
                raise error

            self.engine.run(self.key, job, async_op=False, device=comm.device)
        raise error


def _begin(
    op: str,
    group: Any,
    tensor: torch.Tensor,
    reduce_op: Any,
    codec: CodecLike | None,
    nbytes: int | None = None,
    bytes_in: int | None = None,
) -> _Call:
    policy = get_policy()
    size = dist.get_world_size(group)
    decision = decide(op, tensor, reduce_op, codec, world_size=size, nbytes=nbytes, policy=policy)
    return _Call(
        op, group, decision, _nbytes(tensor) if bytes_in is None else bytes_in, policy, get_engine()
    )


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1)


def _write(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.data_ptr() == dst.data_ptr() and src.dtype == dst.dtype and dst.is_contiguous():
        return  # computed in place
    with torch.no_grad():
        dst.copy_(src.view(dst.shape))


#: Most tensors one call site may keep apart before `_auto_key` asks for ``key=``.
_MAX_SLOTS_PER_SITE = 1024
_slots_lock = threading.Lock()
# (op, group, shape, dtype, site) -> one weak reference per slot: the tensor that used it last
_site_slots: dict[tuple, list[Any]] = {}


def _auto_key(op: str, group: Any, t: torch.Tensor) -> tuple:
    """The error-feedback key of a call without ``key=``: site, shape, dtype and a slot.

    Tensors reduced at one call site (a loop over layers) get one slot each, in call
    order: a tensor (or the tensor it is a view of) that used a slot before keeps it;
    a new one takes the first slot whose previous tensor has been freed (last step's
    gradients, after ``zero_grad``), else a new slot. So ``for p in params:
    all_reduce(p.grad)`` keeps one residual per parameter, step after step, whether
    ``zero_grad`` frees the gradients or zeroes them in place. What this cannot tell
    apart: temporaries made and freed inside the loop (``all_reduce(torch.cat(...))``)
    share one slot -- pass ``key=`` there.

    Raises:
        ConfigError: one site kept more than 1024 tensors alive at once.
    """
    site = (op, _group_key(group), tuple(t.shape), str(t.dtype), _call_site())
    owner = t._base if t._base is not None else t
    with _slots_lock:
        slots = _site_slots.setdefault(site, [])
        free = None
        for i, ref in enumerate(slots):
            held = ref()
            if held is owner:
                return (*site, i)
            if held is None and free is None:
                free = i
        if free is None:
            if len(slots) >= _MAX_SLOTS_PER_SITE:
                raise ConfigError(
                    f"{op} at {site[-1]}: error feedback keeps more than "
                    f"{_MAX_SLOTS_PER_SITE} live tensors of shape {list(t.shape)} apart at "
                    "this call site; pass key= (e.g. the parameter name) to name each stream"
                )
            slots.append(None)
            free = len(slots) - 1
        slots[free] = weakref.ref(owner)
        return (*site, free)


def _ef_key(call: _Call, key: Hashable | None, t: torch.Tensor) -> Hashable | None:
    if not call.decision.error_feedback:
        return None
    return key if key is not None else _auto_key(call.op, call.group, t)


# --------------------------------------------------------------- reductions
def _reduce_flat(
    call: _Call, comm: Comm, flat: torch.Tensor, op: Any, root: int | None
) -> torch.Tensor | None:
    """All-reduce (root None) or reduce a 1-D tensor with the decided algorithm, in chunks."""
    algo = _ALGORITHMS[call.decision.algorithm]  # type: ignore[index]
    per = call.engine.chunk_bytes // max(flat.element_size(), 1)
    # two_phase and direct all-reduce in place when the tensor is its own accumulator
    # (float32, float64): every chunk is encoded before its part of the result is
    # written, so no full-size temporary is needed.
    in_place = (
        algo in (two_phase, direct) and root is None and flat.dtype == acc_dtype(flat.dtype)
    )
    if root is not None or call.engine.chunk_bytes == 0 or flat.numel() <= per:
        if root is None:
            if in_place:
                return algo.all_reduce(comm, flat, op, out=flat)
            return algo.all_reduce(comm, flat, op)
        return algo.reduce(comm, flat, op, root)
    # Chunked all-reduce: chunk k+1 is encoded (engine threads) while chunk k is on the wire.
    bounds = [(a, min(a + per, flat.numel())) for a in range(0, flat.numel(), per)]
    comms = [
        dataclasses.replace(
            comm, rec=CallRecord(comm.op), key=None if comm.key is None else (comm.key, i)
        )
        for i in range(len(bounds))
    ]
    out = (
        flat
        if in_place
        else torch.empty(flat.numel(), dtype=acc_dtype(flat.dtype), device=flat.device)
    )

    def prepare(i: int) -> Any:
        a, b = bounds[i]
        return algo.prepare(comms[i], flat[a:b])

    def finish(i: int, prepared: Any) -> None:
        a, b = bounds[i]
        out[a:b] = algo.all_reduce(comms[i], flat[a:b], op, prepared)

    fixed_size = comm.codec.encoded_nbytes(1, flat.dtype) is not None
    try:
        if algo in (two_phase, direct) and fixed_size and flat.device.type == "cpu":
            # Transfers in flight behind the codec work, one descriptor for the call.
            algo.all_reduce_pipelined(comms, flat, op, bounds, out)
        else:
            call.engine.pipeline(len(bounds), prepare, finish, flat.device)
    finally:
        for c in comms:
            for f in ("bytes_wire", "encode_s", "transfer_s", "decode_s"):
                setattr(comm.rec, f, getattr(comm.rec, f) + getattr(c.rec, f))
    return out


def _powersgd_reduce(call: _Call, tensor: torch.Tensor, op: Any, key: Hashable | None) -> None:
    if _psgd is None:
        raise ConfigError(
            "codec 'powersgd' needs commpress.algorithms.powersgd, which is not available"
        )
    codec = call.decision.codec
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    wire_nbytes = _psgd.plan([tensor], codec).wire_nbytes()
    # PowerSGD's backend all-reduces abort gloo if the ranks' shapes differ: check first.
    comm = call.comm(tensor.device, tensor.dtype)
    d = exchange(
        comm,
        algorithm="powersgd",
        dtype=tensor.dtype,
        numel=tensor.numel(),
        sizes=[wire_nbytes] * call.size,
        redop=op,
    )
    if len({d.sizes_from(r)[0] for r in range(call.size)}) > 1:
        raise CollectiveError(
            f"{call.op}: the ranks' tensors have different shapes (PowerSGD factor sizes "
            f"{[d.sizes_from(r)[0] for r in range(call.size)]} bytes); shapes must match"
        )
    t0 = time.perf_counter()
    _psgd.all_reduce_many(
        [work],
        codec,
        average=op == dist.ReduceOp.AVG,
        group=call.group,
        memory=powersgd_memory(codec),
        keys=[key if key is not None else _auto_key(call.op, call.group, tensor)],
    )
    call.rec.transfer_s += time.perf_counter() - t0
    call.rec.bytes_wire += wire_nbytes
    if work is not tensor:
        _write(tensor, work)


def all_reduce(
    tensor: torch.Tensor,
    op: Any = _SUM,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
    key: Hashable | None = None,
) -> Handle | None:
    """Reduce ``tensor`` over ``group`` in place on every rank, compressed.

    Args:
        tensor: input and output, any shape; non-contiguous is fine.
        op: ``ReduceOp.SUM`` / ``AVG`` compress; other ops go through exactly (plain
            torch, or a lossless codec).
        group: process group (default: the world).
        async_op: return a `Handle` at once instead of blocking.
        codec: spec, config dict or `Codec`; None uses the policy's codec.
        key: error-feedback key (see the module docstring).

    Returns:
        A `Handle` if ``async_op``, else None (also None on a rank outside ``group``).

    Raises:
        CodecMismatchError: the ranks passed different codecs (on every rank).
        CollectiveError: a peer failed, died or timed out.
        UnsupportedDtypeError: ``AVG`` of a non-floating tensor.
    """
    _check_tensor(tensor, "tensor")
    if _not_member(group):
        return None
    call = _begin("all_reduce", group, tensor, op, codec)
    if not call.decision.compressed:
        return call.plain(lambda a: dist.all_reduce(tensor, op, group, a), async_op, [tensor])
    ef_key = _ef_key(call, key, tensor)
    if call.decision.algorithm == "powersgd":
        psgd_key = key if key is not None else _auto_key("all_reduce", group, tensor)

        def psgd_job() -> list[torch.Tensor]:
            _powersgd_reduce(call, tensor, op, psgd_key)
            return [tensor]

        return call.run(psgd_job, async_op, tensor.device, [tensor])
    comm = call.comm(tensor.device, tensor.dtype, ef_key)

    def job() -> list[torch.Tensor]:
        result = _reduce_flat(call, comm, _flat(tensor), op, None)
        assert result is not None
        _write(tensor, result)
        return [tensor]

    return call.run(job, async_op, tensor.device, [tensor])


def reduce(
    tensor: torch.Tensor,
    dst: int | None = None,
    op: Any = _SUM,
    group: Any = None,
    async_op: bool = False,
    group_dst: int | None = None,
    *,
    codec: CodecLike | None = None,
    key: Hashable | None = None,
) -> Handle | None:
    """Reduce ``tensor`` over ``group`` into rank ``dst``, compressed.

    Like ``torch.distributed.reduce``: ``dst`` is a global rank, ``group_dst`` a
    rank within ``group`` (give one). Only ``dst`` gets the result; the other
    ranks' tensors are left unchanged. See `all_reduce` for the other arguments.
    """
    _check_tensor(tensor, "tensor")
    if _not_member(group):
        return None
    call = _begin("reduce", group, tensor, op, codec)
    root = _root(group, call.size, "reduce", "dst", dst, group_dst)
    if not call.decision.compressed:
        g = _global(group, root)
        return call.plain(lambda a: dist.reduce(tensor, g, op, group, a), async_op, [tensor])
    ef_key = _ef_key(call, key, tensor)
    if call.decision.algorithm == "powersgd":
        psgd_key = key if key is not None else _auto_key("reduce", group, tensor)

        def psgd_job() -> list[torch.Tensor]:
            # PowerSGD is an all-reduce; the non-destination ranks keep their input.
            work = tensor if call.rank == root else tensor.detach().clone()
            _powersgd_reduce(call, work, op, psgd_key)
            return [tensor]

        return call.run(psgd_job, async_op, tensor.device, [tensor])
    comm = call.comm(tensor.device, tensor.dtype, ef_key)

    def job() -> list[torch.Tensor]:
        result = _reduce_flat(call, comm, _flat(tensor), op, root)
        if result is not None:
            _write(tensor, result)
        return [tensor]

    return call.run(job, async_op, tensor.device, [tensor])


def _global(group: Any, group_rank: int) -> int:
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def reduce_scatter_tensor(
    output: torch.Tensor,
    input: torch.Tensor,
    op: Any = _SUM,  # noqa: A002
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
    key: Hashable | None = None,
) -> Handle | None:
    """Reduce ``input`` over ``group`` and scatter it: rank ``r`` gets block ``r`` in ``output``.

    ``input`` holds ``world_size * output.numel()`` elements (flat order, like
    torch). Compressed with the first phase of ``two_phase``: each rank receives
    the encoded pieces of its block and sums them in float32.
    """
    _check_tensor(output, "output")
    _check_tensor(input, "input")
    if _not_member(group):
        return None
    call = _begin("reduce_scatter_tensor", group, input, op, codec)
    if not call.decision.compressed:
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return call.plain(lambda a: fn(output, input, op, group, a), async_op, [output])
    comm = call.comm(input.device, input.dtype, _ef_key(call, key, input))
    n = output.numel()
    if input.numel() != call.size * n or input.dtype != output.dtype:
        return call.reject(
            comm,
            CollectiveError(
                f"reduce_scatter_tensor: input has {input.numel()} elements of {input.dtype} but "
                f"must hold world_size ({call.size}) x output.numel() ({n}) = {call.size * n} "
                "elements of "
                f"output's dtype {output.dtype}"
            ),
            async_op,
        )

    def job() -> list[torch.Tensor]:
        bounds = [(r * n, (r + 1) * n) for r in range(call.size)]
        s = two_phase.reduce_scatter(comm, _flat(input), bounds, op)
        if op == dist.ReduceOp.AVG:
            s = s / call.size
        _write(output, s)
        return [output]

    return call.run(job, async_op, input.device, [output, input])


def reduce_scatter(
    output: torch.Tensor,
    input_list: list[torch.Tensor],
    op: Any = _SUM,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
    key: Hashable | None = None,
) -> Handle | None:
    """Reduce ``input_list[r]`` over ``group`` into ``output`` of rank ``r``, compressed.

    Every ``input_list[r]`` must have ``output.numel()`` elements.
    """
    _check_tensor(output, "output")
    inputs = _check_list(input_list, "input_list")
    if _not_member(group):
        return None
    nbytes = sum(_nbytes(t) for t in inputs)
    call = _begin("reduce_scatter", group, output, op, codec, nbytes=nbytes, bytes_in=nbytes)
    if not call.decision.compressed:
        return call.plain(
            lambda a: dist.reduce_scatter(output, inputs, op, group, a), async_op, [output]
        )
    comm = call.comm(output.device, output.dtype, _ef_key(call, key, output))
    n = output.numel()
    if len(inputs) != call.size or any(t.numel() != n or t.dtype != output.dtype for t in inputs):
        return call.reject(
            comm,
            CollectiveError(
                f"reduce_scatter: input_list must hold {call.size} tensors of {n} elements of "
                f"{output.dtype} (like output); got {len(inputs)} with "
                f"{[t.numel() for t in inputs]} elements of {[str(t.dtype) for t in inputs]}"
            ),
            async_op,
        )

    def job() -> list[torch.Tensor]:
        flat = torch.cat([_flat(t) for t in inputs])
        bounds = [(r * n, (r + 1) * n) for r in range(call.size)]
        s = two_phase.reduce_scatter(comm, flat, bounds, op)
        if op == dist.ReduceOp.AVG:
            s = s / call.size
        _write(output, s)
        return [output]

    return call.run(job, async_op, output.device, [output, *inputs])


# ------------------------------------------------------------ transport ops
def broadcast(
    tensor: torch.Tensor,
    src: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_src: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Broadcast ``tensor`` from rank ``src`` (global) / ``group_src`` (group rank), compressed.

    Every rank, the source included, ends with the decoded tensor (with a lossy
    codec torch's semantics -- the source keeps its exact values -- would leave the
    source different from everyone else).
    """
    _check_tensor(tensor, "tensor")
    if _not_member(group):
        return None
    call = _begin("broadcast", group, tensor, None, codec)
    root = _root(group, call.size, "broadcast", "src", src, group_src)
    if not call.decision.compressed:
        g = _global(group, root)
        return call.plain(lambda a: dist.broadcast(tensor, g, group, a), async_op, [tensor])
    comm = call.comm(tensor.device, tensor.dtype)

    def job() -> list[torch.Tensor]:
        transport.broadcast(comm, tensor, root)
        return [tensor]

    return call.run(job, async_op, tensor.device, [tensor])


def all_gather(
    tensor_list: list[torch.Tensor],
    tensor: torch.Tensor,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Gather every rank's ``tensor`` into ``tensor_list`` on every rank, compressed.

    ``tensor_list[r]`` receives rank ``r``'s tensor (its element count must match;
    ranks may contribute different sizes). Every rank's own slot holds its decoded
    tensor, so all ranks hold identical lists.
    """
    outputs = _check_list(tensor_list, "tensor_list")
    _check_tensor(tensor, "tensor")
    if _not_member(group):
        return None
    nbytes = max((_nbytes(t) for t in outputs), default=_nbytes(tensor))
    call = _begin("all_gather", group, tensor, None, codec, nbytes=nbytes)
    if not call.decision.compressed:
        return call.plain(lambda a: dist.all_gather(outputs, tensor, group, a), async_op, outputs)
    comm = call.comm(tensor.device, tensor.dtype)
    if (
        len(outputs) != call.size
        or outputs[call.rank].numel() != tensor.numel()
        or any(t.dtype != tensor.dtype for t in outputs)
    ):
        return call.reject(
            comm,
            CollectiveError(
                f"all_gather: tensor_list must hold {call.size} tensors of dtype {tensor.dtype}, "
                f"entry {call.rank} (this rank) with tensor's {tensor.numel()} elements; got "
                f"{len(outputs)} tensors with {[t.numel() for t in outputs]} elements"
            ),
            async_op,
        )

    def job() -> list[torch.Tensor]:
        transport.all_gather(comm, tensor, outputs)
        return outputs

    return call.run(job, async_op, tensor.device, [tensor, *outputs])


def all_gather_into_tensor(
    output_tensor: torch.Tensor,
    input_tensor: torch.Tensor,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Gather every rank's ``input_tensor`` into ``output_tensor`` (rank order, flat), compressed.

    ``output_tensor`` must hold ``world_size * input_tensor.numel()`` elements
    (e.g. shape ``(world_size * n, ...)`` or ``(world_size, n, ...)``).
    """
    _check_tensor(output_tensor, "output_tensor")
    _check_tensor(input_tensor, "input_tensor")
    if _not_member(group):
        return None
    call = _begin("all_gather_into_tensor", group, input_tensor, None, codec)
    if not call.decision.compressed:
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return call.plain(
            lambda a: fn(output_tensor, input_tensor, group, a), async_op, [output_tensor]
        )
    comm = call.comm(input_tensor.device, input_tensor.dtype)
    n = input_tensor.numel()
    if output_tensor.numel() != call.size * n or output_tensor.dtype != input_tensor.dtype:
        return call.reject(
            comm,
            CollectiveError(
                f"all_gather_into_tensor: output_tensor has {output_tensor.numel()} elements of "
                f"{output_tensor.dtype} but must hold world_size ({call.size}) x "
                "input_tensor.numel() "
                f"({n}) = {call.size * n} elements of {input_tensor.dtype}"
            ),
            async_op,
        )

    def job() -> list[torch.Tensor]:
        flat = torch.empty(
            output_tensor.numel(), dtype=output_tensor.dtype, device=output_tensor.device
        )
        transport.all_gather(comm, input_tensor, list(flat.split(n)))
        _write(output_tensor, flat)
        return [output_tensor]

    return call.run(job, async_op, input_tensor.device, [output_tensor, input_tensor])


def gather(
    tensor: torch.Tensor,
    gather_list: list[torch.Tensor] | None = None,
    dst: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_dst: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Gather every rank's ``tensor`` into ``gather_list`` on rank ``dst``, compressed.

    Like torch: ``dst`` defaults to global rank 0; ``gather_list`` is given on the
    destination only.
    """
    _check_tensor(tensor, "tensor")
    outputs = _check_list(gather_list, "gather_list") if gather_list else []
    if _not_member(group):
        return None
    call = _begin("gather", group, tensor, None, codec)
    default = 0 if dst is None and group_dst is None else None
    root = _root(group, call.size, "gather", "dst", dst, group_dst, default)
    if call.rank != root and outputs:
        raise ConfigError("gather: gather_list must not be given on ranks other than dst")
    if not call.decision.compressed:
        g = _global(group, root)
        return call.plain(
            lambda a: dist.gather(tensor, outputs or None, g, group, a), async_op, outputs
        )
    comm = call.comm(tensor.device, tensor.dtype)
    problem = _root_list_problem(call, root, "gather", "dst", "gather_list", outputs, tensor)
    if problem is not None:
        return call.reject(comm, problem, async_op)

    def job() -> list[torch.Tensor]:
        transport.gather(comm, tensor, outputs if call.rank == root else None, root)
        return outputs

    return call.run(job, async_op, tensor.device, [tensor, *outputs])


def _root_list_problem(
    call: _Call,
    root: int,
    op: str,
    role: str,
    name: str,
    tensors: list[torch.Tensor],
    tensor: torch.Tensor,
) -> CollectiveError | None:
    """The error for a root's ``gather_list``/``scatter_list`` that does not fit, or None."""
    if call.rank != root or (
        len(tensors) == call.size
        and all(t.numel() == tensor.numel() and t.dtype == tensor.dtype for t in tensors)
    ):
        return None
    return CollectiveError(
        f"{op}: on {role}, {name} must hold {call.size} tensors of {tensor.numel()} "
        f"elements of {tensor.dtype}; got {len(tensors)} with "
        f"{[t.numel() for t in tensors]} elements"
    )


def scatter(
    tensor: torch.Tensor,
    scatter_list: list[torch.Tensor] | None = None,
    src: int | None = None,
    group: Any = None,
    async_op: bool = False,
    group_src: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Scatter ``scatter_list`` of rank ``src`` into every rank's ``tensor``, compressed.

    Like torch: ``src`` defaults to global rank 0; ``scatter_list`` is given on the
    source only. The source's own ``tensor`` gets its decoded piece too.
    """
    _check_tensor(tensor, "tensor")
    inputs = _check_list(scatter_list, "scatter_list") if scatter_list else []
    if _not_member(group):
        return None
    call = _begin("scatter", group, tensor, None, codec)
    default = 0 if src is None and group_src is None else None
    root = _root(group, call.size, "scatter", "src", src, group_src, default)
    if call.rank == root and not inputs:
        raise ConfigError("scatter: scatter_list must be given on the src rank")
    if call.rank != root and inputs:
        raise ConfigError("scatter: scatter_list must not be given on ranks other than src")
    if not call.decision.compressed:
        g = _global(group, root)
        return call.plain(
            lambda a: dist.scatter(tensor, inputs or None, g, group, a), async_op, [tensor]
        )
    comm = call.comm(tensor.device, tensor.dtype)
    problem = _root_list_problem(call, root, "scatter", "src", "scatter_list", inputs, tensor)
    if problem is not None:
        return call.reject(comm, problem, async_op)

    def job() -> list[torch.Tensor]:
        transport.scatter(comm, tensor, inputs if call.rank == root else None, root)
        return [tensor]

    return call.run(job, async_op, tensor.device, [tensor, *inputs])


def all_to_all(
    output_tensor_list: list[torch.Tensor],
    input_tensor_list: list[torch.Tensor],
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Send ``input_tensor_list[j]`` to rank ``j``; rank i's lands in ``output_tensor_list[i]``.

    Tensors may differ in size between pairs. Whether to compress against
    ``min_bytes`` is decided from the largest rank's input, after the descriptor
    exchange.
    """
    outputs = _check_list(output_tensor_list, "output_tensor_list")
    inputs = _check_list(input_tensor_list, "input_tensor_list")
    if _not_member(group):
        return None
    probe = inputs[0] if inputs else (outputs[0] if outputs else torch.empty(0))
    call = _begin("all_to_all", group, probe, None, codec, bytes_in=sum(_nbytes(t) for t in inputs))

    def plain_call(a: bool) -> Any:
        return dist.all_to_all(outputs, inputs, group, a)

    if not call.decision.compressed:
        return call.plain(plain_call, async_op, outputs)
    comm = call.comm(probe.device, probe.dtype)
    if (
        len(inputs) != call.size
        or len(outputs) != call.size
        or any(t.dtype != probe.dtype for t in [*inputs, *outputs])
    ):
        return call.reject(
            comm,
            CollectiveError(
                f"all_to_all: output_tensor_list and input_tensor_list must each hold {call.size} "
                f"tensors of one dtype; got {len(outputs)} and {len(inputs)} tensors of "
                f"{sorted({str(t.dtype) for t in [*inputs, *outputs]})}"
            ),
            async_op,
        )

    def job() -> list[torch.Tensor]:
        if not transport.all_to_all(comm, inputs, outputs, call.decision.min_bytes):
            call.rec.compressed = False
            plain_call(False)
        return outputs

    return call.run(job, async_op, probe.device, [*inputs, *outputs])


def _splits(sizes: Sequence[int] | None, total: int, world: int, what: str) -> list[int] | str:
    if sizes is None or len(sizes) == 0:
        if total % world:
            return (
                f"{what}: dim 0 has {total} rows, which is not divisible by the world size "
                f"{world}; pass {what}_split_sizes"
            )
        return [total // world] * world
    sizes = [int(s) for s in sizes]
    if len(sizes) != world or any(s < 0 for s in sizes) or sum(sizes) != total:
        return (
            f"{what}_split_sizes={sizes} must be {world} non-negative sizes summing to "
            f"{what}.size(0) = {total}"
        )
    return sizes


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,  # noqa: A002
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
    group: Any = None,
    async_op: bool = False,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Split ``input`` along dim 0, send piece ``j`` to rank ``j``, receive into ``output``.

    Uneven splits are given by ``input_split_sizes`` / ``output_split_sizes`` (rows
    along dim 0, summing to ``input.size(0)`` / ``output.size(0)``); without them the
    split is even, like torch.
    """
    _check_tensor(output, "output")
    _check_tensor(input, "input")
    if _not_member(group):
        return None
    call = _begin("all_to_all_single", group, input, None, codec)

    def plain_call(a: bool) -> Any:
        return dist.all_to_all_single(
            output, input, output_split_sizes, input_split_sizes, group, a
        )

    if not call.decision.compressed:
        return call.plain(plain_call, async_op, [output])
    comm = call.comm(input.device, input.dtype)
    problems = []
    if input.dim() == 0 or output.dim() == 0:
        problems.append("all_to_all_single: input and output need at least one dimension")
    elif input.dtype != output.dtype:
        problems.append(f"all_to_all_single: input is {input.dtype} but output is {output.dtype}")
    else:
        ins = _splits(input_split_sizes, input.size(0), call.size, "input")
        outs = _splits(output_split_sizes, output.size(0), call.size, "output")
        problems += [p for p in (ins, outs) if isinstance(p, str)]
    if problems:
        return call.reject(comm, CollectiveError("; ".join(problems)), async_op)
    assert not isinstance(ins, str) and not isinstance(outs, str)

    def job() -> list[torch.Tensor]:
        contiguous_out = (
            output
            if output.is_contiguous()
            else torch.empty_like(output, memory_format=torch.contiguous_format)
        )
        pieces_in = list(input.split(ins))
        pieces_out = list(contiguous_out.split(outs))
        if not transport.all_to_all(comm, pieces_in, pieces_out, call.decision.min_bytes):
            call.rec.compressed = False
            plain_call(False)
            return [output]
        if contiguous_out is not output:
            _write(output, contiguous_out)
        return [output]

    return call.run(job, async_op, input.device, [output, input])


# ----------------------------------------------------------- point-to-point
def _p2p_peer(
    op: str,
    group: Any,
    size: int,
    rank: int,
    name: str,
    global_rank: int | None,
    group_rank: int | None,
) -> int:
    peer = _root(group, size, op, name, global_rank, group_rank)
    if peer == rank:
        raise ConfigError(
            f"{op}: {name} is this rank itself ({peer}); a rank cannot {op} to itself"
        )
    return peer


def _backend_error(op: str, exc: BaseException) -> BaseException:
    if isinstance(exc, RuntimeError) and not isinstance(exc, CommpressError):
        return CollectiveError(f"{op} failed in the backend ({exc}); the peer may have died")
    return exc


def _post_send(
    op: str,
    tensor: torch.Tensor,
    dst: int | None,
    group: Any,
    tag: int,
    group_dst: int | None,
    codec: CodecLike | None,
) -> Handle | None:
    """Encode on this thread and post the send(s); the handle waits for the backend works."""
    _check_tensor(tensor, "tensor")
    if _not_member(group):
        return None
    call = _begin(op, group, tensor, None, codec)
    peer = _p2p_peer(op, group, call.size, call.rank, "dst", dst, group_dst)
    if not call.decision.compressed:
        works = [dist.isend(tensor, _global(group, peer), group, tag)]
        keep: list[Any] = []
    else:
        comm = call.comm(tensor.device, tensor.dtype)
        try:
            keep = transport.isend(comm, tensor, peer, tag, call.key)
        except RuntimeError as exc:
            raise _backend_error(op, exc) from exc
        works = [w for w in keep if not isinstance(w, torch.Tensor)]
    record(call.rec)

    def complete() -> list[torch.Tensor]:
        try:
            for w in works:
                w.wait()
        except RuntimeError as exc:
            raise _backend_error(op, exc) from exc
        keep.clear()  # the send buffers may go now
        return [tensor]

    return Handle(completer=complete, poll=lambda: all(w.is_completed() for w in works))


def isend(
    tensor: torch.Tensor,
    dst: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_dst: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Send ``tensor`` to rank ``dst`` (global) / ``group_dst`` without blocking.

    The encode runs on the calling thread, so that sends stay in issue order; the
    transfer runs in the background. Returns a `Handle` (None on a rank outside
    ``group``). Tags at and above ``transport.P2P_TAG_BASE`` (2**30) are reserved
    for commpress payloads.
    """
    return _post_send("isend", tensor, dst, group, tag, group_dst, codec)


def send(
    tensor: torch.Tensor,
    dst: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_dst: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> None:
    """Send ``tensor`` to rank ``dst`` (global) / ``group_dst``, compressed; blocks until done.

    A codec mismatch is raised by the receiver only (a send is one-way).
    """
    handle = _post_send("send", tensor, dst, group, tag, group_dst, codec)
    if handle is not None:
        handle.wait()


def _recv_call(
    op: str,
    tensor: torch.Tensor,
    src: int | None,
    group: Any,
    group_src: int | None,
    codec: CodecLike | None,
) -> tuple[_Call, int | None]:
    call = _begin(op, group, tensor, None, codec)
    peer = None
    if src is not None or group_src is not None:
        peer = _p2p_peer(op, group, call.size, call.rank, "src", src, group_src)
    return call, peer


def irecv(
    tensor: torch.Tensor,
    src: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_src: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> Handle | None:
    """Receive into ``tensor`` from rank ``src`` (None: any source) without blocking.

    The first receive is posted at once, in issue order; a helper thread fetches the
    payload as soon as its descriptor arrives, so the sender completes even before
    this handle is waited on. Returns a `Handle` (None on a rank outside ``group``)
    whose ``source_rank()`` is the sender's global rank once it completed.
    """
    _check_tensor(tensor, "tensor")
    if _not_member(group):
        return None
    call, peer = _recv_call("irecv", tensor, src, group, group_src, codec)
    if not call.decision.compressed:
        work = dist.irecv(tensor, None if peer is None else _global(group, peer), group, tag)
        record(call.rec)

        def complete_plain() -> list[torch.Tensor]:
            try:
                work.wait()
            except RuntimeError as exc:
                raise _backend_error("irecv", exc) from exc
            return [tensor]

        known = None if peer is None else _global(group, peer)  # any source: unknown here
        return Handle(completer=complete_plain, poll=work.is_completed, source_rank=known)
    pending = transport.post_recv(call.comm(tensor.device, tensor.dtype), tensor, peer, tag)
    handle = Handle()

    def fetch() -> None:
        try:
            source = transport.complete_recv(pending)
        except BaseException as exc:  # noqa: BLE001 - delivered through the handle
            handle._finish(exc=_backend_error("irecv", exc))
            return
        record(call.rec)
        handle._finish([tensor], source_rank=_global(group, source))

    threading.Thread(target=fetch, name="commpress-irecv", daemon=True).start()
    return handle


def recv(
    tensor: torch.Tensor,
    src: int | None = None,
    group: Any = None,
    tag: int = 0,
    group_src: int | None = None,
    *,
    codec: CodecLike | None = None,
) -> int:
    """Receive into ``tensor`` from rank ``src`` (None: any source), compressed.

    Returns:
        The sender's global rank (-1 on a rank outside ``group``), like torch.

    Raises:
        CodecMismatchError: the sender used another codec (its payload is drained first,
            so the channel stays usable).
    """
    _check_tensor(tensor, "tensor")
    if _not_member(group):
        return -1
    call, peer = _recv_call("recv", tensor, src, group, group_src, codec)
    if not call.decision.compressed:
        source = dist.recv(tensor, None if peer is None else _global(group, peer), group, tag)
        record(call.rec)
        return source
    comm = call.comm(tensor.device, tensor.dtype)
    try:
        source = transport.complete_recv(transport.post_recv(comm, tensor, peer, tag))
    except RuntimeError as exc:
        raise _backend_error("recv", exc) from exc
    record(call.rec)
    return _global(group, source)
