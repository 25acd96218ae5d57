"""Fast codec kernels, and the switch between them and the reference path.

Every lossy block codec has two implementations: the *reference* (plain torch
ops in ``commpress.codecs``: the definition, kept readable, device-agnostic)
and a *fast kernel* that must agree with it bit for bit (``sign``'s scale:
within one float32 ulp). ``tests/test_kernels.py`` runs both on the shared
checks' data and on hostile edge values and compares them.

Why numba on CPU
----------------
Measured on this project's 2-core Xeon VM (one thread, 64 MiB float32, in
one process, 2026-12-02), as multiples of ``dst.copy_(x)`` into a
preallocated buffer:

- the eager torch reference: int8 encode 0.10x, decode 0.18x (several full
  passes and full-size temporaries per call);
- ``torch.compile`` (inductor, C++): about 0.5x for an int8 quantizer, a
  compile of tens of seconds per codec, dtype and shape bucket on 2 cores,
  and it needs a C++ compiler at run time;
- numba (LLVM, from PyPI by name, no C compiler needed): int8 and int4
  encode at 1.0x, a first-call compile of about a second per kernel, cached
  on disk (``cache=True``) so later processes load it in milliseconds.

numba is a default dependency. Without it (or with
``COMMPRESS_KERNELS=reference``) the reference path runs, with one warning
when numba is missing.

First-call latency (measured 2026-12-02 on the same machine): with an empty
cache the first int8 encode of a process takes about 10 s (numba's import,
LLVM start-up and the compile) and compiling every kernel of every codec
about 20 s in all, once per machine and package location; with the cache
(``commpress/kernels/__pycache__``, or ``NUMBA_CACHE_DIR``) the first call
of a new process takes about 0.6 s (importing numba) and later ones none.
``import commpress`` never imports numba: the kernels load at the first
encode or decode on a CPU tensor. On CUDA the reference path runs today: torch's own
elementwise kernels (the GPU path is not measured here; see
``benchmarks/gpu_check.py``).

What the kernels cover: ``int8``/``int4``/``int2`` (round to nearest; the
``stochastic=1`` variant uses the reference), ``fp8``/``fp8_e5m2``,
``sign``, and ``bf16`` for float32 tensors on CPU. Inputs of other floating
dtypes are staged through a small float32 buffer (``STAGE`` elements, in
cache), never a full-size copy. ``fp16`` needs none: torch's cast into a
preallocated buffer already runs at 1.5x ``copy_`` (F16C instructions).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from ..codec import saturating_cast

__all__ = [
    "available",
    "reference_only",
    "usable",
    "quant_encode",
    "quant_decode",
    "fp8_encode",
    "fp8_decode",
    "sign_encode",
    "sign_decode",
    "bf16_encode",
    "bf16_decode",
    "STAGE",
]

#: Elements per float32 staging chunk for inputs and outputs that are not float32.
STAGE = 1 << 15

_lock = threading.Lock()
_module: ModuleType | None = None
_loaded = False
_forced_reference = 0


def _load() -> ModuleType | None:
    global _module, _loaded
    if _loaded:  # every encode and decode asks: no lock once the answer is known
        return _module
    with _lock:
        if _loaded:
            return _module
        _loaded = True
        if os.environ.get("COMMPRESS_KERNELS", "").strip().lower() == "reference":
            return None
        try:
            from . import cpu
        except ImportError as exc:  # numba missing or broken
            warnings.warn(
                f"commpress: fast CPU codec kernels are unavailable ({exc}); codecs run on "
                "the reference path, several times slower. Install numba "
                "(pip install numba) to enable them.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        _module = cpu
        return cpu


def available() -> bool:
    """Whether the fast CPU kernels can run in this process (numba importable, not disabled)."""
    return _load() is not None


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Run every codec on its reference path inside the block (process-wide; for tests)."""
    global _forced_reference
    with _lock:
        _forced_reference += 1
    try:
        yield
    finally:
        with _lock:
            _forced_reference -= 1


def usable(*tensors: torch.Tensor | None) -> bool:
    """True when the fast kernels can take these tensors (all on CPU, kernels loaded);
    None entries (an output not allocated yet) are ignored."""
    if _forced_reference or any(t is not None and t.device.type != "cpu" for t in tensors):
        return False
    return _load() is not None


def _kernels() -> ModuleType:
    # Callers checked `usable` first.
    k = _load()
    assert k is not None
    return k


def _np(t: torch.Tensor) -> Any:
    # A numpy view sharing the tensor's memory (1-D contiguous, no autograd).
    return t.detach().numpy()


def _stage_len(align: int) -> int:
    return max(align, STAGE - STAGE % align)


def _encode_staged(x: torch.Tensor, align: int, run: Any, roundtrip: bool = False) -> None:
    """Call ``run(x32, start, stop)`` on float32 pieces of flat ``x`` (aligned to ``align``)."""
    n = x.numel()
    if x.dtype == torch.float32:
        run(_np(x), 0, n)
        return
    if roundtrip:
        raise ValueError("roundtrip encoding writes back in place: float32 input only")
    step = _stage_len(align)
    buf = torch.empty(min(step, n), dtype=torch.float32)
    for a in range(0, n, step):
        b = min(a + step, n)
        piece = buf[: b - a]
        piece.copy_(x[a:b])
        run(_np(piece), a, b)


def _decode_staged(
    out: torch.Tensor, dtype: torch.dtype, accumulate: bool, align: int, run: Any
) -> None:
    """Call ``run(out32, start, stop, accumulate)`` to decode flat ``out`` in float32 pieces.

    ``dtype`` is the packet's dtype: a decoded value is rounded to it before it is
    written to (or added to) ``out``, exactly as ``out += decode(packet)`` would.
    """
    n = out.numel()
    if out.dtype == torch.float32 and dtype == torch.float32:
        run(_np(out), 0, n, accumulate)
        return
    step = _stage_len(align)
    buf = torch.empty(min(step, n), dtype=torch.float32)
    for a in range(0, n, step):
        b = min(a + step, n)
        piece = buf[: b - a]
        run(_np(piece), a, b, False)
        y = piece if dtype == torch.float32 else saturating_cast(piece, dtype)
        if accumulate:
            out[a:b].add_(y)
        else:
            out[a:b].copy_(y)


# ------------------------------------------------------------------ codecs
def quant_encode(
    x: torch.Tensor,
    bits: int,
    block: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
    roundtrip: bool = False,
) -> None:
    """Round-to-nearest block quantization of flat ``x`` into ``codes``/``scales``.

    ``roundtrip`` (float32 ``x`` only): also overwrite ``x`` with its decoded value.
    """
    k = _kernels()
    per = 8 // bits
    c, s = _np(codes), _np(scales)

    def run(x32: Any, a: int, b: int) -> None:
        k.quant_encode(x32, c[a // per :], s[a // block :], block, bits, roundtrip)

    _encode_staged(x, block, run, roundtrip)


def quant_decode(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block: int,
    out: torch.Tensor,
    dtype: torch.dtype,
    accumulate: bool,
) -> None:
    """Decode `quant_encode` output into flat ``out`` (written, or added to)."""
    k = _kernels()
    per = 8 // bits
    c, s = _np(codes), _np(scales)

    def run(o32: Any, a: int, b: int, acc: bool) -> None:
        k.quant_decode(c[a // per :], s[a // block :], o32, block, bits, acc)

    _decode_staged(out, dtype, accumulate, block, run)


def fp8_encode(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    fp8_max: float,
    block: int,
    pow2: bool,
    codes: torch.Tensor,
    scales: torch.Tensor,
    table: torch.Tensor,
    roundtrip: bool = False,
) -> None:
    """Block-scaled fp8 encode of flat ``x`` into ``codes`` (bit patterns) and ``scales``.

    ``table``: the float32 value of each code; ``roundtrip`` (float32 ``x`` only): also
    overwrite ``x`` with its decoded value.
    """
    k = _kernels()
    mbits, ebias = (3, 7) if fp8_dtype == torch.float8_e4m3fn else (2, 15)
    c, s, t, lim = _np(codes), _np(scales), _np(table), _np(_saturation_table(table))

    def run(x32: Any, a: int, b: int) -> None:
        k.fp8_encode(
            x32, c[a:], s[a // block :], block, fp8_max, mbits, ebias, pow2, t, lim, roundtrip
        )

    _encode_staged(x, block, run, roundtrip)


def fp8_decode(
    codes: torch.Tensor,
    scales: torch.Tensor,
    table: torch.Tensor,
    block: int,
    out: torch.Tensor,
    dtype: torch.dtype,
    accumulate: bool,
) -> None:
    """``table[code] * scale`` for every element into flat ``out`` (written, or added to)."""
    k = _kernels()
    c, s, t, lim = _np(codes), _np(scales), _np(table), _np(_saturation_table(table))

    def run(o32: Any, a: int, b: int, acc: bool) -> None:
        k.fp8_decode(c[a:], s[a // block :], t, lim, o32, block, acc)

    _decode_staged(out, dtype, accumulate, block, run)


def sign_encode(x: torch.Tensor, block: int, bits: torch.Tensor, scales: torch.Tensor) -> None:
    """Sign bits and float64-summed mean ``|x|`` per block of flat ``x``."""
    k = _kernels()
    bt, s = _np(bits), _np(scales)

    def run(x32: Any, a: int, b: int) -> None:
        k.sign_encode(x32, bt[a // 8 :], s[a // block :], block)

    _encode_staged(x, _lcm(block, 8), run)


def sign_decode(
    bits: torch.Tensor,
    scales: torch.Tensor,
    block: int,
    out: torch.Tensor,
    dtype: torch.dtype,
    accumulate: bool,
) -> None:
    """``+-scale`` per element into flat ``out`` (written, or added to)."""
    k = _kernels()
    bt, s = _np(bits), _np(scales)

    def run(o32: Any, a: int, b: int, acc: bool) -> None:
        k.sign_decode(bt[a // 8 :], s[a // block :], o32, block, acc)

    _decode_staged(out, dtype, accumulate, _lcm(block, 8), run)


def bf16_encode(x: torch.Tensor, out: torch.Tensor, roundtrip: bool = False) -> None:
    """float32 ``x`` -> bfloat16 ``out`` (round to nearest even, finite stays finite).

    ``roundtrip``: also overwrite ``x`` with the bfloat16 values.
    """
    k = _kernels()
    k.bf16_encode(_np(x), _np(out.view(torch.int16)).view("uint16"), roundtrip)


def bf16_decode(payload: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """bfloat16 ``payload`` -> float32 ``out`` (exact), or added to it."""
    k = _kernels()
    k.bf16_decode(_np(payload.view(torch.int16)).view("uint16"), _np(out), accumulate)


_SATURATION: dict[int, torch.Tensor] = {}


def _saturation_table(table: torch.Tensor) -> torch.Tensor:
    # What a code's product becomes past float32's range: +-max for finite codes, the
    # code's own value for +-Inf and NaN. Keyed by the table's identity (one per format).
    lim = _SATURATION.get(id(table))
    if lim is None:
        big = torch.finfo(torch.float32).max
        lim = torch.where(table.isfinite(), torch.sign(table) * big, table)
        _SATURATION[id(table)] = lim
    return lim


def _lcm(a: int, b: int) -> int:
    import math

    return a * b // math.gcd(a, b)
