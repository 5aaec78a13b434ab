"""The training loop every Ray Train worker runs (and the plain-torch pieces it uses).

Per epoch: train on this worker's shard (DDP across workers: gloo on CPU, NCCL on GPU;
bf16 autocast and channels_last on CUDA; MONAI augmentation on the batch's device), then
rank 0 scores the validation split, and every worker reports; rank 0 passes the
checkpoint (model, optimiser, scheduler, epoch, best-so-far weights, early-stopping
state) and logs the epoch's metrics to MLflow. A resumed or restarted group continues
from the latest checkpoint; a finished run restores to "nothing left to do". A
non-finite loss stops every worker at the same step (the loss is all-reduced), keeps the
last good checkpoint, and is reported so the driver can fail the run with the epoch and
step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.model import EyeModel, ModelSpec, model_inputs
from models.tasks import TaskSpec, decision_score, multitask_loss, ordinal_probabilities
from preprocess.recipe import Recipe
from training.config import TrainingSpec
from training.data import (
    PreparedDataset,
    SampleArrays,
    ShardSampler,
    augment,
    build_augmentations,
    collate,
)

log = logging.getLogger(__name__)

STATE = "state.pt"
NONFINITE = "nonfinite.json"  # in the run directory: where a run's loss stopped being finite


# -- plain torch pieces ----------------------------------------------------------------------


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING = ("patch_embedding", "cls_token", "position_embeddings", "pos_embed")
_NO_DECAY = ("cls_token", "position_embeddings", "pos_embed")  # as timm/RETFound


def layer_id(name: str, layers: int) -> int:
    """A parameter's depth for layer-wise decay (BEiT/MAE/RETFound's `param_groups_lrd`):
    the embeddings 0, transformer block i i+1, everything above the blocks layers+1."""
    found = _BLOCK.search(name)
    if found:
        return int(found.group(1)) + 1
    if any(part in name for part in _EMBEDDING):
        return 0
    return layers + 1


def build_optimizer(net: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer:
    """AdamW or SGD, no weight decay on biases and norms. With `layer_decay`, layer-wise
    learning-rate decay as RETFound's fine-tuning does: a parameter at depth d of a ViT
    with L blocks learns at lr x decay^(L + 1 - d), so the heads learn fastest."""
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    blocks = {int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n))}
    layers = max(blocks) + 1 if blocks else 0
    grouped: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in named:
        depth = layer_id(name, layers) if spec.layer_decay is not None else 0
        no_decay = p.ndim <= 1 or name.endswith(".bias") or any(t in name for t in _NO_DECAY)
        grouped.setdefault((depth, bool(no_decay)), []).append(p)
    groups = []
    for (depth, no_decay), params in sorted(grouped.items()):
        scale = spec.layer_decay ** (layers + 1 - depth) if spec.layer_decay is not None else 1.0
        groups.append(
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else spec.weight_decay,
                "lr": spec.lr * scale,
                "lr_scale": scale,
            }
        )
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=spec.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainingSpec, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, spec.epochs * steps_per_epoch)
    warmup = int(spec.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if spec.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if spec.schedule == "step":
            return 0.1 ** int(progress * 3)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def targets_of(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {t: v.to(device) for t, v in batch["labels"].items()}


@torch.no_grad()
def predict_outputs(
    net: nn.Module,
    spec: ModelSpec,
    dataset: PreparedDataset,
    device: torch.device,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Raw network outputs per task for every sample of `dataset`, in order."""
    was_training = net.training
    net.eval()
    outputs: dict[str, list[np.ndarray]] = {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    try:
        for batch in loader:
            inputs = model_inputs(
                spec, batch.get("fundus"), batch.get("oct"), batch["age"], batch["sex"], device
            )
            for task, out in net(**inputs).items():
                outputs.setdefault(task, []).append(out.float().cpu().numpy())
    finally:
        net.train(was_training)
    return {t: np.concatenate(v) for t, v in outputs.items()}


def quick_metrics(
    tasks: Sequence[TaskSpec], outputs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """The per-epoch validation figures: binary AUROC; ordinal QWK (and the referral
    AUROC); regression MAE in the label's units. Undefined ones are left out."""
    from sklearn.metrics import cohen_kappa_score, mean_absolute_error, roc_auc_score

    metrics: dict[str, float] = {}
    for t in tasks:
        y = labels[t.name]
        keep = ~np.isnan(y)
        if not keep.any():
            continue
        out = torch.as_tensor(outputs[t.name][keep])
        yk = y[keep]
        if t.kind == "binary" and len(np.unique(yk)) == 2:
            metrics[f"val/{t.name}/auroc"] = float(roc_auc_score(yk, out[:, 0].numpy()))
        elif t.kind == "ordinal":
            grades = ordinal_probabilities(out).argmax(dim=1).numpy()
            if len(np.unique(yk)) > 1:
                metrics[f"val/{t.name}/qwk"] = float(
                    cohen_kappa_score(yk.astype(int), grades, weights="quadratic")
                )
            if t.refer_from is not None:
                refer = (yk >= t.refer_from).astype(int)
                if len(np.unique(refer)) == 2:
                    score = decision_score(t, out).numpy()
                    metrics[f"val/{t.name}/referral_auroc"] = float(roc_auc_score(refer, score))
        elif t.kind == "regression":
            value = out[:, 0].numpy() * t.std + t.mean
            metrics[f"val/{t.name}/mae"] = float(mean_absolute_error(yk, value))
    return metrics


def improved(value: float | None, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


# -- the Ray Train worker --------------------------------------------------------------------


def _unwrap(net: nn.Module) -> nn.Module:
    inner = getattr(net, "module", net)
    return inner if isinstance(inner, nn.Module) else net


def _broadcast(values: list[Any]) -> list[Any]:
    """Rank 0's values on every worker (identity with one worker)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(values, src=0)
    return values


def _gather(value: Any) -> list[Any]:
    """Every worker's `value`, in rank order."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def _all_mean(value: torch.Tensor) -> float:
    import torch.distributed as dist

    v = value.detach().float().reshape(1).clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(v)
        v /= dist.get_world_size()
    return float(v)


@contextlib.contextmanager
def _joined(net: nn.Module) -> Iterator[None]:
    """DDP with uneven shards: workers that run out early shadow the others' all-reduces."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        with net.join():
            yield
    else:
        yield


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`. `config`: the resolved spec, recipe, training
    settings and augmentation, the Zarr path, the train and validation arrays, MLflow's
    tracking URI and run id, and an optional progress queue."""
    import ray.train
    import ray.train.torch

    from training.config import Augmentation

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = ModelSpec.from_dict(config["spec"])
    recipe = Recipe.from_dict(config["recipe"])
    train_spec = TrainingSpec.from_dict(config["training"])
    augmentation = [Augmentation.from_dict(a) for a in config["augmentation"]]
    metric, mode = config["early_stopping_metric"], config["early_stopping_mode"]
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"

    torch.manual_seed(train_spec.seed)
    model = EyeModel.create(spec, recipe)
    net: nn.Module = model.net
    if cuda:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    net = ray.train.torch.prepare_model(net)
    optimizer = build_optimizer(net, train_spec)

    train_ds = PreparedDataset(config["zarr"], SampleArrays.from_dict(config["train"]))
    val_arrays = SampleArrays.from_dict(config["val"])
    val_ds = PreparedDataset(config["zarr"], val_arrays)
    sampler = ShardSampler(len(train_ds), rank, world, train_spec.seed)
    loader = DataLoader(
        train_ds,
        batch_size=train_spec.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=int(config.get("loader_workers", 0)),
        pin_memory=cuda,
        persistent_workers=bool(config.get("loader_workers", 0)),
    )
    scheduler = build_scheduler(optimizer, train_spec, len(loader))
    fundus_aug = build_augmentations(augmentation, "fundus")
    oct_aug = build_augmentations(augmentation, "oct")

    start_epoch, best, best_epoch, bad_epochs = 0, None, -1, 0
    best_state: dict[str, torch.Tensor] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=False)
        _unwrap(net).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        best, best_epoch, bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        best_state = state["best_model"]
        if state.get("stopped"):
            start_epoch = train_spec.epochs  # stopped early: nothing left to do

    import ray

    tracker = _Tracker(config) if rank == 0 else None
    nodes = _gather(ray.get_runtime_context().get_node_id())
    if tracker is not None:
        tracker.tag("eyehub.train_nodes", ",".join(sorted(set(nodes))))
        tracker.tag("eyehub.train_workers", str(world))
    queue = config.get("progress")
    tasks = list(spec.tasks)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda and train_spec.amp
        else contextlib.nullcontext()
    )
    for epoch in range(start_epoch, train_spec.epochs):
        sampler.set_epoch(epoch)
        net.train()
        seen, losses, started = 0, [], time.perf_counter()
        nonfinite: tuple[int, int] | None = None
        with _joined(net):
            for step, batch in enumerate(loader):
                inputs = model_inputs(
                    spec, batch.get("fundus"), batch.get("oct"), batch["age"], batch["sex"], device
                )
                seed = hash((train_spec.seed, epoch, step, rank))
                if "fundus" in inputs:
                    inputs["fundus"] = augment(inputs["fundus"], fundus_aug, seed)
                    if cuda:
                        inputs["fundus"] = inputs["fundus"].contiguous(
                            memory_format=torch.channels_last
                        )
                if "oct" in inputs:
                    inputs["oct"] = augment(inputs["oct"], oct_aug, seed + 1)
                with autocast:
                    outputs = net(**inputs)
                    loss, _ = multitask_loss(tasks, outputs, targets_of(batch, device))
                mean_loss = _all_mean(loss)
                if not math.isfinite(mean_loss):
                    nonfinite = (epoch, step)
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if train_spec.grad_clip:
                    nn.utils.clip_grad_norm_(net.parameters(), train_spec.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(mean_loss)
                seen += len(batch["index"]) * world
                if queue is not None and rank == 0:
                    rate = seen / max(time.perf_counter() - started, 1e-9)
                    queue.put_nowait(
                        {
                            "epoch": epoch + 1,
                            "epochs": train_spec.epochs,
                            "step": step + 1,
                            "steps": len(loader),
                            "loss": mean_loss,
                            "samples_per_s": rate,
                        }
                    )
        if nonfinite is not None:  # every worker saw it (the loss is all-reduced)
            if rank == 0:
                marker = {"epoch": nonfinite[0], "step": nonfinite[1]}
                Path(config["run_dir"], NONFINITE).write_text(json.dumps(marker))
                assert tracker is not None
                tracker.log({"train/nonfinite_step": float(nonfinite[1])}, nonfinite[0])
            return
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "train/loss": float(np.mean(losses)) if losses else float("nan"),
            "train/samples_per_s": seen / max(time.perf_counter() - started, 1e-9),
            "train/lr": float(scheduler.get_last_lr()[0]),
        }
        stop = False
        if rank == 0:
            outputs = predict_outputs(_unwrap(net), spec, val_ds, device, train_spec.batch_size)
            metrics.update(quick_metrics(tasks, outputs, val_arrays.labels))
            value = metrics.get(metric)
            if improved(value, best, mode):
                best, best_epoch, bad_epochs = value, epoch, 0
                best_state = {
                    k: v.detach().cpu().clone() for k, v in _unwrap(net).state_dict().items()
                }
            else:
                bad_epochs += 1
            stop = bad_epochs >= train_spec.early_stopping.patience
            if best_state is None:  # no finite metric yet: the latest weights are the best
                best_state = {k: v.detach().cpu() for k, v in _unwrap(net).state_dict().items()}
        stop = bool(_broadcast([stop])[0])
        if rank == 0:
            assert tracker is not None
            tracker.log(metrics, epoch)
            if queue is not None:
                queue.put_nowait({**metrics, "epoch": epoch + 1, "epochs": train_spec.epochs})
            with tempfile.TemporaryDirectory() as folder:
                torch.save(
                    {
                        "model": {k: v.cpu() for k, v in _unwrap(net).state_dict().items()},
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "best_epoch": best_epoch,
                        "bad_epochs": bad_epochs,
                        "best_model": best_state,
                        "stopped": stop,
                        "sampler": {"seed": sampler.seed, "epoch": epoch},
                    },
                    Path(folder) / STATE,
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
        if stop:
            break


class _Tracker:
    """Rank 0's MLflow client: per-epoch metrics into the driver's run."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.uri = config.get("tracking_uri")
        self.run_id = config.get("run_id")

    def log(self, metrics: Mapping[str, float], epoch: int) -> None:
        if not self.uri or not self.run_id:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, epoch)
            for key, value in metrics.items()
            if key != "epoch" and math.isfinite(float(value))
        ]
        MlflowClient(self.uri).log_batch(self.run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        if self.uri and self.run_id:
            from mlflow import MlflowClient

            MlflowClient(self.uri).set_tag(self.run_id, key, value)
