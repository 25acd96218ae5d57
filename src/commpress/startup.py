"""What the start-up hook does once a process that asked for it has imported torch.

The hook itself is the top-level module ``_commpress_startup`` (standard
library only, run from ``commpress-startup.pth`` at interpreter start; see its
docstring for the variables). When it fires, `activate`:

- calls ``commpress.patch()`` with the policy of the ``COMMPRESS_*`` variables;
- with ``COMMPRESS_STATS=1`` (set by ``commpress run --stats``), prints this
  process's statistics table when it exits, if it made any collective call:
  at interpreter exit, and also at the end of a ``multiprocessing`` child
  started with ``fork`` (which leaves through ``os._exit`` and skips
  ``atexit``).

`active` tells whether the hook patched this process.
"""

from __future__ import annotations

import atexit
import os
import sys

__all__ = ["activate", "active", "ENV_VARS"]

#: The variables ``commpress run`` passes on to the processes its script starts.
ENV_VARS: tuple[str, ...] = ("COMMPRESS_PATCH", "COMMPRESS_STATS")

_state = {"active": False, "stats_registered": False}


def active() -> bool:
    """Whether the start-up hook patched this process."""
    return _state["active"]


def activate() -> None:
    """Patch this process from the environment (idempotent); never raises."""
    if _state["active"]:
        return
    from .errors import CommpressError
    from .patch import patch

    try:
        patch()
    except CommpressError as exc:
        print(f"commpress start-up hook: not patching this process: {exc}", file=sys.stderr)
        return
    _state["active"] = True
    if os.environ.get("COMMPRESS_STATS", "").strip().lower() in ("1", "true", "yes", "on"):
        register_stats_at_exit()


def register_stats_at_exit() -> None:
    """Print this process's stats table when it ends (see the module docstring)."""
    if _state["stats_registered"]:
        return
    _state["stats_registered"] = True
    atexit.register(_print_if_used)
    import multiprocessing.util as mp_util

    # A forked child inherits neither atexit's registrations' run nor the parent's
    # finalizers; register a finalizer in every child right after the fork.
    mp_util.register_after_fork(_print_if_used, _arm_child)


def _arm_child(_: object) -> None:
    import multiprocessing.util as mp_util

    mp_util.Finalize(None, _print_if_used, exitpriority=-100)


def _print_if_used() -> None:
    from .stats_report import print_stats

    print_stats(only_if_used=True)
