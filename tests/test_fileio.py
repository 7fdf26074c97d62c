import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import fileio
from pipeline.errors import CxrError


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(fileio.TEMP_SUFFIX))


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    fileio.atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().endswith("\n")
    assert _leftovers(tmp_path) == []


def test_failed_block_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.atomic_output(target) as stream:
            stream.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_disk_full_is_one_clean_error_without_temp(tmp_path, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    with pytest.raises(CxrError, match="no space left on device"):
        fileio.atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert not (tmp_path / "x.bin").exists()
    assert _leftovers(tmp_path) == []


def test_two_writers_get_distinct_temp_names(tmp_path):
    target = tmp_path / "shared.tar"
    with fileio.atomic_output(target) as first, fileio.atomic_output(target) as second:
        assert len(_leftovers(tmp_path)) == 2  # each run has its own temp file
        first.write(b"1")
        second.write(b"2")
    # The inner block commits first; the last commit wins whole, never a mix of both.
    assert target.read_bytes() == b"1"
    assert _leftovers(tmp_path) == []


def test_sha256_file_matches_hashlib_on_a_multi_chunk_file(tmp_path):
    import hashlib

    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fileio.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_of_a_missing_file_is_a_clean_error(tmp_path):
    with pytest.raises(CxrError, match="cannot read"):
        fileio.sha256_file(tmp_path / "absent")


def test_output_lock_refuses_a_second_writer(tmp_path):
    with fileio.output_lock(tmp_path / "shards"):
        with pytest.raises(CxrError, match="another run is writing"):
            with fileio.output_lock(tmp_path / "shards"):
                pass
    with fileio.output_lock(tmp_path / "shards"):
        pass  # released: a later run may write


def test_lock_of_a_killed_run_does_not_block_the_rerun(tmp_path):
    folder = tmp_path / "out"
    code = (
        "import sys, time; from pipeline.fileio import output_lock\n"
        f"with output_lock({str(folder)!r}):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CxrError):
            with fileio.output_lock(folder):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while True:
            try:
                with fileio.output_lock(folder):
                    break
            except CxrError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def test_csv_rows_are_written_as_the_csv_module_writes_them(tmp_path):
    path = tmp_path / "out" / "p.csv"
    fileio.atomic_write_csv(path, [("path", "note"), ("a,b.png", 'say "hi"'), ("c.png", 0.5)])
    assert path.read_bytes() == b'path,note\r\n"a,b.png","say ""hi"""\r\nc.png,0.5\r\n'


def test_save_figure_writes_a_png_of_the_figure_size_at_100_dpi_atomically(tmp_path):
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(3.0, 2.0))
    fig.subplots().plot([0, 1], [1, 0])
    out = fileio.save_figure(fig, tmp_path / "new" / "fig.png")
    assert out == tmp_path / "new" / "fig.png"
    with Image.open(out) as img:
        assert (img.format, img.size) == ("PNG", (300, 200))
    assert [p.name for p in out.parent.iterdir()] == ["fig.png"]  # no temp left beside it


def test_cells_a_spreadsheet_would_run_are_escaped_and_numbers_stay_numbers(tmp_path):
    from pipeline.fileio import atomic_write_csv, spreadsheet_safe, spreadsheet_value

    hostile = ["=1+2", "+SUM(A1)", "-2+3", "@cmd", "\t=x", "\r=x", '=HYPERLINK("http://x")', "'=already", "-"]
    plain = ["a.png", "-0.5", "+3", "1e-3", "-.25", "", "x=1"]
    atomic_write_csv(tmp_path / "t.csv", [hostile + plain, [-0.5, 3, None]])
    with open(tmp_path / "t.csv", newline="") as fh:
        first, second = list(csv.reader(fh))
    assert all(cell.startswith("'") for cell in first[: len(hostile)])
    assert first[len(hostile):] == plain and second == ["-0.5", "3", ""]
    assert [spreadsheet_value(c) for c in first] == hostile + plain
    assert spreadsheet_safe(7) == 7 and spreadsheet_value(None) is None


@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_planted_under_the_output_name_is_refused_not_followed_or_replaced(tmp_path, dangling):
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").symlink_to(victim)
    with pytest.raises(CxrError, match="symbolic link"):
        fileio.atomic_write_json(out / "report.json", {"a": 1})
    assert (out / "report.json").is_symlink()  # the link is not silently replaced either
    assert victim.read_text() == "keep me" if not dangling else not victim.exists()
    assert _leftovers(out) == []


def test_a_link_planted_while_the_block_runs_is_refused_before_the_rename(tmp_path):
    victim = tmp_path / "victim.txt"
    with pytest.raises(CxrError, match="symbolic link"):
        with fileio.atomic_output(tmp_path / "out.bin") as stream:
            stream.write(b"data")
            (tmp_path / "out.bin").symlink_to(victim)
    assert not victim.exists() and _leftovers(tmp_path) == []


def test_a_fifo_under_the_output_name_is_refused(tmp_path):
    os.mkfifo(tmp_path / "out.json")
    with pytest.raises(CxrError, match="not a regular file"):
        fileio.atomic_write_json(tmp_path / "out.json", {})


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_never_created(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / fileio.LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CxrError, match="symbolic link"):
        with fileio.output_lock(folder):
            pass
    assert not (tmp_path / "elsewhere").exists()


def test_the_lock_holder_removes_only_the_stale_temps_of_its_named_outputs(tmp_path):
    folder = tmp_path / "models"
    (folder / ".model.onnx.x1y2z3w4.tmp").mkdir(parents=True)  # export's work folder, killed mid-trace
    (folder / ".model.onnx.x1y2z3w4.tmp" / "graph.onnx").write_bytes(b"\0" * 1024)
    stale = [".last.pt.abcd_123.tmp", ".best.pt.0a1b2c3d.tmp"]
    kept = [".last.pt.notes.tmp", "keep.tmp", ".other.pt.abcdefgh.tmp", "last.pt", ".last.pt.abcdefgh.tmp.bak"]
    for name in stale + kept:
        (folder / name).write_bytes(b"x")
    (folder / ".best.pt.zzzzzzzz.tmp").symlink_to(tmp_path / "victim")  # a link is removed, never followed
    (tmp_path / "victim").write_bytes(b"keep")
    with fileio.output_lock(folder, stale_temps_of=("last.pt", "best.pt", "model.onnx")):
        assert sorted(p.name for p in folder.iterdir()) == sorted([*kept, fileio.LOCK_NAME])
    assert (tmp_path / "victim").read_bytes() == b"keep"


def test_a_kill_9_mid_write_leaves_a_temp_only_the_next_lock_holder_removes(tmp_path):
    folder = tmp_path / "models"
    code = (
        "import time; from pipeline.fileio import atomic_output, output_lock\n"
        f"with output_lock({str(folder)!r}), atomic_output({str(folder / 'last.pt')!r}) as out:\n"
        "    out.write(b'x' * 100000); out.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        with pytest.raises(CxrError, match="another run is writing"):  # a live writer's temp is never touched
            with fileio.output_lock(folder, stale_temps_of=("last.pt",)):
                pass
        assert len(_leftovers(folder)) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert len(_leftovers(folder)) == 1 and not (folder / "last.pt").exists()  # what kill -9 leaves
        with fileio.output_lock(folder, stale_temps_of=("last.pt",)):
            assert _leftovers(folder) == []
    finally:
        proc.kill()
        proc.wait()
