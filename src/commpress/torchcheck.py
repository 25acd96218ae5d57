"""torch's own argument checks, run before a patched collective does anything else.

Under `commpress.patch` a call must fail the way the unpatched call fails for
every error torch finds before it communicates: wrong argument types, lists
that are not lists of tensors, mixed dtypes, a reduce op that complex tensors
do not support, a root given both as a global and a group rank, a rank
outside the group. `check` runs torch's own helpers from
``torch.distributed.distributed_c10d`` (``_check_single_tensor``,
``_check_tensor_list``, ``_ensure_all_tensors_same_dtype``,
``_canonicalize_group_rank``, ``supports_complex``) in the order the torch
function runs them, so the exception types and messages are torch's, and they
follow torch when it changes them.

`check` returns the call's arguments by name (for the agreement check), or
`TORCH` when torch itself should take the call: arguments that do not bind
to the signature (torch raises its ``TypeError``) and a rank that is not in
the group (torch warns and returns None).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["check", "TORCH"]

#: `check`'s answer when the original torch function should handle the call itself.
TORCH = object()


def _single(a: dict[str, Any], name: str) -> None:
    c10d._check_single_tensor(a.get(name), name)


def _list(a: dict[str, Any], name: str, label: str | None = None) -> None:
    c10d._check_tensor_list(a.get(name), label or name)


def _dtypes(a: dict[str, Any], *names: str) -> None:
    c10d._ensure_all_tensors_same_dtype(*(a[n] for n in names if a.get(n) is not None))


def _root(
    a: dict[str, Any], name: str, *, return_global: bool = False, default: int | None = None
) -> None:
    """torch's root check; ``default``: the global rank torch uses when neither
    ``name`` nor ``group_name`` is given (0 for gather's ``dst``, scatter's ``src``)."""
    group = a.get("group")
    rank, group_rank = a.get(name), a.get(f"group_{name}")
    if rank is None and group_rank is None:
        rank = default
    c10d._canonicalize_group_rank(
        c10d._group_or_default_group(group), rank, group_rank, return_global
    )


def _not_member(a: dict[str, Any]) -> bool:
    return c10d._rank_not_in_group(a.get("group"))


def _all_reduce(a: dict[str, Any]) -> Any:
    _single(a, "tensor")
    if _not_member(a):
        return TORCH
    op = a.get("op", dist.ReduceOp.SUM)
    if a["tensor"].is_complex() and not c10d.supports_complex(op):
        raise ValueError(f"all_reduce does not support {op} on complex tensors")
    return a


def _reduce(a: dict[str, Any]) -> Any:
    _root(a, "dst")
    _single(a, "tensor")
    return TORCH if _not_member(a) else a


def _broadcast(a: dict[str, Any]) -> Any:
    _root(a, "src")
    _single(a, "tensor")
    return TORCH if _not_member(a) else a


def _all_gather(a: dict[str, Any]) -> Any:
    _list(a, "tensor_list")
    _single(a, "tensor")
    _dtypes(a, "tensor_list", "tensor")
    return TORCH if _not_member(a) else a


def _all_gather_single(a: dict[str, Any]) -> Any:
    _single(a, "input_tensor")
    _single(a, "output_tensor")
    return TORCH if _not_member(a) else a


def _reduce_scatter(a: dict[str, Any]) -> Any:
    _single(a, "output")
    _list(a, "input_list")
    _dtypes(a, "output", "input_list")
    return TORCH if _not_member(a) else a


def _reduce_scatter_single(a: dict[str, Any]) -> Any:
    _single(a, "output")
    _single(a, "input")
    return TORCH if _not_member(a) else a


def _all_to_all_single(a: dict[str, Any]) -> Any:
    if _not_member(a):
        return TORCH
    _single(a, "output")
    _single(a, "input")
    _dtypes(a, "output", "input")
    return a


def _all_to_all(a: dict[str, Any]) -> Any:
    if _not_member(a):
        return TORCH
    _list(a, "output_tensor_list")
    _list(a, "input_tensor_list")
    _dtypes(a, "output_tensor_list", "input_tensor_list")
    return a


def _gather(a: dict[str, Any]) -> Any:
    _single(a, "tensor")
    if a.get("gather_list"):
        _list(a, "gather_list")
    _dtypes(a, "tensor", "gather_list")
    if _not_member(a):
        return TORCH
    _root(a, "dst", default=0)
    return a


def _scatter(a: dict[str, Any]) -> Any:
    _single(a, "tensor")
    if a.get("scatter_list"):
        _list(a, "scatter_list")
    _dtypes(a, "tensor", "scatter_list")
    _root(a, "src", default=0)
    return TORCH if _not_member(a) else a


def _send(a: dict[str, Any]) -> Any:
    _root(a, "dst", return_global=True)
    _single(a, "tensor")
    return TORCH if _not_member(a) else a


def _recv(a: dict[str, Any]) -> Any:
    _single(a, "tensor")
    if _not_member(a):
        return TORCH
    if a.get("src") is not None or a.get("group_src") is not None:
        _root(a, "src", return_global=True)
    return a


_CHECKS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "all_reduce": _all_reduce,
    "reduce": _reduce,
    "broadcast": _broadcast,
    "all_gather": _all_gather,
    "all_gather_into_tensor": _all_gather_single,
    "all_gather_single": _all_gather_single,
    "reduce_scatter": _reduce_scatter,
    "reduce_scatter_tensor": _reduce_scatter_single,
    "reduce_scatter_single": _reduce_scatter_single,
    "all_to_all": _all_to_all,
    "all_to_all_single": _all_to_all_single,
    "gather": _gather,
    "scatter": _scatter,
    "send": _send,
    "isend": _send,
    "recv": _recv,
    "irecv": _recv,
}


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def check(name: str, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Run torch's checks for ``original(*args, **kwargs)`` (torch's ``name``).

    Returns:
        The arguments by name, defaults included, or `TORCH` (see the module docstring).

    Raises:
        TypeError, ValueError: what torch raises for these arguments, before any
            communication.
    """
    try:
        bound = _signature(original).bind(*args, **kwargs)
    except TypeError:
        return TORCH
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    run = _CHECKS.get(name)
    if run is None or not dist.is_initialized():
        return arguments
    return run(arguments)
