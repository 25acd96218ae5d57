"""The one call driver of the compressed collectives, and the argument checks.

Every collective of `commpress.distributed` is an argument check plus one
`Request` handed to `execute`: the request says what torch would do
(``plain``), what the compressed call does (``run``), which tensors it
returns and touches, and which of its arguments could be wrong on one rank
only (``check``, answered on every rank, so no rank hangs). `execute` asks
the policy, runs the plain call or the compressed job on the engine (in
issue order, async or not), shows the call in ``torch.profiler`` traces as
``commpress:<op>[<codec>]`` and records its stats.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .. import watchdog
from ..algorithms.common import Comm, reject
from ..auto import choose, observe
from ..engine import Engine, Handle, get_engine
from ..errors import CollectiveError, CommpressError, ConfigError
from ..feedback import auto_key, error_feedback
from ..policy import AutoCall, Decision, Policy, get_policy, plan
from ..registry import CodecLike
from ..stats import CallRecord, call_range, record, record_plain

__all__ = ["Call", "Request", "execute", "check_tensor", "check_list", "root_rank", "to_global"]


# ------------------------------------------------------------ argument checks
def check_tensor(t: Any, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_list(ts: Any, name: str) -> list[torch.Tensor]:
    if not isinstance(ts, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in ts):
        raise TypeError(f"{name} must be a list of torch.Tensor, got {type(ts).__name__}")
    return list(ts)


def not_member(group: Any, op: str) -> bool:
    """Whether this rank is outside ``group`` (then, like torch, warn and do nothing)."""
    if not c10d._rank_not_in_group(group):
        return False
    global_rank = -1 if dist.GroupMember.WORLD is None else dist.GroupMember.WORLD.rank()
    warnings.warn(
        f"Running {op} on global rank {global_rank} which does not belong to the given group.",
        stacklevel=3,
    )
    return True


def group_key(group: Any) -> str:
    pg = group if group is not None else dist.group.WORLD
    try:
        return str(pg.group_name)
    except (AttributeError, RuntimeError):
        return f"pg{id(pg)}"


def root_rank(
    op: str,
    group: Any,
    name: str,
    global_rank: int | None,
    group_rank: int | None,
    default: int | None = None,
) -> int:
    """The group rank of a root given as ``name=`` (global) or ``group_name=`` (group)."""
    size = dist.get_world_size(group)
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


def to_global(group: Any, group_rank: int) -> int:
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1)


def write(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a result into the caller's tensor (nothing to do when it was computed there)."""
    if src.data_ptr() == dst.data_ptr() and src.dtype == dst.dtype and dst.is_contiguous():
        return
    with torch.no_grad():
        dst.copy_(src.view(dst.shape))


def check_reduce_op(op: str, reduce_op: Any) -> None:
    """Refuse what is not a ``ReduceOp`` (torch raises a bare pybind TypeError there)."""
    if not isinstance(reduce_op, (dist.ReduceOp, dist.ReduceOp.RedOpType)):
        raise TypeError(
            f"{op}: op must be a torch.distributed.ReduceOp (e.g. ReduceOp.SUM), "
            f"got {reduce_op!r} of type {type(reduce_op).__name__}"
        )


def _meta_problem(req: Request) -> str | None:
    """Meta tensors hold no data: say so on every rank before anything is sent."""
    if any(t.is_meta for t in (req.probe, *req.tensors, *req.outputs)):
        return (
            f"{req.op}: a meta tensor (shape only, no data) cannot be communicated; "
            "pass tensors on a real device"
        )
    return None


# ------------------------------------------------------------------ the call
class Call:
    """One call: its group, decision, policy, engine and stats record."""

    def __init__(
        self,
        op: str,
        group: Any,
        decision: Decision,
        bytes_in: int,
        policy: Policy,
        engine: Engine,
        probe: torch.Tensor,
    ) -> None:
        self.op = op
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.decision = decision
        self.policy = policy
        self.engine = engine
        self.key = group_key(group)
        self.rec = CallRecord(op, compressed=decision.compressed, bytes_in=bytes_in)
        self.device = probe.device
        codec = decision.codec.spec if decision.compressed and decision.codec else None
        self.entry = watchdog.begin(self.key, op, codec, probe)

    @classmethod
    def begin(
        cls,
        op: str,
        group: Any,
        tensor: torch.Tensor,
        reduce_op: Any,
        codec: CodecLike | None,
        size: int | None = None,
        bytes_in: int | None = None,
    ) -> Call:
        """Decide the call (``size``: bytes to weigh against ``min_bytes``)."""
        policy = get_policy()
        key = group_key(group)
        size = nbytes(tensor) if size is None else size
        decision = _decision(op, group, key, tensor, reduce_op, codec, size, policy)
        return cls(
            op,
            group,
            decision,
            nbytes(tensor) if bytes_in is None else bytes_in,
            policy,
            get_engine(),
            tensor,
        )

    def ef_key(self, key: Hashable | None, t: torch.Tensor) -> Hashable | None:
        """The error-feedback key: ``key=``, else derived from the call site (feedback on)."""
        if not self.decision.error_feedback:
            return None
        return key if key is not None else auto_key(self.op, self.key, t)

    def comm(
        self, device: torch.device, dtype: torch.dtype | None, key: Hashable | None = None
    ) -> Comm:
        codec = self.decision.codec
        assert codec is not None
        feedback = error_feedback(codec) if self.decision.error_feedback else None
        return Comm(
            op=self.op,
            group=self.group,
            rank=self.rank,
            size=self.size,
            device=device,
            codec=codec,
            verify=self.policy.verify or not codec.fixed_size,
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
        spec = self.decision.codec.spec if self.decision.codec is not None else "none"

        def wrapped() -> Any:
            try:
                t0 = time.perf_counter()
                with call_range(op, spec), watchdog.running(self.entry):
                    value = job()
                observe(self.decision, time.perf_counter() - t0)  # auto's drift check
            except CommpressError:
                raise
            except RuntimeError as exc:
                found = watchdog.explain(self.entry)
                if found is not None:  # the ranks diverged here and a peer left
                    raise CollectiveError(found) from exc
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

    def reject(self, comm: Comm, error: BaseException) -> Any:
        """Tell the peers this rank's arguments are bad (if they will wait for it), then raise."""
        if comm.device.type == "meta":  # the rejection itself needs a real buffer
            comm = dataclasses.replace(comm, device=torch.device("cpu"))
        if comm.verify:

            def job() -> None:
                with watchdog.running(self.entry):  # the reason is keyed by the call's number
                    reject(comm, error)
                raise error

            self.engine.run(self.key, job, async_op=False, device=comm.device)
        raise error


@dataclass
class Request:
    """What one collective call asks for; `execute` carries it out.

    Attributes:
        op: the public op name.
        group: the process group (None: the world).
        probe: the tensor whose dtype, size and device decide the call.
        plain: ``plain(async_op)`` makes the plain ``torch.distributed`` call.
        run: ``run(call, comm)`` does the compressed work (on the engine).
        outputs: what the handle's ``result()`` returns.
        tensors: every tensor the call touches (CUDA: kept alive on the codec stream).
        reduce_op: the ``ReduceOp`` of a reduction, else None.
        codec: the per-call ``codec=``.
        key: the error-feedback key (``key=`` of a reduction).
        size: bytes to weigh against ``min_bytes`` (default: the probe's).
        bytes_in: bytes the plain call would send (default: the probe's).
        check: ``check(call)`` returns what is wrong with this rank's arguments for
            the compressed call, or None; every rank learns of it and raises.
    """

    op: str
    group: Any
    probe: torch.Tensor
    plain: Callable[[bool], Any]
    run: Callable[[Call, Comm], Any]
    outputs: list[torch.Tensor]
    tensors: list[torch.Tensor] = field(default_factory=list)
    reduce_op: Any = None
    codec: CodecLike | None = None
    key: Hashable | None = None
    size: int | None = None
    bytes_in: int | None = None
    check: Callable[[Call], str | None] | None = None


def _decision(
    op: str,
    group: Any,
    key: str,
    tensor: torch.Tensor,
    reduce_op: Any,
    codec: CodecLike | None,
    size: int,
    policy: Policy,
) -> Decision:
    """The policy's decision for a call of ``group`` (named ``key``); auto's when its
    codec is ``"auto"`` (a cached plan, then one dict lookup in `commpress.auto`)."""
    got = plan(op, tensor.dtype, reduce_op, codec, dist.get_world_size(group), size, policy)
    if type(got) is AutoCall:
        return choose(
            group,
            key,
            tensor.device,
            got.op,
            got.family,
            got.dtype,
            got.nbytes,
            got.world,
            got.sum_like,
            got.max_err,
            policy,
        )
    return got  # type: ignore[return-value]


def _run_plain(
    req: Request,
    key: str,
    decision: Decision,
    bytes_in: int,
    async_op: bool,
    engine: Engine,
) -> Handle | None:
    """A plain call: straight to torch.distributed when the group's engine queue is idle
    (blocking: waited here, in the watchdog's slices), else behind the queued calls, so
    that it keeps its issue order. Numbered by the watchdog; counted in the stats as a
    call of ``bytes_in`` bytes in and on the wire."""
    op, fn, outputs, device = req.op, req.plain, req.outputs, req.probe.device
    entry = watchdog.begin(key, op, None, req.probe)
    if engine.idle(key):
        t0 = time.perf_counter()
        work = fn(True)
        if async_op:
            record_plain(op, bytes_in, time.perf_counter() - t0)
            if work is None:
                return Handle.done(outputs)
            return Handle(
                completer=lambda: (watchdog.wait(work, device, entry), outputs)[1],
                poll=work.is_completed,
            )
        watchdog.wait(work, device, entry)
        seconds = time.perf_counter() - t0
        observe(decision, seconds)
        record_plain(op, bytes_in, seconds)
        return None

    def job() -> list[torch.Tensor]:
        t0 = time.perf_counter()
        watchdog.wait(fn(True), device, entry)
        seconds = time.perf_counter() - t0
        observe(decision, seconds)
        record_plain(op, bytes_in, seconds)
        return outputs

    result = engine.run(key, job, async_op=async_op)
    return result if async_op else None


def execute(req: Request, async_op: bool) -> Handle | None:
    """Decide, then run ``req`` plain or compressed; a `Handle` if ``async_op`` else None."""
    if req.reduce_op is not None:
        check_reduce_op(req.op, req.reduce_op)
    probe, group, op = req.probe, req.group, req.op
    policy = get_policy()
    key = group_key(group)
    size = probe.numel() * probe.element_size()
    weighed = size if req.size is None else req.size
    decision = _decision(op, group, key, probe, req.reduce_op, req.codec, weighed, policy)
    bytes_in = size if req.bytes_in is None else req.bytes_in
    if decision.codec is None:  # the fast path: no Call, no CallRecord
        return _run_plain(req, key, decision, bytes_in, async_op, get_engine())
    call = Call(op, group, decision, bytes_in, policy, get_engine(), probe)
    comm = call.comm(probe.device, probe.dtype, call.ef_key(req.key, probe))
    problem = _meta_problem(req) or (req.check(call) if req.check is not None else None)
    if problem is not None:
        return call.reject(comm, CollectiveError(problem))

    def job() -> list[torch.Tensor]:
        req.run(call, comm)
        return req.outputs

    return call.run(job, async_op, probe.device, req.tensors or [probe, *req.outputs])
