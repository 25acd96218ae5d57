"""Which codec and algorithm a collective call uses: `Policy` and `decide`.

A `Policy` holds the knobs; `decide` turns one call (op, tensor, reduce op,
requested codec) into a `Decision`: a codec and an algorithm, or ``None``
for "hand it to plain ``torch.distributed``". The process has one global
policy (`get_policy` / `set_policy`, built from ``COMMPRESS_*`` environment
variables the first time it is asked for) and `using` overrides it for a
block on the current thread::

    import commpress
    from commpress.policy import Policy, using

    with using(Policy(codec="int8", min_bytes=1 << 16)):
        cdist.all_reduce(grad)          # int8, unless grad is under 64 KiB

What is never compressed lossily
    ``MIN``/``MAX``/``PRODUCT``/``BAND``/``BOR``/``BXOR`` reductions and
    integer, bool and complex tensors go to plain ``torch.distributed``,
    unless the codec is lossless (``zstd``, ``lz4``), in which case they are
    compressed with that codec and reduced exactly.

Every rank must decide alike
    The decision depends only on the op, the dtype, the byte size, the
    reduce op, the group size and the policy, which agree across ranks when
    every rank runs the same code under the same policy (``torchrun`` with
    the same environment). A compressed call exchanges a small descriptor
    first and raises `commpress.CodecMismatchError` on every rank when the
    codecs differ; a call that one rank compresses and another does not
    cannot be detected (it fails in the backend), so do not give ranks
    different policies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .algorithms import algorithms, default_order, get_algorithm
from .codec import Codec, is_float
from .errors import ConfigError, UnsupportedDtypeError
from .ops import FAMILIES, OPS, REDUCTIONS
from .registry import CodecLike, get_codec
from .units import parse_bool, parse_size

__all__ = [
    "Policy",
    "Decision",
    "decide",
    "get_policy",
    "set_policy",
    "using",
    "OP_FAMILIES",
    "FAMILIES",
    "REDUCTIONS",
    "algorithm_choices",
    "AUTO_MAX_ERR",
    "auto_budget",
    "AutoCall",
    "plan",
]

#: Public op name -> the family `Policy.ops` names (aliases share a family).
OP_FAMILIES: dict[str, str] = {name: o.family for name, o in OPS.items()}


def algorithm_choices() -> tuple[str, ...]:
    """What ``Policy(algorithm=...)`` accepts: ``"auto"`` and every registered reduction
    algorithm that a codec does not pick itself (asked each time: registering one later
    makes it a choice)."""
    return ("auto", *(a.name for a in algorithms("all_reduce") if not a.by_codec))


#: The relative error ``codec="auto"`` allows by default (bf16, fp16, int8: not fp8).
AUTO_MAX_ERR = 1e-2


def auto_budget(codec: Any) -> float | None:
    """The error budget of an ``"auto"`` / ``"auto:max_err=1e-3"`` spec; None for any other.

    Raises:
        ConfigError: an ``auto`` spec with an unknown parameter or a bad ``max_err``.
    """
    if not isinstance(codec, str):
        return None
    name, _, params = codec.strip().partition(":")
    if name.strip() != "auto":
        return None
    budget = AUTO_MAX_ERR
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, _, value = item.partition("=")
        try:
            if key.strip() != "max_err":
                raise ValueError(f"unknown parameter {key.strip()!r}")
            budget = float(value)
            if not budget >= 0:
                raise ValueError(f"max_err={value!r} is not >= 0")
        except ValueError as exc:
            raise ConfigError(
                f"codec spec {codec!r}: {exc}; expected 'auto' or 'auto:max_err=<float >= 0>'"
            ) from None
    return budget


def _auto_spec(budget: float) -> str:
    return "auto" if budget == AUTO_MAX_ERR else f"auto:max_err={budget!r}"


_SUM_LIKE = (dist.ReduceOp.SUM, dist.ReduceOp.AVG)
_EXACT_OPS = (
    dist.ReduceOp.MIN,
    dist.ReduceOp.MAX,
    dist.ReduceOp.PRODUCT,
    dist.ReduceOp.BAND,
    dist.ReduceOp.BOR,
    dist.ReduceOp.BXOR,
)


@dataclass(frozen=True)
class Policy:
    """When and how to compress. Frozen; make a new one with ``dataclasses.replace``.

    Tuning guide, knob by knob:

    Args:
        codec: the codec used by calls that do not pass ``codec=`` (a spec string,
            config dict or `Codec`). ``"none"`` (default) sends everything
            through plain ``torch.distributed``: commpress is then a no-op.
            Start with ``"bf16"`` (summable, always safe for gradients), then
            ``"int8"`` (4x on fp32, ~0.4% error per block), and reach for
            ``"sign"``/``"topk"`` (with error feedback) only when the link is
            the bottleneck and ``commpress bench`` says so. ``"auto"`` (or
            ``"auto:max_err=1e-3"``) picks per call, from link and codec speeds
            measured on this job, the fastest of plain and every codec x
            algorithm whose declared error (``Codec.typical_rel_err``) is within
            ``max_err`` (default 1e-2: fp16, bf16, int8); a call that does not pay
            goes to plain ``torch.distributed``. The model is modelled seconds =
            the algorithm's ``cost`` (``docs/algorithms.md``) + the codec's fixed
            encode/decode time + one descriptor round; a codec must beat plain by
            10%. ``docs/auto.md`` has the formulas; ``commpress.auto.decisions()``
            shows what it chose and why.
        min_bytes: tensors smaller than this (bytes of the rank's contribution)
            go uncompressed. Small messages are latency-bound: compressing them
            costs encode time and saves nothing. 32 KiB is a sane floor on
            fast links; raise it (1 MiB) on NVLink, lower it (4 KiB) on slow
            Ethernet. For ``all_to_all`` the largest contribution of any rank
            decides (it is only known after the descriptor exchange).
        ops: op families to compress when ``codec=`` is not passed per call;
            ``None`` (default) means all of `FAMILIES`: ``all_reduce``,
            ``reduce``, ``all_gather``, ``reduce_scatter``, ``broadcast``,
            ``all_to_all``, ``gather``, ``scatter``, ``p2p``. Restrict it to
            ``{"all_reduce", "reduce_scatter"}`` to compress only gradients and
            keep weights exact. A per-call ``codec=`` ignores this filter.
        error_feedback: ``None`` (default): on for codecs that want it (``sign``,
            ``topk``, ``randomk``, ``powersgd``; codecs declare
            ``wants_error_feedback``), off otherwise. ``True`` forces it on for
            every lossy codec, ``False`` off. It only affects reductions, and
            never lossless codecs. Keep it on for biased codecs: without it
            ``sign`` and ``topk`` do not converge.
        algorithm: all-reduce/reduce algorithm. ``"auto"`` (default): ``direct``
            for summable codecs (``fp16``/``bf16``: one backend all-reduce of the
            cast payload), ``gather`` for tensors up to ``gather_bytes`` on up
            to 8 ranks (one round, one quantization error), ``two_phase``
            otherwise (bandwidth-optimal like a ring). Force one to study it.
            A forced algorithm also runs the other families it declares:
            ``"hierarchical"`` runs reduce_scatter and all_gather in two levels too.
        verify: exchange a descriptor before every compressed collective (codec
            hash, sizes, op); catches codec mismatches on every rank and is
            what makes variable-size codecs possible on gloo. ``False`` skips it
            for codecs of fixed size (``encoded_nbytes`` is not None): one
            small collective less per call, but a mismatch between ranks is no
            longer detected -- only do it when every rank is known to use the
            same policy. Variable-size codecs (``zstd``, chains) always verify.
        gather_bytes: the size up to which ``algorithm="auto"`` prefers the
            ``gather`` all-reduce.
        checksum: add a CRC32 of the payload to every wire buffer and check it on
            arrival. Catches corruption in transit; costs a pass over the bytes
            (and a host copy on GPU).

    Raises:
        ConfigError: a value is out of range or of the wrong type (the message
            names it and the allowed values).

    Example::

        >>> from commpress.policy import Policy
        >>> Policy(codec="int8", min_bytes=4096).codec
        'int8'
    """

    codec: Any = "none"
    min_bytes: int = 32 * 1024
    ops: frozenset[str] | None = None
    error_feedback: bool | None = None
    algorithm: str = "auto"
    verify: bool = True
    gather_bytes: int = 256 * 1024
    checksum: bool = False

    def __post_init__(self) -> None:
        codec = self.codec
        if codec is None:
            codec = "none"
        budget = auto_budget(codec)
        if budget is not None:
            codec = _auto_spec(budget)
        elif not isinstance(codec, Codec):
            codec = get_codec(codec).spec  # validates; keeps the canonical string
        object.__setattr__(self, "codec", codec)
        for name in ("min_bytes", "gather_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"Policy.{name}={value!r} is not allowed; expected an int >= 0")
        ops = self.ops
        if ops is not None:
            if isinstance(ops, str):
                ops = [o.strip() for o in ops.split(",") if o.strip()]
            if not isinstance(ops, Iterable):
                raise ConfigError(
                    f"Policy.ops={ops!r} is not allowed; expected names of {FAMILIES}"
                )
            families = set()
            for o in ops:
                family = OP_FAMILIES.get(o, o if o in FAMILIES else None)
                if family is None:
                    raise ConfigError(
                        f"Policy.ops names unknown op {o!r}; choose from {list(FAMILIES)} "
                        f"(or the op names {sorted(OP_FAMILIES)})"
                    )
                families.add(family)
            object.__setattr__(self, "ops", frozenset(families))
        for name in ("verify", "checksum"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"Policy.{name}={getattr(self, name)!r} is not allowed; expected a bool"
                )
        if self.error_feedback not in (None, True, False):
            raise ConfigError(
                f"Policy.error_feedback={self.error_feedback!r} is not allowed; "
                "expected None, True or False"
            )
        choices = algorithm_choices()
        if self.algorithm not in choices:
            raise ConfigError(
                f"Policy.algorithm={self.algorithm!r} is not allowed; choose one of {list(choices)}"
            )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Policy:
        """A policy from ``COMMPRESS_*`` environment variables; keywords override them.

        ========================== =========================================== ==============
        variable                   meaning                                     example
        ========================== =========================================== ==============
        ``COMMPRESS_CODEC``        `codec`                                     ``int8:block=128``
        ``COMMPRESS_MIN_BYTES``    `min_bytes` (suffixes k/K, m/M, g/G = 1024) ``64k``
        ``COMMPRESS_OPS``          `ops`, comma-separated, or ``all``          ``all_reduce,gather``
        ``COMMPRESS_ERROR_FEEDBACK`` `error_feedback`: ``auto``, ``1``, ``0``  ``1``
        ``COMMPRESS_ALGORITHM``    `algorithm`                                 ``two_phase``
        ``COMMPRESS_VERIFY``       `verify` (``1``/``0``)                      ``0``
        ``COMMPRESS_GATHER_BYTES`` `gather_bytes`                              ``1M``
        ``COMMPRESS_CHECKSUM``     `checksum` (``1``/``0``)                    ``1``
        ========================== =========================================== ==============

        Raises:
            ConfigError: a variable holds a bad value (the message names the variable).
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        parsers = {
            "codec": ("COMMPRESS_CODEC", str),
            "min_bytes": ("COMMPRESS_MIN_BYTES", parse_size),
            "ops": ("COMMPRESS_OPS", _parse_ops),
            "error_feedback": ("COMMPRESS_ERROR_FEEDBACK", _parse_tristate),
            "algorithm": ("COMMPRESS_ALGORITHM", str),
            "verify": ("COMMPRESS_VERIFY", parse_bool),
            "gather_bytes": ("COMMPRESS_GATHER_BYTES", parse_size),
            "checksum": ("COMMPRESS_CHECKSUM", parse_bool),
        }
        for field_name, (var, parse) in parsers.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                kwargs[field_name] = parse(raw.strip())
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"environment variable {var}={raw!r} is not valid: {exc}"
                ) from None
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            names = ", ".join(
                f"{parsers[k][0]}={env[parsers[k][0]]!r}"
                for k in kwargs
                if k in parsers and parsers[k][0] in env and k not in overrides
            )
            raise ConfigError(
                f"{exc} (from the environment: {names or 'no COMMPRESS_* variables'})"
            ) from None

    def replace(self, **changes: Any) -> Policy:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _parse_tristate(raw: str) -> bool | None:
    return None if raw.lower() in ("auto", "default", "none") else parse_bool(raw)


def _parse_ops(raw: str) -> frozenset[str] | None:
    if raw.lower() in ("all", "*"):
        return None
    return frozenset(o.strip() for o in raw.split(",") if o.strip())


# ------------------------------------------------------------ global policy
_global_lock = threading.Lock()
_global: Policy | None = None
_local = threading.local()


def get_policy() -> Policy:
    """The policy in effect on this thread: the innermost `using`, else the global one.

    The global policy is built with `Policy.from_env` the first time it is needed.
    """
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    global _global
    if _global is None:
        with _global_lock:
            if _global is None:
                _global = Policy.from_env()
    return _global


def set_policy(policy: Policy | None) -> Policy:
    """Replace the global policy (None: rebuild it from the environment); returns the new one."""
    global _global
    if policy is not None and not isinstance(policy, Policy):
        raise ConfigError(f"set_policy expects a Policy, got {type(policy).__name__}")
    with _global_lock:
        _global = policy if policy is not None else Policy.from_env()
        return _global


@contextlib.contextmanager
def using(policy: Policy | None = None, **changes: Any) -> Iterator[Policy]:
    """Use ``policy`` (or the current one with ``changes``) on this thread inside the block.

    Example::

        with using(codec="int8", min_bytes=0):
            cdist.all_reduce(t)
    """
    base = policy if policy is not None else get_policy()
    if not isinstance(base, Policy):
        raise ConfigError(f"using expects a Policy, got {type(base).__name__}")
    effective = dataclasses.replace(base, **changes) if changes else base
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(effective)
    try:
        yield effective
    finally:
        stack.pop()


# ------------------------------------------------------------------ decide
@dataclass(frozen=True)
class Decision:
    """What one call does.

    Attributes:
        codec: the codec, or None to call plain ``torch.distributed``.
        algorithm: ``"direct"``, ``"two_phase"``, ``"gather"``, ``"powersgd"``,
            ``"transport"``, or None when ``codec`` is None.
        error_feedback: whether the call keeps a residual per key.
        reason: why, in words (for logs and tests).
        min_bytes: threshold still to apply once the sizes of every rank are known
            (``all_to_all`` only; 0 elsewhere).
    """

    codec: Codec | None
    algorithm: str | None
    error_feedback: bool = False
    reason: str = ""
    min_bytes: int = 0

    @property
    def compressed(self) -> bool:
        return self.codec is not None


def _plain(reason: str) -> Decision:
    return Decision(None, None, False, reason)


def _op_name(reduce_op: Any) -> str:
    return str(reduce_op).rsplit(".", 1)[-1]


def decide(
    op: str,
    tensor: torch.Tensor,
    reduce_op: Any = None,
    codec: CodecLike | None = None,
    *,
    world_size: int | None = None,
    nbytes: int | None = None,
    policy: Policy | None = None,
    auto: Callable[..., Decision] | None = None,
) -> Decision:
    """Decide codec and algorithm for one call.

    Args:
        op: public op name (``"all_reduce"``, ``"broadcast"``, ... see `OP_FAMILIES`).
        tensor: the rank's contribution (dtype and, unless ``nbytes`` is given, size).
        reduce_op: ``torch.distributed.ReduceOp`` for reductions, else None.
        codec: the per-call ``codec=``; None means the policy's codec.
        world_size: ranks in the group (default: the default group's size).
        nbytes: the size to compare with ``min_bytes`` (default ``tensor.nbytes``).
        policy: default `get_policy()`.
        auto: what decides a call whose codec is ``"auto"`` once the checks every
            codec shares have passed: ``auto(op, family, dtype, nbytes, world,
            sum_like, max_err, policy) -> Decision`` (`commpress.auto.choose`, bound
            to the call's group by the call driver). None: such calls go plain.

    Raises:
        ConfigError: unknown op; ``powersgd`` requested for an op it cannot do; a forced
            ``algorithm`` that cannot run this call.
        UnsupportedDtypeError: ``AVG`` of a non-floating tensor.
    """
    policy = policy or get_policy()
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    size = tensor.numel() * tensor.element_size() if nbytes is None else nbytes
    got = plan(op, tensor.dtype, reduce_op, codec, world_size, size, policy)
    return got.decide(auto, policy) if isinstance(got, AutoCall) else got


@dataclass(frozen=True)
class AutoCall:
    """A call that the checks every codec shares leave to ``auto``: its callback's
    arguments (see `decide`), the same for every call of one op, dtype, size, world
    and policy."""

    op: str
    family: str
    dtype: torch.dtype
    nbytes: int
    world: int
    sum_like: bool
    max_err: float

    def decide(self, auto: Callable[..., Decision] | None, policy: Policy) -> Decision:
        """``auto``'s decision for the call (plain when there is no ``auto``)."""
        if auto is None:
            return _plain("auto outside the collectives' call driver: plain")
        return auto(
            self.op,
            self.family,
            self.dtype,
            self.nbytes,
            self.world,
            self.sum_like,
            self.max_err,
            policy,
        )


#: The most plans `plan` keeps per policy, and the most policies it keeps plans for
#: (past either, it starts again: a cache miss costs one `decide`).
PLAN_CACHE = 4096
_PLAN_POLICIES = 16
# id(policy) -> (policy, plans): the entry holds the policy, so its id is not reused.
_plans: dict[int, tuple[Policy, dict[tuple[Any, ...], Decision | AutoCall]]] = {}
_RED_OP_TYPE = type(dist.ReduceOp.SUM)


def plan(
    op: str,
    dtype: torch.dtype,
    reduce_op: Any,
    codec: CodecLike | None,
    world_size: int,
    nbytes: int,
    policy: Policy,
) -> Decision | AutoCall:
    """`decide` without the ``auto`` step: a plain or compressed `Decision`, or the
    `AutoCall` to hand to ``auto`` (the call driver's fast path calls this).

    Plain decisions and `AutoCall` objects are pure functions of the arguments and
    are cached per policy object (a dict lookup for the repeated small calls of a
    training loop); compressed decisions are made afresh, so that a codec or
    algorithm registered later is weighed.
    """
    per = _plans.get(id(policy))
    if per is None:
        if len(_plans) >= _PLAN_POLICIES:
            _plans.clear()
        per = _plans[id(policy)] = (policy, {})
    plans = per[1]
    key = (op, dtype, reduce_op, codec, world_size, nbytes)
    try:
        got = plans.get(key)
    except TypeError:  # an unhashable codec= (a config dict): not cached
        return _decide(op, dtype, reduce_op, codec, world_size, nbytes, policy)
    if got is not None:
        return got
    got = _decide(op, dtype, reduce_op, codec, world_size, nbytes, policy)
    if (reduce_op is None or type(reduce_op) is _RED_OP_TYPE) and (
        isinstance(got, AutoCall) or got.codec is None
    ):
        if len(plans) >= PLAN_CACHE:
            plans.clear()
        plans[key] = got
    return got


def _decide(
    op: str,
    dtype: torch.dtype,
    reduce_op: Any,
    codec: CodecLike | None,
    world_size: int,
    size: int,
    policy: Policy,
) -> Decision | AutoCall:
    """What `plan` returns, uncached."""
    family = OP_FAMILIES.get(op)
    if family is None:
        raise ConfigError(f"unknown op {op!r}; expected one of {sorted(OP_FAMILIES)}")
    explicit = codec is not None
    spec = codec if explicit else policy.codec
    reduction = family in REDUCTIONS
    if reduction:
        reduce_op = dist.ReduceOp.SUM if reduce_op is None else reduce_op
        if reduce_op == dist.ReduceOp.AVG and not is_float(dtype):
            raise UnsupportedDtypeError(
                f"{op}: ReduceOp.AVG needs a floating tensor, got {dtype}; use SUM and divide"
            )
    budget = _cached_budget(spec) if isinstance(spec, str) else None
    if budget is not None:
        if not explicit and policy.ops is not None and family not in policy.ops:
            return _plain(f"{family} not in policy.ops")
        return _auto_checks(op, family, dtype, reduce_op, size, world_size, budget, policy)
    c = get_codec(spec)
    named = None if c.algorithm is None else get_algorithm(c.algorithm)
    if named is not None and family not in named.families:
        if explicit:
            raise ConfigError(
                f"{op}: codec {c.spec!r} is the {named.name!r} algorithm, which runs "
                f"{'/'.join(sorted(named.families))} only, and cannot run {op}; use it with "
                f"those, or pick a codec such as 'int8' or 'bf16'"
            )
        return _plain(f"{c.spec} compresses {'/'.join(sorted(named.families))} only")
    if c.codec_id == "none":
        return _plain("codec none")
    if not explicit and policy.ops is not None and family not in policy.ops:
        return _plain(f"{family} not in policy.ops")
    if world_size <= 1:
        return _plain("single rank: nothing crosses a wire")
    if not c.supports(dtype):
        return _plain(f"{c.spec} does not take {dtype} (never lossy on non-floating data)")
    if reduction and not any(reduce_op == r for r in _SUM_LIKE):
        if not c.lossless or not any(reduce_op == r for r in _EXACT_OPS):
            return _plain(f"ReduceOp.{_op_name(reduce_op)} is never reduced lossily")
    threshold = 0
    if family == "all_to_all":
        threshold = policy.min_bytes  # only the largest contribution counts: known later
    elif size == 0 or size < policy.min_bytes:
        return _plain(f"{size} bytes < min_bytes={policy.min_bytes}" if size else "empty tensor")
    ef = (
        reduction
        and not c.lossless
        and (policy.error_feedback if policy.error_feedback is not None else c.wants_error_feedback)
    )
    if named is not None:
        return Decision(c, named.name, ef or named.by_codec, f"{named.name} {family}")
    if not reduction:
        mover = _moving(family, policy)
        return Decision(c, mover.name, False, "encode once, move, decode", threshold)
    return _reduction(op, family, c, reduce_op, size, world_size, policy, ef)


_cached_budget = functools.lru_cache(maxsize=64)(auto_budget)


def _auto_checks(
    op: str,
    family: str,
    dtype: torch.dtype,
    reduce_op: Any,
    size: int,
    world: int,
    budget: float,
    policy: Policy,
) -> Decision | AutoCall:
    """Plain for the calls ``auto`` never compresses, else the `AutoCall` for ``auto``.

    ``all_to_all`` and ``p2p`` go plain: their sizes differ between ranks (or only two
    ranks take part), so no decision could be shared by the whole group.
    """
    if world <= 1:
        return _plain("single rank: nothing crosses a wire")
    if not is_float(dtype):
        return _plain(f"auto: never lossy on {dtype}")
    sum_like = any(reduce_op == r for r in _SUM_LIKE)
    if family in REDUCTIONS and not sum_like:
        return _plain(f"ReduceOp.{_op_name(reduce_op)} is never reduced lossily")
    if family in ("all_to_all", "p2p"):
        return _plain(f"auto: {family} goes plain (no decision shared by the group)")
    if size == 0 or size < policy.min_bytes:
        return _plain(f"{size} bytes < min_bytes={policy.min_bytes}" if size else "empty tensor")
    return AutoCall(op, family, dtype, size, world, sum_like, budget)


def _moving(family: str, policy: Policy) -> Any:
    """The algorithm of an op that only moves data: the forced one where it runs the
    family (``hierarchical`` all_gather), else the first in ``auto_order``."""
    if policy.algorithm != "auto" and family in get_algorithm(policy.algorithm).families:
        return get_algorithm(policy.algorithm)
    return default_order(family)[0]


def _reduction(
    op: str,
    family: str,
    c: Codec,
    reduce_op: Any,
    size: int,
    world_size: int,
    policy: Policy,
    ef: bool,
) -> Decision:
    """The algorithm of a compressed reduction: the forced one, else the first in
    ``auto_order`` that can run the call and fits its size."""
    sum_like = any(reduce_op == r for r in _SUM_LIKE)
    forced = None if policy.algorithm == "auto" else get_algorithm(policy.algorithm)
    if forced is not None and family in forced.families:
        why_not = forced.eligible(c, sum_like)
        if why_not is not None:
            raise ConfigError(
                f"{op}: Policy(algorithm={forced.name!r}) {why_not}; got codec {c.spec!r} "
                f"with ReduceOp.{_op_name(reduce_op)}; use algorithm='auto'"
            )
        return Decision(c, forced.name, ef, f"{forced.name} {family}")
    for a in default_order(family):
        if a.eligible(c, sum_like) is None and a.fits(c, size, world_size, policy):
            return Decision(c, a.name, ef, f"{a.name} {family}")
    raise ConfigError(f"{op}: no registered algorithm can reduce with codec {c.spec!r}")
