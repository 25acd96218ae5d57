"""``commpress run``: run an unmodified script with compressed collectives.

::

    commpress run [--codec SPEC] [--min-bytes N] [--stats] script.py [args...]
    commpress run --codec auto train.py        # recommended: auto picks per call
    commpress run [...] -m package.module [args...]
    torchrun --nproc-per-node 2 -m commpress run --codec int8 train.py --lr 0.1
    torchrun --nproc-per-node 2 --no-python commpress run --codec int8 train.py

Like ``python -m coverage run``: the script runs in this process, as
``__main__``, with ``sys.argv`` set to ``[script, *args]`` and its directory
first on ``sys.path``, under `commpress.patch`. Everything after the script
path belongs to the script (``--lr`` and even ``--codec`` pass through).
Options not given on the command line come from the ``COMMPRESS_*``
environment variables (`commpress.policy.Policy.from_env`).

The script's ``sys.exit`` status propagates unchanged. An exception the
script does not handle is reported as the interpreter would (its traceback,
from the script's frame down, through ``sys.excepthook``; exit status 1),
also when it is a `CommpressError` such as ``CodecMismatchError``.
``--stats`` prints the statistics table when the script ends, however it
ends, and warns when the process made collective calls but compressed none
of them, saying why (e.g. every tensor under ``min_bytes``).

Processes the script starts itself are patched too: ``mp.spawn`` and
``multiprocessing`` children, Lightning's re-launch of the script for the
other ranks, any ``subprocess`` running Python. ``commpress run`` exports
``COMMPRESS_PATCH=1`` and its options as ``COMMPRESS_*`` variables (and
``COMMPRESS_STATS=1`` with ``--stats``) for the script's run; the start-up
hook installed with the package (``_commpress_startup``) patches every Python
process that inherits them as soon as it imports torch. With ``--stats`` each
such process prints its own table at exit (if it made any collective call).
The variables are restored when the script ends.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import types
from typing import Any

from .errors import ConfigError
from .stats_report import print_stats

__all__ = ["add_parser", "run"]

DESCRIPTION = "Run a Python script with every torch.distributed collective compressed."


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``run`` subcommand on ``subparsers`` (from ``add_subparsers()``)."""
    p = subparsers.add_parser(
        "run",
        help="run a script with torch.distributed collectives compressed",
        description=DESCRIPTION,
        epilog="Options not given fall back to COMMPRESS_* environment variables.",
    )
    p.add_argument(
        "--codec",
        metavar="SPEC",
        help="codec spec: auto (recommended: plain or a codec per call, chosen by a "
        "model calibrated on this link), or a fixed one, e.g. int8, fp8, int8+zstd:level=3",
    )
    p.add_argument(
        "--min-bytes",
        type=int,
        metavar="N",
        help="tensors smaller than N bytes pass uncompressed",
    )
    p.add_argument("--stats", action="store_true", help="print the statistics table at exit")
    p.add_argument(
        "-m",
        dest="module",
        action="store_true",
        help="run a module (like python -m) instead of a script path",
    )
    p.add_argument("target", metavar="script.py", help="the script (or module with -m)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``args.target`` under `commpress.patch`.

    Returns:
        0 when the script returns normally, 1 when it raised (after reporting it), 2 for
        a bad option or a missing script. The script's ``SystemExit`` propagates.
    """
    from .patch import patch

    policy_kwargs: dict[str, Any] = {}
    if args.min_bytes is not None:
        if args.min_bytes < 0:
            return _usage_error(f"--min-bytes must be >= 0, got {args.min_bytes}")
        policy_kwargs["min_bytes"] = args.min_bytes
    if not args.module and not os.path.isfile(args.target):
        return _usage_error(f"can't open file {args.target!r}: no such file")
    try:
        patched = patch(codec=args.codec, **policy_kwargs)
    except ConfigError as exc:
        return _usage_error(str(exc))

    saved_argv, saved_path = sys.argv[:], sys.path[:]
    saved_env = {k: os.environ.get(k) for k in _child_env(args, patched.policy)}
    os.environ.update(_child_env(args, patched.policy))
    if args.stats:
        from .startup import register_stats_at_exit

        register_stats_at_exit()  # children forked from this process print their tables
    sys.argv = [args.target, *args.args]
    try:
        with patched:
            if args.module:
                runpy.run_module(args.target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(args.target)))
                runpy.run_path(args.target, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - reported exactly as Python would
        # Report the script's exception the way the interpreter does for an unhandled
        # one (its sys.excepthook, exit status 1), starting at the script's own frame:
        # the command line would otherwise turn a CommpressError into a one-line message.
        tb = _script_traceback(exc.__traceback__)
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if args.stats:
            print_stats(policy=patched.policy, parent=True)
    return 0


def _child_env(args: argparse.Namespace, policy: Any) -> dict[str, str]:
    """The variables that make the start-up hook patch the script's own child processes."""
    env = {"COMMPRESS_PATCH": "1", "COMMPRESS_CODEC": str(policy.codec)}
    if args.min_bytes is not None:
        env["COMMPRESS_MIN_BYTES"] = str(args.min_bytes)
    if args.stats:
        env["COMMPRESS_STATS"] = "1"
    return env


def _script_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in (__name__, "runpy"):
        tb = tb.tb_next
    return tb


def _usage_error(message: str) -> int:
    print(f"commpress run: error: {message}", file=sys.stderr)
    return 2
