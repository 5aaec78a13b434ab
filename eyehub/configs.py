"""The configuration files eyehub ships: `configs/<kind>/<name>.yaml`, found when installed.

The top-level `configs/` directory of the repository is installed as the package
`eyehub_configs` (pyproject.toml maps that package name to the directory and ships its
`**/*.yaml` as package data), so a non-editable install (a service image) sees the same
files as a source checkout, without the source tree. Commands take either a path to a YAML
file or the name of a shipped config (`--recipe small`); `resolve_config` decides which.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from eyehub.errors import NotFoundError

CONFIG_PACKAGE = "eyehub_configs"
SUFFIX = ".yaml"


def _root() -> Path:
    """The installed configs/ directory (site-packages/eyehub_configs, or the checkout's
    configs/ in an editable install).

    Found through the import system's spec rather than `importlib.resources.files`: the
    package has no `__init__.py` (configs/ holds only YAML), and on Python 3.11 `files()` of
    a namespace package fails on the placeholder entry setuptools' editable finder puts in
    its search path."""
    spec = importlib.util.find_spec(CONFIG_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    raise NotFoundError(
        f"eyehub's shipped configs (package {CONFIG_PACKAGE}) are not installed; reinstall eyehub"
    )


def config_kinds() -> list[str]:
    """The kinds of shipped config (the subdirectories of configs/: model, preprocess, ...)."""
    return sorted(entry.name for entry in _root().iterdir() if entry.is_dir())


def shipped_configs(kind: str) -> list[str]:
    """The names (without .yaml) of the configs of `kind` that ship with eyehub, sorted."""
    folder = _root() / kind
    if not folder.is_dir():
        return []
    return sorted(
        entry.name.removesuffix(SUFFIX)
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(SUFFIX)
    )


def resolve_config(kind: str, name_or_path: str | Path) -> Path:
    """The YAML file meant by `name_or_path`: an existing file as is, else a shipped config.

    `"small"` and `"small.yaml"` both name `configs/<kind>/small.yaml`. Anything else (a
    path that does not exist, an unknown name) raises `NotFoundError` listing the shipped
    names of `kind`.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs(kind)
    offer = f"shipped {kind} configs: {', '.join(shipped) or '(none)'}"
    if len(path.parts) != 1 or path.name in ("", ".", ".."):
        raise NotFoundError(f"configuration file {path} does not exist; {offer}")
    name = path.name.removesuffix(SUFFIX)
    if name not in shipped:
        raise NotFoundError(f"no file {path} and no shipped {kind} config '{name}'; {offer}")
    return _root() / kind / f"{name}{SUFFIX}"
