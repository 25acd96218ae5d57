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
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .algorithms import algorithms
from .codec import Codec
from .decision import (
    AUTO_MAX_ERR,
    AutoCall,
    Decision,
    _auto_spec,
    auto_budget,
    plan,
)
from .errors import ConfigError
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
    if policy is None:
        policy = get_policy()
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    size = tensor.numel() * tensor.element_size() if nbytes is None else nbytes
    got = plan(op, tensor.dtype, reduce_op, codec, world_size, size, policy)
    return got.decide(auto, policy) if isinstance(got, AutoCall) else got
