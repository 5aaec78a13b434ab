"""Prediction tasks and their heads: binary, ordinal (CORAL) and regression, with masking.

A missing label masks that task's loss for that sample: it contributes nothing to the
task, and a batch with no label for a task still trains the others. Labels arrive as
float tensors with NaN where missing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from eyehub.settings import Settings


class TaskSpec(Settings):
    name: str  # the label column
    kind: Literal["binary", "ordinal", "regression"]
    weight: float = Field(default=1.0, ge=0)
    classes: int = Field(default=2, ge=2, description="ordinal: number of grades")
    pos_weight: float | None = Field(default=None, gt=0, description="binary BCE pos_weight")
    mean: float = 0.0  # regression: targets are standardised with these
    std: float = Field(default=1.0, gt=0)
    huber_delta: float = Field(default=1.0, gt=0)
    refer_from: int | None = Field(
        default=None,
        ge=1,
        description="ordinal: the grade from which an eye is referred (DR: 2, moderate NPDR); "
        "gives the task a referral probability, a temperature and a threshold",
    )

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.refer_from is not None and (
            self.kind != "ordinal" or self.refer_from >= self.classes
        ):
            raise ValueError(
                f"refer_from applies to ordinal tasks and must be below classes ({self.classes})"
            )
        return self

    @property
    def decides(self) -> bool:
        """Whether the task ends in a yes/no decision (calibrated, with a threshold)."""
        return self.kind == "binary" or self.refer_from is not None


class CoralHead(nn.Module):
    """CORAL ordinal head (Cao, Mirjalili and Raschka 2020): one shared weight vector and
    K-1 ordered biases, so the cumulative probabilities P(y > k) cannot cross."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1, bias=False)
        # The gaps between the biases set how sure a middle grade can be, and no feature
        # scale can widen them; an optimiser moves a parameter about lr per step, so they are
        # stored divided by BIAS_STEP to move BIAS_STEP times faster. They start at the
        # logits of a uniform grade prior, P(y > k) = (K-1-k)/K.
        prior = torch.arange(classes - 1, 0, -1).float() / classes
        self.scaled_biases = nn.Parameter(torch.logit(prior) / self.BIAS_STEP)

    BIAS_STEP = 10.0

    @property
    def biases(self) -> torch.Tensor:
        return self.scaled_biases * self.BIAS_STEP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.biases  # (B, K-1) logits of P(y > k)


def decision_score(task: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """The one number per sample (B,) that a task's decision and its explanation follow:
    binary its logit; ordinal with `refer_from` the logit of P(y >= refer_from), without it
    the summed CORAL logits (rising with the grade); regression the standardised value."""
    if task.kind == "ordinal":
        if task.refer_from is not None:
            return output[:, task.refer_from - 1]
        return output.sum(dim=1)
    return output[:, 0]


def ordinal_cumulative(logits: torch.Tensor) -> torch.Tensor:
    """P(y > k) for k = 0..K-2 from CORAL logits, made monotone (a running minimum, which
    CORAL's ordered biases already give up to rounding)."""
    return torch.cummin(torch.sigmoid(logits), dim=1).values


def ordinal_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Grade probabilities (B, K) from CORAL logits (B, K-1); non-negative, sum to one."""
    cumulative = ordinal_cumulative(logits)
    ones = torch.ones_like(cumulative[:, :1])
    zeros = torch.zeros_like(cumulative[:, :1])
    upper = torch.cat([ones, cumulative], dim=1)
    lower = torch.cat([cumulative, zeros], dim=1)
    return (upper - lower).clamp(min=0)


class MultiTaskHeads(nn.Module):
    """One head per task on a shared feature vector; returns {task: raw output}."""

    def __init__(self, features: int, tasks: list[TaskSpec]) -> None:
        super().__init__()
        self.tasks = tasks
        heads: dict[str, nn.Module] = {}
        for t in tasks:
            if t.kind == "ordinal":
                heads[t.name] = CoralHead(features, t.classes)
            else:
                heads[t.name] = nn.Linear(features, 1)
        self.heads = nn.ModuleDict(heads)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}


def task_loss(task: TaskSpec, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Mean loss over the samples that have a label; None when none has."""
    present = ~torch.isnan(target)
    if not bool(present.any()):
        return None
    out, y = output[present], target[present]
    if task.kind == "binary":
        pos = None if task.pos_weight is None else torch.tensor(task.pos_weight, device=out.device)
        return F.binary_cross_entropy_with_logits(out[:, 0], y, pos_weight=pos)
    if task.kind == "ordinal":
        levels = torch.arange(task.classes - 1, device=out.device)
        cumulative = (y[:, None] > levels[None, :]).float()  # CORAL targets
        return F.binary_cross_entropy_with_logits(out, cumulative, reduction="none").sum(1).mean()
    z = (y - task.mean) / task.std
    return F.huber_loss(out[:, 0], z, delta=task.huber_delta)


def multitask_loss(
    tasks: list[TaskSpec], outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the task losses that have labels in this batch, and each one."""
    total: torch.Tensor | None = None
    parts: dict[str, float] = {}
    for t in tasks:
        loss = task_loss(t, outputs[t.name], targets[t.name])
        if loss is None:
            continue
        parts[t.name] = float(loss.detach())
        total = t.weight * loss if total is None else total + t.weight * loss
    if total is None:  # no label at all: a zero that still carries the graph
        total = sum(o.sum() * 0.0 for o in outputs.values())  # type: ignore[assignment]
    return total, parts  # type: ignore[return-value]
