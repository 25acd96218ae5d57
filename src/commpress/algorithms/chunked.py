"""The chunked driver: one software pipeline for every algorithm's chunks.

A large all-reduce is cut into chunks of about ``Engine.chunk_bytes``; each
chunk runs through its algorithm's *stages* and the driver interleaves them
so that chunk ``k+1`` is encoded while chunk ``k`` is on the wire and chunk
``k-1`` is decoded. A stage is ``(lag, fn)``: ``fn(k, state) -> state`` runs
for chunk ``k`` at step ``k + lag``; within a step the stages run in their
order. Stages that post transfers asynchronously do so at the same step, in
the same order, on every rank, which is all the backends ask for.

Two forms, chosen per call:

- the algorithm's own stages (`Algorithm.stages`, e.g. `two_phase`:
  encode + post the all-to-all; sum + re-encode + post the all-gather;
  decode), on CPU, when the algorithm offers them for the call (`two_phase`
  and `direct` need every packed size known locally: a codec of fixed
  size; `hierarchical` takes any). One descriptor exchange covers the call.
- *prepare ahead* for everything else (variable-size codecs, CUDA, the
  ``gather`` algorithm): `Algorithm.prepare` (the encode, local work) runs
  on the engine's encode threads up to ``num_threads`` chunks ahead while
  `Algorithm.all_reduce` (the transfers, blocking, one descriptor per chunk)
  runs in order on the calling thread.

Each chunk has its own stats record (merged into the call's with
`CallRecord.merge`) and, under error feedback, its own key ``(key, k)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from ..stats import CallRecord
from .common import Comm, acc_dtype
from .registry import Algorithm, Stage

if TYPE_CHECKING:
    from ..engine import Engine

__all__ = ["reduce", "all_reduce", "run_stages", "prepare_ahead", "chunk_ranges"]


def run_stages(count: int, stages: Sequence[Stage]) -> list[Any]:
    """Run every stage for chunks ``0 .. count-1``, interleaved by their lags.

    Returns the last stage's state of each chunk.
    """
    states: list[Any] = [None] * count
    last = max(lag for lag, _ in stages)
    for step in range(count + last):
        for lag, fn in stages:
            k = step - lag
            if 0 <= k < count:
                states[k] = fn(k, states[k])
    return states


def chunk_ranges(numel: int, per: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of at most ``per`` elements."""
    return [(a, min(a + per, numel)) for a in range(0, numel, per)]


def reduce(
    algo: Algorithm,
    comm: Comm,
    tensor: torch.Tensor,
    op: Any,
    root: int | None,
    engine: Engine,
) -> torch.Tensor | None:
    """All-reduce (``root`` None) or reduce ``tensor`` with ``algo``; returns the result.

    Algorithms that work on flat tensors (`Algorithm.flat`) get the 1-D view and, for
    an all-reduce, run chunked (`all_reduce`); the others (PowerSGD: it needs the
    matrix shape) get the tensor whole. The result is in the accumulation dtype, None
    on the ranks of a reduce other than ``root``.
    """
    x = tensor.detach().reshape(-1) if algo.flat else tensor
    if root is not None:
        return algo.reduce(comm, x, op, root)
    if not algo.flat:
        return algo.all_reduce(comm, x, op)
    return all_reduce(algo, comm, x, op, engine)


def all_reduce(algo: Algorithm, comm: Comm, flat: torch.Tensor, op: Any, engine: Engine) -> Any:
    """All-reduce the 1-D ``flat`` with ``algo``, in chunks when it is large.

    Returns the 1-D result in the accumulation dtype; ``flat`` itself when the
    algorithm reduces in place (`Algorithm.in_place`, float32/float64 input).
    """
    in_place = algo.in_place and flat.dtype == acc_dtype(flat.dtype)
    per = engine.chunk_bytes // max(flat.element_size(), 1)
    if engine.chunk_bytes == 0 or flat.numel() <= per:
        return algo.all_reduce(comm, flat, op, out=flat if in_place else None)
    bounds = chunk_ranges(flat.numel(), per)
    comms = [
        dataclasses.replace(
            comm, rec=CallRecord(comm.op), key=None if comm.key is None else (comm.key, i)
        )
        for i in range(len(bounds))
    ]
    out = (
        flat
        if in_place
        else torch.empty(flat.numel(), dtype=acc_dtype(flat.dtype), device=flat.device)
    )
    stages = algo.stages(comms, flat, op, bounds, out) if flat.device.type == "cpu" else None
    try:
        if stages is not None:
            run_stages(len(bounds), stages)
        else:
            _prepare_ahead(algo, comms, flat, op, bounds, out, engine)
    finally:
        for c in comms:
            comm.rec.merge(c.rec)
    return out


def _prepare_ahead(
    algo: Algorithm,
    comms: Sequence[Comm],
    flat: torch.Tensor,
    op: Any,
    bounds: Sequence[tuple[int, int]],
    out: torch.Tensor,
    engine: Engine,
) -> None:
    """Encode chunks on the engine's threads ahead of the transfers (module docstring)."""

    def prepare(k: int) -> Any:
        a, b = bounds[k]
        return algo.prepare(comms[k], flat[a:b])

    def finish(k: int, prepared: Any) -> None:
        a, b = bounds[k]
        algo.all_reduce(comms[k], flat[a:b], op, prepared, out=out[a:b])

    prepare_ahead(len(bounds), prepare, finish, engine, flat.device)


def prepare_ahead(
    count: int,
    prepare: Callable[[int], Any],
    finish: Callable[[int, Any], None],
    engine: Engine,
    device: torch.device | None = None,
) -> None:
    """``finish(k, prepare(k))`` for ``k < count``, ``prepare`` running ahead.

    ``prepare`` (local work: the encode) runs on the engine's encode threads up to
    ``num_threads`` chunks ahead -- on the codec stream for a CUDA ``device`` --
    while ``finish`` (the transfers, in order) runs on this thread. On failure the
    chunks not yet started are cancelled and the running ones awaited.
    """
    if engine.num_threads == 0:
        run_stages(count, [(0, lambda k, _: prepare(k)), (0, finish)])
        return
    pool = engine.encode_pool()
    stream = engine.stream(device) if device is not None and device.type == "cuda" else None

    def on_stream(k: int) -> Any:
        with torch.cuda.stream(stream):
            return prepare(k)

    futures: list[Future] = []

    def start(k: int, _: Any) -> Future:
        futures.append(pool.submit(prepare if stream is None else on_stream, k))
        return futures[-1]

    try:
        run_stages(count, [(0, start), (engine.num_threads, lambda k, f: finish(k, f.result()))])
    finally:
        for f in futures:
            f.cancel()
        for f in futures:
            if not f.cancelled():
                with contextlib.suppress(BaseException):
                    f.result()
