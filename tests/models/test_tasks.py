"""Heads and losses: exact masking, ordered grades."""

from __future__ import annotations

import math

import torch

from models.tasks import (
    CoralHead,
    MultiTaskHeads,
    TaskSpec,
    multitask_loss,
    ordinal_probabilities,
    task_loss,
)

TASKS = [
    TaskSpec(name="dr_grade", kind="ordinal", classes=5, weight=2.0),
    TaskSpec(name="amd", kind="binary", pos_weight=3.0),
    TaskSpec(name="systolic_bp", kind="regression", mean=130.0, std=15.0),
]


def test_a_missing_label_contributes_exactly_nothing() -> None:
    torch.manual_seed(0)
    heads = MultiTaskHeads(8, TASKS)
    x = torch.randn(6, 8)
    out = heads(x)
    targets = {
        "dr_grade": torch.tensor([0.0, 3, 4, 1, 2, 0]),
        "amd": torch.tensor([1.0, 0, 1, 0, 0, 1]),
        "systolic_bp": torch.tensor([120.0, 150, 135, 110, 160, 142]),
    }
    for task in TASKS:
        masked = targets[task.name].clone()
        masked[2] = math.nan
        keep = torch.tensor([0, 1, 3, 4, 5])
        with_gap = task_loss(task, out[task.name], masked)
        only_others = task_loss(task, out[task.name][keep], targets[task.name][keep])
        assert with_gap is not None and only_others is not None
        assert torch.equal(with_gap, only_others), task.name


def test_a_batch_without_a_label_for_one_task_still_trains_the_others() -> None:
    heads = MultiTaskHeads(8, TASKS)
    out = heads(torch.randn(4, 8))
    targets = {
        "dr_grade": torch.full((4,), math.nan),
        "amd": torch.tensor([1.0, 0, 1, 0]),
        "systolic_bp": torch.tensor([120.0, math.nan, 130, 140]),
    }
    loss, parts = multitask_loss(TASKS, out, targets)
    assert set(parts) == {"amd", "systolic_bp"}
    loss.backward()
    assert heads.heads["amd"].weight.grad is not None
    assert heads.heads["amd"].weight.grad.abs().sum() > 0
    assert (
        heads.heads["dr_grade"].linear.weight.grad is None
        or float(heads.heads["dr_grade"].linear.weight.grad.abs().sum()) == 0.0
    )


def test_ordinal_probabilities_are_a_distribution_with_monotone_cumulatives() -> None:
    torch.manual_seed(1)
    head = CoralHead(8, 5)
    logits = head(torch.randn(32, 8) * 5)
    probs = ordinal_probabilities(logits)
    assert probs.shape == (32, 5)
    assert bool((probs >= 0).all())
    assert torch.allclose(probs.sum(dim=1), torch.ones(32), atol=1e-6)
    cumulative = torch.sigmoid(logits)
    assert bool((cumulative[:, 1:] <= cumulative[:, :-1] + 1e-6).all())
