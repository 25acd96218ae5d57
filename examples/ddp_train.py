"""Train a small model with DDP and commpress's compression comm hook.

    state = commpress.hooks.CompressionState(codec="int8")
    commpress.hooks.register(ddp_model, state)
    # the same as ddp_model.register_comm_hook(state, commpress.hooks.compress_hook)

Works under torchrun and launched plainly (then it spawns 2 local CPU ranks)::

    python examples/ddp_train.py --codec int8
    python examples/ddp_train.py --codec powersgd:rank=2
    torchrun --nproc-per-node 2 examples/ddp_train.py --codec fp8
    commpress run --codec int8 --stats examples/ddp_train.py --plain   # hook added by commpress run

``--plain`` builds a DDP model without a hook (the uncompressed baseline, or
the starting point for ``commpress run``, which hooks DDP models itself). The
model has ~83 KB of gradients in one DDP bucket, above the default
``min_bytes`` (32 KiB), so ``commpress run`` compresses it; with ``--stats``
each rank prints its table when it exits.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _launch import launch
from torch.nn.parallel import DistributedDataParallel as DDP

import commpress
import commpress.hooks


def main(rank: int, world_size: int, codec: str, plain: bool, steps: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 1),
    )
    ddp = DDP(model)
    if not plain:
        commpress.hooks.register(ddp, commpress.hooks.CompressionState(codec=codec))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(1)) / 32**0.5
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    for step in range(steps):
        x = torch.randn(64, 32, generator=data)
        y = x @ w_true + 0.01 * torch.randn(64, 1, generator=data)
        loss = F.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    if rank == 0:
        mode = "plain DDP" if plain else f"hook codec {codec}"
        print(f"final loss {loss.item():.4f} ({mode}, {world_size} ranks)")
        print(commpress.stats(), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DDP training with a commpress comm hook.")
    parser.add_argument("--codec", default="int8", help="codec spec for the hook (default: int8)")
    parser.add_argument("--plain", action="store_true", help="no hook: plain DDP")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    launch(main, args.codec, args.plain, args.steps)
