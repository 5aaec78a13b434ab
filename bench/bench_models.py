"""Training-step throughput per architecture (images/s), not pass/fail.

One step = forward, multi-task loss, backward, optimizer step, at 224 px (fundus) and
32 x 128 x 128 (OCT), batch 8, on the chosen device (bf16 autocast and channels_last on
CUDA).

    .venv/bin/python bench/bench_models.py [--device cpu|cuda] [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from models.networks import FUNDUS_NETWORKS, OCT_NETWORKS, fundus_encoder, oct_encoder
from models.tasks import MultiTaskHeads, TaskSpec, multitask_loss

TASKS = [
    TaskSpec(name="dr_grade", kind="ordinal", classes=5),
    TaskSpec(name="amd", kind="binary"),
    TaskSpec(name="age", kind="regression"),
]


def _throughput(net: torch.nn.Module, x: torch.Tensor, steps: int, device: torch.device) -> float:
    heads = MultiTaskHeads(256, TASKS).to(device)
    net = net.to(device)
    opt = torch.optim.AdamW(list(net.parameters()) + list(heads.parameters()), lr=1e-4)
    b = x.shape[0]
    targets = {
        "dr_grade": torch.randint(0, 5, (b,), device=device).float(),
        "amd": torch.randint(0, 2, (b,), device=device).float(),
        "age": torch.rand(b, device=device) * 40 + 40,
    }
    cuda = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = multitask_loss(TASKS, heads(net(x)), targets)
        loss.backward()
        opt.step()

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return steps * b / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"training step throughput, batch {args.batch}, device {device}, "
        f"{torch.get_num_threads()} threads"
    )
    for name in FUNDUS_NETWORKS:
        x = torch.randn(args.batch, 3, 224, 224, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        ips = _throughput(fundus_encoder(name, 224), x, args.steps, device)
        print(f"  fundus {name:16s} 224 px: {ips:8.1f} images/s")
    for name in OCT_NETWORKS:
        x = torch.randn(max(1, args.batch // 4), 1, 32, 128, 128, device=device)
        ips = _throughput(oct_encoder(name), x, args.steps, device)
        print(f"  OCT    {name:16s} 32x128x128: {ips:8.2f} volumes/s")


if __name__ == "__main__":
    main()
