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
Residuals live in `error_feedback` (per codec config, kept by
`commpress.feedback`), PowerSGD state in `powersgd_memory` (kept by
`commpress.algorithms.powersgd`); `reset_error_feedback` clears both.

Layout: `call` holds the one call driver (`call.execute` of a `call.Request`)
and the argument checks; `reductions`, `moves` and `p2p` hold the public
functions, each an argument check plus one request.
"""

from __future__ import annotations

import torch.distributed as dist

from ..algorithms import powersgd as _powersgd
from ..engine import Handle
from ..feedback import error_feedback
from ..feedback import reset_error_feedback as _reset_feedback
from ..ops import OPS

# The public ops, exported through ``__all__ = [*OPS, ...]`` (names listed in `commpress.ops`).
from .moves import (  # noqa: F401
    all_gather,
    all_gather_into_tensor,
    all_to_all,
    all_to_all_single,
    broadcast,
    gather,
    scatter,
)
from .p2p import irecv, isend, recv, send  # noqa: F401
from .reductions import all_reduce, reduce, reduce_scatter, reduce_scatter_tensor  # noqa: F401

__all__ = [
    *OPS,
    "Handle",
    "ReduceOp",
    "error_feedback",
    "powersgd_memory",
    "reset_error_feedback",
]

ReduceOp = dist.ReduceOp
powersgd_memory = _powersgd.memory


def reset_error_feedback() -> None:
    """Forget every residual and every PowerSGD state of the compressed collectives."""
    _reset_feedback()
    _powersgd.reset_memory()
