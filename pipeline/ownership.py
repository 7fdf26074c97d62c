"""Output folders a command owns: it replaces or deletes only what it wrote there.

A command that writes a folder (`sample`, `shard`, `predict --heatmaps`,
`evaluate --plots`) claims it first. A folder is the command's own when it is
missing or empty, when it carries this command's marker file, or when every
entry in it matches the command's own name patterns (outputs of a version that
predates the marker). Anything else (a folder holding a user's files, or
another command's output) is refused with a message naming a foreign entry,
because `--out ~/Pictures` must never cost anyone a photo.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import CxrError
from pipeline.fileio import atomic_write_text, check_output_path

MARKER = ".cxr-owner.json"
LOCK = re.compile(r"\.cxr\.lock")  # pipeline.fileio.output_lock's file


def _with_temps(patterns: Iterable[re.Pattern[str]]) -> tuple[re.Pattern[str], ...]:
    """Own names plus the temp names written on the way to them.

    `.NAME.<random>.tmp` is what the atomic write helper leaves when killed;
    `NAME.tmp` is what earlier versions used.
    """
    out: list[re.Pattern[str]] = []
    for p in patterns:
        out += [p, re.compile(rf"\.(?:{p.pattern})\.[A-Za-z0-9_]+\.tmp"), re.compile(rf"(?:{p.pattern})\.tmp")]
    return tuple(out)


def _matches(name: str, patterns: Iterable[re.Pattern[str]]) -> bool:
    return any(p.fullmatch(name) for p in patterns)


def claim_folder(folder: Path | str, owner: str, patterns: Iterable[re.Pattern[str]]) -> Path:
    """Make sure `folder` is `owner`'s to write (creating it and its marker), else raise CxrError."""
    folder = Path(folder)
    patterns = _with_temps([*patterns, re.compile(re.escape(MARKER))]) + (LOCK,)  # the marker is written atomically too
    if folder.exists() and not folder.is_dir():
        raise CxrError(f"{owner}: {folder} exists and is not a folder")
    marker = folder / MARKER
    check_output_path(marker)  # a planted link would name any owner, or be written through
    if marker.is_file():
        try:
            found = json.loads(marker.read_text(encoding="utf-8")).get("owner")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != owner:
            raise CxrError(f"{owner}: refusing to write into {folder}: it belongs to {found or 'something else'!s} "
                           f"(see {MARKER}); choose another folder")  # fmt: skip
        return folder
    try:
        entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    except OSError as exc:
        raise CxrError(f"{owner}: cannot list {folder}: {exc.strerror or exc}") from None
    foreign = [name for name in entries if not _matches(name, patterns)]
    if foreign:
        raise CxrError(f"{owner}: refusing to write into {folder}: it is not empty and holds files this command "
                       f"did not make (e.g. {foreign[0]!r}); choose an empty or new folder")  # fmt: skip
    # Fixed content: the marker is part of DVC-tracked outputs, so it must not vary between runs.
    atomic_write_text(marker, json.dumps({"owner": owner}) + "\n")
    return folder


def remove_owned(folder: Path | str, patterns: Iterable[re.Pattern[str]]) -> list[str]:
    """Delete the files in a claimed folder that match the owner's patterns (never folders, never others)."""
    folder = Path(folder)
    # never the lock or the marker, but the marker's temps: a run killed while claiming leaves one
    patterns = _with_temps(patterns) + _with_temps([re.compile(re.escape(MARKER))])[1:]
    removed = []
    for path in sorted(folder.iterdir()):
        if _matches(path.name, patterns) and (path.is_symlink() or path.is_file()):
            try:
                path.unlink()
            except OSError as exc:
                raise CxrError(f"cannot remove stale {path}: {exc.strerror or exc}") from None
            removed.append(path.name)
    return removed
