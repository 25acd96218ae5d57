"""An ordinary data-parallel training script, made compressed by one line.

Everything below is plain ``torch.distributed`` code: parameters are
broadcast from rank 0, gradients averaged with ``dist.all_reduce`` by hand,
the loss averaged for logging. The one commpress line is
``commpress.patch(...)`` right after the imports; delete it and the script
runs uncompressed, unchanged. (Or leave the script untouched and run it with
``commpress run --codec int8 ...``.)

    python examples/patch_existing_script.py              # spawns 2 local ranks
    torchrun --nproc-per-node 2 examples/patch_existing_script.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _launch import launch

import commpress

commpress.patch(codec="int8", min_bytes=4096)  # <- the one line (before init_process_group is fine)


def main(rank: int, world_size: int) -> None:
    torch.manual_seed(rank)  # deliberately different initial weights per rank...
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
    for p in model.parameters():  # ...made equal by broadcasting rank 0's
        dist.broadcast(p.data, src=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w_true = torch.randn(64, 1, generator=torch.Generator().manual_seed(7))
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(30):
        x = torch.randn(32, 64, generator=data)
        loss = F.mse_loss(model(x), x @ w_true)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size
        opt.step()
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        if rank == 0 and step % 10 == 9:
            print(f"step {step + 1}  mean loss {logged.item() / world_size:.4f}", flush=True)
    if rank == 0:
        ar = commpress.stats()["all_reduce"]
        print(f"all_reduce: {ar.compressed} of {ar.calls} calls compressed")
        print(commpress.stats(), flush=True)


if __name__ == "__main__":
    launch(main)
