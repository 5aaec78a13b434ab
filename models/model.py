"""What a trained model is: its settings, networks, task heads, calibration, thresholds and
the preprocessing recipe it was trained on, saved and loaded as one unit.

A saved model is a directory (what MLflow stores as the model's artifacts):

    eyehub-model.json   format version, ModelSpec, Recipe and recipe_id, per-task
                        temperatures and thresholds, free-form provenance (`info`)
    weights.pt          the network's state dict (loaded with weights_only=True)

Inputs are the prepared uint8 tensors of preprocess (fundus [B, 3, S, S], OCT
[B, D, H, W]); `model_inputs` turns them into the networks' float inputs, so training and
scoring cannot normalise differently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from eyehub.errors import ConfigError, DatasetError, NotFoundError
from eyehub.settings import Settings
from models.calibration import (
    DEFAULT_SENSITIVITY,
    Threshold,
    calibrated_probability,
    fit_temperature,
    threshold_at_sensitivity,
)
from models.networks import (
    FEATURES,
    FUNDUS_NETWORKS,
    GRADCAM_LAYERS,
    OCT_NETWORKS,
    fundus_encoder,
    oct_encoder,
)
from models.pretrained import LoadReport, load_pretrained
from models.tasks import (
    MultiTaskHeads,
    TaskSpec,
    decision_score,
    ordinal_cumulative,
    ordinal_probabilities,
)
from preprocess.recipe import Recipe, recipe_id

FORMAT = "eyehub-model"
FORMAT_VERSION = 1
MANIFEST = "eyehub-model.json"
WEIGHTS = "weights.pt"

# ImageNet statistics: what pretrained 2-D backbones (and RETFound) were trained with
_RGB_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_RGB_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
_AGE_MEAN, _AGE_STD = 60.0, 15.0
_SEX_CODES = {"M": 1.0, "F": 0.0}  # anything else (unknown): 0.5


class ModelSpec(Settings):
    """The `model:` section of a training config."""

    input: Literal["fundus", "oct", "fusion"] = "fundus"
    fundus_network: str = "densenet121"
    oct_network: str = "bscan-attention"
    features: int = Field(default=FEATURES, ge=8, description="shared feature vector width")
    clinical: tuple[Literal["age", "sex"], ...] = Field(
        default=(), description="clinical inputs joined to the image features"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="before the task heads")
    pretrained: Path | None = Field(
        default=None, description="local weights for the fundus network (the OCT one if input=oct)"
    )
    oct_pretrained: Path | None = Field(
        default=None, description="fusion: local weights for the OCT network"
    )
    tasks: tuple[TaskSpec, ...] = Field(min_length=1)

    @field_validator("fundus_network")
    @classmethod
    def _fundus(cls, v: str) -> str:
        if v not in FUNDUS_NETWORKS:
            raise ValueError(f"unknown fundus network {v!r}; choose one of {FUNDUS_NETWORKS}")
        return v

    @field_validator("oct_network")
    @classmethod
    def _oct(cls, v: str) -> str:
        if v not in OCT_NETWORKS:
            raise ValueError(f"unknown OCT network {v!r}; choose one of {OCT_NETWORKS}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique; got {names}")
        if len(set(self.clinical)) != len(self.clinical):
            raise ValueError("clinical inputs must not repeat")
        if self.oct_pretrained is not None and self.input != "fusion":
            raise ValueError("oct_pretrained applies to input=fusion; use pretrained")
        return self

    @property
    def uses_fundus(self) -> bool:
        return self.input in ("fundus", "fusion")

    @property
    def uses_oct(self) -> bool:
        return self.input in ("oct", "fusion")


class EyeNet(nn.Module):
    """Encoders for the spec's inputs, late fusion, and one head per task.

    forward(fundus, oct, clinical) -> {task: raw output}: binary and regression (B, 1),
    ordinal (B, K-1) CORAL logits."""

    def __init__(self, spec: ModelSpec, recipe: Recipe) -> None:
        super().__init__()
        self.spec = spec
        _check_shapes(spec, recipe)
        self.fundus = (
            fundus_encoder(spec.fundus_network, recipe.fundus.size, spec.features)
            if spec.uses_fundus
            else None
        )
        self.oct = oct_encoder(spec.oct_network, spec.features) if spec.uses_oct else None
        parts = int(self.fundus is not None) + int(self.oct is not None)
        width = parts * spec.features + len(spec.clinical)
        self.fuse = (
            nn.Sequential(nn.Linear(width, spec.features), nn.ReLU())
            if width != spec.features
            else None
        )
        self.dropout = nn.Dropout(spec.dropout)
        self.heads = MultiTaskHeads(spec.features, list(spec.tasks))

    def load_pretrained(self) -> list[LoadReport]:
        """Fill the encoders from the spec's local pretrained files; what loaded, and not."""
        reports = []
        if self.spec.pretrained is not None:
            target = self.fundus if self.fundus is not None else self.oct
            assert target is not None  # one encoder always exists
            reports.append(load_pretrained(target, self.spec.pretrained))
        if self.spec.oct_pretrained is not None and self.oct is not None:
            reports.append(load_pretrained(self.oct, self.spec.oct_pretrained))
        return reports

    def gradcam_layers(self) -> dict[str, str]:
        """Grad-CAM target layer names (of this module) per image input."""
        layers = {}
        if self.fundus is not None:
            layers["fundus"] = "fundus." + GRADCAM_LAYERS[self.spec.fundus_network]
        if self.oct is not None:
            layers["oct"] = "oct." + GRADCAM_LAYERS[self.spec.oct_network]
        return layers

    def forward(
        self,
        fundus: torch.Tensor | None = None,
        oct: torch.Tensor | None = None,
        clinical: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        parts = []
        if self.fundus is not None:
            if fundus is None:
                raise DatasetError("this model needs a fundus image")
            parts.append(self.fundus(fundus))
        if self.oct is not None:
            if oct is None:
                raise DatasetError("this model needs an OCT volume")
            parts.append(self.oct(oct))
        if self.spec.clinical:
            if clinical is None:
                raise DatasetError(f"this model needs clinical inputs {list(self.spec.clinical)}")
            parts.append(clinical.to(parts[0].dtype))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.fuse is not None:
            x = self.fuse(x)
        result: dict[str, torch.Tensor] = self.heads(self.dropout(x))
        return result


# DenseNet and ResNet downsample 32 times and pool 2x2 after their 4th stage
_MIN_SIDE = 32


def _check_shapes(spec: ModelSpec, recipe: Recipe) -> None:
    """Refuse, naming the recipe key, input shapes the chosen networks cannot take."""
    if spec.uses_fundus and recipe.fundus.size < _MIN_SIDE:
        raise ConfigError(f"recipe fundus.size must be at least {_MIN_SIDE} for the networks")
    if spec.uses_oct:
        d, h, w = recipe.oct.shape
        need = (
            (_MIN_SIDE,) * 3 if spec.oct_network == "densenet121-3d" else (1, _MIN_SIDE, _MIN_SIDE)
        )
        if d < need[0] or h < need[1] or w < need[2]:
            raise ConfigError(
                f"recipe oct.shape {list(recipe.oct.shape)} is too small for {spec.oct_network}; "
                f"it needs at least {list(need)} (B-scans, depth, A-scans)"
            )


def _age_code(age: float | None) -> float:
    """Standardised age; a missing one (None or NaN, which is not equal to itself) the mean."""
    return 0.0 if age is None or age != age else (float(age) - _AGE_MEAN) / _AGE_STD


def model_inputs(
    spec: ModelSpec,
    fundus: torch.Tensor | np.ndarray | None = None,
    oct: torch.Tensor | np.ndarray | None = None,
    age: Sequence[float | None] | None = None,
    sex: Sequence[str | None] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Prepared uint8 tensors (and age, sex) as the network's float inputs.

    Fundus [B, 3, S, S] is scaled to 0-1 and standardised with ImageNet statistics; OCT
    [B, D, H, W] is scaled to -1..1 with a channel axis added. Age is standardised (a
    missing age counts as the mean); sex is 1 for M, 0 for F, 0.5 when unknown; with no
    age or sex list at all, every sample counts as unknown."""
    out: dict[str, torch.Tensor] = {}
    if spec.uses_fundus and fundus is not None:
        f = torch.as_tensor(fundus).to(device).float() / 255.0
        out["fundus"] = (f - _RGB_MEAN.to(f.device)) / _RGB_STD.to(f.device)
    if spec.uses_oct and oct is not None:
        o = torch.as_tensor(oct).to(device).float()
        out["oct"] = (o / 127.5 - 1.0)[:, None]
    if spec.clinical:
        columns = []
        images = list(out.values())
        n = len(images[0]) if images else len(age) if age is not None else len(sex or [])
        for values, name in ((age, "age"), (sex, "sex")):
            if values is not None and len(values) != n:
                raise DatasetError(f"{name} has {len(values)} values for a batch of {n}")
        ages = age if age is not None else [None] * n
        sexes = sex if sex is not None else [None] * n
        for name in spec.clinical:
            if name == "age":
                columns.append([_age_code(a) for a in ages])
            else:
                columns.append([_SEX_CODES.get(str(s_).upper(), 0.5) for s_ in sexes])
        out["clinical"] = torch.tensor(columns, dtype=torch.float32, device=device).T
    return out


class EyeModel:
    """A trained model as one unit: networks, tasks, calibration, thresholds, recipe."""

    def __init__(
        self,
        spec: ModelSpec,
        recipe: Recipe,
        net: EyeNet | None = None,
        temperatures: Mapping[str, float] | None = None,
        thresholds: Mapping[str, Threshold] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.recipe = recipe
        self.net = net if net is not None else EyeNet(spec, recipe)
        self.temperatures = dict(temperatures or {})
        self.thresholds = dict(thresholds or {})
        self.info = dict(info or {})

    @classmethod
    def create(cls, spec: ModelSpec, recipe: Recipe) -> EyeModel:
        """A new, untrained model, its encoders filled from the spec's pretrained files;
        what loaded is kept in `info["pretrained"]`."""
        model = cls(spec, recipe)
        reports = model.net.load_pretrained()
        if reports:
            model.info["pretrained"] = [r.to_dict() for r in reports]
        return model

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.spec.tasks

    @property
    def recipe_id(self) -> str:
        return recipe_id(self.recipe)

    def task(self, name: str) -> TaskSpec:
        for t in self.spec.tasks:
            if t.name == name:
                return t
        raise ConfigError(
            f"the model has no task {name!r}; it has {', '.join(t.name for t in self.tasks)}"
        )

    # -- prediction ---------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
        """Calibrated predictions per task, for a batch of network inputs:

        binary: `probability`, `refer` (when a threshold is set); ordinal: `grades` (B, K)
        and `grade`, plus `probability` of referral and `refer` with refer_from;
        regression: `value` in the target's units."""
        self.net.eval()
        outputs = self.net(**inputs)
        result: dict[str, dict[str, np.ndarray]] = {}
        for t in self.tasks:
            out = outputs[t.name].float()
            temperature = self.temperatures.get(t.name, 1.0)
            entry: dict[str, np.ndarray] = {}
            if t.kind == "regression":
                entry["value"] = (out[:, 0] * t.std + t.mean).cpu().numpy()
            if t.kind == "ordinal":
                grades = ordinal_probabilities(out / temperature)
                entry["grades"] = grades.cpu().numpy()
                entry["grade"] = grades.argmax(dim=1).cpu().numpy()
                if t.refer_from is not None:
                    cumulative = ordinal_cumulative(out / temperature)
                    entry["probability"] = cumulative[:, t.refer_from - 1].cpu().numpy()
            if t.kind == "binary":
                logit = decision_score(t, out).cpu().numpy()
                entry["probability"] = calibrated_probability(logit, temperature)
            if "probability" in entry and t.name in self.thresholds:
                entry["refer"] = entry["probability"] >= self.thresholds[t.name].value
            result[t.name] = entry
        return result

    def calibrate(
        self,
        outputs: Mapping[str, np.ndarray | torch.Tensor],
        labels: Mapping[str, np.ndarray],
        target_sensitivity: float = DEFAULT_SENSITIVITY,
    ) -> None:
        """Fit each yes/no task's temperature and threshold on validation outputs.

        `outputs` are the raw network outputs per task ([N, 1] or [N, K-1]); `labels` the
        task's labels (NaN where missing; ordinal grades are turned into refer/not)."""
        for t in self.tasks:
            if not t.decides:
                continue
            raw = torch.as_tensor(outputs[t.name]).detach().cpu()
            logit = decision_score(t, raw).double().numpy()
            y = np.asarray(labels[t.name], dtype=np.float64)
            if t.kind == "ordinal":
                assert t.refer_from is not None
                y = np.where(np.isnan(y), np.nan, (y >= t.refer_from).astype(np.float64))
            temperature = fit_temperature(logit, y, t.name)
            self.temperatures[t.name] = temperature
            self.thresholds[t.name] = threshold_at_sensitivity(
                calibrated_probability(logit, temperature), y, target_sensitivity, t.name
            )

    # -- persistence --------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "recipe": self.recipe.to_dict(),
            "recipe_id": self.recipe_id,
            "temperatures": self.temperatures,
            "thresholds": {k: v.to_dict() for k, v in self.thresholds.items()},
            "info": self.info,
        }

    def save(self, path: Path) -> Path:
        """Write the model directory at `path` (replacing one there) and return it.

        Written beside it first and renamed into place, so a reader never sees half a model."""
        path = Path(path)
        staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            weights = staging / WEIGHTS
            state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
            torch.save(state, weights)
            manifest = self.manifest()
            manifest["weights_sha256"] = _sha256(weights)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            if path.exists():
                old = path.with_name(f".{path.name}.{os.getpid()}.old")
                os.replace(path, old)
                os.replace(staging, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> EyeModel:
        """Read a model directory written by `save`."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise NotFoundError(f"no eyehub model at {path} (expected {MANIFEST} in it)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DatasetError(f"{manifest_path} is not valid JSON; the model is damaged") from None
        if manifest.get("format") != FORMAT:
            raise DatasetError(f"{path} is not an eyehub model (format {manifest.get('format')!r})")
        if manifest.get("version") != FORMAT_VERSION:
            raise DatasetError(
                f"{path} is an eyehub model of format version {manifest.get('version')}; this "
                f"eyehub reads version {FORMAT_VERSION} (use the eyehub that trained it)"
            )
        weights = path / WEIGHTS
        if not weights.is_file() or _sha256(weights) != manifest.get("weights_sha256"):
            raise DatasetError(f"{weights} is missing or does not match the model's manifest")
        spec = ModelSpec.from_dict(manifest["spec"])
        recipe = Recipe.from_dict(manifest["recipe"])
        net = EyeNet(spec, recipe)  # built bare: its pretrained files are not reread
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.to(device).eval()
        model = cls(
            spec,
            recipe,
            net,
            {k: float(v) for k, v in manifest["temperatures"].items()},
            {k: Threshold.from_dict(v) for k, v in manifest["thresholds"].items()},
            manifest.get("info", {}),
        )
        return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
