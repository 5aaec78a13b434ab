"""Networks by name, built from MONAI's (not re-implemented), each ending in a feature
vector the task heads share.

Fundus (2D): densenet121, efficientnet-b0, resnet50, vit-b16, vit-l16 (ViT-Large as
RETFound publishes it: mean-pooled patch tokens under `fc_norm`). OCT: densenet121-3d (a 3-D
volume network) and bscan-attention (a 2-D encoder per B-scan with attention pooling
across B-scans, whose weights say which B-scans mattered). Fusion of both is late: the
two feature vectors, plus optional age and sex, are concatenated and projected.

Each network also names the layer Grad-CAM reads (`GRADCAM_LAYERS`): the last
convolutional feature map, or for the ViT the patch-token grid entering its last block.

No module holds state from a forward pass (several threads may share one network): the
attention of `bscan-attention` comes back from `forward_with_attention`.

MONAI is imported where a network is built, not with this module: its package import
loads all of MONAI's subpackages and every optional dependency that is installed (MLflow,
pydicom, OpenCV, pandas, ...; about 4 s on 2 cores), which reading a `ModelSpec` or a
saved model's manifest does not need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eyehub.errors import ConfigError

FEATURES = 256
FUNDUS_NETWORKS = ("densenet121", "efficientnet-b0", "resnet50", "vit-b16", "vit-l16")
OCT_NETWORKS = ("densenet121-3d", "bscan-attention")

# Grad-CAM target layer of each network, relative to the network. EfficientNet's `_swish`
# is one module called twice (stem and head), so its hooks would mix the two; `_bn1` is
# the head's normalised feature map, called once.
GRADCAM_LAYERS = {
    "densenet121": "class_layers.relu",
    "efficientnet-b0": "_bn1",
    "resnet50": "layer4",
    "vit-b16": "grid",
    "vit-l16": "grid",
    "densenet121-3d": "class_layers.relu",
    "bscan-attention": "encoder.class_layers.relu",
}
VIT_PATCH = 16


@dataclass(frozen=True)
class ViTSize:
    """A ViT's shape, and how its features are pooled: the class token (timm's default) or
    the mean of the patch tokens under `fc_norm` (MAE's and RETFound's `global_pool`)."""

    hidden: int
    mlp: int
    layers: int
    heads: int
    global_pool: bool


VIT_SIZES = {
    "vit-b16": ViTSize(hidden=768, mlp=3072, layers=12, heads=12, global_pool=False),
    "vit-l16": ViTSize(hidden=1024, mlp=4096, layers=24, heads=16, global_pool=True),
}


def fundus_encoder(name: str, image_size: int, features: int = FEATURES) -> nn.Module:
    """A MONAI 2-D network whose classifier layer outputs `features` values."""
    from monai.networks import nets

    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=features)
    if name == "efficientnet-b0":
        return nets.EfficientNetBN(
            "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=features
        )
    if name == "resnet50":
        # torchvision's ResNet50: a stride-2 stem (MONAI defaults to 1, for volumes: 4x the
        # compute) and no bias on the shortcut convolutions, so ImageNet weights fit
        return nets.resnet50(
            spatial_dims=2,
            n_input_channels=3,
            num_classes=features,
            conv1_t_stride=2,
            bias_downsample=False,
        )
    if name in VIT_SIZES:
        return ViTFeatures(image_size, features, name)
    raise ConfigError(
        f"model.fundus_network: unknown fundus network {name!r}; "
        f"choose one of {', '.join(FUNDUS_NETWORKS)}"
    )


class TokenGrid(nn.Module):
    """Patch tokens (B, N, C) as a feature map (B, C, h, w): the layer ViT Grad-CAM reads."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, self.rows, self.cols)


class ViTFeatures(nn.Module):
    """MONAI's ViT with 16-pixel patches, qkv bias as in timm and RETFound, and a
    classification token; returns features. `vit-b16`: ViT-Base (12 layers, 768 wide),
    features from the class token. `vit-l16`: ViT-Large (24 layers, 1024 wide), features
    from the mean of the patch tokens normalised by `vit.fc_norm` (the final `norm` is not
    used), as RETFound fine-tunes it.

    The forward pass is MONAI's ViT.forward spelled out, so the patch tokens entering the
    last block pass through `grid` (a reshape), where Grad-CAM reads them."""

    def __init__(self, image_size: int, features: int, name: str = "vit-b16") -> None:
        super().__init__()
        if image_size % VIT_PATCH:
            nearest = max(1, image_size // VIT_PATCH) * VIT_PATCH
            raise ConfigError(
                f"{name} needs an image size divisible by {VIT_PATCH}; the recipe gives "
                f"{image_size} (set preprocess fundus.size to, say, {nearest})"
            )
        from monai.networks import nets

        size = VIT_SIZES[name]
        self.global_pool = size.global_pool
        self.vit = nets.ViT(
            in_channels=3,
            img_size=(image_size, image_size),
            patch_size=(VIT_PATCH, VIT_PATCH),
            hidden_size=size.hidden,
            mlp_dim=size.mlp,
            num_layers=size.layers,
            num_heads=size.heads,
            classification=True,
            num_classes=features,
            spatial_dims=2,
            post_activation="",
            qkv_bias=True,
        )
        if size.global_pool:
            # RETFound deletes `norm` and adds `fc_norm`; kept inside `vit` so checkpoints
            # map onto one module. An unused `norm` would leave DDP with unused parameters.
            self.vit.norm = nn.Identity()  # type: ignore[assignment]
            self.vit.fc_norm = nn.LayerNorm(size.hidden)
        side = image_size // VIT_PATCH
        self.grid = TokenGrid(side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit.patch_embedding(x)
        h = torch.cat([vit.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in vit.blocks[:-1]:
            h = block(h)
        grid = self.grid(h[:, 1:])
        h = torch.cat([h[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        h = vit.blocks[-1](h)
        if self.global_pool:
            pooled: torch.Tensor = vit.fc_norm(h[:, 1:].mean(dim=1))  # type: ignore[operator]
            return vit.classification_head(pooled)
        return vit.classification_head(vit.norm(h)[:, 0])


class BScanAttention(nn.Module):
    """2.5-D OCT network: a 2-D DenseNet121 per B-scan, attention pooling across B-scans
    (Ilse et al. 2018). `forward_with_attention` also returns the attention weights, which
    say which B-scans mattered."""

    def __init__(self, features: int = FEATURES) -> None:
        super().__init__()
        from monai.networks import nets

        self.encoder = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=features)
        self.score = nn.Sequential(nn.Linear(features, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward_with_attention(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, F) of a volume (B, 1, D, H, W) and the attention (B, D) over its
        B-scans (each row sums to one)."""
        b, _, d, h, w = volume.shape
        per_bscan = self.encoder(volume.permute(0, 2, 1, 3, 4).reshape(b * d, 1, h, w))
        per_bscan = per_bscan.reshape(b, d, -1)
        attention = torch.softmax(self.score(per_bscan)[..., 0], dim=1)  # (B, D)
        return (attention[..., None] * per_bscan).sum(dim=1), attention

    def forward(self, volume: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W)
        return self.forward_with_attention(volume)[0]


def oct_encoder(name: str, features: int = FEATURES) -> nn.Module:
    from monai.networks import nets

    if name == "densenet121-3d":
        return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=features)
    if name == "bscan-attention":
        return BScanAttention(features)
    raise ConfigError(
        f"model.oct_network: unknown OCT network {name!r}; choose one of {', '.join(OCT_NETWORKS)}"
    )
