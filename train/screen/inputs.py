"""What screening reads: files, folders and globs expanded to image files, and each one read into the
model's input by the shard stage's own decoding and preprocessing (or the reason it cannot be).

Shared by `cxr predict`, the Python API and the server, so one file gives one answer everywhere.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.dicom import DICOM_SUFFIXES, looks_like_dicom
from pipeline.errors import CxrError
from pipeline.preprocess import PreprocessConfig, preprocess_array, preprocess_bytes

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", *DICOM_SUFFIXES})
_GLOB_CHARS = frozenset("*?[")


# Bounds on a folder walk, so a hostile or mistaken tree (1,100 nested folders, a million entries)
# is one clear line instead of a RecursionError or an endless scan. Far above any real study layout.
MAX_FOLDER_DEPTH = 64
MAX_FOLDER_ENTRIES = 1_000_000


def collect_inputs(args: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursive) and glob patterns into a sorted list of files.

    Named files and glob matches are always tried (a wrong one gets an error
    row); inside folders only image suffixes, or DICOM's magic for files named
    otherwise, are taken, and hidden entries are skipped. Returns (files,
    [(argument or path, reason)] for arguments that matched nothing, folders over the walk's
    bounds, and entries refused unopened: FIFOs, sockets and devices, whatever their name).
    """
    files: set[Path] = set()
    unmatched: list[tuple[str, str]] = []

    def walk(arg: str, folder: Path) -> list[Path]:
        try:
            found, refused = images_under(folder)
        except CxrError as exc:
            unmatched.append((arg, str(exc)))
            return []
        unmatched.extend(refused)
        return found

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = walk(arg, path)
            if not found and not any(a == arg for a, _ in unmatched):
                unmatched.append((arg, "folder contains no images"))
            files.update(found)
        elif path.exists() or path.is_symlink():
            files.add(path)  # load_image stats it before opening: a FIFO or device is an error row
        elif _GLOB_CHARS & set(arg):
            try:
                matches = list(map(Path, glob.glob(arg, recursive=True)))
            except RecursionError:  # the standard library's `**` recurses; our own walk does not
                unmatched.append((arg, "pattern reaches folders nested too deep to expand (deeper than the "
                                       "interpreter allows); name a shallower folder"))  # fmt: skip
                continue
            found = [f for m in matches for f in (walk(arg, m) if m.is_dir() else [m])]
            if not found:
                unmatched.append((arg, "pattern matched no images"))
            files.update(found)
        else:
            unmatched.append((arg, "no such file or directory"))
    return sorted(files, key=str), unmatched


def images_under(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files under `folder`, [(path, reason)] for entries refused without being opened).

    Iterative (an explicit stack, never recursion) and bounded by MAX_FOLDER_DEPTH and
    MAX_FOLDER_ENTRIES (CxrError past either). Entries are stat-ed before any open: a FIFO would
    block the DICOM sniff or the read forever, a device could be anything. Linked folders are not
    entered (as os.walk's default: no loops); a linked file is taken like the file it names.
    """
    found: list[Path] = []
    refused: list[tuple[str, str]] = []
    stack = [(folder, 0)]
    listed = 0
    while stack:
        current, depth = stack.pop()
        try:
            with os.scandir(current) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except OSError as exc:
            refused.append((str(current), f"cannot list folder: {exc.strerror or exc}"))
            continue
        listed += len(entries)
        if listed > MAX_FOLDER_ENTRIES:
            raise CxrError(f"{folder} holds more than {MAX_FOLDER_ENTRIES} entries; name a smaller folder")
        for entry in entries:
            path = Path(entry.path)
            named_image = path.suffix.lower() in IMAGE_SUFFIXES
            try:
                info = entry.stat()  # follows a link to its file
            except OSError as exc:
                if named_image:  # a dangling link named like an image: the user expects it scored
                    refused.append((str(path), f"cannot read file: {exc.strerror or exc}"))
                continue
            if stat.S_ISDIR(info.st_mode):
                if entry.is_symlink():
                    continue
                if depth + 1 > MAX_FOLDER_DEPTH:
                    raise CxrError(f"{folder} has folders nested more than {MAX_FOLDER_DEPTH} deep (at {path}); "
                                   "name a shallower folder")  # fmt: skip
                stack.append((path, depth + 1))
            elif not stat.S_ISREG(info.st_mode):
                refused.append((str(path), f"{_kind(info.st_mode)}, not a regular file: refused unopened"))
            elif named_image or _has_dicom_magic(path):
                found.append(path)
    return sorted(found, key=str), sorted(refused)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _open_regular(path: Path) -> int:
    """A read-only descriptor on `path` if it is a regular file, else CxrError; never blocks.

    stat first, so a device is never opened at all; O_NONBLOCK and fstat for one swapped in since.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise CxrError(f"{_kind(info.st_mode) if not stat.S_ISDIR(info.st_mode) else 'a folder'}, "
                           "not a regular file: refused unopened")  # fmt: skip
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CxrError(f"cannot read file: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CxrError(f"{_kind(mode)}, not a regular file: refused")
    return fd


def _has_dicom_magic(path: Path) -> bool:
    try:
        with os.fdopen(_open_regular(path), "rb") as fh:
            return looks_like_dicom(path, fh.read(132))
    except (CxrError, OSError):
        return False


def load_image(path: Path, cfg: PreprocessConfig) -> np.ndarray:
    """One input file -> the model's uint8 (size, size) input, by the shard stage's functions."""
    try:
        with os.fdopen(_open_regular(path), "rb") as fh:
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
