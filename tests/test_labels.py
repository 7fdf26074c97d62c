from pathlib import Path

import pytest

from pipeline.errors import CxrError
from pipeline.labels import LabelLine, LabelReject, parse_label_file, parse_line, safe_relative_name


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
