"""Synthetic chest X-rays in the exact COVIDx CXR-2 layout, so the pipeline runs with no download.

    out_dir/train.txt, out_dir/test.txt   lines `patient_id filename positive|negative source`
    out_dir/train/<files>, out_dir/test/<files>

The pictures (drawn by pipeline/radiograph.py) are crude but X-ray-like (dark background, bright
thorax, dark lung fields, ribs, spine, heart, noise), and they carry the traps of the real download: patient ids with spaces,
file names with several dots, patients with several images, 8/16-bit, RGB-tinted, RGBA and
palette PNGs, JPEGs, TIFFs, PNG bytes behind a `.jpg` name, black borders, burned-in text and
many sizes. Positives have ground-glass opacities in the lungs; everything else (format, size,
source, text, borders, exposure) is drawn independently of the label so only the lungs tell.

Every image is drawn from its own generator seeded by (seed, image number), so one image does
not shift the next, and the same arguments give byte-identical files on the same install.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.errors import CxrError
from pipeline.params import SampleParams
from pipeline.progress import bounded_map
from pipeline.radiograph import draw_anatomy, render

CLASSES = ("negative", "positive")
SOURCES = ("synth-a", "synth-b", "synth-c")
SPLITS = ("train", "test")
STYLES = ("default", "shifted")  # acquisition styles: "shifted" is an external site (radiograph.shift_view)
STYLE_OFFSET = 1_000_000
MARKER = ".cxr-sample.json"  # says "this folder is ours to replace"; a real download lacks it

# Encodings, tiled per class so both classes get the same multiset of formats: a format must
# never predict the label. 16 entries, so 16 images per class already show every quirk.
KIND_POOL = (
    "png8", "png8", "png8", "png8", "jpeg", "jpeg", "jpeg", "jpeg",
    "png16", "png16", "tint_png", "tint_jpeg", "rgba_png", "palette_png", "tiff", "png_as_jpg",
)
IMAGES_PER_PATIENT = ((1, 2, 3), (0.75, 0.17, 0.08))
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


def generate_sample(out_dir: Path, sample: SampleParams, seed: int, style: str = "default") -> dict:
    """Write a synthetic COVIDx-layout dataset to out_dir, replacing an earlier sample there.

    The default style has sample.train_per_class and sample.test_per_class images per class; the
    shifted style is an external test set of sample.shifted_test_per_class per class, no training
    images. Built in a temporary folder beside out_dir and renamed into place, so an interrupted
    run never leaves half a dataset. Returns the image counts per split and class.
    """
    out_dir = Path(out_dir)
    if style == "shifted":
        train_per_class, test_per_class = 0, sample.shifted_test_per_class
    else:
        train_per_class, test_per_class = sample.train_per_class, sample.test_per_class
    _check_args(out_dir, train_per_class, test_per_class, seed, style)
    plans = plan_sample(train_per_class, test_per_class, seed, style)
    summary = summarize(plans, seed, style)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # each image is a pure function of its plan and the seed; numpy and OpenCV release the GIL
        # for most of the drawing and encoding: `cxr sample` (128 images, 2 cores) took 3.3 s instead of 6.5
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for split in SPLITS:
                (tmp / split).mkdir()
                split_plans = [p for p in plans if p.split == split]
                drawn = bounded_map(pool, partial(image_bytes, seed=seed, style=style), split_plans, ahead=16)
                for plan, data in zip(split_plans, drawn):
                    (tmp / split / plan.filename).write_bytes(data)
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
