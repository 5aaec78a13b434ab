"""Training-step throughput per architecture (images/s), not pass/fail.

One step = forward through the EyeNet (encoder and three task heads), multi-task loss,
backward, AdamW step, at 224 px (fundus) and 32 x 128 x 128 (OCT), batch 8 (OCT batch 2),
on the chosen device. On CUDA: bf16 autocast and channels_last; `--compile` adds
torch.compile.

    .venv/bin/python bench/bench_models.py [--device cpu|cuda] [--steps 3] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch

from models.model import EyeNet, ModelSpec
from models.networks import FUNDUS_NETWORKS, OCT_NETWORKS
from models.tasks import multitask_loss
from preprocess.recipe import FundusRecipe, OctRecipe, Recipe

TASKS = [
    {"name": "dr_grade", "kind": "ordinal", "classes": 5, "refer_from": 2},
    {"name": "amd", "kind": "binary"},
    {"name": "age", "kind": "regression", "mean": 60.0, "std": 15.0},
]
RECIPE = Recipe(fundus=FundusRecipe(size=224), oct=OctRecipe(shape=(32, 128, 128)))


def _throughput(
    spec: ModelSpec, x: dict[str, torch.Tensor], steps: int, device: torch.device, compile_: bool
) -> float:
    cuda = device.type == "cuda"
    net = EyeNet(spec, RECIPE).to(device)
    if cuda and spec.input == "fundus":
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    tasks = list(spec.tasks)
    forward = torch.compile(net) if compile_ else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    b = next(iter(x.values())).shape[0]
    targets = {
        "dr_grade": torch.randint(0, 5, (b,), device=device).float(),
        "amd": torch.randint(0, 2, (b,), device=device).float(),
        "age": torch.rand(b, device=device) * 40 + 40,
    }

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = multitask_loss(tasks, forward(**x), targets)
        loss.backward()
        opt.step()

    for _ in range(3 if compile_ else 1):  # warm-up (and compilation)
        step()
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
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated network names")
    args = parser.parse_args()
    device = torch.device(args.device)
    only = set(filter(None, args.only.split(",")))
    print(
        f"training step throughput, batch {args.batch}, device {device}, "
        f"{torch.get_num_threads()} threads, compile {args.compile}"
    )
    for name in FUNDUS_NETWORKS:
        if only and name not in only:
            continue
        spec = ModelSpec.from_dict({"fundus_network": name, "tasks": TASKS})
        x = torch.randn(args.batch, 3, 224, 224, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        ips = _throughput(spec, {"fundus": x}, args.steps, device, args.compile)
        print(f"  fundus {name:16s} 224 px:     {ips:8.1f} images/s")
    for name in OCT_NETWORKS:
        if only and name not in only:
            continue
        spec = ModelSpec.from_dict({"input": "oct", "oct_network": name, "tasks": TASKS})
        x = torch.randn(max(1, args.batch // 4), 1, 32, 128, 128, device=device)
        ips = _throughput(spec, {"oct": x}, args.steps, device, args.compile)
        print(f"  OCT    {name:16s} 32x128x128: {ips:8.2f} volumes/s")


if __name__ == "__main__":
    main()
