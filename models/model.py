"""What a trained model is: its settings, networks, task heads, calibration, thresholds and
the preprocessing recipe it was trained on, saved and loaded as one unit.

A saved model is a directory (what MLflow stores as the model's artifacts):

    eyehub-model.json   format version, ModelSpec, Recipe and recipe_id, per-task
                        temperatures and thresholds, free-form provenance (`info`)
    weights.pt          the network's state dict (loaded with weights_only=True)

Inputs are the prepared uint8 tensors of preprocess (fundus [B, 3, S, S], OCT
[B, D, H, W]); `model_inputs` turns them into the networks' float inputs, so training and
scoring cannot normalise differently.

Several threads may predict with one `EyeModel` at once: a forward pass stores nothing on
a module, and `predict` leaves the network in the train/eval mode it found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from eyehub.errors import ConfigError, ModelError, NotFoundError
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
    VIT_SIZES,
    BScanAttention,
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
# Held while `predict` switches a network in training mode to eval and back (see
# EyeModel._eval_outputs). A network in eval mode (loaded for scoring) is never switched,
# and predictions on it take no lock.
_MODE_SWITCH = threading.Lock()


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
    ordinal (B, K-1) CORAL logits. `forward_with_attention` also returns the OCT
    attention over B-scans (bscan-attention). Inputs the network cannot take (missing, of
    the wrong shape or type) are refused with a `ModelError`."""

    def __init__(self, spec: ModelSpec, recipe: Recipe) -> None:
        super().__init__()
        self.spec = spec
        _check_shapes(spec, recipe)
        # the ViT's position grid is fixed by the recipe's size; the CNNs take any size
        self.fixed_fundus_size = (
            recipe.fundus.size if spec.uses_fundus and spec.fundus_network in VIT_SIZES else None
        )
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
        return self.forward_with_attention(fundus, oct, clinical)[0]

    def forward_with_attention(
        self,
        fundus: torch.Tensor | None = None,
        oct: torch.Tensor | None = None,
        clinical: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """{task: raw output} and, for a bscan-attention OCT network, its attention (B, D)
        over the B-scans (None for other networks)."""
        self.check_inputs(fundus, oct, clinical)
        parts = []
        attention = None
        if self.fundus is not None and fundus is not None:
            parts.append(self.fundus(fundus))
        if self.oct is not None and oct is not None:
            if isinstance(self.oct, BScanAttention):
                features, attention = self.oct.forward_with_attention(oct)
                parts.append(features)
            else:
                parts.append(self.oct(oct))
        if self.spec.clinical and clinical is not None:
            parts.append(clinical.to(parts[0].dtype))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.fuse is not None:
            x = self.fuse(x)
        result: dict[str, torch.Tensor] = self.heads(self.dropout(x))
        return result, attention

    def check_inputs(
        self,
        fundus: torch.Tensor | None = None,
        oct: torch.Tensor | None = None,
        clinical: torch.Tensor | None = None,
    ) -> None:
        """Raise ModelError for inputs the networks cannot take (a missing input, integer
        pixels, a wrong layout or too small a side, batch sizes that differ), naming what is
        wrong, instead of letting a network fail with a shape mismatch."""
        batch: dict[str, int] = {}
        if self.fundus is not None:
            fundus = _check_image("fundus image", fundus, "(B, 3, S, S)", (3, _MIN_SIDE, _MIN_SIDE))
            side = self.fixed_fundus_size
            if side is not None and tuple(fundus.shape[2:]) != (side, side):
                raise ModelError(
                    f"the fundus image is {list(fundus.shape[2:])}; this "
                    f"{self.spec.fundus_network} model takes [{side}, {side}] "
                    "(the recipe's fundus.size)"
                )
            batch["fundus"] = fundus.shape[0]
        if self.oct is not None:
            depth = _MIN_SIDE if self.spec.oct_network == "densenet121-3d" else 1
            oct = _check_image(
                "OCT volume", oct, "(B, 1, D, H, W)", (1, depth, _MIN_SIDE, _MIN_SIDE)
            )
            batch["oct"] = oct.shape[0]
        if self.spec.clinical:
            want = len(self.spec.clinical)
            if clinical is None:
                raise ModelError(f"this model needs clinical inputs {list(self.spec.clinical)}")
            if clinical.ndim != 2 or clinical.shape[1] != want:
                raise ModelError(
                    f"clinical inputs have shape {list(clinical.shape)}; this model takes "
                    f"(B, {want}): {list(self.spec.clinical)}"
                )
            batch["clinical"] = clinical.shape[0]
        if len(set(batch.values())) > 1:
            raise ModelError(f"the inputs' batch sizes differ: {batch}")


# DenseNet and ResNet downsample 32 times and pool 2x2 after their 4th stage
_MIN_SIDE = 32


def _check_image(
    what: str, x: torch.Tensor | None, layout: str, least: tuple[int, ...]
) -> torch.Tensor:
    """`x` when it is a float tensor of the layout, with the channels least[0] and each
    spatial side at least least[1:]; a ModelError naming what is wrong otherwise."""
    if x is None:
        raise ModelError(f"this model needs {'an' if what[0] in 'AEIOU' else 'a'} {what}")
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelError(
            f"the {what} is {kind}; the network takes float tensors "
            "(pass prepared uint8 tensors through models.model_inputs)"
        )
    shape = list(x.shape)
    if x.ndim != len(least) + 1 or shape[1] != least[0]:
        raise ModelError(f"the {what} has shape {shape}; this model takes {layout}")
    if any(n < m for n, m in zip(shape[2:], least[1:], strict=True)):
        raise ModelError(
            f"the {what} has shape {shape}; this model takes {layout} with the sides after "
            f"the channel at least {list(least[1:])}"
        )
    return x


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
                raise ModelError(f"{name} has {len(values)} values for a batch of {n}")
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
        self._switched = False  # predict has switched a training network to eval for now

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
        regression: `value` in the target's units.

        Runs in eval mode and leaves the network in the mode it found."""
        outputs = self._eval_outputs(inputs)
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

    def _eval_outputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network's outputs in eval mode. A network in eval mode is only read, so any
        number of threads share it; one in training mode is switched to eval and back under
        a lock, and `_switched` (set before the switch, cleared after the switch back) sends
        a prediction that finds it in eval mode meanwhile to wait for the lock as well."""
        if not self.net.training and not self._switched:
            result: dict[str, torch.Tensor] = self.net(**inputs)
            return result
        with _MODE_SWITCH:
            was_training = self.net.training
            self._switched = True
            self.net.eval()
            try:
                result = self.net(**inputs)
            finally:
                self.net.train(was_training)
                self._switched = False
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
        """Read a model directory written by `save`, in eval mode.

        Raises NotFoundError when there is no model at `path`, ModelError when the model
        is damaged, foreign, or of a format version this eyehub does not read."""
        path = Path(path)
        manifest = _read_manifest(path)
        weights = path / WEIGHTS
        if not weights.is_file() or _sha256(weights) != manifest.get("weights_sha256"):
            raise ModelError(f"{weights} is missing or does not match the model's manifest")
        try:
            spec = ModelSpec.from_dict(manifest["spec"])
            recipe = Recipe.from_dict(manifest["recipe"])
            temperatures = {k: float(v) for k, v in manifest["temperatures"].items()}
            thresholds = {k: Threshold.from_dict(v) for k, v in manifest["thresholds"].items()}
        except (KeyError, AttributeError, TypeError, ValueError) as exc:  # ConfigError too
            raise ModelError(f"{path / MANIFEST} is damaged: {exc}") from None
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file is the same damaged model
            raise ModelError(
                f"{weights} cannot be read safely as weights ({type(exc).__name__}); "
                "the model is damaged"
            ) from None
        net = EyeNet(spec, recipe)  # built bare: its pretrained files are not reread
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            detail = " ".join(str(exc).split())
            raise ModelError(
                f"{weights} does not fit the network the manifest describes; the model is "
                f"damaged ({detail[:300]})"
            ) from None
        net.to(device).eval()
        return cls(spec, recipe, net, temperatures, thresholds, manifest.get("info", {}))


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise NotFoundError(f"no eyehub model at {path} (expected {MANIFEST} in it)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{manifest_path} is not valid JSON; the model is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ModelError(f"{path} is not an eyehub model (format {found!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ModelError(
            f"{path} is an eyehub model of format version {manifest.get('version')}; this "
            f"eyehub reads version {FORMAT_VERSION} (use the eyehub that trained it)"
        )
    return manifest


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
