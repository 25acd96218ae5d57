"""Convergence study: does a codec change what DDP training learns, and what does a step cost?

A small byte-level (character-level) transformer LM is trained with DDP on 2
gloo ranks, on text read from this interpreter's own standard library source
(no download), for a fixed number of steps per method. Every method sees the
same initial weights and the same batches in the same order. Methods:

- ``fp32``: DDP's default all-reduce, no hook (the reference);
- a commpress codec spec (``bf16``, ``int8``, ``fp8``, ``sign``, ...): DDP with
  ``commpress.hooks.compress_hook``; ``ef-SPEC`` turns error feedback on
  explicitly (``ef-sign``, ``ef-topk:ratio=0.01``);
- ``torch:<hook>``: one of torch's own DDP hooks (``torch:fp16_compress_hook``...),
  the baseline a DDP user has today. A hook that dies on gloo becomes a row
  that says so. ``torch:powerSGD_hook`` is not in the default list: on gloo it
  aborts or hangs the process on some runs and not on others, which
  `commpress.bench.ddp.probe_torch_hooks` reports on its own.

Rows: method, final train loss (mean of the last 10% of steps, over ranks),
held-out loss (fixed batches of unseen files), relative gap to fp32, median
step time, the loss curve, and the link the ranks ran over.

Run ``python benchmarks/bench_convergence.py`` (see its ``--help``), or from
Python ``study(methods, StudyConfig(), link="1gbit")``.

Budget: the default (2 layers, d_model 128, context 64, batch 16 per rank,
200 steps, 471k parameters = 1.9 MB of fp32 gradients per step) was chosen so
the whole study fits in ~10 minutes on a shared 2-core machine: measured
~45 s per method at load average ~7, plus ~25 s per fresh set of ranks.
Short training: it shows whether a codec derails early training, not what
happens over a long run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ddp import init_gloo_rank, run_isolated

METHODS: tuple[str, ...] = (
    "fp32",
    "bf16",
    "int8",
    "int4",
    "fp8",
    "ef-sign",
    "ef-topk:ratio=0.01",
    "powersgd:rank=4",
    "zstd",
    "torch:fp16_compress_hook",
)


@dataclass(frozen=True)
class StudyConfig:
    """Model, data and schedule; the same for every method.

    Attributes:
        layers, d_model, heads, context: transformer size (``context`` tokens).
        batch: sequences per rank per step.
        steps: optimizer steps per method.
        lr: AdamW learning rate (cosine decay to 10%, 10% warmup).
        train_bytes, heldout_bytes: text sizes read from the stdlib.
        eval_batches: held-out batches averaged for the held-out loss.
        seed: weights and data order.
        world_size: DDP ranks.
    """

    layers: int = 2
    d_model: int = 128
    heads: int = 4
    context: int = 64
    batch: int = 16
    steps: int = 200
    lr: float = 3e-3
    train_bytes: int = 2_000_000
    heldout_bytes: int = 200_000
    eval_batches: int = 8
    seed: int = 0
    world_size: int = 2


TINY = StudyConfig(
    layers=1,
    d_model=32,
    heads=2,
    context=32,
    batch=4,
    steps=6,
    train_bytes=100_000,
    heldout_bytes=20_000,
    eval_batches=2,
)


# ------------------------------------------------------------------------ data


def stdlib_text(train_bytes: int, heldout_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the stdlib's ``*.py`` files, sorted by name; held-out files come after.

    Returns two ``uint8`` 1-D tensors. Train and held-out text never share a file.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise RuntimeError(f"no *.py files in the standard library at {root}")
    chunks: list[bytes] = []
    total = 0
    i = 0
    while total < train_bytes and i < len(files):
        chunks.append(files[i].read_bytes())
        total += len(chunks[-1])
        i += 1
    train = b"".join(chunks)[:train_bytes]
    held = b"".join(f.read_bytes() for f in files[i : i + 40])[:heldout_bytes]
    if len(held) < heldout_bytes // 2:
        raise RuntimeError("not enough standard-library text left for a held-out set")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(held)


def batch_at(
    data: torch.Tensor, cfg: StudyConfig, step: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of ``rank``: the same for every method (seeded by seed, step, rank)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + rank)
    starts = torch.randint(0, data.numel() - cfg.context - 1, (cfg.batch,), generator=gen)
    idx = starts[:, None] + torch.arange(cfg.context + 1)
    seq = data[idx].long()
    return seq[:, :-1], seq[:, 1:]


# ----------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """A GPT-style byte-level LM: 256-symbol vocabulary, learned positions."""

    def __init__(self, cfg: StudyConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.d_model))
        self.blocks = nn.Sequential(*[Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers)])
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.tok(x) + self.pos[: x.shape[1]])
        return self.head(self.ln(h))


# ---------------------------------------------------------------- one method


def _lr_at(cfg: StudyConfig, step: int) -> float:
    warm = max(cfg.steps // 10, 1)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(cfg.steps - warm, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _register(ddp: Any, method: str) -> None:
    """Install ``method``'s communication on the DDP model (nothing for fp32)."""
    if method == "fp32":
        return
    if method.startswith("torch:"):
        import torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook as psgd

        from commpress.bench.ddp import _hook_and_state

        name = method.split(":", 1)[1]
        hook, state = _hook_and_state(name)
        if isinstance(state, psgd.PowerSGDState):
            state = psgd.PowerSGDState(
                process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2
            )
        ddp.register_comm_hook(state, hook)
        return
    import commpress.hooks as hooks

    if method.startswith("ef-"):
        state = hooks.CompressionState(codec=method[3:], error_feedback=True)
    else:
        state = hooks.CompressionState(codec=method)
    ddp.register_comm_hook(state, hooks.compress_hook)


def train(rank: int, world_size: int, method: str, cfg: StudyConfig) -> dict[str, Any]:
    """Train ``method`` on this rank of an initialized gloo group; the row (same on all ranks).

    The ``world_size`` ranks must all call it. A failure raises; `run_methods`
    runs it in a process of its own.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    train, held = stdlib_text(cfg.train_bytes, cfg.heldout_bytes)
    torch.manual_seed(cfg.seed)
    model = CharLM(cfg)
    ddp = DDP(model)
    _register(ddp, method)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    losses, times = [], []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        x, y = batch_at(train, cfg, step, rank)
        dist.barrier()
        t0 = time.perf_counter()
        loss = F.cross_entropy(ddp(x).view(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        held_losses = [
            F.cross_entropy(model(xb).view(-1, 256), yb.reshape(-1)).item()
            for xb, yb in (
                batch_at(held, replace(cfg, seed=cfg.seed + 7), i, 0)
                for i in range(cfg.eval_batches)
            )
        ]
    curves = torch.tensor([losses, times], dtype=torch.float64)
    dist.all_reduce(curves)
    curves /= world_size
    mean_loss, mean_time = curves.tolist()
    tail = max(cfg.steps // 10, 1)
    step_times = sorted(mean_time[1:] or mean_time)
    return {
        "method": method,
        "status": "ok",
        "final_train_loss": sum(mean_loss[-tail:]) / tail,
        "heldout_loss": sum(held_losses) / len(held_losses),
        "step_ms": 1e3 * step_times[len(step_times) // 2],
        "steps": cfg.steps,
        "params": sum(p.numel() for p in model.parameters()),
        "curve": mean_loss,
    }


def _rank_main(
    rank: int, world_size: int, port: int, methods: list[str], cfg: StudyConfig, out: str
) -> None:
    import torch.distributed as dist

    init_gloo_rank(rank, world_size, port, timeout_s=60)
    for method in methods:
        row = train(rank, world_size, method, cfg)
        if rank == 0:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[convergence] {method}: done", file=sys.stderr, flush=True)
        dist.barrier()
    dist.destroy_process_group()


def _child_main(argv: list[str]) -> int:
    """``python -m commpress.bench.convergence METHODS_JSON CONFIG_JSON OUT``.

    Trains the methods one after another in one world; rank 0 appends one JSON
    line per finished method to OUT.
    """
    import torch.multiprocessing as mp

    from commpress.testing.dist import free_port

    methods, cfg, out = json.loads(argv[0]), StudyConfig(**json.loads(argv[1])), argv[2]
    mp.spawn(
        _rank_main, args=(cfg.world_size, free_port(), methods, cfg, out), nprocs=cfg.world_size
    )
    return 0


def _error_line(text: str) -> str:
    from commpress.bench.ddp import _observed_error

    return _observed_error(text)


def check_method(method: str) -> str | None:
    """Why ``method`` cannot be run (unknown codec or hook), or None."""
    from commpress.bench.ddp import TORCH_HOOKS

    if method == "fp32":
        return None
    if method.startswith("torch:"):
        name = method.split(":", 1)[1]
        return None if name in TORCH_HOOKS else f"unknown torch hook {name!r}; one of {TORCH_HOOKS}"
    spec = method[3:] if method.startswith("ef-") else method
    try:
        import commpress

        commpress.get_codec(spec)
    except Exception as exc:  # noqa: BLE001 - any reason becomes the row's status
        return f"{type(exc).__name__}: {exc}"
    return None


def run_methods(
    methods: list[str] | tuple[str, ...],
    cfg: StudyConfig,
    link: str = "none",
    timeout: float = 240.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train each method (over an emulated ``link`` if not "none"); one row per method.

    The methods run one after another in one subprocess with its own ranks
    (starting ranks costs more than a short training run); each of torch's
    hooks runs in a subprocess of its own. When that process
    raises or dies -- torch's powerSGD_hook aborts it on gloo -- the method it
    was on becomes a row with the observed error (``status`` "error: ..."; for
    torch hooks "does not run on gloo: ...") and the rest run in a fresh one.
    An unknown method is an error row at once. ``timeout`` is per method.
    """
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for m in methods:
        problem = check_method(m)
        if problem:
            rows[m] = {"method": m, "status": f"error: {problem}"}
        else:
            todo.append(m)
    while todo:
        # torch's hooks each get a world of their own: one that aborted the process
        # alone once ran in a world shared with other methods, which proves nothing.
        batch = todo[:1]
        if not todo[0].startswith("torch:"):
            batch = list(itertools.takewhile(lambda m: not m.startswith("torch:"), todo))
        done, output = _run_child(batch, cfg, link, timeout * len(batch), progress)
        rows.update(done)
        todo = [m for m in todo if m not in done]
        if any(m not in done for m in batch):
            failed = todo.pop(0)
            what = "does not run on gloo" if failed.startswith("torch:") else "error"
            rows[failed] = {"method": failed, "status": f"{what}: {_error_line(output)}"}
    for r in rows.values():
        r.update(link=link, world_size=cfg.world_size)
    return [rows[m] for m in methods]


def _run_child(
    methods: list[str], cfg: StudyConfig, link: str, timeout: float, progress: bool
) -> tuple[dict[str, dict[str, Any]], str]:
    """Run `_child_main` on ``methods``; the rows it finished, and its output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.jsonl")
        argv = ["-m", "commpress.bench.convergence", json.dumps(methods)]
        cmd = _command([*argv, json.dumps(asdict(cfg)), out], link)
        code, output = run_isolated(cmd, timeout)
        if code is None:
            output = f"TimeoutError: no result within {timeout:.0f}s\n{output}"
        done = {}
        if os.path.exists(out):
            for line in Path(out).read_text().splitlines():
                row = json.loads(line)
                done[row["method"]] = row
        if progress:
            for m in done:
                print(f"[convergence] {m}: done", file=sys.stderr, flush=True)
        return done, output


def _command(argv: list[str], link: str) -> list[str]:
    """``python argv...``, inside a namespace with a shaped loopback when ``link`` is a rate."""
    cmd = [sys.executable, *argv]
    if link in ("", "none"):
        return cmd
    from commpress.bench import netem

    return netem.wrap_command(cmd, link)


def link_usable(link: str) -> tuple[bool, str]:
    """Whether ``link`` can be emulated here, and if not, why."""
    if link in ("", "none"):
        return True, ""
    from commpress.bench import netem

    return netem.link_available()


def study(
    methods: tuple[str, ...] = METHODS,
    cfg: StudyConfig = StudyConfig(),
    link: str = "1gbit",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every method; rows with ``rel_gap`` (final train loss vs fp32) filled in."""
    if progress:
        print(f"[convergence] {len(methods)} methods, {cfg.steps} steps each", file=sys.stderr)
    rows = run_methods(methods, cfg, link, progress=progress)
    ref = next((r for r in rows if r["method"] == "fp32" and r["status"] == "ok"), None)
    for r in rows:
        ok = ref is not None and r["status"] == "ok"
        r["rel_gap"] = (r["final_train_loss"] / ref["final_train_loss"] - 1) if ok else None
        r["heldout_gap"] = (r["heldout_loss"] / ref["heldout_loss"] - 1) if ok else None
        r["step_speedup"] = (ref["step_ms"] / r["step_ms"]) if ok else None
    return rows


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
