"""Typed settings: YAML files validated into frozen pydantic models, with `--set` overrides.

Environment variables are read once, by `Environment.from_environ`, at the command-line
entry point; library code receives values, never reads `os.environ` itself.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from eyehub.errors import ConfigError, NotFoundError

DEFAULT_HOME = Path(".eyehub")


class Settings(BaseModel):
    """Base of every settings object: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        """Validate a plain mapping; errors name the dotted key that is wrong."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(_describe_validation_error(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings as plain JSON-able data (what gets logged to MLflow)."""
        return self.model_dump(mode="json")


S = TypeVar("S", bound=Settings)


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"'{key}': {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `--set a.b.c=value` override; the value is read as YAML (3 -> int)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` override applied."""
    result: dict[str, Any] = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"configuration file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of settings, not {type(data).__name__}")
    return data


def load_settings(cls: type[S], path: str | Path | None, overrides: Iterable[str] = ()) -> S:
    """Load `cls` from a YAML file (or its defaults when `path` is None) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    return cls.from_dict(apply_overrides(data, overrides))


@dataclass(frozen=True)
class Environment:
    """What eyehub takes from the environment, read once at the entry point."""

    home: Path
    key_file: Path | None
    tracking_uri: str | None
    ray_address: str | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Environment:
        env = os.environ if environ is None else environ
        key = env.get("EYEHUB_KEY_FILE")
        return cls(
            home=Path(env.get("EYEHUB_HOME", str(DEFAULT_HOME))),
            key_file=Path(key) if key else None,
            tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
            ray_address=env.get("RAY_ADDRESS") or None,
        )

    @property
    def default_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"
