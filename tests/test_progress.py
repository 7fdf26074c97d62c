import io
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.progress import Progress, bounded_map, duration, progress_line


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


class _CountingPool(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        return super().submit(fn, *args)


def test_bounded_map_keeps_order_and_submits_only_a_window_ahead():
    with _CountingPool() as pool:
        results = []
        for i, value in enumerate(bounded_map(pool, lambda x: x * x, range(1000), ahead=3, chunk=4)):
            results.append(value)
            # while chunk i // 4 is consumed: the 3 ahead, and one refill per chunk taken so far
            assert pool.submitted <= 3 + i // 4 + 1
        assert results == [x * x for x in range(1000)] and pool.submitted == 250


def test_bounded_map_raises_the_first_error_and_cancels_the_rest():
    started = []

    def work(x):
        started.append(x)
        if x == 5:
            raise ValueError("bad item 5")
        return x

    with ThreadPoolExecutor(max_workers=1) as pool:
        out = bounded_map(pool, work, range(10_000), ahead=2)
        with pytest.raises(ValueError, match="bad item 5"):
            list(out)
    assert max(started) < 10  # the 10,000 items were never all submitted
