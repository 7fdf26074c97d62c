"""What screening reads: files, folders and globs expanded to image files, and each one read into the
model's input by the shard stage's own decoding and preprocessing (or the reason it cannot be).

Shared by `cxr predict`, the Python API and the server, so one file gives one answer everywhere.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.dicom import DICOM_SUFFIXES, looks_like_dicom
from pipeline.errors import CxrError
from pipeline.preprocess import PreprocessConfig, preprocess_array, preprocess_bytes

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", *DICOM_SUFFIXES})
_GLOB_CHARS = frozenset("*?[")


def collect_inputs(args: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and glob patterns into a sorted list of files.

    Named files and glob matches are always tried (a wrong one gets an error
    row); inside folders only image suffixes, or DICOM's magic for files named
    otherwise, are taken, and hidden entries are skipped. Returns (files,
    [(argument, reason)] for arguments that matched nothing).
    """
    files: set[Path] = set()
    unmatched: list[tuple[str, str]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = list(images_under(path))
            if not found:
                unmatched.append((arg, "folder contains no images"))
            files.update(found)
        elif path.exists():
            files.add(path)
        elif _GLOB_CHARS & set(arg):
            matches = map(Path, glob.glob(arg, recursive=True))
            found = [f for m in matches for f in (images_under(m) if m.is_dir() else [m])]
            if not found:
                unmatched.append((arg, "pattern matched no images"))
            files.update(found)
        else:
            unmatched.append((arg, "no such file or directory"))
    return sorted(files, key=str), unmatched


def images_under(folder: Path) -> Iterator[Path]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            if not name.startswith(".") and (path.suffix.lower() in IMAGE_SUFFIXES or _has_dicom_magic(path)):
                yield path


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return looks_like_dicom(path, fh.read(132))
    except OSError:
        return False


def load_image(path: Path, cfg: PreprocessConfig) -> np.ndarray:
    """One input file -> the model's uint8 (size, size) input, by the shard stage's functions."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > cfg.max_decoded_bytes:  # checked before reading: the file itself must fit the bound
                raise CxrError(f"file is {size / 2**20:.0f} MiB, over the bound of {cfg.max_decoded_bytes / 2**20:.0f} MiB")
            data = fh.read(size + 1)  # not the bound + 1: read() would allocate all of it first
    except OSError as exc:
        raise CxrError(f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > size:
        raise CxrError("file grew while it was being read")
    return load_bytes(data, str(path), cfg)


def load_bytes(data: bytes, name: str, cfg: PreprocessConfig) -> np.ndarray:
    """A file's contents (an upload, or what load_image read) -> the model's uint8 (size, size) input.

    `name` lets a preamble-less DICOM be known by its .dcm suffix, as for files on disk.
    """
    if len(data) > cfg.max_decoded_bytes:
        raise CxrError(f"file is {len(data) / 2**20:.0f} MiB, over the bound of {cfg.max_decoded_bytes / 2**20:.0f} MiB")
    return preprocess_bytes(data, cfg, name)


def load_or_reason(path: Path, cfg: PreprocessConfig) -> np.ndarray | str:
    return _or_reason(load_image, path, cfg)


def bytes_or_reason(data: bytes, name: str, cfg: PreprocessConfig) -> np.ndarray | str:
    """`load_bytes`, or the same reason `cxr predict` records for that file."""
    return _or_reason(load_bytes, data, name, cfg)


def _or_reason(load, *args) -> np.ndarray | str:
    try:
        return load(*args)
    except CxrError as exc:
        return str(exc)
    except Exception as exc:  # a decoder bug on one hostile file must not end a 10 000-image run; it is recorded
        return f"unexpected {type(exc).__name__} while reading: {exc}"


def array_or_reason(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray | str:
    """Decoded pixels (the Python API's arrays) -> the model's input, or why they cannot be one."""
    return _or_reason(load_array, pixels, cfg)


def load_array(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """An array gets a file's checks: its shape and size against the decode bounds (`min_side`,
    `max_pixels`, `max_decoded_bytes`) here, its pixel type and values in `preprocess_array`."""
    shape = pixels.shape
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3, 4))):
        raise CxrError(f"expected an (H, W) or (H, W, C) image array with C 1, 3 or 4, got shape {shape}")
    height, width = shape[:2]
    limits = cfg.limits
    if height * width > limits.max_pixels:
        raise CxrError(f"image is {width}x{height} pixels, over the bound of {limits.max_pixels}")
    if pixels.nbytes > limits.max_decoded_bytes:  # a float64 copy or a colour conversion may follow
        raise CxrError(f"image array is {pixels.nbytes / 2**20:.0f} MiB, over the bound of "
                       f"{limits.max_decoded_bytes / 2**20:.0f} MiB (preprocess.max_decoded_bytes)")  # fmt: skip
    if min(height, width) < limits.min_side:
        raise CxrError(f"image too small: {width}x{height} (min side {limits.min_side})")
    return preprocess_array(pixels, cfg)
