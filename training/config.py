"""Training configs: `configs/train/<name>.yaml` validated into `TrainConfig`.

A training config holds `model:` (a ModelSpec whose tasks may be written as bare label
names: their kind, classes and units come from the label registry), `preprocess:` (a
shipped recipe's name, a path, or the recipe inline), `split:`, `training:`,
`augmentation:` (MONAI transforms by name with their arguments) and `evaluation:`. Every
key is documented in docs/training.md; an unknown key is refused naming it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from eyehub.configs import resolve_config
from eyehub.errors import ConfigError
from eyehub.labels import label_spec
from eyehub.settings import Settings, apply_overrides, read_yaml
from models.model import ModelSpec
from preprocess.recipe import Recipe


class SplitSpec(Settings):
    """Patient-level train / validation / test split (or k folds of train + validation)."""

    seed: int = 0
    val: float = Field(default=0.2, gt=0, lt=0.5, description="share of patients")
    test: float = Field(default=0.2, gt=0, lt=0.5, description="share of patients")
    stratify: str | None = Field(default=None, description="task to stratify on; primary")
    folds: int | None = Field(default=None, ge=2, description="k-fold over train + val")
    fold: int = Field(default=0, ge=0, description="which fold is validation (with folds)")

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"split.fold must be below split.folds ({self.folds})")
        return self


class EarlyStopping(Settings):
    metric: str | None = Field(
        default=None, description="validation metric key, e.g. val/referable_dr/auroc"
    )
    mode: Literal["max", "min"] = "max"
    patience: int = Field(default=5, ge=1, description="epochs without improvement")


class TrainingSpec(Settings):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=16, ge=1, description="per worker")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)
    layer_decay: float | None = Field(
        default=None, gt=0, le=1, description="layer-wise lr decay (ViT fine-tuning)"
    )
    amp: bool = Field(default=True, description="bf16 autocast on CUDA (ignored on CPU)")
    grad_clip: float | None = Field(default=None, gt=0)
    early_stopping: EarlyStopping = EarlyStopping()
    seed: int = 0
    max_failures: int = Field(default=1, ge=0, description="worker failures recovered")
    checkpoints_kept: int = Field(default=2, ge=1)


class Augmentation(Settings):
    """One MONAI array transform by name (`monai.transforms.<name>`), with its arguments;
    applied per sample to fundus (C, H, W) or OCT (1, D, H, W) training inputs."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    image: Literal["fundus", "oct", "both"] = "both"


class EvaluationSpec(Settings):
    bootstrap: int = Field(default=1000, ge=0, description="patient bootstrap resamples")
    ci: float = Field(default=0.95, gt=0, lt=1)
    target_sensitivity: float = Field(default=0.90, gt=0, lt=1)
    subgroups: tuple[Literal["sex", "age_band", "site"], ...] = ("sex", "age_band", "site")
    age_bands: tuple[float, ...] = (50.0, 65.0, 75.0)
    min_group_size: int = Field(default=30, ge=1)
    min_group_positives: int = Field(default=10, ge=1)
    control_tolerance: float = Field(
        default=0.1, gt=0, description="a control's test AUROC further than this from 0.5 warns"
    )


class TrainConfig(Settings):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: ModelSpec
    preprocess: Recipe
    primary_task: str
    controls: tuple[str, ...] = Field(
        default=(), description="label columns with no cause in the images: must stay at chance"
    )
    split: SplitSpec = SplitSpec()
    training: TrainingSpec = TrainingSpec()
    augmentation: tuple[Augmentation, ...] = ()
    evaluation: EvaluationSpec = EvaluationSpec()

    @field_validator("augmentation")
    @classmethod
    def _transforms(cls, v: tuple[Augmentation, ...]) -> tuple[Augmentation, ...]:
        import monai.transforms

        for aug in v:
            if not hasattr(monai.transforms, aug.name):
                raise ValueError(f"augmentation: MONAI has no transform {aug.name!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        names = [t.name for t in self.model.tasks]
        if self.primary_task not in names:
            raise ValueError(f"primary_task {self.primary_task!r} is not one of the tasks {names}")
        for c in self.controls:
            if c not in names:
                raise ValueError(f"control {c!r} must also be a task (it is trained like one)")
        both = set(names) & set(self.model.clinical)
        if both:
            raise ValueError(
                f"task(s) {sorted(both)} are also clinical inputs (model.clinical): the model "
                "would read the answer off its own input; drop one of the two"
            )
        if self.split.stratify is not None and self.split.stratify not in names:
            raise ValueError(f"split.stratify {self.split.stratify!r} is not a task")
        metric = self.training.early_stopping.metric
        if metric is not None and (not metric.startswith("val/") or metric.count("/") != 2):
            raise ValueError("training.early_stopping.metric must look like val/<task>/<metric>")
        return self

    @property
    def stratify(self) -> str:
        return self.split.stratify or self.primary_task

    @property
    def early_stopping_metric(self) -> str:
        """The validation metric that picks the best epoch (and stops early)."""
        if self.training.early_stopping.metric:
            return self.training.early_stopping.metric
        return f"val/{self.primary_task}/{MAIN_METRIC[label_spec(self.primary_task).kind]}"

    @property
    def early_stopping_mode(self) -> str:
        if self.training.early_stopping.metric:
            return self.training.early_stopping.mode
        return "min" if label_spec(self.primary_task).kind == "regression" else "max"


MAIN_METRIC = {"binary": "auroc", "ordinal": "qwk", "regression": "mae"}


def _task_entry(entry: Any) -> dict[str, Any]:
    """A task written as a bare label name or a mapping, completed from the registry."""
    raw = {"name": entry} if isinstance(entry, str) else dict(entry)
    name = raw.get("name")
    if not isinstance(name, str):
        raise ConfigError("model.tasks: every task needs a name (a label column)")
    spec = label_spec(name)
    kind = raw.setdefault("kind", spec.kind)
    if kind != spec.kind:
        raise ConfigError(
            f"model.tasks: '{name}' is a {spec.kind} label in the label registry, not {kind}"
        )
    if spec.kind == "ordinal":
        raw.setdefault("classes", spec.classes)
    return raw


def resolve_train_config(raw: Mapping[str, Any]) -> TrainConfig:
    """Validate a config mapping: tasks completed from the label registry, the recipe
    read from its name or path, every error naming its key."""
    data: dict[str, Any] = copy.deepcopy(dict(raw))
    model = data.get("model")
    if isinstance(model, Mapping) and isinstance(model.get("tasks"), list):
        model = dict(model)
        model["tasks"] = [_task_entry(t) for t in model["tasks"]]
        data["model"] = model
    recipe = data.get("preprocess", "default")
    if isinstance(recipe, str | Path):
        data["preprocess"] = read_yaml(resolve_config("preprocess", recipe))
    return TrainConfig.from_dict(data)


def load_train_config(name_or_path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """A shipped training config's name (`fundus_demo`) or a YAML path, plus `--set`s."""
    path = resolve_config("train", name_or_path)
    return resolve_train_config(apply_overrides(read_yaml(path), overrides))
