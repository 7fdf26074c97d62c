"""A synthetic chest radiograph: pure functions, arrays in, arrays out (pipeline/sample.py plans and encodes).

One patient's `Anatomy` (shared by all their images) and one exposure's `View` are drawn from
generators passed in; `render` projects the density (body, lungs, heart, ribs, spine, hila,
ground-glass opacities for a positive), develops it as film (heel gradient, gamma, window,
noise) and adds what real downloads carry: black borders and burned-in text. The "shifted"
style is another hospital's acquisition (`shift_view`: a larger detector, flatter, brighter and
noisier film; `lead_marker`: a lead side marker), the sample's external test set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

WORK_SIDE = 384  # anatomy is smooth, so it is drawn this small and upscaled; noise is full size
TEXT_WORDS = ("PORTABLE", "AP", "PA", "ERECT", "SUPINE", "L", "R", "1 VIEW", "CHEST", "SEMI-ERECT")


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
