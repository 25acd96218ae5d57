"""MoE expert parallelism: FP8 dispatch, BF16 combine (the DeepSeek-V3 recipe).

Each rank routes its tokens to the top-2 of 8 experts; the experts are
spread over the ranks (4 each on 2 ranks). ``commpress.moe.dispatch`` sends
each token to the ranks of its experts in FP8 (e4m3, a scale per 128
values), the experts run where they live, ``commpress.moe.combine`` sends
the outputs back in BF16 and sums them with the gate weights. The same
forward with ``codec="none"`` gives the exact reference.

    python examples/moe_alltoall.py          # spawns 2 local ranks
    torchrun --nproc-per-node 3 examples/moe_alltoall.py
"""

from __future__ import annotations

import torch
from _launch import launch

import commpress
import commpress.moe as moe

HIDDEN, NUM_EXPERTS, TOPK, TOKENS = 256, 8, 2, 512


def moe_forward(x, router, experts, dispatch_codec, combine_codec):
    scores = torch.softmax(x @ router, dim=-1)
    weights, expert_ids = scores.topk(TOPK, dim=-1)
    recv, handle = moe.dispatch(x, expert_ids, NUM_EXPERTS, codec=dispatch_codec)
    out = torch.empty_like(recv)
    first = handle.layout.bounds[torch.distributed.get_rank()]
    for j, expert in enumerate(experts):  # this rank's experts, on their rows
        rows = handle.layout.recv_expert_ids == first + j
        out[rows] = expert(recv[rows])
    return moe.combine(out, handle, weights=weights, codec=combine_codec)


def main(rank: int, world_size: int) -> None:
    torch.manual_seed(0)  # same router and experts everywhere; each rank keeps its own
    router = torch.randn(HIDDEN, NUM_EXPERTS)
    all_experts = [torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(NUM_EXPERTS)]
    lo, hi = moe.expert_bounds(NUM_EXPERTS, world_size)[rank : rank + 2]
    experts = all_experts[lo:hi]
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(rank))

    with torch.no_grad():
        exact = moe_forward(x, router, experts, "none", "none")
        approx = moe_forward(x, router, experts, "fp8", "bf16")
    err = ((approx - exact).norm() / exact.norm()).item()
    print(
        f"rank {rank}: {TOKENS} tokens, experts {lo}-{hi - 1}, "
        f"fp8/bf16 vs exact relative error {err:.2e}",
        flush=True,
    )
    torch.distributed.barrier()
    if rank == 0:
        print(commpress.stats(), flush=True)


if __name__ == "__main__":
    launch(main)
