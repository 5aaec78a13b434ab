"""Every error has the exit code the command line ends with and the HTTP status the scoring
service answers with, as the table in eyehub/errors.py documents them; a model's errors
are ModelErrors (422 for an input it cannot take)."""

from __future__ import annotations

import re

import pytest
import torch

import eyehub.errors as errors
from eyehub.errors import EyehubError, ModelError
from models.model import EyeNet, ModelSpec
from preprocess.recipe import FundusRecipe, Recipe


def _all_subclasses(cls: type[EyehubError]) -> set[type[EyehubError]]:
    found = set(cls.__subclasses__())
    return found.union(*(_all_subclasses(c) for c in found))


def _documented() -> dict[str, tuple[int, int]]:
    """error name -> (exit code, HTTP status) from the table in the module docstring."""
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| (\d+) \| (\d+) \|$", errors.__doc__ or "", re.M)
    return {name: (int(code), int(status)) for name, code, status in rows}


def test_every_error_has_an_exit_code_and_an_http_error_status() -> None:
    classes = {EyehubError} | _all_subclasses(EyehubError)
    assert {"ModelError", "PayloadTooLargeError", "ServiceUnavailableError"} <= {
        c.__name__ for c in classes
    }
    for cls in classes:
        assert type(cls.exit_code) is int and cls.exit_code > 0, cls
        assert type(cls.http_status) is int and 400 <= cls.http_status <= 599, cls


def test_the_documented_table_is_what_the_classes_say() -> None:
    table = _documented()
    defined = {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, EyehubError)
    }
    assert set(table) == set(defined)
    for name, (exit_code, status) in table.items():
        assert (defined[name].exit_code, defined[name].http_status) == (exit_code, status), name


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("EyehubError", 500),
        ("UsageError", 400),
        ("ConfigError", 400),
        ("InputError", 400),
        ("NotFoundError", 404),
        ("PayloadTooLargeError", 413),
        ("ModelError", 422),
        ("ServiceUnavailableError", 503),
    ],
)
def test_the_statuses_the_service_answers_with(name: str, status: int) -> None:
    assert getattr(errors, name).http_status == status


def test_errors_still_are_the_builtins_callers_know() -> None:
    assert issubclass(ModelError, ValueError)
    assert issubclass(errors.PayloadTooLargeError, ValueError)
    assert issubclass(errors.ServiceUnavailableError, RuntimeError)
    assert issubclass(errors.NotFoundError, FileNotFoundError)


def test_an_input_the_model_cannot_take_answers_422() -> None:
    spec = ModelSpec.from_dict({"features": 8, "tasks": [{"name": "amd", "kind": "binary"}]})
    net = EyeNet(spec, Recipe(fundus=FundusRecipe(size=32))).eval()
    with pytest.raises(EyehubError) as caught:
        net(fundus=torch.zeros(1, 1, 32, 32))  # grey, where the network takes RGB
    assert isinstance(caught.value, ModelError) and caught.value.http_status == 422
