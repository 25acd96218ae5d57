"""The stats table a process prints when ``commpress run --stats`` asked for it.

Shared by `commpress.cli_run` (the ``commpress run`` process) and
`commpress.startup` (its children, at exit), so neither imports the other.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["print_stats", "nothing_compressed_warning"]

_printed: set[int] = set()  # pids that printed their table already


def print_stats(policy: Any = None, *, parent: bool = False, only_if_used: bool = False) -> None:
    """Print this process's `commpress.stats` table, and a warning if nothing was compressed.

    Args:
        policy: the policy the calls ran under (default: the one in effect now); the
            warning uses it to say why nothing was compressed.
        parent: this is the ``commpress run`` process itself: when it made no call, say
            that its child processes print their own tables.
        only_if_used: print nothing when the process made no collective call.
    """
    from .policy import get_policy
    from .stats import stats

    if only_if_used and os.getpid() in _printed:
        return  # at exit, after `commpress run` printed this process's table
    table = stats()
    total = table.total()
    if only_if_used and total.calls == 0:
        return
    _printed.add(os.getpid())
    rank = os.environ.get("RANK")
    title = "commpress stats" + (f" (rank {rank})" if rank is not None else f" (pid {os.getpid()})")
    sys.stdout.flush()
    print(f"{title}\n{table}", flush=True)
    warning = nothing_compressed_warning(table, policy or get_policy(), parent=parent)
    if warning:
        print(f"commpress run: warning: {warning}", file=sys.stderr, flush=True)


def nothing_compressed_warning(table: Any, policy: Any, *, parent: bool = False) -> str | None:
    """Why a process that made collective calls compressed none of them; None if it did."""
    total = table.total()
    if total.compressed:
        return None
    if total.calls == 0:
        if parent:
            return (
                "this process made no torch.distributed collective call; ranks the script "
                "started as child processes (mp.spawn, Lightning, subprocess) print their own "
                "tables when they exit"
            )
        return None
    if str(policy.codec) == "none":
        why = "the codec is 'none': pass --codec (or set COMMPRESS_CODEC)"
    else:
        biggest = max(table, key=lambda s: s.bytes_in / max(s.calls, 1))
        mean = biggest.bytes_in // max(biggest.calls, 1)
        if mean < policy.min_bytes:
            why = (
                f"the calls average at most {mean} bytes, under min_bytes={policy.min_bytes}: "
                "lower --min-bytes (or COMMPRESS_MIN_BYTES)"
            )
        else:
            why = (
                "the calls' tensors were not floating point, used MIN/MAX/PRODUCT/bitwise "
                f"reductions, were under min_bytes={policy.min_bytes}, or their ops are not in "
                "Policy.ops"
            )
    return f"{total.calls} collective call(s), none compressed: {why}"
