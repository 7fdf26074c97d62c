"""Grad-CAM heatmaps for the screening networks, with the `grad-cam` package.

The target layer is each architecture's last spatial feature map, named in
`pipeline.networks.NETWORKS[...].cam_layer` and returned by `ScreeningNet.cam_layer()`.
The explained quantity is the COVID-19 logit: ScreeningNet returns one logit
per image, shape (B,), and pytorch-grad-cam applies a target to each row of the
output, i.e. to a 0-d logit, so `BinaryClassifierOutputTarget(1)` (which
returns the logit itself) fits without a (B, 1) wrapper module.

DenseNet121 note: torchvision applies an in-place ReLU to `features.norm5`'s
output after the forward hook has stored it, so the stored activation is the
rectified feature map while the gradient is taken w.r.t. norm5's output (the
tensor hook sees the pre-ReLU version). That is the usual Grad-CAM pairing of
rectified features with the logit's gradient; checked numerically when this
was written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from torch import nn

from pipeline.errors import CxrError
from pipeline.fileio import atomic_output

POSITIVE_CLASS = 1
OVERLAY_IMAGE_WEIGHT = 0.5  # share of the radiograph in the overlay; the rest is the colour-mapped heatmap


def gradcam_heatmaps(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Heatmaps of the positive logit for float images in [0, 1], shape (B, 1, H, W).

    `model` is a ScreeningNet (or any module with a `cam_layer()` method and a
    (B,) logit output). Returns float32 (B, H, W), each map scaled to [0, 1]
    by pytorch-grad-cam (all zeros where no region raises the logit).
    The model is put in eval mode.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise CxrError(f"Grad-CAM expects images shaped (B, 1, H, W), got {tuple(images.shape)}")
    device = next(model.parameters()).device
    targets = [BinaryClassifierOutputTarget(POSITIVE_CLASS)] * len(images)
    # Callers usually run inference under no_grad/inference_mode; Grad-CAM needs the backward pass.
    with torch.inference_mode(False), torch.enable_grad():
        with GradCAM(model=model, target_layers=[model.cam_layer()]) as cam:
            maps = cam(input_tensor=images.to(device).clone(), targets=targets)
    maps = np.asarray(maps, dtype=np.float32)
    if not np.isfinite(maps).all():
        raise CxrError("Grad-CAM produced non-finite values")  # e.g. NaN weights in a corrupt checkpoint
    return maps


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """uint8 (H, W) greyscale + [0, 1] (H, W) heatmap -> uint8 (H, W, 3) RGB jet overlay."""
    if image.shape != heatmap.shape:
        raise CxrError(f"heatmap shape {heatmap.shape} does not match image shape {image.shape}")
    rgb = np.repeat((image.astype(np.float32) / 255.0)[:, :, None], 3, axis=2)
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=OVERLAY_IMAGE_WEIGHT)


def write_overlay(path: Path, image: np.ndarray, heatmap: np.ndarray) -> None:
    with atomic_output(path) as stream:  # never through a link planted under the heatmap's name
        Image.fromarray(overlay(image, heatmap)).save(stream, format="PNG")
