import dataclasses
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.imageio import ImageRejected
from pipeline.params import load_params
from pipeline.preprocess import (
    PreprocessConfig,
    center_square,
    crop_top,
    equalize,
    preprocess_array,
    preprocess_bytes,
    resize_square,
    to_grey_u8,
)


def radiograph(h=300, w=260, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    body = 60 + 120 * np.exp(-(((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2))
    return (body + rng.normal(0, 5, (h, w))).clip(0, 255).astype(np.uint8)


@pytest.fixture
def cfg():
    return PreprocessConfig.for_variant(load_params("params.yaml").preprocess, "equalized")


def test_tinted_rgb_becomes_grey_that_keeps_the_structure():
    grey = radiograph()
    tinted = np.stack([grey * 0.6, grey * 0.8, np.minimum(grey * 1.0 + 40, 255)], axis=-1).astype(np.uint8)
    out = to_grey_u8(tinted)
    assert out.shape == grey.shape and out.dtype == np.uint8
    assert np.corrcoef(out.ravel(), grey.ravel())[0, 1] > 0.99


def test_rgba_drops_alpha():
    grey = radiograph()
    rgba = np.dstack([grey, grey, grey, np.zeros_like(grey)])
    assert np.abs(to_grey_u8(rgba).astype(int) - grey).max() <= 1


def test_16bit_is_scaled_by_its_actual_range_not_shifted():
    # A 12-bit detector in a 16-bit container: a blind >> 8 would give values 0..15.
    img = np.linspace(1000, 4000, 200 * 200).reshape(200, 200).astype(np.uint16)
    out = to_grey_u8(img)
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotone mapping


def test_constant_and_nonfinite_inputs():
    assert to_grey_u8(np.full((10, 10), 7, np.uint16)).max() == 0
    bad = np.zeros((10, 10), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ImageRejected):
        to_grey_u8(bad)


def test_crop_top_removes_the_fraction_of_rows():
    img = np.zeros((500, 300), np.uint8)
    assert crop_top(img, 0.08).shape == (460, 300)
    assert crop_top(img, 0.0).shape == (500, 300)


def test_center_square_keeps_the_middle():
    img = np.zeros((100, 300), np.uint8)
    img[:, 100:200] = 255
    sq = center_square(img)
    assert sq.shape == (100, 100) and sq.min() == 255
    assert center_square(np.zeros((300, 100), np.uint8)).shape == (100, 100)


def test_resize_and_output_shape_dtype(cfg):
    out = preprocess_array(radiograph(1200, 900), cfg)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    assert resize_square(radiograph(100, 100), 224).shape == (224, 224)


def test_global_equalization_gives_a_near_uniform_histogram():
    img = radiograph(224, 224)
    out = equalize(img, "global", 2.0)
    cdf = np.cumsum(np.bincount(out.ravel(), minlength=256)) / out.size
    ideal = np.arange(1, 257) / 256
    assert np.abs(cdf - ideal).max() < 0.05
    assert np.abs(np.cumsum(np.bincount(img.ravel(), minlength=256)) / img.size - ideal).max() > 0.2


def test_clahe_option_and_unknown_method():
    img = radiograph(224, 224)
    assert equalize(img, "clahe", 2.0).shape == img.shape
    with pytest.raises(Exception):
        equalize(img, "sharpen", 2.0)


def test_plain_variant_skips_equalization(cfg):
    plain = PreprocessConfig.for_variant(load_params("params.yaml").preprocess, "plain")
    img = radiograph(600, 600)
    assert plain.equalize is None
    assert not np.array_equal(preprocess_array(img, plain), preprocess_array(img, cfg))


def test_config_round_trips_through_a_dict(cfg):
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception, match="lacks key"):
        PreprocessConfig.from_dict({"size": 224})
    with pytest.raises(Exception, match="newer version"):
        PreprocessConfig.from_dict({**cfg.to_dict(), "denoise": True})


def test_variants_differ_only_in_equalize_and_follow_every_params_field(cfg):
    params = load_params("params.yaml").preprocess
    plain = PreprocessConfig.for_variant(params, "plain")
    assert plain == dataclasses.replace(cfg, equalize=None)
    assert {k: v for k, v in cfg.to_dict().items()} == dataclasses.asdict(params)


def test_a_field_added_later_gets_its_old_behaviour_in_older_artifacts(cfg, monkeypatch):
    older = {k: v for k, v in cfg.to_dict().items() if k != "min_side"}  # as if min_side were new
    with pytest.raises(Exception, match=r"lacks key\(s\) \['min_side'\]"):
        PreprocessConfig.from_dict(older)
    monkeypatch.setattr(PreprocessConfig, "ADDED_FIELDS", {"min_side": 1})
    assert PreprocessConfig.from_dict(older) == dataclasses.replace(cfg, min_side=1)


def _exact_bicubic(img, size):
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)).astype(float)


def test_resize_of_a_large_image_stays_close_to_exact_bicubic():
    # The resize box-reduces large inputs before bicubic; on a noisy image 9x
    # the target the two may differ by rounding, never by visible structure.
    img = radiograph(2000, 2000, seed=3)
    diff = np.abs(resize_square(img, 224).astype(float) - _exact_bicubic(img, 224))
    assert diff.mean() < 0.5 and diff.max() <= 3, (diff.mean(), diff.max())


@pytest.mark.real_data
def test_resize_matches_exact_bicubic_on_real_radiographs(covidx_mini):
    paths = sorted((covidx_mini / "train").iterdir())[::4]
    diffs = []
    for path in paths:
        grey = to_grey_u8(cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE))
        square = np.ascontiguousarray(center_square(crop_top(grey, 0.08)))
        diffs.append(np.abs(resize_square(square, 224).astype(float) - _exact_bicubic(square, 224)).mean())
    assert len(diffs) >= 40
    assert np.mean(diffs) < 0.1, f"mean abs difference {np.mean(diffs):.3f} grey levels"


@pytest.mark.parametrize("dtype", [np.complex64, object, np.str_, "datetime64[s]"])
def test_pixel_types_other_than_bool_int_or_real_float_are_refused(dtype):
    img = np.ones((80, 80), dtype=dtype) if dtype != np.str_ else np.full((80, 80), "7")
    with pytest.raises(ImageRejected, match="unsupported pixel type"):
        to_grey_u8(img)


def test_a_float_tiff_near_float32s_limit_is_refused_not_overflowed(cfg):
    """Its min..max stretch would overflow float32 to inf and score what the cast made of it."""
    img = (radiograph().astype(np.float32) - 128) * np.float32(2.6e36)  # spans -3.3e38..3.3e38
    buf = io.BytesIO()
    Image.fromarray(img, mode="F").save(buf, format="TIFF")
    with pytest.raises(ImageRejected, match=r"outside the accepted \+-2\^64"):
        preprocess_bytes(buf.getvalue(), cfg)
    plain = radiograph().astype(np.float64)  # huge but in range: stretched to the same picture as unscaled
    assert np.abs(to_grey_u8(plain * 2.0**55).astype(int) - to_grey_u8(plain).astype(int)).max() <= 1
