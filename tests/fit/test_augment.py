from __future__ import annotations

import math

import pytest
import torch

from pipeline.params import AugmentParams
from train.fit.augment import AffineDraw, apply_affine, augment_batch, sample_affine

STUDY = AugmentParams(scale=(0.9, 1.1), translate=0.1, rotate=10.0)


def _draw(n: int, scale=1.0, tx=0.0, ty=0.0, angle=0.0) -> AffineDraw:
    return AffineDraw(
        scale=torch.full((n,), float(scale)),
        translate=torch.tensor([[tx, ty]] * n, dtype=torch.float32),
        angle=torch.full((n,), float(angle)),
    )


def test_sampled_parameters_cover_the_study_ranges_and_nothing_else():
    d = sample_affine(20000, STUDY, torch.Generator().manual_seed(0))
    assert d.scale.shape == (20000,) and d.translate.shape == (20000, 2) and d.angle.shape == (20000,)
    for values, lo, hi in ((d.scale, 0.9, 1.1), (d.translate[:, 0], -0.1, 0.1), (d.translate[:, 1], -0.1, 0.1),
                           (d.angle, -10.0, 10.0)):
        assert values.min() >= lo and values.max() <= hi
        width = hi - lo
        assert values.min() < lo + 0.01 * width and values.max() > hi - 0.01 * width  # covers the range
        assert abs(values.mean().item() - (lo + hi) / 2) < 0.02 * width  # uniform, not skewed
        assert abs(values.std().item() - width / math.sqrt(12)) < 0.02 * width
    # independent axes and parameters
    corr = torch.corrcoef(torch.stack([d.scale, d.translate[:, 0], d.translate[:, 1], d.angle]))
    assert (corr - torch.eye(4)).abs().max() < 0.05


def test_ranges_come_from_params():
    fixed = AugmentParams(scale=(1.0, 1.0), translate=0.0, rotate=0.0)
    d = sample_affine(1000, fixed, torch.Generator().manual_seed(1))
    assert torch.all(d.scale == 1.0) and torch.all(d.translate == 0.0) and torch.all(d.angle == 0.0)
    wide = AugmentParams(scale=(0.5, 0.6), translate=0.3, rotate=45.0)
    d = sample_affine(1000, wide, torch.Generator().manual_seed(1))
    assert d.scale.min() >= 0.5 and d.scale.max() <= 0.6 and d.translate.abs().max() > 0.25 and d.angle.abs().max() > 40


def test_same_generator_seed_same_draw_and_different_seed_differs():
    a = sample_affine(8, STUDY, torch.Generator().manual_seed(7))
    b = sample_affine(8, STUDY, torch.Generator().manual_seed(7))
    c = sample_affine(8, STUDY, torch.Generator().manual_seed(8))
    assert torch.equal(a.scale, b.scale) and torch.equal(a.angle, b.angle)
    assert not torch.equal(a.scale, c.scale)


def test_identity_transform_returns_the_image():
    x = torch.rand(3, 1, 16, 16)
    assert torch.allclose(apply_affine(x, _draw(3)), x, atol=1e-5)


def test_translation_moves_content_by_the_fraction_of_width_and_height():
    x = torch.zeros(1, 1, 20, 20)
    x[0, 0, 10, 10] = 1.0
    out = apply_affine(x, _draw(1, tx=0.1, ty=-0.2))  # +2 px in x, -4 px in y
    assert out[0, 0, 6, 12] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)


def test_rotation_and_scale_act_about_the_centre():
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 15] = 1.0  # 5 px right of the centre pixel
    rotated = apply_affine(x, _draw(1, angle=90.0))
    peak = divmod(int(rotated[0, 0].argmax()), 21)
    assert peak in {(5, 10), (15, 10)}  # a quarter turn lands above or below the centre
    zoomed = apply_affine(x, _draw(1, scale=1.2))  # 5 px * 1.2 = 6 px from the centre
    assert divmod(int(zoomed[0, 0].argmax()), 21) == (10, 16)


def test_batch_is_warped_per_image_with_black_borders():
    x = torch.ones(16, 1, 32, 32)
    out = augment_batch(x, STUDY, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
    # each image gets its own transform, so the uncovered (black) areas differ
    covered = out.mean(dim=(1, 2, 3))
    assert covered.unique().numel() == 16 and covered.min() < 1.0
