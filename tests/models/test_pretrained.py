"""Pretrained weights from local files: each supported checkpoint format is written here,
from a MONAI network of known weights, and must load with the expected keys matched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from monai.networks import nets

from eyehub.errors import ConfigError, NotFoundError
from models.model import EyeModel, ModelSpec
from models.networks import ViTFeatures, fundus_encoder, oct_encoder
from models.pretrained import load_pretrained
from preprocess.recipe import FundusRecipe, Recipe

TASKS = [{"name": "amd", "kind": "binary"}]


def _imagenet_densenet() -> nets.DenseNet121:
    torch.manual_seed(1)
    return nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=1000)


def _to_torchvision_densenet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI DenseNet names back to torchvision/timm's (`denselayer1.norm1.weight`)."""
    return {re.sub(r"\.layers\.(norm|conv)([12])\.", r".\1\2.", k): v for k, v in state.items()}


def _to_timm_vit(vit: nets.ViT, pos0: torch.Tensor) -> dict[str, torch.Tensor]:
    """A MONAI ViT's weights in timm's names; timm's pos_embed has a class-token slot,
    added to the class token, so the token is stored with that slot taken off."""
    out = {}
    for k, v in vit.state_dict().items():
        k = k.replace("patch_embedding.patch_embeddings", "patch_embed.proj")
        k = k.replace("attn.out_proj", "attn.proj").replace("mlp.linear1", "mlp.fc1")
        k = k.replace("mlp.linear2", "mlp.fc2").replace("classification_head", "head")
        if "norm_cross_attn" in k:
            continue
        out[k] = v.clone()
    pos = out.pop("patch_embedding.position_embeddings")
    out["pos_embed"] = torch.cat([pos0, pos], dim=1)
    out["cls_token"] = out["cls_token"] - pos0
    return out


def test_a_plain_state_dict_loads_all_but_the_classifier(tmp_path: Path) -> None:
    source = _imagenet_densenet()
    path = tmp_path / "densenet121.pt"
    torch.save(source.state_dict(), path)
    net = fundus_encoder("densenet121", 32, features=16)
    report = load_pretrained(net, path)
    assert report.source_format == "state-dict"
    assert report.mismatched == [
        "class_layers.out.weight (file (1000, 1024), network (16, 1024))",
        "class_layers.out.bias (file (1000,), network (16,))",
    ]
    assert report.missing == ["class_layers.out.weight", "class_layers.out.bias"]
    assert not report.unexpected
    assert len(report.matched) == len(source.state_dict()) - 2
    assert torch.equal(net.features.conv0.weight, source.features.conv0.weight)
    assert "shape differs (skipped): class_layers.out.weight" in report.summary()


@pytest.mark.parametrize("prefix", ["module.", "model."])
def test_training_checkpoints_with_wrappers_and_prefixes_load(tmp_path: Path, prefix: str) -> None:
    source = _imagenet_densenet()
    state = {prefix + k: v for k, v in source.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 30, "state_dict": state, "optimizer_name": "sgd"}, path)
    net = fundus_encoder("densenet121", 32, features=16)
    report = load_pretrained(net, path)
    assert len(report.matched) == len(state) - 2
    assert torch.equal(net.features.norm5.running_var, source.features.norm5.running_var)


def test_timm_densenet_names_are_mapped(tmp_path: Path) -> None:
    source = _imagenet_densenet()
    state = _to_torchvision_densenet(source.state_dict())
    assert "features.denseblock1.denselayer1.norm1.weight" in state
    path = tmp_path / "timm_densenet121.pth"
    torch.save({"state_dict": state}, path)
    net = fundus_encoder("densenet121", 32, features=16)
    report = load_pretrained(net, path)
    assert not report.unexpected and len(report.matched) == len(state) - 2
    layer = net.features.denseblock4.denselayer16.layers
    assert torch.equal(
        layer.conv2.weight, source.features.denseblock4.denselayer16.layers.conv2.weight
    )


def test_timm_vit_loads_into_the_monai_vit_and_computes_the_same(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = ViTFeatures(32, 16)
    for p in reference.parameters():  # make every tensor distinct from a fresh init
        p.data.normal_(0, 0.02)
    pos0 = torch.randn(1, 1, 768) * 0.02
    path = tmp_path / "vit_base_patch16.pth"
    torch.save(_to_timm_vit(reference.vit, pos0), path)
    net = ViTFeatures(32, 16)
    report = load_pretrained(net, path)
    assert report.source_format == "timm"
    assert not report.mismatched and not report.unexpected and not report.missing
    x = torch.randn(2, 3, 32, 32)
    reference.eval()
    net.eval()
    assert torch.allclose(net(x), reference(x), atol=1e-5)


def test_retfound_checkpoint_drops_the_mae_decoder_and_resizes_positions(tmp_path: Path) -> None:
    torch.manual_seed(3)
    at_224 = nets.ViT(
        in_channels=3,
        img_size=224,
        patch_size=16,
        spatial_dims=2,
        classification=True,
        num_classes=1000,
        qkv_bias=True,
        post_activation="",
    )
    state = _to_timm_vit(at_224, torch.zeros(1, 1, 768))
    del state["head.weight"], state["head.bias"]  # a pretraining checkpoint has no head
    state["mask_token"] = torch.zeros(1, 1, 512)
    state["decoder_embed.weight"] = torch.zeros(512, 768)
    state["decoder_pred.weight"] = torch.zeros(768, 512)
    path = tmp_path / "RETFound_mae_style.pth"
    torch.save({"model": state, "optimizer": {"lr": 1.0}, "epoch": 799}, path)
    net = ViTFeatures(64, 16)  # 4 x 4 patches, not 14 x 14
    report = load_pretrained(net, path)
    assert report.source_format == "retfound"
    assert len(report.dropped) == 3
    assert report.adapted == [
        "vit.patch_embedding.position_embeddings (1, 196, 768) -> (1, 16, 768)"
    ]
    assert report.missing == ["vit.classification_head.weight", "vit.classification_head.bias"]
    assert not report.unexpected and not report.mismatched
    assert torch.equal(net.vit.blocks[11].mlp.linear2.weight, at_224.blocks[11].mlp.linear2.weight)
    assert "3 tensors that do not apply dropped" in report.summary()


def _retfound_checkpoint(blocks: int = 24, width: int = 1024, grid: int = 14) -> dict:
    """A checkpoint laid out as RETFound publishes its weights (`RETFound_cfp_weights.pth`:
    MAE pretraining of timm's ViT-L/16 at 224 px): timm names under `model`, the encoder's
    final `norm`, the MAE decoder, no head. Zeros, but for the tensors the test checks."""
    z = torch.zeros
    state = {
        "cls_token": torch.randn(1, 1, width),
        "pos_embed": torch.randn(1, grid * grid + 1, width),
        "patch_embed.proj.weight": torch.randn(width, 3, 16, 16),
        "patch_embed.proj.bias": z(width),
        "norm.weight": torch.ones(width),
        "norm.bias": z(width),
        "mask_token": z(1, 1, 512),
        "decoder_embed.weight": z(512, width),
        "decoder_embed.bias": z(512),
        "decoder_pos_embed": z(1, grid * grid + 1, 512),
        "decoder_blocks.0.attn.qkv.weight": z(3 * 512, 512),
        "decoder_norm.weight": z(512),
        "decoder_pred.weight": z(16 * 16 * 3, 512),
    }
    for i in range(blocks):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            state[b + norm + ".weight"], state[b + norm + ".bias"] = torch.ones(width), z(width)
        state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"] = z(3 * width, width), z(3 * width)
        state[b + "attn.proj.weight"], state[b + "attn.proj.bias"] = z(width, width), z(width)
        state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"] = z(4 * width, width), z(4 * width)
        state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"] = z(width, 4 * width), z(width)
    state[f"blocks.{blocks - 1}.attn.qkv.weight"] = torch.randn(3 * width, width)
    return {"model": state, "optimizer": {}, "epoch": 799, "args": {}}


def test_vit_l16_loads_a_retfound_checkpoint_as_retfound_fine_tunes_it(tmp_path: Path) -> None:
    """Every encoder tensor lands; the MAE decoder and the final `norm` (unused under
    RETFound's global pooling) are dropped; the head and `fc_norm` start fresh, as in
    RETFound's main_finetune (its missing keys: head and fc_norm)."""
    torch.manual_seed(4)
    checkpoint = _retfound_checkpoint()
    path = tmp_path / "RETFound_cfp_weights.pth"
    torch.save(checkpoint, path)
    state = checkpoint["model"]
    net = ViTFeatures(224, 16, "vit-l16")
    assert len(net.vit.blocks) == 24 and net.vit.cls_token.shape == (1, 1, 1024)
    report = load_pretrained(net, path)
    assert report.source_format == "retfound"
    assert sorted(report.missing) == [
        "vit.classification_head.bias",
        "vit.classification_head.weight",
        "vit.fc_norm.bias",
        "vit.fc_norm.weight",
    ]
    assert not report.unexpected and not report.mismatched and not report.adapted
    assert {"norm.weight", "norm.bias", "decoder_pred.weight"} <= set(report.dropped)
    assert len(report.matched) == 4 + 24 * 12
    vit = net.vit
    assert torch.equal(vit.blocks[23].attn.qkv.weight, state["blocks.23.attn.qkv.weight"])
    patches = vit.patch_embedding.patch_embeddings.weight
    assert torch.equal(patches, state["patch_embed.proj.weight"])
    pos = state["pos_embed"]
    assert torch.equal(vit.patch_embedding.position_embeddings, pos[:, 1:])
    assert torch.allclose(vit.cls_token, state["cls_token"] + pos[:, :1])
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 16)


def test_rgb_weights_are_summed_for_the_grey_oct_encoder(tmp_path: Path) -> None:
    source = _imagenet_densenet()
    path = tmp_path / "densenet121.pt"
    torch.save(source.state_dict(), path)
    net = oct_encoder("bscan-attention", features=16)
    report = load_pretrained(net, path)
    assert report.adapted == ["encoder.features.conv0.weight (64, 3, 7, 7) -> (64, 1, 7, 7)"]
    expected = source.features.conv0.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(net.encoder.features.conv0.weight, expected)  # type: ignore[union-attr]


def test_unusable_files_are_clear_errors(tmp_path: Path) -> None:
    net = fundus_encoder("densenet121", 32, features=16)
    with pytest.raises(NotFoundError, match="no file at"):
        load_pretrained(net, tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a PyTorch checkpoint"):
        load_pretrained(net, garbage)
    pickled_module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled_module)  # code, not weights: refused unsafe
    with pytest.raises(ConfigError, match="loaded safely"):
        load_pretrained(net, pickled_module)
    resnet = tmp_path / "resnet50.pt"
    torch.save(nets.resnet50(spatial_dims=2, n_input_channels=3).state_dict(), resnet)
    with pytest.raises(ConfigError, match=r"none of the .* tensors .* fits this network"):
        load_pretrained(net, resnet)


def test_the_spec_names_the_file_and_the_model_records_what_loaded(tmp_path: Path) -> None:
    path = tmp_path / "densenet121.pt"
    torch.save(_imagenet_densenet().state_dict(), path)
    spec = ModelSpec.from_dict({"pretrained": str(path), "features": 16, "tasks": TASKS})
    model = EyeModel.create(spec, Recipe(fundus=FundusRecipe(size=32)))
    (record,) = model.info["pretrained"]
    assert record["path"] == str(path) and record["matched"] > 300
    assert record["missing"] == ["class_layers.out.weight", "class_layers.out.bias"]
