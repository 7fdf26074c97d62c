"""The study's five networks, from torchvision with `weights=None`, for 1-channel binary screening.

Every network is wrapped in `ScreeningNet`, which owns what all callers must
agree on: input in [0, 1] (B x 1 x 224 x 224, from uint8 by `model_input`), a fixed intensity
standardisation, InceptionV3's bilinear upsampling to 299, and a single logit
per image (P(COVID-19) = sigmoid(logit)). Training, evaluation, Grad-CAM and
ONNX export therefore run the very same graph.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from pipeline.errors import CxrError
from pipeline.networks import Network, NETWORKS

# Fixed, data-independent standardisation: shards are uint8 with roughly
# uniform (equalized) or mid-grey (plain) histograms, so (x - 0.5) / 0.25 keeps
# activations near unit scale without a statistics pass over the data.
INPUT_MEAN = 0.5
INPUT_STD = 0.25


def model_spec(name: str) -> Network:
    """Everything about a network (its entry in pipeline/networks.py); a wrong name lists the valid ones."""
    if name not in NETWORKS:
        raise CxrError(f"unknown model {name!r}; valid: {', '.join(NETWORKS)}")
    return NETWORKS[name]


def _one_channel(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def build_backbone(spec: Network) -> nn.Module:
    """torchvision's network with random weights, one logit, and a first convolution that reads one channel.

    The 3-channel convolution is built and then replaced (not built 1-channel) so that the
    seeded initialisation of every other layer is torchvision's own, draw for draw."""
    net = tvm.get_model(spec.torchvision, weights=None, num_classes=1, **spec.builder_kwargs)
    net.set_submodule(spec.first_conv, _one_channel(net.get_submodule(spec.first_conv)))
    return net


class ScreeningNet(nn.Module):
    """Backbone + the input/output conventions shared by every caller.

    forward(x) takes float images in [0, 1], shape (B, 1, H, W), and returns
    logits of shape (B,). In training mode InceptionV3 returns
    (logits, aux_logits) so the trainer can add the auxiliary loss.
    """

    def __init__(self, spec: Network, backbone: nn.Module):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.network_input = spec.network_input
        self.backbone = backbone
        self.frozen_backbone = False  # see freeze_backbone()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """What the backbone sees: standardised, and upsampled to the network's input size."""
        x = (x - INPUT_MEAN) / INPUT_STD
        if x.shape[-1] != self.network_input or x.shape[-2] != self.network_input:
            x = F.interpolate(x, size=(self.network_input, self.network_input), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(self.prepare(x))
        if isinstance(out, tuple):  # torchvision InceptionOutputs in training mode
            logits, aux = out
            return logits.squeeze(-1), aux.squeeze(-1)
        return out.squeeze(-1)

    def cam_layer(self) -> nn.Module:
        return self.backbone.get_submodule(self.spec.cam_layer)

    def head_parameter_names(self) -> set[str]:
        """state_dict names of the final classifier layer(s), e.g. {'backbone.fc.weight', 'backbone.fc.bias'}."""
        return {f"backbone.{head}.{name}" for head in self.spec.heads
                for name, _ in self.backbone.get_submodule(head).named_parameters()}

    def freeze_backbone(self) -> None:
        """Train the final classifier layer(s) only: a linear probe on fixed features.

        The frozen part also stays in eval mode (see train()), so BatchNorm keeps
        the statistics it came with and dropout before the head is off.
        """
        heads = self.head_parameter_names()
        for name, param in self.named_parameters():
            param.requires_grad_(name in heads)
        self.frozen_backbone = True

    def train(self, mode: bool = True) -> "ScreeningNet":
        super().train(mode)
        if mode and self.frozen_backbone:
            self.backbone.eval()
            for head in self.spec.heads:
                self.backbone.get_submodule(head).train()
        return self


def model_input(images: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images, (B, H, W) or (B, 1, H, W) -> float32 (B, 1, H, W) in [0, 1] on `device`.

    The one conversion from stored pixels to what `ScreeningNet.forward` takes,
    for training, evaluation, prediction, Grad-CAM and the ONNX runtime alike.
    The cast happens on `device`: the copy there stays uint8, 4x smaller.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[1] != 1):
        raise CxrError(f"model input must be uint8 (B, H, W) or (B, 1, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.ndim == 3:
        images = images[:, None]
    return images.to(device, non_blocking=True).float().div_(255.0)


def build_model(name: str) -> ScreeningNet:
    spec = model_spec(name)
    return ScreeningNet(spec, build_backbone(spec))


def inference_param_count(model: nn.Module) -> int:
    """Parameters used at inference: InceptionV3's auxiliary head only trains.

    This is the count the study's Table V reports (e.g. 21.8M for InceptionV3).
    """
    aux = getattr(getattr(model, "backbone", model), "AuxLogits", None)
    skipped = {id(p) for p in aux.parameters()} if aux is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skipped)
