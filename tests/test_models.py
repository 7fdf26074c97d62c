from __future__ import annotations

import pytest
import torch

from pipeline.errors import CxrError
from pipeline.networks import NETWORKS
from train.models import build_model, inference_param_count, model_spec

# The study's Table V, millions of parameters.
TABLE_V_M = {"alexnet": 57.0, "vgg16": 134.3, "resnet50": 23.5, "densenet121": 7.0, "inceptionv3": 21.8}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {name: build_model(name).eval() for name in NETWORKS}


def test_registry_is_the_study_five():
    assert set(NETWORKS) == set(TABLE_V_M)


@pytest.mark.parametrize("name", list(TABLE_V_M))
def test_parameter_count_matches_table_v(nets, name):
    assert inference_param_count(nets[name]) / 1e6 == pytest.approx(TABLE_V_M[name], abs=0.1)


def test_inception_aux_head_is_not_counted(nets):
    net = nets["inceptionv3"]
    assert sum(p.numel() for p in net.parameters()) - inference_param_count(net) > 2_000_000


@pytest.mark.parametrize("name", list(TABLE_V_M))
def test_one_channel_in_one_logit_out(nets, name):
    net = nets[name]
    size = 224 if name == "inceptionv3" else 64  # the others accept any size >= 64; keep the test cheap
    with torch.inference_mode():
        out = net(torch.rand(2, 1, size, size))
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1


def test_inception_upsamples_to_299_and_returns_aux_logits_in_training(nets):
    net = nets["inceptionv3"]
    seen = []
    hook = net.backbone.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        net.train()
        logits, aux = net(torch.rand(2, 1, 224, 224))
    finally:
        net.eval()
        hook.remove()
    assert seen == [torch.Size([2, 1, 299, 299])]
    assert logits.shape == (2,) and aux.shape == (2,)
    assert model_spec("inceptionv3").network_input == 299


def test_default_learning_rates_follow_the_study():
    assert model_spec("alexnet").default_lr == model_spec("vgg16").default_lr == 1e-4
    assert model_spec("resnet50").default_lr == model_spec("densenet121").default_lr == 1e-3
    assert model_spec("inceptionv3").default_lr == 1e-3


@pytest.mark.parametrize("name", list(TABLE_V_M))
def test_cam_layer_is_the_last_spatial_map_and_moves_the_logit(nets, name):
    """Grad-CAM needs the network's last feature map before global pooling (7x7 for a 224 ResNet,
    8x8 after InceptionV3's 299), and a logit that depends on it."""
    net = nets[name]
    side = {"alexnet": 13, "vgg16": 14, "resnet50": 7, "densenet121": 7, "inceptionv3": 8}[name]
    seen = []
    hook = net.cam_layer().register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        logit = net(torch.rand(1, 1, 224, 224)).sum()
    finally:
        hook.remove()
    (feature,) = seen
    assert feature.ndim == 4 and feature.shape[-2:] == (side, side)
    (grad,) = torch.autograd.grad(logit, feature)
    assert grad.abs().sum() > 0


def test_a_sixth_network_is_one_registry_entry(monkeypatch):
    """Everything the model side needs comes from the entry: builder, one channel in, one logit
    out, Grad-CAM layer, head, freezing and the ImageNet key mapping."""
    from pipeline import networks
    from train.fit.starting_weights import adapt_imagenet_state

    entry = networks.Network("resnet18", "ResNet18", "resnet18", 224, 1e-3, "conv1", ("fc",), "layer4",
                             "ResNet18_Weights.IMAGENET1K_V1", networks.IMAGENET_NORM)  # fmt: skip
    monkeypatch.setitem(networks.NETWORKS, "resnet18", entry)
    net = build_model("resnet18").eval()
    assert net.spec is entry and model_spec("resnet18").default_lr == 1e-3
    with torch.inference_mode():
        assert net(torch.rand(2, 1, 64, 64)).shape == (2,)
    assert net.backbone.conv1.in_channels == 1 and net.cam_layer() is net.backbone.layer4
    assert net.head_parameter_names() == {"backbone.fc.weight", "backbone.fc.bias"}
    net.freeze_backbone()
    assert {n for n, p in net.named_parameters() if p.requires_grad} == net.head_parameter_names()
    import torchvision

    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # the layout of torchvision's file
    state = adapt_imagenet_state(imagenet, entry)
    missing, unexpected = build_model("resnet18").load_state_dict(state, strict=False)
    assert set(missing) == net.head_parameter_names() and not unexpected


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(CxrError, match="resnet50"):
        build_model("resnet51")


def test_model_input_is_uint8_over_255_in_one_channel():
    import numpy as np

    from train.models import model_input

    pixels = np.array([[[0, 1, 128, 255]]], np.uint8)  # (B=1, H=1, W=4)
    x = model_input(pixels)
    assert x.dtype == torch.float32 and x.shape == (1, 1, 1, 4)
    assert x.flatten().tolist() == [0.0, np.float32(1) / np.float32(255), np.float32(128) / np.float32(255), 1.0]
    assert torch.equal(model_input(torch.from_numpy(pixels)[:, None]), x)
    with pytest.raises(CxrError, match="uint8"):
        model_input(pixels.astype(np.float32))
    with pytest.raises(CxrError, match="uint8"):
        model_input(np.zeros((1, 3, 4, 4), np.uint8))  # colour is not a model input
