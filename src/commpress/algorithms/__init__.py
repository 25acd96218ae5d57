"""Compressed collective algorithms, built only on torch.distributed primitives.

- `direct`: summable codecs (fp16/bf16) -- one backend all-reduce of the payload.
- `two_phase`: reduce-scatter by all-to-all, local sum, re-encode, all-gather.
- `gather`: all-gather every packet, reduce locally in rank order.
- `transport`: broadcast, all_gather, gather, scatter, all_to_all, send/recv.
- `powersgd`: low-rank all-reduce (its own module).
- `common`: the call context, the descriptor exchange and uint8 transfers.

Algorithms move ``uint8`` wire buffers (`commpress.wire`) and never parse them.
"""
