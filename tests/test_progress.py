import io

from pipeline.progress import Progress, duration, progress_line


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_plain_line_every_five_percent_with_rate_and_eta():
    stream, clock = io.StringIO(), FakeClock()  # StringIO is not a terminal, like a CI log or dvc's pipe
    progress = Progress(84_818, "shard equalized", stream=stream, clock=clock)
    for _ in range(84_818):
        clock.now += 1 / 212
        progress.update()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "shard equalized: 4,240/84,818 (5%), 212 img/s, ETA 6m20s"
    assert len(lines) == 21 and lines[-1].startswith("shard equalized: 84,818/84,818 (100%), 212 img/s")
    assert "ETA" not in lines[-1]


def test_small_totals_and_disabled_progress():
    stream = io.StringIO()
    with Progress(3, "ingest test", stream=stream, clock=FakeClock()) as progress:
        for _ in range(3):
            progress.update()
    assert len(stream.getvalue().splitlines()) == 3  # every item is a 5% step of 3
    quiet = io.StringIO()
    with Progress(100, "x", enabled=False, stream=quiet) as progress:
        progress.update(100)
    assert quiet.getvalue() == ""


def test_durations_and_line_format():
    assert [duration(s) for s in (0, 45.4, 370, 3720)] == ["0s", "45s", "6m10s", "1h02m"]
    assert progress_line("ingest train", 0, 10, 0.0) == "ingest train: 0/10 (0%), 0 img/s"
