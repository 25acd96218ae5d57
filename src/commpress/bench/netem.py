"""Emulate a slow link on one machine: local gloo ranks in a private network namespace.

Benchmarks on one machine talk over loopback at memory speed, where
compression can only lose. To see what it buys on a real link, the ranks run
inside a *private* network namespace (``unshare -n``) whose ``lo`` is brought
up and shaped with a token-bucket filter::

    tc qdisc add dev lo root tbf rate RATE burst BURST latency 100ms

Nothing outside the namespace is touched: the namespace has only its own
``lo`` (checked before shaping), it disappears with its last process, and
gloo is pinned to it (``GLOO_SOCKET_IFNAME=lo``, ``MASTER_ADDR=127.0.0.1``).
Needs Linux, root (``CAP_SYS_ADMIN``), ``unshare`` (util-linux) and ``ip`` and
``tc`` (iproute2); `link_available` says whether that is the case and why not.

What the emulated link is
-------------------------
Every byte any rank sends leaves through the one shaped ``lo``, so RATE is
the *aggregate* of all ranks' traffic in both directions -- a shared medium,
not one full-duplex link per rank. A 2-rank send/recv reaches RATE; a 2-rank
all-reduce, where both ranks send at once, gets RATE/2 per rank, i.e. it takes
about twice as long as on two hosts joined by a full-duplex link of RATE.
Time *ratios* between codecs are unaffected, since every codec's traffic is
shaped alike.

Measured (``python benchmarks/bench_collectives.py --link-check``, 64 MiB
float32, 2 gloo ranks, torch 2.13 CPU, 2 cores): at ``1gbit`` a send/recv
runs at 124.4 MB/s (99.5% of 125 MB/s) and an all-reduce takes 1075 ms
(62.4 MB/s of payload per rank, 124.8 MB/s across the loopback); at
``10gbit`` a send/recv runs at 1257 MB/s.

Burst: ``max(512 KiB, 4 ms of traffic at RATE)``. It must hold a few
maximum-size loopback packets (64 KiB; a smaller bucket drops them and TCP
stalls) and, at high rates, what flows in a few timer ticks -- a fixed 512 KiB
would cap 10gbit at well under its rate. The queue holds 100 ms of traffic.

Three ways in
-------------
- ``python -m commpress.bench.netem --rate 1gbit -- MODULE [ARGS...]``, run as
  root, re-executes itself under ``unshare -n``, shapes ``lo`` and runs
  ``MODULE`` as ``__main__`` in that process (``--exec`` runs a command
  line instead). The target starts its own ranks (`commpress.testing.DistPool`,
  ``torch.multiprocessing``); they inherit the namespace.
- `wrap_command` turns a command line into one that runs under a shaped link.
- `run_function` calls ``"package.module:function"`` with JSON keyword
  arguments under a shaped link and returns its JSON result.

Example::

    from commpress.bench import netem

    ok, why = netem.link_available()
    if ok:
        rows = netem.run_function("1gbit", "mypkg.bench:measure", {"iters": 5})
    else:
        print(f"no link emulation: {why}")
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = [
    "parse_rate",
    "format_rate",
    "tbf_args",
    "link_available",
    "wrap_command",
    "run_function",
    "HOW_TO_SKIP",
    "main",
]

#: What a caller should tell its user when `link_available` says no.
HOW_TO_SKIP = "run without --link (unshaped loopback), or as root on Linux with unshare and tc"

LATENCY_MS = 100
_MIN_BURST = 512 * 1024
_BURST_SECONDS = 0.004
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")
_MIN_RATE = 10**3
_MAX_RATE = 10**12


def parse_rate(text: str | None) -> int | None:
    """Parse a link rate into bits per second; None for no shaping.

    Accepts tc's bit units, SI (``1000``): ``"100mbit"``, ``"1gbit"``,
    ``"2.5gbit"``, ``"10gbit"``, ``"800kbit"``; ``"none"``, ``""`` and None mean
    unshaped. Case does not matter.

    Raises:
        ValueError: anything else, including ``"1gbps"`` (tc reads ``bps`` as
            *bytes* per second, which is rarely what is meant) and rates outside
            1 kbit .. 1 tbit.

    Example::

        >>> parse_rate("1gbit"), parse_rate("100mbit"), parse_rate("none")
        (1000000000, 100000000, None)
    """
    if text is None:
        return None
    low = str(text).strip().lower()
    if low in ("", "none", "off"):
        return None
    m = _RATE_RE.match(low)
    if not m or m.group(2) not in _UNITS:
        hint = ""
        if m and m.group(2).endswith("bps"):
            hint = " ('bps' is bytes per second to tc; write bits, e.g. 8gbit for 1 GB/s)"
        raise ValueError(
            f"link rate {text!r} is not understood{hint}; expected a number and one of "
            f"{', '.join(_UNITS)} (e.g. 100mbit, 1gbit, 10gbit) or 'none'"
        )
    bits = float(m.group(1)) * _UNITS[m.group(2)]
    if not _MIN_RATE <= bits <= _MAX_RATE:
        raise ValueError(f"link rate {text!r} is out of range; expected 1kbit .. 1tbit")
    return int(round(bits))


def format_rate(bits_per_s: int | None) -> str:
    """The shortest exact label: ``1000000000 -> "1gbit"``; None -> ``"none"``."""
    if bits_per_s is None:
        return "none"
    for unit, scale in sorted(_UNITS.items(), key=lambda kv: -kv[1]):
        if bits_per_s % scale == 0:
            return f"{bits_per_s // scale}{unit}"
    return f"{bits_per_s}bit"  # unreachable: every int is a whole number of bits


def tbf_args(bits_per_s: int) -> list[str]:
    """The ``tc qdisc ... tbf`` parameters used for a rate (see the module docstring)."""
    burst = max(_MIN_BURST, math.ceil(bits_per_s / 8 * _BURST_SECONDS))
    return ["rate", f"{bits_per_s}bit", "burst", str(burst), "latency", f"{LATENCY_MS}ms"]


@functools.lru_cache(maxsize=1)
def link_available() -> tuple[bool, str]:
    """Whether a shaped link can be emulated here: ``(True, "")`` or ``(False, why)``.

    Checks the platform, root, the ``unshare``/``ip``/``tc`` tools, and then
    tries the real thing once: a throw-away namespace with a shaped ``lo``.
    The answer is cached for the process.
    """
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "creating a network namespace needs root (CAP_SYS_ADMIN)"
    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    if missing:
        return False, f"{', '.join(missing)} not found on PATH (util-linux, iproute2)"
    script = f"ip link set lo up && tc qdisc add dev lo root tbf {' '.join(tbf_args(10**9))}"
    try:
        proc = subprocess.run(
            ["unshare", "-n", "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"'unshare -n' could not run: {exc}"
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        last = err[-1] if err else f"exit code {proc.returncode}"
        return False, f"cannot create a shaped network namespace: {last}"
    return True, ""


def wrap_command(cmd: Sequence[str], rate: str | int | None) -> list[str]:
    """A command line that runs ``cmd`` under an emulated link of ``rate``.

    ``rate`` is a string for `parse_rate` or bits per second; with None/"none"
    ``cmd`` comes back unchanged (unshaped, in the current namespace). Call
    `link_available` first: the wrapped command fails where it says no.
    """
    bits = _bits(rate)
    if bits is None:
        return list(cmd)
    return _inside_prefix(bits) + ["--exec", "--", *cmd]


def run_function(
    rate: str | int | None,
    target: str,
    kwargs: dict[str, Any] | None = None,
    *,
    pythonpath: Sequence[str] = (),
    timeout: float | None = None,
) -> Any:
    """Call ``target(**kwargs)`` in a fresh Python process under a link of ``rate``.

    Args:
        rate: see `wrap_command`; None/"none" runs the process unshaped.
        target: ``"package.module:function"``; the function takes JSON-able keyword
            arguments and returns a JSON-able value (rows, typically).
        kwargs: its keyword arguments.
        pythonpath: directories to put in front of ``sys.path`` in the process (e.g.
            ``benchmarks/``, which is not a package).
        timeout: seconds before the process is killed.

    Returns:
        The function's return value, through JSON.

    Raises:
        RuntimeError: the link cannot be emulated (the message says why), or the
            process failed (the message ends with its output).
    """
    bits = _bits(rate)
    if bits is not None:
        ok, why = link_available()
        if not ok:
            raise RuntimeError(f"cannot emulate a {format_rate(bits)} link: {why}; {HOW_TO_SKIP}")
    with tempfile.TemporaryDirectory(prefix="commpress-netem-") as tmp:
        result = os.path.join(tmp, "result.json")
        head = _inside_prefix(bits) if bits is not None else [*_SELF, "--rate", "none"]
        cmd = [*head, "--call", target, "--kwargs", json.dumps(kwargs or {}), "--result", result]
        for path in pythonpath:
            cmd += ["--path", os.path.abspath(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(result):
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(
                f"{target} under link {format_rate(bits)} failed "
                f"(exit code {proc.returncode}):\n{tail}"
            )
        with open(result) as f:
            return json.load(f)


_SELF = [sys.executable, "-m", "commpress.bench.netem"]


def _bits(rate: str | int | None) -> int | None:
    return rate if isinstance(rate, int) and not isinstance(rate, bool) else parse_rate(rate)


def _inside_prefix(bits: int) -> list[str]:
    return ["unshare", "-n", "--", *_SELF, "--inside", "--rate", format_rate(bits)]


# ------------------------------------------------------------ in the namespace


def _shape_loopback(bits: int | None) -> None:
    """Bring ``lo`` up and shape it -- only in a namespace that was just created.

    A fresh namespace has exactly one interface, ``lo``, and it is down. Anything
    else means we are not where ``unshare -n`` put us, and nothing is touched.
    """
    names = sorted(name for _, name in socket.if_nameindex())
    link = subprocess.run(["ip", "-o", "link", "show", "dev", "lo"], capture_output=True, text=True)
    flags = re.search(r"<([^>]*)>", link.stdout)
    if names != ["lo"] or flags is None or "UP" in flags.group(1).split(","):
        raise SystemExit(
            f"commpress.bench.netem: refusing to shape loopback: this network namespace has "
            f"interfaces {names} ({link.stdout.strip() or 'lo not found'}); expected only a "
            "'lo' that is down, as in a namespace fresh from 'unshare -n'"
        )
    subprocess.run(["ip", "link", "set", "dev", "lo", "up"], check=True)
    if bits is not None:
        cmd = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", *tbf_args(bits)]
        subprocess.run(cmd, check=True)
    # Gloo would otherwise pick an interface from the host name, which has no address here.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"


def _call(target: str, kwargs_json: str, result: str, paths: list[str]) -> None:
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise SystemExit(f"--call expects 'package.module:function', got {target!r}")
    sys.path[:0] = paths
    import importlib

    func = getattr(importlib.import_module(module_name), func_name)
    value = func(**json.loads(kwargs_json))
    with open(result, "w") as f:
        json.dump(value, f)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m commpress.bench.netem --rate RATE [--exec] -- TARGET...`` (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m commpress.bench.netem",
        description="Run a Python module (or, with --exec, a command) with local ranks "
        "talking over a shaped loopback in a private network namespace.",
    )
    parser.add_argument("--rate", default="1gbit", help="e.g. 100mbit, 1gbit, 10gbit, none")
    parser.add_argument("--exec", action="store_true", help="TARGET is a command line to exec")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--call", metavar="MODULE:FUNC", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--path", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("target", nargs=argparse.REMAINDER, help="MODULE [ARGS...] after --")
    args = parser.parse_args(argv)
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    try:
        bits = parse_rate(args.rate)
    except ValueError as exc:
        parser.error(str(exc))
    if not target and not args.call:
        parser.error("nothing to run: give -- MODULE [ARGS...]")

    if args.inside:  # we are what `unshare -n` started
        _shape_loopback(bits)
    elif bits is not None:
        ok, why = link_available()
        if not ok:
            print(
                f"commpress.bench.netem: cannot emulate a {args.rate} link: {why}; {HOW_TO_SKIP}",
                file=sys.stderr,
            )
            return 3
        rest = list(argv) if argv is not None else sys.argv[1:]
        return subprocess.run([*_inside_prefix(bits), *rest]).returncode

    if args.call:
        _call(args.call, args.kwargs, args.result, args.path)
        return 0
    if args.exec:
        os.execvp(target[0], target)
    sys.argv = list(target)
    runpy.run_module(target[0], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
