"""Explanations: a model trained to find a planted lesion cluster must point at it, and
the OCT network's attention must point at the B-scan that holds the lesion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.visualize.class_activation_maps import default_upsampler

from models.explain import explain
from models.model import EyeModel, ModelSpec, model_inputs
from models.networks import FUNDUS_NETWORKS
from models.tasks import multitask_loss
from preprocess.recipe import FundusRecipe, OctRecipe, Recipe
from tests.models.lesions import lesion_images

SIZE, STRIDE = 128, 32  # DenseNet121's last feature map is 1/32 of the input


def _train(model: EyeModel, inputs: dict[str, torch.Tensor], y: torch.Tensor, epochs: int) -> None:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.net.parameters(), lr=1e-3)
    task = list(model.tasks)
    n = len(y)
    for _ in range(epochs):
        model.net.train()
        for idx in torch.randperm(n).split(8):
            opt.zero_grad()
            outputs = model.net(**{k: v[idx] for k, v in inputs.items()})
            loss, _ = multitask_loss(task, outputs, {task[0].name: y[idx]})
            loss.backward()
            opt.step()
    model.net.eval()


@pytest.fixture(scope="module")
def lesion_model() -> tuple[EyeModel, torch.Tensor, np.ndarray, np.ndarray]:
    images, labels, masks = lesion_images(64, SIZE, seed=5)
    spec = ModelSpec.from_dict({"tasks": [{"name": "lesion", "kind": "binary"}]})
    torch.manual_seed(0)
    model = EyeModel.create(spec, Recipe(fundus=FundusRecipe(size=SIZE)))
    x = model_inputs(spec, images)["fundus"]
    _train(model, {"fundus": x[:48]}, torch.tensor(labels[:48], dtype=torch.float32), epochs=8)
    return model, x[48:], labels[48:], masks[48:]


def test_gradcam_puts_most_of_its_mass_on_the_planted_lesion(lesion_model) -> None:  # type: ignore[no-untyped-def]
    model, x, labels, masks = lesion_model
    p = model.predict({"fundus": x})["lesion"]["probability"]
    # it learned the lesion (at least 14 of the 16 held out); now: does it look there
    assert ((p > 0.5) == labels).mean() >= 0.85
    positives = np.flatnonzero(labels)
    explanations = explain(model, {"fundus": x[positives]}, "lesion")
    upsample = default_upsampler((SIZE, SIZE))
    fractions, ideal_fractions, areas, peaks = [], [], [], []
    for e, mask in zip(explanations, masks[positives], strict=True):
        assert e.heatmap.shape == (SIZE, SIZE) and e.heatmap.max() == pytest.approx(1.0)
        lesion = torch.tensor(mask, dtype=torch.float32)[None, None]
        # the region: the lesion cluster widened by one cell of the network's feature map,
        # the finest a last-layer Grad-CAM can resolve
        region = F.max_pool2d(lesion, 2 * STRIDE + 1, 1, STRIDE)[0, 0].numpy() > 0
        # a correct map at this resolution: the lesion itself, pooled to the feature grid
        # and upsampled the way MONAI's Grad-CAM upsamples
        ideal = upsample(F.avg_pool2d(lesion, STRIDE))[0, 0].numpy()
        fractions.append(e.heatmap[region].sum() / e.heatmap.sum())
        ideal_fractions.append(ideal[region].sum() / ideal.sum())
        areas.append(region.mean())
        peaks.append(bool(region.flat[e.heatmap.argmax()]))
    # a correct map puts ~all its mass in the region; "most" is half of what it puts there
    bar = 0.5 * float(np.mean(ideal_fractions))
    assert bar > 0.45 and float(np.mean(areas)) < bar  # a uniform map would fail the bar
    assert float(np.mean(fractions)) >= bar, (fractions, bar)
    assert min(fractions) > float(np.mean(areas))  # every map beats a uniform one
    assert sum(peaks) >= len(peaks) - 1  # the hottest pixel is on the lesion


def test_oct_attention_finds_the_bscan_with_the_lesion() -> None:
    rng = np.random.default_rng(8)
    n, depth, side = 64, 8, 32
    volumes = rng.normal(60, 12, (n, depth, side, side)).clip(0, 255)
    labels = np.arange(n) % 2
    lesion_bscan = rng.integers(0, depth, n)
    centres = rng.integers(8, side - 8, (n, 2))
    yy, xx = np.mgrid[0:side, 0:side]
    for i in np.flatnonzero(labels):  # a bright fluid-like blob on one B-scan
        blob = np.hypot(yy - centres[i, 0], xx - centres[i, 1]) <= 4
        volumes[i, lesion_bscan[i]][blob] = 220
    spec = ModelSpec.from_dict(
        {
            "input": "oct",
            "oct_network": "bscan-attention",
            "tasks": [{"name": "dme", "kind": "binary"}],
        }
    )
    torch.manual_seed(0)
    model = EyeModel.create(spec, Recipe(oct=OctRecipe(shape=(depth, side, side))))
    x = model_inputs(spec, oct=volumes.astype(np.uint8))["oct"]
    _train(model, {"oct": x[:48]}, torch.tensor(labels[:48], dtype=torch.float32), epochs=6)
    test = 48 + np.flatnonzero(labels[48:])
    explanations = explain(model, {"oct": x[test]}, "dme")
    hits = 0
    for e, i in zip(explanations, test, strict=True):
        assert e.attention is not None and e.attention.shape == (depth,)
        assert e.attention.sum() == pytest.approx(1.0, abs=1e-5)
        assert e.bscan == int(e.attention.argmax()) and e.heatmap.shape == (side, side)
        hits += e.bscan == lesion_bscan[i]
    assert hits >= len(test) - 1, hits


def test_explaining_leaves_no_hooks_and_3d_maps_cover_the_volume() -> None:
    spec = ModelSpec.from_dict(
        {
            "input": "oct",
            "oct_network": "densenet121-3d",
            "features": 16,
            "tasks": [{"name": "dr_grade", "kind": "ordinal", "classes": 5}],
        }
    )
    model = EyeModel(spec, Recipe(oct=OctRecipe(shape=(32, 32, 32))))
    model.net.train()
    x = model_inputs(spec, oct=np.random.default_rng(1).integers(0, 255, (2, 32, 32, 32)))
    first, second = explain(model, x, "dr_grade")
    assert second.volume is not None and second.volume.shape == (32, 32, 32)
    assert first.volume is not None and first.volume.shape == (32, 32, 32)
    assert first.bscan is not None and np.array_equal(first.heatmap, first.volume[first.bscan])
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.net.modules())
    assert hooks == 0
    assert model.net.training  # the mode it had before


@pytest.mark.parametrize("network", FUNDUS_NETWORKS)
def test_every_fundus_network_explains_at_the_input_resolution(network: str) -> None:
    spec = ModelSpec.from_dict(
        {
            "fundus_network": network,
            "features": 16,
            "tasks": [{"name": "dr_grade", "kind": "ordinal", "classes": 5, "refer_from": 2}],
        }
    )
    torch.manual_seed(4)
    model = EyeModel(spec, Recipe(fundus=FundusRecipe(size=64)))
    images = np.random.default_rng(2).integers(0, 255, (2, 3, 64, 64), dtype=np.uint8)
    maps = [e.heatmap for e in explain(model, model_inputs(spec, images), "dr_grade")]
    for m in maps:
        assert m.shape == (64, 64) and np.isfinite(m).all()
        assert m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.net.modules())
    assert hooks == 0
