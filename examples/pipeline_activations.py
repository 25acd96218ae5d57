"""Two pipeline stages exchanging FP8 activations and INT8 gradients.

Rank 0 runs the first half of an MLP and sends its activations to rank 1
(``commpress.pipeline.send_activation``, FP8); rank 1 runs the second half,
computes the loss and sends the gradient of its input back (INT8); rank 0
finishes the backward pass. Each step runs 2 micro-batches. A second run
with ``codec="none"`` shows how close the compressed loss curve stays.

    python examples/pipeline_activations.py            # spawns 2 local ranks
    torchrun --nproc-per-node 2 examples/pipeline_activations.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _launch import launch

import commpress
from commpress.pipeline import recv_activation, send_activation

STEPS, MICRO, BATCH, WIDTH = 10, 2, 64, 256  # 64 KiB activations: above min_bytes


def train(rank: int, act_codec: str, grad_codec: str) -> list[float]:
    torch.manual_seed(0)
    stages = [
        torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU()),
        torch.nn.Sequential(
            torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(), torch.nn.Linear(WIDTH, 1)
        ),
    ]
    stage = stages[rank]
    opt = torch.optim.Adam(stage.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    w_true = torch.randn(WIDTH, 1, generator=data) / WIDTH**0.5
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for _ in range(MICRO):
            x = torch.randn(BATCH, WIDTH, generator=data)  # both ranks draw the same batch
            if rank == 0:
                h = stage(x)
                send_activation(h, dst=1, codec=act_codec)
                h.backward(recv_activation(src=1, codec=grad_codec))
            else:
                h = recv_activation(src=0, codec=act_codec).requires_grad_()
                loss = F.mse_loss(stage(h), torch.sin(x @ w_true)) / MICRO
                loss.backward()
                send_activation(h.grad, dst=0, codec=grad_codec)
                total += loss.item()
        opt.step()
        losses.append(total)
    return losses


def main(rank: int, world_size: int) -> None:
    if world_size != 2:
        raise SystemExit("this example has exactly 2 stages: run it with 2 ranks")
    compressed = train(rank, "fp8", "int8")
    exact = train(rank, "none", "none")
    if rank == 1:
        for i in range(0, STEPS, 5):
            print(f"step {i:2d}  loss fp8/int8 {compressed[i]:.5f}  uncompressed {exact[i]:.5f}")
        print(f"final loss fp8/int8 {compressed[-1]:.5f}  uncompressed {exact[-1]:.5f}", flush=True)
        print(commpress.stats(), flush=True)


if __name__ == "__main__":
    launch(main)
