"""COVIDx label files: `patient_id filename label source`, one image per line.

Real COVIDx CXR-2 files have patient ids with spaces (`COVID 1 COVID(1).png
positive sirm`) and filenames with several dots, so a line is split from the
right: the last three fields are filename, label and source, and whatever is
left is the patient id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from pipeline.errors import CxrError

# COVIDx CXR-2 uses positive/negative; older COVIDx releases were 3-class.
LABELS = {"positive": 1, "covid-19": 1, "negative": 0, "normal": 0, "pneumonia": 0}


@dataclass(frozen=True)
class LabelLine:
    line_no: int
    patient_id: str
    filename: str
    label: int
    source: str


@dataclass(frozen=True)
class LabelReject:
    line_no: int
    text: str
    reason: str


def safe_relative_name(filename: str) -> str | None:
    """The filename if it stays inside its image folder, else None.

    Label files are untrusted input: `../../etc/passwd`, absolute paths and
    drive letters must not make us read outside the dataset root.
    """
    if not filename or "\x00" in filename:
        return None
    posix, windows = PurePosixPath(filename), PureWindowsPath(filename)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or filename.startswith(("/", "\\")):
        return None
    parts = filename.replace("\\", "/").split("/")
    if any(part in ("..", "") for part in parts):
        return None
    return "/".join(parts)


def parse_line(text: str, line_no: int) -> LabelLine | LabelReject:
    fields = text.strip().rsplit(maxsplit=3)
    if len(fields) < 4:
        return LabelReject(line_no, text, "bad label line: expected 'patient_id filename label source'")
    patient_id, filename, label_text, source = fields
    label = LABELS.get(label_text.lower())
    if label is None:
        return LabelReject(line_no, text, f"bad label line: unknown label {label_text!r}")
    safe = safe_relative_name(filename)
    if safe is None:
        return LabelReject(line_no, text, f"unsafe filename {filename!r}: escapes the dataset root")
    return LabelLine(line_no, patient_id.strip(), safe, label, source)


def parse_label_file(path: Path) -> tuple[list[LabelLine], list[LabelReject]]:
    """All lines of a label file, each either parsed or rejected with its reason (blank lines skipped)."""
    if not path.is_file():
        raise CxrError(f"label file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise CxrError(f"label file {path} is not UTF-8 text: {exc}") from None
    lines: list[LabelLine] = []
    rejects: list[LabelReject] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        parsed = parse_line(raw, line_no)
        (lines if isinstance(parsed, LabelLine) else rejects).append(parsed)
    return lines, rejects
