"""pipeline.locations: shards in a folder or at a URL, each read within a byte bound and refused unless its sha256 matches."""

from __future__ import annotations

import hashlib

import pytest

from pipeline.errors import CxrError
from pipeline.locations import is_url, join_location, read_bytes, read_shard
from tests.conftest import make_tiny_shards


def test_locations_join_like_paths_locally_and_like_urls_remotely():
    assert join_location("shards/plain", "train-000000.tar") == "shards/plain/train-000000.tar"
    assert join_location("http://host:8000/x/plain/", "a.tar") == "http://host:8000/x/plain/a.tar"
    assert join_location("s3://bucket/plain", "a.tar") == "s3://bucket/plain/a.tar"
    assert is_url("file:///tmp/x") and is_url("gs://b/x") and not is_url("shards/plain") and not is_url("C:x")


def test_an_altered_shard_is_refused_wherever_it_is_read_from(http_root):
    root, url = http_root
    make_tiny_shards(root / "plain")
    shard = root / "plain" / "test-000000.tar"
    expected = hashlib.sha256(shard.read_bytes()).hexdigest()
    shard.write_bytes(shard.read_bytes()[:-512])  # truncated in storage
    for where in (str(shard), f"{url}/plain/test-000000.tar"):
        with pytest.raises(CxrError, match=r"test-000000.tar: sha256 .* differs .*refusing it"):
            read_shard(where, expected, 10**6)


def test_reads_stop_at_their_byte_bound_locally_and_over_http(http_root):
    """A shard or summary larger than its bound is refused after reading at most bound + 1 bytes,
    before it is hashed or parsed: a hostile server cannot make a reader hold more."""
    root, url = http_root
    make_tiny_shards(root / "plain")
    shard = root / "plain" / "train-000000.tar"
    size = shard.stat().st_size
    sha = hashlib.sha256(shard.read_bytes()).hexdigest()
    for where in (str(shard), f"{url}/plain/train-000000.tar"):
        assert read_shard(where, sha, size) == shard.read_bytes()  # exactly at the bound: fine
        with pytest.raises(CxrError, match=rf"train-000000.tar is larger than the {size - 1} bytes allowed"):
            read_shard(where, sha, size - 1)
        with pytest.raises(CxrError, match="larger than the 10 bytes allowed"):
            read_bytes(where, 10)
