"""The pipeline header: the fixed-size ``int64`` message before each activation transfer.

`commpress.pipeline` sends every activation (or gradient) as two messages on
the caller's tag: this header, uncompressed, then the payload through
`commpress.distributed` with the codec. The header carries what plain
``recv`` leaves to the caller, the shape and dtype, so a receiver can
allocate the tensor or refuse an ``out`` of another shape::

    word      field
    0         magic + pipeline header version
    1         dtype code of the tensor (``codec.DTYPE_CODES``)
    2         ndim (<= `MAX_NDIM`)
    3 .. 10   the dims, zero past ``ndim``

88 bytes in all. `PipelineHeader.from_tensor` checks every word before the
receiver allocates anything from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..codec import CODE_DTYPES, DTYPE_CODES
from ..errors import ConfigError, WireError
from .packet import MAX_NUMEL

__all__ = ["PipelineHeader", "PIPELINE_MAGIC", "PIPELINE_WORDS", "MAX_NDIM"]

PIPELINE_MAGIC = (0x434D5050 << 32) | 1  # "CMPP", pipeline header version 1
#: Most dimensions an activation may have (the header is fixed-size).
MAX_NDIM = 8
PIPELINE_WORDS = 3 + MAX_NDIM


@dataclass(frozen=True)
class PipelineHeader:
    """The shape and dtype of one activation transfer.

    Attributes:
        shape: the tensor's shape (at most `MAX_NDIM` dimensions).
        dtype: the tensor's dtype (one with a wire code).
    """

    shape: torch.Size
    dtype: torch.dtype

    @classmethod
    def for_tensor(cls, tensor: torch.Tensor) -> PipelineHeader:
        """The header announcing ``tensor``.

        Raises:
            ConfigError: more than `MAX_NDIM` dimensions, or a dtype without a wire code.
        """
        if tensor.dim() > MAX_NDIM:
            raise ConfigError(
                f"send_activation: tensors of up to {MAX_NDIM} dimensions are supported, got "
                f"{tensor.dim()}; reshape it first"
            )
        if tensor.dtype not in DTYPE_CODES:
            raise ConfigError(f"send_activation: dtype {tensor.dtype} has no wire code")
        return cls(shape=tensor.shape, dtype=tensor.dtype)

    @staticmethod
    def empty(device: torch.device) -> torch.Tensor:
        """A receive buffer for one header."""
        return torch.empty(PIPELINE_WORDS, dtype=torch.int64, device=device)

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        """The `PIPELINE_WORDS` ``int64`` words of the header."""
        dims = list(self.shape) + [0] * (MAX_NDIM - len(self.shape))
        words = [PIPELINE_MAGIC, DTYPE_CODES[self.dtype], len(self.shape), *dims]
        return torch.tensor(words, dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, buf: torch.Tensor) -> PipelineHeader:
        """Parse a received header.

        Raises:
            WireError: not `PIPELINE_WORDS` ``int64`` words, not a pipeline header (the
                peer did not use ``send_activation`` with this tag, or another commpress
                version), or a field out of range.
        """
        if buf.dtype != torch.int64 or buf.numel() != PIPELINE_WORDS:
            raise WireError(
                f"pipeline header must be {PIPELINE_WORDS} int64 words, got {buf.numel()} "
                f"{buf.dtype}"
            )
        magic, code, ndim, *dims = buf.tolist()
        if magic != PIPELINE_MAGIC:
            raise WireError(
                "not a commpress pipeline header; was the peer using send_activation with "
                "the same tag and the same commpress version?"
            )
        if code not in CODE_DTYPES or not 0 <= ndim <= MAX_NDIM:
            raise WireError(f"pipeline header is malformed: dtype code {code}, ndim {ndim}")
        shape, rest = dims[:ndim], dims[ndim:]
        # Zero-sized dims count as 1: torch's strides multiply the others, and overflow.
        if (
            any(d < 0 for d in shape)
            or any(rest)
            or math.prod(max(d, 1) for d in shape) > MAX_NUMEL
        ):
            raise WireError(f"pipeline header is malformed: ndim {ndim}, dims {dims}")
        return cls(shape=torch.Size(shape), dtype=CODE_DTYPES[code])
