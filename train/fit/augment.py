"""The study's augmentation, batched on the training device.

Random scaling U[lo, hi], translation U[-t, t] of width and height on each
axis and rotation U[-r, r] degrees, drawn independently per image. The whole
batch is warped by ONE `affine_grid` + `grid_sample` call on the device that
trains, so CPU data workers only decode PNGs and a GPU is never starved by
per-image CPU transforms (torchvision's RandomAffine works image by image).

Sampling is a pure function of a `torch.Generator` passed in, kept apart from
applying, so a test can check the drawn parameters and a trainer can reseed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.params import AugmentParams


@dataclass(frozen=True)
class AffineDraw:
    """Per-image parameters of one batch (all tensors have the batch as dim 0)."""

    scale: torch.Tensor  # (B,) zoom factor, > 1 enlarges the content
    translate: torch.Tensor  # (B, 2) shift as a fraction of (width, height)
    angle: torch.Tensor  # (B,) rotation in degrees


def sample_affine(n: int, aug: AugmentParams, generator: torch.Generator) -> AffineDraw:
    """Draw n independent affine transforms, uniform over the ranges in `aug`."""
    u = torch.rand((n, 4), generator=generator, device=generator.device)
    lo, hi = aug.scale
    return AffineDraw(
        scale=lo + (hi - lo) * u[:, 0],
        translate=(2.0 * u[:, 1:3] - 1.0) * aug.translate,
        angle=(2.0 * u[:, 3] - 1.0) * aug.rotate,
    )


def affine_theta(draw: AffineDraw, height: int, width: int) -> torch.Tensor:
    """The (B, 2, 3) matrices `affine_grid` expects: output -> input coordinates.

    The forward map in pixel coordinates (origin at the centre) is
    p_out = s * R(angle) p_in + t * (W, H). affine_grid works in normalised
    coordinates (x / (W/2), y / (H/2)), so the inverse is conjugated by
    D = diag(W/2, H/2); for non-square images this keeps rotations rigid.
    """
    rad = draw.angle * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    aspect = height / width
    # D^-1 R(angle)^T D
    m = torch.stack(
        [torch.stack([cos, sin * aspect], dim=-1), torch.stack([-sin / aspect, cos], dim=-1)], dim=-2
    )  # (B, 2, 2)
    m = m / draw.scale[:, None, None]
    shift = 2.0 * draw.translate  # translation in normalised coordinates
    offset = -(m @ shift.unsqueeze(-1))  # (B, 2, 1)
    return torch.cat([m, offset], dim=-1)


def apply_affine(images: torch.Tensor, draw: AffineDraw) -> torch.Tensor:
    """Warp float images (B, C, H, W) with bilinear sampling; uncovered pixels become 0 (black)."""
    b, c, h, w = images.shape
    theta = affine_theta(draw, h, w).to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(images: torch.Tensor, aug: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    return apply_affine(images, sample_affine(images.shape[0], aug, generator))
