"""Batch scoring of an ingested dataset with Ray Data, into a predictions Parquet.

SKELETON: to be implemented."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BatchSummary:
    path: Path  # the predictions Parquet
    scans: int
    scored: int
    ungradable: int
    seconds: float


def score_dataset(
    dataset: Path,
    model: str,
    *,
    tracking_uri: str,
    cache: Path,
    out: Path | None = None,
    workers: int = 2,
    batch_size: int = 16,
    device: str = "auto",
    ray_address: str | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> BatchSummary:
    """Score every scan of `dataset` with the model `model` names."""
    raise NotImplementedError
