"""``codec="auto"``: per call, the fastest of plain and every eligible codec x algorithm.

`commpress.policy.decide` runs the checks every codec shares (non-floating data,
``MIN``/``MAX``, one rank, ``min_bytes``, ``p2p``, list ``all_to_all`` and an
``all_to_all_single`` with split sizes: plain) and
hands the rest to `choose`, which the call driver binds to the call's group.
`choose` looks the call up in a cache keyed by (group, op family, dtype, device,
size bucket, world, reduce kind, budget, policy knobs); on a miss it models
every option with the `Table` of the group (`commpress.calibration`: measured,
then combined across ranks, so identical everywhere) and keeps the fastest:

- plain: the backend's own collective in the original dtype (no descriptor, no
  engine hop, no extra work);
- every candidate codec (`commpress.calibration.candidates`) whose declared
  ``typical_rel_err`` is within the budget, with every algorithm that runs the
  family and is eligible (or the one ``Policy(algorithm=...)`` forces).

Modelled seconds (``docs/auto.md``): plain is the algorithm protocol's plain
model (``direct`` with ``CodecSpeed.plain()`` for reductions, ``(N-1)(alpha +
S/B)`` for the moving ops); a codec option is ``algorithm.cost(S, N, link,
speed)`` + the codec's fixed encode time + ``N`` fixed decode times + one
descriptor exchange. A codec wins only when modelled at most `PAYS` of plain:
the model is a few tens of percent off on a busy CPU, and a wrong "compress"
costs more than a wrong "plain". ``S`` is the size bucket: the byte size
rounded up to a power of two, so one decision serves a bucket.

A decision is a pure function of the table and the call's key, so every rank
makes the same one. `decisions` shows each: the winner, its modelled time and
plain's.

DDP buckets (`commpress.hooks` under ``codec="auto"``) are decided by `choose`
too, on the hook's own group; `calibrate` measures a group ahead of its first
call (the hook's `register` does it where every rank is at the same point), and
`pays_below` says whether any size bucket up to a model's gradients would
compress (when none would, `register` leaves the model on plain DDP). On a CPU device
a bucket is modelled ``overlapped``: its codec work takes cores from the backward pass
it overlaps, and is charged for that (`model`).

Drift: the call driver reports each call's measured seconds (`observe`: the
engine job of a compressed call, the wait of a blocking plain one). Every
`DRIFT_EVERY`-th ``auto`` call on a group (the same call on every rank: all ranks
make the same calls) issues one async 16-byte all-reduce (``MIN`` over the ranks
of this rank's worst observed/modelled ratio, each way), straight to the backend
when the group's engine queue is idle, else behind it; the next due call reads
it: past `DRIFT_FACTOR`, every rank drops the group's table and decisions and
calibrates again at that call. ``MIN``, not ``MAX``: a rank that waited inside a
collective for a late peer (compute imbalance) measured the peer's lateness, not
the link; the last rank to arrive waits for no one, while a slower link or codec
slows every rank. Keys modelled under `DRIFT_MIN_S` do not count. A drift that
survives a re-calibration (the model is off there, not the machine) doubles the
interval, so it costs a logarithmic number of calibrations. `recalibrations`
lists each; ``docs/auto.md`` has the cost.

Example::

    import commpress.distributed as cdist
    cdist.all_reduce(grad, codec="auto")          # or Policy(codec="auto")
    for d in commpress.auto.decisions():
        print(d.op, d.bucket, d.codec, d.algorithm, d.modelled_s, d.plain_s)

Decision cost once cached (2-rank gloo, one shared CPU core): see ``docs/auto.md``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import calibration, topology
from .algorithms import Algorithm, CodecSpeed, default_order, get_algorithm
from .algorithms.hierarchical import Hierarchical
from .calibration import Table
from .codec import Codec
from .engine import get_engine
from .ops import REDUCTIONS
from .policy import Decision, Policy
from .registry import get_codec

__all__ = [
    "DRIFT_EVERY",
    "DRIFT_FACTOR",
    "PAYS",
    "Choice",
    "Recalibration",
    "calibrate",
    "choose",
    "decisions",
    "model",
    "observe",
    "pays_below",
    "recalibrations",
    "reset",
    "tables",
]

#: A codec must be modelled at most this fraction of plain's time to be chosen.
PAYS = 0.9
#: The ranks compare observed with modelled times every this many ``auto`` calls on a
#: group (one async 16-byte all-reduce; its result is read this many calls later).
DRIFT_EVERY = 256
#: Re-calibrate when observed times are this factor slower, or faster, than modelled.
DRIFT_FACTOR = 2.0
#: Observations of a key in one window below which it does not count (warm-up noise).
DRIFT_MIN_OBS = 3
#: Keys modelled faster than this do not count: their time is the call's own fixed cost
#: (Python, the watchdog), which the link model leaves out (a 4 KiB plain all-reduce took
#: 2-3x its model on a shared 2-core machine), and auto keeps them plain either way.
DRIFT_MIN_S = 1e-3
#: The longest interval the back-off reaches (calls).
DRIFT_MAX_EVERY = 1 << 16
_KEEP = 128  # observations kept per key and window (the newest)
_LINK_FIGURES = 4 * len(calibration.LINK_SIZES) + 6  # `link_times`; `level_times` follow


@dataclass(frozen=True)
class Choice:
    """What ``auto`` chose for one key, and why.

    Attributes:
        group: the process group's name.
        op: the first op that asked (ops of one family share the decision).
        dtype: the tensor dtype.
        bucket: the size bucket in bytes (a power of two).
        world: ranks in the group.
        codec: the chosen codec's spec, or None for plain.
        algorithm: the chosen algorithm, or None for plain.
        modelled_s: modelled seconds of the winner.
        plain_s: modelled seconds of plain.
        options: every option weighed, ``(codec or "plain", algorithm, seconds)``.
    """

    group: str
    op: str
    dtype: torch.dtype
    bucket: int
    world: int
    codec: str | None
    algorithm: str | None
    modelled_s: float
    plain_s: float
    options: tuple[tuple[str, str | None, float], ...]


@dataclass(frozen=True)
class Recalibration:
    """One drift check that made every rank of a group calibrate again.

    Attributes:
        group: the process group's name.
        call: the group's ``auto`` call (counted from 1) that calibrated again.
        slow: observed over modelled seconds (the worst key; the least over ranks).
        fast: modelled over observed seconds, likewise.
    """

    group: str
    call: int
    slow: float
    fast: float


@dataclass
class _Track:
    """Observed seconds of one decision against its modelled seconds over its bucket:
    ``low_s`` at half the bucket (the smallest call the key holds), ``high_s`` at it."""

    decision: Decision
    group: str
    low_s: float
    high_s: float
    seen: list[float] = field(default_factory=list)


@dataclass
class _Watch:
    """The drift check of one group: its call count and the check in flight."""

    device: torch.device
    calls: int
    every: int
    due: int
    pending: Callable[[], list[float]] | None = None  # the check in flight: its result
    drifted: bool = False  # the last check re-calibrated


_lock = threading.RLock()
_links: dict[str, list[float]] = {}
_tables: dict[tuple[str, str, torch.dtype], Table] = {}
_decisions: dict[tuple[Any, ...], Decision] = {}
_choices: dict[tuple[Any, ...], Choice] = {}
_tracks: dict[int, _Track] = {}  # id(decision) -> its observations
_watches: dict[str, _Watch] = {}
_recalibrations: list[Recalibration] = []


def bucket(nbytes: int) -> int:
    """``nbytes`` rounded up to a power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def choose(
    group: Any,
    group_name: str,
    device: torch.device,
    op: str,
    family: str,
    dtype: torch.dtype,
    nbytes: int,
    world: int,
    sum_like: bool,
    max_err: float,
    policy: Policy,
    overlapped: bool = False,
) -> Decision:
    """The decision for one call (the ``auto`` callback of `commpress.policy.decide`).

    The first call of a group calibrates it (in-band, in issue order on the engine);
    the first of a key models it; later calls of the key are one dict lookup, and
    every `DRIFT_EVERY`-th call of the group runs the drift check. ``overlapped``: the
    call runs beside compute on the same cores (`model`; a DDP bucket on CPU).
    """
    watch = _watches.get(group_name)
    if watch is not None:
        watch.calls += 1
        if watch.calls >= watch.due:
            _check(group, group_name, watch)
    size = bucket(nbytes)
    key = (
        group_name,
        family,
        dtype,
        device.type,
        size,
        world,
        sum_like,
        max_err,
        policy.verify,
        policy.algorithm,
        policy.error_feedback,
        overlapped,
    )
    decision = _decisions.get(key)
    if decision is not None:
        return decision
    with _lock:
        table = _table(group, group_name, device, dtype, world)
        args = (family, dtype, size, world, sum_like, max_err, policy)
        choice, decision = model(table, *args, overlapped=overlapped)
        halved = (family, dtype, max(size // 2, 1), *args[3:])
        half = model(table, *halved, overlapped=overlapped)[0][4]
        label = (choice[0] or "plain", choice[1])
        low = next((s for c, a, s in half if (c, a) == label), choice[2])
        _choices[key] = Choice(group_name, op, dtype, size, world, *choice)
        _decisions[key] = decision
        _tracks[id(decision)] = _Track(decision, group_name, low, choice[2])
        _watches.setdefault(group_name, _Watch(device, 1, DRIFT_EVERY, DRIFT_EVERY))
    return decision


def observe(decision: Decision, seconds: float) -> None:
    """Record the measured ``seconds`` of a call that ``decision`` decided (a no-op for a
    decision that is not ``auto``'s). The call driver calls it from any thread."""
    track = _tracks.get(id(decision))
    if track is not None and track.decision is decision:
        seen = track.seen
        seen.append(seconds)
        if len(seen) > 2 * _KEEP:
            del seen[:_KEEP]


def _drift(name: str) -> list[float]:
    """This rank's worst ``[observed / modelled, modelled / observed]`` over the group's
    keys since the last check (1.0 each where none counts), a new window begun."""
    slow = fast = 1.0
    for track in [t for t in list(_tracks.values()) if t.group == name]:
        seen, track.seen = track.seen, []
        if len(seen) >= DRIFT_MIN_OBS and track.high_s >= DRIFT_MIN_S:
            median = statistics.median(seen[-_KEEP:])
            slow = max(slow, median / track.high_s)
            fast = max(fast, track.low_s / median if median > 0 else DRIFT_FACTOR + 1)
    return [slow, fast]


def _check(group: Any, name: str, watch: _Watch) -> None:
    """A due call of ``name``: read the check in flight (drifted: drop the group so that
    this call calibrates it again), then issue the next one, in order with the group's
    calls. Every rank runs it at the same call and reads the same combined figures."""
    with _lock:
        if watch.pending is not None:
            slow, fast = watch.pending()
            watch.pending = None
            if max(slow, fast) > DRIFT_FACTOR:
                if watch.drifted:  # the model is off here, not the machine: back off
                    watch.every = min(2 * watch.every, DRIFT_MAX_EVERY)
                watch.drifted = True
                watch.due = watch.calls + watch.every
                _recalibrations.append(Recalibration(name, watch.calls, slow, fast))
                _forget(name)
                return
            watch.drifted = False
            watch.every = DRIFT_EVERY
        watch.due = watch.calls + watch.every
        device, engine = watch.device, get_engine()

        def issue() -> Callable[[], list[float]]:
            t = torch.tensor(_drift(name), dtype=torch.float64, device=device)
            work = dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group, async_op=True)
            return lambda: (work.wait(), t.cpu().tolist())[1]

        if engine.idle(name):  # straight to the backend, like a plain call: no thread hop
            watch.pending = issue()
        else:  # behind the group's queued calls, in issue order
            handle = engine.run(name, lambda: issue()(), async_op=True, device=device)
            watch.pending = handle.result


def _forget(name: str) -> None:
    """Drop every table, link figure, decision and observation of group ``name``."""
    for d in (_tables, _decisions, _choices):
        for k in [k for k in d if k[0] == name]:
            del d[k]
    for k in [k for k in _links if k.rsplit("|", 1)[0] == name]:
        del _links[k]
    for k in [k for k, t in _tracks.items() if t.group == name]:
        del _tracks[k]


def calibrate(group: Any, device: torch.device, dtype: torch.dtype) -> Table:
    """Calibrate ``group`` for ``dtype`` on ``device`` now, unless it is already: the table
    the first ``auto`` call would otherwise measure (and block on) when it comes.

    Collective: call it on every rank of ``group`` at the same point of the program, with
    nothing else in flight on the group (`commpress.hooks.register` does, for the hook's
    group, so that no rank calibrates from inside backward).
    """
    with _lock:
        return _table(group, str(group.group_name), device, dtype, group.size())


def _table(group: Any, name: str, device: torch.device, dtype: torch.dtype, world: int) -> Table:
    """The group's table for ``dtype`` on ``device``: calibrated on first need.

    One combining all-reduce per (group, device kind, dtype), with the link times
    in the first; every rank reaches it at the same call.
    """
    tkey = (name, device.type, dtype)
    table = _tables.get(tkey)
    if table is not None:
        return table
    codecs = calibration.candidates(dtype, device)
    lkey = f"{name}|{device.type}"

    def calibrate() -> Table:
        topo = _two_levels(group, device)
        probes = _probes(codecs, dtype, topo is not None)
        link = []
        if lkey not in _links:
            link = calibration.link_times(group, device)
            if topo is not None:
                link += calibration.level_times(topo.intra, topo.inter, device)
        speeds = calibration.codec_times(codecs, dtype, device)
        timed = calibration.algorithm_times(group, device, dtype, probes, get_engine())
        combined = calibration.combine(group, device, link + speeds + timed)
        if link:
            _links[lkey] = combined[: len(link)]
        n = len(link) + len(speeds)
        figures = _links[lkey]
        base = calibration.fit(world, figures, codecs, combined[len(link) : n])
        levels = None
        if topo is not None:
            levels = calibration.fit_levels(topo.hosts, topo.local_size, figures[_LINK_FIGURES:])
        base = dataclasses.replace(base, backend=str(dist.get_backend(group)), levels=levels)
        return _corrected(base, probes, combined[n:], dtype, world)

    table = get_engine().run(name, calibrate, async_op=False, device=device)
    _tables[tkey] = table
    return table


def _two_levels(group: Any, device: torch.device) -> topology.Topology | None:
    """The group's `Topology` when it spans several hosts with several ranks on each (the
    only shape where ``hierarchical`` differs from the flat algorithms), else None.

    Collective: one small all-gather on the group's first calibration (`topology.shape`),
    and on a two-level group `topology.of`'s subgroups, which every rank builds alike.
    """
    got = topology.shape(group, device)
    if got is None or got[0] < 2 or got[1] < 2:
        return None
    return topology.of(group, device)


def _probes(
    codecs: list[Codec], dtype: torch.dtype, two_levels: bool = False
) -> list[tuple[Algorithm, Codec]]:
    """One codec per reduction algorithm to time it with: the eligible candidate that
    saves the most (ties: the spec); an algorithm no candidate can run has none.
    ``hierarchical`` is timed only on a two-level group; ``transport`` as a broadcast
    (its correction is the broadcasts'; the other moving ops take ``gather``'s).

    Until 2026-12-04 a broadcast took ``gather``'s correction: fitted on an all-reduce
    that decodes and sums every rank's packet, its factor (4-8 on loopback and 10
    Gbit/s) modelled an int8 16 MiB broadcast at 10 Gbit/s at 15.9 ms where it took 5-6
    ms, and auto kept it plain at 10 ms.
    """
    out = []
    algos = _movers("all_reduce") + ([get_algorithm("hierarchical")] if two_levels else [])
    for algo in algos:
        fits = [
            c for c in codecs if algo.eligible(c, True) is None and _ratio(c, dtype, 1 << 20) > 1
        ]
        if fits:
            out.append((algo, max(fits, key=lambda c: (_ratio(c, dtype, 1 << 20), c.spec))))
    moving = [c for c in codecs if _ratio(c, dtype, 1 << 20) > 1]
    if moving:
        best = max(moving, key=lambda c: (_ratio(c, dtype, 1 << 20), c.spec))
        out.append((get_algorithm("transport"), best))
    return out


def _movers(family: str) -> list[Algorithm]:
    return default_order(family)


def _ratio(codec: Codec, dtype: torch.dtype, size: int) -> float:
    numel = size // torch.empty((), dtype=dtype).element_size()
    return size / (codec.encoded_nbytes(numel, dtype) or size)


def _raw(
    table: Table,
    algo: Algorithm,
    codec: Codec,
    size: int,
    world: int,
    dtype: torch.dtype,
    family: str = "all_reduce",
) -> tuple[float, float]:
    """The uncorrected model in two parts, ``(link, codec)`` seconds: ``algo.cost`` with
    an infinitely fast codec plus one descriptor round, and what the codec adds to it
    (``algo.cost`` at the codec's rates, minus that, plus its fixed encode and ``N``
    fixed decode times, one for a broadcast). `_corrected` fits a factor to the codec
    part only: the link figures were measured in-band already, while the codec rates
    were measured alone.

    Every algorithm is modelled for the call's ``family``: a flat reduce-scatter is
    `two_phase`'s first round alone, a hierarchical one `hierarchical_moves`' model of
    it. Until 2026-12-03 both took their all-reduce's model (twice the rounds, so that
    the two sides carried the same second round), and auto kept 16 MiB reduce-scatters
    on loopback plain at 17.6 ms where int8 took 9.3 ms.
    """
    speed = table.speeds[codec.spec]
    ratio = _ratio(codec, dtype, size)
    cs = CodecSpeed(speed.encode_Bps, speed.decode_Bps, ratio)
    free = CodecSpeed(math.inf, math.inf, ratio)
    if isinstance(algo, Hierarchical):
        assert table.levels is not None
        shape = family if family in ("all_gather", "reduce_scatter") else "all_reduce"
        with_codec = algo.cost(size, world, table.levels, cs, family=shape)
        link_only = algo.cost(size, world, table.levels, free, family=shape)
    else:
        link = table.reduce_link if algo.families & REDUCTIONS else table.link_for(family)
        # An all-to-all of S bytes is transport's model of one piece of S/N: (N-1) pieces
        # out, N decoded (it encodes S/N where the call encodes (N-1)/N of S).
        n = size // world if family == "all_to_all" else size
        with_codec = algo.cost(n, world, link, cs, family=family)
        link_only = algo.cost(n, world, link, free, family=family)
    decodes = 1 if family == "broadcast" else world
    codec_s = with_codec - link_only + speed.encode_s + decodes * speed.decode_s
    return link_only + table.descriptor_s, codec_s


def _corrected(
    base: Table,
    probes: list[tuple[Algorithm, Codec]],
    timed: list[float],
    dtype: torch.dtype,
    world: int,
) -> Table:
    """``base`` with each probed algorithm's ``(fixed, factor)``: a call takes ``fixed +
    link + factor * codec`` (`_raw`'s parts), the line through its two measured times
    (factor at least 1: the codec model is never trusted to be pessimistic; fixed at
    least 0).

    The factor scales the codec part alone. Scaling the whole model instead (until
    2026-12-02) carried the codec's slowdown on a busy CPU onto the link term: on 2
    emulated hosts x 2 ranks at 1 Gbit/s the int2 probe fitted a factor of 4, which
    modelled a 16 MiB int8 all-reduce at 252 ms against plain's 187 ms (measured: 65-90
    ms), and a DDP job under auto stayed plain where int8 was 1.2x faster.
    """
    corrections = {}
    for i, (algo, codec) in enumerate(probes):
        if codec.spec not in base.speeds:
            continue
        small, large = calibration.probe_sizes(algo)
        t_small, t_large = timed[2 * i], timed[2 * i + 1]
        family = calibration.probe_op(algo)
        link_small, codec_small = _raw(base, algo, codec, small, world, dtype, family)
        link_large, codec_large = _raw(base, algo, codec, large, world, dtype, family)
        rest_small, rest_large = t_small - link_small, t_large - link_large
        factor = 1.0
        if codec_large > codec_small:
            factor = max((rest_large - rest_small) / (codec_large - codec_small), 1.0)
        corrections[algo.name] = (max(rest_small - factor * codec_small, 0.0), factor)
    return dataclasses.replace(base, corrections=corrections)


def _plain_cost(family: str, size: int, world: int, table: Table) -> float:
    """Modelled seconds of the backend's own collective of ``size`` bytes per rank."""
    if family in ("all_reduce", "reduce"):
        return get_algorithm("direct").cost(size, world, table.reduce_link, CodecSpeed.plain())
    if family == "reduce_scatter" and table.backend != "gloo":  # one ring round of the input
        return table.reduce_link.seconds((world - 1) / world * size, world - 1)
    if family == "reduce_scatter":  # gloo all-reduces the whole input, then keeps its block
        return get_algorithm("direct").cost(size, world, table.reduce_link, CodecSpeed.plain())
    link = table.link_for(family)
    if family == "all_to_all":  # S of input, (N-1)/N of it to the others
        return link.seconds((world - 1) / world * size, world - 1)
    return link.seconds((world - 1) * size, world - 1)


def model(
    table: Table,
    family: str,
    dtype: torch.dtype,
    size: int,
    world: int,
    sum_like: bool,
    max_err: float,
    policy: Policy,
    overlapped: bool = False,
) -> tuple[tuple[Any, ...], Decision]:
    """Every option's modelled seconds and the decision: a pure function of its arguments.

    ``overlapped``: the call runs beside compute that needs the same cores (a DDP
    bucket on a CPU device, issued while backward goes on). The codec's work then is
    not hidden by the overlap: every second of it is a second the compute loses, so an
    option is weighed at its modelled seconds plus its codec seconds (``factor *
    codec``, `_raw`'s second part) once more. The modelled seconds recorded (and
    watched for drift) stay the call's own. Without it, DDP on loopback under auto
    compressed 32 MiB buckets with int8, modelled just under `PAYS` of plain, and its
    steps took 1.1-1.2x plain DDP's (``docs/auto.md``).

    Returns ``((codec, algorithm, modelled_s, plain_s, options), decision)``.
    """
    reduction = family in REDUCTIONS
    plain_s = _plain_cost(family, size, world, table)
    options: list[tuple[str, str | None, float]] = [("plain", None, plain_s)]
    best: tuple[float, Any, Any] | None = None
    forced = None if policy.algorithm == "auto" else policy.algorithm
    algos = _movers(family)
    if table.levels is not None and family in Hierarchical.families:
        algos = [*algos, get_algorithm("hierarchical")]
    for spec in sorted(table.speeds):
        codec = get_codec(spec)
        if codec.typical_rel_err is None or codec.typical_rel_err > max_err:
            continue
        if _ratio(codec, dtype, size) <= 1:
            continue  # a cast to the dtype it already has saves nothing
        for algo in algos:
            hier = isinstance(algo, Hierarchical)
            if reduction and algo.eligible(codec, sum_like) is not None:
                continue
            # A forced algorithm binds the reductions; ``hierarchical`` every family it runs.
            if (
                forced is not None
                and algo.name != forced
                and (reduction or forced == "hierarchical")
            ):
                continue
            # A broadcast takes transport's own probe (a broadcast); the other moving
            # ops the gather all-reduce's (one round of whole packets, decoded N times),
            # the closest probed shape; hierarchical's moves take its all-reduce's
            # correction (the same levels and steps).
            probed = algo.name if reduction or hier else "gather"
            if probed == "gather" and family == "broadcast" and "transport" in table.corrections:
                probed = "transport"
            fixed, factor = table.corrections.get(probed, (0, 0))
            if factor == 0:
                continue  # never timed on this group: not trusted
            link_s, codec_s = _raw(table, algo, codec, size, world, dtype, family)
            seconds = fixed + link_s + factor * codec_s
            options.append((spec, algo.name, seconds))
            weighed = seconds + factor * codec_s if overlapped else seconds
            if best is None or weighed < best[3]:
                best = (seconds, codec, algo.name, weighed)
    if best is None or best[3] > PAYS * plain_s:
        why = "no codec fits the error budget" if best is None else "no codec pays"
        reason = f"auto: plain ({why}; plain modelled {plain_s * 1e6:.0f} us)"
        return (None, None, plain_s, plain_s, tuple(options)), Decision(None, None, False, reason)
    seconds, codec, name, weighed = best
    ef = reduction and bool(policy.error_feedback)
    reason = (
        f"auto: {codec.spec} {name} modelled {seconds * 1e6:.0f} us, plain {plain_s * 1e6:.0f} us"
    )
    if overlapped:
        reason += f" (with its codec work on the compute's cores {weighed * 1e6:.0f} us)"
    choice = (codec.spec, name, seconds, plain_s, tuple(options))
    return choice, Decision(codec, name, ef, reason)


def pays_below(
    table: Table,
    dtype: torch.dtype,
    nbytes: int,
    world: int,
    max_err: float,
    policy: Policy,
    overlapped: bool = False,
) -> bool:
    """Whether a sum-like all-reduce of some size up to ``nbytes`` would compress.

    `model` of every size bucket from ``policy.min_bytes`` up to ``nbytes`` (nothing is
    recorded, nothing measured). `commpress.hooks.register` asks it with all of a
    model's gradients of one dtype, which no DDP bucket exceeds: when it says no, no
    bucket ever compresses.
    """
    size = bucket(max(policy.min_bytes, 1))
    while size <= bucket(nbytes):
        args = ("all_reduce", dtype, size, world, True, max_err, policy)
        if model(table, *args, overlapped=overlapped)[1].compressed:
            return True
        size *= 2
    return False


def decisions() -> list[Choice]:
    """What ``auto`` chose in this process, one `Choice` per key, oldest first."""
    with _lock:
        return list(_choices.values())


def recalibrations() -> list[Recalibration]:
    """Every drift check in this process that calibrated a group again, oldest first."""
    with _lock:
        return list(_recalibrations)


def tables() -> dict[tuple[str, str, torch.dtype], Table]:
    """The calibrated tables, by (group name, device kind, dtype)."""
    with _lock:
        return dict(_tables)


def reset() -> None:
    """Forget every table and decision (the next ``auto`` call of a group calibrates
    again). Call it on every rank at the same point, or the ranks calibrate apart."""
    with _lock:
        for watch in _watches.values():
            if watch.pending is not None:
                watch.pending()  # its all-reduce is in the group's order already
        _links.clear()
        _tables.clear()
        _decisions.clear()
        _choices.clear()
        _tracks.clear()
        _watches.clear()
        _recalibrations.clear()
