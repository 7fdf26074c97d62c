"""The shard contract read from a local folder or a URL: summary, shard locations, checksums."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.errors import CxrError
from pipeline.shard_format import is_url, join_location, read_shard, read_summary
from tests.conftest import make_tiny_shards


def test_locations_join_like_paths_locally_and_like_urls_remotely():
    assert join_location("shards/plain", "train-000000.tar") == "shards/plain/train-000000.tar"
    assert join_location("http://host:8000/x/plain/", "a.tar") == "http://host:8000/x/plain/a.tar"
    assert join_location("s3://bucket/plain", "a.tar") == "s3://bucket/plain/a.tar"
    assert is_url("file:///tmp/x") and is_url("gs://b/x") and not is_url("shards/plain") and not is_url("C:x")


def test_summary_and_shards_read_over_http_as_from_the_folder(http_root):
    root, url = http_root
    make_tiny_shards(root / "plain")
    local, remote = read_summary(root / "plain"), read_summary(f"{url}/plain/")
    assert remote.location == f"{url}/plain" and remote.raw == local.raw
    assert remote.shard_paths("val") == [f"{url}/plain/val-000000.tar", f"{url}/plain/val-000001.tar"]
    sha = remote.shard_sha256()
    assert len(sha) == 6
    assert sha[f"{url}/plain/val-000001.tar"] == local.shard_sha256()[str(root / "plain" / "val-000001.tar")]
    first = remote.shard_paths("train")[0]
    assert read_shard(first, sha[first]) == (root / "plain" / "train-000000.tar").read_bytes()


def test_an_altered_shard_is_refused_wherever_it_is_read_from(http_root):
    root, url = http_root
    make_tiny_shards(root / "plain")
    shard = root / "plain" / "test-000000.tar"
    expected = hashlib.sha256(shard.read_bytes()).hexdigest()
    shard.write_bytes(shard.read_bytes()[:-512])  # truncated in storage
    for where in (str(shard), f"{url}/plain/test-000000.tar"):
        with pytest.raises(CxrError, match=r"test-000000.tar: sha256 .* differs .*refusing it"):
            read_shard(where, expected)


def test_missing_summary_and_missing_backend_are_one_line_errors(http_root, tmp_path: Path):
    _, url = http_root
    with pytest.raises(CxrError, match="no shard summary at .*run the shard stage"):
        read_summary(tmp_path / "nowhere")
    with pytest.raises(CxrError, match=r"cannot read http://127.0.0.1:\d+/nowhere/summary.json: FileNotFoundError"):
        read_summary(f"{url}/nowhere")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(CxrError, match="cannot read s3://bucket/plain/summary.json: Install s3fs"):
            read_summary("s3://bucket/plain")


def test_verify_checks_shards_at_a_url_and_names_the_changed_one(http_root):
    from typer.testing import CliRunner

    from pipeline.cli import app

    root, url = http_root
    make_tiny_shards(root / "plain")
    ok = CliRunner().invoke(app, ["verify", f"{url}/plain"])
    assert ok.exit_code == 0 and '"shards": 6' in ok.output, ok.output
    with open(root / "plain" / "val-000001.tar", "r+b") as fh:
        fh.seek(600)
        fh.write(b"X")
    (root / "plain" / "test-000000.tar").unlink()
    bad = CliRunner().invoke(app, ["verify", f"{url}/plain"])
    assert bad.exit_code == 1 and "2 of 6 shard(s) do not match" in bad.output
    assert "val-000001.tar" in bad.output and "test-000000.tar (missing)" in bad.output
