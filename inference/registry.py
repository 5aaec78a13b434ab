"""Which model scores: a registered version (`models:/eyehub-<name>@<alias>` or
`models:/eyehub-<name>/<version>`) or a local EyeModel directory.

A registered model is the MLflow pyfunc that training logs (training/pyfunc.py), whose
artifact `eyehub_model` is the saved EyeModel: its network, tasks, calibration, decision
thresholds and preprocessing recipe. Scoring loads that directory whole, so it uses
exactly the model's own recipe and thresholds. Downloads are cached under
`<EYEHUB_HOME>/cache/models/<name>/<version>/` (a version's files never change, so a
cached one is reused; an alias is resolved anew every time).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eyehub.errors import ModelError, NotFoundError, UsageError
from models.model import MANIFEST, EyeModel

log = logging.getLogger(__name__)

ARTIFACT = "eyehub_model"  # the pyfunc's artifact key (training.pyfunc.ARTIFACT)
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a registry name with an alias or version, or a path."""

    text: str
    name: str
    alias: str | None = None
    version: str | None = None
    path: Path | None = None

    @property
    def registered(self) -> bool:
        return self.path is None


def parse_model_ref(text: str) -> ModelRef:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, or the path of a model directory."""
    if text.startswith("models:/"):
        m = _REF.match(text)
        if m is None:
            raise UsageError(
                f"{text!r} is not a model reference; use models:/eyehub-<name>@<alias>, "
                "models:/eyehub-<name>/<version> or a model directory"
            )
        return ModelRef(text, m["name"], m["alias"], m["version"])
    path = Path(text).expanduser()
    inner = sorted(path.glob(f"artifacts/*/{MANIFEST}"))
    if not (path / MANIFEST).is_file() and inner:
        path = inner[0].parent  # a downloaded MLflow model directory
    return ModelRef(text, path.name, path=path)


@dataclass
class LoadedModel:
    """A model ready to score, with where it came from."""

    model: EyeModel
    ref: ModelRef
    version: str | None  # the registry version (None for a directory)
    run_id: str | None

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def alias(self) -> str | None:
        return self.ref.alias

    def describe(self) -> dict[str, Any]:
        """What a result and `GET /v1/model` say about the model."""
        spec = self.model.spec
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "reference": self.ref.text if self.ref.registered else None,
            "run_id": self.run_id,
            "input": spec.input,
            "tasks": [
                {"name": t.name, "kind": t.kind, "threshold": _threshold(self.model, t.name)}
                for t in spec.tasks
            ],
            "primary_task": self.model.info.get("primary_task"),
            "recipe_id": self.model.recipe_id,
        }


def _threshold(model: EyeModel, task: str) -> float | None:
    t = model.thresholds.get(task)
    return None if t is None else float(t.value)


def _client(tracking_uri: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def current_version(ref: ModelRef, tracking_uri: str) -> tuple[str, str | None]:
    """The registry version a reference names now, and its run id (an alias is looked up;
    the service polls this to notice an alias that moved)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        if ref.alias is not None:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            mv = client.get_model_version(ref.name, str(ref.version))
    except MlflowException as exc:
        what = f"alias {ref.alias!r}" if ref.alias else f"version {ref.version}"
        code = getattr(exc, "error_code", "")
        if "NOT_FOUND" in str(code) or "not found" in str(exc).lower():
            raise NotFoundError(
                f"no registered model {ref.name!r} with {what} in the tracking store "
                f"{_safe_uri(tracking_uri)}; train one (eyehub train) or check the name"
            ) from None
        raise ModelError(
            f"the tracking store {_safe_uri(tracking_uri)} could not be asked for "
            f"{ref.text} ({type(exc).__name__})"
        ) from None
    return str(mv.version), mv.run_id


def load_model(
    text: str, tracking_uri: str, cache: Path, device: str = "cpu", ref: ModelRef | None = None
) -> LoadedModel:
    """Load the model a reference names (see the module docstring)."""
    ref = ref or parse_model_ref(text)
    if ref.path is not None:
        model = EyeModel.load(ref.path, device)
        return LoadedModel(model, ref, None, model.info.get("run_id"))
    version, run_id = current_version(ref, tracking_uri)
    directory = cache / ref.name / version
    if not (directory / MANIFEST).is_file():
        _download(ref.name, version, tracking_uri, directory)
    try:
        model = EyeModel.load(directory, device)
    except ModelError:  # a damaged cache entry: fetch it again once
        shutil.rmtree(directory, ignore_errors=True)
        _download(ref.name, version, tracking_uri, directory)
        model = EyeModel.load(directory, device)
    log.debug("loaded %s version %s", ref.name, version)
    return LoadedModel(model, ref, version, run_id)


def _download(name: str, version: str, tracking_uri: str, directory: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=tmp
            )
        except Exception as exc:  # any MLflow or storage failure is the same missing model
            raise ModelError(
                f"the files of {name} version {version} could not be fetched from "
                f"{_safe_uri(tracking_uri)} ({type(exc).__name__})"
            ) from None
        # the pyfunc keeps the EyeModel directory under artifacts/<its folder's name>
        found = sorted(Path(local).glob(f"artifacts/*/{MANIFEST}"))
        source = found[0].parent if found else Path(local) / "artifacts" / ARTIFACT
        if not (source / MANIFEST).is_file():
            raise ModelError(
                f"{name} version {version} is not an eyehub model (no {ARTIFACT} artifact)"
            )
        shutil.rmtree(directory, ignore_errors=True)
        source.rename(directory)


def _safe_uri(uri: str) -> str:
    """A tracking URI without credentials (user:password@ in a URL)."""
    return re.sub(r"//[^/@]+@", "//***@", uri)
