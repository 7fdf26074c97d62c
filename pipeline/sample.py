"""Synthetic chest X-rays in the exact COVIDx CXR-2 layout, so the pipeline runs with no download.

    out_dir/train.txt, out_dir/test.txt   lines `patient_id filename positive|negative source`
    out_dir/train/<files>, out_dir/test/<files>

The pictures are crude but X-ray-like (dark background, bright thorax, dark lung fields, ribs,
spine, heart, noise), and they carry the traps of the real download: patient ids with spaces,
file names with several dots, patients with several images, 8/16-bit, RGB-tinted, RGBA and
palette PNGs, JPEGs, TIFFs, PNG bytes behind a `.jpg` name, black borders, burned-in text and
many sizes. Positives have ground-glass opacities in the lungs; everything else (format, size,
source, text, borders, exposure) is drawn independently of the label so only the lungs tell.

Every image is drawn from its own generator seeded by (seed, image number), so one image does
not shift the next, and the same arguments give byte-identical files on the same install.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.errors import CxrError

CLASSES = ("negative", "positive")
SOURCES = ("synth-a", "synth-b", "synth-c")
SPLITS = ("train", "test")
STYLES = ("default", "shifted")  # acquisition styles: "shifted" is an external site (see shift_view)
STYLE_OFFSET = 1_000_000
MARKER = ".cxr-sample.json"  # says "this folder is ours to replace"; a real download lacks it

# Encodings, tiled per class so both classes get the same multiset of formats: a format must
# never predict the label. 16 entries, so 16 images per class already show every quirk.
KIND_POOL = (
    "png8", "png8", "png8", "png8", "jpeg", "jpeg", "jpeg", "jpeg",
    "png16", "png16", "tint_png", "tint_jpeg", "rgba_png", "palette_png", "tiff", "png_as_jpg",
)
IMAGES_PER_PATIENT = ((1, 2, 3), (0.75, 0.17, 0.08))
WORK_SIDE = 384  # anatomy is smooth, so it is drawn this small and upscaled; noise is full size
TEXT_WORDS = ("PORTABLE", "AP", "PA", "ERECT", "SUPINE", "L", "R", "1 VIEW", "CHEST", "SEMI-ERECT")
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]
JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_OPTIMIZE, 0, cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
TIFF_PARAMS = [cv2.IMWRITE_TIFF_COMPRESSION, cv2.IMWRITE_TIFF_COMPRESSION_LZW]


@dataclass(frozen=True)
class ImagePlan:
    split: str
    number: int  # global image number: seeds this image's generator
    patient: int  # global patient number: seeds the patient's anatomy
    patient_id: str
    filename: str
    label: str
    source: str
    kind: str


@dataclass(frozen=True)
class Anatomy:
    """One patient's body, shared by all their images so a patient's images look alike."""

    body_w: float  # thorax half-width, in units of the image's shorter side
    lung_dx: float
    lung_y: float
    lung_w: float
    lung_h: float
    heart_w: float
    rib_period: float
    rib_curve: float


@dataclass(frozen=True)
class View:
    """One exposure: canvas size, patient placement and film response."""

    height: int
    width: int
    cx: float  # thorax centre as a fraction of width / height
    cy: float
    zoom: float
    tilt: float  # radians
    tissue: float
    air: float
    gamma: float
    low: float
    high: float
    heel: float  # left-right exposure gradient of the tube
    noise: float


# --- plan: who, which file, which label, which format -------------------------------------


def _mix(n: int, salt: int) -> str:
    # Odd multipliers are bijections mod 2**32: distinct n give distinct hex names.
    return f"{(n * salt + 0x5BD1E995) % 2**32:08x}"


def _patient_id(n: int, rng: np.random.Generator) -> str:
    style = rng.integers(5)
    return (str(n), f"P{n:05d}", f"COVID {n}", f"pt-{n}", _mix(n, 0x2545F491))[style]


def _filename(pid: str, number: int, j: int, ext: str, style: int, date: str) -> str:
    slug = pid.replace(" ", "-")  # the label line is space-separated: names must not hold spaces
    if style == 0:
        return f"{slug}.view.{j}{ext}"
    if style == 1:
        return f"{slug}-{j}{ext}"
    if style == 2:
        return f"{_mix(number, 0x9E3779B1)}{ext}"
    return f"{slug}.{date}.{j}{ext}"


def _extension(kind: str, rng: np.random.Generator) -> str:
    if kind in ("jpeg", "tint_jpeg"):
        return (".jpg", ".jpg", ".jpeg")[rng.integers(3)]
    if kind == "tiff":
        return (".tif", ".tiff")[rng.integers(2)]
    return ".jpg" if kind == "png_as_jpg" else ".png"


def plan_sample(train_per_class: int, test_per_class: int, seed: int, style: str = "default") -> list[ImagePlan]:
    """Every image of the sample, in label-file order; patients never span two splits."""
    rng = np.random.default_rng([seed, 0] if style == "default" else [seed, 0, STYLES.index(style)])
    plans: list[ImagePlan] = []
    # Another style draws other patients: numbers (which seed anatomy and image) never meet the default's.
    patient = number = STYLE_OFFSET * STYLES.index(style)
    for split, per_class in zip(SPLITS, (train_per_class, test_per_class)):
        groups = []
        # One pool per split, shared by both classes; permuted first so that small samples
        # still get a random spread of kinds rather than the head of KIND_POOL.
        pool = np.resize(rng.permutation(KIND_POOL), per_class)
        for label in CLASSES:
            kinds = iter(rng.permutation(pool).tolist())
            left = per_class
            while left:
                count = min(left, int(rng.choice(IMAGES_PER_PATIENT[0], p=IMAGES_PER_PATIENT[1])))
                left -= count
                patient += 1
                groups.append((patient, label, [next(kinds) for _ in range(count)]))
        for i in rng.permutation(len(groups)):  # interleave classes as a real label file does
            pat, label, kinds_ = groups[i]
            pid = _patient_id(pat, rng)
            source = SOURCES[rng.integers(len(SOURCES))]
            style = int(rng.choice(4, p=(0.35, 0.25, 0.2, 0.2)))
            for j, kind in enumerate(kinds_, start=1):
                number += 1
                date = f"2020.{rng.integers(1, 13):02d}.{rng.integers(1, 29):02d}"
                name = _filename(pid, number, j, _extension(kind, rng), style, date)
                plans.append(ImagePlan(split, number, pat, pid, name, label, source, kind))
    return plans


def label_line(plan: ImagePlan) -> str:
    return f"{plan.patient_id} {plan.filename} {plan.label} {plan.source}"


# --- drawing: pure functions, arrays in, arrays out ---------------------------------------


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    return Anatomy(
        body_w=u(0.44, 0.52), lung_dx=u(0.19, 0.23), lung_y=u(-0.04, 0.04), lung_w=u(0.14, 0.17),
        lung_h=u(0.30, 0.36), heart_w=u(0.14, 0.18), rib_period=u(0.07, 0.09), rib_curve=u(0.8, 1.6),
    )


def draw_view(rng: np.random.Generator) -> View:
    long_side = int(288 + 912 * rng.beta(1.4, 3.0))  # mostly 400-700 px, a few up to 1200
    aspect = rng.uniform(1.0, 1.45)
    short_side = max(256, int(long_side / aspect))
    portrait = rng.random() < 0.6
    h, w = (long_side, short_side) if portrait else (short_side, long_side)
    u = rng.uniform
    return View(
        height=h, width=w, cx=u(0.45, 0.55), cy=u(0.50, 0.60), zoom=u(0.95, 1.25), tilt=u(-0.06, 0.06),
        tissue=u(0.45, 0.62), air=u(0.22, 0.34), gamma=u(0.8, 1.25), low=u(0.0, 0.06), high=u(0.85, 1.0),
        heel=u(-0.08, 0.08), noise=u(0.008, 0.03),
    )


def patient_grid(h: int, w: int, view: View) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in patient units: origin at the thorax centre, unit = shorter side / zoom."""
    scale = min(h, w) / view.zoom
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (x + 0.5 - view.cx * w) / scale, (y + 0.5 - view.cy * h) / scale
    c, s = math.cos(view.tilt), math.sin(view.tilt)
    return c * x - s * y, s * x + c * y


def soft_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float | np.ndarray,
                 ay: float, edge: float = 0.15) -> np.ndarray:
    # A ramp instead of a hard cut: real organ borders are blurred by projection.
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def lung_fields(x: np.ndarray, y: np.ndarray, a: Anatomy) -> np.ndarray:
    # Lungs are narrow at the apex and wide at the base: the half-width grows with height.
    ax = a.lung_w * (0.85 + 0.15 * np.clip((y - a.lung_y) / a.lung_h, -1.0, 1.0))
    left = soft_ellipse(x, y, -a.lung_dx, a.lung_y, ax, a.lung_h)
    return np.maximum(left, soft_ellipse(x, y, a.lung_dx, a.lung_y, ax, a.lung_h))


def bones(x: np.ndarray, y: np.ndarray, a: Anatomy) -> np.ndarray:
    # Ribs fall away from the spine: stripes along parabolas in x, thin bright crests of a cosine.
    # Spacing widens towards the base, and ribs only cover the thorax, not the abdomen.
    yr = y + 0.25 * np.abs(x) - a.rib_curve * x**2
    ribs = np.clip((np.cos(2 * np.pi * (yr - 0.5 * yr**2) / a.rib_period) - 0.55) / 0.45, 0.0, 1.0)
    top, bottom = a.lung_y - a.lung_h - 0.06, a.lung_y + a.lung_h + 0.04
    ribs *= np.clip((np.abs(x) - 0.03) / 0.03, 0.0, 1.0) * np.clip(np.minimum(y - top, bottom - y) / 0.05, 0, 1)
    spine = np.exp(-((x / 0.035) ** 4)) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.07)) * (y > -0.5)
    ax = np.abs(x)
    clavicle = np.exp(-(((y - (-0.33 + 0.12 * ax)) / 0.016) ** 2)) * ((ax > 0.04) & (ax < 0.3))
    return 0.12 * ribs + 0.28 * spine + 0.15 * clavicle


def blob_map(x: np.ndarray, y: np.ndarray, blobs: np.ndarray) -> np.ndarray:
    """Sum of Gaussians; blobs rows are (x, y, sigma, amplitude) in patient units."""
    out = np.zeros_like(x)
    for bx, by, sigma, amp in blobs:
        out += amp * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * sigma**2))
    return out


def draw_opacities(a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Ground-glass COVID-19 pattern: several wide faint blobs, bilateral, peripheral, basal."""
    n = int(rng.integers(4, 11))
    sides = rng.choice([-1.0, 1.0], size=n) if rng.random() < 0.75 else np.full(n, rng.choice([-1.0, 1.0]))
    lateral = rng.beta(2.0, 1.5, size=n) - 0.4
    vertical = rng.beta(2.2, 1.5, size=n) * 1.6 - 0.8
    severity = rng.uniform(0.09, 0.24)  # mild cases overlap the negatives: learnable, not trivial
    return np.stack([
        sides * (a.lung_dx + lateral * a.lung_w * 1.2), a.lung_y + vertical * a.lung_h * 0.9,
        rng.uniform(0.04, 0.09, size=n), severity * rng.uniform(0.5, 1.0, size=n),
    ], axis=1)


def draw_nodules(a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Small dense spots in either class (vessels end-on, granulomas): texture, not signal."""
    n = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    return np.stack([
        rng.choice([-1.0, 1.0], size=n) * (a.lung_dx + rng.uniform(-0.6, 0.6, size=n) * a.lung_w),
        a.lung_y + rng.uniform(-0.7, 0.7, size=n) * a.lung_h,
        rng.uniform(0.012, 0.025, size=n), rng.uniform(0.05, 0.12, size=n),
    ], axis=1).reshape(n, 4)


def chest_density(x: np.ndarray, y: np.ndarray, a: Anatomy, v: View, opacities: np.ndarray,
                  nodules: np.ndarray, mottle: np.ndarray) -> np.ndarray:
    """Projected density in [0, 1] (bright = dense) on the given patient grid."""
    # Box-like superellipse for trunk and shoulders, plus a neck above it.
    body = np.clip((1.0 - (np.abs(x / a.body_w) ** 4 + np.abs((y - 0.2) / 0.68) ** 4)) / 0.2, 0, 1)
    body = np.maximum(body, soft_ellipse(x, y, 0.0, -0.75, 0.12, 0.4, edge=0.3))
    lungs = lung_fields(x, y, a)
    heart = soft_ellipse(x, y, 0.05, a.lung_y + 0.17, a.heart_w, 0.14, edge=0.4)
    hila = blob_map(x, y, np.array([[-0.09, a.lung_y, 0.04, 0.08], [0.09, a.lung_y, 0.04, 0.08]]))
    hila = hila + blob_map(x, y, nodules)
    # Ground glass adds density but keeps the ribs visible, hence additive and mottled, not a fill.
    ggo = blob_map(x, y, opacities) * np.clip(1.0 + 0.45 * mottle, 0.2, 2.0)
    d = v.tissue * body - v.air * lungs * (1.0 - 0.75 * heart)
    d = d + (bones(x, y, a) + hila) * body + np.minimum(ggo, 0.3) * lungs
    return np.clip(0.03 + d, 0.0, 1.0)


def develop(density: np.ndarray, v: View, rng: np.random.Generator) -> np.ndarray:
    """Film response at full size: tube heel gradient, gamma, window, quantum noise."""
    h, w = density.shape
    heel = 1.0 + v.heel * np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    img = np.clip(density * heel, 0.0, 1.0) ** v.gamma
    img = v.low + (v.high - v.low) * img
    return np.clip(img + v.noise * rng.standard_normal((h, w), dtype=np.float32), 0.0, 1.0)


def black_border(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Scanned films and cropped screenshots often keep black strips on some sides.
    if rng.random() >= 0.35:
        return img
    h, w = img.shape
    out = img.copy()
    top, bottom, left, right = (int(rng.uniform(0.01, 0.08) * s) if rng.random() < 0.6 else 0
                                for s in (h, h, w, w))
    out[:top], out[h - bottom:], out[:, :left], out[:, w - right:] = 0, 0, 0, 0
    return out


def burn_text(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White annotations kept inside the top 6% of rows (preprocess crops 8%)."""
    if rng.random() >= 0.6:
        return img
    h, w = img.shape
    words = [TEXT_WORDS[i] for i in rng.choice(len(TEXT_WORDS), size=int(rng.integers(1, 4)), replace=False)]
    if rng.random() < 0.5:
        words.append(f"2020-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}")
    text = " ".join(words)
    font = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX)[rng.integers(3)]
    (_, th), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = 0.035 * h / th
    for _ in range(2):  # Hershey widths are not linear in scale and stroke: measure, shrink once
        thickness = max(1, round(scale * 1.2))
        (tw, _), base = cv2.getTextSize(text, font, scale, thickness)
        if tw <= 0.94 * w:
            break
        scale *= 0.9 * w / tw
    x0 = int(0.03 * w) if rng.random() < 0.6 else int(0.97 * w) - tw
    y0 = int(0.06 * h) - base - thickness  # baseline high enough that descenders stay inside
    layer = np.zeros((h, w), np.uint8)
    cv2.putText(layer, text, (x0, y0), font, scale, 255, thickness, cv2.LINE_AA)
    return np.maximum(img, layer.astype(np.float32) / 255.0)


def shift_view(v: View, rng: np.random.Generator) -> View:
    """Another hospital's acquisition: larger detector, flatter and brighter film, more noise."""
    u = rng.uniform
    f = u(1.5, 2.2)
    return dataclasses.replace(
        v, height=int(v.height * f), width=int(v.width * f), gamma=u(1.4, 1.9), low=u(0.12, 0.22),
        high=u(0.70, 0.84), noise=u(0.04, 0.07), heel=u(0.1, 0.2),
    )


def lead_marker(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A bright lead side marker ("R"/"L" in a box) on the patient's shoulder, below the cropped rows."""
    h, w = img.shape
    side = max(12, int(0.06 * min(h, w)))
    x0 = int(rng.uniform(0.05, 0.2) * w) if rng.random() < 0.5 else int(rng.uniform(0.8, 0.95) * w) - side
    y0 = int(rng.uniform(0.12, 0.25) * h)
    layer = np.zeros((h, w), np.uint8)
    cv2.rectangle(layer, (x0, y0), (x0 + side, y0 + side), 255, max(1, side // 10))
    cv2.putText(layer, "RL"[int(rng.integers(2))], (x0 + side // 5, y0 + 4 * side // 5), cv2.FONT_HERSHEY_SIMPLEX,
                side / 40, 255, max(1, side // 12), cv2.LINE_AA)  # fmt: skip
    return np.maximum(img, layer.astype(np.float32) / 255.0)


def render(a: Anatomy, positive: bool, rng: np.random.Generator, style: str = "default") -> np.ndarray:
    """One synthetic radiograph, float32 in [0, 1], shape (height, width)."""
    v = draw_view(rng)
    if style == "shifted":  # drawn after the default view so the default sample stays byte-identical
        v = shift_view(v, rng)
    f = min(1.0, WORK_SIDE / max(v.height, v.width))
    wh, ww = round(v.height * f), round(v.width * f)
    x, y = patient_grid(wh, ww, v)
    mottle = cv2.GaussianBlur(rng.standard_normal((wh, ww), dtype=np.float32), (0, 0), 2.5) * 4.0
    nodules = draw_nodules(a, rng)
    opacities = draw_opacities(a, rng) if positive else np.zeros((0, 4))
    density = chest_density(x, y, a, v, opacities, nodules, mottle)
    density = cv2.resize(density, (v.width, v.height), interpolation=cv2.INTER_LINEAR)
    img = burn_text(black_border(develop(density, v, rng), rng), rng)
    return lead_marker(img, rng) if style == "shifted" else img


# --- encoding: array in, file bytes out ---------------------------------------------------


def _to8(img: np.ndarray) -> np.ndarray:
    return np.rint(img * 255.0).astype(np.uint8)


def _tint(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Screenshots of monitors and journal figures come out blueish; cv2 channel order is BGR.
    t = rng.uniform(0.08, 0.2)
    b = np.clip(img + 0.3 * t * (1.0 - img), 0, 1)
    return np.stack([_to8(b), _to8(img * (1 - t / 2)), _to8(img * (1 - t))], axis=-1)


def _cv2_bytes(ext: str, arr: np.ndarray, params: list[int]) -> bytes:
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise CxrError(f"sample: OpenCV could not encode a {ext} image")
    return buf.tobytes()


def encode(img: np.ndarray, kind: str, rng: np.random.Generator) -> bytes:
    """File bytes for one kind of KIND_POOL; deterministic (fixed params, no timestamps)."""
    if kind in ("png8", "png_as_jpg"):
        return _cv2_bytes(".png", _to8(img), PNG_PARAMS)
    if kind == "png16":
        # Real 16-bit exports rarely use the full range; readers must not assume 0..65535.
        lo, hi = rng.integers(500, 3000), rng.integers(20000, 45000)
        return _cv2_bytes(".png", np.rint(lo + img * (hi - lo)).astype(np.uint16), PNG_PARAMS)
    if kind == "jpeg":
        grey = _to8(img)
        arr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR) if rng.random() < 0.7 else grey
        return _cv2_bytes(".jpg", arr, JPEG_PARAMS)
    if kind == "tint_png":
        return _cv2_bytes(".png", _tint(img, rng), PNG_PARAMS)
    if kind == "tint_jpeg":
        return _cv2_bytes(".jpg", _tint(img, rng), JPEG_PARAMS)
    if kind == "rgba_png":
        return _cv2_bytes(".png", cv2.cvtColor(_to8(img), cv2.COLOR_GRAY2BGRA), PNG_PARAMS)
    if kind == "palette_png":
        grey = _to8(img)
        pal = Image.frombytes("P", (grey.shape[1], grey.shape[0]), grey.tobytes())
        pal.putpalette([c for i in range(256) for c in (i, i, i)])
        buf = io.BytesIO()
        pal.save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue()
    if kind == "tiff":
        arr = np.rint(img * 50000).astype(np.uint16) if rng.random() < 0.5 else _to8(img)
        return _cv2_bytes(".tiff", arr, TIFF_PARAMS)
    raise ValueError(f"unknown image kind {kind!r}")  # programming error: KIND_POOL and encode disagree


def image_bytes(plan: ImagePlan, seed: int, style: str = "default") -> bytes:
    anatomy = draw_anatomy(np.random.default_rng([seed, 2, plan.patient]))
    rng = np.random.default_rng([seed, 1, plan.number])
    return encode(render(anatomy, plan.label == "positive", rng, style), plan.kind, rng)


# --- I/O edge ------------------------------------------------------------------------------


def summarize(plans: list[ImagePlan], seed: int, style: str = "default") -> dict:
    images = {s: {c: sum(p.split == s and p.label == c for p in plans) for c in CLASSES} for s in SPLITS}
    patients = {s: len({p.patient_id for p in plans if p.split == s}) for s in SPLITS}
    out = {"seed": seed, "images": images, "patients": patients}
    return out if style == "default" else {**out, "style": style}


def _check_args(out_dir: Path, train_per_class: int, test_per_class: int, seed: int, style: str) -> None:
    if style not in STYLES:
        raise CxrError(f"sample: unknown style {style!r}; valid: {', '.join(STYLES)}")
    # an external test set (style "shifted") may have no training images
    least = {"train_per_class": 0 if style != "default" else 2, "test_per_class": 2}
    for name, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least[name]:
            raise CxrError(f"sample: {name} must be an integer >= {least[name]}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CxrError(f"sample: seed must be a non-negative integer, got {seed!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise CxrError(f"sample: {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise CxrError(f"sample: refusing to replace {out_dir}: it is not empty and was not made by this command")
    if (out_dir / MARKER).is_file():  # ours, but the whole folder is replaced: nobody's file may be inside
        own = {MARKER, *SPLITS, *(f"{split}.txt" for split in SPLITS)}
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in own)
        foreign += sorted(f"{split}/{p.name}" for split in SPLITS if (out_dir / split).is_dir()
                          for p in (out_dir / split).iterdir() if p.is_dir() or p.is_symlink())  # fmt: skip
        if foreign:
            raise CxrError(f"sample: refusing to replace {out_dir}: it holds {foreign[0]!r}, which this command "
                           "did not write; move it away first")  # fmt: skip


def generate_sample(out_dir: Path, train_per_class: int, test_per_class: int, seed: int,
                    style: str = "default") -> dict:
    """Write a synthetic COVIDx-layout dataset to out_dir, replacing an earlier sample there.

    Built in a temporary folder beside out_dir and renamed into place, so an interrupted run
    never leaves half a dataset. Returns the image counts per split and class.
    """
    out_dir = Path(out_dir)
    _check_args(out_dir, train_per_class, test_per_class, seed, style)
    plans = plan_sample(train_per_class, test_per_class, seed, style)
    summary = summarize(plans, seed, style)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for split in SPLITS:
            (tmp / split).mkdir()
            split_plans = [p for p in plans if p.split == split]
            for plan in split_plans:
                (tmp / split / plan.filename).write_bytes(image_bytes(plan, seed, style))
            lines = "".join(label_line(p) + "\n" for p in split_plans)
            (tmp / f"{split}.txt").write_text(lines, encoding="utf-8", newline="\n")
        (tmp / MARKER).write_text(json.dumps(summary, sort_keys=True) + "\n", encoding="utf-8", newline="\n")
        _swap_in(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _swap_in(new: Path, out_dir: Path) -> None:
    # Two renames on one filesystem: the old sample is moved aside whole, never deleted in place.
    if not out_dir.exists():
        new.rename(out_dir)
        return
    attic = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    try:
        out_dir.rename(attic / "old")
        try:
            new.rename(out_dir)
        except OSError:
            (attic / "old").rename(out_dir)
            raise
    finally:
        shutil.rmtree(attic, ignore_errors=True)
