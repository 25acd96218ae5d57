"""DDP comm hook: compress gradient buckets with any commpress codec, PowerSGD included.

::

    import commpress.hooks
    state = commpress.hooks.CompressionState(codec="int8")
    commpress.hooks.register(ddp_model, state)
    # same as: ddp_model.register_comm_hook(state, commpress.hooks.compress_hook)

DDP calls the hook once per gradient bucket per step, with the bucket's flat
gradient buffer; the hook returns a future of the *averaged* buffer.

- Codecs with ``algorithm="powersgd"`` go through
  `commpress.algorithms.powersgd.all_reduce_many_async` on the bucket's
  per-parameter gradients (matrices as rank-r factors, vectors batched raw),
  with warm start and error feedback kept per parameter in the state: a chain
  of futures over the backend's async all-reduces, as torch's
  ``powerSGD_hook`` is, so bucket k's rounds (all-reduce ``P``,
  orthogonalize, all-reduce ``Q``) run while backward computes bucket k+1.
- Every other codec goes through `commpress.distributed.all_reduce` on the
  flat buffer (pre-divided by the group size, as torch's ``fp16_compress_hook``
  does, so fp16 cannot overflow), asynchronously.

Ordering: the hook's traffic travels on its own process group
------------------------------------------------------------------
Collectives on one process group must be issued in the same order on every
rank, and DDP issues its own from the autograd thread while the hook's are in
flight. So the hook's collectives travel on a twin of DDP's group, and post
bucket by bucket on it: `commpress.hook_group` says why and how.

Error feedback for the flat-buffer path is done inside the compressed
all-reduce (``cdist.all_reduce(..., key=...)``), keyed per bucket index and
per state (two DDP models never share a residual); the residuals live in
`commpress.distributed.error_feedback` and ``state.residuals()`` shows this
state's. DDP rebuilds its buckets once after the first step; a bucket whose
set of parameters changes starts with a zero residual.

Checkpoints: ``state.state_dict()`` / ``state.load_state_dict()`` carry the
step counter, the residuals and the PowerSGD memory. Residuals are per rank:
save every rank's state.

torch's own hooks on CPU/gloo (torch 2.13): ``fp16_compress_hook`` runs (and
``CompressionState(codec="fp16")`` matches it to within 1 ulp),
``bf16_compress_hook`` refuses without CUDA/NCCL, ``powerSGD_hook`` aborts
the process inside gloo. This hook runs every codec on gloo.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist

from . import hook_group
from .algorithms import powersgd
from .codec import Codec, is_float
from .errors import CodecMismatchError, ConfigError
from .feedback import ErrorFeedback
from .policy import Decision, Policy, auto_budget, get_policy
from .registry import CodecLike, get_codec
from .stats import CallRecord, record

__all__ = ["CompressionState", "compress_hook", "register", "FSDPReduceScatter"]  # noqa: F822


def __getattr__(name: str) -> Any:
    """``FSDPReduceScatter`` (FSDP2's hook, its own module `commpress.fsdp`), imported on
    first use: it subclasses FSDP2's ``ReduceScatter``, and importing
    ``torch.distributed.fsdp`` took 1.0 of the 3.6 s that ``import commpress`` took
    here (``python -X importtime``), in every rank of every job, FSDP or not."""
    if name == "FSDPReduceScatter":
        from .fsdp import FSDPReduceScatter

        return FSDPReduceScatter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_STATE_VERSION = 1
_state_ids = itertools.count()


class CompressionState:
    """State of `compress_hook`: the codec, its knobs, error feedback and PowerSGD memory.

    Tuning guide
    ------------
    codec
        What goes on the wire. Start with ``"bf16"`` (2x, summable: one backend
        all-reduce, negligible error) and ``"int8"`` (~4x; block scales keep the
        error near 0.4% of each block's largest value). ``"powersgd:rank=4"``
        compresses far more (often 50-200x for large matrices); raise ``rank``
        if the loss lags the uncompressed run, lower it if communication still
        dominates. ``"sign"``/``"topk:ratio=0.01"`` need error feedback (on by
        default for them). On fast links (NVLink, shared memory) compression
        rarely pays: measure with ``commpress bench`` first. ``"auto"`` (or
        ``"auto:max_err=1e-3"``) decides per bucket, from the link and codec speeds
        measured on this job, between plain and the codecs within the error budget
        (default 1e-2: fp16, bf16, int8): on a fast link every bucket stays plain,
        on a slow one the large buckets compress. The recommended setting.
    group
        Process group to reduce over; None means the default group (what DDP
        uses unless it was given ``process_group=``). Must be DDP's group;
        `register` fills it in from the model when it is None. The hook's
        collectives travel on a twin of this group (same ranks), never on it:
        see "Ordering" in the module docstring.
    error_feedback
        Add back what compression dropped in the previous step, per bucket.
        None (default) follows the codec's ``wants_error_feedback``: on for
        the biased codecs (``sign``, ``topk``, ``randomk``), off for the others.
        Turn it on for ``int4``/``int2`` and for ``int8``/``fp8`` on long runs;
        it is pointless for ``fp16``/``bf16`` and lossless codecs. PowerSGD
        always keeps its own error feedback. Costs one float32 copy of the
        gradients of memory. Under ``"auto"`` it applies to the buckets auto
        compresses, with the codec chosen for each (off by default: auto never
        chooses a codec that needs it).
    min_bytes
        Buckets smaller than this travel uncompressed (their latency, not
        their size, dominates). Default 0: compress every bucket. DDP's last
        bucket is often small; ``min_bytes=1 << 16`` is a sensible floor.
        ``"auto"`` needs none: it keeps plain what does not pay.
    start_iter
        Steps to run uncompressed before compressing (default 0). DDP
        rebuilds its buckets after the first step; starting PowerSGD after
        it (``start_iter=2``), or later to let the loss settle, is what
        torch's ``PowerSGDState(start_powerSGD_iter=...)`` is for too.

    Attributes:
        codec: the resolved `Codec`; None under ``"auto"``.
        spec: the codec's spec, or the normalized ``"auto"`` spec.
        auto_max_err: the error budget under ``"auto"``; None for a fixed codec.
        chosen: under ``"auto"``, what the last step sent each bucket with, by bucket
            index: a codec spec, or None for plain.
        plain_ddp: `register` left the model on plain DDP (no hook), because under
            ``"auto"`` no bucket it can have compresses (``docs/auto.md``).
        iteration: steps seen so far (counted at each step's last bucket).
        memory: the ``PowerSGDMemory`` of the PowerSGD path, or None.
    """

    def __init__(
        self,
        codec: CodecLike = "int8",
        group: dist.ProcessGroup | None = None,
        error_feedback: bool | None = None,
        min_bytes: int = 0,
        start_iter: int = 0,
    ) -> None:
        self.auto_max_err = auto_budget(codec) if isinstance(codec, str) else None
        if self.auto_max_err is None:
            self.codec: Codec | None = get_codec(codec)
            self.spec = self.codec.spec
        else:
            self.codec = None
            self.spec = Policy(codec=codec).codec  # the normalized "auto" spec
        for name, value in (("min_bytes", min_bytes), ("start_iter", start_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"CompressionState: {name}={value!r} is not allowed; expected an int >= 0"
                )
        if error_feedback is not None and not isinstance(error_feedback, bool):
            raise ConfigError(
                f"CompressionState: error_feedback={error_feedback!r}; expected True, False or None"
            )
        self.group = group
        self.min_bytes = min_bytes
        self.start_iter = start_iter
        self.iteration = 0
        self.is_powersgd = self.codec is not None and self.codec.algorithm == "powersgd"
        if error_feedback is None:
            error_feedback = self.codec is not None and self.codec.wants_error_feedback
        self.error_feedback = error_feedback and not self.is_powersgd
        self.chosen: dict[int, str | None] = {}
        self.plain_ddp = False
        self._policies: tuple[Policy, Policy] | None = None
        self._uid = next(_state_ids)
        self.memory: powersgd.PowerSGDMemory | None = None
        if self.is_powersgd:
            self.memory = powersgd.PowerSGDMemory()
        self._layouts: dict[int, tuple[Hashable, ...]] = {}
        self._param_names: dict[int, str] = {}

    def __repr__(self) -> str:
        return (
            f"CompressionState(codec={self.spec!r}, error_feedback={self.error_feedback}, "
            f"min_bytes={self.min_bytes}, start_iter={self.start_iter}, "
            f"iteration={self.iteration})"
        )

    def state_dict(self) -> dict[str, Any]:
        """Step counter, residuals and PowerSGD memory (CPU tensors), for checkpoints."""
        return {
            "version": _STATE_VERSION,
            "codec": self.spec,
            "iteration": self.iteration,
            "feedback": self.residuals(),
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "layouts": dict(self._layouts),
            "chosen": dict(self.chosen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output.

        Raises:
            CodecMismatchError: the state was saved with another codec.
            ConfigError: the state is malformed or of another version.
        """
        keys = ("version", "codec", "iteration", "feedback", "memory", "layouts")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise ConfigError(f"CompressionState state must be a dict with keys {list(keys)}")
        if state["version"] != _STATE_VERSION:
            raise ConfigError(
                f"CompressionState state has version {state['version']!r}; this commpress reads "
                f"version {_STATE_VERSION}"
            )
        if state["codec"] != self.spec:
            raise CodecMismatchError(
                f"CompressionState state was saved with codec {state['codec']!r}, this state uses "
                f"{self.spec!r}; build the state with the saved codec"
            )
        self.iteration = int(state["iteration"])
        if self.error_feedback:
            for index in self._layouts:
                self._reset_feedback(index)
            self.chosen = dict(state.get("chosen", {}))  # the codec of each auto residual
            for index, residual in state["feedback"].items():
                ef = self._feedback(index)
                if ef is None:
                    continue  # auto: no codec recorded for the bucket, nothing to resume
                # update() stores compensated - decoded: the residual itself.
                ef.update(self._ef_key(index), residual.float(), torch.zeros_like(residual.float()))
        if self.memory is not None and state["memory"] is not None:
            self.memory.load_state_dict(state["memory"])
        self._layouts = dict(state["layouts"])

    def residuals(self) -> dict[int, torch.Tensor]:
        """Copies of this state's error-feedback residuals by bucket index (float32, CPU)."""
        if not self.error_feedback:
            return {}
        out = {}
        for index in self._layouts:
            ef = self._feedback(index)
            stored = ef.state_dict()["residuals"] if ef is not None else {}
            if self._ef_key(index) in stored:
                out[index] = stored[self._ef_key(index)]
        return out

    # -------------------------------------------------------------- internals
    def _feedback(self, index: int) -> ErrorFeedback | None:
        """The error-feedback store of bucket ``index`` (auto: of its chosen codec)."""
        from .distributed import error_feedback

        codec = self.codec if self.codec is not None else self.chosen.get(index)
        return None if codec is None else error_feedback(codec)

    def _reset_feedback(self, index: int) -> None:
        ef = self._feedback(index)
        if ef is not None:
            ef.reset(self._ef_key(index))

    def _ef_key(self, index: int) -> Hashable:
        return ("commpress.hooks", self._uid, "bucket", index)

    def _codec_for(self, nbytes: int) -> Codec:
        assert self.codec is not None  # a fixed codec; auto decides in _decide
        if self.iteration < self.start_iter or nbytes < self.min_bytes:
            return get_codec("none")
        return self.codec

    def _param_keys(self, bucket: dist.GradBucket) -> list[Hashable]:
        params = bucket.parameters()
        if self._param_names and all(id(p) in self._param_names for p in params):
            return [self._param_names[id(p)] for p in params]
        return [("bucket", bucket.index(), i) for i in range(len(params))]

    def _check_layout(self, bucket: dist.GradBucket) -> None:
        layout = tuple(self._param_keys(bucket)) + tuple(
            tuple(p.shape) for p in bucket.parameters()
        )
        if self._layouts.get(bucket.index()) != layout:
            if self.error_feedback:
                self._reset_feedback(bucket.index())
            self._layouts[bucket.index()] = layout

    def _choose(self, index: int, spec: str | None) -> None:
        """Note auto's codec for bucket ``index``; a residual of another codec is stale."""
        if self.error_feedback and self.chosen.get(index, spec) != spec:
            self._reset_feedback(index)
        self.chosen[index] = spec

    def _policy(self) -> Policy:
        """The policy a bucket is decided under: the caller's, with this state's knobs."""
        base = get_policy()
        if self._policies is None or self._policies[0] is not base:
            mine = base.replace(min_bytes=self.min_bytes, error_feedback=self.error_feedback)
            self._policies = (base, mine)
        return self._policies[1]

    def _decide(self, buffer: torch.Tensor, group: dist.ProcessGroup) -> Decision:
        """Auto's decision for a bucket: `commpress.policy.decide`'s checks, then
        `commpress.auto.choose` on the hook's group (cached; the same on every rank)."""
        from .auto import choose
        from .policy import decide

        if self.iteration < self.start_iter:
            return Decision(None, None, False, f"step {self.iteration} < start_iter")
        bound = functools.partial(
            choose, group, group.group_name, buffer.device, overlapped=_overlapped(buffer.device)
        )
        return decide(
            "all_reduce",
            buffer,
            dist.ReduceOp.SUM,
            self.spec,
            world_size=group.size(),
            policy=self._policy(),
            auto=bound,
        )


def _overlapped(device: torch.device) -> bool:
    """Whether auto models a bucket on ``device`` as ``overlapped`` (`commpress.auto.model`):
    on CPU the codec's work takes cores from the backward pass the bucket overlaps."""
    return device.type == "cpu"


def compress_hook(
    state: CompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce ``bucket`` compressed with ``state.codec``; future of the average.

    Register with ``ddp.register_comm_hook(state, compress_hook)`` or `register`.
    """
    buffer = bucket.buffer()
    try:
        group = hook_group.twin(state.group)
        if state.codec is None:
            return _auto(state, bucket, buffer, group)
        codec = state._codec_for(buffer.numel() * buffer.element_size())
        if codec.algorithm == "powersgd":
            return _powersgd(state, bucket, codec, buffer, group)
        return _flat(state, bucket, codec, buffer, group)
    finally:
        if bucket.is_last():
            state.iteration += 1


# DDP compares these annotations with the real objects (strings under
# ``from __future__ import annotations`` would make it refuse the hook).
compress_hook.__annotations__.update(
    state=CompressionState, bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]}
)


def _auto(
    state: CompressionState,
    bucket: dist.GradBucket,
    buffer: torch.Tensor,
    group: dist.ProcessGroup,
) -> torch.futures.Future[torch.Tensor]:
    """A bucket under ``codec="auto"``: plain or compressed, as `commpress.auto` decides."""
    decision = state._decide(buffer, group)
    state._choose(bucket.index(), decision.codec.spec if decision.codec is not None else None)
    if decision.codec is None:
        return hook_group.post_plain(buffer, group)
    return _flat(state, bucket, decision.codec, buffer, group, decision.algorithm)


def _flat(
    state: CompressionState,
    bucket: dist.GradBucket,
    codec: Codec,
    buffer: torch.Tensor,
    group: dist.ProcessGroup,
    algorithm: str | None = None,
) -> torch.futures.Future[torch.Tensor]:
    from . import distributed as cdist
    from .policy import using

    buffer.div_(group.size())
    state._check_layout(bucket)
    key = state._ef_key(bucket.index())
    # The state (or auto) has decided already: no size threshold, its own error-feedback
    # choice, and auto's algorithm where auto chose one.
    changes: dict[str, Any] = {"min_bytes": 0, "error_feedback": state.error_feedback}
    if algorithm is not None:
        changes["algorithm"] = algorithm

    def done(fut: torch.futures.Future[Any]) -> torch.Tensor:
        fut.value()  # re-raises a failure of the all-reduce
        return buffer

    def post() -> torch.futures.Future[torch.Tensor]:
        with using(**changes):
            handle = cdist.all_reduce(buffer, group=group, async_op=True, codec=codec, key=key)
        return handle.get_future().then(done)

    return hook_group.post_in_order(group, post)


def _powersgd(
    state: CompressionState,
    bucket: dist.GradBucket,
    codec: Codec,
    buffer: torch.Tensor,
    group: dist.ProcessGroup,
) -> torch.futures.Future[torch.Tensor]:
    grads = bucket.gradients()
    layout = powersgd.plan(grads, codec)
    order = hook_group.order(group)
    waits = hook_group.pending(order.posted, order.flat_done)
    after = None
    if waits:
        after = waits[0] if len(waits) == 1 else torch.futures.collect_all(waits)
    assert state.memory is not None  # a PowerSGD state always has one
    t0 = time.perf_counter()
    pending = powersgd.all_reduce_many_async(
        grads,
        codec,
        average=True,
        group=group,
        memory=state.memory,
        keys=state._param_keys(bucket),
        after=after,
    )
    order.posted = pending.posted

    def finish(fut: torch.futures.Future[None]) -> torch.Tensor:
        fut.value()  # re-raises a failure of the rounds
        _copy_back(grads, buffer)
        record(
            CallRecord(
                "all_reduce",
                compressed=True,
                bytes_in=layout.input_nbytes,
                bytes_wire=layout.wire_nbytes(),
                transfer_s=time.perf_counter() - t0,
            )
        )
        return buffer

    return pending.done.then(finish)


def _copy_back(grads: list[torch.Tensor], buffer: torch.Tensor) -> None:
    """Make sure ``buffer`` holds ``grads`` (they are normally views into it already)."""
    base = buffer.untyped_storage().data_ptr()
    if all(g.untyped_storage().data_ptr() == base for g in grads):
        return
    offset = 0
    for g in grads:
        buffer[offset : offset + g.numel()].copy_(g.reshape(-1))
        offset += g.numel()


def register(model: Any, state: CompressionState | None = None) -> CompressionState:
    """Register `compress_hook` on a ``DistributedDataParallel`` model; returns the state.

    Also records the model's parameter names, so PowerSGD memory is keyed by name
    (stable across restarts) instead of by bucket position; takes DDP's process group
    when ``state.group`` is None; creates the process group that carries the
    hook's traffic now; and under ``codec="auto"`` calibrates that group for the
    dtypes of the model's gradients now (`commpress.auto.calibrate`: link, codec and
    algorithm times, about 1-3 s on gloo the first time). All of it is collective:
    call it on every rank of DDP's group. Under ``"auto"``, when no bucket of any size
    up to all of the model's gradients would compress, no hook is registered at all
    (``state.plain_ddp``): plain DDP, without the pass over each bucket a hook adds.

    Args:
        model: a ``torch.nn.parallel.DistributedDataParallel`` instance.
        state: the hook state; None builds ``CompressionState()`` (int8).

    Raises:
        ConfigError: ``model`` is not a DDP model (for FSDP2 use `FSDPReduceScatter`).
        RuntimeError: DDP refuses a second comm hook (one is registered already).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        hint = ""
        if hasattr(model, "set_custom_reduce_scatter"):
            hint = (
                " This is an FSDP2 module: use "
                "model.set_custom_reduce_scatter(commpress.hooks.FSDPReduceScatter(codec=...))"
            )
        raise ConfigError(
            "commpress.hooks.register needs a torch.nn.parallel.DistributedDataParallel model, "
            f"got {type(model).__name__}; wrap it first: DistributedDataParallel(model).{hint}"
        )
    state = state if state is not None else CompressionState()
    ddp_group = getattr(model, "process_group", None)
    if state.group is None and ddp_group is not None:
        if ddp_group.group_name != dist.group.WORLD.group_name:
            state.group = ddp_group
    state._param_names = {id(p): name for name, p in model.module.named_parameters()}
    group = hook_group.twin(state.group)
    if state.codec is None and not _auto_may_pay(state, model, group):
        state.plain_ddp = True
        return state  # DDP's own path: a hook would only add its pass over each bucket
    model.register_comm_hook(state, compress_hook)
    return state


def _auto_may_pay(state: CompressionState, model: Any, group: dist.ProcessGroup) -> bool:
    """Calibrate ``auto`` on the hook's group for every (device, dtype) of the model's
    gradients now, and say whether a bucket of the model could compress.

    Now: every rank of DDP's group is here at the same point and nothing is in flight on
    the hook's group, so no rank calibrates from inside backward (a bucket of another
    dtype calibrates at its first step, in the group's ordered queue on the engine).
    """
    from .auto import calibrate, pays_below

    if group.size() <= 1:
        return False  # auto keeps one rank plain
    totals: dict[tuple[torch.device, torch.dtype], int] = {}
    for p in model.module.parameters():
        if p.requires_grad and is_float(p.dtype):
            kind = (p.device, p.dtype)
            totals[kind] = totals.get(kind, 0) + p.numel() * p.element_size()
    budget, policy, world = state.auto_max_err, state._policy(), group.size()
    assert budget is not None
    pays = False
    for (device, dtype), total in sorted(totals.items(), key=str):  # same order everywhere
        table = calibrate(group, device, dtype)  # every dtype, also once one pays
        overlapped = _overlapped(device)
        pays = pays or pays_below(table, dtype, total, world, budget, policy, overlapped)
    return pays
