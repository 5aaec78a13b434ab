"""Every architecture builds from MONAI, runs forward and backward on CPU for its input
shape, and can overfit a small batch through the multi-task heads."""

from __future__ import annotations

import math

import pytest
import torch

from eyehub.errors import ConfigError
from models.model import EyeNet, ModelSpec
from models.networks import FUNDUS_NETWORKS, OCT_NETWORKS, BScanAttention
from models.tasks import multitask_loss, ordinal_probabilities
from preprocess.recipe import FundusRecipe, OctRecipe, Recipe

TASKS = [
    {"name": "referable", "kind": "binary"},
    {"name": "dr_grade", "kind": "ordinal", "classes": 5, "refer_from": 2},
    {"name": "systolic_bp", "kind": "regression", "mean": 130.0, "std": 15.0},
]
ARCHITECTURES = (
    [("fundus", name, "bscan-attention") for name in FUNDUS_NETWORKS]
    + [("oct", "densenet121", name) for name in OCT_NETWORKS]
    + [("fusion", "resnet50", "bscan-attention")]
)


def _net(inp: str, fundus: str, oct_net: str) -> EyeNet:
    spec = ModelSpec.from_dict(
        {
            "input": inp,
            "fundus_network": fundus,
            "oct_network": oct_net,
            "features": 32,
            "clinical": ["age", "sex"] if inp == "fusion" else [],
            "tasks": TASKS,
        }
    )
    depth = 32 if oct_net == "densenet121-3d" else 4
    recipe = Recipe(fundus=FundusRecipe(size=32), oct=OctRecipe(shape=(depth, 32, 32)))
    return EyeNet(spec, recipe)


def _batch(net: EyeNet) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x: dict[str, torch.Tensor] = {}
    if net.fundus is not None:
        x["fundus"] = torch.randn(4, 3, 32, 32, generator=g)
    if net.oct is not None:
        depth = 4 if isinstance(net.oct, BScanAttention) else 32
        x["oct"] = torch.randn(4, 1, depth, 32, 32, generator=g)
    if net.spec.clinical:
        x["clinical"] = torch.randn(4, 2, generator=g)
    return x


TARGETS = {
    "referable": torch.tensor([1.0, 0.0, 1.0, 0.0]),
    "dr_grade": torch.tensor([0.0, 4.0, 2.0, math.nan]),  # one missing label
    "systolic_bp": torch.tensor([120.0, 150.0, 135.0, 110.0]),
}


def _without_stochastic_regularisation(net: torch.nn.Module) -> None:
    """Dropout and EfficientNet's drop-connect off, as in any overfitting check."""
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "drop_connect_rate"):
            module.drop_connect_rate = 0.0


@pytest.mark.parametrize(("inp", "fundus", "oct_net"), ARCHITECTURES)
def test_every_architecture_overfits_a_small_batch(inp: str, fundus: str, oct_net: str) -> None:
    torch.manual_seed(0)
    net = _net(inp, fundus, oct_net)
    _without_stochastic_regularisation(net)
    x = _batch(net)
    tasks = list(net.spec.tasks)
    out = net(**x)
    assert out["referable"].shape == (4, 1)
    assert out["dr_grade"].shape == (4, 4)
    assert out["systolic_bp"].shape == (4, 1)
    lr = 3e-4 if fundus == "vit-b16" and inp == "fundus" else 1e-3  # ViTs want less
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss, _ = multitask_loss(tasks, net(**x), TARGETS)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert losses[-1] < 0.25 * losses[0], losses
    # memorised: every label of the batch is predicted back
    with torch.no_grad():
        out = net(**x)
    assert torch.equal((out["referable"][:, 0] > 0).float(), TARGETS["referable"])
    grades = ordinal_probabilities(out["dr_grade"]).argmax(dim=1)
    assert grades[:3].tolist() == [0, 4, 2]
    z = (TARGETS["systolic_bp"] - 130.0) / 15.0
    assert torch.allclose(out["systolic_bp"][:, 0], z, atol=0.25)


def test_bscan_attention_says_which_bscans_mattered() -> None:
    net = _net("oct", "densenet121", "bscan-attention")
    net.eval()
    with torch.no_grad():
        net(oct=torch.randn(2, 1, 4, 32, 32))
    assert isinstance(net.oct, BScanAttention)
    attention = net.oct.last_attention
    assert attention is not None and attention.shape == (2, 4)
    assert torch.allclose(attention.sum(dim=1), torch.ones(2))


def test_unknown_networks_and_too_small_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"fundus_network.*unknown fundus network.*densenet121"):
        ModelSpec.from_dict({"fundus_network": "inception", "tasks": TASKS})
    with pytest.raises(ConfigError, match=r"oct_network.*unknown OCT network.*bscan-attention"):
        ModelSpec.from_dict({"oct_network": "unet", "tasks": TASKS})
    spec = ModelSpec.from_dict({"input": "oct", "oct_network": "densenet121-3d", "tasks": TASKS})
    with pytest.raises(ConfigError, match=r"oct.shape .* too small for densenet121-3d"):
        EyeNet(spec, Recipe(oct=OctRecipe(shape=(8, 64, 64))))
    vit = ModelSpec.from_dict({"fundus_network": "vit-b16", "tasks": TASKS})
    with pytest.raises(ConfigError, match="divisible by 16"):
        EyeNet(vit, Recipe(fundus=FundusRecipe(size=100)))
