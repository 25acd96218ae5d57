"""The two-line researcher use: one compressed all-reduce, same call as torch.distributed.

    import commpress.distributed as cdist
    cdist.all_reduce(grad, codec="int8")

Runs on 2 local CPU ranks (gloo) by itself, or under torchrun::

    python examples/wrap_allreduce.py
    torchrun --nproc-per-node 2 examples/wrap_allreduce.py --codec fp8
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from _launch import launch

import commpress
import commpress.distributed as cdist


def main(rank: int, world_size: int, codec: str) -> None:
    torch.manual_seed(rank)
    grad = torch.randn(1 << 16)

    exact = grad.clone()
    dist.all_reduce(exact)  # plain torch.distributed, for comparison

    cdist.all_reduce(grad, codec=codec)  # the compressed one: same signature, plus codec=

    err = ((grad - exact).norm() / exact.norm()).item()
    if rank == 0:
        print(f"codec {codec}: relative error of the sum over {world_size} ranks: {err:.2e}")
        print(commpress.stats())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="One compressed all-reduce.")
    parser.add_argument("--codec", default="int8", help="codec spec (default: int8)")
    launch(main, parser.parse_args().codec)
