"""The DDP step benchmark, and probes of torch's own DDP communication hooks on gloo.

`step_rows` times a DDP training step of a 2-layer MLP on gloo ranks for each
gradient method side by side in one run: plain DDP, torch's hooks
(``torch:fp16_compress_hook``, ``torch:bf16_compress_hook``; a hook that refuses
to run becomes a row with its error), `commpress.hooks` with each single codec,
and ``auto`` (`commpress.hooks.CompressionState(codec="auto")`, calibrated in
`commpress.hooks.register`, before the timed steps). The ``auto`` row also names
the fastest single codec of the run that auto may choose (error within its
default budget: bf16, fp16, int8; not fp8 or int4) and ``x_best_codec``, that
codec's step time over auto's: issue 10's target is >= 1 at 1 Gbit/s, and
``x_plain`` >= 0.95 on unshaped loopback. ``benchmarks/bench_fast.py ddp`` runs it, also over an
emulated link.

Probes: torch ships ``fp16_compress_hook``, ``bf16_compress_hook``, ``powerSGD_hook``,
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
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any

__all__ = [
    "STEP_METHODS",
    "TORCH_HOOKS",
    "init_gloo_rank",
    "probe_hook",
    "probe_torch_hooks",
    "run_isolated",
    "step_rank",
    "step_rows",
]

#: Hook names in ``torch.distributed.algorithms.ddp_comm_hooks``, in probe order.
TORCH_HOOKS: tuple[str, ...] = (
    "allreduce_hook",
    "fp16_compress_hook",
    "bf16_compress_hook",
    "quantization_pertensor_hook",
    "quantization_perchannel_hook",
    # Last: after one of these aborted, a later probe on this machine was once seen to hang.
    "batched_powerSGD_hook",
    "powerSGD_hook",
)

_MARK = "COMMPRESS_PROBE_RESULT "

#: The methods `step_rows` times by default: baselines, single codecs, auto.
STEP_METHODS: tuple[str, ...] = (
    "plain",
    "torch:fp16_compress_hook",
    "torch:bf16_compress_hook",
    "bf16",
    "fp16",
    "int8",
    "fp8",
    "int4",
    "auto",
)


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


def init_gloo_rank(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """Join a gloo group on ``127.0.0.1:port`` as a spawned benchmark rank (one thread:
    ranks share the machine's cores)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _rank_main(rank: int, world_size: int, port: int, name: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo_rank(rank, world_size, port, timeout_s=30)  # a hung hook fails fast
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


# --------------------------------------------------------------- DDP step
def step_rank(
    rank: int, world: int, method: str, width: int, steps: int, warmup: int
) -> dict[str, Any]:
    """One rank of `step_rows`: median seconds of ``steps`` DDP steps after ``warmup``.

    ``method``: ``"plain"``, ``"torch:<hook>"`` (a hook of torch's ``default_hooks``) or
    a `commpress.hooks.CompressionState` codec spec (``"auto"`` included). A torch hook
    that DDP refuses (bf16's on gloo: at registration, on every rank alike, before any
    collective) returns ``{"error": ...}``.
    """
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    import commpress.hooks

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width, bias=False)
    )
    ddp = DDP(model)
    state = None
    if method.startswith("torch:"):
        try:
            ddp.register_comm_hook(None, getattr(default_hooks, method.removeprefix("torch:")))
        except (TypeError, RuntimeError) as exc:  # bf16's refuses gloo, alike on every rank
            return {"error": f"{type(exc).__name__}: {exc}"}
    elif method != "plain":
        state = commpress.hooks.register(ddp, commpress.hooks.CompressionState(codec=method))
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    data = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        ddp(data).square().mean().backward()
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "step_s": statistics.median(times),
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "spread": f"{min(times) * 1e3:.0f}..{max(times) * 1e3:.0f}",
    }
    if state is not None and state.plain_ddp:
        out["chosen"] = "no hook: plain DDP"  # auto found no bucket size that pays
    elif state is not None and state.codec is None:  # auto: what each bucket went as
        counts = Counter(spec or "plain" for spec in state.chosen.values())
        out["chosen"] = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    return out


def step_rows(
    width: int = 2900,
    steps: int = 5,
    warmup: int = 2,
    methods: tuple[str, ...] = STEP_METHODS,
    world_size: int = 2,
) -> list[dict[str, Any]]:
    """DDP step time per gradient method (see the module docstring), in one run.

    A 2-layer MLP of ``2 * width**2`` parameters (2900: 67 MB of float32 gradients, 3
    of DDP's default 25 MB buckets), batch 8, SGD, on ``world_size`` gloo ranks in this
    process's network. Rows: ``method``, ``step_ms`` (median, the slower rank),
    ``spread_ms``, ``grad_bytes``, ``x_plain`` (plain's step over this one) and
    ``x_torch_fp16_hook`` where those ran; ``error`` for a method that does not run;
    for ``auto`` also ``chosen`` (the buckets' codecs), ``best_codec`` and
    ``x_best_codec``.
    """
    from commpress.testing import DistPool

    rows = []
    with DistPool(world_size, job_timeout=900, pg_timeout=300) as pool:
        for method in methods:
            res = pool.run(step_rank, method, width, steps, warmup, timeout=900)
            if "error" in res[0]:
                rows.append({"method": method, "error": res[0]["error"]})
                continue
            row = {
                "method": method,
                "step_ms": max(r["step_s"] for r in res) * 1e3,
                "spread_ms": res[0]["spread"],
                "grad_bytes": res[0]["grad_bytes"],
            }
            if "chosen" in res[0]:
                row["chosen"] = res[0]["chosen"]
            rows.append(row)
    timed = {r["method"]: r["step_ms"] for r in rows if "step_ms" in r}
    for r in rows:
        for base, key in (("plain", "x_plain"), ("torch:fp16_compress_hook", "x_torch_fp16_hook")):
            if base in timed and "step_ms" in r:
                r[key] = timed[base] / r["step_ms"]
    codecs = {m: t for m, t in timed.items() if _within_auto_budget(m)}
    for r in rows:
        if r["method"] == "auto" and "step_ms" in r and codecs:
            best = min(codecs, key=codecs.__getitem__)
            r["best_codec"] = best
            r["x_best_codec"] = codecs[best] / r["step_ms"]
    return rows


def _within_auto_budget(method: str) -> bool:
    """Whether ``method`` is a single codec ``auto`` may choose by default (the ones its
    target compares with: int4 is faster on slow links, and outside the budget)."""
    from commpress.policy import AUTO_MAX_ERR
    from commpress.registry import get_codec

    if method in ("plain", "auto") or method.startswith("torch:"):
        return False
    err = get_codec(method).typical_rel_err
    return err is not None and err <= AUTO_MAX_ERR


def _main(argv: list[str]) -> int:
    import torch.multiprocessing as mp

    from commpress.testing.dist import free_port

    name, world_size, steps = argv[0], int(argv[1]), int(argv[2])
    mp.spawn(_rank_main, args=(world_size, free_port(), name, steps), nprocs=world_size)
    return 0


_WRAPPER = re.compile(r"^(RuntimeError: )?Got the following error when running the callback: ")


def clean_error(message: str) -> str:
    """Drop the wrappers torch puts around an error raised inside a comm-hook future.

    ``"RuntimeError: Got the following error when running the callback: RuntimeError:
    Got the following error ...: IndexError: too many indices"`` -> ``"IndexError: too
    many indices"``.
    """
    while True:
        stripped = _WRAPPER.sub("", message)
        if stripped == message:
            return message
        message = stripped


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
    message = clean_error(lines[i])
    if ":" not in message:  # a bare "AssertionError": say where it came from
        where = [ln for ln in lines[:i] if ln.startswith("File ")]
        if where:
            m = re.search(r'File ".*/([^/"]+)", line (\d+), in (\w+)', where[-1])
            if m:
                message += f" in {m.group(3)} ({m.group(1)}:{m.group(2)})"
    return message[:240]


def run_isolated(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in a session of its own; its exit code (None: timed out) and its output.

    Afterwards (and on timeout) the whole process group is killed, so ranks it
    spawned -- kept alive by a hung collective or orphaned by an abort -- do not
    outlive it.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    finally:
        # Also after a normal exit: a rank orphaned by an abort must not linger.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if code is None:
        out, err = proc.communicate()
    return code, f"{err}\n{out}"


def _attempt(name: str, world_size: int, steps: int, timeout: float) -> dict[str, Any]:
    """One probe subprocess: ``{"ok": True, step_ms, loss}`` or ``{"ok": False, error, ...}``."""
    cmd = [sys.executable, "-m", "commpress.bench.ddp", name, str(world_size), str(steps)]
    code, output = run_isolated(cmd, timeout)
    if code is None:
        return {"ok": False, "error": f"hung for more than {timeout:.0f}s", "exitcode": None}
    for line in output.splitlines():
        if line.startswith(_MARK) and code == 0:
            return {"ok": True, **json.loads(line[len(_MARK) :])}
    return {"ok": False, "error": _observed_error(output), "exitcode": code}


def probe_hook(
    name: str, world_size: int = 2, steps: int = 6, attempts: int = 2, timeout: float = 60.0
) -> dict[str, Any]:
    """Run torch's DDP hook ``name`` on ``world_size`` gloo ranks in a subprocess.

    A hook that runs is tried again, up to ``attempts`` times in all, since
    ``powerSGD_hook``'s abort on gloo does not happen on every run; the first
    failure ends the probe.

    Returns:
        A row: ``hook``, ``world_size``, ``status`` (``"runs on gloo"`` or
        ``"does not run on gloo"``), ``runs`` (``"k/n"``: attempts that ran out of
        those made), ``step_ms`` and ``loss`` of the last run that completed,
        ``error`` (the observed message) and ``exitcode`` of the failure if any.
    """
    row: dict[str, Any] = {"hook": name, "world_size": world_size, "torch_hook": True}
    ran = made = 0
    for _ in range(attempts):
        made += 1
        result = _attempt(name, world_size, steps, timeout)
        if not result.pop("ok"):
            row.update(result)
            break
        ran += 1
        row.update(result)
    row["status"] = "runs on gloo" if ran == made else "does not run on gloo"
    row["runs"] = f"{ran}/{made}"
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
