"""Compressed collective algorithms, built only on torch.distributed primitives.

Every algorithm declares itself with `register_algorithm` (see
`commpress.algorithms.registry` for the protocol); importing its module below
registers it -- adding an algorithm is its own module plus one line here.

- `direct`: summable codecs (fp16/bf16) -- one backend all-reduce of the payload.
- `gather`: all-gather every packet, reduce locally in rank order.
- `two_phase`: reduce-scatter by all-to-all, local sum, re-encode, all-gather.
- `hierarchical`: exact inside a host, compressed across hosts.
- `transport`: broadcast, all_gather, gather, scatter, all_to_all, send/recv.
- `powersgd`: low-rank all-reduce (the math and memory); `lowrank`: its declaration.
- `chunked`: the one driver that pipelines the chunks of a large all-reduce.
- `common`: the call context, the descriptor exchange and uint8 transfers.

Algorithms move ``uint8`` wire buffers (`commpress.wire`) and never parse them.
"""

from . import direct, gather, hierarchical, lowrank, transport, two_phase  # noqa: F401 - registers each
from .registry import (
    Algorithm,
    CodecSpeed,
    Link,
    algorithm_names,
    algorithms,
    default_order,
    get_algorithm,
    register_algorithm,
)

__all__ = [
    "Algorithm",
    "CodecSpeed",
    "Link",
    "algorithm_names",
    "algorithms",
    "default_order",
    "get_algorithm",
    "register_algorithm",
]
