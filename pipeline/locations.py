"""Where shards live: a local folder or a URL (http(s)://, s3://, gs://, file://, anything fsspec opens).

A file is read whole from either kind of location, never past a byte bound; a shard is refused
unless its bytes hash to the sha256 its summary lists, so a shard altered in storage or in
transit never reaches a model.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pipeline.errors import CxrError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str | Path) -> bool:
    return bool(_URL.match(str(location)))


def join_location(location: str | Path, name: str) -> str:
    if is_url(location):
        return f"{str(location).rstrip('/')}/{name}"
    return str(Path(location) / name)


def read_bytes(location: str | Path, limit: int) -> bytes:
    """A whole file from a local path or a URL (through fsspec), refused past `limit` bytes.

    At most limit + 1 bytes are ever read, whatever size the server or file system claims."""
    if not is_url(location):
        try:
            with open(location, "rb") as fh:
                data = fh.read(limit + 1)
        except OSError as exc:
            raise CxrError(f"cannot read {location}: {exc.strerror or exc}") from None
    else:
        import fsspec  # only for URLs: local runs never import it

        try:
            with fsspec.open(str(location), "rb") as fh:
                data = fh.read(limit + 1)
        except ImportError as exc:  # fsspec names the backend package to install (s3fs, gcsfs, ...)
            raise CxrError(f"cannot read {location}: {exc}") from None
        except Exception as exc:  # network, HTTP status and permission errors come in many types per backend
            raise CxrError(f"cannot read {location}: {type(exc).__name__}: {exc}") from None
    if len(data) > limit:
        raise CxrError(f"{location} is larger than the {limit} bytes allowed for it; refusing it")
    return data


def read_shard(location: str, sha256: str, limit: int) -> bytes:
    """A shard's bytes, refused unless they hash to the sha256 in the summary.

    The whole shard is read before any sample is decoded (shards are a few MB; `limit`, the
    summary's `shard_byte_limit`, bounds the memory), so a tampered or truncated shard never
    reaches a model.
    """
    data = read_bytes(location, limit)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise CxrError(
            f"{location}: sha256 {got[:16]}... differs from the summary's {sha256[:16]}... "
            f"({len(data)} bytes): the shard was altered or truncated; refusing it"
        )
    return data
