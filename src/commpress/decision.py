"""The decision of one call: the cached `plan`, and what it returns.

`plan` turns one call (op, dtype, reduce op, requested codec, world, size)
under a policy into a `Decision` -- a codec and an algorithm, or ``None``
for "hand it to plain ``torch.distributed``" (the rules are in
`commpress.policy`'s docstring) -- or the `AutoCall` that ``auto`` decides.
It is cached for the repeated small calls of a training loop; the call
driver (`commpress.distributed.call`) uses it. `commpress.policy.decide`
is the same from a tensor, with the policy's defaults. `commpress.policy`
re-exports every public name here; this module sits below it and imports
nothing of it (`Policy` here is the protocol of the fields it reads).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .algorithms import default_order, get_algorithm
from .codec import Codec, is_float
from .errors import ConfigError, UnsupportedDtypeError
from .ops import OPS, REDUCTIONS
from .registry import CodecLike, get_codec


class Policy(Protocol):
    """What a decision reads of a `commpress.policy.Policy`. The class lives in
    `commpress.policy`, which sits above this module (it re-exports the names here)."""

    codec: Any
    min_bytes: int
    ops: frozenset[str] | None
    error_feedback: bool | None
    algorithm: str


__all__ = ["AUTO_MAX_ERR", "AutoCall", "Decision", "auto_budget", "plan"]

#: Public op name -> its family (aliases share a family).
_FAMILY: dict[str, str] = {name: o.family for name, o in OPS.items()}

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


@dataclass(frozen=True)
class AutoCall:
    """A call that the checks every codec shares leave to ``auto``: its callback's
    arguments (see `commpress.policy.decide`), the same for every call of one op, dtype, size, world
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
#: (past either, it starts again: a cache miss costs one `_decide`).
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
    """`commpress.policy.decide` without the ``auto`` step: a plain or compressed `Decision`, or the
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
    family = _FAMILY.get(op)
    if family is None:
        raise ConfigError(f"unknown op {op!r}; expected one of {sorted(_FAMILY)}")
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

    ``p2p`` goes plain (two ranks take part, no group to share a decision), and so
    does ``all_to_all`` of tensor lists (their sizes may differ between ranks).
    ``all_to_all_single`` reaches here only with even splits
    (`commpress.distributed.all_to_all_single` sends a call with split sizes plain),
    where torch requires the same input size on every rank, so ``size`` is the same
    everywhere and so is the decision.
    """
    if world <= 1:
        return _plain("single rank: nothing crosses a wire")
    if not is_float(dtype):
        return _plain(f"auto: never lossy on {dtype}")
    sum_like = any(reduce_op == r for r in _SUM_LIKE)
    if family in REDUCTIONS and not sum_like:
        return _plain(f"ReduceOp.{_op_name(reduce_op)} is never reduced lossily")
    if family == "p2p":
        return _plain("auto: p2p goes plain (no decision shared by the group)")
    if op == "all_to_all":
        return _plain("auto: all_to_all of tensor lists goes plain (sizes differ by rank)")
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
