"""``powersgd``: rank-r low-rank approximation (Vogels et al., NeurIPS 2019).

PowerSGD is an all-reduce *algorithm* (`commpress.algorithms.powersgd`): it
needs two rounds of communication per step, a warm-started factor kept across
steps and error feedback. This module holds the pieces that need no
communication: the codec config (what the spec string ``"powersgd:rank=4"``
names), the matrix view of a tensor, the orthogonalization, and a *local*
codec used when somebody calls ``encode``/``decode`` directly or sends a
tensor with a transport op (broadcast, all-gather, send/recv).

The local codec
---------------
A tensor is viewed as a matrix ``M`` of shape ``(m, n)``:

- 2-D tensors as they are;
- tensors of more dimensions as ``(shape[0], -1)`` (a conv weight
  ``(out, in, kh, kw)`` becomes ``(out, in*kh*kw)``);
- 1-D tensors as a near-square matrix, ``n = ceil(sqrt(numel))``,
  ``m = ceil(numel / n)``, with the last row padded with zeros.

From a random ``Q`` (``(n, rank)``, drawn from a generator seeded with
``seed``, so every process makes the same one) it runs two power iterations
(``P = orth(M Q)``, ``Q = M^T P``) and sends ``(P, Q)`` as float32:
``(m + n) * rank * 4`` bytes. ``decode`` returns ``P Q^T`` cut to the
original elements -- the projection of ``M`` onto the ``rank``-dimensional
column space found by the iterations. A compressed tensor whose matrix view
has rank <= ``rank`` comes back exact to float32 rounding.

A tensor is sent raw (one section: the tensor itself, any floating dtype,
lossless) when it is 0-d or empty, when ``rank >= min(m, n)``, or when its
*compression ratio* -- original bytes / ``(m + n) * rank * 4`` -- is below
``min_compression``. Small tensors and most biases go raw.

Error: there is no elementwise bound -- one element of a random matrix can
be off by more than its own magnitude -- so ``error_bound`` returns +inf.
What to look at is the relative Frobenius error
``||decode(encode(M)) - M||_F / ||M||_F``, which is 0 for matrices of rank
<= ``rank`` and ``sqrt(sum of the dropped squared singular values) /
||M||_F`` at best otherwise. In training, error feedback (the algorithm
keeps it) makes up for what one step drops.

Size: ``encoded_nbytes(numel, dtype)`` returns None, because the size
depends on the shape, not only on the element count (a ``(64, 4096)`` and a
``(512, 512)`` tensor have the same ``numel`` but different ``m + n``).
`PowerSGD.payload_nbytes` gives the exact size for a shape, and a receiver
that knows the shape can use it.

NaN and Inf: a non-finite element anywhere in a tensor that is compressed
makes every element of its decoded copy NaN (the factors of a matrix that
holds a NaN carry no information); raw tensors keep them where they are.

Orthogonalization (``orthogonalize=``):

- ``"qr"`` (default): Householder QR (``torch.linalg.qr``). Orthonormal to
  rounding even when ``M Q`` is rank-deficient or zero (then the extra
  columns are arbitrary orthonormal directions, which the projection does
  not mind). Best on CPU.
- ``"gram_schmidt"``: Gram-Schmidt with a second orthogonalization pass per
  column ("twice is enough"); a column that is (numerically) in the span of
  the ones before it, or zero, becomes zero instead of NaN or amplified
  noise. Only elementwise and matrix-vector ops, so it suits GPUs, where
  small QRs are slow.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..codec import Codec, Packet, PacketMeta, check_choice, check_range
from ..errors import WireError
from ..registry import register_codec

__all__ = ["PowerSGD", "orthogonalize_", "seeded_normal", "ORTHOGONALIZE_METHODS"]

ORTHOGONALIZE_METHODS: tuple[str, ...] = ("qr", "gram_schmidt")

#: Power iterations of the stateless local codec. The all-reduce algorithm does
#: one per step and relies on warm start; a codec has no previous step, and a
#: second iteration costs nothing on the wire while it brings ``P`` much closer
#: to the leading singular vectors of data that is not exactly low-rank.
CODEC_POWER_ITERATIONS = 2

#: Gram-Schmidt drops a column whose remainder, after the previous columns are
#: projected out, is below this fraction of its norm: it is rounding noise.
_GS_DROP = 1e-5


@register_codec
@dataclass(frozen=True, repr=False)
class PowerSGD(Codec):
    """Rank-r low-rank approximation; all-reduce runs the PowerSGD algorithm.

    Args:
        rank: columns of the factors ``P`` (``(m, rank)``) and ``Q``
            (``(n, rank)``), 1..1024. Higher: smaller error, more bytes; 1-4
            is the usual range for gradients (Vogels et al. report rank 2-4
            matching SGD on ResNet and LSTM language models).
        min_compression: tensors whose compression ratio (original bytes /
            factor bytes) would be below this go uncompressed; >= 1. Raise it
            to keep more mid-sized layers exact.
        warm_start: the all-reduce reuses last step's ``Q`` per key instead of
            a fresh random one; one power iteration per step then converges
            like many. Turn off only to study the method.
        orthogonalize: ``"qr"`` or ``"gram_schmidt"`` (see the module
            docstring).
        seed: seeds the random initial ``Q``; every rank must use the same.

    Example::

        >>> import torch, commpress
        >>> c = commpress.get_codec("powersgd:rank=2")
        >>> m = torch.randn(64, 2) @ torch.randn(2, 48)      # rank 2
        >>> err = (c.roundtrip(m) - m).norm() / m.norm()
        >>> bool(err < 1e-5)
        True
    """

    codec_id: ClassVar[str] = "powersgd"
    algorithm: ClassVar[str | None] = "powersgd"
    wants_error_feedback: ClassVar[bool] = True

    rank: int = 4
    min_compression: float = 2.0
    warm_start: bool = True
    orthogonalize: str = "qr"
    seed: int = 0

    def __post_init__(self) -> None:
        check_range(self.codec_id, "rank", self.rank, 1, 1024, integer=True)
        check_range(self.codec_id, "min_compression", self.min_compression, 1.0, 1e9)
        check_choice(self.codec_id, "warm_start", self.warm_start, (True, False))
        check_choice(self.codec_id, "orthogonalize", self.orthogonalize, ORTHOGONALIZE_METHODS)
        check_range(self.codec_id, "seed", self.seed, 0, 2**63 - 1, integer=True)

    # ------------------------------------------------------------ geometry
    @staticmethod
    def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
        """The ``(m, n)`` matrix view of a tensor of ``shape``; None for 0-d or empty tensors.

        1-D tensors get the near-square view (``m * n >= numel``, zero padded);
        the all-reduce algorithm never compresses 1-D tensors and does not use it.
        """
        shape = tuple(shape)
        numel = math.prod(shape)
        if len(shape) == 0 or numel == 0:
            return None
        if len(shape) == 1:
            n = math.isqrt(numel - 1) + 1  # ceil(sqrt(numel))
            return (-(-numel // n), n)
        return (shape[0], numel // shape[0])

    def compresses(self, shape: Sequence[int], dtype: torch.dtype) -> bool:
        """Whether a tensor of ``shape`` and ``dtype`` is sent as factors (else raw)."""
        view = self.matrix_shape(shape)
        if view is None or self.rank >= min(view):
            return False
        m, n = view
        original = math.prod(tuple(shape)) * _itemsize(dtype)
        return original >= self.min_compression * (m + n) * self.rank * 4

    def payload_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Exact payload bytes of ``encode`` for a tensor of ``shape`` and ``dtype``."""
        if self.compresses(shape, dtype):
            m, n = self.matrix_shape(shape)  # type: ignore[misc]
            return (m + n) * self.rank * 4
        return math.prod(tuple(shape)) * _itemsize(dtype)

    # --------------------------------------------------------- capabilities
    def encoded_nbytes(self, numel: int, dtype: torch.dtype) -> int | None:
        """None: the size depends on the shape; see `payload_nbytes`."""
        return None

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """+inf everywhere: a low-rank approximation has no elementwise bound.

        Judge it by the relative Frobenius error instead (module docstring).
        """
        return torch.full(x.shape, math.inf, dtype=torch.float32, device=x.device)

    # -------------------------------------------------------------- encoding
    def encode(self, tensor: torch.Tensor) -> Packet:
        """Encode with the matrix view of ``tensor``'s own shape (see the module docstring)."""
        self.check_tensor(tensor)
        flat = tensor.detach().reshape(-1)
        payload = self._encode_view(flat, tuple(tensor.shape))
        meta = PacketMeta(torch.Size(tensor.shape), tensor.dtype, self.spec, self.config_hash)
        return Packet(payload, meta)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Reached with a flat tensor only from a chain: the 1-D (near-square) view.
        return self._encode_view(x, tuple(x.shape))

    def _encode_view(self, flat: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        if not self.compresses(shape, flat.dtype):
            return (flat.contiguous(),)
        m, n = self.matrix_shape(shape)  # type: ignore[misc]
        mat = torch.zeros(m * n, dtype=torch.float32, device=flat.device)
        mat[: flat.numel()] = flat
        mat = mat.view(m, n)
        if not bool(torch.isfinite(mat).all()):
            nan = math.nan
            return (
                torch.full((m * self.rank,), nan, device=flat.device),
                torch.full((n * self.rank,), nan, device=flat.device),
            )
        q = seeded_normal((n, self.rank), self.seed, device=flat.device)
        for _ in range(CODEC_POWER_ITERATIONS):
            p = orthogonalize_(mat @ q, self.orthogonalize)
            q = mat.T @ p
        return (p.reshape(-1), q.reshape(-1))

    def _decode(
        self, payload: tuple[torch.Tensor, ...], numel: int, dtype: torch.dtype
    ) -> torch.Tensor:
        if len(payload) == 1:
            raw = payload[0]
            if raw.numel() != numel or raw.dtype != dtype:
                raise WireError(
                    f"{self.spec}: raw section holds {raw.numel()} {raw.dtype} elements, "
                    f"expected {numel} {dtype}"
                )
            return raw
        if len(payload) != 2 or any(s.dtype != torch.float32 for s in payload):
            raise WireError(
                f"{self.spec}: expected 1 raw section or 2 float32 factor sections, got "
                f"{[(s.dtype, s.numel()) for s in payload]}"
            )
        p, q = payload
        r = self.rank
        m, n = p.numel() // r, q.numel() // r
        # A compressed tensor has m*n == numel (2-D and up) or a zero-padded last
        # row (1-D); anything else is a corrupted or foreign packet.
        if p.numel() % r or q.numel() % r or not (0 <= m * n - numel < max(n, 1)) or numel == 0:
            raise WireError(
                f"{self.spec}: factor sections of {p.numel()} and {q.numel()} elements do not "
                f"make a rank-{r} matrix of {numel} elements"
            )
        approx = p.view(m, r) @ q.view(n, r).T
        return approx.reshape(-1)[:numel].to(dtype)


def orthogonalize_(p: torch.Tensor, method: str = "qr") -> torch.Tensor:
    """Make the columns of the float32 matrix ``p`` (``(m, r)``, ``m >= r``) orthonormal, in place.

    Deterministic: the same input gives the same bits (same torch build and thread
    count), which is what keeps the all-reduce bit-identical across ranks. Never
    produces NaN from finite input, including zero and rank-deficient ``p``.
    Returns ``p``.
    """
    if method == "qr":
        p.copy_(torch.linalg.qr(p, mode="reduced").Q)
        return p
    if method != "gram_schmidt":
        raise ValueError(f"orthogonalize={method!r}; choose one of {list(ORTHOGONALIZE_METHODS)}")
    for i in range(p.shape[1]):
        col = p[:, i]
        start = torch.linalg.vector_norm(col)
        if i:
            prev = p[:, :i]
            for _ in range(2):
                col.sub_(prev @ (prev.T @ col))
        left = torch.linalg.vector_norm(col)
        # torch.where, not an ``if``: no host sync, and a zero column stays zero.
        keep = left > start * _GS_DROP
        col.mul_(torch.where(keep, 1.0 / torch.where(keep, left, 1.0), 0.0))
    return p


def seeded_normal(
    shape: tuple[int, int], seed: int, salt: str = "", device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A float32 standard-normal matrix that every process draws identically.

    Drawn on the CPU from a generator seeded with a hash of ``(seed, salt)`` and
    then moved to ``device``, so the values do not depend on the device type.
    """
    digest = hashlib.blake2b(f"{seed}|{salt}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
