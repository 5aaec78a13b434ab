"""Benchmark training throughput (not pass/fail).

On a synthetic cohort prepared with the `small` recipe and the `fundus_demo` model:

1. the input pipeline (prepared Zarr streamed through `PreparedDataset`, augmentation,
   sharding) against the same model fed the same tensors already in memory, in a plain
   torch loop; target: at most 10% slower;
2. `run_training` on Ray Train with one worker against that plain torch loop, per epoch
   after start-up (start-up reported apart); target: at most 10% slower.

    .venv/bin/python bench/bench_train.py [--patients 40] [--epochs 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from models.model import EyeModel, model_inputs
from models.tasks import multitask_loss
from training.config import TrainConfig, load_train_config
from training.data import PreparedDataset, SampleArrays, ShardSampler, augment, build_augmentations
from training.loop import build_optimizer, targets_of
from training.splits import samples_for, split_samples


def _dataset(work: Path, patients: int) -> Path:
    from eyehub.synth import generate_cohort
    from ingest import generate_key_file, load_key, run_ingest
    from ingest.run import IngestSettings

    dataset = work / "dataset"
    if (dataset / "catalog.parquet").exists():
        return dataset
    generate_cohort(work / "cohort", patients, 3, "small", 2)
    key = load_key(generate_key_file(work / "hub.key"))
    run_ingest(
        [work / "cohort" / "dicom"],
        dataset,
        key,
        work / "cohort" / "labels.csv",
        IngestSettings(workers=2),
    )
    return dataset


def _plain_epoch(
    config: TrainConfig, batches: list[dict[str, Any]], model: EyeModel, seed: int
) -> float:
    """One epoch of the plain loop over the given batches; returns seconds."""
    net = model.net
    net.train()
    optimizer = build_optimizer(net, config.training)
    transforms = build_augmentations(config.augmentation, "fundus")
    device = torch.device("cpu")
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        inputs = model_inputs(config.model, batch["fundus"], None, batch["age"], batch["sex"])
        inputs["fundus"] = augment(inputs["fundus"], transforms, seed + step)
        loss, _ = multitask_loss(list(config.model.tasks), net(**inputs), targets_of(batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", type=Path, help="reuse (or create) the cohort here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.work or Path(tempfile.mkdtemp(prefix="eyehub-bench-train-"))
    try:
        from preprocess.recipe import recipe_id
        from preprocess.run import PREPARED
        from training.run import TrainSettings, ensure_prepared, run_training

        dataset = _dataset(work, args.patients)
        config = load_train_config(
            "fundus_demo", [f"training.epochs={args.epochs}", "evaluation.bootstrap=100"]
        )
        settings = TrainSettings(home=work / "home", workers=1, resume=False)
        index = ensure_prepared(dataset, config, settings, print)
        samples, _ = split_samples(config, samples_for(config, index))
        train = samples[samples.split == "train"]
        tasks = [t.name for t in config.model.tasks]
        arrays = SampleArrays.from_frame(train, tasks)
        zarr_path = str(dataset / PREPARED / f"{recipe_id(config.preprocess)}.zarr")
        streamed = PreparedDataset(zarr_path, arrays)
        batch = config.training.batch_size
        print(
            f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads; "
            f"{len(train)} training samples, batch {batch}, {config.model.fundus_network} at "
            f"{config.preprocess.fundus.size} px"
        )

        from training.data import collate

        def streamed_batches(epoch: int) -> list[dict[str, Any]]:
            sampler = ShardSampler(len(streamed), 0, 1, 0)
            sampler.set_epoch(epoch)
            loader = DataLoader(streamed, batch_size=batch, sampler=sampler, collate_fn=collate)
            return list(loader)

        in_memory = [
            {**b, "fundus": b["fundus"].clone()} for b in streamed_batches(0)
        ]  # read once, kept as tensors
        model = EyeModel(config.model, config.preprocess)
        _plain_epoch(config, in_memory[:2], model, 0)  # warm-up
        memory_s = np.median([_plain_epoch(config, in_memory, model, e) for e in range(2)])

        def streamed_epoch(epoch: int) -> float:
            """Reading (Zarr chunks, decompression, collation) plus the same steps."""
            t = time.perf_counter()
            fetched = streamed_batches(epoch)
            return time.perf_counter() - t + _plain_epoch(config, fetched, model, epoch)

        stream_s = np.median([streamed_epoch(e) for e in range(2)])
        n = len(train)
        print(f"plain loop, tensors in memory:      {n / memory_s:6.2f} samples/s")
        print(
            f"plain loop, streamed from Zarr:     {n / stream_s:6.2f} samples/s -> "
            f"{(stream_s / memory_s - 1) * 100:+.1f}% time (target <= +10%)"
        )

        events: list[tuple[float, dict[str, Any]]] = []
        t0 = time.perf_counter()
        summary = run_training(
            config, dataset, settings, on_progress=lambda e: events.append((time.perf_counter(), e))
        )
        total = time.perf_counter() - t0
        first_step = next(t for t, e in events if "step" in e) - t0
        rates = [e["train/samples_per_s"] for _, e in events if "train/samples_per_s" in e]
        steady = float(np.median(rates[1:] if len(rates) > 1 else rates))
        print(
            f"Ray Train, 1 worker, per epoch:     {steady:6.2f} samples/s -> "
            f"{(n / stream_s / steady - 1) * 100:+.1f}% time vs the plain streamed loop "
            f"(target <= +10%), {(n / memory_s / steady - 1) * 100:+.1f}% vs in memory"
        )
        print(
            f"Ray Train start-up to the first step: {first_step:.1f} s; whole run "
            f"{total:.0f} s for {summary.epochs} epochs incl. evaluation and registration"
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
