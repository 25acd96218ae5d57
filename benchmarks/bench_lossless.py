"""Lossless back ends side by side: encode/decode GB/s and ratio on the same data.

Samples (64 MiB each by default, built once, every option sees the same bytes):

- ``f32 randn`` / ``bf16 randn`` -- ``torch.randn * 1e-3``, a dense gradient;
- ``f32 sparse`` / ``bf16 sparse`` -- an embedding-like gradient: rows of 1024
  elements, 90% of the rows zero, the rest ``randn * 1e-3``;
- ``i64 ids`` -- ``torch.randint(0, 50_000)``, token or row indices.

Options: the codec before this change (numpy byte planes, then ``lz4.block`` or
``zstandard`` level 3, also with zstandard's 2-thread compressor; rebuilt here
without its one extra copy on decode, so a little faster than it was), ``blosc2``
(byte shuffle or bitshuffle, lz4 or zstd, 1 and 2 threads, the library's own
block size and split mode), ``numcodecs`` (``Blosc``, and ``Shuffle`` + ``Zstd``;
not a commpress dependency, its rows are left out unless it is installed), and
the shipped ``lz4``/``zstd`` codecs through ``Codec.encode``/``decode``.

Columns: ``enc``/``dec`` -- GB/s (10^9 input bytes per second, best of
``--repeats``), ``ratio`` -- input bytes / compressed bytes. Every decode is
checked bit-exact. Torch runs 1 thread. ``--clock cpu`` times CPU seconds
instead of elapsed ones (steadier on a shared machine; 2-thread options then
show what they cost, not how long they take).

Run::

    python benchmarks/bench_lossless.py                 # 64 MiB, best of 2
    python benchmarks/bench_lossless.py --mib 8 --repeats 1
    python benchmarks/bench_lossless.py --clock cpu --only commpress
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import blosc2
import lz4.block
import numpy as np
import torch
import zstandard

import commpress

try:
    import numcodecs
    import numcodecs.blosc
except ImportError:  # not a commpress dependency: its rows are left out
    numcodecs = None

_INT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def samples(mib: int) -> dict[str, torch.Tensor]:
    """The benchmark inputs, ``mib`` MiB each, from fixed seeds."""
    g = torch.Generator().manual_seed(0)
    n32 = (mib << 20) // 4
    dense = torch.randn(n32, generator=g) * 1e-3
    dense16 = (torch.randn(2 * n32, generator=g) * 1e-3).bfloat16()

    def sparse(n: int, dtype: torch.dtype) -> torch.Tensor:
        rows = torch.randn(n // 1024, 1024, generator=g) * 1e-3
        rows[torch.rand(rows.shape[0], generator=g) < 0.9] = 0
        return rows.reshape(-1).to(dtype)

    return {
        "f32 randn": dense,
        "bf16 randn": dense16,
        "f32 sparse": sparse(n32, torch.float32),
        "bf16 sparse": sparse(2 * n32, torch.bfloat16),
        "i64 ids": torch.randint(0, 50_000, ((mib << 20) // 8,), generator=g),
    }


def _typed(x: torch.Tensor) -> np.ndarray:
    """``x``'s bytes as a numpy array of unsigned ints of the same element size."""
    return x.view(torch.uint8).numpy().view(_INT_OF_SIZE[x.element_size()])


def _planes(x: torch.Tensor) -> np.ndarray:
    """The byte-plane shuffle of the codec before this change (one numpy copy per plane)."""
    k = x.element_size()
    src = x.view(torch.uint8).numpy().reshape(-1, k)
    dst = np.empty((k, x.numel()), dtype=np.uint8)
    for j in range(k):
        dst[j] = src[:, j]
    return dst.reshape(-1)


def _unplanes(planes: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((planes.size // k, k), dtype=np.uint8)
    src = planes.reshape(k, -1)
    for j in range(k):
        out[:, j] = src[j]
    return out.reshape(-1)


Encode = Callable[[torch.Tensor], Any]
Decode = Callable[[Any, torch.Tensor], np.ndarray]


def _old_lz4() -> tuple[Encode, Decode]:
    def enc(x):
        return lz4.block.compress(_planes(x), store_size=False)

    def dec(blob, x):
        n = x.numel() * x.element_size()
        raw = np.frombuffer(lz4.block.decompress(blob, uncompressed_size=n), np.uint8)
        return _unplanes(raw, x.element_size())

    return enc, dec


def _old_zstd(threads: int) -> tuple[Encode, Decode]:
    def enc(x):
        return zstandard.ZstdCompressor(level=3, threads=threads).compress(_planes(x))

    def dec(blob, x):
        n = x.numel() * x.element_size()
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=n)
        return _unplanes(np.frombuffer(raw, np.uint8), x.element_size())

    return enc, dec


def _blosc2(codec: Any, clevel: int, filt: Any, nthreads: int) -> tuple[Encode, Decode]:
    def enc(x):
        return blosc2.compress2(
            x.view(torch.uint8).numpy(),
            codec=codec,
            clevel=clevel,
            typesize=x.element_size(),
            filters=[filt],
            filters_meta=[0],
            nthreads=nthreads,
        )

    def dec(blob, x):
        out = np.empty(x.numel() * x.element_size(), np.uint8)
        blosc2.decompress2(blob, dst=out, nthreads=nthreads)
        return out

    return enc, dec


def _numcodecs_blosc(
    cname: str, clevel: int, shuffle: int, blocksize: int = 0
) -> tuple[Encode, Decode]:
    def enc(x):
        numcodecs.blosc.set_nthreads(1)
        codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=blocksize)
        return codec.encode(_typed(x))

    def dec(blob, x):
        out = np.empty(x.numel() * x.element_size(), np.uint8)
        numcodecs.Blosc().decode(blob, out=out)
        return out

    return enc, dec


def _numcodecs_shuffle_zstd() -> tuple[Encode, Decode]:
    def enc(x):
        shuffled = numcodecs.Shuffle(elementsize=x.element_size()).encode(_typed(x))
        return numcodecs.Zstd(level=3).encode(shuffled)

    def dec(blob, x):
        raw = numcodecs.Zstd().decode(blob)
        out = np.empty(x.numel() * x.element_size(), np.uint8)
        numcodecs.Shuffle(elementsize=x.element_size()).decode(raw, out=out)
        return out

    return enc, dec


def _shipped(spec: str) -> tuple[Encode, Decode]:
    codec = commpress.get_codec(spec)

    def dec(packet, x):
        return codec.decode(packet).view(torch.uint8).numpy()

    return codec.encode, dec


def options() -> dict[str, tuple[Encode, Decode]]:
    """Every back end under test, by the name the table prints."""
    B, F = blosc2.Codec, blosc2.Filter
    out = {
        "old lz4 (numpy planes + lz4.block)": _old_lz4(),
        "old zstd-3 (numpy planes + zstandard)": _old_zstd(threads=0),
        "numpy planes + zstandard-3 threads=2": _old_zstd(threads=2),
        "blosc2 shuffle+lz4 clevel=9 nt=1": _blosc2(B.LZ4, 9, F.SHUFFLE, 1),
        "blosc2 bitshuffle+lz4 clevel=9 nt=1": _blosc2(B.LZ4, 9, F.BITSHUFFLE, 1),
        "blosc2 bitshuffle+lz4 clevel=9 nt=2": _blosc2(B.LZ4, 9, F.BITSHUFFLE, 2),
        "blosc2 shuffle+zstd-3 nt=1": _blosc2(B.ZSTD, 2, F.SHUFFLE, 1),
        "blosc2 shuffle+zstd-3 nt=2": _blosc2(B.ZSTD, 2, F.SHUFFLE, 2),
        "blosc2 bitshuffle+zstd-3 nt=1": _blosc2(B.ZSTD, 2, F.BITSHUFFLE, 1),
    }
    if numcodecs is not None:
        shuffle, bitshuffle = numcodecs.Blosc.SHUFFLE, numcodecs.Blosc.BITSHUFFLE
        out["numcodecs Blosc shuffle+lz4 nt=1"] = _numcodecs_blosc("lz4", 9, shuffle)
        out["numcodecs Blosc bitshuffle+lz4 nt=1"] = _numcodecs_blosc("lz4", 9, bitshuffle)
        # c-blosc 1 does not split zstd blocks into planes; its default blocks (64 KiB for
        # fp32) lose much ratio, 1 MiB blocks were its best of 128 KiB..1 MiB.
        out["numcodecs Blosc shuffle+zstd-3 1M blocks"] = _numcodecs_blosc(
            "zstd", 2, shuffle, 1 << 20
        )
        out["numcodecs Shuffle + Zstd-3"] = _numcodecs_shuffle_zstd()
    out["commpress lz4 (this codec)"] = _shipped("lz4")
    out["commpress zstd (this codec)"] = _shipped("zstd")
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _best(fn: Callable[[], Any], repeats: int, clock: Callable[[], float]) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = clock()
        out = fn()
        best = min(best, clock() - start)
    return best, out


def _nbytes(blob: Any) -> int:
    if isinstance(blob, commpress.Packet):
        return blob.nbytes
    return memoryview(blob).nbytes


def measure(
    mib: int = 64, repeats: int = 2, only: str = "", clock: str = "wall"
) -> list[dict[str, Any]]:
    """One row per (sample, option): ``enc_gbps``, ``dec_gbps``, ``ratio``."""
    torch.set_num_threads(1)
    tick = CLOCKS[clock]
    rows = []
    opts = {k: v for k, v in options().items() if only in k}
    for sample, x in samples(mib).items():
        nbytes = x.numel() * x.element_size()
        want = x.view(torch.uint8).numpy()
        for name, (enc, dec) in opts.items():
            t_enc, blob = _best(lambda enc=enc, x=x: enc(x), repeats, tick)
            t_dec, got = _best(lambda dec=dec, blob=blob, x=x: dec(blob, x), repeats, tick)
            if not np.array_equal(np.asarray(got).reshape(-1).view(np.uint8), want):
                raise AssertionError(f"{name} on {sample}: decode is not bit-exact")
            rows.append(
                {
                    "sample": sample,
                    "option": name,
                    "enc_gbps": nbytes / t_enc / 1e9,
                    "dec_gbps": nbytes / t_dec / 1e9,
                    "ratio": nbytes / _nbytes(blob),
                }
            )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table, samples as blocks of rows."""
    width = max(len(r["option"]) for r in rows)
    lines = [f"{'sample':<12} {'option':<{width}}  {'enc':>6} {'dec':>6} {'ratio':>8}"]
    last = None
    for r in rows:
        if r["sample"] != last and last is not None:
            lines.append("")
        last = r["sample"]
        lines.append(
            f"{r['sample']:<12} {r['option']:<{width}}  {r['enc_gbps']:6.2f} "
            f"{r['dec_gbps']:6.2f} {r['ratio']:8.4f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--mib", type=int, default=64, help="MiB per sample (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many (default 2)")
    p.add_argument("--only", default="", help="only options whose name contains this")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: CPU time of all the process's threads, "
        "steadier on a busy machine (a 2-thread option then shows its cost, not its latency)",
    )
    args = p.parse_args()
    start = time.perf_counter()
    print(format_rows(measure(args.mib, args.repeats, args.only, args.clock)))
    print(
        f"\n{args.mib} MiB per sample, best of {args.repeats}, {args.clock} clock, "
        f"{time.perf_counter() - start:.0f} s in all"
    )


if __name__ == "__main__":
    main()
