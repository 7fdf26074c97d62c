import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import imageio
from pipeline.imageio import DecodeLimits, ImageRejected, apply_orientation, decode_grey, reduction_factor

LIMITS = DecodeLimits(max_pixels=50_000_000, min_side=32)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(h=400, w=300):
    return (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_common_formats_decode_to_2d(fmt):
    out = decode_grey(encode(gradient(), fmt), LIMITS)
    assert out.shape == (400, 300) and out.ndim == 2


def test_palette_rgba_cmyk_and_16bit():
    g = gradient()
    buf = io.BytesIO()
    Image.fromarray(g).convert("P").save(buf, "PNG")
    assert decode_grey(buf.getvalue(), LIMITS).shape == (400, 300)
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    assert decode_grey(encode(rgba, "PNG"), LIMITS).shape == (400, 300)
    buf = io.BytesIO()
    Image.fromarray(np.dstack([g, g, g])).convert("CMYK").save(buf, "JPEG")
    assert decode_grey(buf.getvalue(), LIMITS).shape == (400, 300)
    ok, png16 = cv2.imencode(".png", (g.astype(np.uint16) * 100 + 1000))
    out16 = decode_grey(png16.tobytes(), LIMITS)
    assert out16.dtype == np.uint16 and out16.max() > 255


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    g = np.zeros((60, 90), np.uint8)
    g[:20, :30] = 255
    assert np.array_equal(
        apply_orientation(g, orientation),
        np.asarray(ImageOps.exif_transpose(_with_orientation(g, orientation))),
    )


def _with_orientation(g, orientation):
    img = Image.fromarray(g)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_reduced_jpeg_decode_honours_orientation_like_full_decode():
    g = gradient(1600, 1000)
    exif = Image.new("L", (1, 1)).getexif()
    exif[0x0112] = 6
    data = encode(g, "JPEG", exif=exif, quality=95)
    full = decode_grey(data, LIMITS)
    reduced = decode_grey(data, LIMITS, reduce_to=(0.08, 224))
    assert full.shape == (1000, 1600)
    assert reduced.shape[0] * 4 == full.shape[0] and reduced.shape[1] * 4 == full.shape[1]


def test_reduction_factor_keeps_the_crop_above_size():
    assert reduction_factor(3000, 3000, 0.08, 224) == 8
    assert reduction_factor(1000, 1000, 0.08, 224) == 4
    assert reduction_factor(500, 500, 0.08, 224) == 2
    assert reduction_factor(400, 400, 0.08, 224) == 1
    for w, h in [(3000, 3000), (1000, 1000), (500, 500), (999, 2000)]:
        f = reduction_factor(w, h, 0.08, 224)
        assert min(w, int(h * 0.92)) // f >= 224


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is text, not a picture", "not a readable image"),
    ],
)
def test_garbage_is_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        decode_grey(data, LIMITS)


def test_truncated_images_are_rejected():
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (600, 600), dtype=np.uint8)
    for fmt in ("JPEG", "PNG"):
        data = encode(noisy, fmt)
        with pytest.raises(ImageRejected):
            decode_grey(data[: len(data) // 2], LIMITS)


@pytest.mark.parametrize("side", [15_000, 100_000])  # below and above Pillow's own bomb bound
def test_declared_huge_size_is_refused_before_decoding(side):
    # A valid PNG header that declares 100k x 100k pixels and carries almost no data.
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    with pytest.raises(ImageRejected, match="over the bound|bomb"):
        decode_grey(png, LIMITS)


def test_too_small_is_rejected():
    with pytest.raises(ImageRejected, match="too small"):
        decode_grey(encode(np.zeros((10, 10), np.uint8), "PNG"), LIMITS)


@pytest.mark.parametrize("fmt", ["TIFF", "GIF", "PNG"])
def test_multi_frame_images_are_refused_everywhere(fmt):
    frames = [Image.fromarray(gradient()), Image.fromarray(255 - gradient())]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageRejected, match="multi-frame image .* 2 frames"):
        decode_grey(buf.getvalue(), LIMITS)


def test_jpeg_with_corrupt_entropy_data_is_rejected_not_smeared():
    rng = np.random.default_rng(0)
    data = bytearray(encode((rng.random((256, 256)) * 255).astype(np.uint8), "JPEG"))
    data[len(data) // 2] ^= 0x55  # one flipped byte in the scan: libjpeg warns and carries on
    with pytest.raises(ImageRejected, match="corrupt JPEG data"):
        decode_grey(bytes(data), LIMITS)
    assert decode_grey(encode(gradient(), "JPEG"), LIMITS).shape == (400, 300)  # clean JPEGs still decode


def test_memory_bound_counts_decoded_bytes_not_pixels():
    g = gradient()
    limits = DecodeLimits(max_pixels=50_000_000, min_side=32, max_decoded_bytes=400 * 300 * 2)
    assert decode_grey(encode(g, "PNG"), limits).shape == (400, 300)  # 1 byte a pixel: within
    rgb = encode(np.dstack([g, g, g]), "PNG")  # same pixels, 3 bytes each: over
    with pytest.raises(ImageRejected, match=r"MiB to decode \(300x400 RGB\).*max_decoded_bytes"):
        decode_grey(rgb, limits)
    with pytest.raises(ImageRejected, match="over the bound"):  # the encoded file itself counts too
        decode_grey(encode(g, "PNG") + b"\0" * 400 * 300 * 2, limits)


def test_sixteen_bit_scaling_is_exact_and_stays_integer():
    from pipeline.preprocess import to_grey_u8

    img = (np.random.default_rng(1).integers(100, 4096, (64, 80))).astype(np.uint16)
    f = img.astype(np.float32)
    expected = np.round((f - f.min()) * (255.0 / (f.max() - f.min()))).astype(np.uint8)
    assert np.array_equal(to_grey_u8(img), expected)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16"])
def test_libspng_png_decode_matches_opencvs_grey_decode(mode):
    """The fast PNG path (libspng) gives OpenCV's grey picture: the same pixels for grey
    sources, within one grey level for colour (rounding of the same luma weights)."""
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (40, 50), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    fast = imageio._decode_png(buf.getvalue(), mode)
    reference = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if mode in ("LA", "I;16"):  # libspng gets these wrong or refuses them: OpenCV decodes them
        assert fast is None and np.array_equal(decode_grey(buf.getvalue(), LIMITS), reference)
        return
    assert fast.shape == reference.shape == (40, 50) and fast.dtype == reference.dtype
    assert np.abs(fast.astype(int) - reference.astype(int)).max() <= (0 if mode == "L" else 1)


def test_a_png_libspng_refuses_goes_to_the_other_decoders():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((80, 80), np.uint8)).save(buf, "PNG")
    assert imageio._decode_png(buf.getvalue()[:-30], "L") is None  # truncated: OpenCV, then Pillow, decide
    with pytest.raises(ImageRejected):
        decode_grey(buf.getvalue()[: len(buf.getvalue()) // 2], LIMITS)
