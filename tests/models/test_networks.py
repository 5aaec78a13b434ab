"""Every architecture builds from MONAI, runs forward and backward on CPU for its input
shape, and can overfit a small batch through the multi-task heads."""

from __future__ import annotations

import math

import pytest
import torch

from eyehub.errors import ConfigError, ModelError
from models.model import EyeNet, ModelSpec
from models.networks import FUNDUS_NETWORKS, OCT_NETWORKS, BScanAttention
from models.tasks import multitask_loss, ordinal_probabilities
from preprocess.recipe import FundusRecipe, OctRecipe, Recipe

TASKS = [
    {"name": "referable", "kind": "binary"},
    {"name": "dr_grade", "kind": "ordinal", "classes": 5, "refer_from": 2},
    {"name": "systolic_bp", "kind": "regression", "mean": 130.0, "std": 15.0},
]
# vit-l16 is vit-b16's code at another size (300M parameters: a minute per overfit on 2
# cores); its build, checkpoint loading and forward pass are in test_pretrained.py
ARCHITECTURES = (
    [("fundus", name, "bscan-attention") for name in FUNDUS_NETWORKS if name != "vit-l16"]
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
    volume = torch.randn(2, 1, 4, 32, 32)
    with torch.no_grad():
        outputs, attention = net.forward_with_attention(oct=volume)
        plain = net(oct=volume)
    assert attention is not None and attention.shape == (2, 4)
    assert torch.allclose(attention.sum(dim=1), torch.ones(2))
    assert [k for k in plain if not torch.equal(outputs[k], plain[k])] == []
    # the weights pool the per-B-scan features: one B-scan's weight is its share
    assert isinstance(net.oct, BScanAttention)
    with torch.no_grad():
        features, again = net.oct.forward_with_attention(volume)
        per_bscan = net.oct.encoder(volume[0].permute(1, 0, 2, 3))  # (D, F)
    assert torch.equal(again, attention)
    assert torch.allclose(features[0], (attention[0, :, None] * per_bscan).sum(0), atol=1e-5)
    # nothing of the pass is kept on the module (several threads may share it)
    kept = [
        (name, key)
        for name, module in net.named_modules()
        for key, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    ]
    assert kept == [], "a forward pass left a tensor on a module"


def test_other_networks_have_no_attention() -> None:
    net = _net("oct", "densenet121", "densenet121-3d")
    with torch.no_grad():
        _, attention = net.eval().forward_with_attention(oct=torch.randn(1, 1, 32, 32, 32))
    assert attention is None


def test_inputs_the_network_cannot_take_are_model_errors() -> None:
    net = _net("fusion", "resnet50", "bscan-attention").eval()
    x = _batch(net)
    with pytest.raises(ModelError, match="needs a fundus image"):
        net(oct=x["oct"], clinical=x["clinical"])
    with pytest.raises(ModelError, match="needs an OCT volume"):
        net(fundus=x["fundus"], clinical=x["clinical"])
    with pytest.raises(ModelError, match=r"needs clinical inputs \['age', 'sex'\]"):
        net(fundus=x["fundus"], oct=x["oct"])
    with pytest.raises(ModelError, match=r"torch.uint8.*models.model_inputs"):
        net(**{**x, "fundus": torch.zeros(4, 3, 32, 32, dtype=torch.uint8)})
    with pytest.raises(ModelError, match=r"shape \[4, 4, 32, 32\]; this model takes \(B, 1, D"):
        net(**{**x, "oct": x["oct"][:, 0]})  # the channel axis forgotten
    with pytest.raises(ModelError, match=r"at least \[32, 32\]"):
        net(**{**x, "fundus": x["fundus"][:, :, :16, :16]})
    with pytest.raises(ModelError, match=r"clinical inputs have shape \[4, 1\]"):
        net(**{**x, "clinical": x["clinical"][:, :1]})
    with pytest.raises(ModelError, match="batch sizes differ"):
        net(**{**x, "oct": x["oct"][:2]})
    vit = _net("fundus", "vit-b16", "bscan-attention").eval()
    with pytest.raises(ModelError, match=r"vit-b16 model takes \[32, 32\]"):
        vit(fundus=torch.randn(1, 3, 64, 64))
    assert ModelError.http_status == 422  # what the scoring service answers


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
