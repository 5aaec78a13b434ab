"""Inference: scoring a new scan, the scoring service, and comparing tracked experiments.

No public names yet. Add them to `_SOURCES` (and the `TYPE_CHECKING` imports and
`__all__`): they are imported from their submodule on first use (PEP 562), so the
scoring service loads what a model needs and nothing of the ingest drivers or Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eyehub.lazy import lazy_exports

# public name -> the submodule that defines it, imported when the name is first used
_SOURCES: dict[str, str] = {}

__all__: list[str] = []

# mypy and editors see the names through `if TYPE_CHECKING:` imports of them (as in
# models/__init__.py); only the interpreter sees __getattr__, so a misspelt name is still
# a type error rather than Any
if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _SOURCES, globals())
