"""One EyeModel serving several threads at once: predictions and explanations from four
threads give what they give alone, and leave the shared network as they found it (its
mode, no hooks, no gradients, the same weights and batch-norm statistics)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from models.explain import Explanation, explain, private_copy
from models.model import EyeModel, ModelSpec, model_inputs
from preprocess.recipe import FundusRecipe, OctRecipe, Recipe

THREADS, ROUNDS = 4, 2
SPEC = {
    "input": "fusion",
    "fundus_network": "densenet121",
    "oct_network": "bscan-attention",
    "features": 16,
    "clinical": ["age"],
    "tasks": [
        {"name": "dr_grade", "kind": "ordinal", "classes": 5, "refer_from": 2},
        {"name": "glaucoma", "kind": "binary"},
    ],
}
RECIPE = Recipe(fundus=FundusRecipe(size=32), oct=OctRecipe(shape=(3, 32, 32)))


@pytest.fixture
def one_torch_thread_each() -> Iterator[None]:
    """Four Python threads on a 2-core machine: torch's own intra-op threads on top only
    oversubscribe the cores (the races under test are between the Python threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _hooks(net: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in net.modules())


def _model_and_inputs() -> tuple[EyeModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = EyeModel(ModelSpec.from_dict(SPEC), RECIPE)
    g = torch.Generator().manual_seed(1)
    fundus = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    oct_ = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    return model, model_inputs(model.spec, fundus, oct_, age=[50.0, 70.0])


def _same_or_both_none(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(a, b)


def _same_explanations(got: list[Explanation], want: list[Explanation]) -> bool:
    return len(got) == len(want) and all(
        g.bscan == w.bscan
        and np.array_equal(g.heatmap, w.heatmap)
        and _same_or_both_none(g.attention, w.attention)
        for g, w in zip(got, want, strict=True)
    )


def _same_predictions(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return got.keys() == want.keys() and all(
        got[t].keys() == want[t].keys() and all(np.array_equal(got[t][k], v) for k, v in e.items())
        for t, e in want.items()
    )


@pytest.mark.usefixtures("one_torch_thread_each")
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_predict_and_explain_from_four_threads_at_once(mode: str) -> None:
    model, x = _model_and_inputs()
    model.net.train(mode == "train")
    weights = {k: v.clone() for k, v in model.net.state_dict().items()}
    jobs: dict[str, Callable[[], Any]] = {
        "predict": lambda: model.predict(x),
        "explain fundus": lambda: explain(model, x, "dr_grade", image="fundus"),
        "explain oct": lambda: explain(model, x, "glaucoma", image="oct"),
    }
    alone = {name: job() for name, job in jobs.items()}  # one thread: the reference
    assert alone["explain oct"][0].attention is not None  # the attention path is exercised

    start = threading.Barrier(THREADS)
    mismatches: list[str] = []
    hooks_seen: list[int] = []
    failures: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            start.wait()
            names = list(jobs)
            for r in range(ROUNDS):
                for name in names[offset % 3 :] + names[: offset % 3]:  # interleave the kinds
                    hooks_seen.append(_hooks(model.net))
                    got = jobs[name]()
                    same = (
                        _same_predictions(got, alone[name])
                        if name == "predict"
                        else _same_explanations(got, alone[name])
                    )
                    if not same:
                        mismatches.append(f"thread {offset} round {r}: {name}")
        except BaseException as exc:  # reported below, with the thread's traceback
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if failures:
        raise failures[0]
    assert mismatches == []
    assert len(hooks_seen) == THREADS * ROUNDS * len(jobs)
    assert set(hooks_seen) == {0}  # no explanation ever hooked the shared network
    assert _hooks(model.net) == 0
    assert model.net.training == (mode == "train")
    assert {m.training for m in model.net.modules()} == {mode == "train"}
    assert [n for n, p in model.net.named_parameters() if p.grad is not None] == []
    after = model.net.state_dict()
    assert [k for k, v in weights.items() if not torch.equal(v, after[k])] == []


def test_a_reused_private_copy_explains_as_a_fresh_copy_does() -> None:
    """Scoring keeps one copy per thread: call after call it gives what a fresh copy
    gives, and carries no hooks or gradients from one call to the next."""
    model, x = _model_and_inputs()
    copy = private_copy(model.net)
    statistics = {k: v.clone() for k, v in copy.state_dict().items()}
    for image, task in (("fundus", "dr_grade"), ("oct", "glaucoma"), ("fundus", "glaucoma")):
        fresh = explain(model, x, task, image=image)
        for _ in range(2):
            assert _same_explanations(explain(model, x, task, image=image, net=copy), fresh)
            assert _hooks(copy) == 0
            assert [n for n, p in copy.named_parameters() if p.grad is not None] == []
            # still in eval mode: batch-norm statistics never move (the second sample's
            # attention pass once ran in training mode, after the first sample's Grad-CAM)
            assert {m.training for m in copy.modules()} == {False}
            after = copy.state_dict()
            assert [k for k, v in statistics.items() if not torch.equal(v, after[k])] == []
