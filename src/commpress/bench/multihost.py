"""Run real torchrun jobs across ``H`` emulated hosts, and measure what crosses their links.

The hosts are `commpress.bench.netns.Cluster`: a network namespace per host,
joined by a bridge over links shaped per direction (see that module).

`launch` runs ``torchrun --nnodes H --nproc-per-node L`` in every host
namespace: c10d rendezvous on host 0's address (host 0 hosts the store),
``--local-addr`` the host's address, ``GLOO_SOCKET_IFNAME=cpnic``.
`run_function` calls ``"package.module:function"`` on every rank of such a
job and returns the ranks' JSON results; `run_functions` calls several in one
job (one start-up for all).

Counting bytes: ``COMMPRESS_MH_NIC`` tells a rank the name of its host's NIC;
`nic_bytes` reads its kernel counters (``/sys/class/net/cpnic/statistics``,
which ``ip netns exec`` mounts for the namespace). Bytes there are Ethernet
frames: payload plus about 0.1% headers at this MTU, the TCP ACKs of the
other direction, and whatever else crosses (rendezvous store, descriptors).
Subtract a baseline interval measured the same way (see
``benchmarks/bench_multihost.py``).

Example (root)::

    from commpress.bench import multihost
    ok, why = multihost.available()
    if ok:
        results = multihost.run_function(2, 2, "mypkg.bench:measure", {"mib": 64}, rate="1gbit")
    else:
        print(f"no multi-host emulation: {why}")
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from .netem import format_rate
from .netns import NIC, RDZV_PORT, SUBNET, Cluster, available, host_addr, torchrun_path

# The host emulation's names are re-exported: callers need only this module.
__all__ = [
    "available",
    "Cluster",
    "launch",
    "run_function",
    "run_functions",
    "nic_bytes",
    "measure_all_reduce",
    "expected_cross_bytes",
    "CONFIGS",
    "auto_choice",
    "host_addr",
    "NIC",
    "SUBNET",
    "main",
]


def launch(
    cluster: Cluster,
    local: int,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    run_id: str = "commpress-mh",
) -> list[subprocess.CompletedProcess]:
    """Run ``torchrun --nnodes H --nproc-per-node local ARGS`` on every host of ``cluster``.

    ``args`` is what follows torchrun's own options (``-m module ...`` or ``script.py ...``).
    Returns one completed process per host (stdout/stderr captured).

    Raises:
        RuntimeError: a host's torchrun failed or ran past ``timeout`` seconds (all are
            killed); the message ends with the failing host's output.
    """
    torchrun = torchrun_path()
    if torchrun is None:
        raise RuntimeError("torchrun not found")
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LOCAL_", "GROUP_", "ROLE_", "TORCHELASTIC", "MASTER_"))
        and k not in ("RANK", "WORLD_SIZE")
    }
    base_env.update(
        {
            "GLOO_SOCKET_IFNAME": NIC,
            "COMMPRESS_MH_NIC": NIC,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
    )
    procs = []
    with tempfile.TemporaryDirectory(prefix="commpress-mh-") as tmp:
        logs = []
        for i in range(cluster.hosts):
            cmd = [
                *cluster.exec_prefix(i),
                torchrun,
                "--nnodes",
                str(cluster.hosts),
                "--nproc-per-node",
                str(local),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"{host_addr(0)}:{RDZV_PORT}",
                "--rdzv-id",
                run_id,
                "--rdzv-conf",
                f"is_host={1 if i == 0 else 0},join_timeout=60",
                "--local-addr",
                host_addr(i),
                "--max-restarts",
                "0",
                *args,
            ]
            log = open(os.path.join(tmp, f"host{i}.log"), "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=base_env, start_new_session=True
                )
            )
        deadline = time.monotonic() + timeout
        codes: list[int | None] = [None] * len(procs)
        try:
            while any(c is None for c in codes):
                for i, p in enumerate(procs):
                    if codes[i] is None:
                        codes[i] = p.poll()
                if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()
                codes[i] = p.returncode
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    results = [
        subprocess.CompletedProcess(p.args, code if code is not None else -9, out, "")
        for p, code, out in zip(procs, codes, outputs, strict=True)
    ]
    bad = [i for i, r in enumerate(results) if r.returncode != 0]
    if bad:
        i = bad[0]
        late = " (ran past the timeout)" if time.monotonic() > deadline else ""
        raise RuntimeError(
            f"torchrun on emulated host {i} exited with {results[i].returncode}{late}; "
            f"hosts failing: {bad}. Output of host {i}:\n{results[i].stdout[-4000:]}"
        )
    return results


def run_function(
    hosts: int,
    local: int,
    target: str,
    kwargs: dict[str, Any] | None = None,
    *,
    rate: str | int | None = "1gbit",
    timeout: float = 300,
    pythonpath: Sequence[str] = (),
) -> dict[str, Any]:
    """Call ``target(**kwargs)`` on every rank of an ``hosts x local`` job over emulated hosts.

    The function runs after ``init_process_group("gloo")`` (torchrun's environment);
    it returns a JSON-able value.

    Returns:
        ``{"ranks": [each rank's value, by global rank], "links": [per host: bytes and
        packets out of / into it over the whole job], "rate": label}``.
    """
    out = run_functions(
        hosts, local, {"call": (target, kwargs)}, rate=rate, timeout=timeout,
        pythonpath=pythonpath,
    )  # fmt: skip
    return {**out, "ranks": out["ranks"]["call"]}


def run_functions(
    hosts: int,
    local: int,
    calls: dict[str, tuple[str, dict[str, Any] | None]],
    *,
    rate: str | int | None = "1gbit",
    timeout: float = 300,
    pythonpath: Sequence[str] = (),
) -> dict[str, Any]:
    """`run_function` for several functions in one job: one cluster and one torchrun
    start-up (seconds per rank) for all of them.

    ``calls`` maps a name to ``(target, kwargs)``; every rank calls them in that order,
    with a barrier before each. A function that raises ends its rank, and so the job,
    as in `run_function`: the others' results are lost with it.

    Returns:
        ``{"ranks": {name: [each rank's value, by global rank]}, "links": ..., "rate": ...}``.
    """
    spec = {name: [target, kwargs or {}] for name, (target, kwargs) in calls.items()}
    with Cluster(hosts, rate) as cluster, tempfile.TemporaryDirectory(prefix="cpmh-") as tmp:
        os.chmod(tmp, 0o755)
        path = os.pathsep.join(
            [*(os.path.abspath(p) for p in pythonpath), os.environ.get("PYTHONPATH", "")]
        ).strip(os.pathsep)
        env = {"PYTHONPATH": path} if path else {}
        launch(
            cluster,
            local,
            ["-m", "commpress.bench.multihost", "--rank-call", "commpress.bench.multihost:_each",
             "--kwargs", json.dumps({"calls": spec}), "--result-dir", tmp],
            env=env,
            timeout=timeout,
        )  # fmt: skip
        links = [cluster.counters(i) for i in range(hosts)]
        ranks: dict[str, list[Any]] = {name: [] for name in spec}
        for r in range(hosts * local):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                for name, value in json.load(f).items():
                    ranks[name].append(value)
    return {"ranks": ranks, "links": links, "rate": format_rate(cluster.bits)}


def _each(calls: dict[str, list[Any]]) -> dict[str, Any]:
    """One rank's side of `run_functions`: each ``[target, kwargs]`` in turn."""
    import torch.distributed as dist

    out: dict[str, Any] = {}
    for name, (target, kwargs) in calls.items():
        dist.barrier()
        out[name] = _resolve(target)(**kwargs)
    return out


def nic_bytes() -> dict[str, int]:
    """This rank's host NIC counters (``tx_bytes``, ``rx_bytes``, ``tx_packets``, ``rx_packets``).

    Only inside a `Cluster` host (``COMMPRESS_MH_NIC`` set by `launch`).
    """
    nic = os.environ.get("COMMPRESS_MH_NIC")
    if not nic:
        raise RuntimeError("nic_bytes: not on an emulated host (COMMPRESS_MH_NIC is unset)")
    out = {}
    for name in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"):
        with open(f"/sys/class/net/{nic}/statistics/{name}") as f:
            out[name] = int(f.read())
    return out


def counted(timed: Callable[[], list[float]]) -> tuple[list[float], dict[str, float]]:
    """Run ``timed`` (every rank at once: it times its calls and returns their seconds,
    e.g. `collectives.timed_calls`) and count what it put on this rank's host NIC.

    The counters (`nic_bytes`) are read around one barrier alone and around ``timed``;
    per call is ``(its interval - (calls + 1) x the barrier's interval) / calls``, so
    the barriers before each timed call are not counted (run the warm-up call before).

    Returns:
        ``(the seconds ``timed`` returned, {counter name: per call})``.
    """
    import torch.distributed as dist

    dist.barrier()
    c0 = nic_bytes()
    dist.barrier()
    c1 = nic_bytes()
    times = timed()
    dist.barrier()
    c2 = nic_bytes()
    n = len(times)
    per_call = {k: ((c2[k] - c1[k]) - (n + 1) * (c1[k] - c0[k])) / n for k in c0}
    return times, per_call


#: Benchmark configurations of `measure_all_reduce`: name -> (codec, algorithm, tensor
#: dtype, ``Engine.chunk_bytes`` or None for the default engine). ``plain-*`` are plain
#: ``torch.distributed`` on a tensor already in that dtype. ``*-whole`` hand the whole
#: tensor to the algorithm in one call (``Engine(chunk_bytes=0)``): hierarchical then
#: pipelines its three steps itself (`algorithms.hierarchical.PIPELINE_BYTES`).
#: ``auto`` is ``codec="auto"``: its first (warm-up) call calibrates the group, levels
#: included, and the row names what it chose.
CONFIGS: dict[str, tuple[str | None, str | None, str, int | None]] = {
    "plain-fp32": (None, None, "float32", None),
    "plain-bf16": (None, None, "bfloat16", None),
    "flat-int8": ("int8", "two_phase", "float32", None),
    "flat-int4": ("int4", "two_phase", "float32", None),
    "hier-int8": ("int8", "hierarchical", "float32", None),
    "hier-int4": ("int4", "hierarchical", "float32", None),
    "hier-int8-whole": ("int8", "hierarchical", "float32", 0),
    "hier-int4-whole": ("int4", "hierarchical", "float32", 0),
    "hier-bf16": ("bf16", "hierarchical", "float32", None),
    "auto": ("auto", "auto", "float32", None),
}


def auto_choice(op: str, nbytes: int) -> str:
    """What ``auto`` chose in this process for ``op`` calls of ``nbytes``, with the
    modelled time of plain and of the best flat and hierarchical options (``"int8
    two_phase; modelled plain 812, flat 301, hier 344 ms"``), or ``"-"`` when it
    decided none."""
    from commpress import auto
    from commpress.ops import OPS

    family = OPS[op].family
    for c in auto.decisions():
        if OPS[c.op].family == family and c.bucket == auto.bucket(nbytes):
            won = "plain" if c.codec is None else f"{c.codec} {c.algorithm}"
            best = {}
            for spec, algo, seconds in c.options:
                kind = "plain" if spec == "plain" else "hier" if algo == "hierarchical" else "flat"
                best[kind] = min(best.get(kind, seconds), seconds)
            figures = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in best.items())
            return f"{won}; modelled {figures} ms"
    return "-"


def expected_cross_bytes(
    codec: str, numel: int, hosts: int, local: int, chunk_bytes: int = 4 << 20
) -> tuple[float, float]:
    """Bytes leaving each host per hierarchical all-reduce by the formula, and the ratio used.

    ``2 (H-1)/H * S / ratio`` where ``S`` is the tensor's bytes (float32) and
    ``ratio`` is ``S`` over the packed bytes of the pieces the algorithm really
    sends (wire header and scales included): the call is cut into
    ``chunk_bytes`` pieces by `commpress.distributed`, each into ``L`` shards,
    each shard into ``H`` two-phase pieces.

    Returns:
        ``(bytes per host per call, ratio)``.
    """
    import torch

    from .. import wire
    from ..algorithms.common import chunk_bounds
    from ..registry import get_codec

    c = get_codec(codec)
    per = chunk_bytes // 4 if chunk_bytes else numel
    packed = 0
    for a in range(0, numel, per):
        n = min(per, numel - a)
        shard = -(-n // local)
        for lo, hi in chunk_bounds(shard, hosts):
            packed += wire.packed_nbytes(c.encode(torch.zeros(hi - lo)))
    # One rank's shard pieces cover S/L; the host's L ranks together cover S.
    ratio = numel * 4 / (packed * local)
    return 2 * (hosts - 1) / hosts * numel * 4 / ratio, ratio


def measure_all_reduce(
    mib: float = 64,
    configs: Sequence[str] = tuple(CONFIGS),
    iters: int = 3,
) -> dict[str, Any]:
    """One rank's side of a multi-host all-reduce benchmark (call through `run_function`).

    For each configuration of `CONFIGS`: one warm-up call (it also builds the
    subgroups and connections), then ``iters`` timed calls, each after a barrier.
    The host NIC's counters (`nic_bytes`) are read around the timed calls and
    around one barrier alone; bytes per call are ``(timed interval - (iters + 1) x
    barrier interval) / iters``, so the barriers and the warm-up are not counted.

    Returns:
        ``{"rank", "host", "configs": {name: {"times": [s], "out_bytes", "in_bytes",
        "rel_err", "bytes_wire"}}}``; ``out_bytes``/``in_bytes`` are this rank's host's
        (every rank of a host reads the same NIC).
    """
    import torch
    import torch.distributed as dist

    import commpress
    import commpress.distributed as cdist
    from commpress.engine import Engine, set_engine
    from commpress.policy import Policy, using

    from .collectives import timed_calls

    rank = dist.get_rank()
    numel = int(mib * (1 << 20)) // 4
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    ref = x.clone()
    dist.all_reduce(ref)
    out: dict[str, Any] = {}
    for name in configs:
        codec, algorithm, dtype, chunk_bytes = CONFIGS[name]
        src = x.to(getattr(torch, dtype))
        if chunk_bytes is not None:
            set_engine(Engine(chunk_bytes=chunk_bytes))

        def call(t: torch.Tensor, codec: str | None = codec, algorithm: str | None = algorithm):
            if codec is None:
                dist.all_reduce(t)
            else:
                with using(Policy(algorithm=algorithm)):
                    cdist.all_reduce(t, codec=codec)

        t = src.clone()
        call(t)
        rel_err = ((t.double() - ref.double()).norm() / ref.double().norm()).item()
        commpress.reset_stats()
        times, per_call = counted(lambda src=src: timed_calls(call, src, iters))
        if chunk_bytes is not None:
            set_engine(None)  # a fresh default engine (the replaced one has stopped)
        st = commpress.stats()
        wire_b = st["all_reduce"].bytes_wire / iters if "all_reduce" in st else None
        out[name] = {
            "times": times,
            "out_bytes": per_call["tx_bytes"],
            "in_bytes": per_call["rx_bytes"],
            "out_packets": per_call["tx_packets"],
            "rel_err": rel_err,
            "bytes_wire": wire_b,
            "chose": auto_choice("all_reduce", numel * src.element_size())
            if codec == "auto"
            else "",
        }
    return {"rank": rank, "host": os.environ.get("GROUP_RANK"), "configs": out}


def _resolve(target: str) -> Callable[..., Any]:
    import importlib

    module_name, _, func_name = target.partition(":")
    return getattr(importlib.import_module(module_name), func_name)


def _rank_call(target: str, kwargs_json: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        value = _resolve(target)(**json.loads(kwargs_json))
        with open(os.path.join(result_dir, f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(value, f)
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m commpress.bench.multihost --hosts H --local L [--rate R] -- ARGS``.

    Runs ``torchrun --nnodes H --nproc-per-node L ARGS`` across emulated hosts and
    prints each host's output and link counters.
    """
    parser = argparse.ArgumentParser(
        prog="python -m commpress.bench.multihost",
        description="Run a torchrun job across H emulated hosts (network namespaces, "
        "shaped veth links). Needs root and iproute2.",
    )
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--local", type=int, default=2, help="ranks per host")
    parser.add_argument("--rate", default="1gbit", help="per-direction link rate, or none")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--rank-call", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help="torchrun arguments after --")
    ns = parser.parse_args(argv)
    if ns.rank_call:
        _rank_call(ns.rank_call, ns.kwargs, ns.result_dir)
        return 0
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if not args:
        parser.error("nothing to run: give -- SCRIPT.py [ARGS...] or -- -m MODULE [ARGS...]")
    ok, why = available()
    if not ok:
        print(f"commpress.bench.multihost: cannot emulate hosts: {why}", file=sys.stderr)
        return 3
    with Cluster(ns.hosts, ns.rate) as cluster:
        results = launch(cluster, ns.local, args, timeout=ns.timeout)
        for i, r in enumerate(results):
            print(f"--- host {i} ({host_addr(i)}) ---\n{r.stdout}")
        for i in range(ns.hosts):
            print(f"host {i} link: {cluster.counters(i)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
