"""Drop-in compression: swap the ``torch.distributed`` collectives for compressed ones.

``commpress.patch(codec="int8")`` replaces the collective functions of
``torch.distributed`` (and of ``torch.distributed.distributed_c10d``, which
holds the same function objects) with the ones of `commpress.distributed`,
sets the `commpress.policy.Policy` they consult, and makes every
``DistributedDataParallel`` model built while patched use
`commpress.hooks.compress_hook` for its gradients. ``commpress.unpatch()``
puts back the very same function objects, the DDP constructor and the policy
that was in effect before. Patching needs no process group: patch first,
``init_process_group`` later is fine.

What is intercepted
    ``all_reduce``, ``reduce``, ``all_gather``, ``all_gather_into_tensor``,
    ``reduce_scatter``, ``reduce_scatter_tensor``, ``broadcast``,
    ``all_to_all``, ``all_to_all_single``, ``send``, ``recv``, ``isend``,
    ``irecv``, ``gather``, ``scatter``, and torch 2.13's aliases
    ``all_gather_single`` / ``reduce_scatter_single`` (which FSDP2 calls).
    Only names that exist in both the installed torch and
    `commpress.distributed` are swapped; `patched_names` lists them.
    ``init_process_group`` is wrapped too, only to publish the policy for the
    agreement check (`commpress.agreement`).

Before its first call on a group a patched collective checks, through the
rendezvous store, that every rank of the group runs this policy
(`commpress.agreement`), and every call first runs torch's own argument
checks (`commpress.torchcheck`), so it raises torch's errors for torch's
argument errors.

What is left alone, on purpose
    - Object collectives (``all_gather_object``, ``broadcast_object_list``,
      ...) and every other call made from inside
      ``torch.distributed.distributed_c10d`` itself (``send`` calling
      ``isend``): they reach the original functions.
    - Calls made from inside commpress (its algorithms move ``uint8``
      buffers with the original collectives).
    - ``barrier``, coalesced and ``batch_isend_irecv`` calls, functional
      collectives (``torch.distributed._functional_collectives``, DTensor)
      and private torch modules that bound a collective under another name.
    - Names bound before patching (``from torch.distributed import
      all_reduce`` executed earlier) keep the original function. Names bound
      while patched hold a wrapper that calls the original once unpatched.

With a lossless codec a patched collective behaves like the original one:
same in-place results, return values (``None``, the sender rank for
``recv``), dtypes and groups; ``async_op=True`` returns commpress's
`commpress.handle.Handle`, itself a ``torch.distributed.Work`` (``wait``,
``is_completed``, ``get_future``), so code that checks
``isinstance(work, dist.Work)`` (FSDP2 does) keeps working.

Example::

    import commpress
    with commpress.patch(codec="int8", min_bytes=1 << 16):
        train()          # unmodified code calling torch.distributed.all_reduce
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from . import agreement, torchcheck
from .errors import ConfigError
from .ops import OPS, TORCH_ALIASES

__all__ = ["patch", "unpatch", "is_patched", "patched_names", "Patch"]

#: torch.distributed name -> name of the commpress.distributed function that replaces it.
COLLECTIVES: dict[str, str] = {**{name: name for name in OPS}, **TORCH_ALIASES}

_MODULES: tuple[types.ModuleType, ...] = (dist, c10d)

#: Calls from these modules always reach the original function (see module docstring).
_PASSTHROUGH_MODULES = frozenset({c10d.__name__})

_lock = threading.RLock()
_originals: dict[tuple[str, str], Callable[..., Any]] = {}
_wrappers: dict[int, Callable[..., Any]] = {}  # id(original) -> its wrapper
_policies_before: list[Any] = []  # policy in effect before each still-open patch()
_ddp_init: Callable[..., Any] | None = None
_installed = False


def _as_torch_result(result: Any) -> Any:
    """What the torch function returns: the ``Work`` when async, ``recv``'s rank, else None."""
    if isinstance(result, (dist.Work, int)):
        return result  # a commpress Handle is a dist.Work
    return None  # blocking torch collectives return None, whatever commpress returned


def _caller_is_internal(frame: types.FrameType | None) -> bool:
    if frame is None:
        return False
    name = frame.f_globals.get("__name__", "")
    return name in _PASSTHROUGH_MODULES or name == "commpress" or name.startswith("commpress.")


def _make_wrapper(original: Callable[..., Any], target: str) -> Callable[..., Any]:
    from . import distributed as cdist

    compressed = getattr(cdist, target)

    name = original.__name__

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _installed or _caller_is_internal(sys._getframe(1)):
            return original(*args, **kwargs)
        arguments = torchcheck.check(name, original, args, kwargs)  # torch's own errors first
        if arguments is torchcheck.TORCH:
            return original(*args, **kwargs)
        _agree(name, arguments)
        return _as_torch_result(compressed(*args, **kwargs))

    wrapper.__commpress_original__ = original  # type: ignore[attr-defined]
    return wrapper


_P2P = frozenset({"send", "recv", "isend", "irecv"})


def _agree(name: str, arguments: dict[str, Any]) -> None:
    """The agreement check (`commpress.agreement`) for this call's group, or its peer."""
    if not dist.is_initialized():
        return
    group = arguments.get("group")
    peer = None
    if name in _P2P:
        peer_arg = "dst" if name in ("send", "isend") else "src"
        peer = arguments.get(peer_arg)
        group_peer = arguments.get(f"group_{peer_arg}")
        if peer is None and group_peer is not None:
            peer = dist.get_global_rank(c10d._group_or_default_group(group), group_peer)
        if peer is None:
            return  # recv from any source: the peer is only known afterwards
    agreement.check(group, peer, op=name)


def _make_init_process_group(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if _installed:
            from .policy import get_policy

            agreement.publish(get_policy())
        return result

    init_process_group.__commpress_original__ = original  # type: ignore[attr-defined]
    return init_process_group


def _build_policy(codec: Any, policy_kwargs: dict[str, Any]) -> Any:
    from .policy import Policy

    overrides = dict(policy_kwargs)
    if codec is not None:
        from .policy import auto_budget
        from .registry import get_codec

        if auto_budget(codec) is None:  # "auto" is a policy choice, not a codec
            get_codec(codec)  # an unparsable spec fails here, at patch() time
        overrides["codec"] = codec
    fields = {f.name for f in dataclasses.fields(Policy)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"commpress.patch: unknown policy option(s) {unknown}; allowed: {sorted(fields)}"
        )
    return Policy.from_env(**overrides)


def _install() -> None:
    global _installed, _ddp_init
    from . import distributed as cdist

    for module in _MODULES:
        for name, target in COLLECTIVES.items():
            original = module.__dict__.get(name)
            if original is None or not hasattr(cdist, target):
                continue
            original = getattr(original, "__commpress_original__", original)
            wrapper = _wrappers.get(id(original))
            if wrapper is None:
                wrapper = _wrappers[id(original)] = _make_wrapper(original, target)
            _originals[(module.__name__, name)] = original
            setattr(module, name, wrapper)

    for module in _MODULES:
        original = module.__dict__.get("init_process_group")
        if original is not None:
            original = getattr(original, "__commpress_original__", original)
            _originals[(module.__name__, "init_process_group")] = original
            module.init_process_group = _make_init_process_group(original)

    from torch.nn.parallel import DistributedDataParallel as DDP

    _ddp_init = DDP.__dict__["__init__"]
    DDP.__init__ = _make_ddp_init(_ddp_init)  # type: ignore[method-assign]
    _installed = True


def _uninstall() -> None:
    global _installed, _ddp_init
    by_name = {m.__name__: m for m in _MODULES}
    for (module_name, name), original in _originals.items():
        setattr(by_name[module_name], name, original)
    _originals.clear()
    if _ddp_init is not None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP.__init__ = _ddp_init  # type: ignore[method-assign]
        _ddp_init = None
    _installed = False


def _make_ddp_init(original_init: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if _installed:
            _arm_ddp_hook(self)

    __init__.__commpress_original__ = original_init  # type: ignore[attr-defined]
    return __init__


def _arm_ddp_hook(ddp: Any) -> None:
    """Register commpress's comm hook on ``ddp`` at its first forward, unless it has one.

    Registration waits for the first forward because DDP accepts one comm hook only:
    a script that registers its own hook after construction keeps working. Under
    ``codec="auto"`` the hook decides per bucket, and `commpress.hooks.register`
    registers none when no bucket of the model could pay (plain DDP then).
    """
    from .policy import auto_budget, get_policy
    from .registry import get_codec

    policy = get_policy()
    # Under "auto" the hook decides per bucket (commpress.hooks), as calls are decided.
    codec = policy.codec if auto_budget(policy.codec) is not None else get_codec(policy.codec)
    if getattr(codec, "codec_id", None) == "none":
        return
    if policy.ops is not None and "all_reduce" not in policy.ops:
        return
    state_kwargs: dict[str, Any] = {"codec": codec, "min_bytes": policy.min_bytes}
    if policy.error_feedback is not None:
        state_kwargs["error_feedback"] = policy.error_feedback

    def register_at_first_forward(module: Any, args: Any) -> None:
        handle.remove()
        if getattr(module, "_comm_hooks", None):
            return  # the script (or DDP's mixed precision) registered a hook already
        from . import hooks

        # Before the hook's twin group is made collectively: an unpatched rank would
        # never join it (and would all-reduce the buckets plainly).
        agreement.check(module.process_group, op="DDP gradient hook")

        hooks.register(module, hooks.CompressionState(**state_kwargs))

    handle = ddp.register_forward_pre_hook(register_at_first_forward)
    ddp._commpress_hook_pending = handle


def patch(codec: Any = None, **policy_kwargs: Any) -> Patch:
    """Swap the ``torch.distributed`` collectives for compressed ones.

    Args:
        codec: codec spec (``"int8"``, ``"fp8+zstd"``), config dict or `Codec`;
            None keeps the codec of ``Policy.from_env()`` (``COMMPRESS_CODEC``).
        **policy_kwargs: any other `commpress.policy.Policy` field (``min_bytes``, ...);
            fields not given come from the ``COMMPRESS_*`` environment variables.

    Returns:
        A `Patch`; use it as a context manager to unpatch on exit. Patching again
        while patched only changes the policy (no double wrapping); leaving the inner
        ``with`` block restores the outer policy.

    The policy set is the process-wide one (`commpress.policy.set_policy`); call
    ``patch`` outside ``commpress.policy.using`` blocks, whose thread-local policy
    would otherwise be what ``unpatch`` restores globally.

    Raises:
        ConfigError: the codec spec is malformed or unknown, or a policy option is bad.
    """
    policy = _build_policy(codec, policy_kwargs)
    from .policy import get_policy, set_policy

    with _lock:
        previous = get_policy()
        if not _installed:
            _install()
        _policies_before.append(previous)
        set_policy(policy)
        agreement.publish(policy)
        return Patch(policy, len(_policies_before))


def unpatch() -> None:
    """Restore the original collectives, DDP constructor and policy. Harmless when not patched."""
    with _lock:
        _restore(1)


def _restore(level: int) -> None:
    from .policy import set_policy

    if level > len(_policies_before) or level < 1:
        return
    set_policy(_policies_before[level - 1])
    del _policies_before[level - 1 :]
    if not _policies_before and _installed:
        _uninstall()
        agreement.publish(None)
    elif _policies_before:
        from .policy import get_policy

        agreement.publish(get_policy())


def is_patched() -> bool:
    """Whether the ``torch.distributed`` collectives are currently swapped."""
    return _installed


def patched_names() -> list[str]:
    """``"module.name"`` of every function currently swapped."""
    with _lock:
        return sorted(f"{m}.{n}" for m, n in _originals)


class Patch:
    """What `patch` returns: the policy it set, and a context manager that undoes it."""

    def __init__(self, policy: Any, level: int) -> None:
        self.policy = policy
        self._level = level

    def __repr__(self) -> str:
        return f"Patch({self.policy!r}, active={self.active})"

    @property
    def active(self) -> bool:
        """True until this patch (or an outer one) is undone."""
        return _installed and len(_policies_before) >= self._level

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        with _lock:
            _restore(self._level)
