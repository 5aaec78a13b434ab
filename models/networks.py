"""Networks by name, built from MONAI's (not re-implemented), each ending in a feature
vector the task heads share.

Fundus (2D): densenet121, efficientnet-b0, resnet50, vit-b16. OCT: densenet121-3d (a 3-D
volume network) and bscan-attention (a 2-D encoder per B-scan with attention pooling
across B-scans, whose weights say which B-scans mattered). Fusion of both is late: the
two feature vectors, plus optional age and sex, are concatenated.
"""

from __future__ import annotations

import torch
from monai.networks import nets
from torch import nn

from eyehub.errors import ConfigError

FEATURES = 256
FUNDUS_NETWORKS = ("densenet121", "efficientnet-b0", "resnet50", "vit-b16")
OCT_NETWORKS = ("densenet121-3d", "bscan-attention")


def fundus_encoder(name: str, image_size: int, features: int = FEATURES) -> nn.Module:
    """A MONAI 2-D network whose classifier layer outputs `features` values."""
    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=features)
    if name == "efficientnet-b0":
        return nets.EfficientNetBN(
            "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=features
        )
    if name == "resnet50":
        return nets.resnet50(spatial_dims=2, n_input_channels=3, num_classes=features)
    if name == "vit-b16":
        return _ViTFeatures(image_size, features)
    raise ConfigError(
        f"model.network: unknown fundus network {name!r}; "
        f"choose one of {', '.join(FUNDUS_NETWORKS)}"
    )


class _ViTFeatures(nn.Module):
    """MONAI ViT-B/16 (12 layers, 768 wide) with a classification token; returns features."""

    def __init__(self, image_size: int, features: int) -> None:
        super().__init__()
        self.vit = nets.ViT(
            in_channels=3,
            img_size=(image_size, image_size),
            patch_size=(16, 16),
            hidden_size=768,
            mlp_dim=3072,
            num_layers=12,
            num_heads=12,
            classification=True,
            num_classes=features,
            spatial_dims=2,
            post_activation="",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.vit(x)
        return out


class BScanAttention(nn.Module):
    """2.5-D OCT network: a 2-D DenseNet121 per B-scan, attention pooling across B-scans
    (Ilse et al. 2018). `last_attention` holds the weights of the last forward pass."""

    def __init__(self, features: int = FEATURES) -> None:
        super().__init__()
        self.encoder = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=features)
        self.score = nn.Sequential(nn.Linear(features, 64), nn.Tanh(), nn.Linear(64, 1))
        self.last_attention: torch.Tensor | None = None

    def forward(self, volume: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W)
        b, _, d, h, w = volume.shape
        per_bscan = self.encoder(volume.permute(0, 2, 1, 3, 4).reshape(b * d, 1, h, w))
        per_bscan = per_bscan.reshape(b, d, -1)
        attention = torch.softmax(self.score(per_bscan)[..., 0], dim=1)  # (B, D)
        self.last_attention = attention.detach()
        return (attention[..., None] * per_bscan).sum(dim=1)


def oct_encoder(name: str, features: int = FEATURES) -> nn.Module:
    if name == "densenet121-3d":
        return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=features)
    if name == "bscan-attention":
        return BScanAttention(features)
    raise ConfigError(
        f"model.network: unknown OCT network {name!r}; choose one of {', '.join(OCT_NETWORKS)}"
    )


class LateFusion(nn.Module):
    """Fundus and OCT features of one eye and visit (and optionally age and sex), joined."""

    def __init__(
        self, fundus: nn.Module, oct_net: nn.Module, features: int = FEATURES, clinical: int = 0
    ) -> None:
        super().__init__()
        self.fundus, self.oct = fundus, oct_net
        self.project = nn.Sequential(nn.Linear(2 * features + clinical, features), nn.ReLU())

    def forward(
        self, fundus: torch.Tensor, volume: torch.Tensor, clinical: torch.Tensor | None = None
    ) -> torch.Tensor:
        parts = [self.fundus(fundus), self.oct(volume)]
        if clinical is not None:
            parts.append(clinical)
        return self.project(torch.cat(parts, dim=1))
