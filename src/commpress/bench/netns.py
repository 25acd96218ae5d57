"""H emulated hosts on one machine: a network namespace per host, shaped full-duplex links.

`Cluster` builds, as root with iproute2, ``H + 1`` network namespaces of its
own (names ``cpmh<pid>h<i>`` and ``cpmh<pid>sw``)::

     host 0 ns               switch ns                host 1 ns
    +-----------+  veth   +-------------+   veth   +-----------+
    | lo        |=========| h0 -- br -- h1|=========| lo        |
    | cpnic     |  tbf    |   tbf   tbf   |   tbf   | cpnic     |
    | 198.18.0.1|  each   +-------------+   each   | 198.18.0.2|
    +-----------+  way                     way     +-----------+

- each host has its loopback and one NIC ``cpnic`` with ``198.18.0.(i+1)/24``
  (198.18.0.0/15 is reserved for benchmarking, RFC 2544) and no other
  route: the namespaces can reach each other and nothing else;
- the switch is a bridge in its own namespace, without any address;
- every link is shaped *per direction* with ``tc tbf`` (host -> switch on
  ``cpnic``, switch -> host on ``h<i>``), so each host has a full-duplex
  NIC of RATE: a two-host all-reduce sees RATE each way, as between two
  machines, not the shared medium of `commpress.bench.netem`'s loopback;
- the veth MTU is 65000 so that TCP/IP/Ethernet headers are about 0.1% of
  the bytes on the link (at 1500 they would be 4.5%); no delay is added:
  the latency is the veth's (tens of microseconds) plus the tbf queue
  (at most 100 ms, `netem.tbf_args`);
- ranks of one host talk over that host's own addresses, which the kernel
  routes through the namespace's loopback at memory speed.

Teardown: `Cluster.close` (also on exceptions, SIGTERM/SIGINT through the
context manager, and at interpreter exit) kills the processes left in its
namespaces and deletes them, which deletes the veths and qdiscs with them.
Namespaces of this module whose creating process is dead are swept at start.
Without root, Linux or iproute2, `available` says why and callers skip.

The job driver on top of it (torchrun in every host, byte counts, the
all-reduce measurement) is `commpress.bench.multihost`.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .netem import format_rate, parse_rate, tbf_args

__all__ = ["available", "Cluster", "host_addr", "torchrun_path", "NIC", "SUBNET", "RDZV_PORT"]

#: The NIC name inside every host namespace.
NIC = "cpnic"
#: The emulated hosts' subnet (inside 198.18.0.0/15, reserved for benchmarking).
SUBNET = "198.18.0.0/24"
MTU = 65000
RDZV_PORT = 29400
_PREFIX = "cpmh"
_NAME_RE = re.compile(rf"^{_PREFIX}(\d+)(?:h\d+|sw)$")


def host_addr(i: int) -> str:
    """Host ``i``'s address: ``198.18.0.(i+1)``."""
    if not 0 <= i < 250:
        raise ValueError(f"host index {i} out of range; expected 0 <= i < 250")
    return f"198.18.0.{i + 1}"


def _run(cmd: Sequence[str], timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def _check(cmd: Sequence[str]) -> None:
    proc = _run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(
            f"multihost: {' '.join(cmd)} failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()}"
        )


@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """Whether hosts can be emulated here: ``(True, "")`` or ``(False, one-line reason)``.

    Checks Linux, root, ``ip``/``tc``/``torchrun`` on PATH, then creates and deletes
    one throw-away namespace. Cached for the process.
    """
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root (CAP_SYS_ADMIN)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return False, f"{', '.join(missing)} not found on PATH (install iproute2)"
    if torchrun_path() is None:
        return False, "torchrun not found next to this Python or on PATH"
    name = f"{_PREFIX}{os.getpid()}sw"
    try:
        proc = _run(["ip", "netns", "add", name])
        if proc.returncode != 0:
            return False, f"'ip netns add' failed: {(proc.stderr or proc.stdout).strip()}"
        _run(["ip", "netns", "del", name])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"'ip netns' could not run: {exc}"
    return True, ""


def torchrun_path() -> str | None:
    """torchrun next to this Python, else on PATH, else None."""
    here = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return here if os.path.exists(here) else shutil.which("torchrun")


def _sweep_stale() -> None:
    """Delete namespaces of this module whose creating process no longer exists."""
    proc = _run(["ip", "netns", "list"])
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # its creator is alive (maybe another run): not ours to delete
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_ns_pids(name)
        _run(["ip", "netns", "del", name])


def _kill_ns_pids(ns: str) -> None:
    proc = _run(["ip", "netns", "pids", ns])
    for pid in proc.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class Cluster:
    """``hosts`` emulated hosts joined by a switch, links shaped to ``rate`` each way.

    Args:
        hosts: number of host namespaces (1 .. 250).
        rate: per-direction rate of every host's link (`netem.parse_rate`: ``"1gbit"``,
            ``"100mbit"``; ``"none"`` leaves the links unshaped, veth speed).

    Use as a context manager; `close` is idempotent and also runs at exit.
    """

    def __init__(self, hosts: int, rate: str | int | None = "1gbit") -> None:
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= 250:
            raise ValueError(f"hosts={hosts!r}; expected an int in 1 .. 250")
        self.hosts = hosts
        self.bits = (
            rate if isinstance(rate, int) and not isinstance(rate, bool) else parse_rate(rate)
        )
        tag = f"{_PREFIX}{os.getpid()}"
        self.names = [f"{tag}h{i}" for i in range(hosts)]
        self.switch = f"{tag}sw"
        self._made: list[str] = []
        self._saved_handlers: dict[int, Any] = {}

    @property
    def rate(self) -> str:
        return format_rate(self.bits)

    def ns(self, i: int) -> str:
        """The namespace name of host ``i``."""
        return self.names[i]

    def exec_prefix(self, i: int) -> list[str]:
        """``ip netns exec <host i>``: prefix a command line to run it on host ``i``."""
        return ["ip", "netns", "exec", self.names[i]]

    def start(self) -> Cluster:
        """Create namespaces, links, addresses and qdiscs; on any failure, undo all."""
        ok, why = available()
        if not ok:
            raise RuntimeError(f"cannot emulate hosts: {why}")
        _sweep_stale()
        atexit.register(self.close)
        try:
            for name in [self.switch, *self.names]:
                _check(["ip", "netns", "add", name])
                self._made.append(name)
            sw = ["ip", "-n", self.switch]
            _check([*sw, "link", "add", "br0", "type", "bridge"])
            _check([*sw, "link", "set", "lo", "up"])
            for i, host in enumerate(self.names):
                port = f"h{i}"
                _check(
                    ["ip", "link", "add", "name", NIC, "netns", host, "mtu", str(MTU),
                     "type", "veth", "peer", "name", port, "netns", self.switch,
                     "mtu", str(MTU)]
                )  # fmt: skip
                _check([*sw, "link", "set", port, "master", "br0", "up"])
                h = ["ip", "-n", host]
                _check([*h, "link", "set", "lo", "up"])
                _check([*h, "addr", "add", f"{host_addr(i)}/24", "dev", NIC])
                _check([*h, "link", "set", NIC, "up"])
                if self.bits is not None:
                    qdisc = ["qdisc", "add", "dev"]
                    _check(["tc", "-n", host, *qdisc, NIC, "root", "tbf", *tbf_args(self.bits)])
                    _check(
                        ["tc", "-n", self.switch, *qdisc, port, "root", "tbf", *tbf_args(self.bits)]
                    )
            _check([*sw, "link", "set", "br0", "up"])
            self._check_isolated()
        except BaseException:
            self.close()
            raise
        return self

    def _check_isolated(self) -> None:
        """Every host namespace has exactly lo and cpnic, and only the subnet's route."""
        for host in self.names:
            links = _run(["ip", "-n", host, "-o", "link", "show"]).stdout
            names = sorted(re.findall(r"^\d+: ([^:@]+)", links, re.M))
            routes = _run(["ip", "-n", host, "-4", "route", "show"]).stdout.strip().splitlines()
            if names != sorted(["lo", NIC]) or len(routes) != 1 or SUBNET not in routes[0]:
                raise RuntimeError(
                    f"multihost: namespace {host} is not isolated as expected (links {names}, "
                    f"routes {routes}); expected only lo and {NIC} with the route {SUBNET}"
                )

    def counters(self, i: int) -> dict[str, int]:
        """Bytes and packets that left (``out_*``) and entered (``in_*``) host ``i``.

        Read on the switch side of the host's link, after the host's shaping.
        """
        base = f"/sys/class/net/h{i}/statistics"
        script = f"cat {base}/rx_bytes {base}/tx_bytes {base}/rx_packets {base}/tx_packets"
        out = _run(["ip", "netns", "exec", self.switch, "sh", "-c", script]).stdout.split()
        rx_b, tx_b, rx_p, tx_p = (int(v) for v in out)
        return {"out_bytes": rx_b, "in_bytes": tx_b, "out_packets": rx_p, "in_packets": tx_p}

    def close(self) -> None:
        """Kill what still runs in the namespaces and delete them (veths and qdiscs go too)."""
        made, self._made = self._made, []
        for name in reversed(made):
            _kill_ns_pids(name)
        for name in reversed(made):
            _run(["ip", "netns", "del", name])
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass

    def __enter__(self) -> Cluster:
        def stop(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self._saved_handlers[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: rely on atexit and the sweep
            self._saved_handlers.clear()
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            for sig, handler in self._saved_handlers.items():
                signal.signal(sig, handler)
            self._saved_handlers.clear()
