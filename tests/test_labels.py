import os
from pathlib import Path

import pytest

from pipeline.errors import CxrError
from pipeline.labels import (
    LabelLine,
    LabelReject,
    open_inside,
    parse_label_bytes,
    parse_label_file,
    parse_line,
    safe_relative_name,
)


def test_patient_ids_with_spaces_and_dotted_filenames_parse_from_the_right():
    line = parse_line("COVID 1 COVID(1).view.2.png positive sirm", 7)
    assert line == LabelLine(7, "COVID 1", "COVID(1).view.2.png", 1, "sirm")


@pytest.mark.parametrize(
    "label,value", [("positive", 1), ("negative", 0), ("COVID-19", 1), ("normal", 0), ("pneumonia", 0)]
)
def test_current_and_older_label_names(label, value):
    assert parse_line(f"p1 a.png {label} src", 1).label == value


@pytest.mark.parametrize(
    "text,reason",
    [
        ("p1 a.png positive", "bad label line"),
        ("p1 a.png maybe src", "unknown label"),
        ("p1 ../../etc/passwd positive src", "escapes"),
        ("p1 /etc/passwd positive src", "escapes"),
        ("p1 C:\\x.png positive src", "escapes"),
        ("p1 sub/../../x.png negative src", "escapes"),
    ],
)
def test_bad_lines_are_rejects_with_reasons(text, reason):
    result = parse_line(text, 3)
    assert isinstance(result, LabelReject) and reason in result.reason


def test_safe_names():
    assert safe_relative_name("a.b.c.png") == "a.b.c.png"
    assert safe_relative_name("sub/a.png") == "sub/a.png"
    assert safe_relative_name("..") is None
    assert safe_relative_name("") is None


def test_file_parsing_keeps_every_line(tmp_path: Path):
    f = tmp_path / "train.txt"
    f.write_text("p1 a.png positive s\n\nbroken\np 2 b.png negative s\n")
    lines, rejects = parse_label_file(f)
    assert [l.line_no for l in lines] == [1, 4] and [r.line_no for r in rejects] == [3]
    with pytest.raises(CxrError):
        parse_label_file(tmp_path / "missing.txt")


def test_label_text_is_utf8_lines_split_on_newline_only():
    data = (
        "\ufeffCOVID 1 a.png positive sirm\r\n"  # BOM + CRLF: the BOM must not stick to the patient id
        "pat\u2028ient b.png negative s\n"  # U+2028 inside a field is not a line break
        "p\u00a0x c.png negative s\n"  # a no-break space is part of the id, not a separator
        "\t \n"  # ASCII-blank line: skipped
    ).encode() + b"p4 \xff\xfe.png negative s\n" + "p5 ./sub/./e.png positive s".encode()
    lines, rejects = parse_label_bytes(data)
    assert [(l.line_no, l.patient_id, l.filename) for l in lines] == [
        (1, "COVID 1", "a.png"), (2, "pat\u2028ient", "b.png"), (3, "p\u00a0x", "c.png"), (6, "p5", "sub/e.png")
    ]
    assert [(r.line_no, r.reason) for r in rejects] == [(5, "line 5 is not valid UTF-8 (byte 3)")]


def test_control_characters_are_rejected():
    result = parse_line("p1 a\x1b[2J.png positive s", 2)
    assert isinstance(result, LabelReject) and "control character" in result.reason


def test_open_inside_refuses_links_out_folders_and_fifos(tmp_path: Path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "train" / "dir.png").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "train" / "ok.png").write_bytes(b"y")
    (root / "train" / "out.png").symlink_to(outside / "secret.png")
    (root / "train" / "in.png").symlink_to(root / "train" / "ok.png")
    (root / "train" / "linkdir").symlink_to(outside)
    (root / "train" / "loop.png").symlink_to(root / "train" / "loop.png")
    os.mkfifo(root / "train" / "fifo.png")
    assert "outside the dataset root" in open_inside(root, "train/out.png")
    assert "outside the dataset root" in open_inside(root, "train/linkdir/secret.png")
    assert "is a folder" in open_inside(root, "train/dir.png")
    assert "not a regular file" in open_inside(root, "train/fifo.png")
    assert "cannot resolve" in open_inside(root, "train/loop.png")
    assert "missing file" in open_inside(root, "train/none.png")
    fd, info = open_inside(root, "train/in.png")  # a link that stays inside is fine
    os.close(fd)
    assert info.st_size == 1


def test_a_label_file_linked_out_of_its_root_is_refused(tmp_path: Path):
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.txt").write_text("p1 a.png positive s\n")
    (tmp_path / "root" / "train.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(CxrError, match="points outside the dataset root"):
        parse_label_file(tmp_path / "root" / "train.txt")
