"""The sub-byte code packing the block quantizers share (``codecs.block``)."""

import math

import pytest
import torch

from commpress.codecs.block import pack_bits, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_packing_round_trips(bits):
    for n in (0, 1, 3, 8, 9, 31, 1001):
        codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, n), codes)
        # A slice that starts mid-word packs the same as a fresh tensor.
        assert torch.equal(pack_bits(torch.cat([codes[:1], codes])[1:], bits), packed)
