"""Checks of compressed collectives against plain ``torch.distributed``, for any codec.

A test body runs on every rank of a `commpress.testing.DistPool`, computes the
plain result on the same inputs, checks the compressed one against it on the
rank, and returns ``Report.result()``: the problems found (empty when all is
well) and digests of outputs that must be bit-identical on every rank;
`assert_reports` checks both in the test process.

Error bounds used for lossy codecs (``b(v)`` is ``codec.error_bound(v)``,
elementwise; ``x_i`` is rank ``i``'s input, ``S = sum_i x_i``, ``W`` the
number of ranks; ``eps = 2**-20 * sum_i |x_i|`` absorbs float32 summation
order and the division of AVG):

- lossless codecs: ``|out - S| <= eps``;
- ``gather``: each input is encoded once, the decoded inputs are summed:
  ``|out - S| <= sum_i b(x_i) + eps`` (AVG: divided by W);
- ``two_phase``: on chunk ``c`` (`chunk_bounds`), ``e1 = sum_i b(x_i[c])``
  from encoding the pieces, then the owner re-encodes the decoded sum
  ``S~`` with ``|S~| <= |S| + e1``: ``|out - S| <= e1 + b(|S[c]| + e1) +
  eps``. The block-absmax, cast and sign bounds grow with ``|v|``, so
  ``b(|S| + e1)`` bounds ``b(S~)``. A sparsifier's bound is not monotone
  (which elements are kept depends on the data), so for ``topk`` the
  re-encode term is ``|S[c]| + e1`` itself (a sparsifier's error is at most
  ``|v|``). For AVG: ``e1 / W`` and ``b(|S| / W + e1 / W)``;
- ``direct`` (fp16/bf16): each rank sends ``x_i / W`` cast (error
  ``b(x_i / W)``), the backend adds the ``W`` payloads in the wire dtype
  (``W - 1`` roundings, each at most ``b`` of a partial sum, and
  ``|partial| <= 1.01 * sum_i |x_i| / W``), and SUM multiplies by ``W``:
  ``|out - S| <= W * (sum_i b(x_i / W) + (W - 1) * b(1.01 sum_i |x_i| / W)) +
  eps`` (AVG: without the factor ``W``);
- transport ops encode each piece once: ``|out - x| <= b(x)`` on the piece
  as sent (flattened).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms.common import chunk_bounds
from ..codec import Codec
from ..registry import get_codec

__all__ = ["Report", "assert_reports", "reduce_bound", "piece_bound"]


class Report:
    """Problems found on one rank, and digests of outputs that must match across ranks."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.digests: dict[str, str] = {}

    @contextlib.contextmanager
    def case(self, name: str) -> Iterator[None]:
        """Record an exception raised inside the block as a problem of case ``name``."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - reported, not raised: keeps the pool alive
            self.problems.append(f"{name}: raised {type(exc).__name__}: {exc}")

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        if not ok:
            self.problems.append(f"{name}: {detail or 'check failed'}")

    def within(self, name: str, out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
        if out.shape != ref.shape or out.dtype != ref.dtype:
            self.problems.append(
                f"{name}: got {tuple(out.shape)} {out.dtype}, "
                f"expected {tuple(ref.shape)} {ref.dtype}"
            )
            return
        o, r = out.double().reshape(-1), ref.double().reshape(-1)
        b = bound.double().reshape(-1)
        err = (o - r).abs()
        bad = ~(err <= b * (1 + 1e-5) + 1e-12) & torch.isfinite(r)
        if bad.any():
            i = int(bad.nonzero()[0])
            self.problems.append(
                f"{name}: {int(bad.sum())} of {r.numel()} elements beyond the bound; e.g. [{i}]: "
                f"|{o[i].item():.6g} - {r[i].item():.6g}| = {err[i].item():.3g} > {b[i].item():.3g}"
            )

    def exact(self, name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
        if out.shape != ref.shape or out.dtype != ref.dtype or not torch.equal(out, ref):
            self.problems.append(f"{name}: not bit-identical to the expected tensor")

    def digest(self, name: str, t: torch.Tensor) -> None:
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self.digests[name] = hashlib.sha1(data).hexdigest()

    def result(self) -> tuple[list[str], dict[str, str]]:
        return self.problems, self.digests


def assert_reports(results: list[tuple[list[str], dict[str, str]]]) -> None:
    """No rank found a problem, and every digest is the same on every rank."""
    problems = [f"rank {r}: {p}" for r, (probs, _) in enumerate(results) for p in probs]
    for key, value in results[0][1].items():
        others = [res[1].get(key) for res in results[1:]]
        if any(o != value for o in others):
            problems.append(f"{key}: output differs between ranks")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])


def _b(codec: Codec, v: torch.Tensor) -> torch.Tensor:
    # In the tensor's own dtype: a codec's bound includes rounding its decode to that dtype.
    return codec.error_bound(v.reshape(-1)).double()


def _b_reencode(codec: Codec, magnitude: torch.Tensor) -> torch.Tensor:
    first = getattr(codec, "stages", (codec,))[0]
    if first.codec_id in ("topk", "randomk"):
        return magnitude.double()
    return _b(codec, magnitude)


def reduce_bound(
    codec: Codec | None, algorithm: str, xs: list[torch.Tensor], op: Any, world: int
) -> torch.Tensor:
    """Elementwise float64 bound on ``|compressed reduction - exact reduction|``.

    Args:
        codec: the codec of the call (None: uncompressed).
        algorithm: ``"gather"``, ``"direct"`` or ``"two_phase"`` (what the policy chose).
        xs: every rank's input, in rank order.
        op: ``ReduceOp.SUM`` or ``ReduceOp.AVG``.
        world: the number of ranks.
    """
    flat = [x.reshape(-1).double() for x in xs]
    total_abs = sum(f.abs() for f in flat)
    eps = total_abs * 2.0**-20 + 1e-30
    if codec is None or codec.lossless:
        return eps
    avg = op == dist.ReduceOp.AVG
    if algorithm == "gather":
        e = sum(_b(codec, x) for x in xs)
        return (e / world if avg else e) + eps
    if algorithm == "direct":
        e = sum(_b(codec, x.reshape(-1).float() / world) for x in xs)
        e = e + (world - 1) * _b(codec, (1.01 * total_abs / world).float())
        return (e if avg else e * world) + eps
    assert algorithm == "two_phase", algorithm
    s = sum(flat)
    out = torch.empty_like(s)
    for a, b in chunk_bounds(s.numel(), world):
        e1 = sum(_b(codec, x.reshape(-1)[a:b]) for x in xs)
        mag = s[a:b].abs() + e1
        if avg:
            e1, mag = e1 / world, mag / world
        out[a:b] = e1 + _b_reencode(codec, mag.float())
    return out + eps


def piece_bound(spec: str, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise float64 bound of a transport op on the piece ``ref`` as sent."""
    codec = get_codec(spec)
    if codec.lossless:
        return torch.zeros(ref.shape, dtype=torch.float64)
    return _b(codec, ref).view(ref.shape)


def override_tables(group_name: str | None = None, **fields: Any) -> None:
    """Replace ``fields`` of this rank's calibrated ``auto`` tables (those of group
    ``group_name``, or all) and forget the decisions made from them.

    For a test that must not depend on timing: it calibrates as usual, then decides
    on a link (or codec speeds, corrections, levels) it states. Call it on every rank
    with the same fields, so that every rank decides alike. A ``gather_link`` given
    without ``broadcast_link`` or ``all_to_all_link`` is the link of every moving op.
    """
    from .. import auto

    if "gather_link" in fields:
        fields.setdefault("broadcast_link", None)
        fields.setdefault("all_to_all_link", None)

    for key, table in auto.tables().items():
        if group_name is None or key[0] == group_name:
            auto._tables[key] = dataclasses.replace(table, **fields)
    auto._decisions.clear()
    auto._choices.clear()
