"""Explanations a clinician can check against the image: MONAI Grad-CAM at the input's
resolution, and for the 2.5-D OCT network its attention over B-scans with Grad-CAM on
the B-scan it weighted most.

A map is the ReLU of the Grad-CAM of the task's `decision_score` (models/tasks.py),
scaled so its maximum is 1 (0 stays "no evidence"; MONAI's default normaliser would flip
the scale).

Grad-CAM hooks, gradients and the switch to eval mode happen on a private copy of the
network, never on `model.net`: predictions and other explanations may use the model from
other threads meanwhile. On 2 CPU cores the copy takes about 65 ms for DenseNet121
(explaining one 224-px image, copy included: about 330 ms) and 190 ms for ViT-B/16
(1.4 s), so a caller whose weights never change (scoring) makes one per thread and passes
it in; otherwise each call makes its own.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eyehub.errors import ConfigError, ModelError
from models.model import EyeModel, EyeNet
from models.networks import BScanAttention
from models.tasks import TaskSpec, decision_score


@dataclass
class Explanation:
    """Why one sample got its score for one task."""

    task: str
    image: str  # fundus | oct
    heatmap: np.ndarray  # (H, W) in [0, 1]: the fundus image, or the OCT's top B-scan
    bscan: int | None = None  # OCT: the B-scan shown in `heatmap`
    attention: np.ndarray | None = None  # bscan-attention: weight per B-scan, sums to 1
    volume: np.ndarray | None = None  # densenet121-3d: (D, H, W) map


def _scale_to_max(x: torch.Tensor) -> torch.Tensor:
    peak = x.flatten(1).amax(dim=1).clamp(min=1e-12).view(-1, *[1] * (x.ndim - 1))
    return x / peak


@contextlib.contextmanager
def _hooks_removed_after(module: nn.Module) -> Iterator[None]:
    """MONAI's ModelWithHooks keeps no hook handles; drop what it registered on exit."""
    before = {
        name: (set(m._forward_hooks), set(m._backward_hooks)) for name, m in module.named_modules()
    }
    try:
        yield
    finally:
        for name, m in module.named_modules():
            fwd, bwd = before.get(name, (set(), set()))
            for key in set(m._forward_hooks) - fwd:
                del m._forward_hooks[key]
            for key in set(m._backward_hooks) - bwd:
                del m._backward_hooks[key]


class _TaskScore(nn.Module):
    """The network as a function of one image input, returning the task's score (B, 1)."""

    def __init__(
        self,
        net: EyeNet,
        task: TaskSpec,
        image: str,
        others: Mapping[str, torch.Tensor],
        place: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.net, self.task, self.image = net, task, image
        self.others = dict(others)
        self.place = place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.place(x) if self.place is not None else x
        out = self.net(**{**self.others, self.image: image})[self.task.name]
        return decision_score(self.task, out)[:, None]


def _gradcam(score: _TaskScore, layer: str, x: torch.Tensor) -> torch.Tensor:
    from monai.visualize import GradCAM  # imported with MONAI's weight (models/networks.py)

    # MONAI puts the module back in the mode it found it in: a new nn.Module is in training
    # mode, which would leave the private network training (batch-norm statistics moving)
    # for the next sample's attention pass or the next call
    score.eval()
    with _hooks_removed_after(score), torch.enable_grad():
        cam = GradCAM(score, target_layers="net." + layer, postprocessing=_scale_to_max)
        return cam(x, class_idx=0).detach()


def explain(
    model: EyeModel,
    inputs: Mapping[str, torch.Tensor],
    task: str,
    image: str | None = None,
    net: EyeNet | None = None,
) -> list[Explanation]:
    """One explanation per sample of `inputs` (the network's inputs, as `model_inputs`
    gives them) for `task`, on `image` (fundus or oct; by default the model's only one,
    or fundus for fusion). `model.net` is only read (copied).

    `net`: a copy made by `private_copy(model.net)`, reused instead of a fresh copy. Only
    for a model whose weights never change (scoring keeps one per thread), and never
    shared between threads."""
    spec = model.task(task)
    layers = model.net.gradcam_layers()
    image = image or ("fundus" if "fundus" in layers else "oct")
    if image not in layers:
        raise ConfigError(f"this model has no {image} input to explain; it has {list(layers)}")
    if image not in inputs:
        raise ModelError(f"explain needs the {image} input")
    model.net.check_inputs(**inputs)
    private = net if net is not None else private_copy(model.net)
    samples = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(len(inputs[image]))]
    try:
        return [_explain_one(private, spec, image, layers[image], one) for one in samples]
    finally:
        private.zero_grad(set_to_none=True)  # a reused copy keeps no gradient buffers


def private_copy(net: EyeNet) -> EyeNet:
    """A copy of `net` in eval mode, to hook and differentiate without touching `net`.

    `explain` makes one per call unless given one: while a model trains its weights change,
    so a kept copy would go stale. A caller whose weights never change (scoring) keeps one
    per thread and passes it in, saving the copy's time at every heat map."""
    private = copy.deepcopy(net)
    private.zero_grad(set_to_none=True)  # the copy needs none of the shared gradients
    return private.eval()


def _explain_one(
    net: EyeNet, task: TaskSpec, image: str, layer: str, inputs: dict[str, torch.Tensor]
) -> Explanation:
    x = inputs[image]
    others = {k: v for k, v in inputs.items() if k != image}
    if image == "fundus":
        cam = _gradcam(_TaskScore(net, task, image, others), layer, x)
        return Explanation(task.name, image, cam[0, 0].cpu().numpy())
    if isinstance(net.oct, BScanAttention):
        with torch.no_grad():
            _, weights = net.oct.forward_with_attention(x)
        attention = weights[0].float().cpu().numpy()
        top = int(attention.argmax())

        def place(bscan: torch.Tensor) -> torch.Tensor:  # the volume with one B-scan swapped
            return torch.cat([x[:, :, :top], bscan[:, :, None], x[:, :, top + 1 :]], dim=2)

        score = _TaskScore(net, task, image, others, place)
        cam = _gradcam(score, layer, x[:, :, top])  # maps for every B-scan; keep the top one
        return Explanation(task.name, image, cam[top, 0].cpu().numpy(), top, attention)
    volume = _gradcam(_TaskScore(net, task, image, others), layer, x)[0, 0].cpu().numpy()
    top = int(volume.reshape(volume.shape[0], -1).sum(axis=1).argmax())
    return Explanation(task.name, image, volume[top], top, volume=volume)
