"""Every architecture builds from MONAI, runs forward and backward on CPU, and can overfit
a small batch."""

from __future__ import annotations

import pytest
import torch

from eyehub.errors import ConfigError
from models.networks import FUNDUS_NETWORKS, BScanAttention, LateFusion, fundus_encoder, oct_encoder

SIZES = {"densenet121": 64, "efficientnet-b0": 64, "resnet50": 64, "vit-b16": 224}


@pytest.mark.parametrize("name", FUNDUS_NETWORKS)
def test_fundus_networks_forward_and_backward(name: str) -> None:
    size = SIZES[name]
    net = fundus_encoder(name, size, features=16)
    x = torch.randn(2, 3, size, size, requires_grad=False)
    out = net(x)
    assert out.shape == (2, 16)
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("name", ["densenet121-3d", "bscan-attention"])
def test_oct_networks_forward_and_backward(name: str) -> None:
    net = oct_encoder(name, features=16)
    shape = (2, 1, 32, 32, 32) if name == "densenet121-3d" else (2, 1, 8, 32, 32)
    out = net(torch.randn(*shape))
    assert out.shape == (2, 16)
    out.sum().backward()
    if isinstance(net, BScanAttention):
        assert net.last_attention is not None and net.last_attention.shape == (2, 8)
        assert torch.allclose(net.last_attention.sum(dim=1), torch.ones(2))


def test_late_fusion_with_age_and_sex_overfits_a_small_batch() -> None:
    torch.manual_seed(0)
    model = LateFusion(
        fundus_encoder("resnet50", 32, 16),
        oct_encoder("bscan-attention", 16),
        features=16,
        clinical=2,
    )
    head = torch.nn.Linear(16, 1)
    fundus, volume = torch.randn(4, 3, 32, 32), torch.randn(4, 1, 4, 32, 32)
    clinical = torch.randn(4, 2)
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(model(fundus, volume, clinical)), y
        )
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 0.1 * first


def test_unknown_network_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="densenet121"):
        fundus_encoder("inception", 64)
    with pytest.raises(ConfigError, match="bscan-attention"):
        oct_encoder("unet", 64)
