"""The measured figures behind ``codec="auto"``: link times per group, codec speeds per device.

Two kinds of figures, measured differently:

- **link times**, in-band on the group, the first time an ``auto`` call on that
  group needs them: seconds (`_timed`) of a backend ``all_reduce``,
  ``all_gather``, ``broadcast`` and ``all_to_all`` of `LINK_SIZES` bytes per
  rank and of a 16-byte ``all_gather`` (what a compressed call's descriptor
  exchange costs). Every
  rank of the group takes part at the same call: the first ``auto`` call on a
  group is the same call on every rank (program order).
- **codec times**: median seconds of one encode and one decode of
  `CODEC_SIZES` bytes, per candidate codec, dtype and device, measured once
  and kept on disk (`cache_path`: ``$COMMPRESS_CACHE_DIR`` or
  ``~/.cache/commpress``, one file per machine, device, thread count, torch and
  commpress version), so a restarted job reads them back.

Then `combine` all-reduces every time with ``MAX`` over the group: every rank
holds the identical `Table`, whether it read its codec times from disk or
measured them, and the slowest rank sets the pace (max of times = min of
speeds). `fit` turns the sizes of each figure into a fixed cost plus rates: for
the links ``alpha`` and two bandwidths (below and above the middle size, a
`Link` bent there) of the ring all-reduce, the all-gather, the broadcast and
the all-to-all models (``docs/auto.md``), for the codecs ``t(S) = t0 + S/rate``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .algorithms import Algorithm, Link, chunked, transport
from .algorithms.comm import Comm
from .cli_codecs import measure_codec
from .codec import Codec
from .engine import Engine
from .registry import get_codec, list_codecs

__all__ = [
    "CACHE_ENV",
    "LINK_SIZES",
    "LEVEL_SIZES",
    "LINK_LARGE",
    "ALGORITHM_SIZES",
    "TRANSPORT_SIZES",
    "probe_op",
    "probe_sizes",
    "CODEC_SIZES",
    "Speed",
    "Table",
    "candidates",
    "cache_path",
    "codec_times",
    "link_times",
    "algorithm_times",
    "level_times",
    "combine",
    "fit",
    "fit_levels",
    "stats",
]

#: Environment variable naming the directory of the codec-speed cache.
CACHE_ENV = "COMMPRESS_CACHE_DIR"
#: Bytes per rank of the three timed link transfers: the fit is a line through the first
#: two and another through the last two (`Link.knee_bytes`). The middle one is where the
#: smallest calls that can compress are (64 KiB): a shaped loopback's token bucket lets
#: them through at memory speed, so the line from 4 KiB to 4 MiB modelled a 64 KiB plain
#: all-reduce at 100 Mbit/s at 10x its time, and auto compressed it at 3-9x plain.
LINK_SIZES = (4 << 10, 64 << 10, 4 << 20)
#: The fourth link size where the link is fast (`link_times`): a 16 MiB all-reduce on
#: loopback took 1.5-2x what the line through 64 KiB and 4 MiB said (caches, then
#: memory), so plain was modelled faster than it is next to the codecs' 16 MiB probes.
#: It bends the line a second time (`Link.large_knee_bytes`): until 2026-12-04 it
#: replaced the 4 MiB figure, and the line from 64 KiB to 16 MiB put a 512 KiB-a-rank
#: all-gather (16 MiB: 10x the time of 4 MiB on gloo) at twice its time, where auto
#: chose int8 transport at 2.4-2.7x plain's.
LINK_LARGE = 16 << 20
#: The largest `LINK_SIZES` all-reduce at most this long (seconds) takes `LINK_LARGE`
#: too (each op once more: about 0.5 s more calibration at most); a 1 Gbit/s link (70
#: ms at 4 MiB) does not.
LINK_LARGE_IF_S = 0.01
#: Bytes per rank of the two timed transfers of each level of a two-level group.
LEVEL_SIZES = (4 << 10, 4 << 20)
#: Bytes per rank of the two timed compressed all-reduces of each algorithm. The large
#: one spans two of the engine's default 8 MiB chunks, so the chunked driver's overlap
#: (encode chunk k+1 while chunk k travels) is in the fit: with a 4 MiB probe (one
#: chunk) auto preferred gather to two_phase for 64 MiB on 2 ranks at 1 Gbit/s, where
#: a DDP step took 391 ms with gather and 334 ms with two_phase.
ALGORITHM_SIZES = (64 << 10, 16 << 20)
#: Bytes of the two timed compressed broadcasts of the ``transport`` probe. The small
#: one is past the size whose packet rides with the descriptor (one round, not two):
#: fitted through 64 KiB, the line put a 1 MiB int8 broadcast at 10 Gbit/s at 0.73 ms
#: against plain's 0.87 (measured: 1.2-1.5 ms and 0.45-0.6).
TRANSPORT_SIZES = (1 << 20, 16 << 20)


def probe_op(algo: Algorithm) -> str:
    """The op an algorithm's probe runs (`algorithm_times`): ``transport``'s is a
    broadcast, every other one an all-reduce."""
    return "broadcast" if algo.name == "transport" else "all_reduce"


def probe_sizes(algo: Algorithm) -> tuple[int, int]:
    """The two sizes an algorithm's probe is timed at (`algorithm_times`)."""
    return TRANSPORT_SIZES if probe_op(algo) == "broadcast" else ALGORITHM_SIZES


#: Bytes of the two timed codec runs. The large one is where the calls that can pay are:
#: past the caches, at memory speed. At 1 MiB (until 2026-12-03) fp16 ran 16-28 GB/s, at
#: 64 MiB 12-13 (int8 about the same at both), and auto chose fp16 two_phase for 16-64
#: MiB all-reduces on loopback that took 1.5x plain.
CODEC_SIZES = (16 << 10, 16 << 20)
#: Timed runs of a figure under 1 MiB (after one warm-up); the fastest counts (`_timed`).
REPEAT = 9
#: Timed runs of a figure of 1 MiB or more: a large transfer or codec run varies less
#: than a small one, and these are most of calibration's time (the test suite, which
#: calibrates afresh many times, took 1140 s on a clean clone with 5, 985 s with 3).
REPEAT_LARGE = 3
_LARGE = 1 << 20


def _repeats(nbytes: int) -> int:
    """Timed runs of a figure of ``nbytes``: `REPEAT_LARGE` from 1 MiB, else `REPEAT`."""
    return REPEAT_LARGE if nbytes >= _LARGE else REPEAT


#: Bytes of the descriptor-sized all-gather.
DESCRIPTOR_BYTES = 16
_CODEC_FIGURES = 4  # encode x2, decode x2
# torch 2.13 renamed it (the old name warns); use whichever exists.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: What this process measured (tests read it: a cache hit measures nothing).
stats = {
    "codec_measurements": 0,
    "link_measurements": 0,
    "algorithm_measurements": 0,
    "cache_reads": 0,
}


@dataclass(frozen=True)
class Speed:
    """One codec on one dtype and device: fixed seconds plus bytes per second, each way."""

    encode_s: float
    encode_Bps: float
    decode_s: float
    decode_Bps: float


@dataclass(frozen=True)
class Table:
    """Everything ``auto`` decides from; identical on every rank of the group.

    Attributes:
        reduce_link: alpha and bandwidth fitted to the ring all-reduce model.
        gather_link: alpha and bandwidth fitted to the all-gather model.
        descriptor_s: seconds of the descriptor exchange a compressed call adds.
        speeds: codec spec -> `Speed` (this dtype and device).
        corrections: algorithm name -> ``(fixed seconds, factor)``: a compressed call
            with it takes ``fixed + factor * modelled`` (fitted to `algorithm_times`
            by `commpress.auto`); an algorithm without one is never chosen.
        backend: the group's backend (``"gloo"``, ``"nccl"``, ...): gloo reduce-scatters
            by all-reducing the whole input, so its plain reduce-scatter is modelled so.
        levels: for a group on several hosts with several ranks each, the two levels
            (`level_times`, `fit_levels`): alpha and bandwidth across hosts, per rank
            while every rank of a host crosses at once, and ``local`` and the intra-host
            figures; None for one host or one rank per host (no hierarchical option).
        broadcast_link, all_to_all_link: fitted to the broadcast model (``N-1``
            messages of ``S``) and the all-to-all model (``N-1`` of ``S/N``); None:
            `gather_link` (`link_for`).
    """

    reduce_link: Link
    gather_link: Link
    descriptor_s: float
    speeds: dict[str, Speed]
    corrections: dict[str, tuple[float, float]] = field(default_factory=dict)
    backend: str = ""
    levels: Link | None = None
    broadcast_link: Link | None = None
    all_to_all_link: Link | None = None

    def link_for(self, family: str) -> Link:
        """The link figures a moving op of ``family`` crosses, plain or compressed.

        Broadcast and all-to-all have their own: on gloo and loopback (2 ranks,
        2026-12-04) a 4 MiB broadcast took 1.0 ms and an all-to-all 1.0 ms where an
        all-gather took 3.0 ms; modelled as all-gathers, a plain 1 MiB broadcast was
        put at 3x its time and auto chose int8 transport, which took 2.7-2.9x plain's.
        """
        if family == "broadcast" and self.broadcast_link is not None:
            return self.broadcast_link
        if family == "all_to_all" and self.all_to_all_link is not None:
            return self.all_to_all_link
        return self.gather_link


def candidates(dtype: torch.dtype, device: torch.device) -> list[Codec]:
    """The codecs ``auto`` weighs for ``dtype`` on ``device``, sorted by spec.

    Default parameters; a declared ``typical_rel_err``; fixed size; no error feedback
    and no algorithm of their own; able to take the dtype and run on the device.
    """
    out = []
    for name in list_codecs():
        c = get_codec(name)
        if (
            c.typical_rel_err is None
            or c.wants_error_feedback
            or c.algorithm is not None
            or not c.fixed_size
            or not c.supports(dtype)
            or (c.devices is not None and device.type not in c.devices)
        ):
            continue
        out.append(c)
    return sorted(out, key=lambda c: c.spec)


# ---------------------------------------------------------------- codec times
def _version() -> str:
    try:
        return metadata.version("commpress")
    except metadata.PackageNotFoundError:
        return "unknown"


def _device_model(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_key(device: torch.device) -> str:
    return (
        f"{socket.gethostname()}|{device.type}|{_device_model(device)}|"
        f"threads={torch.get_num_threads()}|torch {torch.__version__}|commpress {_version()}|"
        f"sizes={','.join(map(str, CODEC_SIZES))}"
    )


def cache_path(device: torch.device) -> Path:
    """The codec-speed cache file of this machine, device kind, thread count and versions."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "commpress")
    digest = hashlib.blake2b(_machine_key(device).encode(), digest_size=8).hexdigest()
    return Path(root) / f"codec-speeds-{digest}.json"


def _read_cache(path: Path, key: str) -> dict[str, list[float]]:
    """The cached times, or nothing when the file is missing, unreadable or not ours."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key:
        return {}
    times = data.get("times")
    if not isinstance(times, dict):
        return {}
    return {
        k: [float(x) for x in v]
        for k, v in times.items()
        if isinstance(v, list)
        and len(v) == _CODEC_FIGURES
        and all(isinstance(x, (int, float)) and 0 < x < math.inf for x in v)
    }


def _write_cache(path: Path, key: str, times: dict[str, list[float]]) -> None:
    """Write atomically (a rename), so a concurrent reader sees the old file or the new."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "times": times}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


def _measure(codec: Codec, dtype: torch.dtype, device: torch.device) -> list[float]:
    """Encode and decode seconds at both `CODEC_SIZES`; +inf where the codec fails."""
    stats["codec_measurements"] += 1
    gen = torch.Generator(device=device).manual_seed(0)
    out: list[float] = []
    for nbytes in CODEC_SIZES:
        numel = nbytes // torch.empty((), dtype=dtype).element_size()
        x = torch.randn(numel, generator=gen, device=device).to(dtype)
        row = measure_codec(codec, x, _repeats(nbytes))
        if not row.encode_gbps or not row.decode_gbps:
            return [math.inf] * _CODEC_FIGURES
        out.append(nbytes / (row.encode_gbps * 1e9))
        out.append(nbytes / (row.decode_gbps * 1e9))
    return [out[0], out[2], out[1], out[3]]  # encode small, large; decode small, large


def codec_times(codecs: list[Codec], dtype: torch.dtype, device: torch.device) -> list[float]:
    """This rank's codec times, `_CODEC_FIGURES` per codec: read from the cache file,
    measured (and written back) where it has none."""
    path, key = cache_path(device), _machine_key(device)
    cached = _read_cache(path, key)
    if cached:
        stats["cache_reads"] += 1
    out: list[float] = []
    missing = False
    for c in codecs:
        entry = f"{c.spec}|{str(dtype).removeprefix('torch.')}"
        if entry not in cached:
            cached[entry] = _measure(c, dtype, device)
            missing = True
        out.extend(cached[entry])
    if missing:
        _write_cache(path, key, {k: v for k, v in cached.items() if math.inf not in v})
    return out


# ----------------------------------------------------------------- link times
def _timed(
    fn: Callable[[], Any], sync: Callable[[], Any], nbytes: int = 0, typical: bool = False
) -> float:
    """Seconds of ``fn`` after a warm-up: the fastest of `REPEAT` timed runs for ``nbytes``
    under 1 MiB (``typical``: their median), the median of `REPEAT_LARGE` from 1 MiB.

    Why the fastest for small figures: on the 2-core VM (2026-12-03) a 4 KiB gloo
    all-reduce took 0.36 to 7.5 ms from run to run, the slow ones in bursts longer than
    a figure's runs; the median of 5 (until then) put it at 1.5-3.8 ms in three
    calibrations in a row, against 0.7 ms median over a loop of 50 calls. From such a
    figure auto modelled a 64 KiB plain all-reduce at 7.9 ms and chose fp16 for it,
    which took 2.6x plain's time. Delays only add; the fastest run is the backend
    call's own cost.

    A compressed call's probe (`algorithm_times`) takes the median (``typical``): its
    handoffs to the engine and encode threads wait for a core on every call, and that
    wait is part of its cost, which the fastest run leaves out. With the fastest of 9
    for the probes too (2026-12-03), auto modelled a 64 KiB fp16 gather all-reduce at
    10 Gbit/s at 0.40 ms and chose it over plain's 0.39; it took 1.17 ms (its tenth
    percentile 0.72). A burst in the median errs toward plain, the safe side.
    """
    fn()  # warm-up: connections, buffers
    times = []
    for _ in range(_repeats(nbytes)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) if nbytes < _LARGE and not typical else statistics.median(times)


def _largest_first(sizes: tuple[int, ...], fn: Callable[[int], float]) -> list[float]:
    """``[fn(n) for n in sizes]``, called for the largest ``n`` first (`_link_pair`)."""
    got = {n: fn(n) for n in sorted(set(sizes), reverse=True)}
    return [got[n] for n in sizes]


def _link_pair(
    group: Any, device: torch.device, sizes: tuple[int, ...], gather_only: tuple[int, ...] = ()
) -> list[float]:
    """Seconds (`_timed`) of a backend all-reduce of each of ``sizes`` bytes per rank, then
    of an all-gather of each of ``sizes`` and ``gather_only``, then of a broadcast and an
    all-to-all of each of ``sizes`` (in that layout).

    A broadcast is timed as two, from the group's first rank and then from its last,
    halved: back to back from one root, a receiver's timer would start while the next
    message was already on its way (every other figure waits for every rank).

    Each op's largest size is timed first: a shaped link's token bucket (the emulated
    links: ``tc tbf``, 512 KiB of burst) that the large transfer emptied cannot then let
    the small ones through at memory speed, which the fastest of their runs would
    otherwise catch (at 100 Mbit/s a 64 KiB all-reduce took 10 ms once calls kept
    coming, and auto, modelling it at memory speed, kept it plain at 6.9x int8's time).
    """
    world = dist.get_world_size(group)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def reduce(nbytes: int) -> float:
        x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        return _timed(lambda: dist.all_reduce(x, group=group), sync, nbytes)

    def gather(nbytes: int) -> float:
        x = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        y = torch.empty(world * nbytes, dtype=torch.uint8, device=device)
        return _timed(lambda: _ALL_GATHER(y, x, group=group), sync, nbytes)

    def broadcast(nbytes: int) -> float:
        x = torch.zeros(nbytes, dtype=torch.uint8, device=device)

        def there_and_back() -> None:
            dist.broadcast(x, group=group, group_src=0)
            dist.broadcast(x, group=group, group_src=world - 1)

        return _timed(there_and_back, sync, nbytes) / 2

    def all_to_all(nbytes: int) -> float:
        x = torch.zeros(nbytes // world * world, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        return _timed(lambda: dist.all_to_all_single(y, x, group=group), sync, nbytes)

    return (
        _largest_first(sizes, reduce)
        + _largest_first((*sizes, *gather_only), gather)
        + _largest_first(sizes, broadcast)
        + _largest_first(sizes, all_to_all)
    )


def link_times(group: Any, device: torch.device) -> list[float]:
    """In-band, on every rank of ``group`` at once, combined over it (`combine`):
    seconds (`_timed`) of an all-reduce, an all-gather, a broadcast and an all-to-all of
    each of `LINK_SIZES` per rank, and of a descriptor-sized all-gather; then the large
    size's bytes (the last figure).

    Where the largest `LINK_SIZES` all-reduce took at most `LINK_LARGE_IF_S` (a fast
    link, where caches and memory bend the line above 4 MiB), each op is timed once more
    at `LINK_LARGE` bytes, which then is the large size (else the large figures repeat
    the 4 MiB ones). Layout: all-reduce x3, all-gather x3, descriptor, broadcast x3,
    all-to-all x3, the four large figures (the same order), large size.
    """
    stats["link_measurements"] += 1
    n = len(LINK_SIZES)
    out = combine(group, device, _link_pair(group, device, LINK_SIZES, (DESCRIPTOR_BYTES,)))
    large = LINK_SIZES[-1]
    last = [out[i] for i in (n - 1, 2 * n - 1, 3 * n, 4 * n)]  # each op's largest figure
    if out[n - 1] <= LINK_LARGE_IF_S:  # combined: every rank takes the same branch
        last = combine(group, device, _link_pair(group, device, (LINK_LARGE,)))
        large = LINK_LARGE
    return [*out, *last, float(large)]


def level_times(intra: Any, inter: Any, device: torch.device) -> list[float]:
    """In-band, on every rank of a two-level group: seconds (`_timed`) of an all-reduce of each
    of `LEVEL_SIZES` per rank on this rank's ``intra`` group (its host), then on its
    ``inter`` group (the ranks of its local index, one per host).

    Every host times its intra group at once, then every local index its inter group at
    once, so the inter figure is what one rank gets while its host's other ranks cross
    too: the per-rank share of the host's link, as in a hierarchical call.
    """
    stats["link_measurements"] += 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = []
    for group in (intra, inter):

        def reduce(nbytes: int, g: Any = group) -> float:
            x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
            return _timed(lambda: dist.all_reduce(x, group=g), sync, nbytes)

        out += _largest_first(LEVEL_SIZES, reduce)
    return out


def algorithm_times(
    group: Any,
    device: torch.device,
    dtype: torch.dtype,
    probes: list[tuple[Algorithm, Codec]],
    engine: Engine,
) -> list[float]:
    """In-band, on every rank of ``group``: seconds (`_timed`) of each probe's compressed
    all-reduce at both `ALGORITHM_SIZES` (`probe_sizes`), the way a call runs it: through
    the chunked driver (`commpress.algorithms.chunked`) with ``engine``'s chunk size and
    encode threads, descriptors included, the result written back into the input. A
    ``transport`` probe is a compressed broadcast from the group's first rank instead
    (`transport.broadcast`, descriptors included, decoded in place on every rank), at
    `TRANSPORT_SIZES`.

    What the codec and link models leave out (allocation, the engine, the encode
    threads competing with the transfers for the cores, Python, cache misses at size)
    shows up here; `fit` turns it into a fixed cost and a factor. Until 2026-12-03 the
    probe called the algorithm on the whole tensor, unchunked and without the encode
    thread: on 2 gloo ranks sharing 2 cores its 16 MiB int8 gather all-reduce was 2-3x
    faster than the call, and auto chose it where it took 4.5x plain.

    Called on the group's engine thread (calibration runs there, in issue order): the
    driver only hands encodes to the encode threads, never work to the group's queue.
    """
    stats["algorithm_measurements"] += 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator(device=device).manual_seed(rank)
    out = []

    def call(algo: Algorithm, comm: Comm, x: torch.Tensor) -> None:
        # SUM in place: the values grow by ``world`` a run, harmless over a few runs.
        result = chunked.all_reduce(algo, comm, x, dist.ReduceOp.SUM, engine)
        if result.data_ptr() != x.data_ptr():
            x.copy_(result)  # what the call does with a result in another dtype

    for algo, codec in probes:
        op = probe_op(algo)
        comm = Comm(op, group, rank, world, device, codec)
        for nbytes in probe_sizes(algo):
            numel = nbytes // torch.empty((), dtype=dtype).element_size()
            x = torch.randn(numel, generator=gen, device=device).to(dtype)
            if op == "broadcast":
                run = functools.partial(transport.broadcast, comm, x, 0)
            else:
                run = functools.partial(call, algo, comm, x)
            out.append(_timed(run, sync, nbytes, typical=True))
    return out


def combine(group: Any, device: torch.device, times: list[float]) -> list[float]:
    """Every rank's ``times`` reduced with MAX over ``group``: the same list on every rank.

    Every rank calls it with a list of the same length (same candidates, same figures).
    """
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu().tolist()


# ------------------------------------------------------------------------ fit
def _line(sizes: tuple[int, int], t: tuple[float, float], scale: float) -> tuple[float, float]:
    """``(fixed seconds, rate)`` of ``t = fixed + scale * size / rate`` through two points.

    A slope that noise made zero or negative gives the rate of the larger point alone.
    """
    (s0, s1), (t0, t1) = sizes, t
    if t1 > t0:
        rate = scale * (s1 - s0) / (t1 - t0)
    else:
        rate = scale * s1 / t1 if t1 > 0 else math.inf
    fixed = max(t0 - scale * s0 / rate, 0.0)
    return fixed, rate


def fit_levels(hosts: int, local: int, times: list[float]) -> Link:
    """The two-level `Link` from combined `level_times`: each level's ring all-reduce
    model (``2 (n-1) alpha + 2 (n-1)/n S / B`` on its ``n`` ranks) through its two points."""
    ring = 2 * (local - 1)
    fixed, intra_bw = _line(LEVEL_SIZES, (times[0], times[1]), ring / local)
    intra_alpha = max(fixed / ring, 1e-7)
    ring = 2 * (hosts - 1)
    fixed, inter_bw = _line(LEVEL_SIZES, (times[2], times[3]), ring / hosts)
    return Link(max(fixed / ring, 1e-7), inter_bw, local, intra_alpha, intra_bw)


def _bent(
    sizes: tuple[int, int, int, int], times: list[float], messages: int, per_message: float
) -> Link:
    """The `Link` through the ``times`` of four ``sizes``: ``messages`` messages of
    ``per_message * size`` bytes each, a line through the first two sizes (alpha and
    ``small_bandwidth_Bps`` up to the second size's message, `Link.knee_bytes`), one
    through the next two (``bandwidth_Bps`` beyond it) and, where the fourth size is
    larger than the third (a fast link, `link_times`), one through the last two (the
    third size's message is `Link.large_knee_bytes`, the middle line's rate
    ``mid_bandwidth_Bps``)."""
    scale = messages * per_message
    fixed, small_bw = _line(sizes[:2], (times[0], times[1]), scale)
    _, bw = _line(sizes[1:3], (times[1], times[2]), scale)
    knee = per_message * sizes[1]
    if sizes[3] <= sizes[2]:
        return Link(max(fixed / messages, 1e-7), bw, knee_bytes=knee, small_bandwidth_Bps=small_bw)
    _, large_bw = _line(sizes[2:], (times[2], times[3]), scale)
    return Link(
        max(fixed / messages, 1e-7),
        large_bw,
        knee_bytes=knee,
        small_bandwidth_Bps=small_bw,
        large_knee_bytes=per_message * sizes[2],
        mid_bandwidth_Bps=bw,
    )


def fit(world: int, link: list[float], codecs: list[Codec], codec: list[float]) -> Table:
    """The `Table` from combined figures (`link_times` and `codec_times` layouts)."""
    n = len(LINK_SIZES)
    sizes = (*LINK_SIZES, int(link[4 * n + 5]))
    large = link[4 * n + 1 : 4 * n + 5]

    def op(first: int, messages: int, per_message: float, i: int) -> Link:
        return _bent(sizes, [*link[first : first + n], large[i]], messages, per_message)

    reduce_link = op(0, 2 * (world - 1), 1 / world, 0)  # the ring all-reduce
    gather_link = op(n, world - 1, 1.0, 1)  # the all-gather
    broadcast_link = op(2 * n + 1, world - 1, 1.0, 2)
    all_to_all_link = op(3 * n + 1, world - 1, 1 / world, 3)
    speeds = {}
    for i, c in enumerate(codecs):
        figures = codec[_CODEC_FIGURES * i : _CODEC_FIGURES * (i + 1)]
        enc_small, enc_large, dec_small, dec_large = figures
        if math.inf in (enc_small, enc_large, dec_small, dec_large):
            continue
        enc_s, enc_bps = _line(CODEC_SIZES, (enc_small, enc_large), 1.0)
        dec_s, dec_bps = _line(CODEC_SIZES, (dec_small, dec_large), 1.0)
        speeds[c.spec] = Speed(enc_s, enc_bps, dec_s, dec_bps)
    return Table(
        reduce_link,
        gather_link,
        link[2 * n],
        speeds,
        broadcast_link=broadcast_link,
        all_to_all_link=all_to_all_link,
    )
