"""File writes that survive crashes and concurrent runs, and the file hash every stage uses.

One helper per convention (issue 12): every artifact the project writes goes through
`atomic_output` so a reader never sees half a file, a killed run never leaves a file under its
final name, two runs never share a temp name, and a full disk is one clean `CxrError`.
Hand-written because the standard library has the pieces (mkstemp, fsync, replace, flock) but no
single call that combines them, and the popular wrappers (atomicwrites) are unmaintained.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from pipeline.errors import CxrError

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".cxr.lock"
_HASH_CHUNK = 1 << 20
FIGURE_DPI = 100  # fixed, with fixed figure sizes in inches, so every PNG has a known pixel size


def _describe(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"cannot write {path}: no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied"
    return f"cannot write {path}: {exc.strerror or exc}"


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry itself reaches the disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_path(path: Path | str) -> None:
    """Refuse an output path that exists as a link or as anything but a regular file.

    lstat, never stat: a link planted under the name of the coming output (`--out` pointing at
    ~/.bashrc, a heatmap's name in a shared folder) must be refused, not written through or replaced.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CxrError(_describe(exc, Path(path))) from None
    if stat.S_ISLNK(info.st_mode):
        raise CxrError(f"refusing to write {path}: it is a symbolic link, and outputs are never written through "
                       "links; remove it or choose another path")  # fmt: skip
    if not stat.S_ISREG(info.st_mode):
        raise CxrError(f"refusing to write {path}: it exists and is not a regular file")


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[IO[bytes]]:
    """Yield a binary file that becomes `path` only if the block completes.

    The temp file lives in the target folder (so the rename cannot cross file systems) under a
    unique name (so two runs never collide); it is fsynced before the rename and removed on any
    failure, including an exception raised by the caller's block.
    """
    path = Path(path)
    folder = path.parent
    check_output_path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # mkstemp opens O_CREAT | O_EXCL | O_NOFOLLOW: a link planted under the temp name is refused too
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as exc:
        raise CxrError(_describe(exc, path)) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        check_output_path(path)  # again: a link may have been planted while the block ran
        os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CxrError(_describe(exc, path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_output(path) as stream:
        stream.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any, *, indent: int | None = 2) -> None:
    """JSON with sorted keys and a final newline, so reruns give identical bytes."""
    text = json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")


# A cell a spreadsheet would run as a formula (OWASP "CSV injection"): file names and shard
# metadata such as `=HYPERLINK(...)` come from users. A plain number keeps its sign (-0.5 stays a number).
_FORMULA_START = frozenset("=+-@\t\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(cell: Any) -> Any:
    """`cell` as every CSV of the project writes it: a text cell that starts a formula gets a leading
    `'` (the convention spreadsheets show as text); one that starts with `'` gets another, so
    `spreadsheet_value` gives every text back exactly. Non-text cells are left as they are."""
    if not isinstance(cell, str) or not cell:
        return cell
    if cell[0] == "'" or (cell[0] in _FORMULA_START and not _PLAIN_NUMBER.fullmatch(cell)):
        return "'" + cell
    return cell


def spreadsheet_value(cell: Any) -> Any:
    """The text `spreadsheet_safe` was given, for code that reads the project's CSVs back."""
    if isinstance(cell, str) and len(cell) > 1 and cell[0] == "'" and (cell[1] == "'" or cell[1] in _FORMULA_START):
        return cell[1:]
    return cell


def atomic_write_csv(path: Path | str, rows: Iterable[Sequence[Any]]) -> None:
    """Rows in the csv module's default dialect (\\r\\n line ends, as `open(newline="")` writes them),
    every cell through `spreadsheet_safe`."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows([spreadsheet_safe(c) for c in row] for row in rows)
    atomic_write_text(path, buffer.getvalue())


def save_figure(fig: Any, path: Path | str, dpi: int = FIGURE_DPI) -> Path:
    """A matplotlib Figure as a PNG, written atomically (duck-typed: this module imports no matplotlib)."""
    with atomic_output(path) as stream:
        fig.savefig(stream, format="png", dpi=dpi)
    return Path(path)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in chunks so memory stays bounded whatever its size."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise CxrError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def temp_name_pattern(name: str) -> re.Pattern[str]:
    """The names `atomic_output` (and export's work folder) give their temps for an output called
    `name`: `.NAME.` + mkstemp's 8 random characters + `.tmp`. Nothing else in a folder matches."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")


def _remove_stale_temps(folder: Path, names: Iterable[str]) -> None:
    patterns = [temp_name_pattern(name) for name in names]
    for entry in os.scandir(folder):
        if not any(p.fullmatch(entry.name) for p in patterns):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)  # export's work folder; rmtree never follows links inside it
            else:
                os.unlink(entry.path)
        except OSError as exc:
            raise CxrError(f"cannot remove the stale temp {entry.path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def output_lock(folder: Path | str, stale_temps_of: Iterable[str] = ()) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder for the duration of a run.

    flock (not a pid file) because the kernel drops it when the process dies, so a killed run
    never leaves a stale lock that blocks the rerun. Once the lock is held, every writer of the
    folder is known to be gone, so the temps a killed run left for the outputs named in
    `stale_temps_of` (a 100 MB checkpoint or ONNX half-written at kill -9) are removed; only
    names of `temp_name_pattern`, never another file.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CxrError(f"refusing to use {folder / LOCK_NAME}: it is a symbolic link; remove it") from None
        raise CxrError(_describe(exc, folder / LOCK_NAME)) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CxrError(f"refusing to use {folder / LOCK_NAME}: it is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise CxrError(f"another run is writing {folder}; wait for it to finish") from exc
        _remove_stale_temps(folder, stale_temps_of)
        yield folder
    finally:
        os.close(fd)
