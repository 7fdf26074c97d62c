"""pipeline.radiograph: the synthetic radiograph's drawing, pure functions checked on their own."""

from __future__ import annotations

import numpy as np

from pipeline.radiograph import (
    burn_text,
    chest_density,
    draw_anatomy,
    draw_opacities,
    draw_view,
    lead_marker,
    lung_fields,
    patient_grid,
)


def test_burned_in_text_stays_in_the_top_six_percent():
    drawn = 0
    for i in range(60):
        rng = np.random.default_rng(i)
        h, w = int(rng.integers(256, 1201)), int(rng.integers(256, 1201))
        rows = np.nonzero(burn_text(np.zeros((h, w), np.float32), rng).any(axis=1))[0]
        if rows.size:
            drawn += 1
            assert rows.max() < 0.06 * h
    assert drawn > 10


def test_opacities_add_density_inside_the_lungs_only():
    rng = np.random.default_rng(3)
    anatomy, view = draw_anatomy(rng), draw_view(rng)
    x, y = patient_grid(200, 180, view)
    mottle = np.zeros_like(x)
    none = np.zeros((0, 4))
    clear = chest_density(x, y, anatomy, view, none, none, mottle)
    sick = chest_density(x, y, anatomy, view, draw_opacities(anatomy, rng), none, mottle)
    extra = sick - clear
    assert extra.min() >= 0 and extra.sum() > 0
    lungs = lung_fields(x, y, anatomy)
    assert extra[lungs == 0].max() == 0


def test_lead_marker_of_the_shifted_style_sits_below_the_cropped_rows():
    h, w = 400, 300
    marked = lead_marker(np.zeros((h, w), np.float32), np.random.default_rng(0))
    rows = np.nonzero(marked.max(axis=1) > 0.5)[0]
    assert rows.size and rows.min() >= 0.08 * h  # below the rows preprocessing crops away: the model sees it
