import re

import pytest

from pipeline.errors import CxrError
from pipeline.ownership import MARKER, claim_folder, remove_owned

OWN = [re.compile(r"a-\d\.tar"), re.compile(r"summary\.json")]


def test_missing_or_empty_folders_are_claimed_with_a_marker(tmp_path):
    claim_folder(tmp_path / "new", "shard", OWN)
    assert (tmp_path / "new" / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    claim_folder(tmp_path / "empty", "shard", OWN)
    marker = (tmp_path / "empty" / MARKER).read_bytes()
    (tmp_path / "empty" / "a-1.tar").write_bytes(b"ours")
    # claimed again: the same folder, the marker as it was (a DVC output must not vary), nothing removed
    assert claim_folder(tmp_path / "empty", "shard", OWN) == tmp_path / "empty"
    assert (tmp_path / "empty" / MARKER).read_bytes() == marker
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [MARKER, "a-1.tar"]
    with pytest.raises(CxrError, match="belongs to shard"):  # and still refused to another command
        claim_folder(tmp_path / "empty", "predict-heatmaps", OWN)


def test_a_folder_with_a_user_file_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "a-1.tar").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CxrError, match="refusing to write into .*'notes.txt'"):
        claim_folder(tmp_path, "shard", OWN)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / MARKER).exists()


def test_pre_marker_outputs_are_claimed_and_only_own_names_are_removed(tmp_path):
    for name in ("a-1.tar", "summary.json", ".a-2.tar.x8Yz_1.tmp", "summary.json.tmp"):
        (tmp_path / name).write_bytes(b"x")
    claim_folder(tmp_path, "shard", OWN)
    (tmp_path / "later.txt").write_text("added by the user after the claim")
    removed = remove_owned(tmp_path, OWN)
    assert sorted(removed) == [".a-2.tar.x8Yz_1.tmp", "a-1.tar", "summary.json", "summary.json.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, "later.txt"]


def test_another_commands_folder_is_refused(tmp_path):
    claim_folder(tmp_path, "predict-heatmaps", OWN)
    with pytest.raises(CxrError, match="belongs to predict-heatmaps"):
        claim_folder(tmp_path, "shard", OWN)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CxrError, match="not a folder"):
        claim_folder(tmp_path / "file", "shard", OWN)


def test_a_marker_planted_as_a_link_is_refused_and_its_target_never_written(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / MARKER).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CxrError, match="symbolic link"):
        claim_folder(folder, "shard", OWN)
    assert not (tmp_path / "elsewhere.json").exists()


def test_a_marker_temp_left_by_a_killed_claim_is_accepted_and_removed_with_the_owners_files(tmp_path):
    (tmp_path / f".{MARKER}.k9abcdef.tmp").write_text("half")  # killed while the marker was being written
    claim_folder(tmp_path, "shard", OWN)
    assert f".{MARKER}.k9abcdef.tmp" in remove_owned(tmp_path, OWN)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER]
