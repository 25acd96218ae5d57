"""Codec throughput and the link speed at which compression breaks even.

For a tensor of ``S`` bytes, a codec that runs at ``B_codec`` bytes/s
(``S / (encode + decode time)``) and shrinks data ``r`` times, over a link of
``B_link`` bytes/s:

- serial model (encode, then send, then decode):
  ``t = S/B_codec + S/(r*B_link)`` against ``S/B_link`` uncompressed, so
  compression wins while ``B_link < B_codec * (1 - 1/r)``;
- pipelined model (chunks overlap codec work and transfer):
  ``t = max(S/B_codec, S/(r*B_link))``, which wins while ``B_link < B_codec``
  (and ``r > 1``).

These are the break-even link speeds reported per codec, in Gbit/s. They are
a model, not a measurement of a collective: a two-phase all-reduce does more
codec work per byte (decode n chunks, sum, re-encode), which
`commpress.bench.collectives` measures end to end.

Example::

    from commpress.bench.breakeven import codec_rows
    for row in codec_rows(["int8", "int4"], nbytes=4 << 20):
        print(row["codec"], row["ratio"], row["break_even_serial_gbit"])
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["codec_rows", "predicted_speedup"]


def predicted_speedup(codec_gbps: float, ratio: float, link_gbit: float, pipelined: bool) -> float:
    """Uncompressed time over compressed time for one transfer, per the models above.

    Args:
        codec_gbps: codec throughput in GB/s (encode + decode, on uncompressed bytes).
        ratio: compression ratio (uncompressed / compressed bytes).
        link_gbit: link speed in Gbit/s.
        pipelined: use the overlapped model instead of the serial one.
    """
    link = link_gbit / 8
    codec_t, wire_t = 1 / codec_gbps, 1 / (ratio * link)
    return (1 / link) / (max(codec_t, wire_t) if pipelined else codec_t + wire_t)


def codec_rows(
    codecs: Iterable[str], nbytes: int = 64 << 20, repeats: int = 5, threads: int = 1
) -> list[dict[str, Any]]:
    """Time ``encode`` and ``decode`` of each codec on ``nbytes`` of float32 ``randn``.

    Runs on ``threads`` CPU threads (1, like each benchmark rank). Returns one
    row per codec: median encode/decode seconds, ``codec_GBps``, ``ratio``
    (input bytes over payload bytes), relative error, and the break-even link
    speeds of the serial and pipelined models (Gbit/s; None when ``ratio <= 1``).
    """
    import commpress

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(0))
        rows = []
        for spec in codecs:
            row: dict[str, Any] = {"codec": spec, "size": nbytes, "threads": threads}
            try:
                codec = commpress.get_codec(spec)
                enc, dec = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    packet = codec.encode(x)
                    t1 = time.perf_counter()
                    y = codec.decode(packet)
                    dec.append(time.perf_counter() - t1)
                    enc.append(t1 - t0)
            except Exception as exc:  # noqa: BLE001 - a codec that cannot run standalone is a row
                row["status"] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
                rows.append(row)
                continue
            t_enc, t_dec = statistics.median(enc), statistics.median(dec)
            ratio = nbytes / packet.nbytes
            codec_gbps = nbytes / (t_enc + t_dec) / 1e9
            row.update(
                status="ok",
                encode_GBps=nbytes / t_enc / 1e9,
                decode_GBps=nbytes / t_dec / 1e9,
                codec_GBps=codec_gbps,
                ratio=ratio,
                rel_err=(torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x)).item(),
                break_even_serial_gbit=8 * codec_gbps * (1 - 1 / ratio) if ratio > 1 else None,
                break_even_pipelined_gbit=8 * codec_gbps if ratio > 1 else None,
                model_speedup_1gbit_serial=predicted_speedup(codec_gbps, ratio, 1.0, False),
                model_speedup_1gbit_pipelined=predicted_speedup(codec_gbps, ratio, 1.0, True),
            )
            rows.append(row)
        return rows
    finally:
        torch.set_num_threads(saved)
