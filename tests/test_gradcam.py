"""Grad-CAM: right shape and range for all five networks, and the map follows the evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.errors import CxrError
from train.gradcam import gradcam_heatmaps, overlay, write_overlay
from train.models import build_model

SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name",
    [
        "alexnet",
        "resnet50",
        pytest.param("vgg16", marks=SLOW),
        pytest.param("densenet121", marks=SLOW),
        pytest.param("inceptionv3", marks=SLOW),
    ],
)
def test_heatmap_shape_range_for_every_architecture(name):
    torch.manual_seed(0)
    model = build_model(name)
    images = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(1))
    shapes = []
    hook = model.cam_layer().register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    with torch.inference_mode():  # as predict calls it: Grad-CAM must re-enable autograd itself
        maps = gradcam_heatmaps(model, images)
    hook.remove()
    assert maps.shape == (2, 224, 224) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    # each map is min-max scaled, or all zero where nothing raises the logit (happens with random weights)
    assert all(m.max() == pytest.approx(1.0, abs=1e-5) or m.max() == 0.0 for m in maps)
    # the target layer is a spatial feature map (7x7 .. 14x14 here), not a pooled vector
    (shape,) = shapes
    assert len(shape) == 4 and shape[0] == 2 and min(shape[2:]) >= 7, shape


class TinyNet(nn.Module):
    """ScreeningNet's interface (x in [0, 1] -> (B,) logits, cam_layer()) at toy size, so it trains in a second."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.35).mean(dim=(2, 3))).squeeze(-1)

    def cam_layer(self) -> nn.Module:
        return self.features[-1]


SIZE = 64


def blob_images(centres_x: list[int], rng: np.random.Generator, centre_y: int = SIZE // 2) -> torch.Tensor:
    """Noise background, plus a bright Gaussian blob at each given x (None: no blob)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for cx in centres_x:
        img = rng.normal(0.35, 0.08, (SIZE, SIZE))
        if cx is not None:
            img += 0.5 * np.exp(-((yy - centre_y) ** 2 + (xx - cx) ** 2) / (2 * 5.0**2))
        out.append(img.clip(0, 1))
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


@pytest.fixture(scope="module")
def blob_detector() -> TinyNet:
    """Trained for 60 steps to tell 'bright blob anywhere' (positive) from noise."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        labels = rng.integers(0, 2, 32)
        xs = [int(rng.integers(8, SIZE - 8)) if y else None for y in labels]
        logits = model(blob_images(xs, rng, centre_y=int(rng.integers(8, SIZE - 8))))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels, dtype=torch.float32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_labels = np.array([0, 1] * 16)
    with torch.no_grad():
        logits = model(blob_images([20 if y else None for y in test_labels], rng))
    accuracy = float(((logits > 0).numpy() == test_labels).mean())
    assert accuracy >= 0.9, f"toy model did not learn the blob (accuracy {accuracy}); the test below would be void"
    return model


def centre_of_mass_x(heatmap: np.ndarray) -> float:
    return float((heatmap.sum(axis=0) * np.arange(heatmap.shape[1])).sum() / heatmap.sum())


def test_heatmap_follows_the_blob(blob_detector):
    rng = np.random.default_rng(1)
    left_x, right_x = 14, SIZE - 15
    maps = gradcam_heatmaps(blob_detector, blob_images([left_x, right_x], rng))
    assert maps.shape == (2, SIZE, SIZE)
    left, right = centre_of_mass_x(maps[0]), centre_of_mass_x(maps[1])
    assert left < SIZE / 2 < right, (left, right)
    # and the hottest pixel sits on the blob itself, not just on its half
    for heatmap, cx in ((maps[0], left_x), (maps[1], right_x)):
        peak_y, peak_x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        assert abs(int(peak_x) - cx) <= 8 and abs(int(peak_y) - SIZE // 2) <= 8, (peak_x, peak_y, cx)


def test_overlay_is_rgb_of_the_input_size_and_is_written(tmp_path):
    image = np.tile(np.arange(224, dtype=np.uint8), (224, 1))
    heat = np.zeros((224, 224), np.float32)
    heat[100:120, 100:120] = 1.0
    rgb = overlay(image, heat)
    assert rgb.shape == (224, 224, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(rgb[110, 110], rgb[10, 110])  # the hot square is coloured differently
    write_overlay(tmp_path / "sub" / "x.png", image, heat)
    with Image.open(tmp_path / "sub" / "x.png") as png:
        assert png.size == (224, 224) and png.mode == "RGB"


def test_mismatched_shapes_are_refused():
    with pytest.raises(CxrError, match="shape"):
        overlay(np.zeros((224, 224), np.uint8), np.zeros((7, 7), np.float32))
    with pytest.raises(CxrError, match=r"\(B, 1, H, W\)"):
        gradcam_heatmaps(TinyNet(), torch.rand(2, 3, 32, 32))
