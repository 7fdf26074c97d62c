"""The networks the project trains: one entry each, holding everything about it, free of torch.

A sixth network is one `Network(...)` line below: `train/models.py` builds any entry through
torchvision's registry (`torchvision.models.get_model(torchvision, weights=None, num_classes=1,
**builder_kwargs)`, then a 1-channel `first_conv`), `train/fit/starting_weights.py` maps
torchvision's ImageNet keys with `weights`, `weights_norm` and `key_renames`, Grad-CAM hooks
`cam_layer`, the report names it `display`, and params.yaml's `model` accepts it. It lives in the
torch-free base so that params.py can check a model name without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The per-channel input normalisation torchvision's ImageNet weights were trained with; InceptionV3's
# weights (ported from TensorFlow) expect [-1, 1] instead, which torchvision reaches with
# transform_input=True and we build without.
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF_INCEPTION_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# torchvision's own remap for DenseNet files saved before its module names lost a dot
# ('denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight'); the published densenet121 file is one.
_DENSENET_LEGACY = (
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$",
    r"\1\2",
)


@dataclass(frozen=True)
class Network:
    name: str  # params.yaml's `model`
    display: str  # as the study's tables name it
    torchvision: str  # torchvision.models.get_model's name
    network_input: int  # size the backbone sees (InceptionV3 upsamples 224 -> 299 inside forward)
    default_lr: float  # the study: Adam 1e-4 for the skip-free nets, default 1e-3 otherwise
    first_conv: str  # dotted path, from the backbone, of the convolution that reads the image (made 1-channel)
    heads: tuple[str, ...]  # dotted paths of the final classifier layer(s): replaced on an ImageNet start
    cam_layer: str  # dotted path, from the backbone, of the Grad-CAM target layer
    weights: str  # torchvision's ImageNet weights (train.init=imagenet), as torchvision.models.get_weight names them
    weights_norm: tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per RGB channel those weights expect
    # (pattern, replacement) applied to the weight file's keys before they are loaded
    key_renames: tuple[tuple[str, str], ...] = ()
    builder_kwargs: dict[str, Any] = field(default_factory=dict)


NETWORKS: dict[str, Network] = {
    net.name: net
    for net in (  # in the study's order: its tables list the networks this way
        Network("alexnet", "AlexNet", "alexnet", 224, 1e-4, "features.0", ("classifier.6",), "features.11",
                "AlexNet_Weights.IMAGENET1K_V1", IMAGENET_NORM),
        Network("vgg16", "VGG16", "vgg16", 224, 1e-4, "features.0", ("classifier.6",), "features.29",
                "VGG16_Weights.IMAGENET1K_V1", IMAGENET_NORM),
        Network("resnet50", "ResNet50", "resnet50", 224, 1e-3, "conv1", ("fc",), "layer4",
                "ResNet50_Weights.IMAGENET1K_V2", IMAGENET_NORM),
        Network("densenet121", "DenseNet121", "densenet121", 224, 1e-3, "features.conv0", ("classifier",),
                "features.norm5", "DenseNet121_Weights.IMAGENET1K_V1", IMAGENET_NORM, key_renames=(_DENSENET_LEGACY,)),
        Network("inceptionv3", "InceptionV3", "inception_v3", 299, 1e-3, "Conv2d_1a_3x3.conv", ("fc", "AuxLogits.fc"),
                "Mixed_7c", "Inception_V3_Weights.IMAGENET1K_V1", TF_INCEPTION_NORM,
                builder_kwargs={"aux_logits": True, "init_weights": True, "transform_input": False}),
    )
}  # fmt: skip
