"""Pretrained weights from a local file (nothing is downloaded).

Understood formats:

- a torch state dict (`{name: tensor}`), saved from a MONAI network or in MONAI's names
  (MONAI's EfficientNet uses the efficientnet-pytorch names);
- training checkpoints that wrap one (`state_dict`, `state_dict_ema`, `model_state_dict`),
  with DDP's `module.` or Lightning's `model.` prefix;
- timm-style checkpoints: timm names for the ViT (`patch_embed.proj`, `blocks.N.attn.qkv`,
  `blocks.N.mlp.fc1`, `pos_embed` with its class-token slot), and torchvision/timm names
  for DenseNet (`denselayerN.norm1`) and ResNet (the same names MONAI uses);
- RETFound-style ViT checkpoints: the state dict under `model`, with the MAE decoder
  (`decoder_*`, `mask_token`) dropped.

Adapted on the way: the ViT position grid is resized (bicubic) when the image size
differs; a 3-channel first convolution is summed to 1 channel for OCT networks. What did
not fit is reported (`LoadReport`); a file of which nothing fits is an error.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from eyehub.errors import ConfigError, NotFoundError
from models.networks import BScanAttention, ViTFeatures

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "state_dict_ema", "model_state_dict", "model", "module", "net")
_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "net.")
_MAE_DECODER = re.compile(r"^(decoder_|mask_token$)")
_BN = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
_DENSE_TV = re.compile(rf"^(.*denselayer\d+)(\.(?:norm|relu|conv))\.((?:[12])\.{_BN})$")
_DENSE_TV_NODOT = re.compile(rf"^(.*denselayer\d+)\.((?:norm|conv)[12])\.({_BN})$")
# in the network's state dict but never used by its forward pass: not worth reporting
_UNUSED = re.compile(r"(num_batches_tracked|norm_cross_attn\.(weight|bias))$")
_TIMM_VIT = [
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"patch_embedding.patch_embeddings.\1"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"blocks.\1.attn.out_proj.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$"), r"blocks.\1.mlp.linear1.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$"), r"blocks.\1.mlp.linear2.\2"),
    (re.compile(r"^head\.(weight|bias)$"), r"classification_head.\1"),
]


@dataclass
class LoadReport:
    """What a pretrained file gave a network."""

    path: str
    source_format: str  # state-dict | timm | retfound
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the network, left as initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, used nowhere
    mismatched: list[str] = field(default_factory=list)  # same name, other shape
    # known not to apply: the MAE decoder, a pretraining `norm` under global pooling
    dropped: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # resized or channel-summed

    def summary(self) -> str:
        def few(names: list[str]) -> str:
            shown = ", ".join(names[:6])
            return shown + (f" and {len(names) - 6} more" if len(names) > 6 else "")

        parts = [f"{len(self.matched)} tensors loaded ({self.source_format} format)"]
        if self.adapted:
            parts.append(f"adapted: {few(self.adapted)}")
        if self.missing:
            parts.append(f"missing from the file (left as initialised): {few(self.missing)}")
        if self.mismatched:
            parts.append(f"shape differs (skipped): {few(self.mismatched)}")
        if self.unexpected:
            parts.append(f"unused from the file: {few(self.unexpected)}")
        if self.dropped:
            parts.append(
                f"{len(self.dropped)} tensors that do not apply dropped (MAE decoder; "
                "the final norm under global pooling)"
            )
        return "; ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "format": self.source_format,
            "matched": len(self.matched),
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "dropped": len(self.dropped),
            "adapted": self.adapted,
        }


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint file, unwrapped and de-prefixed, and its format."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"model.pretrained: no file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same user error
        raise ConfigError(
            f"model.pretrained: {path} is not a PyTorch checkpoint that can be loaded safely "
            f"(weights only): {type(exc).__name__}"
        ) from None
    source_format = "state-dict"
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping) or _is_state_dict(obj):
            break
        key = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        if key == "model":
            source_format = "retfound"
        obj = obj[key]
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise ConfigError(
            f"model.pretrained: {path} holds no state dict (looked for tensors at the top "
            f"level and under {', '.join(_WRAPPERS)})"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    if source_format == "state-dict" and "patch_embed.proj.weight" in tensors:
        source_format = "timm"
    return tensors, source_format


def _is_state_dict(obj: Mapping[object, object]) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= len(obj) / 2


def _timm_vit_to_monai(
    tensors: dict[str, torch.Tensor], global_pool: bool, dropped: list[str]
) -> dict[str, torch.Tensor]:
    """timm ViT names to MONAI's. timm adds pos_embed[0] to the class token; MONAI adds no
    position to it, so that slot is folded into the class token itself.

    Pooling: a network that pools patch tokens under `fc_norm` (vit-l16, as RETFound) takes
    a fine-tuned checkpoint's `fc_norm` as is, and has no use for a pretraining
    checkpoint's final `norm` (RETFound drops it too: its name goes to `dropped`). A
    class-token network takes the final normalisation from `norm`, or from `fc_norm`
    where a checkpoint has only that."""
    tensors = dict(tensors)
    for part in ("weight", "bias"):
        if global_pool and f"norm.{part}" in tensors:
            dropped.append(f"norm.{part}")
            del tensors[f"norm.{part}"]
        elif not global_pool and "norm.weight" not in tensors and f"fc_norm.{part}" in tensors:
            tensors[f"norm.{part}"] = tensors.pop(f"fc_norm.{part}")
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        for pattern, repl in _TIMM_VIT:
            if pattern.match(name):
                name = pattern.sub(repl, name)
                break
        out[name] = value
    if "pos_embed" in out:
        pos = out.pop("pos_embed")
        if "cls_token" in out and pos.shape[1] == _square(pos.shape[1] - 1) ** 2 + 1:
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            pos = pos[:, 1:]
        out["patch_embedding.position_embeddings"] = pos
    return out


def _square(n: int) -> int:
    return math.isqrt(max(n, 0))


def _densenet_torchvision_to_monai(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in tensors.items():
        m = _DENSE_TV.match(name)
        if m:
            name = m.group(1) + ".layers" + m.group(2) + m.group(3)
        else:
            m = _DENSE_TV_NODOT.match(name)
            if m:
                name = f"{m.group(1)}.layers.{m.group(2)}.{m.group(3)}"
        out[name] = value
    return out


def _adapt(name: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """A tensor reshaped to fit `target` where that keeps its meaning, else None."""
    position = name.endswith("position_embeddings") and value.ndim == 3
    if position and value.shape[2] == target.shape[2]:
        src, dst = _square(value.shape[1]), _square(target.shape[1])
        if src * src == value.shape[1] and dst * dst == target.shape[1]:
            grid = value.reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
            return grid.permute(0, 2, 3, 1).reshape(1, dst * dst, -1).to(target.dtype)
    if (
        value.ndim == target.ndim
        and value.ndim >= 4
        and target.shape[1] == 1
        and value.shape[1] == 3
        and value.shape[0] == target.shape[0]
        and value.shape[2:] == target.shape[2:]
    ):
        return value.sum(dim=1, keepdim=True).to(target.dtype)  # RGB filters seen in grey
    return None


def load_pretrained(network: nn.Module, path: Path) -> LoadReport:
    """Fill `network` (a MONAI network, or one of ours wrapping one) from the file at `path`.

    Raises ConfigError when no tensor of the file fits the network."""
    tensors, source_format = read_checkpoint(path)
    target_module, prefix = _load_target(network)
    own = target_module.state_dict()
    report = LoadReport(path=str(path), source_format=source_format)
    for name in [k for k in tensors if _MAE_DECODER.match(k)]:
        report.dropped.append(name)
        del tensors[name]
    if "patch_embed.proj.weight" in tensors:
        tensors = _timm_vit_to_monai(tensors, "fc_norm.weight" in own, report.dropped)
    if any(_DENSE_TV.match(k) or _DENSE_TV_NODOT.match(k) for k in tensors):
        tensors = _densenet_torchvision_to_monai(tensors)
    merged = dict(own)
    for name, value in tensors.items():
        if name not in own:
            report.unexpected.append(name)
            continue
        if value.shape == own[name].shape:
            merged[name] = value.to(own[name].dtype)
            report.matched.append(prefix + name)
            continue
        adapted = _adapt(name, value, own[name])
        if adapted is None:
            report.mismatched.append(
                f"{prefix + name} (file {tuple(value.shape)}, network {tuple(own[name].shape)})"
            )
        else:
            merged[name] = adapted
            report.matched.append(prefix + name)
            report.adapted.append(
                f"{prefix + name} {tuple(value.shape)} -> {tuple(own[name].shape)}"
            )
    loaded = {n.removeprefix(prefix) for n in report.matched}
    report.missing = [prefix + n for n in own if n not in loaded and not _UNUSED.search(n)]
    if not report.matched:
        examples = ", ".join(report.mismatched[:3] or report.unexpected[:3])
        raise ConfigError(
            f"model.pretrained: none of the {len(tensors)} tensors in {path} fits this network "
            f"({type(target_module).__name__}), e.g. {examples}. "
            "Is it a checkpoint for another architecture or size?"
        )
    target_module.load_state_dict(merged)
    log.info("pretrained weights from %s: %s", path, report.summary())
    return report


def _load_target(network: nn.Module) -> tuple[nn.Module, str]:
    """The MONAI network inside ours that checkpoints are written for, and its prefix."""
    if isinstance(network, ViTFeatures):
        return network.vit, "vit."
    if isinstance(network, BScanAttention):
        return network.encoder, "encoder."
    return network, ""
