"""Compressed-collective benchmark rows, nccl-tests style.

One function per measurement, each returning rows (plain dicts); printing,
JSON, CSV and plots are `commpress.bench.report`'s job.

Definitions (nccl-tests' conventions, on UNCOMPRESSED bytes):

- ``size`` is the bytes of float32 data the op is about: the tensor of
  ``all_reduce`` and ``broadcast``, the gathered output of ``all_gather``, the
  input of ``reduce_scatter`` and of ``all_to_all``.
- ``algbw = size / time``; ``busbw = algbw * factor(n)`` with ``factor`` from
  `BUS_FACTORS` (all_reduce ``2(n-1)/n``, all_gather and reduce_scatter and
  all_to_all ``(n-1)/n``, broadcast 1). A compressed op that moves fewer bytes
  therefore shows a *higher* busbw than the link could carry: that is the point.
- ``time`` is per iteration the slowest rank's wall time (ranks start together
  after a barrier); the row gives the median and the 10th/90th percentiles. The
  cases of one op and size take turns call by call (`run_cases`), so a burst of
  delay on the machine does not fall on one of them alone.
- ``wire_bytes`` is what one rank hands to the backend per call
  (`commpress.stats`' ``bytes_wire``: packed buffers with headers, size
  descriptors, both phases of a two-phase all-reduce; for the baselines, the
  input tensor's bytes) and ``ratio`` is ``bytes_in / bytes_wire``;
- ``encode_share``/``decode_share`` are the fractions of the median time spent
  encoding/decoding (also from stats).
- ``compressed`` says whether commpress actually encoded the timed calls (the
  policy sends tensors below ``min_bytes``, 32 KiB by default, uncompressed).
- ``rel_err`` is ``||y - y_plain|| / ||y_plain||`` against plain fp32 on the
  same inputs, the largest over ranks.
- ``speedup_fp32`` / ``speedup_bf16`` are the plain fp32 / plain bf16 median
  time divided by this row's median time, same op and size, same invocation.
- ``auto`` (a codec name here, ``codec="auto"`` per call): ``pick`` is what it
  chose (``int8/two_phase``, or ``plain``), ``modelled_us`` its modelled time;
  ``x_best`` is its median over the best of plain fp32 and every codec row auto
  could have chosen (`auto_eligible`: a candidate within the default error
  budget) of the same op, size and link, and ``best`` names that one. Every
  rank calibrates before the case (`commpress.auto.calibrate`), so no timed call
  pays for it.
- With ``SweepConfig.budget_s`` the timed iterations of a case are as many as
  fit in that many seconds at the untimed first call's pace (at least 1, at
  most ``iters``; the same count on every rank): slow cells of a grid get one.

Baselines ``plain-fp32`` and ``plain-bf16`` are plain ``torch.distributed``
calls on a float32 / bfloat16 tensor that already is in that dtype (the bf16
baseline is what a run that keeps its gradients in bf16 pays; it includes no
cast). The ``bf16`` *codec* is different: commpress casts float32 to bf16 and
back around the call, and that cast is part of its time.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "OPS",
    "AUTO",
    "BASELINES",
    "BUS_FACTORS",
    "Case",
    "SweepConfig",
    "size_range",
    "bus_factor",
    "run_case",
    "run_cases",
    "sweep",
    "sweep_rows",
    "add_speedups",
    "auto_eligible",
]

OPS: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
#: Plain torch.distributed baselines, always measured next to the codecs.
BASELINES: tuple[str, ...] = ("plain-fp32", "plain-bf16")
#: The codec name that runs each call with ``codec="auto"``.
AUTO = "auto"
#: The column each baseline's speedup goes to.
_SPEEDUP_COLUMN = {"plain-fp32": "speedup_fp32", "plain-bf16": "speedup_bf16"}

BUS_FACTORS: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "all_to_all": lambda n: (n - 1) / n,
}


def bus_factor(op: str, world_size: int) -> float:
    """nccl-tests' bus-bandwidth factor of ``op`` on ``world_size`` ranks."""
    if op not in BUS_FACTORS:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return BUS_FACTORS[op](world_size)


def size_range(begin: int, end: int, factor: int) -> list[int]:
    """``begin, begin*factor, ...`` up to ``end`` inclusive (nccl-tests' ``-b -e -f``).

    Raises:
        ValueError: ``begin > end`` or ``factor < 2``.
    """
    if begin > end:
        raise ValueError(f"min size {begin} is larger than max size {end}")
    if factor < 2:
        raise ValueError(f"size factor must be >= 2, got {factor}")
    sizes = []
    s = begin
    while s <= end:
        sizes.append(s)
        s *= factor
    return sizes


@dataclass(frozen=True)
class Case:
    """One measurement: ``op`` of ``size`` bytes (float32) with ``codec`` (or a baseline)."""

    op: str
    size: int
    codec: str
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SweepConfig:
    """What ``commpress bench`` measures.

    Attributes:
        ops: collective names from `OPS`.
        codecs: codec spec strings (baselines are added, not listed here).
        sizes: bytes of float32 data per case.
        world_size: local gloo ranks.
        warmup: untimed iterations per case.
        iters: timed iterations per case.
        link: link label for the rows (``"none"`` or a rate like ``"1gbit"``).
        shape: optional 2-D shape for every tensor (PowerSGD needs matrices); the
            size then follows from it.
        budget_s: seconds of timed calls per case: as many of ``iters`` as fit at
            the first call's pace (at least one); None: always ``iters``.
    """

    ops: tuple[str, ...] = ("all_reduce",)
    codecs: tuple[str, ...] = ("bf16", "int8", "int4")
    sizes: tuple[int, ...] = (1 << 20, 4 << 20, 16 << 20)
    world_size: int = 2
    warmup: int = 2
    iters: int = 5
    link: str = "none"
    shape: tuple[int, ...] | None = None
    budget_s: float | None = None

    def __post_init__(self) -> None:
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError(f"need iters >= 1 and warmup >= 0, got {self.iters}, {self.warmup}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0 seconds or None, got {self.budget_s}")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SweepConfig:
        """The inverse of ``dataclasses.asdict`` after a JSON round trip (lists -> tuples)."""
        fields = dict(fields)
        for key in ("ops", "codecs", "sizes", "shape"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return cls(**fields)

    def cases(self) -> list[Case]:
        """Every (op, size, baseline-or-codec) case, baselines first within a size."""
        names = list(BASELINES) + list(self.codecs)
        sizes = self.sizes
        if self.shape is not None:
            sizes = (4 * math.prod(self.shape),)
        return [
            Case(op, size, name, self.shape) for op in self.ops for size in sizes for name in names
        ]


# --------------------------------------------------------------------- per rank


def _count(case: Case, world_size: int) -> int:
    """float32 elements of the rank's input tensor for ``case``."""
    numel = case.size // 4
    if case.op in ("all_reduce", "broadcast", "reduce_scatter", "all_to_all"):
        # reduce_scatter / all_to_all split the input evenly over ranks.
        if case.op in ("reduce_scatter", "all_to_all"):
            numel -= numel % world_size
        return max(numel, world_size)
    return max(numel // world_size, 1)  # all_gather: size is the gathered output


def _resolve(module: Any, *names: str) -> Callable[..., Any]:
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    raise AttributeError(f"{module.__name__} has none of {', '.join(names)}")


def _make_call(
    op: str, module: Any, kwargs: dict[str, Any], world_size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``x -> result`` running ``op`` through ``module`` (torch.distributed or cdist)."""
    if op == "all_reduce":
        fn = _resolve(module, "all_reduce")

        def call(x: torch.Tensor) -> torch.Tensor:
            fn(x, **kwargs)
            return x

    elif op == "broadcast":
        fn = _resolve(module, "broadcast")

        def call(x: torch.Tensor) -> torch.Tensor:
            fn(x, src=0, **kwargs)
            return x

    elif op == "all_gather":
        fn = _resolve(module, "all_gather_single", "all_gather_into_tensor")

        def call(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty(x.numel() * world_size, dtype=x.dtype)
            fn(out, x, **kwargs)
            return out

    elif op == "reduce_scatter":
        fn = _resolve(module, "reduce_scatter_single", "reduce_scatter_tensor")

        def call(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty(x.numel() // world_size, dtype=x.dtype)
            fn(out, x, **kwargs)
            return out

    elif op == "all_to_all":
        fn = _resolve(module, "all_to_all_single")

        def call(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(x)
            fn(out, x, **kwargs)
            return out

    else:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    call.op_name = fn.__name__  # type: ignore[attr-defined] # what auto's choices say
    return call


def _stats_snapshot() -> dict[str, float]:
    """This process's `commpress.stats` totals over every op."""
    import commpress

    total = commpress.stats().total()
    return {
        "bytes_in": float(total.bytes_in),
        "bytes_wire": float(total.bytes_wire),
        "encode_s": total.encode_s,
        "decode_s": total.decode_s,
        "calls": float(total.calls),
        "compressed": float(total.compressed),
    }


def _plain_wire_bytes(numel: int, element_size: int) -> int:
    """What `commpress.stats` counts as ``bytes_wire`` for a plain call: the input's bytes."""
    return numel * element_size


def _percentile(sorted_values: list[float], q: float) -> float:
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def timed_calls(call: Callable[[torch.Tensor], Any], src: torch.Tensor, iters: int) -> list[float]:
    """Seconds of ``iters`` calls of ``call`` on fresh clones of ``src``, each started after a
    barrier (so every rank times the same collective, not its wait for the slowest)."""
    import torch.distributed as dist

    times = []
    for _ in range(iters):
        x = src.clone()
        dist.barrier()
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    return times


_reference: dict[tuple[Any, ...], torch.Tensor] = {}  # the last case's plain fp32 result


def _plain_reference(
    case: Case, shape: tuple[int, ...], base: torch.Tensor, plain: Callable[..., Any]
) -> torch.Tensor:
    """Plain fp32's result on ``base``, computed once per op and shape (the cases of one
    op and size run one after another; at 64 MiB on a slow link it takes seconds)."""
    key = (case.op, shape)
    if key not in _reference:
        _reference.clear()
        _reference[key] = plain(base.clone()).float()
    return _reference[key]


def _auto_pick(name: str, nbytes: int, known: set[int]) -> tuple[str, float | None]:
    """What ``auto`` chose for this case's calls: ``("int8/two_phase", modelled seconds)``,
    or ``("plain", ...)``. The choice made during the case (a new key), else the last one
    of the op at this size bucket (a key an earlier case made), else plain without a
    model (``all_to_all``, below ``min_bytes``: decided before any model)."""
    from commpress import auto

    choices = auto.decisions()
    new = [c for c in choices if id(c) not in known]
    old = [c for c in choices if c.op == name and c.bucket == auto.bucket(nbytes)]
    for c in (new or old)[-1:]:
        return (f"{c.codec}/{c.algorithm}" if c.codec else "plain"), c.modelled_s
    return "plain", None


@dataclass
class _Prepared:
    """One case set up on this rank: its call, input and timing count (`_prepare`)."""

    case: Case
    row: dict[str, Any]
    call: Callable[[torch.Tensor], Any]
    src: torch.Tensor
    err: float
    iters: int
    known: set[int]  # auto's choices before this case
    times: list[float] = field(default_factory=list)
    stat: dict[str, float] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.case.codec in BASELINES


def _prepare(
    rank: int, world_size: int, case: Case, iters: int, budget_s: float | None
) -> _Prepared | dict[str, Any]:
    """Set up ``case`` and make its untimed first call (checked against plain fp32); the
    ranks agree on whether it worked and on its timed count. Returns the finished row
    where it failed on some rank."""
    import torch.distributed as dist

    numel = _count(case, world_size)
    gen = torch.Generator().manual_seed(1234 + rank)
    shape = case.shape if case.shape is not None else (numel,)
    numel = math.prod(shape)
    base = torch.randn(shape, generator=gen)
    if case.op == "broadcast" and rank != 0:
        base.zero_()
    plain = _make_call(case.op, dist, {}, world_size)
    reference = _plain_reference(case, tuple(shape), base, plain)

    if case.codec in BASELINES:
        dtype = torch.float32 if case.codec == "plain-fp32" else torch.bfloat16
        call = plain
        src = base.to(dtype)
    else:
        import commpress.distributed as cdist

        call = _make_call(case.op, cdist, {"codec": case.codec}, world_size)
        src = base

    row: dict[str, Any] = {
        "op": case.op,
        "size": case.size,
        "count": numel,
        "codec": case.codec,
        "world_size": world_size,
    }
    error: str | None = None
    known: set[int] = set()
    if case.codec == AUTO:
        from commpress import auto

        auto.calibrate(dist.group.WORLD, src.device, src.dtype)  # not in any timed call
        known = {id(c) for c in auto.decisions()}
    first_s = 0.0
    try:
        dist.barrier()
        t0 = time.perf_counter()
        out = call(src.clone()).float()
        first_s = time.perf_counter() - t0
        err = (
            torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference)
        ).item()
    except Exception as exc:  # noqa: BLE001 - a codec that cannot do this op is a row, not a crash
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        err = float("nan")
    # Ranks must agree on whether to time this case (or the collectives below deadlock),
    # and on how many times.
    agreed = torch.tensor([1.0 if error else 0.0, first_s], dtype=torch.float64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    if agreed[0].item():
        row.update(status=f"error: {error or 'failed on another rank'}")
        return row
    if budget_s is not None:
        iters = max(1, min(iters, int(budget_s / max(agreed[1].item(), 1e-9))))
    return _Prepared(case, row, call, src, err, iters, known)


def _time_one(p: _Prepared) -> None:
    """One timed call of ``p`` (after a barrier), its stats added to ``p.stat``."""
    import torch.distributed as dist

    before = {} if p.is_baseline else _stats_snapshot()
    x = p.src.clone()
    dist.barrier()
    t0 = time.perf_counter()
    p.call(x)
    p.times.append(time.perf_counter() - t0)
    if not p.is_baseline:
        for k, v in _stats_snapshot().items():
            p.stat[k] = p.stat.get(k, 0.0) + v - before.get(k, 0.0)


def _finish(p: _Prepared, world_size: int) -> dict[str, Any]:
    """``p``'s row from its timed calls, the slowest rank's time of each."""
    import torch.distributed as dist

    case, stat, iters = p.case, p.stat, p.iters
    gathered = torch.tensor(
        p.times + [p.err, stat.get("encode_s", 0.0), stat.get("decode_s", 0.0)],
        dtype=torch.float64,
    )
    dist.all_reduce(gathered, op=dist.ReduceOp.MAX)
    times = sorted(gathered[:iters].tolist())
    err, enc_s, dec_s = gathered[iters:].tolist()

    median = statistics.median(times)
    element = 2 if case.codec == "plain-bf16" else 4
    if p.is_baseline:
        wire = _plain_wire_bytes(p.src.numel(), element)
        ratio = 4 / element
    elif stat.get("bytes_wire"):
        wire = int(stat["bytes_wire"] / iters)
        ratio = stat["bytes_in"] / stat["bytes_wire"]
    else:
        wire, ratio = None, None
    algbw = case.size / median / 1e9
    row = p.row
    row.update(
        time_us=median * 1e6,
        time_p10_us=_percentile(times, 0.1) * 1e6,
        time_p90_us=_percentile(times, 0.9) * 1e6,
        algbw_GBps=algbw,
        busbw_GBps=algbw * bus_factor(case.op, world_size),
        wire_bytes=wire,
        ratio=ratio,
        encode_share=None if p.is_baseline else enc_s / iters / median,
        decode_share=None if p.is_baseline else dec_s / iters / median,
        rel_err=err,
        compressed=None if p.is_baseline else bool(stat.get("compressed")),
        iters=iters,
        status="ok",
    )
    if case.codec == AUTO:
        nbytes = p.src.numel() * p.src.element_size()
        pick, modelled = _auto_pick(p.call.op_name, nbytes, p.known)  # type: ignore[attr-defined]
        row.update(pick=pick, modelled_us=None if modelled is None else modelled * 1e6)
    return row


def run_cases(
    rank: int,
    world_size: int,
    cases: list[Case],
    warmup: int,
    iters: int,
    budget_s: float | None = None,
) -> list[dict[str, Any]]:
    """Measure ``cases`` (one op and size, typically) on this rank, their timed calls
    interleaved; every rank must call it (it runs collectives).

    Each case is set up and called once untimed, in order, then warmed up; then round
    ``i`` times one call of every case that has an ``i``-th, starting from case ``i mod
    k`` (the same order on every rank): a burst of delay on the machine falls on all
    of them alike, not on whichever case ran then. Until 2026-12-04 each case ran its
    calls alone, one after another, and 11 of the 30 cells of the auto grid where
    auto missed 5% of the best were auto's plain path against plain itself, 1.13-2.47x
    apart.

    Must run inside an initialized gloo process group. Returns one row per case (the
    same on every rank) with ``status`` ``"ok"`` or ``"error: ..."``.
    """
    made = [_prepare(rank, world_size, case, iters, budget_s) for case in cases]
    ready = [p for p in made if isinstance(p, _Prepared)]
    for p in ready:
        for _ in range(warmup):
            p.call(p.src.clone())
    for j in _turns([p.iters for p in ready]):
        _time_one(ready[j])
    return [_finish(p, world_size) if isinstance(p, _Prepared) else p for p in made]


def _turns(iters: list[int]) -> list[int]:
    """The order of `run_cases`' timed calls: case indices, round ``i`` from case ``i mod
    k`` on, each case while it has calls left (``iters[j]`` in all)."""
    out = []
    for i in range(max(iters, default=0)):
        k = i % len(iters)
        out += [j for j in [*range(k, len(iters)), *range(k)] if i < iters[j]]
    return out


def run_case(
    rank: int,
    world_size: int,
    case: Case,
    warmup: int,
    iters: int,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Measure one case on this rank (`run_cases` of one case)."""
    return run_cases(rank, world_size, [case], warmup, iters, budget_s)[0]


def auto_eligible(spec: str) -> bool:
    """Whether ``auto`` (default budget) could choose codec ``spec`` on float32: one of
    its candidates (`commpress.calibration.candidates`) within `commpress.policy.AUTO_MAX_ERR`.
    """
    from commpress.calibration import candidates
    from commpress.policy import AUTO_MAX_ERR

    return any(
        c.spec == spec and c.typical_rel_err is not None and c.typical_rel_err <= AUTO_MAX_ERR
        for c in candidates(torch.float32, torch.device("cpu"))
    )


def add_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``speedup_fp32``/``speedup_bf16`` from the baselines of the same op, size and link,
    and each ``auto`` row's ``x_best`` and ``best``."""
    base: dict[tuple[Any, ...], float] = {}
    for r in rows:
        if r.get("codec") in BASELINES and r.get("status") == "ok":
            base[(r["op"], r["size"], r.get("link"), r["codec"])] = r["time_us"]
    for r in rows:
        for name, column in _SPEEDUP_COLUMN.items():
            t = base.get((r["op"], r["size"], r.get("link"), name))
            ok = t is not None and r.get("status") == "ok"
            r[column] = t / r["time_us"] if ok else None
    eligible = {name: auto_eligible(name) for name in {r.get("codec") for r in rows}}
    best: dict[tuple[Any, ...], tuple[float, str]] = {}
    for r in rows:
        name = r.get("codec")
        if r.get("status") == "ok" and (name == "plain-fp32" or eligible.get(name)):
            key = (r["op"], r["size"], r.get("link"))
            best[key] = min(best.get(key, (math.inf, "")), (r["time_us"], name))
    for r in rows:
        if r.get("codec") == AUTO:
            t, name = best.get((r["op"], r["size"], r.get("link")), (None, None))
            ok = t is not None and r.get("status") == "ok"
            r.update(x_best=r["time_us"] / t if ok else None, best=name if ok else None)
    return rows


def sweep(
    config: SweepConfig, progress: Callable[[int, int, Case], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Run every case of ``config`` on ``config.world_size`` local gloo ranks; yield rows.

    Ranks are started once (`commpress.testing.DistPool`) and run the cases of one op
    and size together, their timed calls interleaved (`run_cases`).
    ``progress(done, total, case)`` is called before each op and size.
    Speedups are not filled in here (they need the whole sweep): see `add_speedups`.
    """
    from commpress.testing.dist import DistPool

    cases = config.cases()
    groups = [list(g) for _, g in itertools.groupby(cases, lambda c: (c.op, c.size, c.shape))]
    per_case_timeout = 600.0
    done = 0
    with DistPool(config.world_size, pg_timeout=per_case_timeout) as pool:
        for group in groups:
            if progress is not None:
                progress(done, len(cases), group[0])
            rows = pool.run(
                run_cases,
                group,
                config.warmup,
                config.iters,
                config.budget_s,
                timeout=per_case_timeout * len(group),
            )[0]
            done += len(group)
            for row in rows:
                row["link"] = config.link
                yield row
    if progress is not None and cases:
        progress(len(cases), len(cases), cases[-1])


def sweep_rows(**fields: Any) -> list[dict[str, Any]]:
    """`sweep` + `add_speedups` from JSON-able `SweepConfig` fields (lists for tuples).

    The form `commpress.bench.netem.run_function` calls in another process::

        netem.run_function("1gbit", "commpress.bench.collectives:sweep_rows",
                           {"ops": ["all_reduce"], "sizes": [67108864]})
    """
    return add_speedups(list(sweep(SweepConfig.from_dict(fields))))
