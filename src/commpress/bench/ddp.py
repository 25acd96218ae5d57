"""Probe torch's own DDP communication hooks on gloo, each in a process that may die.

torch ships ``fp16_compress_hook``, ``bf16_compress_hook``, ``powerSGD_hook``,
``batched_powerSGD_hook`` and two quantization hooks. On CPU/gloo some of them
refuse, raise, or abort the whole process (DESIGN.md), so each probe runs in a
fresh ``python -m commpress.bench.ddp HOOK`` subprocess that starts its own
gloo ranks, trains a small MLP for a few steps under DDP with the hook, and
prints one JSON line. A probe that dies or raises becomes a row saying
"does not run on gloo" with the error that was observed.

Example::

    from commpress.bench.ddp import probe_torch_hooks
    for row in probe_torch_hooks():
        print(row["hook"], row["status"], row.get("error", ""))
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

__all__ = ["TORCH_HOOKS", "probe_hook", "probe_torch_hooks"]

#: Hook names in ``torch.distributed.algorithms.ddp_comm_hooks``, in report order.
TORCH_HOOKS: tuple[str, ...] = (
    "allreduce_hook",
    "fp16_compress_hook",
    "bf16_compress_hook",
    "powerSGD_hook",
    "batched_powerSGD_hook",
    "quantization_pertensor_hook",
    "quantization_perchannel_hook",
)

_MARK = "COMMPRESS_PROBE_RESULT "


def _hook_and_state(name: str) -> tuple[Any, Any]:
    import torch.distributed.algorithms.ddp_comm_hooks.default_hooks as default
    import torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook as psgd
    import torch.distributed.algorithms.ddp_comm_hooks.quantization_hooks as quant

    if name in ("allreduce_hook", "fp16_compress_hook", "bf16_compress_hook"):
        return getattr(default, name), None
    if name in ("powerSGD_hook", "batched_powerSGD_hook"):
        # start_powerSGD_iter > 1 because DDP rebuilds its buckets after the first step.
        state = psgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2
        )
        return getattr(psgd, name), state
    if name.startswith("quantization_"):
        return getattr(quant, name), None
    raise ValueError(f"unknown torch DDP hook {name!r}; choose from {', '.join(TORCH_HOOKS)}")


def _rank_main(rank: int, world_size: int, port: int, name: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.manual_seed(0)
    # Matrices of several shapes plus vectors, like a transformer block's parameters.
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 768),
        torch.nn.GELU(),
        torch.nn.Linear(768, 256),
        torch.nn.LayerNorm(256),
        torch.nn.Linear(256, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 256),
    )
    ddp = DDP(model)
    hook, state = _hook_and_state(name)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    times = []
    loss = float("nan")
    for _ in range(steps):
        x = torch.randn(32, 256, generator=gen)
        t0 = time.perf_counter()
        out = ddp(x)
        loss_t = (out - x).pow(2).mean()
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        loss = loss_t.item()
    if rank == 0:
        times.sort()
        print(
            _MARK + json.dumps({"step_ms": 1e3 * times[len(times) // 2], "loss": loss}), flush=True
        )
    dist.destroy_process_group()


def _main(argv: list[str]) -> int:
    import torch.multiprocessing as mp

    from commpress.testing.dist import free_port

    name, world_size, steps = argv[0], int(argv[1]), int(argv[2])
    mp.spawn(_rank_main, args=(world_size, free_port(), name, steps), nprocs=world_size)
    return 0


def _observed_error(text: str) -> str:
    """The most telling line of a dead probe's output: its innermost error, with location.

    A C++ abort (``terminate called ... what(): ...``) wins over the Python
    exceptions that torch's process launcher raises about it afterwards.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("what():"):
            kind = re.search(r"instance of '([^']+)'", lines[i - 1]) if i else None
            what = ln[len("what():") :].strip()
            what = what.split("] ", 1)[-1]  # drop the "[enforce fail at file:line]" prefix
            return f"process aborted: {kind.group(1) + ': ' if kind else ''}{what}"[:240]
    exc = re.compile(r"^[\w.]*(Error|Exception)\b")
    launcher = ("ProcessRaisedException", "ProcessExitedException")
    hits = [i for i, ln in enumerate(lines) if exc.match(ln) and not ln.startswith(launcher)]
    hits = hits or [i for i, ln in enumerate(lines) if exc.match(ln)]
    if not hits:
        return lines[-1][:240] if lines else "no output"
    i = hits[-1]
    message = lines[i]
    if ":" not in message:  # a bare "AssertionError": say where it came from
        where = [ln for ln in lines[:i] if ln.startswith("File ")]
        if where:
            m = re.search(r'File ".*/([^/"]+)", line (\d+), in (\w+)', where[-1])
            if m:
                message += f" in {m.group(3)} ({m.group(1)}:{m.group(2)})"
    return message[:240]


def probe_hook(
    name: str, world_size: int = 2, steps: int = 4, timeout: float = 120.0
) -> dict[str, Any]:
    """Run torch's DDP hook ``name`` on ``world_size`` gloo ranks in a subprocess.

    Returns:
        A row: ``hook``, ``world_size``, ``status`` (``"runs on gloo"`` or
        ``"does not run on gloo"``), ``step_ms`` and ``loss`` when it ran,
        ``error`` (the observed message) and ``exitcode`` when it did not.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "commpress.bench.ddp", name, str(world_size), str(steps)]
    row: dict[str, Any] = {"hook": name, "world_size": world_size, "torch_hook": True}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        row.update(status="does not run on gloo", error=f"hung for more than {timeout:.0f}s")
        return row
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK) and proc.returncode == 0:
            row.update(status="runs on gloo", **json.loads(line[len(_MARK) :]))
            return row
    row.update(
        status="does not run on gloo",
        exitcode=proc.returncode,
        error=_observed_error(proc.stderr + "\n" + proc.stdout),
    )
    return row


def probe_torch_hooks(
    world_size: int = 2, hooks: tuple[str, ...] = TORCH_HOOKS
) -> list[dict[str, Any]]:
    """`probe_hook` for each of torch's DDP hooks; one row each."""
    import torch

    rows = [probe_hook(h, world_size) for h in hooks]
    for r in rows:
        r["torch"] = torch.__version__
    return rows


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
