"""Training input: prepared tensors streamed from `prepared/<recipe_id>.zarr`, sharded.

The driver turns the split's samples into plain arrays (prepared rows, encoded labels,
age and sex) that travel to every worker; the tensors themselves stay in the Zarr store
and are read a sample at a time (one chunk per scan), so a prepared set larger than
memory trains. Each worker reads only its shard: an epoch's permutation (from the seed
and the epoch) is cut into `world` disjoint parts, so every sample is seen exactly once
per epoch across the workers (shards may differ by one sample; the loop joins uneven
inputs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from torch.utils.data import Dataset, Sampler

from eyehub.labels import label_spec


@dataclass
class SampleArrays:
    """One split's samples as arrays (what workers need; no pandas)."""

    fundus_row: np.ndarray  # int64, -1 when the model reads no fundus
    oct_row: np.ndarray
    labels: dict[str, np.ndarray]  # task -> float64, NaN where missing
    age: np.ndarray  # float64, NaN where unknown
    sex: list[str | None]

    def __len__(self) -> int:
        return len(self.fundus_row)

    @classmethod
    def from_frame(cls, frame: Any, tasks: Sequence[str]) -> SampleArrays:
        age = frame.get("age")
        sex = frame.get("sex")
        return cls(
            fundus_row=frame["fundus_row"].to_numpy(dtype=np.int64),
            oct_row=frame["oct_row"].to_numpy(dtype=np.int64),
            labels={t: label_spec(t).encode(frame[t]) for t in tasks},
            age=np.full(len(frame), np.nan) if age is None else label_spec("age").encode(age),
            sex=[None] * len(frame)
            if sex is None
            else [None if pd.isna(v) else str(v) for v in sex.astype(object)],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fundus_row": self.fundus_row,
            "oct_row": self.oct_row,
            "labels": self.labels,
            "age": self.age,
            "sex": self.sex,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleArrays:
        return cls(**data)


class PreparedDataset(Dataset[dict[str, Any]]):
    """Map-style dataset over one split: sample i -> its prepared uint8 tensors and labels.

    The Zarr arrays are opened lazily in the process that reads (a DataLoader worker or
    the training worker itself)."""

    def __init__(self, zarr_path: str, arrays: SampleArrays) -> None:
        self.zarr_path = zarr_path
        self.arrays = arrays
        self._open: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.arrays)

    def _store(self) -> dict[str, Any]:
        if self._open is None:
            root = zarr.open_group(self.zarr_path, mode="r")
            self._open = {name: root[name] for name in ("fundus", "oct") if name in root}
        return self._open

    def __getitem__(self, i: int) -> dict[str, Any]:
        a = self.arrays
        store = self._store()
        item: dict[str, Any] = {"index": i}
        if a.fundus_row[i] >= 0:
            item["fundus"] = torch.from_numpy(np.asarray(store["fundus"][int(a.fundus_row[i])]))
        if a.oct_row[i] >= 0:
            item["oct"] = torch.from_numpy(np.asarray(store["oct"][int(a.oct_row[i])]))
        item["labels"] = {t: float(v[i]) for t, v in a.labels.items()}
        item["age"] = float(a.age[i])
        item["sex"] = a.sex[i] or ""
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"index": torch.tensor([it["index"] for it in items])}
    for name in ("fundus", "oct"):
        if name in items[0]:
            batch[name] = torch.stack([it[name] for it in items])
    batch["labels"] = {
        t: torch.tensor([it["labels"][t] for it in items], dtype=torch.float32)
        for t in items[0]["labels"]
    }
    batch["age"] = [it["age"] for it in items]
    batch["sex"] = [it["sex"] or None for it in items]
    return batch


class ShardSampler(Sampler[int]):
    """This worker's disjoint share of an epoch's permutation (or of the plain order)."""

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        return [int(i) for i in order[self.rank :: self.world]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def build_augmentations(specs: Sequence[Any], image: str) -> list[Any]:
    """MONAI array transforms from the config's `augmentation:` entries for `image`."""
    import monai.transforms

    out = []
    for spec in specs:
        if spec.image in (image, "both"):
            out.append(getattr(monai.transforms, spec.name)(**spec.args))
    return out


def augment(x: torch.Tensor, transforms: Sequence[Any], seed: int) -> torch.Tensor:
    """Apply the transforms to each sample of a batch (on the batch's device); random
    transforms draw from a generator seeded per batch, so a resumed epoch repeats."""
    if not transforms:
        return x
    rng = np.random.RandomState(seed % 2**32)
    for t in transforms:
        if hasattr(t, "set_random_state"):
            t.set_random_state(state=rng)
    samples = []
    for sample in x:
        for t in transforms:
            sample = torch.as_tensor(t(sample))
        samples.append(sample)
    return torch.stack(samples)
