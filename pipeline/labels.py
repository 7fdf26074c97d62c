"""COVIDx label files: `patient_id filename label source`, one image per line.

Real COVIDx CXR-2 files have patient ids with spaces (`COVID 1 COVID(1).png
positive sirm`) and filenames with several dots, so a line is split from the
right: the last three fields are filename, label and source, and whatever is
left is the patient id.

A label file is untrusted text. It is read as bytes and split on `\\n` only
(`\\r\\n` tolerated), because `str.splitlines()` also breaks at U+2028, U+0085
and form feeds that can sit inside a field; fields are separated by ASCII
blanks only, so a no-break space stays part of a patient id; a leading UTF-8
byte-order mark is dropped (it would otherwise stick to the first patient id);
a line that is not valid UTF-8 is a reject with its line number, not a failure
of the whole file.
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from pipeline.errors import CxrError

# COVIDx CXR-2 uses positive/negative; older COVIDx releases were 3-class.
LABELS = {"positive": 1, "covid-19": 1, "negative": 0, "normal": 0, "pneumonia": 0}

BOM = b"\xef\xbb\xbf"
ASCII_BLANKS = " \t"
# patient id (may hold blanks) + three blank-free fields, anchored at the right.
_LINE = re.compile(r"^(.+?)[ \t]+([^ \t]+)[ \t]+([^ \t]+)[ \t]+([^ \t]+)$", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)  # ingest holds one per image: no per-instance __dict__
class LabelLine:
    line_no: int
    patient_id: str
    filename: str  # normalised: posix separators, no '.' parts, so ./x.png == x.png
    label: int
    source: str


@dataclass(frozen=True)
class LabelReject:
    line_no: int
    text: str
    reason: str


def safe_relative_name(filename: str) -> str | None:
    """The normalised filename if it stays inside its image folder, else None.

    Label files are untrusted input: `../../etc/passwd`, absolute paths and
    drive letters must not make us read outside the dataset root. `.` parts
    are dropped so that `./x.png` and `x.png` name (and deduplicate as) one file.
    """
    if not filename or "\x00" in filename:
        return None
    posix, windows = PurePosixPath(filename), PureWindowsPath(filename)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or filename.startswith(("/", "\\")):
        return None
    parts = [part for part in filename.replace("\\", "/").split("/") if part != "."]
    if not parts or any(part in ("..", "") for part in parts):
        return None
    return "/".join(parts)


def parse_line(text: str, line_no: int) -> LabelLine | LabelReject:
    if _CONTROL.search(text):
        return LabelReject(line_no, text, "bad label line: contains a control character")
    match = _LINE.match(text.strip(ASCII_BLANKS))
    if match is None:
        return LabelReject(line_no, text, "bad label line: expected 'patient_id filename label source'")
    patient_id, filename, label_text, source = match.groups()
    label = LABELS.get(label_text.lower())
    if label is None:
        return LabelReject(line_no, text, f"bad label line: unknown label {label_text!r}")
    safe = safe_relative_name(filename)
    if safe is None:
        return LabelReject(line_no, text, f"unsafe filename {filename!r}: escapes the dataset root")
    # a patient's images and a source's thousands of lines share one string each
    return LabelLine(line_no, sys.intern(patient_id), safe, label, sys.intern(source))


def parse_label_bytes(data: bytes) -> tuple[list[LabelLine], list[LabelReject]]:
    """Every non-blank line, either parsed or rejected with its reason and 1-based line number."""
    return _parse_lines(io.BytesIO(data))


def _parse_lines(raw_lines: Iterable[bytes]) -> tuple[list[LabelLine], list[LabelReject]]:
    # Binary lines end at b"\n" only; one at a time, so a label file of 85k lines is never also
    # held whole, as bytes and as a list of line copies, beside the lines parsed from it.
    lines: list[LabelLine] = []
    rejects: list[LabelReject] = []
    for line_no, raw in enumerate(raw_lines, start=1):
        if line_no == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            text = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            shown = raw.decode("utf-8", errors="backslashreplace")
            rejects.append(LabelReject(line_no, shown, f"line {line_no} is not valid UTF-8 (byte {exc.start})"))
            continue
        if not text.strip(ASCII_BLANKS):
            continue
        parsed = parse_line(text, line_no)
        (lines if isinstance(parsed, LabelLine) else rejects).append(parsed)
    return lines, rejects


def parse_label_file(path: Path) -> tuple[list[LabelLine], list[LabelReject]]:
    """All lines of a label file, each either parsed or rejected with its reason (blank lines skipped).

    The file itself must lie in its dataset root too (symlinks resolved): a
    `train.txt` linked to /etc/passwd would otherwise copy it, line by line,
    into the rejects of the ingest report.
    """
    path = Path(path)
    opened = open_inside(path.parent, path.name)
    if isinstance(opened, str):
        if opened.startswith("missing file"):
            raise CxrError(f"label file not found: {path}")
        raise CxrError(f"label file {path}: {opened}")
    fd, _ = opened
    try:
        with os.fdopen(fd, "rb") as fh:
            return _parse_lines(fh)
    except OSError as exc:
        raise CxrError(f"cannot read label file {path}: {exc.strerror or exc}") from None


def open_inside(root: Path, relative: str) -> tuple[int, os.stat_result] | str:
    """An open read-only descriptor on root/relative and its stat, or the reason it may not be read.

    The path is resolved (symlinks followed) first and must still lie under the
    resolved root: a link inside the dataset that points elsewhere would
    otherwise put an outside file into a shard. The final open refuses links
    and does not block (a FIFO named like an image), and only a regular file
    is accepted, whatever the OS says about it.
    """
    real_root = Path(os.path.realpath(root))
    path = real_root / relative
    try:
        resolved = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return f"missing file {relative}"
    except OSError as exc:
        return f"cannot resolve {relative}: {exc.strerror or exc}"
    if not resolved.is_relative_to(real_root):
        return f"{relative} is a symlink (or under one) that points outside the dataset root"
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        return f"{relative} is a folder, not an image file"
    except OSError as exc:
        return f"cannot open {relative}: {exc.strerror or exc}"
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        return f"{relative} is {kind}, not an image file"
    return fd, info


def read_image_file(root: str, relative: str, max_bytes: int) -> bytes | str:
    """The file's bytes, or why not: outside the root (symlinks resolved), not a file, unreadable, too big."""
    opened = open_inside(root, relative)
    if isinstance(opened, str):
        return opened
    fd, info = opened
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > max_bytes:  # before reading: a 4 GB "image" must not be pulled into memory
            return f"file is {info.st_size / 2**20:.0f} MiB, over the bound of {max_bytes / 2**20:.0f} MiB"
        try:
            # st_size + 1, not max_bytes + 1: asked for 128 MiB, read() allocates that much before
            # shrinking, which cost 0.2-0.4 ms an image. A file that grew since the stat comes back
            # cut: the shard stage's sha256 check refuses it, and the decoders refuse a cut image.
            return fh.read(info.st_size + 1)
        except OSError as exc:
            return f"cannot read file: {exc.strerror or exc}"
